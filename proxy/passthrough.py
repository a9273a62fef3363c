"""Every other /v1 request, forwarded unchanged and unbuffered to the configured default upstream."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .config import PassthroughConfig
from .errors import UpstreamError, UpstreamTimeout

log = logging.getLogger(__name__)

# RFC 9110 7.6.1: meant for one connection only, never forwarded.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})


def forward_headers(headers, extra_drop: frozenset[str] = frozenset()) -> CIMultiDict:
    """Copy headers minus hop-by-hop ones, including those the Connection header names."""
    named = {h.strip().lower() for value in headers.getall("Connection", []) for h in value.split(",")}
    drop = HOP_BY_HOP | named | extra_drop
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


class Passthrough:
    def __init__(self, config: PassthroughConfig):
        self.config = config
        self.base_url = (config.base_url or "").rstrip("/")
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No decompression and no cookie jar: bytes and headers go through as they are.
        self.http = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.config.timeout),
        )

    async def close(self) -> None:
        if self.http:
            await self.http.close()

    def target_url(self, request: web.Request) -> str:
        # base_url ends in /v1 (like OpenAI's); the client's path is relative to its own /v1.
        path = request.rel_url.raw_path
        if path.startswith("/v1/"):
            path = path[3:]
        query = request.rel_url.raw_query_string
        return f"{self.base_url}{path}" + (f"?{query}" if query else "")

    async def forward(self, request: web.Request, body: bytes | None = None,
                      drop_client_auth: bool = False) -> web.StreamResponse:
        """Send the request upstream and stream the answer back; body is given when already read.

        The upstream gets the configured key; without one, the client's own Authorization unless
        `drop_client_auth` (it was a key for this proxy).
        """
        headers = forward_headers(request.headers, frozenset({"host", "content-length"}))
        if self.config.api_key:
            headers["Authorization"] = f"Bearer {self.config.api_key}"
        elif drop_client_auth:
            headers.pop("Authorization", None)
        if request.remote:
            prior = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{prior}, {request.remote}" if prior else request.remote
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        if body is not None:
            data = body
        elif request.body_exists:
            data = request.content
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
        else:
            data = None
        response: web.StreamResponse | None = None
        try:
            # encoded=True: the client's raw path and query as they are (yarl would turn %2F into /).
            async with self.http.request(
                request.method, URL(self.target_url(request), encoded=True), headers=headers, data=data,
                allow_redirects=False,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                response.headers.extend(forward_headers(upstream.headers))
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (TimeoutError, aiohttp.ClientError) as e:
            if response is not None and response.prepared:
                # The answer has started: no error can be sent any more, so the connection is cut.
                log.warning("passthrough stream broke off: %s", type(e).__name__)
                raise
            if isinstance(e, asyncio.TimeoutError):
                raise UpstreamTimeout("The passthrough upstream did not answer in time.") from None
            raise UpstreamError(f"The passthrough upstream could not be reached ({type(e).__name__}).") from None
