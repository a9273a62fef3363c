"""Sentinel keys: upstreams that echo the credentials they got into every field of their answers. Nothing
a client, a log or a scraper sees may contain a configured secret."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from aiohttp import web

from proxy.app import GATEWAY
from proxy.errors import Scrubber
from proxy.telemetry.logs_json import JsonFormatter

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, make_image
from .otlp_receiver import OtlpReceiver

UPSTREAM_KEY = "sentinel-upstream-4f2a9c1e7b"
PASSTHROUGH_KEY = "sentinel-passthrough-8d3b6e0a51"
PROXY_KEY = "sentinel-proxy-c7e19f24aa"
SECRETS = (UPSTREAM_KEY, PASSTHROUGH_KEY, PROXY_KEY)


class EchoingUpstream:
    """Answers with the Authorization it received everywhere it can: error message, param, code,
    revised_prompt, passthrough error bodies (plain and gzip)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.url = ""

    async def start(self, aiohttp_server):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        server = await aiohttp_server(app)
        self.url = str(server.make_url("")).rstrip("/")
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth.partition(" ")[2]
        if request.path.endswith("/images/generations"):
            if self.mode == "ok":
                body = await request.json()
                w, h = (int(v) for v in body["size"].split("x"))
                import base64

                return web.json_response({"created": 1, "data": [{
                    "b64_json": base64.b64encode(make_image(w, h, 1)).decode(),
                    "revised_prompt": f"{body['prompt']} (sent with {auth}; key={token})"}]})
            status = {"400": 400, "500": 500, "429": 429}[self.mode]
            return web.json_response({"error": {"message": f"bad credentials: {auth}", "param": token,
                                                "code": token, "type": "api_error"}}, status=status,
                                     headers={"Retry-After": "0"})
        # The passthrough side: an error body that repeats the key, compressed or not; and a header that
        # repeats it (a debugging upstream), on errors and on a success.
        echoed = {"X-Echo-Auth": f"you sent {auth}"}
        if request.path.endswith("/ok"):
            return web.json_response({"ok": True}, headers=echoed)
        payload = json.dumps({"error": {"message": f"key {token} is not valid", "param": token}}).encode()
        if request.path.endswith("/gz"):
            import gzip

            return web.Response(status=401, body=gzip.compress(payload),
                                headers={"Content-Encoding": "gzip", "Content-Type": "application/json", **echoed})
        return web.Response(status=401, body=payload, content_type="application/json", headers=echoed)


@pytest.mark.parametrize("mode", ["ok", "400", "500", "429"])
@pytest.mark.parametrize("stream", [False, True])
async def test_no_secret_reaches_responses_logs_or_metrics(aiohttp_server, start_proxy, tmp_path, caplog,
                                                           monkeypatch, mode, stream):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    receiver = await OtlpReceiver().start(aiohttp_server)
    up = await EchoingUpstream(mode).start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": [PROXY_KEY]}
    cfg["routing"] = {"retries": 0}
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["echo"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": UPSTREAM_KEY}
    cfg["passthrough"] = {"base_url": f"{up.url}/v1", "api_key": PASSTHROUGH_KEY}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["echo"]}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}  # spans too (prompts not opted in)
    cfg["server"]["log_format"] = "json"
    server, _ = await start_proxy(cfg)
    seen: list[str] = []
    headers = {"Authorization": f"Bearer {PROXY_KEY}", "Content-Type": "application/json"}
    body = {"model": "qwen-image", "prompt": "a fox", "size": "64x64", "response_format": "b64_json",
            "stream": stream}
    async with aiohttp.ClientSession() as s:
        async with s.post(server.make_url("/v1/images/generations"), json=body, headers=headers) as r:
            text = await r.text()
            seen += [text, str(dict(r.headers))]
            if mode == "ok" and not stream:
                assert r.status == 200 and "[redacted]" in json.loads(text)["data"][0]["revised_prompt"]
            elif mode != "ok":  # a stream that failed before its first event: an HTTP error too
                assert r.status >= 400 and "[redacted]" in json.loads(text)["error"]["message"]
            else:
                assert "event:" in text
        for path in ("/v1/chat/completions", "/v1/anything/gz"):
            async with s.post(server.make_url(path), data=b"{}", headers=headers) as r:
                text = await r.text()
                assert r.status == 401 and "[redacted]" in text
                assert "[redacted]" in r.headers["X-Echo-Auth"]
                seen += [text, str(dict(r.headers))]
        async with s.post(server.make_url("/v1/anything/ok"), data=b"{}", headers=headers) as r:
            assert r.status == 200 and "[redacted]" in r.headers["X-Echo-Auth"]
            seen += [await r.text(), str(dict(r.headers))]
        for path in ("/metrics", "/health", "/ready", "/v1/models"):
            async with s.get(server.make_url(path), headers=headers) as r:
                seen.append(await r.text())
    seen += [rec.getMessage() for rec in caplog.records]
    seen += [str(rec.exc_info) for rec in caplog.records if rec.exc_info]
    # The JSON log lines `serve` writes with log_format: json (its formatter, its scrubber).
    formatter = JsonFormatter(Scrubber(server.app[GATEWAY].config.secrets()).text)
    json_lines = [formatter.format(rec) for rec in caplog.records]
    assert any('"logger": "proxy.requests"' in line and '"request_id"' in line for line in json_lines)
    seen += json_lines
    # Every exported span attribute: no key; and no prompt (telemetry.record_prompts is off).
    spans = await receiver.trace_with("GET /v1/models")
    assert spans and len(receiver.spans) > len(spans)
    attributes = [json.dumps(span.attributes) for span in receiver.spans]
    assert not [a for a in attributes if "a fox" in a]
    seen += attributes
    everything = "\n".join(seen)
    for secret in SECRETS:
        assert secret not in everything, (secret, [s for s in seen if secret in s][:2])


def test_the_cli_never_prints_keys(tmp_path):
    import subprocess
    import sys

    import yaml

    cfg = base_config(tmp_path)
    cfg["providers"]["up"] = {"kind": "openai", "base_url": "https://up.example/v1", "api_key": UPSTREAM_KEY}
    cfg["passthrough"] = {"base_url": "https://pt.example/v1", "api_key": PASSTHROUGH_KEY}
    cfg["server"] = {"api_keys": [PROXY_KEY]}
    cfg["models"]["qwen-image"] = {"sizes": "qwen-image", "routes": ["up"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    for command in ("models", "check-config"):
        run = subprocess.run([sys.executable, "-m", "proxy", command, "--config", str(path)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        for secret in SECRETS:
            assert secret not in run.stdout + run.stderr
