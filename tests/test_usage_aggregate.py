"""The usage API's sums come from the database (SQLite and a real PostgreSQL), not from every record read
into the proxy: pages, filters, buckets and the costs split by route must equal the sums of the records
one by one."""

from __future__ import annotations

import json
import math
import random

import pytest
from multidict import MultiDict

from proxy.usage.aggregate import Partial
from proxy.usage.postgres import PostgresLedger
from proxy.usage.record import UsageRecord
from proxy.usage.report import (
    COST_GROUPS,
    IMAGE_GROUPS,
    WIDTHS,
    costs_by_call,
    costs_page,
    images_page,
    page_window,
    parse_query,
    summary,
)
from proxy.usage.sqlite import SqliteLedger

from .services import postgres_server  # noqa: F401

DAY = 86400
T0 = 1_790_000_000 - 1_790_000_000 % DAY  # a UTC midnight
ROUTES = [("fal", "fal"), ("local", "local"), ("vendor", "openai")]


def random_records(n: int, seed: int = 5) -> list[UsageRecord]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        calls = []
        for route, provider in rnd.sample(ROUTES, rnd.choice([0, 1, 1, 2, 3])):
            for _ in range(rnd.choice([1, 1, 2])):  # a retry on the same route: its shares add up
                calls.append({"route": route, "provider": provider, "images": 1,
                              "gpu_seconds": round(rnd.random(), 3) if route == "local" else None,
                              "cost": rnd.choice([None, 0.001 * rnd.randint(1, 50)])})
        costs = [c["cost"] for c in calls]
        hit = not calls and rnd.random() < 0.5
        cost = 0.0 if hit else (None if any(c is None for c in costs) or not calls else sum(costs))
        # some exactly on bucket edges, the rest anywhere in 10 days
        ts = T0 + rnd.randint(0, 9) * DAY if i % 7 == 0 else T0 + rnd.random() * 10 * DAY
        ok = rnd.random() < 0.8
        w = rnd.choice([512, 1024, None])
        out.append(UsageRecord(
            id=f"r{i}", ts=ts, request_id=f"q{i}", key=rnd.choice(["alice", "bob", None]),
            model=rnd.choice(["qwen-image", "qwen-image-edit"]), source=rnd.choice(["image.generation", "image.edit"]),
            route=calls[-1]["route"] if calls else ("local" if hit else None),
            provider=calls[-1]["provider"] if calls else ("local" if hit else None),
            outcome="ok" if ok else "failed", status=200 if ok else 502, images_asked=2,
            images_delivered=rnd.randint(1, 2) if ok else 0, width=w, height=w, megapixels=None, steps=None,
            tier=None, latency_ms=1.0, gpu_seconds=rnd.choice([None, round(rnd.random(), 3)]), cost_usd=cost,
            cache_hit=hit, stream=False, attempts=json.dumps(calls),
            project_id=rnd.choice(["web", "batch", None]), user_id=rnd.choice(["ann", None])))
    return out


def one_by_one(records: list[UsageRecord], lo: float, hi: float, origin: float, width: int,
               by_call: bool) -> list[Partial]:
    """The reference: each record (or each route it called) as its own partial, summed in Python."""
    parts = []
    for r in records:
        if not lo <= r.ts < hi:
            continue
        start = int(origin + math.floor((r.ts - origin) / width) * width)
        calls = json.loads(r.attempts)
        shares: list[tuple] = [(r.route, r.provider, r.cost_usd, int(r.cost_usd is None and bool(calls)))]
        if by_call and calls:
            sums: dict[tuple, float | None] = {}
            for c in calls:
                where = (c["route"], c["provider"])
                before = sums.get(where, 0.0)
                sums[where] = None if before is None or c["cost"] is None else before + c["cost"]
            shares = [(route, provider, cost, int(cost is None)) for (route, provider), cost in sums.items()]
        for route, provider, cost, unpriced in shares:
            parts.append(Partial(start, r.key, r.model, r.source, route, provider, r.width, r.height,
                                 r.outcome == "ok", r.cache_hit, 1, r.images_delivered, r.gpu_seconds or 0.0,
                                 cost or 0.0, unpriced, r.project_id, r.user_id))
    return parts


QUERIES = [
    (images_page, IMAGE_GROUPS, {"bucket_width": "1d", "limit": "31"}),
    (images_page, IMAGE_GROUPS, {"bucket_width": "1d", "group_by": "api_key_id,model,size,source"}),
    (images_page, IMAGE_GROUPS, {"bucket_width": "1d", "group_by": "route,provider", "page": str(T0 + 7 * DAY)}),
    (images_page, IMAGE_GROUPS, {"bucket_width": "1h", "group_by": "model", "limit": "100",
                                 "api_key_ids": "alice", "sizes": "1024x1024"}),
    (images_page, IMAGE_GROUPS, {"bucket_width": "1d", "group_by": "project_id,user_id", "limit": "31"}),
    (images_page, IMAGE_GROUPS, {"bucket_width": "1d", "group_by": "api_key_id", "project_ids": "web",
                                 "user_ids": "ann"}),
    (costs_page, COST_GROUPS, {"bucket_width": "1d", "group_by": "api_key_id,line_item", "limit": "31"}),
    (costs_page, COST_GROUPS, {"bucket_width": "1d", "group_by": "project_id", "limit": "31"}),
    (costs_page, COST_GROUPS, {"bucket_width": "1d", "group_by": "project_id,route", "project_ids": "batch",
                               "limit": "31"}),
    (costs_page, COST_GROUPS, {"bucket_width": "1d", "group_by": "route", "limit": "31"}),
    (costs_page, COST_GROUPS, {"bucket_width": "1d", "group_by": "provider,model", "routes": "fal,local",
                               "limit": "5", "page": str(T0 + 2 * DAY)}),
]


def rounded(page: dict) -> str:
    """The page with floats to 9 places (database and Python add doubles in different orders)."""
    return json.dumps(_round(page), sort_keys=True)


def _round(x):
    if isinstance(x, float):
        return round(x, 9)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


async def check_backend(backend, records: list[UsageRecord]) -> None:
    await backend.start()
    try:
        await backend.write(records)
        for render, groups, params in QUERIES:
            q = parse_query(MultiDict({"start_time": str(T0), "end_time": str(T0 + 10 * DAY), **params}), groups,
                            now=T0 + 11 * DAY)
            by_call = render is costs_page and costs_by_call(q)
            lo, hi = page_window(q)
            got = render(q, await backend.aggregate(lo, hi, q.page_start, WIDTHS[q.width], by_call))
            want = render(q, one_by_one(records, lo, hi, q.page_start, WIDTHS[q.width], by_call))
            assert any(b["results"] for b in want["data"]), params  # the query sees records at all
            assert rounded(got) == rounded(want), params
        # the CLI's table: a window that does not start on a day
        origin = T0 + 3 * 3600
        got_rows = summary(await backend.aggregate(origin, T0 + 10 * DAY, origin, DAY), ["project_id", "model", "route"])
        want_rows = summary(one_by_one(records, origin, T0 + 10 * DAY, origin, DAY, False), ["project_id", "model", "route"])
        assert _round(got_rows) == _round(want_rows) and len(want_rows) > 10
    finally:
        await backend.close()


async def test_sqlite_sums_equal_the_records_one_by_one(tmp_path):
    await check_backend(SqliteLedger(str(tmp_path / "usage.sqlite3")), random_records(3000))


async def test_postgres_sums_equal_the_records_one_by_one(postgres_server):  # noqa: F811
    pytest.importorskip("psycopg")
    await check_backend(PostgresLedger(postgres_server.url), random_records(3000))


async def test_a_page_reads_its_own_days_only(tmp_path):
    """Page 2 of a 10-day range sums days 7-9 only: the database is asked for the page's window."""
    records = random_records(500)
    backend = SqliteLedger(str(tmp_path / "usage.sqlite3"))
    await backend.start()
    try:
        await backend.write(records)
        q = parse_query(MultiDict({"start_time": str(T0), "end_time": str(T0 + 10 * DAY), "page": str(T0 + 7 * DAY)}),
                        IMAGE_GROUPS, now=T0 + 11 * DAY)
        assert page_window(q) == (T0 + 7 * DAY, T0 + 10 * DAY)
        parts = await backend.aggregate(*page_window(q), q.page_start, DAY)
        assert {p.start for p in parts} == {T0 + 7 * DAY, T0 + 8 * DAY, T0 + 9 * DAY}
        assert sum(p.requests for p in parts) == sum(1 for r in records if T0 + 7 * DAY <= r.ts < T0 + 10 * DAY)
    finally:
        await backend.close()
