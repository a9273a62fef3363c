"""POST /v1/images/generations: parse -> router (route attempt includes the image checks) -> render."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from ..errors import InvalidRequest, ModelNotFound, ProxyError
from ..http import jsonbytes
from ..http.body import read_body
from ..http.cpu import INLINE_BYTES
from ..http.request_log import outcome_of
from ..http.send import send_or_drop
from ..jobs.ask import BACKGROUND, mark_background
from ..jobs.runner import SHUTTING_DOWN
from ..media.output import check_output_request
from ..media.sizing import check_work, resolve_size
from ..request import BACKGROUNDS, ImageRequest, parse_fields, request_from
from ..routing.policy import API_KEY
from ..state.idempotency import HEADER as IDEMPOTENCY_KEY
from ..state.idempotency import REPLAYED
from ..state.shared import Answer
from ..telemetry import tracing
from ..wire_json import _safe
from . import jobs, stream
from .context import BODY, MODEL, NotServedHere
from .serving import generate, route_headers

if TYPE_CHECKING:
    from ..jobs.model import Job
    from .gateway import Gateway

GENERATIONS_PATH, EDITS_PATH = "/v1/images/generations", "/v1/images/edits"


def served_model(gw: Gateway, request: web.Request, asked: object, default: str | None, served: Iterable[str],
                 label: str = "Models served here") -> str:
    """The model an image call names (or the default), checked: served here and allowed for the caller's
    key. A model served elsewhere goes on to passthrough or the host app (NotServedHere)."""
    model = asked or default
    if not isinstance(model, str):
        raise InvalidRequest("Invalid 'model': must be a string.", param="model")
    if model not in gw.config.models:
        if gw.passthrough or gw.mounted:
            raise NotServedHere
        raise ModelNotFound(f"The model '{model}' does not exist. {label}: {', '.join(served) or 'none'}.",
                            param="model")
    request[MODEL] = model
    if gw.policy.enabled:  # (no keys: no key on the request, no model refused)
        gw.policy.check_model(request.get(API_KEY), model)  # before a stream starts: a real 403
    return model


def check_choices(gw: Gateway, req: ImageRequest) -> None:
    """`quality` and `background` as the model can honour them: the answer echoes both, so a value no route
    takes (OpenAI refuses it too) or a transparency no route can make is a 400, never an answer that says so."""
    qualities = gw.qualities[req.model]  # (None: an upstream that gets it as sent judges it)
    if req.quality is not None and qualities is not None and req.quality not in qualities:
        raise InvalidRequest(f"Invalid 'quality': '{_safe(req.quality)}' is not one of "
                             f"{', '.join(sorted(qualities))}.", param="quality")
    if req.background is not None and req.background not in BACKGROUNDS:
        raise InvalidRequest(f"Invalid 'background': '{_safe(req.background)}' is not one of "
                             f"{', '.join(BACKGROUNDS)}.", param="background")
    if req.background != "transparent":
        return
    if req.output_format == "jpeg":  # as OpenAI: JPEG has no alpha channel
        raise InvalidRequest("Invalid 'background': a transparent background needs an output_format with an "
                             "alpha channel (png, webp, gif or avif), not jpeg.", param="background")
    if req.model not in gw.transparent_models:
        raise InvalidRequest(f"Transparent background is not supported for the model '{req.model}': its routes "
                             "make opaque images. Send background 'opaque' or 'auto', or leave it out.",
                             param="background")


async def parse_generation(gw: Gateway, request: web.Request) -> ImageRequest:
    body = await read_body(request, files=False)
    fields = body.fields
    if body.raw is not None:
        request[BODY] = body.raw
    mark_background(request, fields)
    model = served_model(gw, request, fields.get("model"), gw.default_model, gw.config.models)
    values, extra = parse_fields(fields, checked=True)  # read_body checked its names and strings
    table = gw.size_tables[model]
    width, height = resolve_size(table, values["size"], values["aspect_ratio"], values["resolution"])
    check_work(table, width, height, values["n"])
    req = request_from(values, extra, model, width, height)
    check_output_request(req)
    check_choices(gw, req)
    return req


async def generations(gw: Gateway, request: web.Request) -> web.StreamResponse:
    with tracing.span("parse"):
        req = await parse_generation(gw, request)
    traced(req)
    if BACKGROUND in request:
        if gw.policy.enabled:  # a background submit needs no concurrency slot
            await gw.policy.without_slot(request)
        return await jobs.submit(gw, request, req)
    if gw.policy.enabled:  # this call needs one
        gw.policy.needs_slot(request)
    if req.stream:
        return await stream.respond(gw, request, replace(req, response_format="b64_json"), "image_generation")
    return await respond(gw, request, req)


def traced(req: ImageRequest) -> None:
    """What the request asks for, on its span (the prompt only where the operator opted in)."""
    if tracing.current() is not None:
        tracing.annotate_request({"qip.model": req.model, "qip.n": req.n, "qip.size": req.size_text,
                                  "qip.stream": req.stream, "qip.response_format": req.response_format,
                                  "qip.edit": req.is_edit, "qip.partial_images": req.partial_images,
                                  **tracing.prompt_attributes(req.prompt)})


async def respond(gw: Gateway, request: web.Request, req: ImageRequest) -> web.Response:
    """The JSON answer to a generation or an edit."""
    if IDEMPOTENCY_KEY in request.headers:
        # Run once per key and body, repeats get the stored answer.
        answer, replayed = await gw.idempotency.run(request, req, partial(answered, gw, request, req))
    else:  # most calls: straight to the work, without the idempotency layer's frame on the request's path
        answer, replayed = await answered(gw, request, req), False
    response = answer_response(answer, gw.config.server.send_timeout)
    if replayed:
        response.headers[REPLAYED] = "true"
    return response


async def answered(gw: Gateway, request: web.Request, req: ImageRequest) -> Answer:
    result, payload = await generate(gw, request, req)
    return Answer(200, body_parts(payload), route_headers(result) | gw.usage.headers())


def answer_response(answer: Answer, stall: float | None) -> web.Response:
    """The web.Response that sends an answer: its body in pieces (SentAsIs) where it is large."""
    body = answer.body
    if (len(body) if isinstance(body, bytes) else sum(map(len, body))) <= INLINE_BYTES:
        # A small answer goes aiohttp's own way: one write with the headers, no payload object to look up,
        # size and write (the same bytes and headers on the wire as SentAsIs would send).
        return SentBytes(body=body if isinstance(body, bytes) else b"".join(body), status=answer.status,
                         headers={**answer.headers, "Content-Type": answer.content_type})
    return web.Response(body=SentAsIs(body, stall=stall), status=answer.status, content_type=answer.content_type,
                        headers=answer.headers)


class SentBytes(web.Response):
    """A small answer as bytes, let go of once sent: aiohttp keeps a keep-alive connection's last response
    until the next request arrives on it, and thousands of idle connections would each hold an answer
    (17 KB for a 64x64 PNG: memory per request in flight 43 -> 64 KB at 4,000 in flight)."""

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await super().write_eof(data)
        finally:
            self._body = None


class SentAsIs(Payload):
    """A response body handed to the socket piece by piece, never joined: the JSON around the images, and
    each image's base64 as it came (often a view of the upstream's answer).

    The first piece (small: the JSON up to the first image) goes out with the headers; each megabyte
    piece is one write of a view (uvloop's transport keeps the view until the socket takes it; asyncio's
    copies what the socket did not take). Joining them would allocate and copy the whole answer once
    more (4 MB for a 1024x1024 PNG). A small answer needs none of this: answer_response() sends it as bytes (SentBytes).
    """

    def __init__(self, body: bytes | tuple[bytes | memoryview, ...], stall: float | None = None) -> None:
        parts = (body,) if isinstance(body, bytes) else body
        super().__init__(parts, content_type="application/json")
        self._size = sum(map(len, parts))
        self._stall = stall  # a client that takes none of a big piece for this long is dropped

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return b"".join(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        try:
            for part in self._value:
                big = len(part) > INLINE_BYTES
                if big and hasattr(writer, "send_headers"):
                    writer.send_headers()  # else aiohttp joins the headers with this first piece
                write = writer.write(part if isinstance(part, memoryview) else memoryview(part))
                if big and self._stall is not None:
                    await send_or_drop(write, getattr(writer, "transport", None), self._stall)
                else:
                    await write
        finally:
            # Sent (or failed): aiohttp keeps the response until the connection's next request; the
            # pieces (and the upstream's answer they are views of) need not wait with it.
            self._value = ()


def body_parts(payload: dict) -> tuple[bytes | memoryview, ...]:
    """The response body in pieces: the JSON of the payload (jsonbytes.dumps), with each image's base64
    text as it is (str, bytes, or a view of the upstream's answer) rather than scanned for escaping (base64
    has no character JSON would escape; output.py hands on only text that decoded strictly as base64).
    Joined, the pieces are the JSON text (`dumps_with_b64`); sent one after the other, nothing is copied.
    """
    data = payload["data"]
    images: list[bytes | memoryview] = []
    for i, item in enumerate(data):
        b64 = item.pop("b64_json", None)
        if b64 is not None:  # a marker where the text goes (written first in its item), found again below
            images.append(b64.encode("ascii") if isinstance(b64, str) else b64)
            data[i] = {"b64_json": _MARK, **item}
    parts: list[bytes | memoryview] = []
    rest = jsonbytes.dumps(payload)
    for b64 in images:  # the markers come in the order of the items: each is the first one left
        head, _, rest = rest.partition(_MARK_BYTES)  # (its quotes stay, around the text)
        parts += (head, b64)
    parts.append(rest)
    return tuple(parts)


# The marker: random per process and never sent, so no text a client sent (a prompt, say) can hold it.
_MARK = os.urandom(16).hex()
_MARK_BYTES = _MARK.encode()


def dumps_with_b64(payload: dict) -> bytes:
    """The response body as one bytes object (body_parts joined)."""
    return b"".join(body_parts(payload))


async def run_job(gw: Gateway, req: ImageRequest, job: Job) -> tuple[bytes, str]:
    """A background job's work: (the answer's JSON as a synchronous call returns it, the route that served).
    Metered as a synchronous call is (app.py opens and finishes its meter): a meter of its own (this task's,
    not the submitting request's), and at the end one ledger record under the job's id."""
    meter = gw.usage.open()
    started = time.monotonic()
    status, outcome = 500, "error"
    try:
        result, payload = await generate(gw, None, req, job)
        body = await asyncio.to_thread(dumps_with_b64, payload)
        status, outcome = 200, "ok"
        return body, result.route.name
    except ProxyError as e:
        status, outcome = e.status, outcome_of(e)
        raise
    except asyncio.CancelledError as e:  # cancelled by its client, or the server stopping
        status, outcome = (503, "shutdown") if SHUTTING_DOWN in e.args else (499, "cancelled")
        raise
    finally:
        gw.usage.finish(meter, request_id=job.id, key=gw.policy.named(job.key_name), model=job.model,
                        path=EDITS_PATH if job.kind == "edit" else GENERATIONS_PATH, status=status, outcome=outcome,
                        seconds=time.monotonic() - started)
