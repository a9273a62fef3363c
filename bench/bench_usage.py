"""What the usage ledger, budgets and the seeded-request cache lookup cost per image request (a benchmark,
not a test: it prints numbers). Target: <= 20 us of CPU per request.

In one process and one event loop, rounds of N requests' worth of the usage hooks the gateway runs
(open a meter, cache lookup and budget hold before routing, the router's call note, the answer's headers,
the record, metrics and settlement at the end) interleave with rounds of the same loop without them (the
baseline: the loop, the awaits and the request object alone). CPU is measured two ways:
- request path: this thread's CPU (time.thread_time), what a request waits for;
- all: the whole process's CPU (time.process_time) including the ledger writer's SQLite batches, which
  run in a worker thread off the request path; each round ends with its records written.

Usage: python bench/bench_usage.py [--n 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from proxy.api.gateway import Gateway  # noqa: E402
from proxy.config import parse_config  # noqa: E402
from proxy.providers.base import GeneratedImage  # noqa: E402
from proxy.request import ImageRequest  # noqa: E402
from proxy.usage.meter import CURRENT  # noqa: E402

CASES = {
    "ledger": {},
    "ledger+budget": {"budget": True},
    "ledger+budget+cache miss (seeded)": {"budget": True, "cache": True, "seed": 7},
    "ledger+budget+cache on, unseeded": {"budget": True, "cache": True},
}


def config(tmp: str, budget: bool, cache: bool) -> dict:
    key = {"name": "alice", "key": "sk-alice-000000"}
    if budget:
        key["budget"] = {"images_per_day": 10**9, "usd_per_day": 10**6}
    model = {"sizes": "small", "routes": [{"provider": "placeholder", "price": {"per_image": 0.01}}]}
    if cache:
        model["cache"] = {"ttl_seconds": 600, "max_mb": 64}
    return {"server": {"api_keys": [key]}, "store": {"path": f"{tmp}/images"},
            "usage": {"path": f"{tmp}/usage.sqlite3", "flush_seconds": 0.2, "queue_max": 10**7},
            "providers": {"placeholder": {"kind": "placeholder"}},
            "size_tables": {"small": {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64"}}}},
            "models": {"m": model}}


async def nothing() -> None:
    return None


async def run_case(name: str, opts: dict, n: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        gw = Gateway(parse_config(config(tmp, opts.get("budget", False), opts.get("cache", False)), env={}))
        await gw.start()
        usage, key = gw.usage, gw.policy.keys[0]
        route = gw.router.routes["m"][0]
        req = ImageRequest(prompt="a fox in the snow", model="m", width=64, height=64, n=1, seed=opts.get("seed"))
        images = [GeneratedImage(data=b"x", width=64, height=64)]

        async def with_usage():
            meter = usage.open()
            hit = await usage.before(req, key, None)
            assert hit is None
            meter.note(route.name, route.provider.kind, route.config.price, 64, 64, images)
            usage.headers()
            usage.finish(meter, request_id="r", key=key, model="m", path="/v1/images/generations", status=200,
                         outcome="ok", seconds=0.01)

        async def baseline():
            CURRENT.set(None)  # the same loop and await, no hooks
            await nothing()
            _ = (req.model, key.name, route.name, images)

        results = {"with": [], "without": [], "with_all": [], "without_all": []}
        for _ in range(rounds):
            for label, body in (("without", baseline), ("with", with_usage)):
                t0, p0 = time.thread_time(), time.process_time()
                for _ in range(n):
                    await body()
                t1 = time.thread_time()
                if label == "with":
                    await usage.writer.flush(60)
                p1 = time.process_time()
                results[label].append((t1 - t0) / n * 1e6)
                results[f"{label}_all"].append((p1 - p0) / n * 1e6)
        await gw.close()
    med = {k: statistics.median(v) for k, v in results.items()}
    return {"case": name, "path_us": med["with"] - med["without"], "all_us": med["with_all"] - med["without_all"],
            "baseline_us": med["without"]}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.n} requests x {args.rounds} interleaved rounds per case; medians; CPU per request (us)")
    print(f"{'case':40} {'request path':>13} {'with writer':>12} {'baseline loop':>14}")
    for name, opts in CASES.items():
        r = await run_case(name, opts, args.n, args.rounds)
        print(f"{r['case']:40} {r['path_us']:13.1f} {r['all_us']:12.1f} {r['baseline_us']:14.2f}")


if __name__ == "__main__":
    asyncio.run(main())
