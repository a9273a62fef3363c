"""Cost of the structural image check against Pillow (a benchmark, not a test: it prints numbers).

For a 1024x1024 image of noise (so it does not compress: ~3 MB as PNG) in each format, the median time of
- proxy.media.imagecheck.check_image(data)
- Image.open(BytesIO(data)).verify()   (PNG: reads every chunk and checks its CRC; the other formats
                                        only parse their header, verify() adds nothing for them)
- Image.open(BytesIO(data)).load()     (a full decode)
all measured in the same run, side by side.

Usage: python bench/bench_imagecheck.py [--size 1024] [--repeat 50] [--formats png,jpeg,webp,gif,avif]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from proxy.media.imagecheck import check_image  # noqa: E402

SAVE_OPTIONS = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 90}),
    "webp": ("WEBP", {"quality": 80}),
    "gif": ("GIF", {}),
    "avif": ("AVIF", {"quality": 80, "speed": 8}),
}


def noise_image(fmt: str, size: int) -> bytes:
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    pil_format, options = SAVE_OPTIONS[fmt]
    out = io.BytesIO()
    image.save(out, format=pil_format, **options)
    return out.getvalue()


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--formats", default="png,jpeg,webp,gif,avif")
    args = parser.parse_args()

    print(f"{args.size}x{args.size} noise, median of {args.repeat} runs, Pillow {Image.__version__}")
    header = f"{'format':<6} {'bytes':>10} {'check_image':>12} {'open+verify':>12} {'open+load':>11} {'load/check':>11}"
    print(header)
    print("-" * len(header))
    for fmt in args.formats.split(","):
        data = noise_image(fmt, args.size)
        info = check_image(data)
        assert (info.width, info.height) == (args.size, args.size), info

        def verify(data: bytes = data) -> None:
            Image.open(io.BytesIO(data)).verify()

        def load(data: bytes = data) -> None:
            with Image.open(io.BytesIO(data)) as image:
                image.load()

        check = median_ms(lambda data=data: check_image(data), args.repeat)
        verified = median_ms(verify, args.repeat)
        loaded = median_ms(load, max(5, args.repeat // 5))
        print(
            f"{fmt:<6} {len(data):>10,} {check:>9.3f} ms {verified:>9.3f} ms {loaded:>8.2f} ms "
            f"{loaded / check:>10.0f}x"
        )


if __name__ == "__main__":
    main()
