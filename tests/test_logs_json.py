"""log_format: json: `serve` writes one JSON object per line, the request line's fields as keys, with the
request id and trace id on every line of a request, and no secret anywhere."""

from __future__ import annotations

import asyncio
import copy
import json
import signal
import subprocess
import sys

import aiohttp
import yaml

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream, free_port
from .otlp_receiver import OtlpReceiver
from .test_lifecycle import ROOT, wait_exit, wait_listening

UPSTREAM_KEY = "sk-json-logs-upstream-5b1e"
PROXY_KEY = "sk-json-logs-proxy-93ad"


async def test_serve_writes_json_lines_with_request_and_trace_ids(tmp_path, aiohttp_server):
    up = await FakeOpenAIUpstream(api_key=UPSTREAM_KEY).start(aiohttp_server)
    up.fail(500, "server_error", f"the key {UPSTREAM_KEY} is over quota")  # an upstream echoing its key
    receiver = await OtlpReceiver().start(aiohttp_server)
    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port, "log_format": "json", "api_keys": [{"name": "team-a", "key": PROXY_KEY}]}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    cfg["routing"] = {"retries": 0}
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["failing"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": UPSTREAM_KEY}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["failing", "placeholder"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={
                                **__import__("os").environ, "OTEL_BSP_SCHEDULE_DELAY": "50"})
    try:
        await wait_listening(port, proc)
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/v1/images/generations",
                json={"model": "qwen-image", "prompt": "a private prompt", "size": "64x64"},
                headers={"Authorization": f"Bearer {PROXY_KEY}", "X-Request-Id": "req-json-1"}) as r:
            assert r.status == 200 and r.headers["x-qip-route"] == "placeholder"
        await asyncio.sleep(0.3)  # the request line is written once the answer is on its way
    finally:
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc, 30)
    output = proc.stdout.read().decode()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is one object
    assert all({"time", "level", "logger", "message", "request_id", "trace_id"} <= set(e) for e in lines)
    (request,) = [e for e in lines if e["logger"] == "proxy.requests"]
    trace_id = request["trace_id"]
    assert len(trace_id) == 32 and request["request_id"] == "req-json-1"
    assert request["key"] == "team-a" and request["model"] == "qwen-image" and request["route"] == "placeholder"
    assert request["attempts"] == 2 and request["status"] == 200 and request["outcome"] == "ok"
    assert isinstance(request["duration_ms"], int) and request["level"] == "info"
    # The route's failure, logged inside the request, carries the same ids.
    (failed,) = [e for e in lines if e["logger"] == "proxy.router"]
    assert failed["level"] == "warning" and "route failing failed" in failed["message"]
    assert failed["request_id"] == "req-json-1" and failed["trace_id"] == trace_id
    assert any("serving on" in e["message"] and e["request_id"] is None for e in lines)
    assert UPSTREAM_KEY not in output and PROXY_KEY not in output and "a private prompt" not in output


def test_a_traceback_that_held_a_secret_is_written_scrubbed_not_dropped():
    """The handler as `serve` sets it up (log_format: json): the log scrubber replaces a traceback holding a
    secret by its cleaned text, and the JSON line had no `exception` at all then, exactly when an operator
    needs it (an upstream's failure quoting its key)."""
    import io
    import logging

    from proxy.errors import Scrubber
    from proxy.http.wire_errors import install_log_scrubbing
    from proxy.telemetry.logs_json import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(Scrubber([UPSTREAM_KEY]).text))
    handler.addFilter(install_log_scrubbing([UPSTREAM_KEY]))
    log = logging.getLogger("proxy.test_logs_json")
    log.addHandler(handler)
    log.propagate = False
    try:
        for detail in (f"the upstream refused {UPSTREAM_KEY}", "no secret here"):
            try:
                raise RuntimeError(detail)
            except RuntimeError:
                log.exception("request r1 failed")
    finally:
        log.removeHandler(handler)
        log.propagate = True
    with_secret, without = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "RuntimeError: no secret here" in without["exception"]
    assert "Traceback (most recent call last)" in with_secret["exception"]
    assert "RuntimeError: the upstream refused [redacted]" in with_secret["exception"]
    assert UPSTREAM_KEY not in stream.getvalue()


async def test_loading_a_local_model_writes_no_progress_bars(tmp_path, tiny_dir):
    # diffusers' "Loading pipeline components" and transformers' "Loading weights" tqdm bars went to the
    # server's stderr between the JSON lines while a local model loaded: lines no log collector reads.
    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port, "log_format": "json"}
    cfg["providers"]["local"] = {"kind": "diffusers", "model": str(tiny_dir), "device": "cpu", "default_steps": 2,
                                 "load_in_background": False}
    cfg["models"]["tiny"] = {"sizes": "tiny", "routes": ["local"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await wait_listening(port, proc)  # load_in_background: false: listening once loaded
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/v1/images/generations",
                json={"model": "tiny", "prompt": "a cat", "size": "64x64"}) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc, 30)
    output = proc.stdout.read().decode()
    assert any("loaded" in json.loads(line)["message"] for line in output.splitlines() if line.startswith("{"))
    for bar in ("Loading pipeline components", "Loading weights", "it/s]"):
        assert bar not in output
