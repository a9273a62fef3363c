"""Keys, limits and idempotency against a hostile world: Authorization bytes that are not UTF-8, a Redis that
stalls or fills up mid-request, a long request on a short lease, and url answers replayed after their links
died. Each test here failed before the fix it covers."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from openai import AsyncOpenAI

from proxy.routing.policy import ConcurrencyLimited
from proxy.state import shared_redis as state_redis
from proxy.state.idempotency import Idempotency
from proxy.state.shared import Answer
from proxy.state.shared_redis import RedisState

from .services import redis_server  # noqa: F401
from .test_idempotency import BODY, MODEL, REQ, CountingPlaceholder, edit_config, post, request_with

KEY = "sentinel-hostile-4d2c9e71"
UTF8_KEY = "sentinel-clé-8b1f"


async def raw_post(server, auth: bytes, path: bytes = b"/v1/images/generations", extra: bytes = b"") -> tuple[int, bytes]:
    """One request over a bare socket: no client library would send these header bytes."""
    body = json.dumps({**BODY, "size": "64x64"}).encode()
    reader, writer = await asyncio.open_connection(server.host, server.port)
    method = b"POST" if path.startswith(b"/v1/") else b"GET"
    writer.write(method + b" " + path + b" HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 + b"Authorization: " + auth + b"\r\n" + extra
                 + b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


# ---- Authorization headers ------------------------------------------------------------------------------


async def test_non_utf8_bytes_in_authorization_are_a_401_not_a_500(start_proxy, tmp_path, caplog):
    # Before: UnicodeEncodeError in the key check, a 500 and a logged traceback (with a piece of the key).
    cfg = edit_config(tmp_path)
    cfg["server"] = {"api_keys": [KEY, UTF8_KEY], "metrics_key": "sentinel-metrics-0c4e"}
    server, _ = await start_proxy(cfg)
    for auth in (b"Bearer \xff\xfe", b"Bearer " + KEY.encode() + b"\xff", b"bearer \xc3"):
        status, payload = await raw_post(server, auth)
        assert status == 401, payload
        assert json.loads(payload)["error"]["code"] == "invalid_api_key"
        status, payload = await raw_post(server, auth, path=b"/metrics")
        assert status == 401 and json.loads(payload)["error"]["type"] == "authentication_error"
    # A configured key that is not ASCII still opens the door, sent as its UTF-8 bytes.
    status, payload = await raw_post(server, b"Bearer " + UTF8_KEY.encode())
    assert status == 200, payload
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_non_utf8_authorization_with_an_idempotency_key_and_no_proxy_keys(start_proxy, tmp_path):
    # Without proxy keys the Authorization header is still the idempotency scope. Before: a 500.
    provider = CountingPlaceholder()
    server, _ = await start_proxy(edit_config(tmp_path), providers={"placeholder": provider})
    for _ in range(2):
        status, payload = await raw_post(server, b"Bearer sk-\xff", extra=b"Idempotency-Key: raw-1\r\n")
        assert status == 200, payload
    assert provider.calls == 1  # the repeat was a replay


# ---- Redis that stalls or fills up ------------------------------------------------------------------------


@pytest.fixture
def short_lease(monkeypatch):
    """Leases of 3 s (6 x socket_timeout 0.5 s) rather than 15, so an orphan's expiry shows in a test."""
    monkeypatch.setattr(state_redis, "LEASE_SECONDS", 1.0)


def stalling_config(tmp_path, url: str) -> dict:
    return edit_config(tmp_path, redis_url=url, socket_timeout=0.5)


async def test_a_redis_stall_does_not_leave_a_keys_slot_taken(start_proxy, tmp_path, redis_server,  # noqa: F811
                                                              short_lease):
    # A stall longer than socket_timeout: the proxy answers 503, but Redis runs the queued admission when
    # it wakes. Before: that slot, owned by nobody, was held for request_timeout + 60 s (11 minutes by
    # default), so a key with concurrency 1 got 429 all along.
    cfg = stalling_config(tmp_path, redis_server.url)
    cfg["server"] = {"api_keys": [{"name": "team", "key": KEY, "concurrency": 1}], "request_timeout": 10}
    server, _ = await start_proxy(cfg, providers={"placeholder": CountingPlaceholder()})
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=KEY, max_retries=0, timeout=30)
    try:
        assert (await client.images.generate(model=MODEL, prompt="p", size="64x64")).data[0].url
        redis_server.pause()
        status, headers, body = await post(server, auth=f"Bearer {KEY}")
        assert status == 503 and json.loads(body)["error"]["code"] == "state_unavailable"
        assert headers["Retry-After"]
        redis_server.resume()
        # The orphan slot lapses within its lease: the key gets its slot back (10 s is 3 leases).
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            status, _, body = await post(server, auth=f"Bearer {KEY}")
            if status == 200:
                break
            assert json.loads(body)["error"]["code"] == "concurrency_limit_exceeded"
            assert asyncio.get_running_loop().time() < deadline, "the orphan slot never came back"
            await asyncio.sleep(0.1)
    finally:
        await client.close()


async def test_a_retry_after_a_redis_stall_runs_instead_of_waiting_out_an_orphan_claim(
        start_proxy, tmp_path, redis_server, short_lease):  # noqa: F811
    # The same with an Idempotency-Key: the claim Redis took after the proxy gave up on it belonged to no
    # one. Before: the client's retry with that key waited the whole request_timeout and got a 409, and the
    # key stayed blocked for request_timeout + 60 s.
    provider = CountingPlaceholder()
    server, _ = await start_proxy(stalling_config(tmp_path, redis_server.url), providers={"placeholder": provider})
    redis_server.pause()
    status, _, body = await post(server, key="after-a-stall")
    assert status == 503 and json.loads(body)["error"]["code"] == "state_unavailable"
    redis_server.resume()
    status, headers, body = await post(server, key="after-a-stall")
    assert status == 200, body
    assert "Idempotent-Replayed" not in headers and provider.calls == 1
    status, headers, _ = await post(server, key="after-a-stall")
    assert status == 200 and headers["Idempotent-Replayed"] == "true" and provider.calls == 1


async def test_a_slot_and_a_claim_outlive_their_lease_while_the_request_runs(redis_server):  # noqa: F811
    # Short leases must not cut a long request short: each is renewed while held.
    one = RedisState(redis_server.url, prefix="h:", socket_timeout=0.5, lease=1.5)
    two = RedisState(redis_server.url, prefix="h:", socket_timeout=0.5, lease=1.5)
    try:
        slot = await one.limits.acquire("k", rpm=None, concurrency=1)
        assert await one.records.claim("c", "fp", "owner-1", ttl=600) is None
        for _ in range(6):  # 3.6 s: over two leases
            await asyncio.sleep(0.6)
            with pytest.raises(ConcurrencyLimited):
                await two.limits.acquire("k", rpm=None, concurrency=1)
            assert await two.records.claim("c", "fp", "owner-2", ttl=600) is not None
        await slot.release()
        await one.records.release("c", "fp", "owner-1")
        await (await two.limits.acquire("k", rpm=None, concurrency=1)).release()
        assert await two.records.claim("c", "fp", "owner-2", ttl=600) is None
    finally:
        await one.close()
        await two.close()


async def test_an_answer_redis_cannot_keep_frees_the_key_for_a_retry(redis_server):  # noqa: F811
    # Redis full (maxmemory, noeviction): the claim fits, the 2 MB answer does not. The client gets its
    # images; before, the claim stayed and a retry with the key waited its whole wait and got a 409.
    state = RedisState(redis_server.url, socket_timeout=0.5)
    idem = Idempotency(state.records, ttl=60, wait_timeout=2)
    calls = []

    async def work_that_fills_redis():
        calls.append(1)
        used = int((await state.client.info("memory"))["used_memory"])
        await state.client.config_set("maxmemory", str(used + 256 * 1024))
        return Answer(200, b"x" * (2 * 1024 * 1024))

    async def work():
        calls.append(1)
        return Answer(200, b"small")

    try:
        await state.client.config_set("maxmemory-policy", "noeviction")
        answer, replayed = await idem.run(request_with("full"), REQ, work_that_fills_redis)
        assert len(answer.body) == 2 * 1024 * 1024 and not replayed
        await state.client.config_set("maxmemory", "0")
        answer, replayed = await idem.run(request_with("full"), REQ, work)
        assert answer.body == b"small" and not replayed and len(calls) == 2
    finally:
        await state.client.config_set("maxmemory", "0")
        await state.close()


# ---- url answers outlived by their record -------------------------------------------------------------------


async def test_a_url_answer_is_not_replayed_after_its_links_expired(start_proxy, tmp_path):
    # Before: for idempotency_ttl (24 h) the repeat was the first answer, whose links had answered 404 since
    # store.ttl_seconds (1 h) passed: a 200 with dead links and nothing generated.
    cfg = edit_config(tmp_path)
    cfg["store"]["ttl_seconds"] = 1
    provider = CountingPlaceholder()
    _, client = await start_proxy(cfg, providers={"placeholder": provider})
    kwargs = {"model": MODEL, "prompt": "p", "size": "64x64", "response_format": "url",
              "extra_headers": {"Idempotency-Key": "links"}}
    first = await client.images.generate(**kwargs)
    again = await client.images.generate(**kwargs)
    assert again.data[0].url == first.data[0].url and provider.calls == 1  # replayed while the links live
    await asyncio.sleep(1.5)
    later = await client.images.with_raw_response.generate(**kwargs)
    assert later.headers.get("Idempotent-Replayed") is None and provider.calls == 2
    url = later.parse().data[0].url
    assert url != first.data[0].url
    response = await client._client.get(url)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
