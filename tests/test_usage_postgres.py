"""The usage ledger in a real PostgreSQL server (usage.database_url), stopped mid-run; and budgets shared
by two proxies through Redis."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from openai import RateLimitError

from proxy.app import GATEWAY

from .fake_openai_upstream import FakeOpenAIUpstream
from .services import postgres_server, redis_server  # noqa: F401
from .test_usage_e2e import api, client_for, usage_config

pytest.importorskip("psycopg")


async def ledger_rows(server) -> list:
    usage = server.app[GATEWAY].usage
    return await usage.writer.backend.query(0, time.time() + 10)


async def budget_proxy(start_proxy, aiohttp_server, tmp_path, database_url: str,
                       images_per_day: dict[str, int] | None = None, **usage):
    """A proxy whose keys have budgets counted in PostgreSQL: images_per_day by key name (alice and bob 100
    unless given), `usage` more of the usage section. post(key) -> (status, body) of one generation."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    for name, count in (images_per_day or {"alice": 100, "bob": 100}).items():
        (key,) = [k for k in cfg["server"]["api_keys"] if k["name"] == name]
        key["budget"] = {"images_per_day": count}
    cfg["usage"] = {"database_url": database_url, **usage}
    server, _ = await start_proxy(cfg)
    body = {"model": "qwen-image-placeholder", "prompt": "a fox", "size": "1024x1024"}

    async def post(key: str) -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"), json=body,
                                                        headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()
    return server, post


async def test_postgres_down_mid_run(start_proxy, aiohttp_server, tmp_path, postgres_server):  # noqa: F811
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["usage"] = {"database_url": postgres_server.url, "flush_seconds": 0.05, "write_timeout": 2}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    writer = server.app[GATEWAY].usage.writer
    try:
        for _ in range(2):
            await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        assert await writer.flush()
        assert len(await ledger_rows(server)) == 2

        postgres_server.stop()
        for _ in range(3):  # the database is down: generations go on
            r = await alice.images.with_raw_response.generate(model="qwen-image-placeholder", prompt="a fox",
                                                              size="1024x1024")
            assert r.status_code == 200
        await asyncio.sleep(0.3)  # the writer has tried (and failed) meanwhile
        assert writer.pending == 3

        postgres_server.start()
        deadline = time.monotonic() + 60
        while writer.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert writer.pending == 0
        rows = await ledger_rows(server)
        assert len(rows) == 5 and len({r.id for r in rows}) == 5  # each once
        assert writer.dropped == 0

        status, page = await api(server, "/v1/organization/usage/images",
                                 {"start_time": str(int(time.time()) - 60), "group_by[]": "api_key_id"})
        assert status == 200
        assert [(x["api_key_id"], x["images"]) for x in page["data"][0]["results"]] == [("alice", 5)]
    finally:
        await alice.close()


async def test_a_retried_batch_counts_once(start_proxy, aiohttp_server, tmp_path, postgres_server):  # noqa: F811
    """A batch written twice (its commit was lost on the way back) keeps one copy of each record."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["usage"] = {"database_url": postgres_server.url}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
    await alice.close()
    writer = server.app[GATEWAY].usage.writer
    await writer.flush()
    rows = await ledger_rows(server)
    await writer.backend.write(rows)
    assert len(await ledger_rows(server)) == 1


async def test_queue_bound_drops_and_counts(start_proxy, aiohttp_server, tmp_path, postgres_server):  # noqa: F811
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["usage"] = {"database_url": postgres_server.url, "queue_max": 2, "flush_seconds": 0.05}
    server, _ = await start_proxy(cfg)
    postgres_server.stop()
    alice = client_for(server, "sk-alice-0000000000")
    for _ in range(4):
        await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
    await alice.close()
    status, _ = await api(server, "/v1/organization/costs", {"start_time": "0"})
    assert status == 503
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert "qip_usage_records_dropped_total 2.0" in text


async def test_two_proxies_share_a_budget_through_redis(start_proxy, aiohttp_server, tmp_path, redis_server):  # noqa: F811
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    servers = []
    for i in range(2):
        cfg = usage_config(tmp_path / f"p{i}", vendor.url)
        cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 3}
        cfg["state"] = {"redis_url": redis_server.url}
        server, _ = await start_proxy(cfg)
        servers.append(server)
    clients = [client_for(s, "sk-alice-0000000000") for s in servers]
    try:
        made = 0
        for i in range(3):
            r = await clients[i % 2].images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
            made += len(r.data)
        assert made == 3
        for c in clients:
            with pytest.raises(RateLimitError) as info:
                await c.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
            assert info.value.body["code"] == "insufficient_quota"
    finally:
        for c in clients:
            await c.close()


async def test_two_proxies_share_a_budget_through_postgres(start_proxy, aiohttp_server, tmp_path, postgres_server):  # noqa: F811
    """usage.database_url and no Redis: the running totals live in PostgreSQL, so two proxies enforce
    images_per_day together, one request at a time and in a burst."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    servers = []
    for i in range(2):
        cfg = usage_config(tmp_path / f"p{i}", vendor.url)
        for key in cfg["server"]["api_keys"][:2]:
            key["budget"] = {"images_per_day": 3}
        cfg["usage"] = {"database_url": postgres_server.url}
        server, _ = await start_proxy(cfg)
        servers.append(server)
    alice = [client_for(s, "sk-alice-0000000000") for s in servers]
    bob = [client_for(s, "sk-bob-0000000000") for s in servers]

    async def one(client):
        try:
            r = await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
            return len(r.data)
        except RateLimitError as e:
            assert e.status_code == 429 and e.body["code"] == "insufficient_quota"
            assert "images_per_day" in e.body["message"] and "resets at" in e.body["message"]
            return 0
    try:
        made = [await one(alice[i % 2]) for i in range(3)]
        assert made == [1, 1, 1]
        assert [await one(c) for c in alice] == [0, 0]
        # bob: 8 requests at once from both proxies; the upsert's row locks let exactly 3 through
        burst = await asyncio.gather(*(one(bob[i % 2]) for i in range(8)))
        assert sorted(burst) == [0] * 5 + [1] * 3
    finally:
        for c in alice + bob:
            await c.close()


@pytest.mark.parametrize("counters", ["postgres", "redis"])
async def test_budget_counts_what_was_spent_before_it(start_proxy, aiohttp_server, tmp_path, postgres_server,  # noqa: F811
                                                      counters, request):
    """A key spends 2 images on a proxy without budgets; proxies started later with images_per_day: 3
    count them from the ledger (once, however many start), so 1 more image is left, not 3. The running
    totals in PostgreSQL or in Redis alike."""
    state = {"redis_url": request.getfixturevalue("redis_server").url} if counters == "redis" else None
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path / "before", vendor.url)
    cfg["usage"] = {"database_url": postgres_server.url}
    before, _ = await start_proxy(cfg)
    alice = client_for(before, "sk-alice-0000000000")
    await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024", n=2)
    await alice.close()
    assert await before.app[GATEWAY].usage.writer.flush()

    servers = []
    for i in range(2):
        cfg = usage_config(tmp_path / f"p{i}", vendor.url)
        cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 3}
        cfg["usage"] = {"database_url": postgres_server.url}
        if state:
            cfg["state"] = state
        server, _ = await start_proxy(cfg)
        servers.append(server)
    clients = [client_for(s, "sk-alice-0000000000") for s in servers]
    try:
        r = await clients[1].images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        assert len(r.data) == 1
        for c in clients:
            with pytest.raises(RateLimitError) as info:
                await c.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
            assert info.value.body["code"] == "insufficient_quota"
    finally:
        for c in clients:
            await c.close()


async def test_postgres_budget_counters_down_is_503_not_unchecked(start_proxy, aiohttp_server, tmp_path,
                                                                  postgres_server):  # noqa: F811
    """The counters' database away: a key with a budget gets 503 state_unavailable (never an unchecked
    pass), a key without one is served; once it is back, the budget is checked again."""
    _, post = await budget_proxy(start_proxy, aiohttp_server, tmp_path, postgres_server.url,
                                 images_per_day={"alice": 3}, write_timeout=1)
    assert (await post("sk-alice-0000000000"))[0] == 200
    postgres_server.stop()
    status, answer = await post("sk-alice-0000000000")
    assert status == 503 and answer["error"]["code"] == "state_unavailable"
    assert postgres_server.url not in str(answer)
    assert (await post("sk-bob-0000000000"))[0] == 200
    postgres_server.start()
    async with asyncio.timeout(30):  # for a moment after a failure, checks answer 503 (with Retry-After)
        while (result := await post("sk-alice-0000000000"))[0] == 503:
            assert result[1]["error"]["code"] == "state_unavailable"
            await asyncio.sleep(0.2)
    assert result[0] == 200
    assert (await post("sk-alice-0000000000"))[0] == 200
    status, answer = await post("sk-alice-0000000000")  # 3 images counted across the outage
    assert status == 429 and answer["error"]["code"] == "insufficient_quota"


async def test_a_hanging_budget_database_fails_fast_not_in_turn():
    """A PostgreSQL that accepts connections and never answers (a network that drops replies): checks at
    once wait out one timeout together (not each in turn) and answer 503; the checks after them answer
    503 at once rather than each waiting out the timeout again."""
    pytest.importorskip("psycopg")
    from proxy.state.shared import StateUnavailable
    from proxy.usage.budgets import Hold, periods
    from proxy.usage.postgres_spend import PostgresSpend

    connections = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)  # accepted, never answered
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    spend = PostgresSpend(f"postgresql://postgres@127.0.0.1:{port}/postgres", timeout=1, retry_after=60)
    day, month, _, _ = periods(time.time())
    try:
        for most in (10, 1):  # seconds: one timeout is 2 s (10 in turn would be 20 s); then none
            started = time.monotonic()
            results = await asyncio.gather(*(spend.reserve(Hold("alice", day, month, 1, 0), (3, 0, 0))
                                             for _ in range(10)), return_exceptions=True)
            assert all(isinstance(r, StateUnavailable) for r in results), results
            assert time.monotonic() - started < most
    finally:
        await spend.close()
        for w in connections:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_locked_budget_counter_holds_up_only_its_own_key(start_proxy, aiohttp_server, tmp_path,
                                                                 postgres_server):  # noqa: F811
    """Another transaction holds alice's counters (another proxy's, or a person's UPDATE): alice's check
    waits for it, and bob's checks meanwhile do not queue behind hers (they were all on one connection:
    bob waited out alice's timeout and got a 503)."""
    import psycopg

    _, post = await budget_proxy(start_proxy, aiohttp_server, tmp_path, postgres_server.url)
    assert (await post("sk-alice-0000000000"))[0] == 200
    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as holder, \
            await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as watcher:
        async with holder.transaction():
            await holder.execute("UPDATE qip_budget_spend SET amount = amount WHERE key = 'alice'")
            alice = asyncio.create_task(post("sk-alice-0000000000"))
            async with asyncio.timeout(30):  # until alice's check waits for the row lock
                while not (await (await watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")).fetchone())[0]:
                    await asyncio.sleep(0.02)
            for _ in range(3):
                status, answer = await post("sk-bob-0000000000")
                assert status == 200, answer
            assert not alice.done()
        assert (await alice)[0] == 200  # the lock released: alice's request goes on


async def test_killed_budget_connections_are_replaced_unseen(start_proxy, aiohttp_server, tmp_path,
                                                             postgres_server):  # noqa: F811
    """The proxy's database connections killed (pg_terminate_backend, as a failover or an admin does): the
    next budget checks take fresh connections; no request gets a 503 (it did, and for a second after it
    every budgeted request did)."""
    import psycopg

    _, post = await budget_proxy(start_proxy, aiohttp_server, tmp_path, postgres_server.url)
    results = await asyncio.gather(*(post(key) for key in ["sk-alice-0000000000", "sk-bob-0000000000"] * 3))
    assert [status for status, _ in results] == [200] * 6
    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as admin:
        cur = await admin.execute("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                  "AND backend_type = 'client backend'")
        pids = [pid for (pid,) in await cur.fetchall()]
        assert pids
        await admin.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))
        async with asyncio.timeout(30):  # until they are gone (the server has told their clients)
            while (await (await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)",
                                              (pids,))).fetchone())[0]:
                await asyncio.sleep(0.02)
    for key in ["sk-alice-0000000000", "sk-bob-0000000000"] * 2:
        status, answer = await post(key)
        assert status == 200, answer


async def test_the_database_password_stays_out_of_pool_logs(start_proxy, aiohttp_server, tmp_path,
                                                            postgres_server, caplog):  # noqa: F811
    """A URL whose password libpq cannot read: every connection attempt fails with libpq's message quoting
    it, which psycopg's pool logs. The log lines and the 503 keep it out."""
    secret = "pw%zz-s3cret-4711"
    url = postgres_server.url.replace("postgres@", f"postgres:{secret}@")
    _, post = await budget_proxy(start_proxy, aiohttp_server, tmp_path, url)
    status, answer = await post("sk-alice-0000000000")
    assert status == 503 and answer["error"]["code"] == "state_unavailable"
    assert "s3cret" not in str(answer)
    assert "percent-encoded" in caplog.text  # the pool did log the failure
    assert "s3cret" not in caplog.text


async def test_closed_budget_counters_refuse_without_a_new_pool(postgres_server):  # noqa: F811
    """A budget check or settlement after close() (the shutdown; a request answered late in the drain)
    is refused with the shutdown's 503, and opens no new pool: one did, and nothing ever closed it."""
    import psycopg

    from proxy.errors import ShuttingDown
    from proxy.usage.budgets import Hold, periods
    from proxy.usage.postgres_spend import PostgresSpend

    spend = PostgresSpend(postgres_server.url)
    await spend.start()
    day, month, _, _ = periods(time.time())
    hold = Hold("alice", day, month, 1, 0)
    assert await spend.reserve(hold, (3, -1, -1)) is None
    await spend.close()
    for late in (spend.reserve(hold, (3, -1, -1)), spend.add(hold, 1, 0), spend.floor({("alice", day, "img"): 1})):
        with pytest.raises(ShuttingDown) as info:
            await late
        answer = info.value.to_response()
        assert answer.status == 503 and info.value.code == "shutting_down"
    assert spend._pool is None
    async with await psycopg.AsyncConnection.connect(postgres_server.url, autocommit=True) as admin:
        cur = await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                  "AND backend_type = 'client backend'")
        assert (await cur.fetchone())[0] == 0  # no connection of the closed counters' is left open
