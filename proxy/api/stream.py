"""OpenAI image streaming (SSE): keep-alive comments while the route works, then the image events.

Every stream ends: with the completed events, or with an OpenAI error event, and then it closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import ProxyError
from ..request import ImageRequest

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
    work = asyncio.ensure_future(generate(gw, request, req))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=gw.keepalive_seconds)
            if not work.done():
                await response.write(b": keepalive\n\n")
        _, payload = work.result()
        for item in payload["data"]:
            event = {"type": f"{prefix}.completed", "b64_json": item["b64_json"], "created_at": payload["created"],
                     "size": payload["size"], "quality": req.quality or "auto",
                     "background": req.background or "auto", "output_format": payload["output_format"],
                     "revised_prompt": item["revised_prompt"]}
            await response.write(sse(event["type"], event))
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
    await response.write_eof()
    return response


async def _end_with_error(response: web.StreamResponse, error: ProxyError) -> None:
    await response.write(sse("error", error.to_dict()))
