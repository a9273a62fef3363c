"""What refusing too much work costs, next to doing it (a benchmark, not a test: it prints numbers).

Each case runs in its own process, so its peak RSS (getrusage ru_maxrss) is its own; "extra" is the
growth of the peak while the case ran (after imports and setup).

1. Oversized requests through the running proxy (placeholder model, the shipped qwen-image table:
   max_pixels 2048x2048): the median time of a 400 for `13000x13000 n=4` and for `14142x14142`,
   next to the work they used to start: the placeholder drawing and encoding ONE 13000x13000 image
   the way it did before the limits (full-size drawing, PNG level 6; the request asked for four).
2. A decompression bomb from an upstream: a 13000x13000 RGB PNG of a few hundred KB (507 MB decoded)
   through proxy.media.output.convert (structural check with the proxy's pixel limit, then refused), next to
   Pillow's plain Image.open + load (the default MAX_IMAGE_PIXELS only warns at this size), and next to
   Pillow with MAX_IMAGE_PIXELS lowered to the proxy's limit (DecompressionBombError at open).
3. A heavy edit input: a flat 4096x4096 progressive CMYK JPEG (about 0.5 MB) as both image and mask,
   1024x1024 output on the placeholder, through the running proxy with n=1 and n=10, next to the
   baseline of decoding that JPEG once with Pillow. An input is decoded once per request (checked, then
   decoded at the scale the route needs), so n adds only the output images.

Usage: python bench/bench_limits.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

BOMB_SIDE = 13000


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def bomb_png(width: int, height: int) -> bytes:
    """An RGB PNG of zeros, compressed row by row (never the whole image in memory)."""
    row = b"\x00" + bytes(width * 3)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- the cases (each in a child process) -----------------------------------------------------------


async def _refusals(body: dict, repeat: int) -> dict:
    import aiohttp
    from aiohttp import web

    from proxy import build_app, parse_config

    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config({
            "store": {"path": tmp},
            "providers": {"placeholder": {"kind": "placeholder"}},
            "size_tables": {"qwen-image": {"default": "1024x1024", "max_pixels": 2048 * 2048,
                                           "tiers": {"1K": {"1:1": "1024x1024"}}}},
            "models": {"qwen-image-placeholder": {"sizes": "qwen-image", "routes": ["placeholder"]}},
        }, env={})
        runner = web.AppRunner(build_app(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        payload = {"model": "qwen-image-placeholder", "prompt": "a lighthouse", **body}
        times, statuses = [], set()
        async with aiohttp.ClientSession() as session:
            async with session.post(url, json=payload) as r:  # warm up
                await r.read()
            before = peak_mb()
            for _ in range(repeat):
                start = time.perf_counter()
                async with session.post(url, json=payload) as r:
                    await r.read()
                    statuses.add(r.status)
                times.append(time.perf_counter() - start)
        await runner.cleanup()
    return {"seconds": statistics.median(times), "before_mb": before, "status": sorted(statuses)}


def case_refuse(args) -> dict:
    body = json.loads(args.body)
    return asyncio.run(_refusals(body, args.repeat))


def case_old_placeholder(args) -> dict:
    """The work a 13000x13000 request started before the limits: one image, drawn at full size."""
    from proxy.providers import placeholder

    before = peak_mb()
    start = time.perf_counter()
    im = placeholder._draw("a lighthouse", 1, BOMB_SIDE, BOMB_SIDE, f"{BOMB_SIDE}x{BOMB_SIDE}")
    out = io.BytesIO()
    im.save(out, format="PNG")
    return {"seconds": time.perf_counter() - start, "before_mb": before, "status": ["200 (1 of 4 images)"]}


def case_new_placeholder(args) -> dict:
    """The placeholder's largest image now: 4096x4096, drawn at ~1 MP and scaled up."""
    from proxy.providers import placeholder

    before = peak_mb()
    start = time.perf_counter()
    placeholder.render_png("a lighthouse", 1, 4096, 4096)
    return {"seconds": time.perf_counter() - start, "before_mb": before, "status": ["200 (1 image)"]}


def heavy_jpeg() -> bytes:
    """A flat 4096x4096 progressive CMYK JPEG: small on the wire, costly to decode (libjpeg keeps every
    coefficient of a progressive image: ~128 MB, plus 64 MB of pixels)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("CMYK", (4096, 4096), (30, 60, 90, 10)).save(out, format="JPEG", progressive=True, quality=90)
    return out.getvalue()


async def _heavy_edit(path: str, n: int) -> dict:
    import aiohttp
    from aiohttp import web

    from proxy import build_app, parse_config

    with open(path, "rb") as f:
        data = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config({
            "store": {"path": tmp},
            "providers": {"placeholder": {"kind": "placeholder"}},
            "size_tables": {"qwen-image": {"default": "1024x1024", "tiers": {"1K": {"1:1": "1024x1024"}}}},
            "models": {"qwen-image-edit-placeholder": {"sizes": "qwen-image", "max_input_images": 1,
                                                       "routes": ["placeholder"]}},
        }, env={})
        runner = web.AppRunner(build_app(config))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}/v1/images/edits"

        def form() -> aiohttp.FormData:
            f = aiohttp.FormData()
            for name, value in (("model", "qwen-image-edit-placeholder"), ("prompt", "paint it"), ("n", str(n)),
                                ("size", "1024x1024"), ("response_format", "b64_json")):
                f.add_field(name, value)
            f.add_field("image", data, filename="in.jpg", content_type="image/jpeg")
            f.add_field("mask", data, filename="mask.jpg", content_type="image/jpeg")
            return f

        async with aiohttp.ClientSession() as session:
            before = peak_mb()
            start = time.perf_counter()
            async with session.post(url, data=form()) as r:
                body = await r.read()
                status = f"{r.status} ({len(json.loads(body).get('data', []))} images)" if r.status == 200 else f"{r.status} {body[:200]!r}"
            seconds = time.perf_counter() - start
        await runner.cleanup()
    return {"seconds": seconds, "before_mb": before, "status": [status]}


def case_heavy_edit(args) -> dict:
    return asyncio.run(_heavy_edit(args.input, args.n))


def case_heavy_make(args) -> dict:
    """Writes the heavy JPEG (in a child: the peak RSS a parent reaches is inherited by the children it
    starts, and the 64 MB CMYK picture would show in every case after it)."""
    with open(args.input, "wb") as f:
        f.write(heavy_jpeg())
    return {"seconds": 0.0, "before_mb": 0.0, "status": []}


def case_heavy_decode(args) -> dict:
    from PIL import Image

    with open(args.input, "rb") as f:
        data = f.read()
    before = peak_mb()
    start = time.perf_counter()
    with Image.open(io.BytesIO(data)) as im:
        im.load()
    return {"seconds": time.perf_counter() - start, "before_mb": before, "status": [f"{len(data) // 1024} KB"]}


def case_bomb_convert(args) -> dict:
    from proxy.errors import UpstreamError
    from proxy.media.output import OutputSettings, convert

    with open(args.bomb, "rb") as f:
        data = f.read()
    # finish_images' limit for a 1024x1024 request: max(max_image_pixels, 4 x the requested size).
    limit = max(OutputSettings().max_image_pixels, 4 * 1024 * 1024)
    before = peak_mb()
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        try:
            convert(data, "png", None, (1024, 1024), max_pixels=limit)
            outcome = "decoded"
        except UpstreamError:
            outcome = "refused (UpstreamError)"
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "before_mb": before, "status": [outcome]}


def case_bomb_pillow(args) -> dict:
    from PIL import Image

    with open(args.bomb, "rb") as f:
        data = f.read()
    if args.pillow_limit:
        Image.MAX_IMAGE_PIXELS = args.pillow_limit
    before = peak_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
            outcome = f"decoded {im.size[0]}x{im.size[1]}"
        except Image.DecompressionBombError:
            outcome = "refused (DecompressionBombError)"
    return {"seconds": time.perf_counter() - start, "before_mb": before, "status": [outcome]}


CASES = {
    "refuse": case_refuse,
    "old-placeholder": case_old_placeholder,
    "new-placeholder": case_new_placeholder,
    "bomb-convert": case_bomb_convert,
    "bomb-pillow": case_bomb_pillow,
    "heavy-edit": case_heavy_edit,
    "heavy-make": case_heavy_make,
    "heavy-decode": case_heavy_decode,
}


def run_case(name: str, *extra: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--case", name, *extra], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, result: dict) -> str:
    extra = result["peak_mb"] - result["before_mb"]
    seconds = result["seconds"]
    if seconds < 1e-3:
        shown = f"{seconds * 1e6:9.1f} us"
    else:
        shown = f"{seconds * 1000:9.2f} ms" if seconds < 1 else f"{seconds:9.2f} s "
    return f"  {label:<46} {shown} {result['peak_mb']:8.0f} MB {extra:+8.0f} MB   {', '.join(map(str, result['status']))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    parser.add_argument("--bomb", help=argparse.SUPPRESS)
    parser.add_argument("--pillow-limit", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:  # a child: one case, one JSON line
        result = CASES[args.case](args)
        result["peak_mb"] = peak_mb()
        print(json.dumps(result))
        return

    from proxy.media.output import OutputSettings

    repeat = ["--repeat", str(args.repeat)]
    header = f"  {'':<46} {'time':>12} {'peak RSS':>11} {'extra':>11}   outcome"
    print("Oversized requests (placeholder, qwen-image table with max_pixels 2048x2048), median of "
          f"{args.repeat}:")
    print(header)
    for label, body in [("refused: 13000x13000 n=4", {"size": "13000x13000", "n": 4}),
                        ("refused: 14142x14142", {"size": "14142x14142"}),
                        ("refused: 2048x2048 n=5 (over n x pixels)", {"size": "2048x2048", "n": 5})]:
        print(row(label, run_case("refuse", "--body", json.dumps(body), *repeat)))
    print(row("before the limits: ONE 13000x13000 image drawn", run_case("old-placeholder")))
    print(row("now: the placeholder's largest, 4096x4096", run_case("new-placeholder")))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bomb.png")
        data = bomb_png(BOMB_SIDE, BOMB_SIDE)
        with open(path, "wb") as f:
            f.write(data)
        limit = OutputSettings().max_image_pixels
        print(f"\nDecompression bomb: {BOMB_SIDE}x{BOMB_SIDE} RGB PNG, {len(data) // 1024} KB "
              f"({BOMB_SIDE * BOMB_SIDE * 3 // 2**20} MB decoded):")
        print(header)
        print(row("proxy.media.output.convert (checked first)", run_case("bomb-convert", "--bomb", path, *repeat)))
        print(row("Pillow open+load, default MAX_IMAGE_PIXELS", run_case("bomb-pillow", "--bomb", path)))
        print(row(f"Pillow open+load, MAX_IMAGE_PIXELS={limit}",
                  run_case("bomb-pillow", "--bomb", path, "--pillow-limit", str(limit))))

    print("\nA heavy edit input: 4096x4096 progressive CMYK JPEG as image and mask, 1024x1024 out, placeholder:")
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "heavy.jpg")
        run_case("heavy-make", "--input", path)
        print(row("baseline: Pillow decodes the JPEG once", run_case("heavy-decode", "--input", path)))
        for n in (1, 10):
            print(row(f"edit n={n} (image and mask)", run_case("heavy-edit", "--input", path, "--n", str(n))))


if __name__ == "__main__":
    main()
