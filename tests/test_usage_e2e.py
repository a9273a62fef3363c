"""The usage ledger as a user sees it: the official openai client against a running proxy with two keys
and priced routes (placeholder, a fake OpenAI-compatible vendor, the tiny local model), then OpenAI's
usage and costs API read back with an admin key."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import signal
import sqlite3
import time

import aiohttp
import pytest
from openai import APIStatusError, AsyncOpenAI, RateLimitError
from PIL import Image

from proxy.app import GATEWAY

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream, free_port
from .test_lifecycle import SlowUpstream, serve, wait_exit, wait_listening

KEYS = [{"name": "alice", "key": "sk-alice-0000000000"}, {"name": "bob", "key": "sk-bob-0000000000"},
        {"name": "ops", "key": "sk-admin-000000000", "admin": True}]


def usage_config(tmp_path, vendor_url: str, tiny_dir=None) -> dict:
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": copy.deepcopy(KEYS)}
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["vendor"] = {"kind": "openai", "base_url": f"{vendor_url}/openai/v1", "api_key": "up-key",
                                  "retries": 0}
    cfg["models"] = {
        "qwen-image-placeholder": {"sizes": "qwen-image",
                                   "routes": [{"provider": "placeholder", "price": {"per_image": 0.01}}]},
        "vendor-image": {"sizes": "small", "routes": [
            {"provider": "vendor", "price": {"per_call": 0.001, "per_megapixel": 0.5}}]},
        "unpriced": {"sizes": "small", "routes": ["vendor"]},
    }
    if tiny_dir is not None:
        cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu",
                                     "default_steps": 2, "load_in_background": False}
        cfg["size_tables"]["tiny"] = {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64"}}}
        cfg["models"]["tiny"] = {"sizes": "tiny", "routes": ["local"]}
        cfg["usage"]["gpu_usd_per_hour"] = 36.0  # $0.01 a GPU-second
    return cfg


async def api(server, path: str, params, key: str = "sk-admin-000000000") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(server.make_url(path), params=params,
                                                   headers={"Authorization": f"Bearer {key}"}) as r:
        return r.status, await r.json()


def client_for(server, key: str) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=key, max_retries=0, timeout=120)


async def test_usage_and_costs_match_what_was_sent(start_proxy, aiohttp_server, tmp_path, tiny_dir):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url, tiny_dir))
    alice, bob = client_for(server, "sk-alice-0000000000"), client_for(server, "sk-bob-0000000000")
    start = int(time.time()) - 5
    try:
        # alice: 2 requests x 2 placeholder images; 1 vendor request of 2 images 64x64 (two calls: the route
        # makes one image a call); bob: 1 placeholder image, 1 unpriced vendor image, 1 tiny local image.
        for _ in range(2):
            r = await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", n=2,
                                            size="1024x1024", response_format="b64_json")
            assert len(r.data) == 2
        raw = await alice.images.with_raw_response.generate(model="vendor-image", prompt="a fox", n=2,
                                                            size="64x64", response_format="b64_json")
        assert raw.headers["x-qip-cost-usd"] == f"{2 * 0.001 + 0.5 * 2 * 64 * 64 / 1e6:.6f}"
        await bob.images.generate(model="qwen-image-placeholder", prompt="an owl", size="1024x1024")
        raw = await bob.images.with_raw_response.generate(model="unpriced", prompt="an owl", size="64x64")
        assert "x-qip-cost-usd" not in raw.headers  # no price: unknown, never 0
        r = await bob.images.generate(model="tiny", prompt="a cat", size="64x64", response_format="b64_json")
        assert len(base64.b64decode(r.data[0].b64_json)) > 0
    finally:
        await alice.close()
        await bob.close()

    params = [("start_time", str(start)), ("bucket_width", "1d"), ("group_by[]", "api_key_id"),
              ("group_by[]", "model"), ("group_by[]", "route")]
    status, page = await api(server, "/v1/organization/usage/images", params)
    assert status == 200, page
    assert page["object"] == "page" and page["has_more"] is False and page["next_page"] is None
    bucket = page["data"][0]
    assert bucket["object"] == "bucket" and bucket["start_time"] == start
    got = {(x["api_key_id"], x["model"], x["route"]): (x["images"], x["num_model_requests"])
           for x in bucket["results"]}
    assert got == {("alice", "qwen-image-placeholder", "placeholder"): (4, 2),
                   ("alice", "vendor-image", "vendor"): (2, 1),
                   ("bob", "qwen-image-placeholder", "placeholder"): (1, 1),
                   ("bob", "unpriced", "vendor"): (1, 1),
                   ("bob", "tiny", "local"): (1, 1)}
    for x in bucket["results"]:
        assert x["object"] == "organization.usage.images.result"
        assert x["source"] is None and x["size"] is None and x["project_id"] is None
        assert (x["gpu_seconds"] > 0) == (x["route"] == "local")

    status, page = await api(server, "/v1/organization/costs",
                             [("start_time", str(start)), ("group_by", "api_key_id,model")])
    assert status == 200, page
    costs = {(x["api_key_id"], x["model"]): x["amount"]["value"] for x in page["data"][0]["results"]}
    tiny_gpu = next(x["gpu_seconds"] for x in bucket["results"] if x["route"] == "local")
    assert costs["alice", "qwen-image-placeholder"] == pytest.approx(0.04, abs=1e-12)
    assert costs["alice", "vendor-image"] == pytest.approx(2 * 0.001 + 0.5 * 2 * 64 * 64 / 1e6, abs=1e-12)
    assert costs["bob", "qwen-image-placeholder"] == pytest.approx(0.01, abs=1e-12)
    assert costs["bob", "unpriced"] == 0.0
    assert costs["bob", "tiny"] == pytest.approx(tiny_gpu * 0.01, abs=1e-8)  # gpu_seconds is shown to 6 places
    unpriced = {(x["api_key_id"], x["model"]): x["unpriced_requests"] for x in page["data"][0]["results"]}
    assert unpriced["bob", "unpriced"] == 1 and unpriced["alice", "vendor-image"] == 0
    assert all(x["amount"]["currency"] == "usd" and x["object"] == "organization.costs.result"
               for x in page["data"][0]["results"])

    # Prometheus has the same spend, by key name.
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert 'qip_cost_usd_total{key="alice",model="qwen-image-placeholder",route="placeholder"} 0.04' in text
    assert 'qip_gpu_seconds_total{model="tiny",route="local"}' in text
    assert "sk-alice" not in text


async def test_usage_api_needs_an_admin_key_and_valid_params(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url))
    status, body = await api(server, "/v1/organization/usage/images", {"start_time": "0"}, key="sk-alice-0000000000")
    assert status == 403 and body["error"]["code"] == "insufficient_permissions"
    status, body = await api(server, "/v1/organization/usage/images", {})
    assert status == 400 and body["error"]["param"] == "start_time"
    status, body = await api(server, "/v1/organization/usage/images", {"start_time": "0", "group_by": "line_item"})
    assert status == 400 and body["error"]["param"] == "group_by"
    status, body = await api(server, "/v1/organization/costs", {"start_time": "0", "bucket_width": "1w"})
    assert status == 400 and body["error"]["param"] == "bucket_width"
    # A start in the future with no end_time: the start is wrong, not the end the client never sent.
    status, body = await api(server, "/v1/organization/costs", {"start_time": str(int(time.time()) + 86400)})
    assert status == 400 and body["error"]["param"] == "start_time" and "future" in body["error"]["message"]
    status, body = await api(server, "/v1/organization/costs", {"start_time": "100", "end_time": "50"})
    assert status == 400 and body["error"]["param"] == "end_time"


async def test_hostile_times_are_400_and_a_huge_range_is_one_page(start_proxy, aiohttp_server, tmp_path):
    """Times out of range are the client's error (they reached SQLite: a 503 that blamed the database, or a
    MemoryError 500), and a range of billions of buckets answers its first page at once."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url))
    for path in ("/v1/organization/usage/images", "/v1/organization/costs"):
        for params, param in (({"start_time": str(-10**20)}, "start_time"), ({"start_time": "-1"}, "start_time"),
                              ({"start_time": "0", "end_time": str(10**20)}, "end_time")):
            status, body = await api(server, path, params)
            assert status == 400 and body["error"]["param"] == param, (path, params, status, body)
            assert body["error"]["type"] == "invalid_request_error" and "Unix time" in body["error"]["message"]
        # 1970 to 9999 by the minute: 4 billion buckets, of which the page lists its 60.
        status, page = await api(server, path, {"start_time": "0", "end_time": "253402300800", "bucket_width": "1m"})
        assert status == 200, page
        assert len(page["data"]) == 60 and page["has_more"] is True and page["next_page"] == "3600"


async def test_pages_of_buckets(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url))
    alice = client_for(server, "sk-alice-0000000000")
    await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
    await alice.close()
    now = int(time.time())
    start = now - 3 * 3600 + 1
    status, page = await api(server, "/v1/organization/usage/images",
                             {"start_time": str(start), "bucket_width": "1h", "limit": "2"})
    assert status == 200 and page["has_more"] is True and len(page["data"]) == 2
    assert all(b["results"] == [] for b in page["data"])
    status, page2 = await api(server, "/v1/organization/usage/images",
                              {"start_time": str(start), "bucket_width": "1h", "limit": "2", "page": page["next_page"]})
    assert status == 200 and page2["has_more"] is False
    assert sum(x["images"] for b in page2["data"] for x in b["results"]) == 1


async def test_failed_and_retried_calls_are_recorded(start_proxy, aiohttp_server, tmp_path):
    """A vendor call that fails is recorded with its attempts; the request's record says it failed."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url))
    vendor.fail(500, "INTERNAL", times=10)
    alice = client_for(server, "sk-alice-0000000000")
    with pytest.raises(Exception):  # noqa: B017 - any error status
        await alice.images.generate(model="vendor-image", prompt="a fox", size="64x64")
    await alice.close()
    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    records = await usage.writer.backend.query(0, time.time() + 10)
    assert len(records) == 1
    r = records[0]
    assert (r.key, r.model, r.outcome, r.images_delivered, r.route) == ("alice", "vendor-image", "failed", 0, "vendor")
    assert r.cost_usd == 0.0 and r.attempts.count('"route":"vendor"') == 1


async def test_budget_images_per_day(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 3}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    try:
        for _ in range(3):
            await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        calls_before = len(vendor.image_calls)
        with pytest.raises(RateLimitError) as info:
            await alice.images.generate(model="vendor-image", prompt="a fox", size="64x64")
        assert len(vendor.image_calls) == calls_before  # refused before any provider was called
        error = info.value.body
        assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
        assert "resets at" in error["message"] and "images_per_day" in error["message"]
        assert int(info.value.response.headers["Retry-After"]) >= 1
        # bob has no budget
        bob = client_for(server, "sk-bob-0000000000")
        await bob.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        await bob.close()
    finally:
        await alice.close()


async def test_streams_and_edits_are_recorded(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["models"]["edit-placeholder"] = {"sizes": "qwen-image", "max_input_images": 1,
                                         "routes": [{"provider": "placeholder", "price": {"per_image": 0.02}}]}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    try:
        stream = await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024",
                                             stream=True)
        events = [event async for event in stream]
        assert events[-1].type == "image_generation.completed"
        r = await alice.images.edit(model="edit-placeholder", prompt="make it blue", size="1024x1024",
                                    image=("in.png", png.getvalue(), "image/png"))
        assert len(r.data) == 1
    finally:
        await alice.close()
    status, page = await api(server, "/v1/organization/usage/images",
                             [("start_time", str(int(time.time()) - 60)), ("group_by[]", "source"),
                              ("group_by[]", "model")])
    assert status == 200
    got = {(x["source"], x["model"]): x["images"] for x in page["data"][0]["results"]}
    assert got == {("image.generation", "qwen-image-placeholder"): 1, ("image.edit", "edit-placeholder"): 1}
    usage = server.app[GATEWAY].usage
    records = await usage.writer.backend.query(0, time.time() + 10)
    assert sorted((r.stream, r.cost_usd) for r in records) == [(False, 0.02), (True, 0.01)]
    status, page = await api(server, "/v1/organization/usage/images",
                             [("start_time", str(int(time.time()) - 60)), ("group_by", "size"),
                              ("sources[]", "image.edit")])
    assert status == 200
    assert [(x["size"], x["images"], x["source"]) for x in page["data"][0]["results"]] == [("1024x1024", 1, None)]


async def test_a_stream_carries_its_cost_in_the_last_completed_event(start_proxy, aiohttp_server, tmp_path):
    """The head of a stream goes out before the cost is known: the official client reads it from the last
    completed event (x_qip_cost_usd, null for an unpriced route), and the ledger holds the same."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["models"]["edit-placeholder"] = {"sizes": "qwen-image", "max_input_images": 1,
                                         "routes": [{"provider": "placeholder", "price": {"per_image": 0.02}}]}
    cfg["models"]["vendor-image"]["cache"] = {"scope": "key"}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, "PNG")
    try:
        stream = await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024",
                                             n=2, stream=True)
        events = [event async for event in stream]
        done = [e for e in events if e.type == "image_generation.completed"]
        assert len(done) == 2 and done[-1] is events[-1]
        assert done[-1].x_qip_cost_usd == pytest.approx(0.02)  # the request's two images, once
        assert "x_qip_cost_usd" not in (done[0].model_extra or {})
        assert done[-1].usage.total_tokens == 0  # the official fields parse as before
        edit = await alice.images.edit(model="edit-placeholder", prompt="make it blue", size="1024x1024",
                                       image=("in.png", png.getvalue(), "image/png"), stream=True)
        last = [event async for event in edit][-1]
        assert last.type == "image_edit.completed" and last.x_qip_cost_usd == pytest.approx(0.02)
        unpriced = await alice.images.generate(model="unpriced", prompt="a fox", size="64x64", stream=True)
        last = [event async for event in unpriced][-1]
        assert last.type == "image_generation.completed" and last.x_qip_cost_usd is None
        assert Image.open(io.BytesIO(base64.b64decode(last.b64_json))).size == (64, 64)
        # A seeded stream on a model with a cache: a miss that costs, then a hit that costs nothing.
        for expected in ("miss", "hit"):
            seeded = await alice.images.generate(model="vendor-image", prompt="a fox", size="64x64",
                                                 stream=True, extra_body={"seed": 3})
            last = [event async for event in seeded][-1]
            assert last.x_qip_cache == expected
            assert last.x_qip_cost_usd == (pytest.approx(0.001 + 0.5 * 64 * 64 / 1e6) if expected == "miss" else 0)
    finally:
        await alice.close()
    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    records = await usage.writer.backend.query(0, time.time() + 10)
    assert sorted(((r.model, r.stream, r.cost_usd, r.cache_hit) for r in records), key=str) == [
        ("edit-placeholder", True, 0.02, False), ("qwen-image-placeholder", True, 0.02, False),
        ("unpriced", True, None, False), ("vendor-image", True, 0.0, True),
        ("vendor-image", True, pytest.approx(0.001 + 0.5 * 64 * 64 / 1e6), False)]


async def test_sigterm_writes_what_is_queued(aiohttp_server, tmp_path):
    """`serve` stopped by SIGTERM writes the records still queued (flush_seconds is an hour here)."""
    up = await SlowUpstream(delay=0.5).start(aiohttp_server)
    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port, "shutdown_grace": 10}
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["slow"] = {"kind": "openai", "base_url": up.url, "api_key": "k", "timeout": 60}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": [{"provider": "slow", "price": {"per_image": 0.05}}]}
    cfg["usage"]["flush_seconds"] = 3600
    proc, _ = serve(cfg, tmp_path)
    try:
        await wait_listening(port, proc)
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        calls = [asyncio.create_task(client.images.generate(model="qwen-image", prompt="p", size="64x64"))
                 for _ in range(3)]
        await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # in flight: they finish, then their records are written
        await asyncio.gather(*calls)
        await client.close()
        assert await wait_exit(proc, 30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    db = sqlite3.connect(tmp_path / "usage.sqlite3")
    rows = db.execute("SELECT model, outcome, images_delivered, cost_usd FROM qip_usage").fetchall()
    assert rows == [("qwen-image", "ok", 1, 0.05)] * 3


async def test_a_fallback_pays_for_the_bad_images_before_it(start_proxy, aiohttp_server, tmp_path):
    """The vendor answers with an image that fails the proxy's checks (it was made: charged), the proxy
    falls back to the placeholder: the record's cost is both, its attempts name both routes."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    vendor.payload_override = {"created": 1, "data": [{"b64_json": base64.b64encode(b"not an image").decode()}]}
    cfg = usage_config(tmp_path, vendor.url)
    cfg["models"]["fallback"] = {"sizes": "small", "routes": [
        {"provider": "vendor", "price": {"per_image": 0.03}, "retries": 0},
        {"provider": "placeholder", "price": {"per_image": 0.01}}]}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    try:
        raw = await alice.images.with_raw_response.generate(model="fallback", prompt="a fox", size="64x64")
        assert raw.headers["x-qip-route"] == "placeholder"
        assert raw.headers["x-qip-cost-usd"] == "0.040000"
    finally:
        await alice.close()
    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    (r,) = await usage.writer.backend.query(0, time.time() + 10)
    assert r.route == "placeholder" and r.cost_usd == pytest.approx(0.04)
    assert [(a["route"], a["images"], a["cost"]) for a in json.loads(r.attempts)] == [
        ("vendor", 1, 0.03), ("placeholder", 1, 0.01)]
    status, page = await api(server, "/v1/organization/costs", {"start_time": str(int(time.time()) - 60),
                                                                 "group_by": "route"})
    assert status == 200
    by_route = {x["route"]: x["amount"]["value"] for x in page["data"][0]["results"]}
    assert by_route == {"vendor": pytest.approx(0.03), "placeholder": pytest.approx(0.01)}


async def test_a_ledger_that_cannot_be_opened_fails_no_generation(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    (tmp_path / "not-a-folder").write_text("x")
    cfg = usage_config(tmp_path, vendor.url)
    cfg["usage"] = {"path": str(tmp_path / "not-a-folder" / "usage.sqlite3"), "write_timeout": 1}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    try:
        r = await alice.images.with_raw_response.generate(model="qwen-image-placeholder", prompt="a fox",
                                                          size="1024x1024")
        assert r.status_code == 200 and r.headers["x-qip-cost-usd"] == "0.010000"
    finally:
        await alice.close()
    status, body = await api(server, "/v1/organization/costs", {"start_time": "0"})
    assert status == 503 and body["error"]["code"] == "usage_unavailable"
    assert server.app[GATEWAY].usage.writer.pending == 1  # kept, to be written once it can be


async def test_dollar_budget_and_a_restart_remembers_the_day(start_proxy, aiohttp_server, tmp_path):
    """usd_per_day: requests until the next would pass it; a new process reads today's spending back from
    the ledger (in-memory totals), so a restart grants nothing extra."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["server"]["api_keys"][0]["budget"] = {"usd_per_day": 0.03}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    try:
        await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024", n=2)
        with pytest.raises(RateLimitError) as info:  # 0.02 spent, 0.02 more would pass 0.03
            await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024", n=2)
        assert "usd_per_day" in info.value.body["message"] and "budget of $0.03 per day" in info.value.body["message"]
    finally:
        await alice.close()
    await server.close()  # the process ends: its records are written

    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    try:
        await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        with pytest.raises(RateLimitError) as info:  # 0.03 spent: even one more is refused
            await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        assert info.value.body["code"] == "insufficient_quota"
    finally:
        await alice.close()


async def rejections(server, key: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics"),
                                                   headers={"Authorization": "Bearer sk-admin-000000000"}) as r:
        text = await r.text()
    line = f'qip_key_rejections_total{{key="{key}",reason="insufficient_quota"}} '
    return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)


async def test_a_spent_budget_is_not_retried_and_a_request_beyond_it_says_so(start_proxy, aiohttp_server, tmp_path):
    """The openai SDK retries a 429 twice within seconds; a budget that resets at midnight refuses those
    too, so the refusal says not to (x-should-retry: false). A request that alone asks more than the whole
    budget is told so, with no Retry-After: waiting for the reset would not make it pass."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 3, "usd_per_month": 0.05}
    server, _ = await start_proxy(cfg)
    alice = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="sk-alice-0000000000", max_retries=2,
                        timeout=120)
    try:
        with pytest.raises(RateLimitError) as info:  # 4 images: more than the whole day's 3
            await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024", n=4)
        error, headers = info.value.body, info.value.response.headers
        assert error["code"] == "insufficient_quota" and "this request alone (4 images, about $0.04)" in error["message"]
        assert "whole budget of 3 images per day (budget.images_per_day)" in error["message"]
        assert "retry-after" not in headers and headers["x-should-retry"] == "false"
        assert await rejections(server, "alice") == 1  # asked once: the SDK did not retry

        await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024", n=3)
        with pytest.raises(RateLimitError) as info:  # the day's 3 are spent: resets at midnight
            await alice.images.generate(model="qwen-image-placeholder", prompt="a fox", size="1024x1024")
        headers = info.value.response.headers
        assert "is spent" in info.value.body["message"] and int(headers["retry-after"]) > 0
        assert headers["x-should-retry"] == "false" and await rejections(server, "alice") == 2
    finally:
        await alice.close()


async def test_calls_without_a_valid_key_leave_no_record(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url))
    stranger = client_for(server, "sk-not-a-key-00000")
    with pytest.raises(Exception):  # noqa: B017 - 401
        await stranger.images.generate(model="qwen-image-placeholder", prompt="a fox")
    await stranger.close()
    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    assert await usage.writer.backend.query(0, time.time() + 10) == []


async def test_a_call_that_timed_out_is_in_the_attempts_and_its_cost_follows_the_price(start_proxy, aiohttp_server,
                                                                                        tmp_path):
    """A vendor that hangs past its route's timeout was still called: the record's attempts name that call
    (no images: not charged where the route has a price; unknown where it has none, so the request's cost
    is null, never 0), and the fallback that answered is charged as ever."""
    hanging = await FakeOpenAIUpstream(delay=30).start(aiohttp_server)
    cfg = usage_config(tmp_path, hanging.url)
    cfg["providers"]["vendor"]["timeout"] = 0.3
    cfg["models"] = {
        "priced": {"sizes": "small", "routes": [{"provider": "vendor", "price": {"per_call": 0.005}},
                                                {"provider": "placeholder", "price": {"per_image": 0.01}}]},
        "unpriced": {"sizes": "small", "routes": ["vendor", {"provider": "placeholder", "price": {"per_image": 0.01}}]},
        "only-unpriced": {"sizes": "small", "routes": ["vendor"]},
    }
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    start = int(time.time()) - 5
    try:
        raw = await alice.images.with_raw_response.generate(model="priced", prompt="a fox", size="64x64")
        assert raw.headers["x-qip-route"] == "placeholder" and raw.headers["x-qip-cost-usd"] == "0.010000"
        raw = await alice.images.with_raw_response.generate(model="unpriced", prompt="a fox", size="64x64")
        assert raw.headers["x-qip-route"] == "placeholder"
        assert "x-qip-cost-usd" not in raw.headers  # a call on a route without a price: unknown, never 0
        with pytest.raises(Exception):  # noqa: B017 - the only route timed out: an error status
            await alice.images.generate(model="only-unpriced", prompt="a fox", size="64x64")
    finally:
        await alice.close()
    assert len(hanging.image_calls) == 3

    status, page = await api(server, "/v1/organization/costs",
                             [("start_time", str(start)), ("group_by", "model,route")])
    assert status == 200, page
    got = {(x["model"], x["route"]): (pytest.approx(x["amount"]["value"]), x["unpriced_requests"])
           for x in page["data"][0]["results"]}
    assert got == {("priced", "vendor"): (0.0, 0), ("priced", "placeholder"): (0.01, 0),
                   ("unpriced", "vendor"): (0.0, 1), ("unpriced", "placeholder"): (0.01, 0),
                   ("only-unpriced", "vendor"): (0.0, 1)}
    status, page = await api(server, "/v1/organization/costs", [("start_time", str(start)), ("group_by", "model")])
    assert {x["model"]: x["unpriced_requests"] for x in page["data"][0]["results"]} == {
        "priced": 0, "unpriced": 1, "only-unpriced": 1}

    records = {r.model: r for r in await server.app[GATEWAY].usage.writer.backend.query(0, time.time() + 10)}
    assert records["priced"].cost_usd == pytest.approx(0.01)
    assert records["unpriced"].cost_usd is None and records["only-unpriced"].cost_usd is None
    assert records["only-unpriced"].outcome == "timeout"
    assert [(a["route"], a["images"], a["cost"]) for a in json.loads(records["priced"].attempts)] == [
        ("vendor", 0, 0.0), ("placeholder", 1, 0.01)]
    assert [(a["route"], a["images"], a["cost"]) for a in json.loads(records["unpriced"].attempts)] == [
        ("vendor", 0, None), ("placeholder", 1, 0.01)]
    assert [(a["route"], a["images"]) for a in json.loads(records["only-unpriced"].attempts)] == [("vendor", 0)]


async def test_a_call_cut_short_by_the_deadline_or_the_client_is_in_the_attempts(start_proxy, aiohttp_server,
                                                                                   tmp_path):
    """A call the proxy stopped waiting for (the request's deadline, server.request_timeout, cut the route's
    attempt short; the client hung up) was made all the same: the record's attempts name it. Without images
    it is not charged where the route has a price; where it has none the request's cost is unknown: null,
    never 0 (it read 0.0 with no attempts: the ledger had forgotten the call)."""
    hanging = await FakeOpenAIUpstream(delay=30).start(aiohttp_server)
    cfg = usage_config(tmp_path, hanging.url)
    cfg["server"]["request_timeout"] = 0.5  # the route's own timeout (300 s) never comes
    cfg["models"] = {"priced": {"sizes": "small", "routes": [{"provider": "vendor", "price": {"per_call": 0.005}}]},
                     "unpriced": {"sizes": "small", "routes": ["vendor"]}}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, "sk-alice-0000000000")
    start = int(time.time()) - 5
    try:
        for model in ("priced", "unpriced"):
            with pytest.raises(APIStatusError) as info:
                await alice.images.generate(model=model, prompt="a fox", size="64x64")
            assert info.value.status_code == 504
        # The client hangs up while the call runs.
        body = {"model": "unpriced", "prompt": "a hare", "size": "64x64"}
        async with aiohttp.ClientSession() as s:
            task = asyncio.ensure_future(s.post(server.make_url("/v1/images/generations"), json=body,
                                                headers={"Authorization": "Bearer sk-alice-0000000000"}))
            for _ in range(200):
                if len(hanging.image_calls) == 3:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await alice.close()
    assert len(hanging.image_calls) == 3

    usage = server.app[GATEWAY].usage
    for _ in range(100):  # the hung-up request's record is written once the proxy saw it go
        records = await usage.writer.backend.query(0, time.time() + 10)
        if len(records) == 3:
            break
        await asyncio.sleep(0.02)
    got = sorted(((r.model, r.outcome, r.cost_usd, [(a["route"], a["images"], a["cost"])
                                                      for a in json.loads(r.attempts)]) for r in records), key=str)
    assert got == [("priced", "timeout", 0.0, [("vendor", 0, 0.0)]),
                   ("unpriced", "cancelled", None, [("vendor", 0, None)]),
                   ("unpriced", "timeout", None, [("vendor", 0, None)])]
    status, page = await api(server, "/v1/organization/costs", [("start_time", str(start)), ("group_by", "model")])
    assert status == 200, page
    assert {x["model"]: (x["amount"]["value"], x["unpriced_requests"]) for x in page["data"][0]["results"]} == {
        "priced": (0.0, 0), "unpriced": (0.0, 2)}
