"""How long a streamed answer's images hold the proxy's event loop: /health probed while streams complete.

    .venv/bin/python bench/bench_stream_stall.py [--rounds 10] [--n 4]

The mock upstream (bench/mock_upstream.py, its own process) answers 1024x1024 noise PNGs (~4.2 MB as
base64 each); the proxy (`python -m proxy serve`, its own process) is asked for them with stream=true, and
for comparison without. Meanwhile a probe sends GET /health one after the other on its own connection:
a probe's latency is how long the proxy's loop kept it waiting. The table gives the probes' median, p99 and
worst latency while idle, during streams and during the same requests without stream. Numbers, never a
timed assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import bench_gateway as gw


async def probe(http: aiohttp.ClientSession, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        async with http.get(url) as r:
            await r.read()
        out.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(0.001)


async def one(http: aiohttp.ClientSession, url: str, n: int, stream: bool) -> int:
    body = {"model": gw.MODEL, "prompt": "noise", "size": gw.LARGE, "n": n, "response_format": "b64_json",
            "stream": stream}
    async with http.post(url, data=json.dumps(body), headers={"Content-Type": "application/json"}) as r:
        data = await r.read()
        if r.status != 200 or (stream and b"completed" not in data):
            raise RuntimeError(f"{r.status}: {data[:300]!r}")
        return len(data)


async def phase(base: str, rounds: int, n: int, stream: bool | None) -> list[float]:
    """Probe latencies (ms) during `rounds` requests one after the other (stream None: idle, 2 s)."""
    latencies: list[float] = []
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as probes, aiohttp.ClientSession() as work:
        task = asyncio.ensure_future(probe(probes, f"{base}/health", stop, latencies))
        try:
            if stream is None:
                await asyncio.sleep(2)
            else:
                for _ in range(rounds):
                    await one(work, f"{base}/v1/images/generations", n, stream)
        finally:
            stop.set()
            with contextlib.suppress(Exception):
                await task
    return latencies


def row(name: str, values: list[float]) -> str:
    values = sorted(values)
    return (f"| {name} | {len(values)} | {gw.median(values):.2f} | {gw.percentile(values, 0.99):.2f} | "
            f"{values[-1]:.2f} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--n", type=int, default=4, help="images per request (each ~4.2 MB of base64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        mock = gw.start_mock(tmp)
        proxy = gw.start_proxy(tmp, mock.base_url, "stall")
        try:
            await phase(proxy.base_url, 2, args.n, False)  # warm up: connections, imports, first images
            await phase(proxy.base_url, 2, args.n, True)
            results = {"idle": await phase(proxy.base_url, 0, args.n, None),
                       f"stream=true, n={args.n}": await phase(proxy.base_url, args.rounds, args.n, True),
                       f"stream=false, n={args.n}": await phase(proxy.base_url, args.rounds, args.n, False)}
        finally:
            proxy.stop()
            mock.stop()
    print(f"/health latency (ms) on the proxy while {args.rounds} requests of {args.n} 1024x1024 noise PNGs "
          f"complete, one after the other ({gw.machine()})")
    print("| while | probes | median | p99 | worst |\n|---|---|---|---|---|")
    for name, values in results.items():
        print(row(name, values))
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
