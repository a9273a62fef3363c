"""The shared state on a real Redis Cluster (three masters, state.redis_cluster: true): per-key limits,
Idempotency-Keys, budgets, the seeded cache and background jobs shared by two proxies, as on one Redis.
Every script and multi-key command of one step names keys in one slot (a hash tag), or the cluster would
refuse it (CROSSSLOT); on one node the key names stay what they were, so an upgrade renames nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter

import pytest
from openai import APIStatusError, AsyncOpenAI, RateLimitError

from proxy.config import ConfigError, parse_config
from proxy.state.shared import StateUnavailable
from proxy.state.shared_redis import RedisState

from .fake_openai_upstream import FakeOpenAIUpstream
from .services import free_port, redis_cluster, redis_cluster_session, redis_server  # noqa: F401
from .test_idempotency import BODY, CountingPlaceholder, edit_config, post
from .test_jobs_e2e import KEY, MODEL, http, jobs_config, submit, wait_done, with_vendor
from .test_jobs_redis import submit_to_each_in_turn, wait_completed_through_another
from .test_usage_cache import seeded, two_proxies_sharing_a_cache
from .test_usage_e2e import client_for, usage_config


def cluster_state(url: str, **state) -> dict:
    return {"redis_url": url, "redis_cluster": True, "socket_timeout": 1, **state}


def clustered(cfg: dict, url: str, **state) -> dict:
    cfg["state"] = cluster_state(url, **state)
    return cfg


def slot_of(key: str) -> str:
    """The part of a key a cluster hashes: its hash tag, else the whole key."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1:end] if start >= 0 and end > start + 1 else key


async def test_limits_and_idempotency_shared_by_two_proxies_on_a_cluster(start_proxy, tmp_path,
                                                                         redis_cluster):  # noqa: F811
    keys = [{"name": f"team-{i}", "key": f"key-team-{i}", "rpm": 4, "concurrency": 1} for i in range(6)]
    cfg = clustered(edit_config(tmp_path), redis_cluster.url)
    cfg["server"] = {"api_keys": keys, "request_timeout": 10}
    one, two = CountingPlaceholder(delay=0.4), CountingPlaceholder(delay=0.4)
    server_one, _ = await start_proxy(cfg, providers={"placeholder": one})
    server_two, _ = await start_proxy(cfg, providers={"placeholder": two})
    clients = [AsyncOpenAI(base_url=str(s.make_url("/v1")), api_key="key-team-0", max_retries=0, timeout=30)
               for s in (server_one, server_two)]

    async def generate(client, **kwargs):
        try:
            r = await client.images.with_raw_response.generate(model=BODY["model"], prompt="a lighthouse",
                                                               size="64x64", response_format="b64_json", **kwargs)
            return r.status_code, r.headers, r.parse()
        except APIStatusError as e:
            return e.status_code, e.response.headers, e.body

    try:
        # One concurrency slot for the key across both proxies: the second call at once is refused.
        results = await asyncio.gather(*(generate(c) for c in clients))
        assert sorted(r[0] for r in results) == [200, 429]
        assert next(r[2] for r in results if r[0] == 429)["code"] == "concurrency_limit_exceeded"
        # Four a minute across both (the refused call counted nothing, a replay counts like any call).
        first = await generate(clients[1], extra_headers={"Idempotency-Key": "order-1"})
        assert first[0] == 200
        # The same Idempotency-Key through the other proxy: the first answer, nothing generated again.
        calls = one.calls + two.calls
        replay = await generate(clients[0], extra_headers={"Idempotency-Key": "order-1"})
        assert replay[0] == 200 and replay[1]["idempotent-replayed"] == "true"
        assert replay[2].data[0].b64_json == first[2].data[0].b64_json and one.calls + two.calls == calls
        assert (await generate(clients[0]))[0] == 200
        status, headers, error = await generate(clients[1])
        assert status == 429 and error["code"] == "rate_limit_exceeded" and int(headers["retry-after"]) > 1
        # Other keys: their own counts, in their own slots, spread over the cluster's nodes.
        for i in range(1, 6):
            status, _, _ = await post(server_one if i % 2 else server_two, auth=f"Bearer key-team-{i}")
            assert status == 200
    finally:
        for c in clients:
            await c.close()
    nodes = redis_cluster.keys_by_node()
    assert sum(1 for found in nodes.values() if found) >= 2  # the keys really are spread
    limit_keys = [k for found in nodes.values() for k in found if ":rpm:" in k or ":slots:" in k]
    assert "qip:rpm:{team-0}" in limit_keys
    # A key's bucket and its slots: one node each time (one script reads both).
    by_tag: dict[str, set[int]] = {}
    for port, found in nodes.items():
        for k in found:
            by_tag.setdefault(slot_of(k), set()).add(port)
    assert all(len(ports) == 1 for ports in by_tag.values())


async def test_held_slots_and_claims_are_renewed_across_nodes(redis_cluster):  # noqa: F811
    """What running requests hold in several slots (on several nodes) is renewed in one pipeline, and
    outlives its lease while held."""
    from proxy.routing.policy import ConcurrencyLimited

    one, two = (RedisState(redis_cluster.url, socket_timeout=0.5, lease=0.6, cluster=True) for _ in range(2))
    try:
        leases = [await one.limits.acquire(f"key-{i}", rpm=None, concurrency=1) for i in range(6)]
        assert await one.records.claim("order-1", "fp", "owner-a", ttl=30) is None
        await asyncio.sleep(1.5)  # 2.5 leases: only the renewals keep them
        for i in range(6):
            with pytest.raises(ConcurrencyLimited):
                await two.limits.acquire(f"key-{i}", rpm=None, concurrency=1)
        assert not (await two.records.claim("order-1", "fp", "owner-b", ttl=30)).done
        for lease in leases:
            await lease.release()
        await two.limits.acquire("key-0", rpm=None, concurrency=1)
    finally:
        await one.close()
        await two.close()


async def test_budgets_shared_and_seeded_from_the_ledger_on_a_cluster(start_proxy, aiohttp_server, tmp_path,
                                                                      redis_cluster):  # noqa: F811
    """Alice and bob spend before they have budgets; proxies started later with images_per_day: 3 raise
    the cluster's counters from the ledger (several keys, several slots) and enforce them together."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    ledger = str(tmp_path / "usage.sqlite3")
    cfg = clustered(usage_config(tmp_path / "before", vendor.url), redis_cluster.url)
    cfg["usage"]["path"] = ledger
    before, _ = await start_proxy(cfg)
    alice, bob = client_for(before, "sk-alice-0000000000"), client_for(before, "sk-bob-0000000000")
    await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024", n=2)
    await bob.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
    await alice.close()
    await bob.close()
    await before.close()  # the ledger written

    servers = []
    for i in range(2):
        cfg = clustered(usage_config(tmp_path / f"p{i}", vendor.url), redis_cluster.url)
        cfg["usage"]["path"] = ledger
        for key in cfg["server"]["api_keys"][:2]:
            key["budget"] = {"images_per_day": 3}
        server, _ = await start_proxy(cfg)
        servers.append(server)
    clients = {name: [client_for(s, f"sk-{name}-0000000000") for s in servers] for name in ("alice", "bob")}

    async def one(client) -> int:
        try:
            r = await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
            return len(r.data)
        except RateLimitError as e:
            assert e.body["code"] == "insufficient_quota" and "images_per_day" in e.body["message"]
            return 0

    try:
        assert [await one(clients["alice"][i % 2]) for i in range(3)] == [1, 0, 0]  # 2 spent before
        burst = await asyncio.gather(*(one(clients["bob"][i % 2]) for i in range(6)))  # 1 spent before
        assert sorted(burst) == [0] * 4 + [1] * 2
    finally:
        for c in clients["alice"] + clients["bob"]:
            await c.close()


async def test_seeded_cache_shared_on_a_cluster(start_proxy, aiohttp_server, tmp_path, redis_cluster):  # noqa: F811
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    a, b = await two_proxies_sharing_a_cache(start_proxy, tmp_path, vendor.url, cluster_state(redis_cluster.url),
                                             max_mb=1)
    try:
        first = await seeded(a, seed=11)
        calls = len(vendor.image_calls)
        second = await seeded(b, seed=11)
        assert second.headers["x-qip-cache"] == "hit" and len(vendor.image_calls) == calls
        assert [d.b64_json for d in first.parse().data] == [d.b64_json for d in second.parse().data]
    finally:
        await a.close()
        await b.close()


async def test_background_jobs_shared_by_two_proxies_on_a_cluster(start_proxy, tmp_path, aiohttp_server,
                                                                   redis_cluster):  # noqa: F811
    fake = await FakeOpenAIUpstream(delay=0.05).start(aiohttp_server)
    proxies = []
    for name in ("a", "b"):
        cfg = clustered(with_vendor(jobs_config(tmp_path / name, workers=2), fake), redis_cluster.url)
        cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 12}
        proxies.append(await start_proxy(cfg))
    ids = await submit_to_each_in_turn(proxies, 12)
    await wait_completed_through_another(proxies, ids)
    assert Counter(r.json["prompt"] for r in fake.requests) == Counter({f"p{i}": 1 for i in range(12)})
    # The budget is spent (12 images): one more is refused by either proxy, jobs and calls alike.
    with pytest.raises(RateLimitError) as info:
        await submit(proxies[1][1], model="vendor-image")
    assert info.value.body["code"] == "insufficient_quota"
    status, _, page = await http(proxies[1][0], "GET", "/v1/images/jobs?limit=5")
    assert status == 200 and [j["id"] for j in page["data"]] == ids[::-1][:5] and page["has_more"]
    status, _, deleted = await http(proxies[0][0], "DELETE", f"/v1/images/jobs/{ids[0]}")
    assert status == 200 and deleted["deleted"]
    assert (await http(proxies[1][0], "GET", f"/v1/images/jobs/{ids[0]}"))[0] == 404
    # A queued job cancelled through the other proxy never runs.
    slow = await FakeOpenAIUpstream(delay=60).start(aiohttp_server)
    cfg = clustered(with_vendor(jobs_config(tmp_path / "c", workers=1), slow), redis_cluster.url)
    for server, _ in proxies:
        await server.close()
    server, client = await start_proxy(cfg)
    _, _, running = await submit(client, model="vendor-image", prompt="slow")
    _, _, queued = await submit(client, model="vendor-image", prompt="queued")
    status, _, cancelled = await http(server, "POST", f"/v1/images/jobs/{queued['id']}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled"
    status, _, cancelled = await http(server, "POST", f"/v1/images/jobs/{running['id']}/cancel")
    assert status == 200
    assert (await wait_done(server, running["id"]))["status"] == "cancelled"
    assert [r.json["prompt"] for r in slow.requests] == ["slow"]
    # Every job key in one slot (the jobs' scripts touch the queue, the job and its owner's sets at once).
    job_keys = [k for found in redis_cluster.keys_by_node().values() for k in found if ":{jobs}:" in k]
    assert job_keys and {slot_of(k) for k in job_keys} == {"jobs"}


async def test_a_plain_client_on_a_cluster_says_what_to_set(start_proxy, tmp_path, redis_cluster, caplog):  # noqa: F811
    """state.redis_cluster left out on a cluster: the log says what to set, and a request that needs the
    state is a 503 state_unavailable, not a 500."""
    cfg = edit_config(tmp_path, redis_url=redis_cluster.url, socket_timeout=1)
    cfg["server"] = {"api_keys": [{"name": "team", "key": "key-team", "rpm": 3}], "request_timeout": 10}
    with caplog.at_level(logging.WARNING):
        server, _ = await start_proxy(cfg, providers={"placeholder": CountingPlaceholder()})
    assert "set state.redis_cluster: true" in caplog.text
    status, _, body = await post(server, auth="Bearer key-team", key="k")
    assert status == 503 and json.loads(body)["error"]["code"] == "state_unavailable"


async def test_a_cluster_client_on_one_redis_says_what_to_set(start_proxy, tmp_path, aiohttp_server,
                                                              redis_server, caplog):  # noqa: F811
    """state.redis_cluster: true on a Redis that is no cluster: the cluster client refuses it, so every call
    fails. The log used to say only "Redis is not reachable yet" (of a Redis that answers): it says what
    to set, for the shared state and for the jobs."""
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = clustered(with_vendor(jobs_config(tmp_path), fake), redis_server.url)
    cfg["server"]["api_keys"][0]["rpm"] = 5
    with caplog.at_level(logging.WARNING):
        server, _ = await start_proxy(cfg)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sorted(m.split(":")[0] for m in errors if "set state.redis_cluster: false" in m) == ["jobs", "shared state"]
    assert "not reachable" not in caplog.text
    status, _, body = await http(server, "POST", "/v1/images/generations",
                                 json={"model": MODEL, "prompt": "x", "size": "64x64"}, key=KEY)
    assert status == 503 and body["error"]["code"] == "state_unavailable"


async def test_a_cluster_that_cannot_be_reached_is_a_quick_503(start_proxy, tmp_path, aiohttp_server):
    port = free_port()  # nothing listens there
    state = RedisState(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5, cluster=True)
    await state.start()
    try:
        with pytest.raises(StateUnavailable):
            await state.limits.acquire("k", rpm=5, concurrency=1)
    finally:
        await state.close()
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = clustered(with_vendor(jobs_config(tmp_path), fake), f"redis://user:s3cret@127.0.0.1:{port}/0",
                    socket_timeout=0.5)
    cfg["server"]["api_keys"][0]["rpm"] = 5
    server, client = await start_proxy(cfg)
    started = time.monotonic()
    status, _, body = await http(server, "POST", "/v1/images/generations",
                                 json={"model": MODEL, "prompt": "x", "size": "64x64"}, key=KEY)
    assert status == 503 and body["error"]["code"] == "state_unavailable" and "s3cret" not in json.dumps(body)
    # bob has no limits (they would answer first): the job store's own 503.
    status, _, body = await http(server, "GET", "/v1/images/jobs/imgjob_000000000000000000000000",
                                 key="other-key")
    assert status == 503 and body["error"]["code"] == "job_store_unavailable"
    assert time.monotonic() - started < 15


@pytest.mark.parametrize(("state", "message"), [
    ({"redis_cluster": True}, "needs state.redis_url"),
    ({"redis_cluster": True, "redis_url": "unix:///run/redis.sock"}, "not a unix socket"),
    ({"redis_cluster": True, "redis_url": "redis://127.0.0.1:7000/2"}, "only database 0"),
    ({"redis_cluster": True, "redis_url": "redis://127.0.0.1:7000", "key_prefix": "{qip}:"}, "{ or }"),
])
def test_cluster_settings_that_cannot_work_are_refused(state, message):
    with pytest.raises(ConfigError) as info:
        parse_config({"state": state}, env={})
    assert message in str(info.value)


async def test_one_node_keeps_its_key_names(start_proxy, tmp_path, aiohttp_server, redis_server):  # noqa: F811
    """Without redis_cluster the keys are named as before hash tags existed: an upgrade finds the queued
    jobs, running budgets and limits a live Redis holds (and old and new proxies share them)."""
    import redis.asyncio

    fake = await FakeOpenAIUpstream(delay=0.05).start(aiohttp_server)
    cfg = with_vendor(jobs_config(tmp_path), fake)
    cfg["state"] = {"redis_url": redis_server.url}
    cfg["server"]["api_keys"][0].update(rpm=10, concurrency=2, budget={"images_per_day": 10})
    server, client = await start_proxy(cfg)
    await client.images.generate(model="vendor-image", prompt="now", size="64x64")
    _, _, job = await submit(client, model="vendor-image", prompt="later")
    assert (await wait_done(server, job["id"]))["status"] == "completed"
    plain = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        names = sorted(k.decode() for k in await plain.keys("*"))
    finally:
        await plain.aclose()
    assert not any("{" in k for k in names)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert {"qip:rpm:alice", f"qip:budget:alice:{day}:img", "qip:jobs:seq", f"qip:jobs:job:{job['id']}"} <= set(names)
