"""OpenTelemetry traces end to end: the proxy exports spans over OTLP/HTTP to a receiver on loopback
(decoded with opentelemetry-proto), and each test checks the span tree a collector would show."""

from __future__ import annotations

import copy
import json
import logging
import secrets
import subprocess
import sys

import aiohttp
import pytest

from proxy.config import TelemetryConfig
from proxy.telemetry.settings import settings_from

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream, make_image
from .otlp_receiver import OtlpReceiver, children, one

pytest.importorskip("opentelemetry.exporter.otlp.proto.http")


@pytest.fixture
async def receiver(aiohttp_server, monkeypatch):
    # Batches leave every 50 ms (default 5 s); a receiver gone at teardown is not waited on for long.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2")
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                 "OTEL_TRACES_SAMPLER", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    return await OtlpReceiver().start(aiohttp_server)


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def test_failover_trace_shows_each_route_attempt_in_order(start_proxy, tmp_path, aiohttp_server, receiver,
                                                                 caplog):
    caplog.set_level(logging.INFO, logger="proxy.requests")
    up = await FakeOpenAIUpstream(api_key="sk-upstream-trace-key").start(aiohttp_server)
    up.fail(500, "server_error", "the GPU caught fire")
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["failing"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "sk-upstream-trace-key"}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["failing", "placeholder"]}
    cfg["routing"] = {"retries": 1, "backoff_base": 0.01, "backoff_max": 0.01}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url, "sample_ratio": 1.0, "service_name": "qip-test"}
    server, client = await start_proxy(cfg)
    trace_id, client_span, header = traceparent()
    body = {"model": "qwen-image", "prompt": "a lighthouse", "size": "64x64", "response_format": "url"}
    headers = {"traceparent": header, "X-Request-Id": "req-failover-1"}
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.make_url("/v1/images/generations"), headers=headers, json=body)
        assert r.status == 200, await r.text()
        assert r.headers["x-qip-route"] == "placeholder" and r.headers["x-qip-attempts"] == "3"
        async with s.get((await r.json())["data"][0]["url"]) as img:
            assert img.status == 200
    spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-failover-1"})
    root = one(spans, "POST /v1/images/generations")
    # The client's trace continues: same trace id, its span is the parent.
    assert root.trace_id == trace_id and root.parent_id == client_span and root.kind == 2  # SERVER
    assert root.service == "qip-test"
    assert root.attributes["qip.model"] == "qwen-image" and root.attributes["qip.route"] == "placeholder"
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["qip.outcome"] == "ok"
    assert root.attributes["qip.n"] == 1 and root.attributes["qip.size"] == "64x64"
    assert root.attributes["qip.stream"] is False and "qip.prompt" not in root.attributes
    assert [c.name for c in children(spans, root)][0] == "parse"
    attempts = children(spans, root, "route_attempt")
    assert [(a.attributes["qip.route"], a.attributes["qip.attempt"], a.attributes["qip.outcome"])
            for a in attempts] == [("failing", 1, "error"), ("failing", 2, "error"), ("placeholder", 1, "ok")]
    assert attempts[0].attributes["qip.provider"] == "openai" and attempts[0].attributes["qip.breaker_state"] == "closed"
    assert "the GPU caught fire" in attempts[0].attributes["qip.error"]
    assert len(children(spans, root, "retry_wait")) == 1  # between the failing route's two tries
    # Each failed attempt holds its upstream call: a client span with method, host and status, no secrets.
    for attempt in attempts[:2]:
        (call,) = children(spans, attempt, "POST")
        assert call.kind == 3 and call.attributes["http.response.status_code"] == 500  # CLIENT
        assert call.attributes["server.address"] == "127.0.0.1"
        assert call.attributes["url.full"].endswith("/v1/images/generations")
        assert call.status == 2
    # ...and the upstream got the trace with it (W3C traceparent naming that client span).
    sent = [r.headers.get("traceparent") for r in up.image_calls]
    calls = [c.span_id for a in attempts[:2] for c in children(spans, a, "POST")]
    assert sent == [f"00-{trace_id}-{span}-01" for span in calls]
    ok = attempts[2]
    (check,) = children(spans, ok, "image.check")
    assert check.attributes["qip.format"] == "png" and check.attributes["qip.width"] == 64
    (upload,) = children(spans, root, "store.upload")
    assert upload.attributes["qip.store"] == "FilesystemStore" and upload.attributes["qip.bytes"] > 0
    everything = json.dumps([s.attributes for s in spans])
    assert "sk-upstream-trace-key" not in everything and "a lighthouse" not in everything
    # The request's log line carries its id and its trace id together.
    line = next(r.getMessage() for r in caplog.records if r.name == "proxy.requests")
    assert "request_id=req-failover-1" in line and f"trace_id={trace_id}" in line


async def test_streamed_local_generation_traces_the_engine(start_proxy, tmp_path, tiny_dir, receiver, one_torch_thread):
    pytest.importorskip("diffusers")
    from .test_local_e2e import local_config

    cfg = local_config(tmp_path, tiny_dir)
    cfg["telemetry"] = {"otlp_endpoint": receiver.url, "record_prompts": True}
    server, _ = await start_proxy(cfg)
    body = {"model": "tiny", "prompt": "a tiny fox", "size": "64x64", "stream": True, "partial_images": 2,
            "num_inference_steps": 4}
    events = []
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"), json=body,
                      headers={"X-Request-Id": "req-stream-1"}) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"event: "):
                events.append(line[7:].strip().decode())
    assert events == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-stream-1"})
    root = one(spans, "POST /v1/images/generations")
    assert root.parent_id == "" and root.attributes["qip.stream"] is True
    assert root.attributes["qip.prompt"] == "a tiny fox"  # telemetry.record_prompts: true
    (attempt,) = children(spans, root, "route_attempt")
    assert attempt.attributes["qip.route"] == "local" and attempt.attributes["qip.provider"] == "diffusers"
    (queued,) = children(spans, attempt, "engine.queue_wait")
    (call,) = children(spans, attempt, "engine.call")
    assert queued.end_ns <= call.start_ns + 1_000_000
    assert call.attributes["qip.engine.steps"] == 4 and call.attributes["qip.engine.batch_size"] == 1
    stages = [c.name for c in children(spans, call)]
    assert stages[0] == "engine.text_encode" and stages[-2:] == ["engine.denoise", "engine.vae_decode"], stages
    (denoise,) = children(spans, call, "engine.denoise")
    assert denoise.attributes["qip.engine.steps_run"] == 4 and denoise.attributes["qip.engine.steps"] == 4
    assert denoise.attributes["qip.engine.tier"] == "base"
    previews = children(spans, denoise, "engine.preview")
    assert [p.attributes["qip.engine.partial_image_index"] for p in previews] == [0, 1]
    assert all(denoise.start_ns <= p.start_ns and p.end_ns <= denoise.end_ns for p in previews)
    assert len(children(spans, attempt, "engine.encode")) == 1
    assert len(children(spans, root, "stream.partial_image")) == 2
    assert all(s.end_ns <= root.end_ns for s in spans)
    # The queue wait is a metric too (QipGpuQueueWaitHigh).
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        assert 'qip_local_queue_wait_seconds_count{provider="local"} 1.0' in await r.text()


async def test_image_downloads_are_client_spans(start_proxy, tmp_path, aiohttp_server, receiver):
    """An upstream that answers with image URLs: the proxy's download of each is a span of the attempt."""
    up = await FakeOpenAIUpstream(api_key="k").start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "k"}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["up"]}
    cfg["fetch"] = {"allowed_networks": ["127.0.0.0/8"], "allow_http": True}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    server, client = await start_proxy(cfg)
    up.files["bridge.png"] = (make_image(64, 64, 7), "image/png")
    up.payload_override = {"created": 1, "data": [{"url": f"{up.url}/files/bridge.png?sig=secret-ish"}]}
    await client.images.generate(model="qwen-image", prompt="a bridge", size="64x64", response_format="b64_json",
                                 extra_headers={"X-Request-Id": "req-download-1"})
    spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-download-1"})
    (attempt,) = children(spans, one(spans, "POST /v1/images/generations"), "route_attempt")
    downloads = children(spans, attempt, "GET")
    (download,) = downloads
    assert download.attributes["url.full"] == f"{up.url}/files/bridge.png"  # no query: signatures stay out
    assert download.attributes["http.response.status_code"] == 200
    assert [c.name for c in children(spans, attempt, "POST")] == ["POST"]  # the generation call itself
    assert len(children(spans, attempt, "image.check")) == 1


async def test_vendor_polling_is_one_span_holding_each_poll(start_proxy, tmp_path, aiohttp_server, receiver):
    from .fake_replicate import FakeReplicate
    from .test_replicate_e2e import rep_config

    fake = await FakeReplicate(polls_before_done=3).start(aiohttp_server)
    cfg = rep_config(tmp_path, fake)
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    _, client = await start_proxy(cfg, env={"REPLICATE_API_TOKEN": fake.api_key})
    await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                 extra_headers={"X-Request-Id": "req-poll-1"})
    spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-poll-1"})
    (attempt,) = children(spans, one(spans, "POST /v1/images/generations"), "route_attempt")
    # The create call, the polling, then the output's download, check and conversion.
    assert [c.name for c in children(spans, attempt)][:3] == ["POST", "vendor.poll", "GET"]
    (polling,) = children(spans, attempt, "vendor.poll")
    polls = children(spans, polling, "GET")
    assert len(polls) == len(fake.polls) == 4 and polling.attributes["qip.provider"] == "rep"
    assert all(p.attributes["url.full"].endswith("/v1/predictions/" + next(iter(fake.predictions))) for p in polls)
    # Each poll carried the trace, naming its own span; the token never reached a span.
    assert [p.headers["traceparent"].split("-")[2] for p in fake.polls] == [p.span_id for p in polls]
    assert fake.api_key not in json.dumps([s.attributes for s in spans])


async def test_grpc_protocol_and_headers_from_the_named_variable(start_proxy, tmp_path, receiver, monkeypatch):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.grpc")
    address = receiver.start_grpc()
    try:
        monkeypatch.setenv("QIP_OTLP_HEADERS", "x-collector-token=tok-grpc-81f2")
        cfg = base_config(tmp_path)
        cfg["telemetry"] = {"otlp_endpoint": address, "protocol": "grpc", "headers_env": "QIP_OTLP_HEADERS"}
        server, client = await start_proxy(cfg, env={"QIP_OTLP_HEADERS": "x-collector-token=tok-grpc-81f2"})
        await client.images.generate(model="qwen-image-placeholder", prompt="a boat", size="1024x1024",
                                     extra_headers={"X-Request-Id": "req-grpc-1"})
        spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-grpc-1"})
        root = one(spans, "POST /v1/images/generations")
        assert [a.attributes["qip.route"] for a in children(spans, root, "route_attempt")] == ["placeholder"]
        assert receiver.headers[-1]["x-collector-token"] == "tok-grpc-81f2"
    finally:
        receiver.grpc_server.stop(None)


def test_tracing_off_imports_no_opentelemetry(tmp_path):
    """Without telemetry configured, building and serving a request loads nothing of OpenTelemetry."""
    script = (
        "import asyncio, sys\n"
        "from aiohttp.test_utils import TestClient, TestServer\n"
        "from proxy import build_app, parse_config\n"
        f"cfg = {{'store': {{'path': {str(tmp_path)!r}}}, 'providers': {{'p': {{'kind': 'placeholder'}}}},"
        " 'size_tables': {'t': {'default': '64x64', 'tiers': {'0.004': {'1:1': '64x64'}}}},"
        " 'models': {'m': {'sizes': 't', 'routes': ['p']}}}\n"
        "async def main():\n"
        "    async with TestClient(TestServer(build_app(parse_config(cfg, env={})))) as c:\n"
        "        r = await c.post('/v1/images/generations', json={'model': 'm', 'prompt': 'x', 'size': '64x64'})\n"
        "        assert r.status == 200, await r.text()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_settings_from_config_and_standard_variables():
    off = TelemetryConfig()
    assert settings_from(off, {}) is None
    s = settings_from(TelemetryConfig(otlp_endpoint="http://collector:4318", sample_ratio=0.25), {})
    assert s.endpoint == "http://collector:4318/v1/traces" and s.protocol == "http/protobuf"
    assert s.sample_ratio == 0.25 and s.service_name == "qwen-image-proxy" and s.record_prompts is False
    g = settings_from(TelemetryConfig(otlp_endpoint="http://collector:4317", protocol="grpc"), {})
    assert g.endpoint == "http://collector:4317" and g.protocol == "grpc"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_SERVICE_NAME": "edge-1",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1",
           "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20tok,x-team=img"}
    e = settings_from(off, env)
    assert e.endpoint == "http://c:4318/v1/traces" and e.service_name == "edge-1" and e.sample_ratio == 0.1
    assert e.headers == {"authorization": "Bearer tok", "x-team": "img"}
    assert settings_from(off, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/custom"}).endpoint == "http://c:9/custom"
    assert settings_from(off, {**env, "OTEL_SDK_DISABLED": "true"}) is None
    own = TelemetryConfig(otlp_endpoint="http://c:4318", headers_env="MY_OTLP_HEADERS", service_name="mine")
    mine = settings_from(own, {**env, "MY_OTLP_HEADERS": "api-key=s3cret"})
    assert mine.headers == {"api-key": "s3cret"} and mine.service_name == "mine"


async def test_an_upstream_host_with_broken_punycode_fails_as_it_does_without_tracing(start_proxy, tmp_path,
                                                                                     receiver):
    """The client span's hook read url.host, which raises UnicodeError on a broken punycode label (`xn--a`,
    which a wildcard DNS answers): with tracing on, a route on such a base_url failed as "internal error in
    the route (UnicodeError)" with a traceback and no span, whatever the host would have answered (the
    fetcher and webhooks: test_fetch_hostile, test_jobs_hostile). Now the call goes out as without tracing."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["broken"] = {"kind": "openai", "base_url": "http://xn--a.localhost:9/v1", "api_key": "k"}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["broken", "placeholder"]}
    cfg["routing"] = {"retries": 0}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    server, client = await start_proxy(cfg)
    body = {"model": "qwen-image", "prompt": "a fox", "size": "64x64", "response_format": "b64_json"}
    async with aiohttp.ClientSession() as s:
        r = await s.post(server.make_url("/v1/images/generations"), json=body, headers={"X-Request-Id": "req-puny-1"})
        assert r.status == 200, await r.text()
        assert r.headers["x-qip-route"] == "placeholder"
    spans = await receiver.trace_with("POST /v1/images/generations", **{"qip.request_id": "req-puny-1"})
    first = children(spans, one(spans, "POST /v1/images/generations"), "route_attempt")[0]
    assert first.attributes["qip.route"] == "broken" and "internal error" not in first.attributes["qip.error"]
    (call,) = children(spans, first, "POST")
    assert call.attributes["server.address"] == "xn--a.localhost" and call.attributes["server.port"] == 9
    assert call.attributes["url.full"] == "http://xn--a.localhost:9/v1/images/generations"
    assert call.status == 2
