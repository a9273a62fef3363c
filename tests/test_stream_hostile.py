"""Streamed image answers (stream=true) in a hostile world: an upstream that fails before the first event,
one that fails after its previews and is retried, previews that are not images or not in the asked format,
and a client that stops reading the previews. The client is the official openai package where a user
would use it (a raw socket where it must read nothing); every image is decoded with Pillow.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import io
import json
import logging
import os
import socket
import sys

import aiohttp
import pytest
from aiohttp import web
from openai import BadRequestError, RateLimitError
from PIL import Image

from proxy import image_proxy_middleware, parse_config

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, free_port, make_image


def event(kind: str, **data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decoded(b64_json: str, fmt: str, size: tuple[int, int]) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64_json)))
    im.load()
    assert (im.format, im.size) == (fmt, size)
    return im


class Scripted:
    """An OpenAI-compatible upstream whose image calls are answered by the scripts in turn (the last one
    again for every later call)."""

    def __init__(self, *scripts):
        self.scripts = scripts
        self.calls = 0
        self.cancelled = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        script = self.scripts[min(self.calls, len(self.scripts) - 1)]
        self.calls += 1
        try:
            return await script(request)
        except asyncio.CancelledError:  # the proxy hung up
            self.cancelled.set()
            raise


async def start(start_proxy, aiohttp_server, tmp_path, *scripts, retries: int = 0):
    up = Scripted(*scripts)
    app = web.Application()
    app.router.add_post("/v1/images/generations", up.handle)
    upstream = await aiohttp_server(app)
    cfg = base_config(tmp_path)
    cfg["server"] = {"send_timeout": 1}
    cfg["routing"] = {"backoff_base": 0}
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["size_tables"]["big"] = {"default": "1024x1024", "tiers": {"1K": {"1:1": "1024x1024"}}}
    # Streams previews; makes PNG only, so other formats are asked of it as PNG and converted here.
    cfg["providers"]["up"] = {"kind": "openai", "base_url": str(upstream.make_url("/v1")), "api_key": "k",
                              "stream": True, "retries": retries, "timeout": 30, "output_formats": ["png"]}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["up"]}
    cfg["models"]["big"] = {"sizes": "big", "routes": ["up"]}
    server, client = await start_proxy(cfg)
    return up, server, client


def sse_script(*events: bytes, hang: bool = False):
    async def script(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for e in events:
            await response.write(e)
        if hang:
            await asyncio.sleep(3600)
        await response.write_eof()
        return response
    return script


def refusal(status: int, code: str, headers: dict | None = None):
    async def script(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": code, "type": "x", "code": code}}, status=status,
                                 headers=headers)
    return script


def preview(k: int, fmt: str = "png") -> bytes:
    return event("image_generation.partial_image", b64_json=b64(make_image(64, 64, k, fmt)), partial_image_index=k,
                 image_index=0, output_format=fmt)


COMPLETED = event("image_generation.completed", b64_json=b64(make_image(64, 64, 9)), output_format="png")


# ---- a failure before anything was sent is an HTTP error ---------------------------------------------


@pytest.mark.parametrize(("status", "error", "outcome"), [(429, RateLimitError, "rate_limited"),
                                                          (400, BadRequestError, "client_error")])
async def test_a_failure_before_the_first_event_is_an_http_error(start_proxy, aiohttp_server, tmp_path, caplog,
                                                                 status, error, outcome):
    """Nothing of the stream was sent yet: the client gets the error's own status (and Retry-After), as it
    would without stream=true, not a 200 whose stream holds an error event."""
    caplog.set_level(logging.INFO, logger="proxy.requests")
    up, _, client = await start(start_proxy, aiohttp_server, tmp_path,
                                refusal(status, "nope", {"Retry-After": "7"} if status == 429 else None))
    with pytest.raises(error) as e:
        stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                              partial_images=2)
        [_ async for _ in stream]
    assert e.value.status_code == status
    assert e.value.response.headers["content-type"].startswith("application/json")
    assert set(e.value.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert e.value.response.headers["retry-after"] == "7"
    assert up.calls == 1
    line = next(r.getMessage() for r in caplog.records if r.name == "proxy.requests")
    assert f"status={status} " in line and f"outcome={outcome}" in line


async def test_a_failure_after_previews_ends_the_stream_with_an_error_event(start_proxy, aiohttp_server, tmp_path,
                                                                          caplog):
    """Once previews went out the status is sent: the failure is the stream's error event. Its log line
    names the route that failed and the calls made, as a failure answered with an HTTP status does."""
    from openai import APIError

    caplog.set_level(logging.INFO, logger="proxy.requests")
    _, _, client = await start(start_proxy, aiohttp_server, tmp_path,
                               sse_script(preview(0), event("error", error={"message": "boom"})))
    stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                          partial_images=2)
    seen = []
    with pytest.raises(APIError, match="boom"):
        async for e in stream:
            seen.append(e)
    assert [e.type for e in seen] == ["image_generation.partial_image"]
    decoded(seen[0].b64_json, "PNG", (64, 64))
    for _ in range(50):  # written once the answer has ended
        lines = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
        if lines:
            break
        await asyncio.sleep(0.02)
    assert "route=up attempts=1 status=200 " in lines[0] and "outcome=failed" in lines[0], lines


# ---- previews: as many as asked, images, in the asked format -----------------------------------------


async def test_a_retried_route_does_not_send_more_previews_than_asked(start_proxy, aiohttp_server, tmp_path):
    """The first call sends two previews and fails; the retry sends its own two: the client asked for two."""
    up, _, client = await start(start_proxy, aiohttp_server, tmp_path,
                                sse_script(preview(0), preview(1), event("error", error={"message": "boom"})),
                                sse_script(preview(0), preview(1), COMPLETED), retries=1)
    stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                          partial_images=2)
    events = [e async for e in stream]
    assert up.calls == 2
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        decoded(e.b64_json, "PNG", (64, 64))


async def test_upstream_previews_are_images_in_the_asked_format(start_proxy, aiohttp_server, tmp_path):
    """A preview that is not an image, or of an image not asked for, is skipped; PNG previews of a JPEG
    request are sent as JPEG."""
    not_an_image = event("image_generation.partial_image", b64_json=b64(b"<html>rate limited</html>"),
                         partial_image_index=0, image_index=0)
    of_no_image = event("image_generation.partial_image", b64_json=b64(make_image(64, 64, 0)),
                        partial_image_index=0, image_index=5)  # n is 1
    _, _, client = await start(start_proxy, aiohttp_server, tmp_path,
                               sse_script(not_an_image, of_no_image, preview(1), COMPLETED))
    stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                          partial_images=3, output_format="jpeg", n=1)
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert (events[0].partial_image_index, events[0].model_extra["image_index"]) == (0, 0)
    for e in events:
        assert e.output_format == "jpeg"
        decoded(e.b64_json, "JPEG", (64, 64))


async def test_a_preview_with_a_malformed_index_is_still_a_preview(start_proxy, aiohttp_server, tmp_path, caplog):
    """The proxy numbers previews itself: an upstream's partial_image_index that is not a number (or
    image_index that is not one) costs nothing, not the route (no ERROR traceback, no failed request)."""
    odd = event("image_generation.partial_image", b64_json=b64(make_image(64, 64, 0)), partial_image_index="first",
                image_index="0", output_format="png")
    up, _, client = await start(start_proxy, aiohttp_server, tmp_path,
                                sse_script(odd, event("image_generation.partial_image", b64_json=b64(make_image(64, 64, 1)),
                                                      partial_image_index=[1], image_index=0), COMPLETED))
    stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                          partial_images=2)
    events = [e async for e in stream]
    assert up.calls == 1
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events:
        decoded(e.b64_json, "PNG", (64, 64))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_an_upstream_error_event_in_the_responses_shape_keeps_its_message(start_proxy, aiohttp_server,
                                                                                tmp_path):
    """OpenAI's streaming error event may carry its message at the top ({"type": "error", "code",
    "message", "param"}, as the Responses API sends it) rather than under "error": the client hears the
    upstream's reason, not "the stream ended without a completed image"."""
    from openai import APIError

    _, _, client = await start(start_proxy, aiohttp_server, tmp_path,
                               sse_script(preview(0), event("error", code="server_error", message="the GPU melted",
                                                            param=None)))
    stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                          partial_images=2)
    with pytest.raises(APIError, match="the GPU melted") as e:
        [_ async for _ in stream]
    assert e.value.body["code"] == "upstream_error"


# ---- a client that stops reading ----------------------------------------------------------------------


@pytest.mark.parametrize("upstream_then", ["hangs", "fails"])
async def test_a_client_that_stops_reading_the_previews_is_dropped(start_proxy, aiohttp_server, tmp_path, caplog,
                                                                    upstream_then):
    """Three 1024x1024 previews (4 MB of base64 each) to a client that reads nothing: it is cut off after
    server.send_timeout like one that stops reading its completed images; an upstream call still running
    stops, and one that failed meanwhile leaves no stray asyncio error behind."""
    def noise() -> bytes:
        out = io.BytesIO()
        Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3)).save(out, "PNG")
        return event("image_generation.partial_image", b64_json=b64(out.getvalue()), partial_image_index=0,
                     image_index=0, output_format="png")

    big = [noise() for _ in range(3)]
    script = (sse_script(*big, hang=True) if upstream_then == "hangs"
              else sse_script(*big, event("error", error={"message": "boom"})))
    up, server, _ = await start(start_proxy, aiohttp_server, tmp_path, script)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # before connecting: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"model": "big", "prompt": "p", "size": "1024x1024", "stream": True,
                       "partial_images": 3}).encode()
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await asyncio.sleep(4)  # reading nothing, well past send_timeout (1 s)
    received = 0
    with contextlib.suppress(ConnectionResetError):  # a client kept waiting would time out here instead
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(chunk)
    writer.close()
    assert received < sum(map(len, big))  # cut off: not all three previews
    if upstream_then == "hangs":
        await asyncio.wait_for(up.cancelled.wait(), 10)  # the upstream call was stopped
    else:
        gc.collect()  # an unretrieved task exception is logged when the task is collected
        await asyncio.sleep(0.1)
        assert not [r for r in caplog.records if r.name == "asyncio"], [r.getMessage() for r in caplog.records]


async def test_a_client_that_hangs_up_on_a_mounted_stream_is_a_cancelled_request(aiohttp_server, tmp_path, caplog):
    """Mounted in a host app served the aiohttp default way (handler_cancellation off), the proxy learns that
    a streaming client left when it writes the next preview: that is a request the client cancelled (499,
    its upstream call stopped), as with `serve`, not a failure of the proxy (an ERROR traceback, a 500)."""
    caplog.set_level(logging.INFO)

    async def previews_then_hang(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for k in range(3):
            await response.write(preview(k))
            await asyncio.sleep(0.1)  # the next preview comes before the gateway's disconnect watcher looks
        await asyncio.sleep(3600)
        return response

    up = Scripted(previews_then_hang)
    up_app = web.Application()
    up_app.router.add_post("/v1/images/generations", up.handle)
    upstream = await aiohttp_server(up_app)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["up"] = {"kind": "openai", "base_url": str(upstream.make_url("/v1")), "api_key": "k",
                              "stream": True, "retries": 0}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["up"]}
    host = web.Application()
    host.middlewares.append(image_proxy_middleware(parse_config(cfg, env={}), host))
    runner = web.AppRunner(host)  # handler_cancellation off: aiohttp's default
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            r = await s.post(f"http://127.0.0.1:{port}/v1/images/generations",
                             json={"model": "qwen-image", "prompt": "p", "stream": True, "partial_images": 3})
            assert r.status == 200
            assert (await r.content.readuntil(b"\n\n")).startswith(b"event: image_generation.partial_image")
            r.close()  # hangs up after the first preview
        await asyncio.wait_for(up.cancelled.wait(), 10)  # the upstream call was stopped
        for _ in range(100):
            lines = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
            if lines:
                break
            await asyncio.sleep(0.05)
        assert "status=499 " in lines[0] and "outcome=cancelled" in lines[0], lines
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    finally:
        await runner.cleanup()


# ---- the image events: their base64 handed on, not scanned on the event loop ---------------------------


async def test_image_events_are_json_dumps_without_scanning_the_base64(start_proxy, aiohttp_server, tmp_path,
                                                                      monkeypatch):
    """Each image event's data (preview, completed) is the JSON json.dumps writes for it, byte for byte; but
    the proxy never ran json.dumps over the image's base64 (megabytes scanned on the event loop held every
    other request: ~14 ms per 4 MB image)."""
    image = make_image(64, 64, 9)
    seen: list[str] = []
    dumps = json.dumps

    def spy(value, *args, **kwargs):
        text = dumps(value, *args, **kwargs)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("proxy."):
            seen.append(text)
        return text

    monkeypatch.setattr(json, "dumps", spy)
    _, server, _ = await start(start_proxy, aiohttp_server, tmp_path, sse_script(preview(0), COMPLETED))
    body = {"model": "qwen-image", "prompt": 'a "quoted" prompt \u00e9\u6f22', "size": "64x64", "stream": True,
            "partial_images": 1}
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"), json=body) as r:
        assert r.status == 200
        text = (await r.read()).decode()
    events = [block.split("\n", 1) for block in text.split("\n\n") if block.startswith("event: ")]
    assert [kind for kind, _ in events] == ["event: image_generation.partial_image", "event: image_generation.completed"]
    for _, data in events:
        item = json.loads(data.removeprefix("data: "))
        assert "data: " + dumps(item) == data  # the same bytes as before: json.dumps's spacing and ASCII escapes
        assert list(item)[:2] == ["type", "b64_json"]
        decoded(item["b64_json"], "PNG", (64, 64))
        assert seen and not any(item["b64_json"] in t for t in seen)
    assert base64.b64decode(item["b64_json"], validate=True) == image and item["revised_prompt"] == body["prompt"]


async def test_a_stream_that_ends_in_an_error_event_counts_as_an_error_answer(start_proxy, aiohttp_server, tmp_path):
    """qip_errors_total counts error answers by code (the alert rules in deploy/ read it): a stream whose
    route failed after its head (a 200) answered with an error event, and counts there as a 502 would."""
    from openai import APIError

    _, server, client = await start(start_proxy, aiohttp_server, tmp_path,
                                    sse_script(preview(0), event("error", error={"message": "boom"})))
    stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True,
                                          partial_images=2)
    with pytest.raises(APIError, match="boom") as info:
        [_ async for _ in stream]
    code = info.value.code
    assert code == "upstream_error"
    async with aiohttp.ClientSession() as s:
        for _ in range(50):  # counted once the answer has ended
            async with s.get(server.make_url("/metrics")) as r:
                text = await r.text()
            if 'qip_request_outcomes_total{model="qwen-image",outcome="failed"} 1.0' in text:
                break
            await asyncio.sleep(0.02)
    assert 'qip_request_outcomes_total{model="qwen-image",outcome="failed"} 1.0' in text
    assert f'qip_errors_total{{code="{code}",model="qwen-image"}} 1.0' in text
    assert 'qip_requests_total{endpoint="/v1/images/generations",model="qwen-image",status="200"} 1.0' in text
