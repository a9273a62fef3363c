"""Upstreams that are broken or hostile, as every outbound call meets them: a redirect to another origin in
place of an answer, an answer that never ends, a gzip bomb, a stream line that never ends, an error body that
arrives in pieces.

Each provider's call (submit, status poll, result) is taken over in turn on its own fake: the proxy must
follow no redirect (the other origin gets nothing: not the key, not the prompt), read no answer past what a
legitimate one can hold (a 502 that says so, not a timeout or a process out of memory), and fail the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gzip
import json

import pytest
from aiohttp import web
from openai import APIError, InternalServerError

from proxy.providers import base

from .conftest import base_config
from .fake_base import ServedFake
from .fake_dashscope import ASYNC_PATH, SYNC_PATH, FakeDashScope
from .fake_fal import FakeFal
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream
from .fake_replicate import FakeReplicate

KEY = "sentinel-upstream-key-0123456789"
PROMPT = "a private prompt"
HUGE = 48 << 20  # what a hostile answer sends at most (a bound for this test, not for the proxy)
SMALL_NATIVE = ["104*58", "83*83", "58*104", "92*71", "71*92"]


@pytest.fixture
def small_limits(monkeypatch):
    """Answers to a 64x64 image may take about 150 KB here (4x its pixels in base64 RGBA, 64 KiB of JSON)."""
    monkeypatch.setattr(base, "MIN_IMAGE_PIXELS", 0, raising=False)
    monkeypatch.setattr(base, "ANSWER_SLACK", 64 * 1024, raising=False)


class Thief(ServedFake):
    """Another origin: records whatever reaches it."""

    def __init__(self):
        self.requests: list[tuple[str, str, dict, bytes]] = []

    async def dispatch(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path, dict(request.headers), await request.read()))
        return web.json_response({"data": [], "status": "COMPLETED", "output": {}})


class Hostile:
    """The answers a hostile upstream gives in place of the real one."""

    def __init__(self, thief: Thief):
        self.thief = thief
        self.sent = 0  # bytes of the endless answer written before the proxy hung up

    async def redirect(self, request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": f"{self.thief.url}/stolen"})

    async def endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        block = b"A" * 65536
        try:
            await resp.write(b'{"data": [{"b64_json": "')
            while self.sent < HUGE:
                await resp.write(block)
                self.sent += len(block)
        except (ConnectionError, RuntimeError):
            pass  # the proxy hung up
        return resp

    async def bomb(self, request: web.Request) -> web.Response:
        return web.Response(body=_bomb(), headers={"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})


_BOMB: list[bytes] = []


def _bomb() -> bytes:
    """32 KiB of gzip that is 32 MiB of JSON whitespace."""
    if not _BOMB:
        _BOMB.append(gzip.compress(b" " * (32 << 20), 9))
    return _BOMB[0]


async def generate(client):
    return await client.images.generate(model="qwen-image", prompt=PROMPT, size="64x64",
                                        response_format="b64_json")


def hijack(fake, when, answer) -> None:
    """Answer the fake's requests that match `when` with `answer` (before fake.start)."""
    real = fake.dispatch

    async def dispatch(request: web.Request) -> web.StreamResponse:
        return await answer(request) if when(request) else await real(request)

    fake.dispatch = dispatch


def _is(method: str, test):
    return lambda r: r.method == method and test(r.path)


# provider -> stage -> which of its calls is taken over
STAGES = {
    "openai": {"generate": _is("POST", lambda p: p.endswith("/images/generations"))},
    "fal": {"submit": _is("POST", lambda p: "/requests/" not in p),
            "status": _is("GET", lambda p: p.endswith("/status")),
            "result": _is("GET", lambda p: "/requests/" in p and not p.endswith("/status"))},
    "replicate": {"create": _is("POST", lambda p: p.endswith("/predictions")),
                  "poll": _is("GET", lambda p: p.startswith("/v1/predictions/"))},
    "dashscope": {"submit": _is("POST", lambda p: p == ASYNC_PATH),
                  "poll": _is("GET", lambda p: "/tasks/" in p),
                  "sync": _is("POST", lambda p: p == SYNC_PATH)},
}
CASES = [(kind, stage) for kind, stages in STAGES.items() for stage in stages]


def make_fake(kind: str):
    if kind == "openai":
        return FakeOpenAIUpstream(api_key=KEY)
    if kind == "fal":
        return FakeFal(api_key=KEY)
    if kind == "replicate":
        return FakeReplicate(api_key=KEY)
    return FakeDashScope(api_key=KEY, allowed_sizes=tuple(SMALL_NATIVE))


def provider_options(kind: str, stage: str, fake) -> tuple[dict, str]:
    """(the provider's options, the route's model)."""
    common = {"kind": kind, "api_key": KEY, "retries": 0, "timeout": 5}
    fast = {"poll_interval": 0.01, "poll_max_interval": 0.02}
    if kind == "openai":
        return {**common, "base_url": f"{fake.url}/v1"}, "qwen-image"
    if kind == "fal":
        return {**common, **fast, "base_url": fake.url}, "fal-ai/qwen-image"
    if kind == "replicate":
        return {**common, **fast, "base_url": fake.base_url, "wait_seconds": 0}, "qwen/qwen-image"
    mode = "sync" if stage == "sync" else "async"
    return {**common, **fast, "base_url": fake.base_url, "sizes": SMALL_NATIVE, "mode": mode}, "qwen-image"


async def start_hostile(start_proxy, aiohttp_server, tmp_path, kind: str, stage: str, fault: str):
    thief = await Thief().start(aiohttp_server)
    hostile = Hostile(thief)
    fake = make_fake(kind)
    hijack(fake, STAGES[kind][stage], getattr(hostile, fault))
    await fake.start(aiohttp_server)
    options, model = provider_options(kind, stage, fake)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["up"] = options
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": [{"provider": "up", "model": model}]}
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    _, client = await start_proxy(cfg)
    return client, thief, hostile


@pytest.mark.usefixtures("small_limits")
@pytest.mark.parametrize(("kind", "stage"), CASES)
async def test_a_redirect_is_not_followed(start_proxy, aiohttp_server, tmp_path, kind, stage):
    client, thief, _ = await start_hostile(start_proxy, aiohttp_server, tmp_path, kind, stage, "redirect")
    with pytest.raises(InternalServerError) as e:
        await generate(client)
    assert e.value.status_code == 502
    assert "redirect" in e.value.message and KEY not in e.value.message
    # aiohttp drops Authorization on a cross-origin redirect, but a 307 resends the body (the prompt) and
    # the other origin's answer would be taken for the upstream's: nothing may reach it at all.
    assert thief.requests == []


@pytest.mark.usefixtures("small_limits")
@pytest.mark.parametrize("fault", ["endless", "bomb"])
@pytest.mark.parametrize(("kind", "stage"), CASES)
async def test_an_answer_past_the_limit_fails_the_route(start_proxy, aiohttp_server, tmp_path, kind, stage,
                                                        fault):
    client, _, hostile = await start_hostile(start_proxy, aiohttp_server, tmp_path, kind, stage, fault)
    with pytest.raises(InternalServerError) as e:
        await generate(client)
    assert e.value.status_code == 502
    assert "byte limit" in e.value.message
    if fault == "endless":
        await asyncio.sleep(0.2)  # the writer notices the hang-up
        assert hostile.sent < HUGE // 2  # the proxy stopped reading soon after the limit


async def streamed_from(answer, start_proxy, aiohttp_server, tmp_path, *, timeout: float, partial_images: int):
    """A streamed image request (64x64) through the proxy to an openai-kind upstream whose image calls
    `answer` serves."""
    fake = FakeOpenAIUpstream(api_key=KEY)
    hijack(fake, STAGES["openai"]["generate"], answer)
    await fake.start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{fake.url}/v1", "api_key": KEY, "stream": True,
                              "retries": 0, "timeout": timeout}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["up"]}
    _, client = await start_proxy(cfg)
    return await client.images.generate(model="qwen-image", prompt=PROMPT, size="64x64", stream=True,
                                        partial_images=partial_images)


@pytest.mark.usefixtures("small_limits")
async def test_a_stream_event_past_the_limit_fails_the_route(start_proxy, aiohttp_server, tmp_path):
    """An OpenAI image stream whose event never ends (no newline): a cap per event, not per stream."""
    sent = []

    async def endless_event(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b'data: {"type": "image_generation.partial_image", "b64_json": "')
            for _ in range(HUGE // 65536):
                await resp.write(b"A" * 65536)
                sent.append(65536)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    with pytest.raises(APIError) as e:  # before any event: an HTTP error (502), not a stream
        stream = await streamed_from(endless_event, start_proxy, aiohttp_server, tmp_path, timeout=5,
                                     partial_images=1)
        async for _ in stream:
            pass
    assert "byte limit" in e.value.message
    await asyncio.sleep(0.2)
    assert sum(sent) < HUGE // 2


async def test_a_stream_of_more_images_than_asked_fails_the_route(start_proxy, aiohttp_server, tmp_path):
    """An OpenAI image stream that keeps sending completed images: each one is small, but they are not
    collected past the n asked for (they would pile up in memory until the route's timeout)."""
    import base64

    from .fake_openai_upstream import make_image

    sent = []
    image = base64.b64encode(make_image(64, 64, 1)).decode()

    async def endless_images(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        event = json.dumps({"type": "image_generation.completed", "b64_json": image, "output_format": "png"})
        try:
            for _ in range(100_000):
                await resp.write(f"event: image_generation.completed\ndata: {event}\n\n".encode())
                sent.append(1)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    with pytest.raises(APIError) as e:  # before any event: an HTTP error (502), not a stream
        stream = await streamed_from(endless_images, start_proxy, aiohttp_server, tmp_path, timeout=20,
                                     partial_images=1)
        async for _ in stream:
            pass
    assert "more images than" in e.value.message
    await asyncio.sleep(0.2)
    assert len(sent) < 50_000  # stopped reading soon after (socket buffers hold a few MB of 0.3 KB events)


async def test_a_stream_of_endless_partial_images_is_cut_to_what_was_asked(start_proxy, aiohttp_server, tmp_path):
    """Partial images past the partial_images asked for are not handed on: the client gets at most that
    many per image, then the route's timeout ends the stream with an error."""
    import base64

    from .fake_openai_upstream import make_image

    preview = base64.b64encode(make_image(16, 16, 1)).decode()

    async def endless_partials(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for i in range(100_000):
                event = json.dumps({"type": "image_generation.partial_image", "b64_json": preview,
                                    "partial_image_index": i, "image_index": 0, "output_format": "png"})
                await resp.write(f"event: image_generation.partial_image\ndata: {event}\n\n".encode())
                await asyncio.sleep(0.001)
        return resp

    stream = await streamed_from(endless_partials, start_proxy, aiohttp_server, tmp_path, timeout=2,
                                 partial_images=2)
    partials = 0
    with pytest.raises(APIError):
        async for event in stream:
            partials += event.type.endswith("partial_image")
    assert partials == 2


# ---- the Ray pool's HTTP ingress -------------------------------------------------------------------------


async def _ingress(aiohttp_server, handler):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/qwen"))


async def test_ray_ingress_redirect_and_line_limits(aiohttp_server):
    import aiohttp

    from proxy.errors import UpstreamError
    from proxy.providers.ray_transport import call_http

    thief = await Thief().start(aiohttp_server)
    partial = "A" * (2 << 20)  # a 2 MB preview line: more than aiohttp's own line reader takes (512 KiB)

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.query.get("do") == "redirect":
            return web.Response(status=307, headers={"Location": f"{thief.url}/stolen"})
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(json.dumps({"partial": {"data": partial}}).encode() + b"\n")
        await resp.write(json.dumps({"ok": True, "images": []}).encode() + b"\n")
        return resp

    url = await _ingress(aiohttp_server, handler)
    seen = []

    async def on_partial(p):
        seen.append(len(p["data"]))

    async with aiohttp.ClientSession() as http:
        reply = await call_http(http, url, {"prompt": PROMPT}, on_partial, 8 << 20)
        assert reply == {"ok": True, "images": []} and seen == [len(partial)]
        with pytest.raises(UpstreamError, match="byte limit"):
            await call_http(http, url, {"prompt": PROMPT}, on_partial, 1 << 20)
        with pytest.raises(UpstreamError, match="redirect"):
            await call_http(http, f"{url}?do=redirect", {"prompt": PROMPT}, None, 8 << 20)
    assert thief.requests == []


# ---- the helpers on their own ----------------------------------------------------------------------------


async def test_read_answer_refuses_a_declared_length_past_the_limit(aiohttp_server):
    import aiohttp

    from proxy.errors import UpstreamError

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 10 << 30  # 10 GB announced, a few bytes sent
        await resp.prepare(request)
        await resp.write(b"{}")
        return resp

    url = await _ingress(aiohttp_server, handler)
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        with pytest.raises(UpstreamError, match="byte limit"):
            await base.read_answer(resp, 1 << 20)


def test_answer_limit_covers_a_legitimate_answer():
    from proxy.request import ImageRequest

    # n=10 at Qwen-Image's own size: ten 16 MP RGBA PNGs stored uncompressed, in base64, fit.
    req = ImageRequest(prompt="p", model="m", n=10, width=1328, height=1328)
    assert base.answer_limit(req) >= 10 * (4096 * 4096 * 4) * 4 // 3
    # Above 4 MP: four times the asked pixels (output.py's own allowance).
    big = ImageRequest(prompt="p", model="m", n=1, width=4096, height=4096)
    assert base.answer_limit(big) >= 4 * 4096 * 4096 * 4 * 4 // 3


# ---- passthrough ---------------------------------------------------------------------------------------


async def test_passthrough_error_body_arriving_in_pieces_is_whole_and_scrubbed(start_proxy, aiohttp_server,
                                                                               tmp_path):
    import aiohttp

    async def handler(request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").partition(" ")[2]
        body = json.dumps({"error": {"message": "x" * 5000 + f" key {token} is not valid", "code": "bad"}})
        resp = web.StreamResponse(status=401, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for i in range(0, len(body), 1000):  # in pieces, as a slow upstream sends them
            await resp.write(body[i:i + 1000].encode())
            await asyncio.sleep(0.01)
        return resp

    url = await _ingress(aiohttp_server, handler)
    cfg = base_config(tmp_path)
    cfg["passthrough"] = {"base_url": url.rsplit("/", 1)[0] + "/v1", "api_key": KEY}
    server, _ = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/v1/chat/anything")) as r:
        status, text = r.status, await r.text()
    assert status == 401
    body = json.loads(text)  # the whole body, not its first piece
    assert body["error"]["code"] == "bad" and body["error"]["message"].endswith("is not valid")
    assert KEY not in text
