"""Traces of background work: a job's run is the root of a trace of its own, linked to the request that
submitted it, holding its route attempts; each webhook delivery attempt is a span linked to that run. The
spans are collected over OTLP/HTTP (decoded with opentelemetry-proto), and carry no key, prompt or secret."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.jobs.model import Job, new_job_id, public_request, request_to_bytes
from proxy.jobs.sqlite_store import SqliteJobStore
from proxy.request import ImageRequest

from .fake_openai_upstream import FakeOpenAIUpstream
from .otlp_receiver import OtlpReceiver, children, one
from .test_jobs_e2e import client_scope_of, jobs_config, wait_done
from .test_tracing import receiver, traceparent  # noqa: F401 - the fixture
from .webhook_receiver import SECRET, Receiver

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")

KEY = "sentinel-job-key-5e81c0d2"
PROMPT = "a sentinel lighthouse 77f3"


def traced_config(tmp_path, otlp: OtlpReceiver) -> dict:
    cfg = jobs_config(tmp_path)
    cfg["server"] = {"api_keys": [{"name": "alice", "key": KEY}]}
    cfg["telemetry"] = {"otlp_endpoint": otlp.url, "service_name": "qip-jobs"}
    return cfg


async def post(server, body: dict, headers: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"), json=body,
                                                     headers={"Authorization": f"Bearer {KEY}", **headers}) as r:
        return r.status, await r.json()


async def test_a_job_run_is_a_linked_trace_with_its_route_attempts_and_webhook_deliveries(
        start_proxy, tmp_path, aiohttp_server, receiver):  # noqa: F811 - the fixture
    hook = await Receiver(answers=[503, 200]).start(aiohttp_server)
    server, _ = await start_proxy(traced_config(tmp_path, receiver))
    trace_id, client_span, header = traceparent()
    webhook_url = f"{hook.url}?token=sentinel-query-3a9d"  # a capability in the query: never in a span
    status, job = await post(server, {"model": "qwen-image-placeholder", "prompt": PROMPT, "size": "64x64",
                                      "background": True, "webhook_url": webhook_url, "seed": 3},
                             {"traceparent": header, "X-Request-Id": "req-job-1"})
    assert status == 202, job
    done = await wait_done(server, job["id"], key=KEY)
    assert done["status"] == "completed"
    await hook.wait_for(2)  # a 503, then delivered

    submitted = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-job-1"})
    request = one(submitted, "POST /v1/images/generations")
    assert request.trace_id == trace_id and request.parent_id == client_span
    assert request.attributes["qip.job_id"] == job["id"] and request.attributes["http.response.status_code"] == 202
    assert not children(submitted, request, "route_attempt")  # the submit routes nothing

    spans = await receiver.trace_with("image_job", **{"qip.job_id": job["id"]})
    run = one(spans, "image_job")
    # A trace of its own (it may run long after the request ended), linked to the submitting request.
    assert run.parent_id == "" and run.trace_id != trace_id and run.kind == 5  # CONSUMER
    assert run.links == [(trace_id, request.span_id)]
    assert run.service == "qip-jobs"
    a = run.attributes
    assert (a["qip.model"], a["qip.key"], a["qip.job.kind"]) == ("qwen-image-placeholder", "alice", "generation")
    assert (a["qip.job.run"], a["qip.job.recovered"], a["qip.outcome"], a["qip.route"]) == (1, False, "completed",
                                                                                            "placeholder")
    assert run.status != 2
    (attempt,) = children(spans, run, "route_attempt")
    assert attempt.attributes["qip.route"] == "placeholder" and attempt.attributes["qip.outcome"] == "ok"
    assert len(children(spans, attempt, "image.check")) == 1

    async def deliveries() -> list:
        for _ in range(200):
            found = sorted((s for s in receiver.spans if s.name == "webhook.deliver"
                            and s.attributes.get("qip.job_id") == job["id"]), key=lambda s: s.start_ns)
            if len(found) == 2:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError("the webhook delivery spans did not arrive")

    first, second = await deliveries()
    for span, number, code, outcome in ((first, 1, 503, "retry"), (second, 2, 200, "delivered")):
        assert span.parent_id == "" and span.links == [(run.trace_id, run.span_id)]
        assert span.attributes["qip.webhook.event"] == "image.job.completed"
        assert span.attributes["qip.webhook.id"] == hook.arrivals[0].msg_id  # the same message id each time
        assert span.attributes["qip.webhook.attempt"] == number
        assert span.attributes["http.response.status_code"] == code and span.attributes["qip.outcome"] == outcome
        assert span.attributes["server.address"] == "127.0.0.1"
        (call,) = [s for s in receiver.spans if s.parent_id == span.span_id]  # the POST itself
        assert call.kind == 3 and call.attributes["url.full"] == hook.url  # no query
    assert first.status == 2 and second.status != 2

    everything = json.dumps([s.attributes for s in receiver.spans])
    for secret in (KEY, PROMPT, "sentinel-query-3a9d", SECRET):
        assert secret not in everything


async def test_a_failed_job_and_a_recovered_run(start_proxy, tmp_path, aiohttp_server, receiver):  # noqa: F811
    up = await FakeOpenAIUpstream(api_key="sk-up-4c1f").start(aiohttp_server)
    up.fail(503, "server_error", "overloaded")
    cfg = traced_config(tmp_path, receiver)
    cfg["providers"]["down"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "sk-up-4c1f"}
    cfg["models"]["down-image"] = {"sizes": "qwen-image", "routes": ["down"]}
    cfg["routing"] = {"retries": 0}
    cfg["jobs"]["lease_seconds"] = 1
    # A job its proxy died running (started once, its lease run out), submitted by a traced request.
    dead = SqliteJobStore(cfg["jobs"]["path"])
    await dead.start()
    req = ImageRequest(prompt=PROMPT, model="qwen-image-placeholder", width=1024, height=1024, seed=3)
    submit_trace, submit_span, header = traceparent()
    orphan = Job(id=new_job_id(), owner=client_scope_of(KEY), key_name="alice", model=req.model,
                 kind="generation", request=public_request(req), traceparent=header)
    assert await dead.create(orphan, request_to_bytes(req), 10)
    claimed = await dead.claim("dead-process", lease=0.01)
    claimed.runs = 1
    assert await dead.save(claimed, "dead-process")
    await dead.close()

    server, _ = await start_proxy(cfg)
    status, job = await post(server, {"model": "down-image", "prompt": PROMPT, "size": "1024x1024",
                                      "background": True}, {})
    assert status == 202
    done = await wait_done(server, job["id"], key=KEY)
    assert done["status"] == "failed"
    spans = await receiver.trace_with("image_job", **{"qip.job_id": job["id"]})
    run = one(spans, "image_job")
    assert run.status == 2 and run.attributes["qip.outcome"] == "failed"
    assert run.attributes["qip.error_code"] == done["error"]["code"]
    (attempt,) = children(spans, run, "route_attempt")
    assert attempt.attributes["qip.route"] == "down" and attempt.attributes["qip.outcome"] == "error"

    assert (await wait_done(server, orphan.id, key=KEY))["status"] == "completed"
    spans = await receiver.trace_with("image_job", **{"qip.job_id": orphan.id})
    rerun = one(spans, "image_job")
    assert rerun.attributes["qip.job.run"] == 2 and rerun.attributes["qip.job.recovered"] is True
    assert rerun.links == [(submit_trace, submit_span)] and rerun.attributes["qip.outcome"] == "completed"
    everything = json.dumps([s.attributes for s in receiver.spans])
    assert "sk-up-4c1f" not in everything and PROMPT not in everything and KEY not in everything
