"""Background jobs go the synchronous calls' way through the usage ledger: the key's budget (a spent key is
told at submit, a job that finds it spent when it runs fails with insufficient_quota), the seeded cache,
one ledger record per job under its id, and the cost and cache metrics. Through the official openai client
(`extra_body={"background": True}`, the 202 read raw) against a running proxy."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import aiohttp
import pytest
from openai import RateLimitError
from PIL import Image

from proxy.app import GATEWAY
from proxy.jobs.model import Job, new_job_id, public_request, request_to_bytes
from proxy.jobs.sqlite_store import SqliteJobStore
from proxy.request import ImageRequest

from .fake_openai_upstream import FakeOpenAIUpstream
from .test_jobs_e2e import client_scope_of, http, wait_done
from .test_usage_e2e import api, client_for, usage_config
from .webhook_receiver import SECRET

ALICE, BOB = "sk-alice-0000000000", "sk-bob-0000000000"
PLACEHOLDER = "qwen-image-placeholder"


def jobs_usage_config(tmp_path, vendor_url: str) -> dict:
    cfg = usage_config(tmp_path, vendor_url)
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3"), "webhook_secret": SECRET, "lease_seconds": 3}
    return cfg


async def submit(client, model: str = PLACEHOLDER, headers: dict | None = None, **fields) -> dict:
    raw = await client.images.with_raw_response.generate(
        model=model, prompt=fields.pop("prompt", "a lighthouse"), size=fields.pop("size", "1024x1024"),
        extra_body={"background": True, **fields}, extra_headers=headers)
    assert raw.http_response.status_code == 202, raw.http_response.text
    return json.loads(raw.http_response.text)


async def run(server, client, key: str, model: str = PLACEHOLDER, **fields) -> dict:
    job = await submit(client, model, **fields)
    return await wait_done(server, job["id"], key=key)


async def records(server) -> list:
    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    return await usage.writer.backend.query(0, time.time() + 10)


async def metrics(server) -> str:
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        return await r.text()


async def test_a_keys_daily_images_budget_holds_for_jobs(start_proxy, aiohttp_server, tmp_path):
    """images_per_day: 3 -> 3 images through jobs, then the 4th submit is refused at once (429
    insufficient_quota, as a synchronous call is), and a synchronous call shares the same budget."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = jobs_usage_config(tmp_path, vendor.url)
    cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 3}
    server, _ = await start_proxy(cfg)
    alice, bob = client_for(server, ALICE), client_for(server, BOB)
    try:
        done = [await run(server, alice, ALICE) for _ in range(3)]
        assert [j["status"] for j in done] == ["completed"] * 3
        with pytest.raises(RateLimitError) as info:
            await submit(alice)
        error = info.value.body
        assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
        assert "images_per_day" in error["message"] and int(info.value.response.headers["Retry-After"]) >= 1
        with pytest.raises(RateLimitError):  # the same budget for synchronous calls
            await alice.images.generate(model=PLACEHOLDER, prompt="a fox", size="1024x1024")
        bobs = await run(server, bob, BOB)
        assert bobs["status"] == "completed"  # bob has no budget
    finally:
        await alice.close()
        await bob.close()

    # One record per job, under the job's id, with its key's name, cost and outcome; the 202s are none.
    jobs = {r.request_id: r for r in await records(server) if r.request_id.startswith("imgjob_")}
    assert set(jobs) == {j["id"] for j in done} | {bobs["id"]}
    for j in done:
        r = jobs[j["id"]]
        assert (r.key, r.model, r.status, r.outcome, r.images_delivered) == ("alice", PLACEHOLDER, 200, "ok", 1)
        assert r.route == "placeholder" and r.cost_usd == pytest.approx(0.01) and r.source == "image.generation"
        assert r.latency_ms > 0
    assert 'qip_cost_usd_total{key="alice",model="qwen-image-placeholder",route="placeholder"} 0.03' in \
        await metrics(server)
    await server.close()  # the process ends; its ledger is written

    # A job queued before a restart (its hold died with that process's counters) runs on a new process
    # whose counters, read back from the ledger, say today's 3 images are spent: it fails, costing nothing.
    store = SqliteJobStore(cfg["jobs"]["path"])
    await store.start()
    req = ImageRequest(prompt="p", model=PLACEHOLDER, width=1024, height=1024, seed=5)
    late = Job(id=new_job_id(), owner=client_scope_of(ALICE), key_name="alice", model=PLACEHOLDER,
               kind="generation", request=public_request(req),
               budget_hold={"key": "alice", "day": "x", "month": "x", "images": 1, "micro_usd": 0, "epoch": "old"})
    assert await store.create(late, request_to_bytes(req), 10)
    await store.close()
    server, _ = await start_proxy(cfg)
    failed = await wait_done(server, late.id, key=ALICE)
    assert failed["status"] == "failed" and failed["result"] is None
    assert failed["error"]["type"] == "insufficient_quota" and failed["error"]["code"] == "insufficient_quota"
    assert "images_per_day" in failed["error"]["message"]
    (record,) = [r for r in await records(server) if r.request_id == late.id]
    assert (record.status, record.outcome, record.images_delivered) == (429, "rate_limited", 0)
    assert record.cost_usd == 0.0 and record.attempts == "[]"  # refused before any route was called


async def test_usage_api_counts_job_images_per_key_and_model(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = jobs_usage_config(tmp_path, vendor.url)
    cfg["models"]["edit-placeholder"] = {"sizes": "qwen-image", "max_input_images": 3,
                                         "routes": [{"provider": "placeholder", "price": {"per_image": 0.01}}]}
    server, _ = await start_proxy(cfg)
    alice, bob = client_for(server, ALICE), client_for(server, BOB)
    start = int(time.time()) - 5
    try:
        # alice: 2 placeholder jobs of 2 images, 1 synchronous image; bob: 1 vendor job of 2 images 64x64
        # (the vendor route makes one image a call) and 1 edit job.
        for _ in range(2):
            assert (await run(server, alice, ALICE, n=2, response_format="b64_json"))["status"] == "completed"
        await alice.images.generate(model=PLACEHOLDER, prompt="a fox", size="1024x1024")
        assert (await run(server, bob, BOB, "vendor-image", n=2, size="64x64"))["status"] == "completed"
        source = io.BytesIO()
        Image.new("RGB", (96, 64), (200, 10, 10)).save(source, "PNG")
        raw = await bob.images.with_raw_response.edit(
            model="edit-placeholder", image=("in.png", source.getvalue(), "image/png"), prompt="make it blue",
            extra_body={"background": "true"})
        assert raw.http_response.status_code == 202
        edit = await wait_done(server, json.loads(raw.http_response.text)["id"], key=BOB)
        assert edit["status"] == "completed" and edit["kind"] == "edit"
    finally:
        await alice.close()
        await bob.close()

    params = [("start_time", str(start)), ("group_by[]", "api_key_id"), ("group_by[]", "model"),
              ("group_by[]", "source")]
    status, page = await api(server, "/v1/organization/usage/images", params)
    assert status == 200, page
    got = {(x["api_key_id"], x["model"], x["source"]): (x["images"], x["num_model_requests"])
           for x in page["data"][0]["results"]}
    assert got == {("alice", PLACEHOLDER, "image.generation"): (5, 3),
                   ("bob", "vendor-image", "image.generation"): (2, 1),
                   ("bob", "edit-placeholder", "image.edit"): (1, 1)}
    status, page = await api(server, "/v1/organization/costs", [("start_time", str(start)),
                                                                ("group_by", "api_key_id,model")])
    costs = {(x["api_key_id"], x["model"]): x["amount"]["value"] for x in page["data"][0]["results"]}
    assert costs["alice", PLACEHOLDER] == pytest.approx(0.05, abs=1e-12)
    assert costs["bob", "edit-placeholder"] == pytest.approx(0.01, abs=1e-12)
    assert costs["bob", "vendor-image"] == pytest.approx(2 * 0.001 + 0.5 * 2 * 64 * 64 / 1e6, abs=1e-12)
    body = await metrics(server)
    assert 'qip_cost_usd_total{key="bob",model="vendor-image",route="vendor"}' in body


async def test_a_repeated_seeded_job_is_a_cache_hit(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = jobs_usage_config(tmp_path, vendor.url)
    cfg["models"]["vendor-image"]["cache"] = {"ttl_seconds": 600, "max_mb": 8, "scope": "key"}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, ALICE)
    fields = {"model": "vendor-image", "size": "64x64", "n": 2, "seed": 7, "response_format": "b64_json"}
    try:
        first = await run(server, alice, ALICE, **fields)
        calls = len(vendor.image_calls)
        second = await run(server, alice, ALICE, **fields)
        assert second["status"] == "completed" and len(vendor.image_calls) == calls  # no upstream call
        images = [base64.b64decode(d["b64_json"]) for d in first["result"]["data"]]
        assert [base64.b64decode(d["b64_json"]) for d in second["result"]["data"]] == images
        # A synchronous repeat finds the job's entry, and a job finds a synchronous call's.
        sync = await alice.images.with_raw_response.generate(
            model="vendor-image", prompt="a lighthouse", size="64x64", n=2, response_format="b64_json",
            extra_body={"seed": 7})
        assert sync.headers["x-qip-cache"] == "hit"
        assert [base64.b64decode(d.b64_json) for d in sync.parse().data] == images
        await alice.images.generate(model="vendor-image", prompt="an owl", size="64x64", response_format="b64_json",
                                    extra_body={"seed": 9})
        calls = len(vendor.image_calls)
        assert (await run(server, alice, ALICE, **{**fields, "n": 1, "seed": 9}, prompt="an owl"))["status"] == "completed"
        assert len(vendor.image_calls) == calls
        # Submitted with Cache-Control: no-cache, a job asks the upstream again.
        job = await submit(alice, **fields, headers={"Cache-Control": "no-cache"})
        assert (await wait_done(server, job["id"], key=ALICE))["status"] == "completed"
        assert len(vendor.image_calls) == calls + 2
    finally:
        await alice.close()

    jobs = {r.request_id: r for r in await records(server) if r.request_id.startswith("imgjob_")}
    assert not jobs[first["id"]].cache_hit and jobs[first["id"]].cost_usd > 0
    hit = jobs[second["id"]]
    assert hit.cache_hit and hit.cost_usd == 0.0 and hit.images_delivered == 2 and hit.route == "vendor"
    assert not jobs[job["id"]].cache_hit
    assert 'qip_cache_hits_total{model="vendor-image"} 3.0' in await metrics(server)


async def test_a_spent_key_still_gets_its_seeded_repeat_from_the_cache(start_proxy, aiohttp_server, tmp_path):
    """As a synchronous repeat is served from the cache whatever the budget says, so is a job's: its
    submit takes no budget when the cache holds it (a new seed is refused: the day is spent)."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = jobs_usage_config(tmp_path, vendor.url)
    cfg["models"]["vendor-image"]["cache"] = {"ttl_seconds": 600, "max_mb": 8, "scope": "key"}
    cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 2}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, ALICE)
    fields = {"model": "vendor-image", "size": "64x64", "n": 2, "seed": 7, "response_format": "b64_json"}
    try:
        first = await run(server, alice, ALICE, **fields)  # the day's 2 images
        assert first["status"] == "completed"
        calls = len(vendor.image_calls)
        with pytest.raises(RateLimitError) as info:
            await submit(alice, **{**fields, "seed": 8})
        assert info.value.body["code"] == "insufficient_quota"
        again = await run(server, alice, ALICE, **fields)
        assert again["status"] == "completed" and len(vendor.image_calls) == calls
        assert ([base64.b64decode(d["b64_json"]) for d in again["result"]["data"]]
                == [base64.b64decode(d["b64_json"]) for d in first["result"]["data"]])
        with pytest.raises(RateLimitError):  # the hit took nothing, and gave nothing back
            await submit(alice, **{**fields, "seed": 9, "n": 1})
    finally:
        await alice.close()


async def test_a_job_cancelled_before_it_ran_gives_its_images_back(start_proxy, aiohttp_server, tmp_path):
    """A job holds its images in the budget from its submit; cancelled while queued (it never ran), it gives
    them back; a running one cancelled gives back what it did not deliver."""
    vendor = await FakeOpenAIUpstream(delay=30).start(aiohttp_server)
    cfg = jobs_usage_config(tmp_path, vendor.url)
    cfg["jobs"]["workers"] = 1
    cfg["server"]["api_keys"][0]["budget"] = {"images_per_day": 2}
    server, _ = await start_proxy(cfg)
    alice = client_for(server, ALICE)
    try:
        running = await submit(alice, "vendor-image", size="64x64")
        queued = await submit(alice, "vendor-image", size="64x64")
        with pytest.raises(RateLimitError):  # 2 images held by the two jobs
            await submit(alice, "vendor-image", size="64x64")
        async with asyncio.timeout(30):
            while vendor.in_flight == 0:  # the first job is at the vendor
                await asyncio.sleep(0.02)
        status, _, job = await http(server, "POST", f"/v1/images/jobs/{queued['id']}/cancel", key=ALICE)
        assert status == 200 and job["status"] == "cancelled" and job["started_at"] is None
        third = await submit(alice, "vendor-image", size="64x64")  # the cancelled job's image is free again
        with pytest.raises(RateLimitError):
            await submit(alice, "vendor-image", size="64x64")
        for job in (running, third):
            assert (await http(server, "POST", f"/v1/images/jobs/{job['id']}/cancel", key=ALICE))[0] == 200
        async with asyncio.timeout(30):
            while vendor.in_flight:
                await asyncio.sleep(0.02)
        await alice.images.generate(model=PLACEHOLDER, prompt="a fox", size="1024x1024", n=2)  # all back
    finally:
        await alice.close()
    jobs = {r.request_id: r for r in await records(server) if r.request_id.startswith("imgjob_")}
    assert (jobs[running["id"]].status, jobs[running["id"]].outcome) == (499, "cancelled")
    assert queued["id"] not in jobs  # it never ran: no image request to record
