"""Background jobs end to end on the placeholder model and a fake vendor: the openai client submits
(`extra_body={"background": True}`, the 202 read raw), plain HTTP polls, cancels and deletes, and a real
receiver checks each webhook's Standard Webhooks signature with the `standardwebhooks` package."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json

import aiohttp
from PIL import Image

from proxy.app import GATEWAY
from proxy.jobs.model import Job, new_job_id, request_to_bytes
from proxy.jobs.sqlite_store import SqliteJobStore
from proxy.request import ImageRequest

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream
from .webhook_receiver import SECRET, Receiver

MODEL = "qwen-image-placeholder"
KEY = "test"


def jobs_config(tmp_path, **jobs) -> dict:
    cfg = base_config(tmp_path)
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3"), "webhook_secret": SECRET, "lease_seconds": 3,
                   "webhook_backoff_base": 0.05, "webhook_backoff_max": 0.2, "webhook_timeout": 5, **jobs}
    # The receiver listens on loopback: let webhooks (and only in these tests) reach it over http.
    cfg["fetch"] = {"allow_http": True, "allowed_networks": ["127.0.0.0/8"]}
    cfg["server"] = {"api_keys": [{"name": "alice", "key": KEY}, {"name": "bob", "key": "other-key"}]}
    return cfg


def with_vendor(cfg: dict, fake: FakeOpenAIUpstream) -> dict:
    cfg["size_tables"]["small"] = dict(SMALL_SIZES)
    cfg["providers"]["vendor"] = {"kind": "openai", "base_url": f"{fake.url}/openai/v1", "api_key": fake.api_key}
    cfg["models"]["vendor-image"] = {"sizes": "small", "routes": ["vendor"]}
    return cfg


async def http(server, method: str, path: str, key: str = KEY, **kwargs) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s, s.request(method, server.make_url(path),
                                                        headers={"Authorization": f"Bearer {key}",
                                                                 **kwargs.pop("headers", {})}, **kwargs) as r:
        return r.status, dict(r.headers), await r.json(content_type=None)


async def submit(client, **fields) -> tuple[int, dict, dict]:
    raw = await client.images.with_raw_response.generate(
        model=fields.pop("model", MODEL), prompt=fields.pop("prompt", "a lighthouse"),
        extra_body={"background": True, **fields})
    return raw.http_response.status_code, dict(raw.headers), json.loads(raw.http_response.text)


async def wait_done(server, job_id: str, key: str = KEY, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            status, _, job = await http(server, "GET", f"/v1/images/jobs/{job_id}", key)
            assert status == 200, job
            if job["status"] not in ("queued", "in_progress"):
                return job
            await asyncio.sleep(0.05)


async def wait_progress(server, job_id: str, key: str = KEY, steps: int = 1, timeout: float = 120) -> dict:
    """The job once its progress shows at least `steps` steps done."""
    async with asyncio.timeout(timeout):
        while True:
            _, _, job = await http(server, "GET", f"/v1/images/jobs/{job_id}", key)
            if job["progress"] and job["progress"]["steps_done"] >= steps:
                return job
            await asyncio.sleep(0.05)


async def wait_delivery(server, job_id: str, state: str, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            _, _, job = await http(server, "GET", f"/v1/images/jobs/{job_id}")
            deliveries = job["webhook"]["deliveries"]
            if deliveries and deliveries[0]["state"] == state:
                return job
            await asyncio.sleep(0.05)


def png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


# ---- submitting and reading ---------------------------------------------------------------------------


async def test_background_json_answers_202_and_get_returns_the_same_images(start_proxy, tmp_path):
    server, client = await start_proxy(jobs_config(tmp_path))
    status, headers, job = await submit(client, seed=11, size="64x48", response_format="b64_json")
    assert status == 202
    # Absolute (RFC 9110 allows a relative one, but clients that follow it by hand need the origin).
    assert headers["location"] == str(server.make_url(f"/v1/images/jobs/{job['id']}"))
    assert job["object"] == "image.job" and job["status"] in ("queued", "in_progress")
    assert job["id"].startswith("imgjob_") and job["model"] == MODEL and job["request"]["seed"] == 11
    assert job["result"] is None and job["error"] is None and job["webhook"] is None
    done = await wait_done(server, job["id"])
    assert done["status"] == "completed" and done["completed_at"] >= done["created_at"]
    sync = await client.images.generate(model=MODEL, prompt="a lighthouse", size="64x48", response_format="b64_json",
                                        extra_body={"seed": 11})
    assert base64.b64decode(done["result"]["data"][0]["b64_json"]) == base64.b64decode(sync.data[0].b64_json)
    assert png(done["result"]["data"][0]["b64_json"]).size == (64, 48)
    assert done["result"]["seeds"] == [11] and done["result"]["size"] == "64x48"


async def test_location_follows_public_base_url(start_proxy, tmp_path):
    cfg = jobs_config(tmp_path)
    cfg["server"]["public_base_url"] = "https://images.example.com/qip"
    server, client = await start_proxy(cfg)
    status, headers, job = await submit(client, size="64x64", response_format="url")
    assert status == 202 and headers["location"] == f"https://images.example.com/qip/v1/images/jobs/{job['id']}"
    done = await wait_done(server, job["id"])  # the image links are under the same base
    assert done["result"]["data"][0]["url"].startswith("https://images.example.com/qip/images/")


async def test_prefer_respond_async_and_url_results(start_proxy, tmp_path):
    server, client = await start_proxy(jobs_config(tmp_path))
    status, headers, job = await http(server, "POST", "/v1/images/generations",
                                      headers={"Prefer": "respond-async, wait=10"},
                                      json={"model": MODEL, "prompt": "a fox", "size": "64x64", "n": 2})
    assert status == 202 and headers["Preference-Applied"] == "respond-async"
    assert job["request"]["seed"] is not None  # chosen now: a rerun after a restart makes the same images
    done = await wait_done(server, job["id"])
    urls = [item["url"] for item in done["result"]["data"]]
    assert len(urls) == 2
    async with aiohttp.ClientSession() as s:
        for url in urls:
            async with s.get(url) as r:
                assert r.status == 200
                assert Image.open(io.BytesIO(await r.read())).size == (64, 64)
    # A transparency request (OpenAI's string `background`) is no background job.
    sync = await client.images.generate(model=MODEL, prompt="x", size="64x64", background="opaque")
    assert sync.data[0].url


async def test_multipart_edit_in_background(start_proxy, tmp_path):
    cfg = jobs_config(tmp_path)
    cfg["models"]["edit-placeholder"] = {"sizes": "qwen-image", "routes": ["placeholder"], "max_input_images": 3}
    server, client = await start_proxy(cfg)
    source = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 10, 10)).save(source, "PNG")
    raw = await client.images.with_raw_response.edit(
        model="edit-placeholder", prompt="make it blue", image=("in.png", source.getvalue(), "image/png"),
        response_format="b64_json", extra_body={"background": "true", "seed": 5})
    assert raw.http_response.status_code == 202
    job = json.loads(raw.http_response.text)
    assert job["kind"] == "edit" and job["request"]["images"] == [{"width": 96, "height": 64, "format": "png"}]
    done = await wait_done(server, job["id"])
    assert done["status"] == "completed"
    sync = await client.images.edit(model="edit-placeholder", prompt="make it blue",
                                    image=("in.png", source.getvalue(), "image/png"), response_format="b64_json",
                                    extra_body={"seed": 5})
    assert done["result"]["data"][0]["b64_json"] == sync.data[0].b64_json


async def test_list_is_per_key_paged_and_filtered(start_proxy, tmp_path):
    server, client = await start_proxy(jobs_config(tmp_path))
    ids = [(await submit(client, size="64x64"))[2]["id"] for _ in range(5)]
    for job_id in ids:
        await wait_done(server, job_id)
    status, _, page = await http(server, "GET", "/v1/images/jobs?limit=2")
    assert status == 200 and page["object"] == "list" and page["has_more"] is True
    assert [j["id"] for j in page["data"]] == ids[::-1][:2]
    _, _, page2 = await http(server, "GET", f"/v1/images/jobs?limit=10&after={page['last_id']}")
    assert [j["id"] for j in page2["data"]] == ids[::-1][2:] and page2["has_more"] is False
    _, _, done = await http(server, "GET", "/v1/images/jobs?status=completed")
    assert len(done["data"]) == 5
    _, _, none = await http(server, "GET", "/v1/images/jobs?status=failed")
    assert none["data"] == []
    _, _, other = await http(server, "GET", "/v1/images/jobs", key="other-key")
    assert other["data"] == []
    for bad in ("limit=0", "limit=101", "limit=x", "status=done"):
        status, _, error = await http(server, "GET", f"/v1/images/jobs?{bad}")
        assert status == 400 and error["error"]["param"] in ("limit", "status")


async def test_idempotency_key_gives_the_same_job(start_proxy, tmp_path):
    server, client = await start_proxy(jobs_config(tmp_path))
    body = {"model": MODEL, "prompt": "once", "size": "64x64", "background": True}
    s1, h1, j1 = await http(server, "POST", "/v1/images/generations", json=body, headers={"Idempotency-Key": "k-1"})
    s2, h2, j2 = await http(server, "POST", "/v1/images/generations", json=body, headers={"Idempotency-Key": "k-1"})
    assert (s1, s2) == (202, 202) and j1["id"] == j2["id"] and h2["Idempotent-Replayed"] == "true"
    _, _, page = await http(server, "GET", "/v1/images/jobs")
    assert len(page["data"]) == 1


# ---- cancel, delete, the per-key cap ------------------------------------------------------------------


async def test_cancel_running_and_queued_jobs_and_the_queue_cap(start_proxy, tmp_path, aiohttp_server):
    fake = await FakeOpenAIUpstream(delay=30).start(aiohttp_server)
    receiver = await Receiver().start(aiohttp_server)
    cfg = with_vendor(jobs_config(tmp_path, workers=1, max_queued_per_key=2), fake)
    server, client = await start_proxy(cfg)
    _, _, running = await submit(client, model="vendor-image", webhook_url=receiver.url)
    _, _, queued = await submit(client, model="vendor-image", webhook_url=receiver.url)
    status, headers, error = await http(server, "POST", "/v1/images/generations",
                                        json={"model": "vendor-image", "prompt": "x", "background": True})
    assert status == 429 and error["error"]["code"] == "too_many_jobs" and int(headers["Retry-After"]) >= 1
    async with asyncio.timeout(30):
        while fake.in_flight == 0:  # the first job is at the vendor now
            await asyncio.sleep(0.02)

    status, _, job = await http(server, "POST", f"/v1/images/jobs/{queued['id']}/cancel")
    assert status == 200 and job["status"] == "cancelled" and job["started_at"] is None
    status, _, job = await http(server, "POST", f"/v1/images/jobs/{running['id']}/cancel")
    assert status == 200 and job["status"] == "cancelled"
    async with asyncio.timeout(30):  # the upstream call was dropped, as when a client hangs up
        while fake.in_flight:
            await asyncio.sleep(0.02)
    assert len(fake.requests) == 1  # the queued job never reached the vendor

    arrivals = await receiver.wait_for(2)
    assert sorted(a.job_id for a in arrivals) == sorted([running["id"], queued["id"]])
    assert {a.event for a in arrivals} == {"image.job.cancelled"} and all(a.verified for a in arrivals)
    # Cancelling again is harmless; deleting a cancelled job works; the cap has room again.
    assert (await http(server, "POST", f"/v1/images/jobs/{queued['id']}/cancel"))[0] == 200
    assert (await http(server, "DELETE", f"/v1/images/jobs/{queued['id']}"))[2]["deleted"] is True
    assert (await http(server, "GET", f"/v1/images/jobs/{queued['id']}"))[0] == 404
    status, _, last = await submit(client, model="vendor-image")
    assert status == 202
    await http(server, "POST", f"/v1/images/jobs/{last['id']}/cancel")


async def test_delete_removes_the_stored_images_and_only_after_the_end(start_proxy, tmp_path, aiohttp_server):
    fake = await FakeOpenAIUpstream(delay=30).start(aiohttp_server)
    server, client = await start_proxy(with_vendor(jobs_config(tmp_path), fake))
    _, _, slow = await submit(client, model="vendor-image")
    status, _, error = await http(server, "DELETE", f"/v1/images/jobs/{slow['id']}")
    assert status == 409 and error["error"]["code"] == "job_not_finished"
    _, _, job = await submit(client, size="64x64")
    done = await wait_done(server, job["id"])
    url = done["result"]["data"][0]["url"]
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
        assert (await http(server, "DELETE", f"/v1/images/jobs/{job['id']}"))[0] == 200
        async with s.get(url) as r:
            assert r.status == 404
    status, _, error = await http(server, "POST", f"/v1/images/jobs/{done['id']}/cancel")
    assert status == 404
    await http(server, "POST", f"/v1/images/jobs/{slow['id']}/cancel")


async def test_a_failed_job_carries_the_openai_error(start_proxy, tmp_path, aiohttp_server):
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    fake.fail(400, "content_policy_violation", "the prompt was refused")
    receiver = await Receiver().start(aiohttp_server)
    server, client = await start_proxy(with_vendor(jobs_config(tmp_path), fake))
    _, _, job = await submit(client, model="vendor-image", webhook_url=receiver.url)
    done = await wait_done(server, job["id"])
    assert done["status"] == "failed" and done["result"] is None
    assert set(done["error"]) == {"message", "type", "param", "code"}
    assert fake.api_key not in json.dumps(done)
    (arrival,) = await receiver.wait_for(1)
    assert arrival.event == "image.job.failed" and arrival.verified
    assert arrival.body["data"]["error"] == done["error"]
    status, _, error = await http(server, "POST", f"/v1/images/jobs/{job['id']}/cancel")
    assert status == 409 and error["error"]["code"] == "job_not_cancellable"


# ---- webhooks ---------------------------------------------------------------------------------------------


async def test_webhook_retried_after_three_503s_with_the_same_id(start_proxy, tmp_path, aiohttp_server):
    receiver = await Receiver(answers=[503, 503, 503, 200]).start(aiohttp_server)
    server, client = await start_proxy(jobs_config(tmp_path))
    _, _, job = await submit(client, size="64x64", webhook_url=receiver.url)
    arrivals = await receiver.wait_for(4)
    assert len({a.msg_id for a in arrivals}) == 1 and arrivals[0].msg_id.startswith("msg_")
    assert all(a.verified and a.event == "image.job.completed" and a.job_id == job["id"] for a in arrivals)
    done = await wait_delivery(server, job["id"], "delivered")
    (delivery,) = done["webhook"]["deliveries"]
    assert [a["status"] for a in delivery["attempts"]] == [503, 503, 503, 200]
    assert delivery["id"] == arrivals[0].msg_id and delivery["event"] == "image.job.completed"
    # The payload is small: the image's URL, never its bytes.
    assert "b64_json" not in json.dumps(arrivals[-1].body)
    assert arrivals[-1].body["data"]["result"]["data"][0]["url"].startswith("http")
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        metrics = await r.text()
    assert 'qip_webhook_attempts_total{result="retry"} 3.0' in metrics
    assert 'qip_webhook_attempts_total{result="delivered"} 1.0' in metrics
    assert f'qip_jobs_total{{model="{MODEL}",status="completed"}} 1.0' in metrics


async def test_webhook_410_stops_retries(start_proxy, tmp_path, aiohttp_server):
    receiver = await Receiver(answers=[410, 200]).start(aiohttp_server)
    server, client = await start_proxy(jobs_config(tmp_path))
    _, _, job = await submit(client, size="64x64", webhook_url=receiver.url, response_format="b64_json")
    done = await wait_delivery(server, job["id"], "gone")
    assert [a["status"] for a in done["webhook"]["deliveries"][0]["attempts"]] == [410]
    # Another message would long have come at these backoffs (50-200 ms): none does.
    await asyncio.sleep(1.0)
    assert len(receiver.arrivals) == 1 and receiver.arrivals[0].verified


async def test_key_webhook_from_config(start_proxy, tmp_path, aiohttp_server):
    receiver = await Receiver().start(aiohttp_server)
    server, client = await start_proxy(jobs_config(tmp_path, key_webhooks={"alice": {"url": receiver.url}}))
    _, _, job = await submit(client, size="64x64")
    (arrival,) = await receiver.wait_for(1)
    assert arrival.job_id == job["id"] and arrival.verified
    assert job["webhook"]["url"] == receiver.url


async def test_sigterm_drain_lets_running_jobs_finish_and_keeps_queued_ones(start_proxy, tmp_path, aiohttp_server):
    fake = await FakeOpenAIUpstream(delay=0.5).start(aiohttp_server)
    cfg = with_vendor(jobs_config(tmp_path, workers=1), fake)
    cfg["server"]["shutdown_grace"] = 30
    server, client = await start_proxy(cfg)
    first = (await submit(client, model="vendor-image"))[2]
    second = (await submit(client, model="vendor-image"))[2]
    async with asyncio.timeout(30):
        while fake.in_flight == 0:
            await asyncio.sleep(0.02)
    gateway = server.app[GATEWAY]
    await gateway.drain()
    store = gateway.jobs.store
    assert (await store.get(first["id"])).status == "completed"  # finished within the grace
    assert (await store.get(second["id"])).status == "queued"  # left for the next start
    assert len(fake.requests) == 1
    status, _, error = await http(server, "POST", "/v1/images/generations",
                                  json={"model": MODEL, "prompt": "x", "background": True})
    assert status == 503


async def test_jobs_off(start_proxy, tmp_path):
    server, client = await start_proxy(jobs_config(tmp_path, enabled=False))
    status, _, error = await http(server, "POST", "/v1/images/generations",
                                  json={"model": MODEL, "prompt": "x", "background": True})
    assert status == 400 and error["error"]["code"] == "background_disabled"
    assert not (tmp_path / "jobs.sqlite3").exists()


async def test_an_interrupted_vendor_job_fails_and_a_local_one_runs_again(start_proxy, tmp_path, aiohttp_server):
    """What a proxy killed mid-job leaves (a job in_progress whose lease ran out), found by the next start."""
    fake = await FakeOpenAIUpstream().start(aiohttp_server)
    receiver = await Receiver().start(aiohttp_server)
    cfg = with_vendor(jobs_config(tmp_path, lease_seconds=1), fake)
    dead = SqliteJobStore(cfg["jobs"]["path"])
    await dead.start()
    made = {}
    for model, safe in (("vendor-image", False), (MODEL, True)):
        job = Job(id=new_job_id(), owner=client_scope_of(KEY), key_name="alice", model=model, kind="generation",
                  request={"response_format": "url"}, rerun_safe=safe, webhook_url=receiver.url)
        req = ImageRequest(prompt="p", model=model, width=64, height=64, seed=3)
        assert await dead.create(job, request_to_bytes(req), 10)
        claimed = await dead.claim("dead-process", lease=0.01)
        claimed.runs = 1  # it had started
        assert await dead.save(claimed, "dead-process")
        made[model] = job.id
    await dead.close()

    server, client = await start_proxy(cfg)
    vendor = await wait_done(server, made["vendor-image"])
    assert vendor["status"] == "failed" and vendor["error"]["code"] == "job_interrupted"
    assert "may already have charged" in vendor["error"]["message"]
    local = await wait_done(server, made[MODEL])
    assert local["status"] == "completed" and local["result"]["data"][0]["url"]
    assert fake.requests == []  # the vendor was not called again
    arrivals = await receiver.wait_for(2)
    assert {(a.job_id, a.event) for a in arrivals} == {(made["vendor-image"], "image.job.failed"),
                                                        (made[MODEL], "image.job.completed")}


def client_scope_of(key: str) -> str:
    return hashlib.sha256(f"Bearer {key}".encode()).hexdigest()[:32]
