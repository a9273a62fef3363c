"""What one usage API page costs over a large ledger (a benchmark, not a test: it prints numbers).

A SQLite ledger of N records spread over 30 days; for each query, interleaved, the time and the memory
(peak RSS growth of a fresh child process) of:
- read: every record of the range read into the proxy (what the usage API did before its sums moved into
  the database, before any summing), the baseline;
- sums: the page summed in the database (the usage API now, `aggregate`), then rendered.

Usage: python bench/bench_usage_api.py [--n 300000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from multidict import MultiDict  # noqa: E402

from proxy.usage.record import UsageRecord  # noqa: E402
from proxy.usage.report import (  # noqa: E402
    COST_GROUPS,
    IMAGE_GROUPS,
    WIDTHS,
    costs_by_call,
    costs_page,
    images_page,
    page_window,
    parse_query,
)
from proxy.usage.sqlite import SqliteLedger  # noqa: E402

DAY = 86400
QUERIES = {
    "images, 30 days by key and model": (images_page, IMAGE_GROUPS, {"group_by": "api_key_id,model", "limit": "31"}),
    "costs, 30 days by route (split by call)": (costs_page, COST_GROUPS, {"group_by": "route", "limit": "31"}),
}


def fill(path: str, n: int, now: float) -> None:
    rnd = random.Random(1)

    async def run() -> None:
        ledger = SqliteLedger(path)
        await ledger.start()
        batch = []
        for i in range(n):
            cost = rnd.choice([0.02, 0.05, None])
            calls = [{"route": rnd.choice(["fal", "local"]), "provider": "fal", "images": 1,
                      "gpu_seconds": round(rnd.random(), 3), "cost": cost}]
            batch.append(UsageRecord(
                id=f"{i:x}", ts=now - rnd.random() * 30 * DAY, request_id="r", key=rnd.choice("abc"),
                model="qwen-image", source="image.generation", route=calls[0]["route"], provider="fal",
                outcome="ok", status=200, images_asked=1, images_delivered=1, width=1024, height=1024,
                megapixels=1.0, steps=20, tier=None, latency_ms=900.0, gpu_seconds=calls[0]["gpu_seconds"],
                cost_usd=cost, cache_hit=False, stream=False, attempts=json.dumps(calls)))
            if len(batch) == 10_000:
                await ledger.write(batch)
                batch = []
        await ledger.write(batch)
        await ledger.close()

    asyncio.run(run())


def measure(path: str, name: str, way: str, now: float, out: mp.Queue) -> None:
    render, groups, params = QUERIES[name]
    q = parse_query(MultiDict({"start_time": str(int(now - 30 * DAY)), "end_time": str(int(now) + 1), **params}),
                    groups, now)
    lo, hi = page_window(q)

    async def run() -> None:
        ledger = SqliteLedger(path)
        await ledger.start()
        if way == "read":
            rows = await ledger.query(lo, hi)
            count = len(rows)
        else:
            parts = await ledger.aggregate(lo, hi, q.page_start, WIDTHS[q.width],
                                           render is costs_page and costs_by_call(q))
            render(q, parts)
            count = len(parts)
        await ledger.close()
        out.put(count)

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - t0
    out.put((seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300_000)
    args = ap.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "usage.sqlite3")
        fill(path, args.n, now)
        print(f"ledger: {args.n:,} records over 30 days (SQLite); load average {os.getloadavg()[0]:.1f}, "
              f"{os.cpu_count()} cores")
        print(f"{'query':42} {'read every record (before)':>30} {'summed in the database (now)':>32}")
        ctx = mp.get_context("spawn")
        for name in QUERIES:
            cells = []
            for way in ("read", "sums"):
                out: mp.Queue = ctx.Queue()
                p = ctx.Process(target=measure, args=(path, name, way, now, out))
                p.start()
                rows = out.get()
                seconds, rss_mb = out.get()
                p.join()
                cells.append(f"{seconds:6.2f} s {rss_mb:+7.0f} MB {rows:>8,} rows")
            print(f"{name:42} {cells[0]:>30} {cells[1]:>32}")


if __name__ == "__main__":
    main()
