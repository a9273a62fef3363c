"""A fake OpenAI-compatible upstream that speaks Lumenfall's documented wire format.

One aiohttp app, mounted under any prefix (the handler dispatches on the path's ending, so
`<url>/openai/v1/images/generations` and `<url>/v1/images/generations` both work):

- POST .../images/generations: Bearer auth (401 AUTHENTICATION_FAILED otherwise), real PNG/JPEG/WebP
  images of the requested "WxH" whose colour comes from the seed (seed + i for image i), n honoured,
  b64_json or URLs it serves itself (GET /files/<name>), X-Lumenfall-Request-Id / -Provider headers,
  `metadata` in the body. Knobs: fail(...), delay, image_format (force a format), payload override.
- GET .../models: an OpenAI model list.
- The passthrough side: POST .../chat/completions (JSON, or SSE with stream=true: several chunks
  with small delays, optionally holding after the first chunk until `stream_gate` is set),
  POST .../embeddings (honours encoding_format=base64, as the SDK sends it), ANY .../echo.
  Every answer echoes what arrived (path, query, headers, body); every request is recorded.

Use it with the aiohttp_server fixture: `fake = await FakeOpenAIUpstream(...).start(aiohttp_server)`.
"""

from __future__ import annotations

import array
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import random
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               404: "invalid_request_error", 429: "rate_limit_error"}

# A small size table for tests against fake upstreams (fast to encode and decode).
SMALL_SIZES = {
    "default": "64x64",
    "tiers": {"0.004": {"1:1": "64x64", "4:3": "80x64", "3:4": "64x80", "16:9": "112x64", "9:16": "64x112"}},
}


def free_port() -> int:
    """A local port nothing listens on (for 'upstream unreachable' tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_colour(seed: int | None) -> tuple[int, int, int]:
    if seed is None:
        return tuple(random.randrange(256) for _ in range(3))
    return tuple(hashlib.sha256(str(seed).encode()).digest()[:3])


def make_image(width: int, height: int, seed: int | None, fmt: str = "png", transparent: bool = False) -> bytes:
    im = Image.new("RGB", (width, height), seed_colour(seed))
    if transparent:  # the seed's colour in the middle, fully transparent around it
        im = im.convert("RGBA")
        im.putalpha(0)
        im.paste(seed_colour(seed) + (255,), (width // 4, height // 4, width * 3 // 4, height * 3 // 4))
    out = io.BytesIO()
    im.save(out, format=fmt.upper(), **({"quality": 95} if fmt in ("jpeg", "webp") else {}))
    return out.getvalue()


class _NoFlowControl:
    """A stand-in protocol for a stream fed from bytes already in memory."""

    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


@dataclass
class Received:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: CIMultiDict
    body: bytes
    json: Any = None
    raw_query: str = ""

    def echo(self) -> dict:
        return {"method": self.method, "path": self.path, "query": self.query,
                "headers": {k: v for k, v in self.headers.items()}, "body": self.body.decode("utf-8", "replace")}


@dataclass
class Failure:
    status: int
    code: str
    message: str
    retry_after: str | None = None
    times: int | None = None  # None = every call


@dataclass
class FakeOpenAIUpstream:
    api_key: str = "up-key"
    # Force this image format whatever the request asks (None: honour output_format, else png).
    image_format: str | None = None
    # Seconds to wait before answering an image call.
    delay: float = 0.0
    # Answer image calls with this JSON (status 200) instead of images.
    payload_override: Any = None
    # Passthrough side: answer chat/embeddings/echo with (status, json, headers) instead.
    respond_with: tuple[int, Any, dict] | None = None
    # Extra headers on .../echo answers (hop-by-hop ones included, to see the proxy drop them).
    echo_response_headers: dict[str, str] = field(default_factory=dict)
    stream_chunks: int = 4
    stream_delay: float = 0.02
    # When set, the chat stream holds after its first chunk until the event is set.
    stream_gate: asyncio.Event | None = None
    models: tuple[str, ...] = ("qwen-image", "gpt-4o-mini", "text-embedding-3-small")
    # A Set-Cookie header on image answers (a load balancer's affinity cookie, say).
    set_cookie: str | None = None
    # Image calls with background "transparent" get images with transparent pixels (else it is ignored).
    makes_transparency: bool = False
    # Every image (and preview) has transparent pixels, whatever background asks: an upstream that ignores
    # "opaque" (a cut-out model, or one whose images always carry alpha).
    always_transparent: bool = False

    requests: list[Received] = field(default_factory=list)
    edit_forms: list[tuple[dict, list]] = field(default_factory=list)
    # Image calls with stream=true are answered as OpenAI's image stream (partials, then completed).
    can_stream: bool = False
    stream_calls: int = 0
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    failure: Failure | None = None
    stream_finished: asyncio.Event = field(default_factory=asyncio.Event)
    # Image calls being answered now, and the most there ever were at once.
    in_flight: int = 0
    most_in_flight: int = 0
    # When set, each image call waits (up to hold_timeout) until this many are in flight at once: a
    # test proves concurrency by who is held together, not by a race against a delay.
    hold_until_in_flight: int | None = None
    hold_timeout: float = 30.0
    _all_in: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    # ---- set-up -----------------------------------------------------------------------------------

    def fail(self, status: int, code: str, message: str = "", *, retry_after: str | None = None,
             times: int | None = None) -> None:
        self.failure = Failure(status, code, message or code.replace("_", " ").lower(), retry_after, times)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def start(self, aiohttp_server) -> FakeOpenAIUpstream:
        server = await aiohttp_server(self.app())
        self.url = str(server.make_url("")).rstrip("/")
        return self

    # ---- what tests read --------------------------------------------------------------------------

    @property
    def image_calls(self) -> list[Received]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/images/generations")]

    @property
    def image_bodies(self) -> list[dict]:
        return [r.json for r in self.image_calls]

    def calls_to(self, suffix: str) -> list[Received]:
        return [r for r in self.requests if r.path.endswith(suffix)]

    # ---- the app ----------------------------------------------------------------------------------

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        received = Received(request.method, request.path,
                            {k: request.query.getall(k) for k in request.query},
                            CIMultiDict(request.headers), body, parsed, request.rel_url.raw_query_string)
        self.requests.append(received)
        path, method = request.path, request.method

        if path.startswith("/files/") and method == "GET":
            found = self.files.get(path[len("/files/"):])
            if found is None:
                return self.error(404, "NOT_FOUND", "no such file")
            return web.Response(body=found[0], content_type=found[1])
        if not self.authorized(request):
            return self.error(401, "AUTHENTICATION_FAILED", "Invalid or missing API key")
        if path.endswith("/images/generations") and method == "POST":
            return await self.generations(request, received)
        if path.endswith("/images/edits") and method == "POST":
            return await self.edits(request, received)
        if path.endswith("/models") and method == "GET":
            return web.json_response({"object": "list", "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake-upstream"}
                for m in self.models]})
        if "/models/" in path and method == "GET":
            name = path.rsplit("/models/", 1)[1]
            if name not in self.models:
                return self.error(404, "MODEL_NOT_FOUND", f"The model '{name}' does not exist")
            return web.json_response({"id": name, "object": "model", "created": 1700000000,
                                      "owned_by": "fake-upstream"})
        if self.respond_with is not None:
            status, payload, headers = self.respond_with
            return web.json_response(payload, status=status, headers=headers)
        if path.endswith("/chat/completions") and method == "POST":
            return await self.chat(request, received)
        if path.endswith("/embeddings") and method == "POST":
            return self.embeddings(received)
        if path.endswith("/echo"):
            return web.json_response({"echo": received.echo()},
                                     headers={"X-Upstream": "fake", **self.echo_response_headers})
        return self.error(404, "NOT_FOUND", f"Unknown path {method} {path}")

    def authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def error(status: int, code: str, message: str, headers: dict | None = None) -> web.Response:
        return web.json_response(
            {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"), "code": code}},
            status=status, headers={"X-Lumenfall-Request-Id": uuid.uuid4().hex, **(headers or {})},
        )

    # images ----------------------------------------------------------------------------------------

    async def edits(self, request: web.Request, received: Received) -> web.Response:
        """OpenAI's multipart edit: fields as text, image / image[] files and a mask; recorded in
        `edit_forms` as (fields, [(field, filename, bytes)])."""
        from aiohttp import BodyPartReader, MultipartReader
        from aiohttp.streams import StreamReader

        # Not the connection's protocol: the stream would pause it past 128 KiB of an already-read body.
        stream = StreamReader(_NoFlowControl(), 1 << 16, loop=asyncio.get_running_loop())
        stream.feed_data(received.body)
        stream.feed_eof()
        reader = MultipartReader(request.headers, stream)
        fields, files = {}, []
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            data = await part.read(decode=False)
            if part.filename is not None:
                files.append((part.name, part.filename, bytes(data)))
            else:
                fields[part.name] = bytes(data).decode()
        self.edit_forms.append((fields, files))
        if not any(name in ("image", "image[]") for name, _, _ in files):
            return self.error(400, "INVALID_REQUEST", "image is required")
        body = {**fields, "n": int(fields.get("n", 1))}
        if "seed" in fields:
            body["seed"] = int(fields["seed"])
        received.json = body
        return await self.generations(request, received)

    async def generations(self, request: web.Request, received: Received) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.hold_until_in_flight is not None:
                if self.in_flight >= self.hold_until_in_flight:
                    self._all_in.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_in.wait(), self.hold_timeout)
            return await self._generations(request, received)
        finally:
            self.in_flight -= 1

    async def _generations(self, request: web.Request, received: Received) -> web.Response:
        if self.delay:
            await asyncio.sleep(self.delay)
        body = received.json
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return self.error(400, "INVALID_REQUEST", "prompt is required")
        if self.failure is not None and (self.failure.times is None or self.failure.times > 0):
            f = self.failure
            if f.times is not None:
                f.times -= 1
            return self.error(f.status, f.code, f.message,
                              {"Retry-After": f.retry_after} if f.retry_after is not None else None)
        if self.payload_override is not None:
            return web.json_response(self.payload_override)
        try:
            width, height = (int(v) for v in str(body.get("size") or "1024x1024").lower().split("x"))
            n = int(body.get("n") or 1)
        except ValueError:
            return self.error(400, "INVALID_REQUEST", f"bad size {body.get('size')!r}")
        fmt = self.image_format or body.get("output_format") or "png"
        seed = body.get("seed")
        alpha = self.always_transparent or (self.makes_transparency and body.get("background") == "transparent")
        images = await asyncio.to_thread(
            lambda: [make_image(width, height, None if seed is None else seed + i, fmt, alpha) for i in range(n)])
        if body.get("stream") and self.can_stream:
            return await self.stream_images(request, body, images, fmt, alpha)
        base = str(request.url.origin())
        data = []
        for im in images:
            item: dict[str, Any] = {"revised_prompt": f"{body['prompt']}, revised by the fake"}
            if body.get("response_format", "url") == "b64_json":
                item["b64_json"] = base64.b64encode(im).decode()
            else:
                name = f"{uuid.uuid4().hex}.{fmt}"
                self.files[name] = (im, MIME[fmt])
                item["url"] = f"{base}/files/{name}"
            data.append(item)
        return web.json_response(
            {"created": int(time.time()), "data": data,
             "metadata": {"model": body.get("model"), "executed_model": body.get("model"),
                          "provider": "fake", "cost": 0.0}},
            headers={"X-Lumenfall-Request-Id": uuid.uuid4().hex, "X-Lumenfall-Provider": "fake",
                     **({"Set-Cookie": self.set_cookie} if self.set_cookie else {})},
        )

    async def stream_images(self, request: web.Request, body: dict, images: list[bytes], fmt: str,
                            transparent: bool = False):
        """OpenAI image streaming: partial_images small previews per image, then its completed event."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        prefix = "image_edit" if request.path.endswith("/edits") else "image_generation"
        for index, image in enumerate(images):
            for k in range(int(body.get("partial_images") or 0)):
                preview = make_image(16, 16, k, fmt, transparent)
                event = {"type": f"{prefix}.partial_image", "b64_json": base64.b64encode(preview).decode(),
                         "partial_image_index": k, "image_index": index, "output_format": fmt}
                await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                await asyncio.sleep(0.01)
            event = {"type": f"{prefix}.completed", "b64_json": base64.b64encode(image).decode(),
                     "output_format": fmt, "revised_prompt": f"{body['prompt']}, revised by the fake"}
            await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        self.stream_calls += 1
        await response.write_eof()
        return response

    # passthrough side -----------------------------------------------------------------------------

    async def chat(self, request: web.Request, received: Received) -> web.StreamResponse:
        body = received.json if isinstance(received.json, dict) else {}
        messages = body.get("messages") or [{"content": ""}]
        text = f"echo: {messages[-1].get('content')}"
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body.get("model", "?")}
        if not body.get("stream"):
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                "echo": received.echo(),
            }, headers={"X-Upstream": "fake"})

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Upstream": "fake"})
        await response.prepare(request)
        for i in range(self.stream_chunks):
            chunk = {**base, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": f"part{i} "}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if i == 0 and self.stream_gate is not None:
                # The test sets the gate once it has seen the first chunk; a buffering proxy never would.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stream_gate.wait(), 30)
            await asyncio.sleep(self.stream_delay)
        await response.write(b"data: [DONE]\n\n")
        self.stream_finished.set()
        await response.write_eof()
        return response

    def embeddings(self, received: Received) -> web.Response:
        body = received.json if isinstance(received.json, dict) else {}
        inputs = body.get("input")
        inputs = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, text in enumerate(inputs):
            vector = [float(len(str(text))), float(i), 0.5]
            embedding: Any = vector
            if body.get("encoding_format") == "base64":
                embedding = base64.b64encode(array.array("f", vector).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        return web.json_response({"object": "list", "data": data, "model": body.get("model", "?"),
                                  "usage": {"prompt_tokens": 1, "total_tokens": 1}})
