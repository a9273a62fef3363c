"""The Redis state against a real redis-server: idempotency records shared by two proxies, per-key limits
counted across processes, and a Redis that goes away (a quick 503, never a hang)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest

from proxy.errors import RateLimited
from proxy.routing.policy import ConcurrencyLimited
from proxy.state.factory import make_state
from proxy.state.shared import Answer, StateUnavailable
from proxy.state.shared_redis import RedisState

from .fake_openai_upstream import FakeOpenAIUpstream
from .services import redis_server  # noqa: F401
from .test_idempotency import BODY, MODEL, CountingPlaceholder, edit_config, post


@pytest.fixture
async def states(redis_server):  # noqa: F811
    """Two RedisStates on one server: two processes, as far as Redis can tell."""
    made = [RedisState(redis_server.url, prefix="t:", socket_timeout=0.5, lease=60) for _ in range(2)]
    for state in made:
        await state.start()
    yield made
    for state in made:
        await state.close()


# ---- records ------------------------------------------------------------------------------------------


async def test_records_claim_finish_and_replay_across_processes(states):
    a, b = states
    assert await a.records.claim("k", "fp", "owner-a", ttl=30) is None
    running = await b.records.claim("k", "fp", "owner-b", ttl=30)
    assert running is not None and running.fingerprint == "fp" and not running.done
    # Only the owner may finish it.
    await b.records.finish("k", "fp", "owner-b", Answer(200, b"wrong"), ttl=30)
    assert not (await b.records.claim("k", "fp", "owner-b", ttl=30)).done
    body = json.dumps({"data": [{"b64_json": "x" * 100_000}]}).encode()
    await a.records.finish("k", "fp", "owner-a", Answer(200, body, {"x-qip-route": "r"}), ttl=30)
    record = await b.records.claim("k", "fp", "owner-b", ttl=30)
    assert record.done and record.answer.body == body and record.answer.headers == {"x-qip-route": "r"}
    # Kept for the idempotency TTL, in Redis.
    ttl_ms = await a.client.pttl("t:idem:k")
    assert 25_000 < ttl_ms <= 30_000


async def test_a_released_claim_can_be_taken_again_and_an_abandoned_one_expires(states):
    a, b = states
    await a.records.claim("r", "fp", "owner-a", ttl=30)
    await b.records.release("r", "fp", "owner-b")  # not its own: nothing happens
    assert await b.records.claim("r", "fp", "owner-b", ttl=30) is not None
    await a.records.release("r", "fp", "owner-a")
    assert await b.records.claim("r", "fp", "owner-b", ttl=30) is None
    # A process that died holding a claim: it frees itself when the claim expires.
    await a.records.claim("dead", "fp", "owner-a", ttl=0.2)
    await asyncio.sleep(0.3)
    assert await b.records.claim("dead", "fp", "owner-b", ttl=30) is None


async def test_wait_polls_until_another_process_finishes(states):
    a, b = states
    await a.records.claim("w", "fp", "owner-a", ttl=30)

    async def finish_later():
        await asyncio.sleep(0.3)
        await a.records.finish("w", "fp", "owner-a", Answer(200, b"done"), ttl=30)

    task = asyncio.ensure_future(finish_later())
    started = time.monotonic()
    record = await b.records.wait("w", asyncio.get_running_loop().time() + 30)
    assert record.done and record.answer.body == b"done"
    assert 0.25 < time.monotonic() - started < 15  # when it finished, not at the 30 s deadline
    await task
    # Deadline: the running record comes back.
    await a.records.claim("w2", "fp", "owner-a", ttl=30)
    record = await b.records.wait("w2", asyncio.get_running_loop().time() + 0.2)
    assert record is not None and not record.done


# ---- limits -------------------------------------------------------------------------------------------


async def test_rpm_is_counted_across_processes(states):
    a, b = states
    for state in (a, b, a):
        await state.limits.acquire("key-1", rpm=3, concurrency=None)
    with pytest.raises(RateLimited) as info:
        await b.limits.acquire("key-1", rpm=3, concurrency=None)
    assert 15 < info.value.retry_after <= 20.5  # one token comes back every 60/3 s
    assert info.value.headers["Retry-After"]
    # Another key has its own count.
    await a.limits.acquire("key-2", rpm=3, concurrency=None)


async def test_concurrency_slots_are_shared_released_and_leased(states):
    a, b = states
    one = await a.limits.acquire("c", rpm=None, concurrency=2)
    await b.limits.acquire("c", rpm=None, concurrency=2)
    with pytest.raises(ConcurrencyLimited):
        await a.limits.acquire("c", rpm=None, concurrency=2)
    await one.release()
    await one.release()  # idempotent: frees one slot only
    third = await b.limits.acquire("c", rpm=None, concurrency=2)
    with pytest.raises(ConcurrencyLimited):
        await a.limits.acquire("c", rpm=None, concurrency=2)
    await third.release()
    # A slot whose holder died frees itself when its lease ends.
    a.limits.lease = 0.2
    await a.limits.acquire("d", rpm=None, concurrency=1)
    with pytest.raises(ConcurrencyLimited):
        await b.limits.acquire("d", rpm=None, concurrency=1)
    await asyncio.sleep(0.3)
    await b.limits.acquire("d", rpm=None, concurrency=1)


async def test_a_refused_request_counts_against_nothing(states):
    a, _ = states
    lease = await a.limits.acquire("e", rpm=2, concurrency=1)
    with pytest.raises(ConcurrencyLimited):
        await a.limits.acquire("e", rpm=2, concurrency=1)  # refused: no token spent
    await lease.release()
    await a.limits.acquire("e", rpm=2, concurrency=1)
    with pytest.raises(RateLimited):
        await a.limits.acquire("e", rpm=2, concurrency=5)


# ---- Redis going away ---------------------------------------------------------------------------------


async def test_redis_down_or_hung_is_a_quick_state_unavailable(redis_server):  # noqa: F811
    state = RedisState(redis_server.url, socket_timeout=0.5)
    await state.start()
    try:
        await state.limits.acquire("k", rpm=5, concurrency=None)
        redis_server.pause()  # the port is open, nothing answers
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as info:
            await state.records.claim("x", "fp", "o", ttl=5)
        assert time.monotonic() - started < 15  # a hung Redis would hold it for ever
        assert info.value.status == 503 and info.value.code == "state_unavailable"
        assert info.value.headers["Retry-After"]
        redis_server.resume()
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await state.limits.acquire("k", rpm=5, concurrency=1)
        assert time.monotonic() - started < 15  # a hung Redis would hold it for ever
        # Back on the same port: the next call reconnects.
        redis_server.start()
        assert await state.records.claim("x", "fp", "o", ttl=5) is None
    finally:
        await state.close()


def test_config_picks_the_backend(redis_server):  # noqa: F811
    from proxy.config import parse_config

    assert make_state(parse_config({}, env={})).kind == "memory"
    state = make_state(parse_config({"state": {"redis_url": redis_server.url}, "server": {"request_timeout": 100}},
                                    env={}))
    assert state.kind == "redis" and state.limits.lease == 15  # short, renewed while held


# ---- two proxies, one Redis -----------------------------------------------------------------------------


def redis_config(tmp_path, url: str) -> dict:
    return edit_config(tmp_path, redis_url=url, socket_timeout=0.5)


async def test_two_proxies_share_an_idempotency_record(start_proxy, tmp_path, redis_server):  # noqa: F811
    cfg = redis_config(tmp_path, redis_server.url)
    one, two = CountingPlaceholder(delay=0.5), CountingPlaceholder(delay=0.5)
    server_one, _ = await start_proxy(cfg, providers={"placeholder": one})
    server_two, _ = await start_proxy(cfg, providers={"placeholder": two})

    first = asyncio.ensure_future(post(server_one, key="shared-key"))
    await asyncio.sleep(0.15)
    # The second proxy sees the first one's claim, waits for it (polling Redis), and answers the same.
    status, headers, body = await post(server_two, key="shared-key")
    status_first, _, body_first = await first
    assert status == status_first == 200 and body == body_first
    assert headers["Idempotent-Replayed"] == "true"
    assert (one.calls, two.calls) == (1, 0)
    # Later, either proxy replays it; another body is refused by both.
    assert (await post(server_two, key="shared-key"))[2] == body_first
    status, _, err = await post(server_one, {**BODY, "prompt": "else"}, key="shared-key")
    assert status == 422 and b"idempotency_key_mismatch" in err
    assert (one.calls, two.calls) == (1, 0)


async def test_redis_stopped_mid_run_is_a_quick_503(start_proxy, tmp_path, redis_server):  # noqa: F811
    provider = CountingPlaceholder()
    server, _ = await start_proxy(redis_config(tmp_path, redis_server.url), providers={"placeholder": provider})
    assert (await post(server, key="before"))[0] == 200
    redis_server.stop()
    started = time.monotonic()
    status, headers, body = await post(server, key="after")
    assert time.monotonic() - started < 15
    assert status == 503 and headers["Retry-After"]
    error = json.loads(body)["error"]
    assert error["code"] == "state_unavailable" and "Redis" in error["message"]
    assert "127.0.0.1" not in error["message"]
    # A request without a key needs no shared state.
    assert (await post(server))[0] == 200
    # Hung rather than gone: still quick.
    redis_server.start()
    assert (await post(server, key="again"))[0] == 200
    redis_server.pause()
    started = time.monotonic()
    status, _, _ = await post(server, key="hung")
    assert status == 503 and time.monotonic() - started < 15  # hung, not gone: still no hang
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/health")) as r:
        assert r.status == 200


async def test_two_proxies_share_a_keys_rpm_and_concurrency(start_proxy, tmp_path, redis_server):  # noqa: F811
    cfg = redis_config(tmp_path, redis_server.url)
    cfg["server"] = {"api_keys": [{"name": "team", "key": "key-team", "rpm": 3, "concurrency": 1}],
                     "request_timeout": 10}
    server_one, _ = await start_proxy(cfg, providers={"placeholder": CountingPlaceholder(delay=0.4)})
    server_two, _ = await start_proxy(cfg, providers={"placeholder": CountingPlaceholder(delay=0.4)})
    auth = "Bearer key-team"
    # One slot for the key across both proxies: the second concurrent call is refused.
    results = await asyncio.gather(post(server_one, auth=auth), post(server_two, auth=auth))
    assert sorted(status for status, _, _ in results) == [200, 429]
    refused = next(body for status, _, body in results if status == 429)
    assert json.loads(refused)["error"]["code"] == "concurrency_limit_exceeded"
    # Three a minute across both: the two calls above counted one (the refused one nothing).
    assert (await post(server_two, auth=auth))[0] == 200
    assert (await post(server_one, auth=auth))[0] == 200
    status, headers, body = await post(server_two, auth=auth)
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) > 1


# ---- what goes on while Redis is away, what says so, and the way back ------------------------------------


async def probe(server, path: str):
    async with aiohttp.ClientSession() as s, s.get(server.make_url(path)) as r:
        return r.status, (await r.json() if path != "/metrics" else await r.text())


async def until(check, seconds: float):
    """check()'s first truthy answer within `seconds`, polling (no request but the probe's own)."""
    deadline = time.monotonic() + seconds
    while not (found := await check()):
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.1)
    return found


async def test_redis_down_refuses_what_it_cannot_count_and_says_so(
        start_proxy, tmp_path, redis_server, aiohttp_server):  # noqa: F811
    """While Redis is away: image calls (and passthrough calls) of a key with limits get 503 state_unavailable,
    but its model list does not (it spends nothing: listing models is not worth refusing for an rpm that
    cannot be counted); a key without limits is served; /ready stays 200 but says "degraded", as do /health
    and qip_shared_state_up. Redis back: all of it recovers by itself, without a request to notice it."""
    upstream = await FakeOpenAIUpstream(api_key="pt").start(aiohttp_server)
    cfg = redis_config(tmp_path, redis_server.url)
    cfg["server"] = {"api_keys": [{"name": "team", "key": "key-team", "rpm": 100, "concurrency": 2},
                                  {"name": "free", "key": "key-free"}], "request_timeout": 10}
    cfg["passthrough"] = {"base_url": f"{upstream.url}/v1", "api_key": "pt"}
    server, _ = await start_proxy(cfg, providers={"placeholder": CountingPlaceholder()})
    base = str(server.make_url("/v1"))
    team = openai.AsyncOpenAI(base_url=base, api_key="key-team", max_retries=0)
    free = openai.AsyncOpenAI(base_url=base, api_key="key-free", max_retries=0)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    try:
        assert [m.id for m in (await team.models.list()).data][0] == MODEL
        status, ready = await probe(server, "/ready")
        assert status == 200 and ready["status"] == "ready"
        assert ready["shared_state"] == {"backend": "redis", "reachable": True}

        redis_server.stop()
        # Seen without any request: the state checks Redis itself.
        status, ready = await until(lambda: _degraded(server), 10)
        assert status == 200 and ready["shared_state"]["error"] == "ConnectionError"
        assert "127.0.0.1" not in json.dumps(ready)  # the URL (it may hold a password) never shows
        assert (await probe(server, "/health"))[1]["shared_state"]["reachable"] is False
        assert "qip_shared_state_up 0.0" in (await probe(server, "/metrics"))[1]

        # The limited key: no image call, no passthrough call (both spend), but its model list and cards.
        with pytest.raises(openai.APIStatusError) as refused:
            await team.images.generate(model=MODEL, prompt="a kite", size="64x64")
        assert refused.value.status_code == 503 and refused.value.response.headers["Retry-After"]
        assert refused.value.body["code"] == "state_unavailable"
        with pytest.raises(openai.APIStatusError) as refused:
            await team.chat.completions.create(**chat)
        assert refused.value.status_code == 503 and refused.value.body["code"] == "state_unavailable"
        assert MODEL in [m.id for m in (await team.models.list()).data]
        assert (await team.models.retrieve(MODEL)).id == MODEL
        # The key without limits needs no shared state.
        assert len((await free.images.generate(model=MODEL, prompt="a kite", size="64x64")).data) == 1
        assert (await free.chat.completions.create(**chat)).choices[0].message.content == "echo: hi"
        # Background jobs live in that Redis too (docs/scaling-out.md's table): whatever the key, a submit and
        # every /v1/images/jobs call are 503 job_store_unavailable.
        with pytest.raises(openai.APIStatusError) as refused:
            await free.images.generate(model=MODEL, prompt="a kite", size="64x64", extra_body={"background": True})
        assert refused.value.status_code == 503 and refused.value.body["code"] == "job_store_unavailable"
        headers = {"Authorization": "Bearer key-free"}
        async with aiohttp.ClientSession(headers=headers) as s:
            job = "/v1/images/jobs/imgjob_" + "0" * 24
            for method, path in (("GET", "/v1/images/jobs"), ("GET", job), ("POST", f"{job}/cancel"),
                                 ("DELETE", job)):
                async with s.request(method, server.make_url(path)) as r:
                    assert (r.status, (await r.json())["error"]["code"]) == (503, "job_store_unavailable"), path

        redis_server.start()
        started = time.monotonic()
        status, ready = await until(lambda: _ready(server), 10)
        assert time.monotonic() - started < 5  # within about a second, no restart, no request needed
        assert ready["shared_state"] == {"backend": "redis", "reachable": True}
        assert "qip_shared_state_up 1.0" in (await probe(server, "/metrics"))[1]
        assert len((await team.images.generate(model=MODEL, prompt="a kite", size="64x64")).data) == 1
        assert (await team.chat.completions.create(**chat)).choices[0].message.content == "echo: hi"
    finally:
        await team.close()
        await free.close()


async def _degraded(server):
    status, ready = await probe(server, "/ready")
    return (status, ready) if ready["status"] == "degraded" else None


async def _ready(server):
    status, ready = await probe(server, "/ready")
    return (status, ready) if ready["status"] == "ready" else None


async def test_a_proxy_started_while_redis_is_down_serves_limited_keys_once_it_is_up(start_proxy, tmp_path,
                                                                                     redis_server):  # noqa: F811
    redis_server.stop()
    cfg = redis_config(tmp_path, redis_server.url)
    cfg["server"] = {"api_keys": [{"name": "team", "key": "key-team", "rpm": 100}], "request_timeout": 10}
    server, _ = await start_proxy(cfg, providers={"placeholder": CountingPlaceholder()})
    status, ready = await probe(server, "/ready")
    assert status == 200 and ready["status"] == "degraded"
    assert (await post(server, auth="Bearer key-team"))[0] == 503
    redis_server.start()
    await until(lambda: _ready(server), 5)
    assert (await post(server, auth="Bearer key-team"))[0] == 200


async def test_a_redis_that_answers_with_an_error_is_not_reported_down(states):
    """Out of memory (noeviction) is a 503 for the call, but Redis answers: /ready must not say it is away
    (a PING would say it is back a second later, and the log would flap)."""
    state = states[0]
    await state.client.config_set("maxmemory", "1")
    try:
        with pytest.raises(StateUnavailable):
            await state.records.claim("oom", "fp", "owner", 10)
        assert state.reachable and state.health() == {"backend": "redis", "reachable": True}
    finally:
        await state.client.config_set("maxmemory", "0")
