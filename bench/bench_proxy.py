"""Proxy overhead and payload throughput, on loopback (a benchmark, not a test: it prints numbers).

- overhead: the same image request sent straight to a fake OpenAI-compatible upstream and through the
  proxy (b64_json passthrough, no conversion); median and p95 latency of each and the difference.
- throughput: large b64_json payloads (2048x2048 PNG) through the proxy, MB/s.
- conversion: PNG -> JPEG conversion cost through the proxy at 1024x1024.
- passthrough: chat completions forwarded unchanged, added latency.

Usage: python bench/bench_proxy.py [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import statistics
import sys
import tempfile
import time

import aiohttp
from aiohttp import web
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from proxy import build_app, parse_config  # noqa: E402


def noise_png(width: int, height: int) -> bytes:
    """Incompressible pixels, so payload sizes are like real photos'."""
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(out, format="PNG")
    return out.getvalue()


def fake_upstream(images: dict[str, str]) -> web.Application:
    async def generations(request: web.Request) -> web.Response:
        body = await request.json()
        b64 = images[body["size"]]
        return web.json_response({"created": 0, "data": [{"b64_json": b64} for _ in range(body.get("n", 1))]})

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    app = web.Application(client_max_size=1024**3)
    app.router.add_post("/v1/images/generations", generations)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


async def timed_requests(http: aiohttp.ClientSession, url: str, body: dict, count: int, concurrency: int):
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    received = 0

    async def one() -> None:
        nonlocal received
        async with sem:
            t0 = time.perf_counter()
            async with http.post(url, json=body) as resp:
                data = await resp.read()
                assert resp.status == 200, data[:200]
            latencies.append(time.perf_counter() - t0)
            received += len(data)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return latencies, time.perf_counter() - t0, received


def summary(latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p95 = ms[min(len(ms) - 1, int(len(ms) * 0.95))]
    return f"median {statistics.median(ms):7.2f} ms  p95 {p95:7.2f} ms"


async def main(args: argparse.Namespace) -> None:
    images = {"1024x1024": base64.b64encode(noise_png(1024, 1024)).decode(),
              "2048x2048": base64.b64encode(noise_png(2048, 2048)).decode()}
    upstream_runner, upstream = await serve(fake_upstream(images))
    store = tempfile.mkdtemp(prefix="qip-bench-")
    config = parse_config({
        "server": {"max_body_mb": 1024},
        "store": {"path": store},
        "passthrough": {"base_url": f"{upstream}/v1"},
        "providers": {"up": {"kind": "openai", "base_url": f"{upstream}/v1", "api_key": "k"}},
        "size_tables": {"t": {"default": "1024x1024", "tiers": {"1K": {"1:1": "1024x1024"}}}},
        "models": {"m": {"sizes": "t", "routes": ["up"]}},
    }, env={})
    proxy_runner, proxy = await serve(build_app(config))
    body = {"model": "m", "prompt": "bench", "response_format": "b64_json"}
    try:
        async with aiohttp.ClientSession() as http:
            # Warm-up: connection pools, first-call imports.
            await timed_requests(http, f"{proxy}/v1/images/generations", body, 5, 1)
            await timed_requests(http, f"{upstream}/v1/images/generations", {**body, "size": "1024x1024"}, 5, 1)

            print(f"image payload: 1024x1024 PNG, {len(images['1024x1024']) / 1e6:.1f} MB as base64")
            print(f"{args.requests} requests, concurrency 1:")
            direct, _, _ = await timed_requests(
                http, f"{upstream}/v1/images/generations", {**body, "size": "1024x1024"}, args.requests, 1)
            proxied, _, _ = await timed_requests(http, f"{proxy}/v1/images/generations", body, args.requests, 1)
            print(f"  direct to upstream  {summary(direct)}")
            print(f"  through the proxy   {summary(proxied)}")
            added = statistics.median(proxied) - statistics.median(direct)
            print(f"  proxy overhead      {added * 1000:7.2f} ms per request (median)")

            big = {**body, "size": "2048x2048"}
            count = max(10, args.requests // 10)
            lat, wall, received = await timed_requests(
                http, f"{proxy}/v1/images/generations", big, count, args.concurrency)
            print(f"throughput: 2048x2048 PNG b64_json ({len(images['2048x2048']) / 1e6:.1f} MB), "
                  f"{count} requests, concurrency {args.concurrency}: {received / wall / 1e6:.1f} MB/s, "
                  f"{count / wall:.1f} images/s, {summary(lat)}")

            jpeg = {**body, "output_format": "jpeg", "output_compression": 85}
            lat, _, _ = await timed_requests(http, f"{proxy}/v1/images/generations", jpeg, count, 1)
            print(f"conversion PNG -> JPEG 1024x1024 through the proxy: {summary(lat)}")

            chat = {"model": "gpt", "messages": [{"role": "user", "content": "hi"}]}
            direct, _, _ = await timed_requests(http, f"{upstream}/v1/chat/completions", chat, args.requests, 1)
            proxied, _, _ = await timed_requests(http, f"{proxy}/v1/chat/completions", chat, args.requests, 1)
            added = statistics.median(proxied) - statistics.median(direct)
            print(f"passthrough chat: direct {summary(direct)}; proxied {summary(proxied)}; "
                  f"added {added * 1000:.2f} ms")
    finally:
        await proxy_runner.cleanup()
        await upstream_runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    asyncio.run(main(parser.parse_args()))
