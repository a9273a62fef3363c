"""OpenAI image streaming (SSE): keep-alive comments while the route works, then the image events.

Every stream ends: with the completed events, or with an OpenAI error event, and then it closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import pybase64 as base64  # the same API as the standard library's, 20-40x faster on megabytes
from aiohttp import web

from ..errors import ProxyError
from ..partials import PartialImage, open_sink
from ..request import ImageRequest
from ..send import send_or_drop

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("proxy")
KEEPALIVE_SECONDS = 15.0


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


async def respond(gw: Gateway, request: web.Request, req: ImageRequest, prefix: str) -> web.StreamResponse:
    from ..app import REQUEST_ID, STREAM_ERROR
    from .generations import generate

    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Request-Id": request[REQUEST_ID],
    })
    await response.prepare(request)
    # Opened before the work starts, so the route attempts it starts can reach it.
    sink = open_sink() if req.partial_images else None
    work = asyncio.ensure_future(generate(gw, request, req))
    common = {"size": req.size_text, "quality": req.quality or "auto", "background": req.background or "auto"}
    getter: asyncio.Future | None = None
    try:
        while not work.done():
            if sink is not None and getter is None:
                getter = asyncio.ensure_future(sink.queue.get())
            done, _ = await asyncio.wait({work, getter} - {None}, timeout=gw.keepalive_seconds,
                                         return_when=asyncio.FIRST_COMPLETED)
            if getter is not None and getter in done:
                await response.write(await _partial_event(getter.result(), prefix, common))
                getter = None
            elif not done:
                await response.write(b": keepalive\n\n")
        _, payload = work.result()
        while sink is not None and not sink.queue.empty():  # previews that came in with the result
            await response.write(await _partial_event(sink.queue.get_nowait(), prefix, common))
        for item in payload["data"]:
            b64 = item["b64_json"]
            event = {"type": f"{prefix}.completed", "b64_json": b64 if isinstance(b64, str) else str(b64, "ascii"),
                     "created_at": payload["created"],
                     **common, "output_format": payload["output_format"],
                     "revised_prompt": item["revised_prompt"], "usage": NO_USAGE}
            # A client that takes none of an image for send_timeout is dropped (proxy/send.py).
            await send_or_drop(response.write(sse(event["type"], event)), request.transport,
                               gw.config.server.send_timeout)
    except ProxyError as e:
        request[STREAM_ERROR] = e
        await _end_with_error(response, gw.scrubber.error(e))
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client left: nobody to tell
    except Exception:
        log.exception("request %s: the stream failed", request[REQUEST_ID])
        error = ProxyError(f"The proxy failed to handle the request (request id {request[REQUEST_ID]}).",
                           code="internal_error")
        request[STREAM_ERROR] = error
        await _end_with_error(response, error)
    finally:
        if not work.done():
            work.cancel()
        if getter is not None:
            getter.cancel()
    await response.write_eof()
    return response


# Token counts mean nothing for a diffusion model; the field is there because the event schema has it.
NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0}}


async def _partial_event(partial: PartialImage, prefix: str, common: dict) -> bytes:
    b64 = await asyncio.to_thread(lambda: base64.b64encode(partial.data).decode("ascii"))
    event = {"type": f"{prefix}.partial_image", "b64_json": b64, "partial_image_index": partial.partial_index,
             "image_index": partial.image_index, "created_at": int(time.time()), **common,
             "output_format": partial.format}
    return sse(event["type"], event)


async def _end_with_error(response: web.StreamResponse, error: ProxyError) -> None:
    await response.write(sse("error", error.to_dict()))
