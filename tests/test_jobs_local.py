"""Background jobs on the tiny local model: 20 jobs with signed webhooks give the same bytes as synchronous
calls; a `serve` process killed with SIGKILL mid-job loses none of its 10 jobs on restart."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from .fake_openai_upstream import free_port  # noqa: E402
from .test_jobs_e2e import KEY, http, jobs_config, submit, wait_done, wait_progress  # noqa: E402
from .test_local_e2e import MODEL, local_config, steps_total, wait_until  # noqa: E402
from .webhook_receiver import Receiver  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_jobs_config(tmp_path, tiny_dir, **jobs) -> dict:
    cfg = local_config(tmp_path, tiny_dir)
    extra = jobs_config(tmp_path, **jobs)
    cfg.update(jobs=extra["jobs"], fetch=extra["fetch"], server=extra["server"])
    return cfg


async def test_twenty_background_jobs_match_synchronous_calls(start_proxy, tmp_path, tiny_dir, aiohttp_server):
    receiver = await Receiver().start(aiohttp_server)
    # One at a time: the engine batches concurrent calls, and a batch's float sums differ in the last bits.
    server, client = await start_proxy(tiny_jobs_config(tmp_path, tiny_dir, workers=1))
    jobs = []
    for i in range(20):
        fmt = "b64_json" if i % 2 else "url"
        status, headers, job = await submit(client, model=MODEL, prompt=f"job {i}", size="64x64", seed=100 + i,
                                            response_format=fmt, webhook_url=receiver.url)
        assert status == 202 and headers["location"].endswith(job["id"])
        jobs.append(job)
    arrivals = await receiver.wait_for(20, timeout=600)
    async with aiohttp.ClientSession() as s:
        for i, job in enumerate(jobs):
            done = await wait_done(server, job["id"], timeout=120)
            assert done["status"] == "completed", done["error"]
            item = done["result"]["data"][0]
            if "url" in item and item["url"]:
                async with s.get(item["url"]) as r:
                    got = await r.read()
            else:
                got = base64.b64decode(item["b64_json"])
            sync = await client.images.generate(model=MODEL, prompt=f"job {i}", size="64x64",
                                                response_format="b64_json", extra_body={"seed": 100 + i})
            assert got == base64.b64decode(sync.data[0].b64_json), f"job {i} differs from the synchronous call"
    await asyncio.sleep(0.5)  # any duplicate would be on its way by now
    assert len(receiver.arrivals) == 20  # once per event: nothing answered with an error, nothing was resent
    assert all(a.verified and a.event == "image.job.completed" for a in arrivals)
    assert sorted(a.job_id for a in arrivals) == sorted(j["id"] for j in jobs)
    assert len({a.msg_id for a in arrivals}) == 20


def _serve(config: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # The log goes to a file: a pipe nobody reads fills up (progress bars) and stalls the server.
    log = open(config.parent / "serve.log", "ab")  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port",
                                 str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


async def _ready(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (Path(proc.args[5]).parent / "serve.log").read_text()[-3000:]
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(f"{base}/ready") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise AssertionError("the proxy did not get ready")


async def test_sigkill_mid_job_loses_nothing(tmp_path, tiny_dir, aiohttp_server):
    receiver = await Receiver().start(aiohttp_server)
    cfg = tiny_jobs_config(tmp_path, tiny_dir, workers=2, lease_seconds=1)
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump(cfg))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    proc = _serve(config, port)
    try:
        async with aiohttp.ClientSession(headers=auth) as s:
            await _ready(s, base, proc)
            ids = []
            for i in range(10):
                body = {"model": MODEL, "prompt": f"k{i}", "size": "64x64", "seed": i, "background": True,
                        "num_inference_steps": 30, "webhook_url": receiver.url}
                async with s.post(f"{base}/v1/images/generations", json=body) as r:
                    assert r.status == 202
                    ids.append((await r.json())["id"])
            async with asyncio.timeout(120):  # kill it while a job runs
                while True:
                    async with s.get(f"{base}/v1/images/jobs?status=in_progress") as r:
                        if (await r.json())["data"]:
                            break
                    await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)

            proc = _serve(config, port)
            await _ready(s, base, proc)
            final = {}
            async with asyncio.timeout(600):
                for job_id in ids:
                    while True:
                        async with s.get(f"{base}/v1/images/jobs/{job_id}") as r:
                            assert r.status == 200  # none lost
                            job = await r.json()
                        if job["status"] not in ("queued", "in_progress"):
                            final[job_id] = job
                            break
                        await asyncio.sleep(0.1)
            assert {j["status"] for j in final.values()} == {"completed"}, [j["error"] for j in final.values()]
            await receiver.wait_for(10, timeout=120)
            await asyncio.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ids_per_job = defaultdict(set)
    for a in receiver.arrivals:
        assert a.verified and a.event == "image.job.completed"
        ids_per_job[a.job_id].add(a.msg_id)
    assert set(ids_per_job) == set(ids)
    assert all(len(msg_ids) == 1 for msg_ids in ids_per_job.values())  # never two ids for one event


async def test_progress_shows_and_cancel_frees_the_engine(start_proxy, tmp_path, tiny_dir, aiohttp_server):
    receiver = await Receiver().start(aiohttp_server)
    server, client = await start_proxy(tiny_jobs_config(tmp_path, tiny_dir, workers=2))
    _, _, long = await submit(client, model=MODEL, size="64x64", seed=1, num_inference_steps=500,
                              webhook_url=receiver.url)
    job = await wait_progress(server, long["id"])
    assert job["status"] == "in_progress"
    assert job["progress"]["steps_total"] == 500 and 0 < job["progress"]["steps_done"] < 500
    status, _, job = await http(server, "POST", f"/v1/images/jobs/{long['id']}/cancel")
    assert status == 200 and job["status"] == "cancelled"

    async def stopped() -> bool:
        before = await steps_total(server)
        await asyncio.sleep(0.3)
        return await steps_total(server) == before

    await wait_until(stopped, timeout=60)
    ran = await steps_total(server)
    assert ran < 250  # stopped where it was, as a client hanging up stops it
    # The engine is free: the next job runs its own 3 steps, and the cancelled one never resumes.
    _, _, short = await submit(client, model=MODEL, size="64x64", seed=2, num_inference_steps=3)
    done = await wait_done(server, short["id"], timeout=120)
    assert done["status"] == "completed"
    await asyncio.sleep(0.3)
    assert await steps_total(server) == ran + 3
    (arrival,) = await receiver.wait_for(1)
    assert arrival.event == "image.job.cancelled" and arrival.job_id == long["id"]


async def test_sigterm_leaves_jobs_for_the_next_start(tmp_path, tiny_dir, aiohttp_server):
    cfg = tiny_jobs_config(tmp_path, tiny_dir, workers=1, lease_seconds=1)
    cfg["server"]["shutdown_grace"] = 1  # shorter than a job: the running one goes back to the queue too
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump(cfg))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(config, port)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
            await _ready(s, base, proc)
            ids = []
            for i in range(4):
                body = {"model": MODEL, "prompt": f"t{i}", "size": "64x64", "seed": i, "background": True,
                        "num_inference_steps": 200}
                async with s.post(f"{base}/v1/images/generations", json=body) as r:
                    assert r.status == 202
                    ids.append((await r.json())["id"])
            async with asyncio.timeout(120):
                while True:
                    async with s.get(f"{base}/v1/images/jobs?status=in_progress") as r:
                        if (await r.json())["data"]:
                            break
                    await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            proc = _serve(config, port)
            await _ready(s, base, proc)
            async with asyncio.timeout(600):
                for job_id in ids:
                    while True:
                        async with s.get(f"{base}/v1/images/jobs/{job_id}") as r:
                            job = await r.json()
                        if job["status"] not in ("queued", "in_progress"):
                            break
                        await asyncio.sleep(0.1)
                    assert job["status"] == "completed", job["error"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
