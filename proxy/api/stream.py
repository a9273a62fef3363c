"""OpenAI image streaming (SSE): keep-alive comments while the route works, then the image events.

Every stream ends: with the completed events, or with an OpenAI error event, and then it closes. The
head (status 200) goes out with the first event or keep-alive: a request that fails before that (a
rate limit, an upstream's 400, no route) is answered with its HTTP status and headers, as without stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import pybase64 as base64  # the same API as the standard library's, 20-40x faster on megabytes
from aiohttp import web

from ..errors import ProxyError, UpstreamError
from ..http.request_log import REQUEST_ID
from ..http.send import send_or_drop
from ..media.output import FinalImage, background_of, has_transparency, inspect, reencode
from ..media.partials import PartialImage, open_sink
from ..request import ImageRequest
from ..telemetry import tracing
from .context import STREAM_ERROR
from .serving import generate

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("proxy")
KEEPALIVE_SECONDS = 15.0


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def sse_with_b64(event: str, data: dict) -> tuple[bytes, bytes | memoryview, bytes]:
    """sse(event, data) in three pieces (joined, the same bytes), with data["b64_json"] (str, bytes or a view)
    handed on as it is rather than scanned by json.dumps: on a 4 MB image that scan held the event loop
    ~14 ms, every other request waiting. Base64 has no character JSON escapes (output.py hands on only text
    that decoded strictly as base64), so its JSON is itself between quotes, as body_parts() in
    generations.py does for the answer without stream."""
    b64 = data["b64_json"]
    head, _, tail = sse(event, {**data, "b64_json": _MARK}).partition(_MARK_BYTES)  # its quotes stay
    return head, b64.encode("ascii") if isinstance(b64, str) else b64, tail


# Where the base64 goes: random per process and never sent, so no text a client sent (a prompt) can hold it.
# The first one found is the image's: b64_json is written right after `type`, whose value is ours.
_MARK = os.urandom(16).hex()
_MARK_BYTES = _MARK.encode()


class _Events:
    """The stream's writes: the head on the first one; every write, small or not, under send_timeout
    (a client that stops reading is dropped, not kept with the images it holds)."""

    def __init__(self, gw: Gateway, request: web.Request, response: web.StreamResponse) -> None:
        self.request, self.response, self.stall = request, response, gw.config.server.send_timeout

    async def send(self, *pieces: bytes | memoryview) -> None:
        """Pieces of one event, each written as it is (a megabyte image's base64 is not copied to join it)."""
        try:
            if not self.response.prepared:
                await self.response.prepare(self.request)
            for data in pieces:
                await send_or_drop(self.response.write(data), self.request.transport, self.stall)
        except ConnectionError:
            # The client left (or was dropped). A server without handler_cancellation (a host app the
            # gateway is mounted in) learns it here, not by cancelling the request: it is still the
            # client's cancel (499, the work stopped), not a failure of the proxy (an ERROR and a 500).
            raise asyncio.CancelledError("the client disconnected") from None


async def respond(gw: Gateway, request: web.Request, req: ImageRequest, prefix: str) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Request-Id": request[REQUEST_ID],
    })
    out = _Events(gw, request, response)
    # Opened before the work starts, so the route attempts it starts can reach it.
    sink = open_sink() if req.partial_images else None
    work = asyncio.ensure_future(generate(gw, request, req))
    common = {"size": req.size_text, "quality": req.quality or "auto", "background": req.background or "auto"}
    previews = _Previews(req, prefix, common, max(gw.output.max_image_pixels, 4 * req.width * req.height))
    getter: asyncio.Future | None = None
    try:
        while not work.done():
            if sink is not None and getter is None:
                getter = asyncio.ensure_future(sink.queue.get())
            waiting: set[asyncio.Future[Any]] = {work} if getter is None else {work, getter}
            done, _ = await asyncio.wait(waiting, timeout=gw.keepalive_seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter is not None and getter in done:
                if (event := await previews.event(getter.result())) is not None:
                    await out.send(*event)
                getter = None
            elif not done:
                await out.send(b": keepalive\n\n")
        result, payload = work.result()
        await background_of(result.images)  # a cache hit's images are looked at now
        while sink is not None and not sink.queue.empty():  # previews that came in with the result
            if (event := await previews.event(sink.queue.get_nowait())) is not None:
                await out.send(*event)
        last = len(payload["data"]) - 1
        for i, item in enumerate(payload["data"]):
            completed: dict[str, Any] = {
                     "type": f"{prefix}.completed", "b64_json": item["b64_json"],
                     "created_at": payload["created"],
                     **common, "output_format": payload["output_format"],
                     "background": _background(result.images[i], common["background"]),
                     "revised_prompt": item["revised_prompt"], "usage": NO_USAGE}
            if i == last:  # the request's cost, known only now (the head went out long ago): our own fields
                completed |= gw.usage.stream_fields()
            await out.send(*sse_with_b64(completed["type"], completed))
    except ProxyError as e:
        if not response.prepared:
            raise  # nothing sent yet: an HTTP error with its status (and Retry-After), as without stream
        request[STREAM_ERROR] = e
        await _end_with_error(out, gw.scrubber.error(e))
    except asyncio.CancelledError:
        raise  # the client left: nobody to tell
    except Exception:
        if not response.prepared:
            raise  # the middleware logs it and answers a 500
        log.exception("request %s: the stream failed", request[REQUEST_ID])
        error = ProxyError(f"The proxy failed to handle the request (request id {request[REQUEST_ID]}).",
                           code="internal_error")
        request[STREAM_ERROR] = error
        await _end_with_error(out, error)
    finally:
        if not work.done():
            work.cancel()
        elif not work.cancelled():
            work.exception()  # seen: a failure the client left before hearing of is no "never retrieved" error
        if getter is not None:
            getter.cancel()
    await response.write_eof()
    return response


def _background(image: FinalImage, asked: str) -> str:
    """A completed event's background: what its own image is (OpenAI's completed events say transparent or
    opaque, "auto" resolved, whether the request set one or not)."""
    if image.transparent is None:  # not seen (cannot happen for a stream's base64 images; kept safe)
        return asked
    return "transparent" if image.transparent else "opaque"


# Token counts mean nothing for a diffusion model; the field is there because the event schema has it.
NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}


class _Previews:
    """The partial_image events of one stream: at most partial_images for each of the n images, numbered
    0, 1, ... here (a route retried, or fallen back to, after some previews sends its own from 0 again).
    An upstream's previews are not trusted: one that is not an image, or of an image the request does not
    have, is skipped; one in another format than the asked one is converted, one of another size fitted to
    the requested size (the event's `size`, as the final image is fitted), one with transparent pixels
    under background "opaque" flattened, as the final image is."""

    def __init__(self, req: ImageRequest, prefix: str, common: dict, max_pixels: int) -> None:
        self.req, self.prefix, self.common, self.max_pixels = req, prefix, common, max_pixels
        self.sent: dict[int, int] = {}  # image index -> previews sent for it

    async def event(self, partial: PartialImage) -> tuple[bytes, bytes | memoryview, bytes] | None:
        count = self.sent.get(partial.image_index, 0)
        if count >= (self.req.partial_images or 0) or not 0 <= partial.image_index < self.req.n:
            return None
        with tracing.span("stream.partial_image", {"qip.image_index": partial.image_index,
                                                   "qip.partial_image_index": count}):
            checked = await asyncio.to_thread(self._checked, partial.data)
        if checked is None:
            return None
        b64, fmt, background = checked
        self.sent[partial.image_index] = count + 1
        event = {"type": f"{self.prefix}.partial_image", "b64_json": b64, "partial_image_index": count,
                 "image_index": partial.image_index, "created_at": int(time.time()), **self.common,
                 "output_format": fmt, "background": background}
        return sse_with_b64(event["type"], event)

    def _checked(self, data: bytes) -> tuple[str, str, str] | None:
        """The preview as base64, its format and background (what it is, when the request asked one); None
        for one that is not an image (CPU: off the loop)."""
        try:
            info = inspect(data, self.max_pixels)
            target = self.req.output_format or info.format
            size = (self.req.width, self.req.height)
            # OpenAI's partial events carry the requested image's size, and its previews have it; an upstream's
            # smaller previews would draw in a corner of a client's canvas laid out from `size`.
            opaque = self.req.background == "opaque" and has_transparency(data)
            if target != info.format or (info.width, info.height) != size or opaque:
                data = reencode(data, info, target, self.req.output_compression, size, opaque).data
            background = self.common["background"]
            if self.req.background is not None:
                background = "transparent" if has_transparency(data) else "opaque"
        except UpstreamError as e:
            log.info("skipping a partial image: %s", e)
            return None
        except Exception:  # a preview that cannot be converted is skipped, never the image
            log.exception("could not convert a partial image")
            return None
        return base64.b64encode(data).decode("ascii"), target, background


async def _end_with_error(out: _Events, error: ProxyError) -> None:
    await out.send(sse("error", error.to_dict()))
