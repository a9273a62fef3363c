"""Every other /v1 request, forwarded unchanged and unbuffered to the configured default upstream.

The client's path stays under the upstream's base path: dot segments (however they are encoded)
are resolved here and a path that climbs out of /v1 is a 404 that never reaches the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from ..config import PassthroughConfig
from ..errors import MethodNotAllowed, NotFound, PayloadTooLarge, UpstreamError, UpstreamTimeout
from ..http.request_log import REQUEST_ID
from ..http.send import send_or_drop
from .context import FORWARDED

log = logging.getLogger("proxy.passthrough")  # its name before proxy/ had packages: logging configs keep working
# Error bodies are small JSON; past this they are cut (they are scrubbed whole, so they are read whole).
ERROR_BODY_LIMIT = 1024 * 1024

# RFC 9110 7.6.1: meant for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# The proxy answered the client's Expect itself (aiohttp sends 100 Continue): forwarded, an upstream that
# sends no 100 would never get the body (aiohttp's client waits for one), and the call hangs.
REQUEST_DROP = frozenset({"host", "content-length", "expect"})
# What an OpenAI-style API uses. TRACE echoes the request it got (the passthrough key included) and
# CONNECT opens a tunnel: neither is forwarded, nor any other method.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


# A segment still changing after this many rounds of percent-decoding is refused outright.
MAX_DECODE_ROUNDS = 8


def _decoded(segment: str) -> str | None:
    """Percent-decode until nothing changes (%252e -> %2e -> .); None if it never settles."""
    for _ in range(MAX_DECODE_ROUNDS):
        decoded = unquote(segment)
        if decoded == segment:
            return decoded
        segment = decoded
    return None


def confined_path(raw_path: str) -> str | None:
    """The raw path with its dot segments resolved, or None when it climbs above / or is ambiguous.

    A segment is a dot segment when it decodes (at any depth of percent-encoding) to "." or "..",
    so "%2e%2e" and "%252e%252e" count as "..". Refused outright: backslashes and control characters
    anywhere (some servers read "\\" as "/"), and a dot part behind an encoded slash ("..%2f") or
    before a ";" ("..;x"), which an upstream that decodes %2F or strips path parameters before
    routing would read as a dot segment. Empty segments
    ("//") are dropped, so an upstream that merges slashes sees the same path. What is left holds
    no dot segment at any encoding depth and keeps the client's own encoding otherwise.
    """
    segments = raw_path.split("/")[1:] if raw_path.startswith("/") else None
    if not segments:
        return None
    kept: list[str] = []
    for i, raw in enumerate(segments):
        last = i == len(segments) - 1
        decoded = _decoded(raw)
        if decoded is None or "\\" in decoded or any(c < " " or c == "\x7f" for c in decoded):
            return None
        # Behind an encoded slash or a ";parameter" (Tomcat reads "..;x" as ".."), a dot part is ambiguous.
        parts = [part.split(";", 1)[0] for part in decoded.split("/")]
        if (len(parts) > 1 or ";" in decoded) and any(part in (".", "..") for part in parts):
            return None
        if decoded in (".", ".."):
            if decoded == "..":
                if not kept:
                    return None
                kept.pop()
            if last:
                kept.append("")  # "/a/b/.." is "/a/", as RFC 3986 5.2.4 has it
        elif raw or last:
            kept.append(raw)
    return "/" + "/".join(kept)


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int | None) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")


def forward_headers(headers: MultiMapping[str], extra_drop: frozenset[str] = frozenset(),
                    scrub: Callable[[str], str] | None = None) -> CIMultiDict:
    """Copy headers minus hop-by-hop ones, including those the Connection header names; each value
    through `scrub` when given (an upstream's answer may echo what it was sent, the key included)."""
    named = {h.strip().lower() for value in headers.getall("Connection", []) for h in value.split(",")}
    drop = HOP_BY_HOP | named | extra_drop
    return CIMultiDict((k, scrub(v) if scrub else v) for k, v in headers.items() if k.lower() not in drop)


class Passthrough:
    def __init__(self, config: PassthroughConfig, max_body_bytes: int | None = None,
                 scrub: Callable[[str], str] | None = None, send_timeout: float = 30) -> None:
        self.config = config
        # Applied to error bodies (status >= 400, not a stream): an upstream may echo the key it got.
        self.scrub = scrub
        self.base_url = (config.base_url or "").rstrip("/")
        # Bodies over this are refused with 413; chunked ones (no Content-Length) are counted as they go.
        self.max_body_bytes = max_body_bytes
        # A client that takes none of its answer for this long is dropped, and the upstream call with it
        # (server.send_timeout; the default is that setting's).
        self.send_timeout = send_timeout
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No decompression and no cookie jar: bytes and headers go through as they are. No cap on
        # connections: a long chat stream would otherwise hold one of aiohttp's default 100.
        self.http = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.config.timeout),
        )

    async def close(self) -> None:
        if self.http:
            await self.http.close()

    def target_url(self, request: web.Request) -> str:
        """base_url plus the client's path below its own /v1 (normalised), plus the raw query.

        NotFound (OpenAI's unknown_url) when the path leaves /v1.
        """
        path = confined_path(request.rel_url.raw_path)
        first, _, rest = (path or "")[1:].partition("/")
        if path is None or _decoded(first) != "v1":
            raise NotFound(f"Invalid URL ({request.method} {request.path}).", code="unknown_url")
        # base_url ends in /v1 (like OpenAI's); the client's path is relative to its own /v1.
        query = request.rel_url.raw_query_string
        return f"{self.base_url}/{rest}" + (f"?{query}" if query else "")

    async def forward(self, request: web.Request, body: bytes | None = None,
                      drop_client_auth: bool = False) -> web.StreamResponse:
        """Send the request upstream and stream the answer back; body is given when already read.

        The upstream gets the configured key; without one, the client's own Authorization unless
        `drop_client_auth` (it was a key for this proxy).
        """
        if request.method not in METHODS:
            allowed = ", ".join(METHODS)
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}.",
                                   headers={"Allow": allowed})
        url = URL(self.target_url(request), encoded=True)
        limit = self.max_body_bytes
        headers = forward_headers(request.headers, REQUEST_DROP)
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        elif drop_client_auth:
            headers.popall("Authorization", None)  # every one: a second would go through
        if request.remote:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {request.remote}" if prior else request.remote
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        over: list[int] = []  # set when a chunked body ran over the limit
        data: bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None
        if body is not None:
            data = body
        elif request.body_exists:
            data = request.content
            if request.content_length is not None:
                if limit is not None and request.content_length > limit:
                    raise _too_large(limit)
                headers["Content-Length"] = str(request.content_length)
            elif limit is not None:
                data = _capped(request.content, limit, over)
        else:
            data = None
        response: web.StreamResponse | None = None
        request[FORWARDED] = ""
        try:
            # encoded=True: the client's raw path and query as they are (yarl would turn %2F into /).
            assert self.http is not None  # start() runs before the server takes requests
            async with self.http.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
            ) as upstream:
                if upstream.status < 200:  # 1xx is never a final answer (a 101 would switch protocols)
                    raise UpstreamError(f"The passthrough upstream answered {upstream.status} as a final answer.")
                if self.scrub and upstream.status >= 400 and "event-stream" not in upstream.content_type:
                    return _with_request_id(await self._scrubbed(upstream, self.scrub), request)
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                response.headers.extend(forward_headers(upstream.headers, scrub=self.scrub))
                _with_request_id(response, request)
                await response.prepare(request)
                try:
                    async for chunk in upstream.content.iter_any():
                        await send_or_drop(response.write(chunk), request.transport, self.send_timeout)
                    await response.write_eof()
                except ConnectionResetError:  # writing to the client: it is gone, or was dropped
                    request[FORWARDED] = "cancelled"  # leaving the block closes the upstream call at once
                return response
        except (TimeoutError, aiohttp.ClientError) as e:
            if over and (response is None or not response.prepared):
                # The upstream got at most `limit` bytes and a cut connection, never the body's end.
                raise _too_large(limit) from None
            if response is not None and response.prepared:
                # The answer has started: no error can be sent any more, so the connection is cut (the
                # client sees a short body, never a clean end). Cut here rather than raised: raised, it
                # reached aiohttp as an ERROR "Error handling request" with a traceback, every time an
                # upstream dropped a chat stream. aiohttp's closing write_eof then fails quietly.
                log.warning("passthrough stream broke off: %s", type(e).__name__)
                request[FORWARDED] = "timeout" if isinstance(e, asyncio.TimeoutError) else "failed"
                if request.transport is not None:
                    request.transport.close()
                return response
            if isinstance(e, asyncio.TimeoutError):
                raise UpstreamTimeout("The passthrough upstream did not answer in time.") from None
            raise UpstreamError(f"The passthrough upstream could not be reached ({type(e).__name__}).") from None


    async def _scrubbed(self, upstream: aiohttp.ClientResponse, scrub: Callable[[str], str]) -> web.Response:
        """An error answer, read whole (capped) and scrubbed of secrets before it is handed on."""
        try:  # read(n) would give only what has arrived so far: the rest of the body would be lost
            raw = await upstream.content.readexactly(ERROR_BODY_LIMIT)
        except asyncio.IncompleteReadError as e:  # the whole body, shorter than the limit
            raw = e.partial
        encoding = upstream.headers.get("Content-Encoding", "identity").lower()
        if encoding in ("gzip", "deflate"):  # bytes pass through undecoded (auto_decompress is off)
            try:
                raw = zlib.decompressobj(wbits=47).decompress(raw, ERROR_BODY_LIMIT)
            except zlib.error:
                raw = b""
        elif encoding != "identity":
            raw = b""  # an encoding we cannot read is not handed on unread
        text = scrub(raw.decode("utf-8", "replace"))
        headers = forward_headers(upstream.headers, frozenset({"content-length", "content-encoding"}), scrub)
        return web.Response(status=upstream.status, reason=upstream.reason, body=text.encode(), headers=headers)


def _with_request_id(response: web.StreamResponse, request: web.Request) -> web.StreamResponse:
    """The request's id (the one its log line has) as X-Request-Id, unless the upstream sent its own: that
    one is what its vendor's support asks for."""
    if "X-Request-Id" not in response.headers and REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
    return response


async def _capped(stream: aiohttp.StreamReader, limit: int, over: list[int]) -> AsyncIterator[bytes]:
    """The body as it arrives; past `limit` bytes it stops with an error, which cuts the upstream request."""
    total = 0
    async for chunk in stream.iter_any():
        total += len(chunk)
        if total > limit:
            over.append(total)
            raise _BodyTooLarge
        yield chunk
