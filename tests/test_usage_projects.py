"""Cost per project and user: keys carry `project` and `user`, every ledger record stores them, and OpenAI's
usage and costs API groups and filters by project_id and user_id. As a team sharing one gateway sees it: a
running `serve` with keys in two projects, images made with the official openai client, the endpoints and
the `usage` CLI read back; on ledgers (SQLite and PostgreSQL) that an earlier version made."""

from __future__ import annotations

import asyncio
import copy
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict

import aiohttp
import pytest
from openai import AsyncOpenAI

from proxy.config import ConfigError, parse_config
from proxy.usage.meter import Meter
from proxy.usage.postgres import PostgresLedger
from proxy.usage.record import build_record

from .conftest import base_config
from .fake_openai_upstream import free_port
from .services import postgres_server  # noqa: F401
from .test_jobs_e2e import wait_done
from .test_lifecycle import ROOT, serve, wait_exit, wait_listening

# The ledger as version 0.1 made it (proxy/usage/schema.py then): no project_id, no user_id.
V1_CREATE = [
    "CREATE TABLE IF NOT EXISTS qip_usage (id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, request_id TEXT, "
    "key TEXT, model TEXT NOT NULL, source TEXT NOT NULL, route TEXT, provider TEXT, outcome TEXT NOT NULL, "
    "status INTEGER NOT NULL, images_asked INTEGER NOT NULL, images_delivered INTEGER NOT NULL, width INTEGER, "
    "height INTEGER, megapixels DOUBLE PRECISION, steps INTEGER, tier TEXT, latency_ms DOUBLE PRECISION, "
    "gpu_seconds DOUBLE PRECISION, cost_usd DOUBLE PRECISION, cache_hit BOOLEAN NOT NULL, stream BOOLEAN NOT NULL, "
    "attempts TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS qip_usage_ts ON qip_usage (ts)",
]
V1_INSERT = ("INSERT INTO qip_usage (id, ts, request_id, key, model, source, route, provider, outcome, status, "
             "images_asked, images_delivered, width, height, megapixels, steps, tier, latency_ms, gpu_seconds, "
             "cost_usd, cache_hit, stream, attempts) VALUES ({m}) ON CONFLICT (id) DO NOTHING")


def v1_record(ts: float) -> tuple:
    """A record the old version wrote: alice, 3 images, $0.5 (before keys had projects)."""
    return ("old1", ts, "req-old", "alice", "qwen-image-placeholder", "image.generation", "placeholder",
            "placeholder", "ok", 200, 3, 3, 1024, 1024, 1.048576, None, None, 12.0, None, 0.5, False, False,
            '[{"route":"placeholder","provider":"placeholder","images":3,"gpu_seconds":null,"cost":0.5}]')


KEYS = [{"name": "alice", "key": "sk-alice-0000000000", "project": "web", "user": "ann"},
        {"name": "carol", "key": "sk-carol-0000000000", "project": "web"},
        {"name": "bob", "key": "sk-bob-0000000000", "project": "batch", "user": "bert"},
        {"name": "ops", "key": "sk-admin-000000000", "admin": True}]


def projects_config(tmp_path) -> dict:
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": copy.deepcopy(KEYS)}
    cfg["models"]["qwen-image-placeholder"]["routes"] = [{"provider": "placeholder", "price": {"per_image": 0.01}}]
    cfg["models"]["pricier"] = {"sizes": "qwen-image",
                                "routes": [{"provider": "placeholder", "price": {"per_image": 0.1}}]}
    return cfg


async def make_images(base_url: str) -> None:
    """alice (web, ann): 2 x 2 images at $0.01; carol (web, no user): 1 at $0.1; bob (batch, bert): 3 at $0.01."""
    def client(key: str) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)

    alice, carol, bob = client("sk-alice-0000000000"), client("sk-carol-0000000000"), client("sk-bob-0000000000")
    try:
        for _ in range(2):
            r = await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", n=2, size="1024x1024")
            assert len(r.data) == 2
        await carol.images.generate(model="pricier", prompt="an owl", size="1024x1024")
        r = await bob.images.generate(model="qwen-image-placeholder", prompt="a hen", n=3, size="1024x1024")
        assert len(r.data) == 3
    finally:
        for c in (alice, carol, bob):
            await c.close()


async def get(base: str, path: str, params, key: str = "sk-admin-000000000") -> dict:
    async with aiohttp.ClientSession() as s, s.get(f"{base}{path}", params=params,
                                                   headers={"Authorization": f"Bearer {key}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def summed(page: dict, *fields: str, value=lambda x: x["images"]) -> dict:
    """{(field values...): value} over every bucket of the page."""
    out: dict = defaultdict(float)
    for bucket in page["data"]:
        for x in bucket["results"]:
            out[tuple(x[f] for f in fields)] += value(x)
    return {k: pytest.approx(v, abs=1e-9) for k, v in out.items()}


def cost(x: dict) -> float:
    return x["amount"]["value"]


async def check_projects(base: str, start: int, old_record: bool) -> None:
    """What the endpoints answer after make_images (and, with old_record, the earlier version's record)."""
    old = {(None,): 3} if old_record else {}
    usage, costs = "/v1/organization/usage/images", "/v1/organization/costs"

    page = await get(base, usage, {"start_time": str(start), "group_by": "project_id"})
    assert summed(page, "project_id") == {("web",): 5, ("batch",): 3, **old}
    assert summed(page, "project_id", value=lambda x: x["num_model_requests"]) == {
        ("web",): 3, ("batch",): 1, **({(None,): 1} if old_record else {})}
    for x in page["data"][0]["results"]:  # not grouped by user: null, as OpenAI answers
        assert x["user_id"] is None and x["api_key_id"] is None

    page = await get(base, usage, [("start_time", str(start)), ("group_by[]", "project_id"), ("group_by[]", "user_id")])
    assert summed(page, "project_id", "user_id") == {
        ("web", "ann"): 4, ("web", None): 1, ("batch", "bert"): 3, **({(None, None): 3} if old_record else {})}

    # Filters: one project (per key inside it), one user, two projects.
    page = await get(base, usage, {"start_time": str(start), "project_ids": "web", "group_by": "api_key_id"})
    assert summed(page, "api_key_id") == {("alice",): 4, ("carol",): 1}
    page = await get(base, usage, {"start_time": str(start), "user_ids[]": "bert"})
    assert summed(page, "project_id") == {(None,): 3}  # ungrouped: one result, project_id null
    page = await get(base, usage, [("start_time", str(start)), ("project_ids", "web"), ("project_ids", "batch")])
    assert summed(page, "model") == {(None,): 8}
    page = await get(base, usage, {"start_time": str(start), "project_ids": "nope"})
    assert all(b["results"] == [] for b in page["data"])

    page = await get(base, costs, {"start_time": str(start), "group_by": "project_id"})
    assert summed(page, "project_id", value=cost) == {("web",): 0.04 + 0.1, ("batch",): 0.03,
                                                      **({(None,): 0.5} if old_record else {})}
    page = await get(base, costs, {"start_time": str(start), "group_by": "project_id,line_item", "project_ids": "web"})
    assert summed(page, "project_id", "line_item", value=cost) == {("web", "qwen-image-placeholder"): 0.04,
                                                                   ("web", "pricier"): 0.1}
    page = await get(base, costs, {"start_time": str(start), "project_ids": "batch"})
    assert summed(page, "project_id", value=cost) == {(None,): 0.03}
    # Split by route (the per-call query) keeps the project too.
    page = await get(base, costs, {"start_time": str(start), "group_by": "project_id,route"})
    assert summed(page, "project_id", "route", value=cost) == {
        ("web", "placeholder"): 0.14, ("batch", "placeholder"): 0.03,
        **({(None, "placeholder"): 0.5} if old_record else {})}


async def test_cost_per_project_from_a_running_serve_on_an_old_sqlite_ledger(tmp_path):
    """`serve` opens a ledger the previous version wrote (no project columns): it gains them, its old
    record reads null, the new ones carry their key's project and user; the API and the CLI group by them."""
    ledger = tmp_path / "usage.sqlite3"
    db = sqlite3.connect(ledger)
    for statement in V1_CREATE:
        db.execute(statement)
    start = int(time.time()) - 60
    db.execute(V1_INSERT.format(m=", ".join("?" * 23)), v1_record(start + 30))
    db.commit()
    db.close()

    port = free_port()
    cfg = projects_config(tmp_path)
    cfg["server"]["port"] = port
    proc, path = serve(cfg, tmp_path)
    try:
        await wait_listening(port, proc)
        base = f"http://127.0.0.1:{port}"
        await make_images(f"{base}/v1")
        await check_projects(base, start, old_record=True)
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read().decode() if proc.stdout else ""
    assert "Traceback" not in log and "usage ledger" not in log, log

    db = sqlite3.connect(ledger)
    rows = db.execute("SELECT key, project_id, user_id, images_delivered FROM qip_usage ORDER BY ts").fetchall()
    db.close()
    assert rows == [("alice", None, None, 3), ("alice", "web", "ann", 2), ("alice", "web", "ann", 2),
                    ("carol", "web", None, 1), ("bob", "batch", "bert", 3)]

    # The CLI, on the same file, groups by project too (null prints as None, as other empty groups do).
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "proxy", "usage", "--config", str(path),
                                                   "--since", "1d", "--group-by", "project_id,user_id"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:5] == ["start", "project_id", "user_id", "requests", "images"]
    images: dict = defaultdict(int)
    for line in lines[1:]:  # a run just after midnight UTC has two days
        _, project, user, _, n, *_ = line.split()
        images[project, user] += int(n)
    assert images == {("web", "ann"): 4, ("web", "None"): 1, ("batch", "bert"): 3, ("None", "None"): 3}


async def test_cost_per_project_on_an_old_postgres_ledger(start_proxy, tmp_path, postgres_server):  # noqa: F811
    """The same on a PostgreSQL ledger the previous version made, with a second proxy starting on it (the
    columns are there: nothing to add), and a background job recorded under its key's project."""
    psycopg = pytest.importorskip("psycopg")
    start = int(time.time()) - 60
    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as conn:
        for statement in V1_CREATE:
            await conn.execute(statement)
        await conn.execute(V1_INSERT.format(m=", ".join(["%s"] * 23)), v1_record(start + 30))

    cfg = projects_config(tmp_path)
    cfg["usage"] = {"database_url": postgres_server.url, "flush_seconds": 0.05}
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, _ = await start_proxy(cfg)
    second, _ = await start_proxy(copy.deepcopy(cfg) | {"jobs": {"path": str(tmp_path / "jobs2.sqlite3")}})
    base = str(server.make_url("")).rstrip("/")
    await make_images(f"{base}/v1")
    await check_projects(base, start, old_record=True)
    # ...and the second proxy reads the same sums from the shared ledger.
    await check_projects(str(second.make_url("")).rstrip("/"), start, old_record=True)

    bob = AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-bob-0000000000", max_retries=0, timeout=60)
    try:
        raw = await bob.images.with_raw_response.generate(model="qwen-image-placeholder", prompt="a job", n=2,
                                                          size="1024x1024", extra_body={"background": True})
        assert raw.http_response.status_code == 202
        job = raw.http_response.json()
        done = await wait_done(server, job["id"], key="sk-bob-0000000000")
        assert done["status"] == "completed", done
    finally:
        await bob.close()
    page = await get(base, "/v1/organization/usage/images", {"start_time": str(start), "group_by": "project_id"})
    assert summed(page, "project_id") == {("web",): 5, ("batch",): 3 + 2, (None,): 3}


async def test_proxies_starting_at_once_upgrade_an_old_postgres_ledger(tmp_path, postgres_server, caplog):  # noqa: F811
    """A rolling deploy: proxies of this version start together on a ledger the previous one made. Each
    used to hold the table (CREATE INDEX) while waiting for another's to ALTER it: PostgreSQL broke the
    deadlock by failing one ("usage ledger: PostgreSQL is not reachable at start-up (DeadlockDetected)")."""
    psycopg = pytest.importorskip("psycopg")
    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as conn:
        for statement in V1_CREATE:
            await conn.execute(statement)
    ledgers = [PostgresLedger(postgres_server.url) for _ in range(4)]  # each proxy's, as `serve` starts it
    try:
        with caplog.at_level("WARNING", logger="proxy.usage"):
            await asyncio.gather(*(ledger.start() for ledger in ledgers))
        assert not [r.getMessage() for r in caplog.records if r.name == "proxy.usage"]
        record = build_record(Meter(), ts=time.time(), request_id="r1", key="alice", model="m", path="/v1/x",
                              status=200, outcome="ok", seconds=0.1, project="web", user="ann")
        await ledgers[-1].write([record])
        assert [(r.project_id, r.user_id) for r in await ledgers[0].query(0, time.time() + 1)] == [("web", "ann")]
    finally:
        for ledger in ledgers:
            await ledger.close()


def test_project_and_user_in_the_keys_config():
    keys = parse_config({"server": {"api_keys": copy.deepcopy(KEYS) + ["sk-plain-00000000"]},
                         "providers": {"placeholder": {"kind": "placeholder"}},
                         "models": {"m": {"routes": ["placeholder"]}}}, env={}).server.keys
    assert [(k.name, k.project, k.user) for k in keys] == [
        ("alice", "web", "ann"), ("carol", "web", None), ("bob", "batch", "bert"), ("ops", None, None),
        ("key-5", None, None)]
    for entry, words in [({"key": "sk-x-0000000000", "project": "web app"}, "project is 1-64 letters"),
                         ({"key": "sk-x-0000000000", "user": ""}, "user is 1-64 letters"),
                         ({"key": "sk-x-0000000000", "project": "sk-x-0000000000"}, "must not be the key itself")]:
        with pytest.raises(ConfigError) as e:
            parse_config({"server": {"api_keys": [entry]}, "providers": {"placeholder": {"kind": "placeholder"}},
                          "models": {"m": {"routes": ["placeholder"]}}}, env={})
        assert words in str(e.value) and ("sk-x-0000000000" not in str(e.value)), str(e.value)
