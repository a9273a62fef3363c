"""Jobs shared by several proxies on one real Redis (redis-server on a free loopback port): each job runs
exactly once, whichever proxy took it in, and a job whose proxy died is taken over by another."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest
from openai import RateLimitError

from proxy.app import GATEWAY
from proxy.jobs.model import QUEUED, Job, new_job_id, request_to_bytes
from proxy.jobs.redis_store import RedisJobStore
from proxy.jobs.sqlite_store import SqliteJobStore
from proxy.request import ImageRequest

from .fake_openai_upstream import FakeOpenAIUpstream
from .services import redis_server  # noqa: F401
from .test_jobs_e2e import KEY, MODEL, client_scope_of, http, jobs_config, submit, wait_done, with_vendor
from .webhook_receiver import Receiver


def redis_jobs_config(tmp_path, redis_url: str, fake, **jobs) -> dict:
    cfg = with_vendor(jobs_config(tmp_path, **jobs), fake)
    cfg["state"] = {"redis_url": redis_url}
    return cfg


async def submit_to_each_in_turn(proxies, count: int, **fields) -> list[str]:
    """`count` jobs of vendor-image (prompts p0, p1, ...) submitted to the proxies in turn; their ids."""
    ids = []
    for i in range(count):
        status, _, job = await submit(proxies[i % len(proxies)][1], model="vendor-image", prompt=f"p{i}", **fields)
        assert status == 202
        ids.append(job["id"])
    return ids


async def wait_completed_through_another(proxies, ids: list[str]) -> None:
    """Each job (submitted by submit_to_each_in_turn) completes, read through a proxy that did not take it in."""
    for i, job_id in enumerate(ids):
        done = await wait_done(proxies[(i + 1) % len(proxies)][0], job_id)
        assert done["status"] == "completed", done["error"]


async def test_two_proxies_run_each_of_30_jobs_once(start_proxy, tmp_path, aiohttp_server, redis_server):  # noqa: F811
    fake = await FakeOpenAIUpstream(delay=0.05).start(aiohttp_server)
    receiver = await Receiver().start(aiohttp_server)
    proxies = [await start_proxy(redis_jobs_config(tmp_path / name, redis_server.url, fake, workers=3))
               for name in ("a", "b")]
    ids = await submit_to_each_in_turn(proxies, 30, webhook_url=receiver.url)
    await wait_completed_through_another(proxies, ids)
    prompts = Counter(r.json["prompt"] for r in fake.requests)
    assert prompts == Counter({f"p{i}": 1 for i in range(30)})  # each run exactly once
    arrivals = await receiver.wait_for(30)
    await asyncio.sleep(0.5)
    assert len(receiver.arrivals) == 30 and len({a.job_id for a in arrivals}) == 30
    assert all(a.verified for a in arrivals)
    # Both proxies list the same 30 jobs.
    for server, _ in proxies:
        status, _, page = await http(server, "GET", "/v1/images/jobs?limit=100")
        assert status == 200 and sorted(j["id"] for j in page["data"]) == sorted(ids)
    _, _, other = await http(proxies[0][0], "GET", f"/v1/images/jobs/{ids[0]}", key="other-key")
    assert other["error"]["code"] == "job_not_found"


async def test_a_dead_proxys_job_is_taken_over(start_proxy, tmp_path, aiohttp_server, redis_server):  # noqa: F811
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = redis_jobs_config(tmp_path, redis_server.url, fake, lease_seconds=1)
    dead = RedisJobStore(redis_server.url, prefix="qip:jobs:")
    job = Job(id=new_job_id(), owner=client_scope_of(KEY), key_name="alice", model=MODEL, kind="generation",
              request={"response_format": "url"}, rerun_safe=True)
    assert await dead.create(job, request_to_bytes(ImageRequest(prompt="p", model=MODEL, width=64, height=64,
                                                                seed=1)), 10)
    claimed = await dead.claim("dead-proxy", lease=0.01)
    claimed.runs = 1
    assert await dead.save(claimed, "dead-proxy")
    await dead.close()
    server, _ = await start_proxy(cfg)
    done = await wait_done(server, job.id)
    assert done["status"] == "completed" and done["result"]["data"][0]["url"]


async def test_cancel_through_another_proxy_stops_the_running_job(start_proxy, tmp_path, aiohttp_server,
                                                                  redis_server):  # noqa: F811
    fake = await FakeOpenAIUpstream(delay=60).start(aiohttp_server)
    a = await start_proxy(redis_jobs_config(tmp_path / "a", redis_server.url, fake, lease_seconds=0.6))
    b = await start_proxy(redis_jobs_config(tmp_path / "b", redis_server.url, fake, lease_seconds=0.6))
    status, _, job = await submit(a[1], model="vendor-image")
    async with asyncio.timeout(30):
        while fake.in_flight == 0:
            await asyncio.sleep(0.02)
    # Asked through the proxy that does not run it: the holder sees the request at its next renewal.
    holder, other = (a, b) if job["id"] in a[0].app[GATEWAY].jobs.running else (b, a)
    assert job["id"] in holder[0].app[GATEWAY].jobs.running
    status, _, _ = await http(other[0], "POST", f"/v1/images/jobs/{job['id']}/cancel")
    assert status == 200
    done = await wait_done(other[0], job["id"])
    assert done["status"] == "cancelled"
    async with asyncio.timeout(30):
        while fake.in_flight:
            await asyncio.sleep(0.02)


async def test_two_proxies_hold_a_keys_budget_for_jobs_together(start_proxy, tmp_path, aiohttp_server,
                                                                redis_server):  # noqa: F811
    """images_per_day: 3 in Redis: jobs submitted to either proxy (and run by either) count once each; the
    4th submit is refused whichever proxy gets it, and a synchronous call shares the budget."""
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    proxies = []
    for name in ("a", "b"):
        cfg = redis_jobs_config(tmp_path / name, redis_server.url, fake)
        cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 3}
        proxies.append(await start_proxy(cfg))
    await wait_completed_through_another(proxies, await submit_to_each_in_turn(proxies, 3))
    for server, client in proxies:
        with pytest.raises(RateLimitError) as info:
            await submit(client, model="vendor-image")
        assert info.value.body["code"] == "insufficient_quota"
        status, _, error = await http(server, "POST", "/v1/images/generations",
                                      json={"model": MODEL, "prompt": "x", "size": "64x64"})
        assert status == 429 and error["error"]["code"] == "insufficient_quota"
    assert len(fake.requests) == 3


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_claim_passes_over_owners_with_no_free_slot_and_a_job_put_back_keeps_its_place(
        kind, tmp_path, redis_server):  # noqa: F811
    store = (SqliteJobStore(tmp_path / "jobs.sqlite3") if kind == "sqlite"
             else RedisJobStore(redis_server.url, prefix=f"qip:skip-{tmp_path.name}:"))
    await store.start()
    try:
        jobs = [Job(id=new_job_id(), owner=owner, key_name=owner, model=MODEL, kind="generation", request={})
                for owner in ("busy", "busy", "free")]
        for job in jobs:
            assert await store.create(job, request_to_bytes(ImageRequest(prompt="p", model=MODEL, width=64,
                                                                         height=64)), 10)
        taken = await store.claim("w", 30, frozenset({"busy"}))
        assert taken is not None and taken.id == jobs[2].id  # the oldest job of an owner with a free slot
        assert await store.claim("w", 30, frozenset({"busy", "free"})) is None
        first = await store.claim("w", 30)
        assert first is not None and first.id == jobs[0].id
        first.status = QUEUED
        assert await store.save(first, "w", release=True)  # back to the queue: no slot for it after all
        again = await store.claim("w", 30)
        assert again is not None and again.id == jobs[0].id  # in its place, ahead of the later one
    finally:
        await store.close()


async def test_redis_away_is_logged_once_then_back_once(start_proxy, tmp_path, aiohttp_server, redis_server,  # noqa: F811
                                                        caplog):
    """The claim loop, the lease keeper and the webhook sender each logged every failed Redis call: ~20
    warnings a second for as long as Redis was away."""
    caplog.set_level(logging.INFO, logger="proxy.jobs")
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(redis_jobs_config(tmp_path, redis_server.url, fake))
    await asyncio.sleep(0.3)
    caplog.clear()
    redis_server.stop()
    await asyncio.sleep(3)
    away = [r.getMessage() for r in caplog.records if r.name == "proxy.jobs"]
    assert 1 <= len(away) <= 3, away  # the store's first failure, and the claim loop's once
    redis_server.start()
    for _ in range(100):
        if any("Redis answers again" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.1)
    assert any("Redis answers again" in r.getMessage() for r in caplog.records)
