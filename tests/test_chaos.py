"""Chaos: upstreams that fail at random in every documented and undocumented way, in front of a working
last route. Every request must end in good images (decoded with Pillow: right size and format) or in a
correct OpenAI error; none may hang past its deadline, and the counts must add up (nothing lost)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import re

import aiohttp
import pytest
from aiohttp import web
from openai import APIError, APIStatusError, AsyncOpenAI
from PIL import Image

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, make_image

FAULTS = ("ok", "500", "503", "429", "reset", "timeout", "slow_body", "bad_json", "not_json", "trunc_image",
          "wrong_bytes", "url_404", "url_trunc", "empty_data")
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
SIZES = ["64x64", "80x64", "64x80", "112x64"]
ROUTE_TIMEOUT = 0.6
REQUEST_TIMEOUT = 20


class ChaosUpstream:
    """An OpenAI-compatible image API that picks a fault for every call from a seeded generator."""

    def __init__(self, seed: int, faults=FAULTS):
        self.rng = random.Random(seed)
        self.faults = faults
        self.files: dict[str, bytes] = {}
        self.counts: dict[str, int] = {}
        self.url = ""

    async def start(self, aiohttp_server) -> ChaosUpstream:
        app = web.Application()
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_get("/files/{name}", self.file)
        server = await aiohttp_server(app)
        self.url = str(server.make_url("")).rstrip("/")
        return self

    async def file(self, request: web.Request) -> web.Response:
        data = self.files.get(request.match_info["name"])
        if data is None:
            return web.json_response({"error": {"message": "no such file"}}, status=404)
        return web.Response(body=data, content_type="image/png")

    def _image(self, body: dict) -> tuple[bytes, str]:
        width, height = (int(v) for v in body["size"].split("x"))
        fmt = body.get("output_format") or "png"
        return make_image(width, height, self.rng.randrange(1000), fmt), fmt

    async def generations(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        fault = self.rng.choice(self.faults)
        self.counts[fault] = self.counts.get(fault, 0) + 1
        if fault == "500":
            return web.json_response({"error": {"message": "internal", "type": "api_error"}}, status=500)
        if fault == "503":
            return web.json_response({"error": {"message": "overloaded"}}, status=503, headers={"Retry-After": "0"})
        if fault == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429,
                                     headers={"retry-after-ms": "20"})
        if fault == "reset":
            request.transport.close()
            await asyncio.sleep(0.1)
            return web.Response()
        if fault == "timeout":
            await asyncio.sleep(ROUTE_TIMEOUT * 4)
            return web.json_response({"data": []})
        if fault == "bad_json":
            return web.Response(text='{"data": [{"b64_json": "iVBORw0KGgo', content_type="application/json")
        if fault == "not_json":
            return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
        if fault == "empty_data":
            return web.json_response({"created": 1, "data": []})
        data, fmt = self._image(body)
        if fault == "trunc_image":
            data = data[: len(data) // 2]
        elif fault == "wrong_bytes":
            data = self.rng.randbytes(len(data))
        if fault in ("url_404", "url_trunc"):
            name = f"{self.rng.getrandbits(64):x}.png"
            if fault == "url_trunc":
                self.files[name] = data[: len(data) - 9]
            item = {"url": f"{self.url}/files/{name}"}
        else:
            item = {"b64_json": base64.b64encode(data).decode()}
        payload = json.dumps({"created": 1, "data": [item]}).encode()
        if fault != "slow_body":
            return web.Response(body=payload, content_type="application/json")
        # A body that trickles in: the whole answer takes longer than the route's timeout.
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        step = max(1, len(payload) // 8)
        for i in range(0, len(payload), step):
            await response.write(payload[i:i + step])
            await asyncio.sleep(ROUTE_TIMEOUT / 4)
        await response.write_eof()
        return response


def chaos_config(tmp_path, upstreams: list[ChaosUpstream], last_works: bool) -> dict:
    cfg = base_config(tmp_path)
    cfg["server"] = {"request_timeout": REQUEST_TIMEOUT}
    cfg["routing"] = {"retries": 1, "backoff_base": 0.01, "backoff_max": 0.05, "breaker_threshold": 1000}
    cfg["size_tables"]["small"] = SMALL_SIZES
    routes = []
    for i, up in enumerate(upstreams):
        cfg["providers"][f"chaos{i}"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "k",
                                         "timeout": ROUTE_TIMEOUT}
        routes.append(f"chaos{i}")
    if last_works:
        routes.append("placeholder")
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": routes}
    return cfg


def check_image(data: bytes, size: str, fmt: str) -> None:
    im = Image.open(io.BytesIO(data))
    im.load()  # a truncated image raises here
    assert im.format == PIL_FORMAT[fmt]
    assert "x".join(map(str, im.size)) == size


async def metric_total(server, name: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        text = await r.text()
    return sum(float(m) for m in re.findall(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M))


async def run_requests(client: AsyncOpenAI, count: int, concurrency: int, seed: int, fetch):
    """count requests at bounded concurrency: (kind, detail) for each, in order."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    plans = [(rng.choice(SIZES), rng.choice([None, "png", "jpeg", "webp"]), rng.choice(["b64_json", "url"]))
             for _ in range(count)]

    async def one(size, fmt, response_format):
        async with limit:
            extra = {"output_format": fmt} if fmt else {}
            try:
                r = await asyncio.wait_for(
                    client.images.generate(model="qwen-image", prompt="chaos", size=size,
                                           response_format=response_format, extra_body=extra),
                    REQUEST_TIMEOUT + 5)
            except APIStatusError as e:
                return "error", e
            item = r.data[0]
            data = base64.b64decode(item.b64_json) if response_format == "b64_json" else await fetch(item.url)
            check_image(data, size, fmt or "png")
            return "ok", None

    return await asyncio.gather(*(one(*plan) for plan in plans))


@pytest.fixture
def chaos(aiohttp_server, start_proxy, tmp_path):
    async def make(last_works: bool, seeds=(1, 2)):
        ups = [await ChaosUpstream(seed).start(aiohttp_server) for seed in seeds]
        server, client = await start_proxy(chaos_config(tmp_path, ups, last_works))
        client = client.with_options(timeout=REQUEST_TIMEOUT + 5)  # shares the fixture's connection pool
        session = aiohttp.ClientSession()

        async def fetch(url: str) -> bytes:
            async with session.get(url) as r:
                assert r.status == 200
                return await r.read()

        return server, client, ups, fetch, session

    return make


async def test_chaos_with_a_working_last_route(chaos):
    server, client, ups, fetch, session = await chaos(last_works=True)
    try:
        results = await run_requests(client, 300, 16, seed=7, fetch=fetch)
    finally:
        await session.close()
    errors = [detail for kind, detail in results if kind == "error"]
    assert errors == [], [f"{e.status_code}: {e.message}" for e in errors[:5]]
    # Every fault really happened, more than once, on each upstream.
    for up in ups:
        assert set(up.counts) == set(FAULTS) and min(up.counts.values()) >= 3, up.counts
    # 0 lost: the proxy counted each request once, as a success.
    assert await metric_total(server, "qip_request_outcomes_total") == 300


async def test_chaos_without_a_working_route_ends_in_openai_errors(chaos):
    server, client, ups, fetch, session = await chaos(last_works=False, seeds=(3, 4))
    try:
        results = await run_requests(client, 150, 16, seed=8, fetch=fetch)
    finally:
        await session.close()
    oks = sum(1 for kind, _ in results if kind == "ok")
    errors = [detail for kind, detail in results if kind == "error"]
    assert oks > 0 and errors  # both happen with these odds
    for e in errors:
        assert e.status_code in (429, 502, 503, 504), e.status_code
        assert set(e.body) >= {"message", "type", "param", "code"} and e.body["message"].startswith("All routes")
        if e.status_code in (429, 503):
            assert int(e.response.headers["Retry-After"]) >= 1
    assert await metric_total(server, "qip_request_outcomes_total") == 150


async def test_chaos_streams_always_end(chaos):
    server, client, ups, fetch, session = await chaos(last_works=False, seeds=(5, 6))
    await session.close()
    limit = asyncio.Semaphore(8)
    outcomes = {"completed": 0, "error": 0}

    async def one(i):
        async with limit:
            fmt = ["png", "jpeg", "webp"][i % 3]
            # A format conversion on the stream path (the upstream makes PNG unless told).
            try:  # a failure before any event is an HTTP error; after one, the stream's error event
                stream = await client.images.generate(model="qwen-image", prompt="chaos", size="64x64",
                                                      stream=True, extra_body={"output_format": fmt})
                events = await asyncio.wait_for(_collect(stream), REQUEST_TIMEOUT + 5)
            except APIError as e:
                assert e.body["message"].startswith("All routes"), e.message
                outcomes["error"] += 1
                return
            assert [e.type for e in events] == ["image_generation.completed"]
            check_image(base64.b64decode(events[0].b64_json), "64x64", fmt)
            outcomes["completed"] += 1

    await asyncio.gather(*(one(i) for i in range(60)))
    assert outcomes["completed"] + outcomes["error"] == 60
    assert outcomes["completed"] and outcomes["error"]
    assert await metric_total(server, "qip_request_outcomes_total") == 60


async def _collect(stream) -> list:
    return [event async for event in stream]
