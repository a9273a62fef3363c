"""The usage package's pure parts: prices -> costs, budget arithmetic, OpenAI's query parameters; and the
`usage` command's table over a real SQLite ledger."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import time

import pytest
import yaml
from multidict import MultiDict

from proxy import cli, parse_config
from proxy.config.usage import BudgetConfig, PriceConfig
from proxy.errors import InvalidRequest
from proxy.providers.ray_convert import images_from_reply
from proxy.request import ImageRequest
from proxy.usage.budgets import limits_of, over, periods, refusal
from proxy.usage.pricing import call_cost, estimate, route_price, total
from proxy.usage.record import UsageRecord
from proxy.usage.report import IMAGE_GROUPS, parse_query
from proxy.usage.sqlite import SqliteLedger

from .conftest import base_config


def test_costs():
    assert call_cost(None, 2, 1024, 1024, None) is None  # no price: unknown, never 0
    assert call_cost(PriceConfig(per_image=0.02), 2, 64, 64, None) == pytest.approx(0.04)
    mp = PriceConfig(per_megapixel=0.01, per_call=0.001)
    assert call_cost(mp, 2, 1000, 500, None) == pytest.approx(0.001 + 0.01 * 2 * 0.5)
    assert call_cost(mp, 0, 1000, 500, None) == 0.0  # a call that made nothing is not charged
    gpu = PriceConfig(per_gpu_second=0.001)
    assert call_cost(gpu, 1, 64, 64, 2.5) == pytest.approx(0.0025)
    assert call_cost(gpu, 1, 64, 64, None) is None  # priced by time, time not measured
    assert route_price(None, "diffusers", 3.6).per_gpu_second == pytest.approx(0.001)
    assert route_price(None, "openai", 3.6) is None
    assert total([0.01, 0.02]) == pytest.approx(0.03) and total([0.01, None]) is None and total([]) == 0.0
    assert estimate(PriceConfig(per_call=0.5, per_image=0.1), 3, 64, 64, per_call=2) == pytest.approx(1.3)
    with pytest.raises(ValueError):
        PriceConfig()


def test_budget_arithmetic():
    limits = limits_of(BudgetConfig(images_per_day=3, usd_per_day=0.03))
    assert over((2, 20000, 20000), (1, 10000), limits) is None  # 0.02 + 0.01 = 0.03 exactly: allowed
    assert over((3, 0, 0), (1, 0), limits) == "images_per_day"
    assert over((0, 30000, 30000), (1, 0), limits) == "usd_per_day"  # spent: even an unknown cost is refused
    assert over((0, 0, 10**9), (1, 0), limits_of(BudgetConfig(usd_per_month=1))) == "usd_per_month"
    day, month, day_end, month_end = periods(1767225599.0)  # 2025-12-31T23:59:59Z
    assert (day, month, day_end, month_end) == ("2025-12-31", "2025-12", 1767225600.0, 1767225600.0)


def test_query_parameters():
    q = parse_query(MultiDict([("start_time", "100"), ("end_time", "200000"), ("group_by[]", "model"),
                               ("group_by", "route,api_key_id"), ("models[]", "a"), ("bucket_width", "1h")]),
                    IMAGE_GROUPS, now=300000)
    assert q.group_by == ["model", "route", "api_key_id"] and q.filters == {"model": {"a"}} and q.limit == 24
    for bad in ({"start_time": "x"}, {"start_time": "5", "end_time": "5"}, {"start_time": "0", "limit": "0"},
                {"start_time": "0", "page": "7"}, {"start_time": "0", "group_by": "nope"}):
        with pytest.raises(InvalidRequest):
            parse_query(MultiDict(bad), IMAGE_GROUPS, now=10**6)


def record(i: int, model: str, route: str, cost: float | None, ts: float) -> UsageRecord:
    return UsageRecord(id=f"r{i}", ts=ts, request_id=f"q{i}", key="alice", model=model, source="image.generation",
                       route=route, provider="openai", outcome="ok", status=200, images_asked=1,
                       images_delivered=1, width=64, height=64, megapixels=0.004096, steps=None, tier=None,
                       latency_ms=12.0, gpu_seconds=None, cost_usd=cost, cache_hit=False, stream=False,
                       attempts=json.dumps([{"route": route}]))


def ledger_with(tmp_path, records: list[UsageRecord]):
    """A SQLite ledger holding `records`, and the path of a models.yaml that uses it."""
    db = tmp_path / "usage.sqlite3"

    async def fill():
        ledger = SqliteLedger(str(db))
        await ledger.start()
        await ledger.write(records)
        await ledger.close()

    asyncio.run(fill())
    cfg = base_config(tmp_path)
    cfg["usage"] = {"path": str(db)}
    parse_config(cfg)  # a valid config
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_usage_command_prints_a_table(tmp_path, capsys):
    now = time.time()
    noon = now - now % 86400 - 2 * 86400 + 43200  # two days ago at 12:00 UTC: one day's bucket for all
    path = ledger_with(tmp_path, [record(1, "m1", "fal", 0.02, noon), record(2, "m1", "fal", 0.02, noon + 10),
                                  record(3, "m2", "local", None, noon + 20)])
    cli.main(["usage", "--config", str(path), "--since", "7d", "--group-by", "model,route"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["start", "model", "route", "requests", "images", "cost_usd", "unpriced", "gpu_s",
                              "cache_hits"]
    rows = [line.split()[1:] for line in out[1:]]
    assert ["m1", "fal", "2", "2", "0.040000", "0", "0.00", "0"] in rows
    assert ["m2", "local", "1", "1", "0.000000", "1", "0.00", "0"] in rows
    with pytest.raises(SystemExit):
        cli.main(["usage", "--config", str(path), "--group-by", "colour"])


def test_usage_command_since_with_an_offset_and_minute_buckets(tmp_path, capsys):
    """--since keeps a time's UTC offset (it was read as UTC: 5 hours late here, so no usage), and 1m buckets
    start on the minute (one began at second 30 and was printed as its minute, holding the next one's)."""
    now = time.time()
    minute = now - now % 60 - 180  # three whole minutes ago
    at = minute + 70  # 10 s into the next minute
    path = ledger_with(tmp_path, [record(1, "m1", "fal", 0.02, at)])
    fmt = "%Y-%m-%d %H:%M"
    utc = datetime.datetime.fromtimestamp(minute + 30, datetime.UTC)
    cli.main(["usage", "--config", str(path), "--since", str(int(minute + 30)), "--bucket", "1m"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [" ".join(r[:2]) for r in rows] == [datetime.datetime.fromtimestamp(at, datetime.UTC).strftime(fmt)]
    plus5 = utc.astimezone(datetime.timezone(datetime.timedelta(hours=5))).isoformat()  # the same instant
    cli.main(["usage", "--config", str(path), "--since", plus5, "--bucket", "1h"])
    out = capsys.readouterr().out
    assert "no usage" not in out and "m1" in out
    with pytest.raises(SystemExit):  # more seconds than a float holds: the --since message, not the ledger's
        cli.main(["usage", "--config", str(path), "--since", "9" * 400 + "d"])
    assert "--since" in capsys.readouterr().err


def test_usage_command_without_a_ledger_says_so_and_creates_none(tmp_path, capsys):
    """A usage.path with no ledger (a relative path read from another folder) is an error naming it; it was
    created empty, and the answer was "no usage recorded"."""
    cfg = base_config(tmp_path)
    missing = tmp_path / "elsewhere" / "usage.sqlite3"
    cfg["usage"] = {"path": str(missing)}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as info:
        cli.main(["usage", "--config", str(path)])
    assert info.value.code != 0
    assert f"no usage ledger at {missing}" in capsys.readouterr().err
    assert not missing.exists() and not missing.parent.exists()


def test_ray_replies_carry_gpu_seconds():
    """A Ray replica's reply says how long its accelerator worked; each image gets its share."""
    req = ImageRequest(prompt="p", model="m", width=8, height=8, n=2)
    png = base64.b64encode(b"\x89PNG fake").decode()
    reply = {"ok": True, "images": [png, png], "seeds": [1, 2], "gpu_seconds": 3.0}
    assert [img.gpu_seconds for img in images_from_reply(reply, req)] == [1.5, 1.5]
    del reply["gpu_seconds"]  # an older replica: unknown
    assert [img.gpu_seconds for img in images_from_reply(reply, req)] == [None, None]


async def test_the_ledger_builds_a_big_batch_between_the_loops_other_work(tmp_path):
    """A full batch of records (500 by default) is built on the event loop a chunk at a time: requests in
    flight get their turns in between, rather than waiting for the whole batch (milliseconds)."""
    from proxy.usage.ledger import BUILD_CHUNK, LedgerWriter

    ledger = SqliteLedger(str(tmp_path / "usage.sqlite3"))
    writer = LedgerWriter(ledger, queue_max=10_000, batch_size=500, flush_seconds=60, write_timeout=10)
    await ledger.start()
    built: list[int] = []

    def maker(i: int):
        def make() -> UsageRecord:
            built.append(i)
            return record(i, "m1", "fal", 0.01, time.time())
        return make

    for i in range(500):
        writer.add(maker(i))
    seen_at: list[int] = []
    asyncio.get_running_loop().call_soon(lambda: seen_at.append(len(built)))  # "a request's turn"
    assert await writer.flush()
    assert seen_at and seen_at[0] <= BUILD_CHUNK < 500
    assert len(await ledger.query(0, time.time() + 1)) == 500 and writer.written == 500
    await ledger.close()


def test_budget_refusals_write_dollars_as_people_do():
    def message(**budget):
        return refusal(next(iter(budget)), BudgetConfig(**budget), resets_at=86400, now=0).message

    assert "budget of $20.00 per day" in message(usd_per_day=20)
    assert "budget of $1,500.50 per month" in message(usd_per_month=1500.5)
    assert "budget of $0.0025 per day" in message(usd_per_day=0.0025)
    assert "budget of 3 images per day" in message(images_per_day=3)


async def test_an_idle_ledger_writer_sleeps_and_a_failing_database_is_not_hammered(tmp_path, monkeypatch):
    """With nothing queued the writer waits for the first record instead of waking every flush_seconds
    (an idle server stays asleep); that record is written within flush_seconds. A database that fails is
    tried again after flush_seconds, not at every record added while its batch is full."""
    from proxy.usage.ledger import LedgerWriter

    timed_waits = 0
    real_timeout = asyncio.timeout

    def counting_timeout(delay):
        nonlocal timed_waits
        timed_waits += 1
        return real_timeout(delay)

    monkeypatch.setattr(asyncio, "timeout", counting_timeout)
    ledger = SqliteLedger(str(tmp_path / "usage.sqlite3"))
    writer = LedgerWriter(ledger, queue_max=10_000, batch_size=5, flush_seconds=0.05, write_timeout=10)
    await writer.start()
    await asyncio.sleep(0.5)
    assert timed_waits == 0  # ten flush periods idle: not one wake-up
    writer.add(record(1, "m1", "fal", 0.01, time.time()))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if writer.written:
            break
    assert writer.written == 1 and len(await ledger.query(0, time.time() + 1)) == 1

    attempts = 0

    async def failing_write(records):
        nonlocal attempts
        attempts += 1
        raise OSError("database down")

    monkeypatch.setattr(ledger, "write", failing_write)
    writer.flush_seconds = 10.0
    for i in range(40):  # 8 batches' worth, one by one, while every write fails
        writer.add(record(i + 2, "m1", "fal", 0.01, time.time()))
        await asyncio.sleep(0.005)
    assert attempts <= 2 and writer.pending == 40
    writer._closing = True
    writer._wake.set()
    await asyncio.wait_for(writer._task, 5)
    await ledger.close()
