"""A minimal OpenAI-compatible image upstream for benchmarks: it answers at once, as its own process.

    python bench/mock_upstream.py --port 9100        (--port 0: any free port; the chosen one is printed)

POST /v1/images/generations answers immediately with a fixed, pre-encoded PNG of the requested size:
"64x64" (small) or "1024x1024" (large; any other size gets the large one). By default the pixels are
random noise from a fixed seed, so the PNGs do not compress: the large one is ~3.1 MB, ~4.2 MB as
base64, the size of a detailed photo. A prompt that starts with "photo" gets a photo-like image
instead (smooth gradients and shapes with a little grain, ~2.1 MB as PNG): noise is the worst case
for lossy encoders (WebP and AVIF take many times longer on it than on any photo), so conversions are
timed on this one. The whole JSON answer for each (size, image, n, response_format) is built once and
then sent as bytes, so the upstream itself costs as little as aiohttp allows.

- response_format "b64_json" (default): {"created": 0, "data": [{"b64_json": ...}] * n}
- response_format "url": data items {"url": "http://<host>:<port>/files/<size>-<image>.png"}, served
  by GET /files/<size>-<image>.png from memory (the proxy downloads it: its fetch path).
- GET /health: 200 "ok" (the benchmark's event-loop probe, also for the direct target).
- --delay SECONDS (default 0): each generation answers after this long, like an upstream that works on it;
  PUT /control/delay?seconds=S changes it while running (the burst benchmark's slow phases).

The first line on stdout is "listening on http://127.0.0.1:<port>" once it accepts connections. Only
loopback addresses are accepted for --host. Nothing is logged per request.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import ipaddress
import json
import random
import sys

from aiohttp import web
from PIL import Image, ImageChops, ImageFilter

SIZES = {"64x64": (64, 64), "1024x1024": (1024, 1024)}
LARGE = "1024x1024"

SEED = 20261125
MAX_N = 16


def noise_png(width: int, height: int, seed: int = SEED) -> bytes:
    """A PNG of random RGB pixels (a fixed seed: the same bytes every run); it does not compress."""
    pixels = random.Random(seed + width * 7919 + height).randbytes(width * height * 3)
    out = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def photo_png(width: int, height: int, seed: int = SEED) -> bytes:
    """A photo-like PNG: gradients and a fractal, softened, with grain of about +-14 levels (fixed seed)."""
    size = (width, height)
    base = Image.merge("RGB", [Image.linear_gradient("L").resize(size), Image.radial_gradient("L").resize(size),
                               Image.effect_mandelbrot(size, (-2, -1.25, 0.75, 1.25), 64)])
    base = base.filter(ImageFilter.GaussianBlur(1.5))
    rng = random.Random(seed + 1)
    grain = Image.frombytes("RGB", size, rng.randbytes(width * height * 3)).point(lambda v: 114 + v % 29)
    out = io.BytesIO()
    ImageChops.add(base, grain, scale=1.0, offset=-128).save(out, format="PNG", compress_level=6)
    return out.getvalue()


class MockUpstream:
    def __init__(self) -> None:
        # "<size>-<image>" -> PNG bytes, e.g. "1024x1024-noise"
        self.png = {f"{size}-{image}": make(*wh) for size, wh in SIZES.items()
                    for image, make in (("noise", noise_png), ("photo", photo_png))}
        self.b64 = {name: base64.b64encode(data).decode("ascii") for name, data in self.png.items()}
        self._answers: dict[tuple[str, int, str, str], bytes] = {}
        self.calls = 0
        self.delay = 0.0  # seconds each generation waits before it answers

    def answer(self, name: str, n: int, response_format: str, origin: str) -> bytes:
        """The JSON answer (bytes) for image `name` ("<size>-<image>"), n times, as url or b64_json."""
        key = (name, n, response_format, origin)
        body = self._answers.get(key)
        if body is None:
            if response_format == "url":
                item = '{"url": "%s/files/%s.png"}' % (origin, name)  # noqa: UP031
            else:
                item = '{"b64_json": "%s"}' % self.b64[name]  # noqa: UP031 (megabytes: no json.dumps scan)
            body = ('{"created": 0, "data": [' + ", ".join([item] * n) + "]}").encode("ascii")
            self._answers[key] = body
        return body

    async def generations(self, request: web.Request) -> web.Response:
        self.calls += 1
        try:
            fields = json.loads(await request.read())
        except ValueError:
            return web.json_response({"error": {"message": "body is not JSON"}}, status=400)
        size = fields.get("size") if fields.get("size") in SIZES else LARGE
        n = fields.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= MAX_N:
            return web.json_response({"error": {"message": f"n must be 1..{MAX_N}", "param": "n"}}, status=400)
        fmt = "url" if fields.get("response_format") == "url" else "b64_json"
        prompt = fields.get("prompt")
        image = "photo" if isinstance(prompt, str) and prompt.startswith("photo") else "noise"
        body = self.answer(f"{size}-{image}", n, fmt, f"http://{request.host}")
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        return web.Response(body=body, content_type="application/json")

    async def file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.png:
            raise web.HTTPNotFound()
        return web.Response(body=self.png[name], content_type="image/png")

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def set_delay(self, request: web.Request) -> web.Response:
        try:
            delay = float(request.query["seconds"])
        except (KeyError, ValueError):
            return web.json_response({"error": {"message": "want ?seconds=<number>"}}, status=400)
        self.delay = max(0.0, delay)
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/images/generations", self.generations)
        app.router.add_get("/files/{name}.png", self.file)
        app.router.add_get("/health", self.health)
        app.router.add_put("/control/delay", self.set_delay)
        return app


async def serve(host: str, port: int, delay: float = 0.0) -> None:
    mock = MockUpstream()
    mock.delay = delay
    runner = web.AppRunner(mock.app(), access_log=None, handle_signals=True)
    await runner.setup()
    # A deep accept queue: a burst of thousands of connections at once is accepted, not dropped and retried.
    site = web.TCPSite(runner, host, port, backlog=8192)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]
    print(f"listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.Event().wait()  # until SIGTERM / SIGINT (aiohttp's handle_signals)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9100, help="0: any free port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each generation waits before answering")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.host).is_loopback:
        parser.error("--host must be a loopback address: this is a benchmark fixture, not a server")
    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        asyncio.run(serve(args.host, args.port, args.delay))
    sys.exit(0)


if __name__ == "__main__":
    main()
