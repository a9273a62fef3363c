"""Sentinel keys: upstreams that echo the credentials they got into every field of their answers. Nothing
a client, a log or a scraper sees may contain a configured secret."""

from __future__ import annotations

import json
import logging

import aiohttp
import pytest
from aiohttp import web

from proxy import parse_config
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


# ---- what a malformed request sends: aiohttp's parser quotes it back, in its answer and its log ----------

KEY = PROXY_KEY.encode()
AUTH = b"Authorization: Bearer " + KEY
# (name, the raw request) for each kind of request aiohttp's parser refuses with a 400.
MALFORMED = [
    ("control char after the key", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\x01\r\n\r\n"),
    ("NUL after the key", b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\x00\r\n\r\n"),
    ("control char in another header", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + KEY + b"\x01\r\n\r\n"),
    ("bad request line", b"GET /v1/models?key=" + KEY + b" HTTP/1.1 junk\r\nHost: x\r\n\r\n"),
    ("bad method", b"G\x01T /" + KEY + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bad version", b"GET / HTTP/9." + KEY + b"\r\nHost: x\r\n\r\n"),
    ("a bare target", b"GET " + KEY + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("TLS on the HTTP port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + KEY + b"\r\n\r\n"),
    ("header over 8190 bytes", b"GET / HTTP/1.1\r\nHost: x\r\n" + AUTH + b"A" * 9000 + b"\r\n\r\n"),
    ("request line over 8190 bytes", b"GET /" + KEY + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bad header name", b"GET / HTTP/1.1\r\nHost: x\r\nAuth orization: Bearer " + KEY + b"\r\n\r\n"),
    ("header without a colon", b"GET / HTTP/1.1\r\nHost: x\r\nBearer " + KEY + b"\r\n\r\n"),
    ("obsolete line folding", b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer\r\n " + KEY + b"\r\n\r\n"),
    ("bad Content-Length", b"POST / HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\nContent-Length: " + KEY + b"\r\n\r\n"),
    ("bad chunk size", b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\nzz" + KEY + b"\r\n"),
]
# A body that breaks after its handler started reading it (the parts arrive apart).
CHUNKED_HEAD = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n" + AUTH +
                b"\r\nTransfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n")
BROKEN_MID_BODY = [CHUNKED_HEAD, b"5\r\n{\"a\":\r\n", b"zz" + KEY + b"\r\n"]


async def send_raw(port: int, parts: list[bytes], timeout: float = 30) -> tuple[int, bytes, bytes]:
    """Send the parts (a short pause between them); (status, headers, body) of the answer."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for i, part in enumerate(parts):
            if i:
                await asyncio.sleep(0.2)
            writer.write(part)
            await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)  # the server closes after an error
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


async def test_malformed_requests_never_put_a_key_into_the_served_log(tmp_path):
    """`serve` as a user runs it, at --log-level debug: each malformed request is a 400 with OpenAI's error
    JSON, logged as one DEBUG line (not an ERROR with a traceback), and the key is in neither."""
    import subprocess
    import sys

    import yaml

    from .fake_openai_upstream import free_port
    from .test_lifecycle import ROOT, wait_listening

    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port, "api_keys": [PROXY_KEY]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--log-level", "debug"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        await wait_listening(port, proc)
        for name, parts in [*((name, [raw]) for name, raw in MALFORMED), ("body broken mid-way", BROKEN_MID_BODY)]:
            status, head, body = await send_raw(port, parts)
            assert status == 400, (name, head, body)
            assert b"application/json" in head, (name, head)
            error = json.loads(body)["error"]
            assert error["type"] == "invalid_request_error" and error["message"], (name, error)
            assert KEY not in head + body, name
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert PROXY_KEY not in log
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    assert log.count("malformed request from") >= len(MALFORMED), log[-3000:]


async def test_malformed_requests_never_put_a_key_into_the_apps_log(start_proxy, tmp_path, caplog):
    """The app on another server (aiohttp's own handler, as in tests or mounted elsewhere): its loggers
    scrub what aiohttp logs, at DEBUG, and the access log's request line and headers."""
    caplog.set_level(logging.DEBUG)
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": [PROXY_KEY]}
    server, _ = await start_proxy(cfg)
    for name, raw in MALFORMED:
        status, head, _ = await send_raw(server.port, [raw])
        assert status == 400, (name, head)
    # A request that parses, with the key where the access log writes it (the target, Referer, User-Agent).
    ok = (b"GET /health?api_key=" + KEY + b" HTTP/1.1\r\nHost: x\r\nReferer: https://x/?token=" + KEY +
          b"\r\nUser-Agent: Bearer " + KEY + b"\r\nConnection: close\r\n\r\n")
    status, _, _ = await send_raw(server.port, [ok])
    assert status == 200
    seen = []
    for rec in caplog.records:
        seen += [rec.getMessage(), str(rec.exc_info), str(rec.exc_text), str(vars(rec))]
        assert not (rec.name.startswith("aiohttp") and rec.levelno >= logging.ERROR), rec.getMessage()
    assert any("malformed request" in rec.getMessage() for rec in caplog.records)
    assert any(rec.name == "aiohttp.access" for rec in caplog.records)
    assert PROXY_KEY not in "\n".join(seen)


def test_the_metrics_key_is_a_secret_like_the_others(tmp_path):
    # The docs promise every configured secret is scrubbed; the metrics key was not in the list.
    cfg = base_config(tmp_path)
    cfg["server"] = {"metrics_key_env": "QIP_TEST_METRICS", "api_keys": [{"name": "a", "key": PROXY_KEY}]}
    config = parse_config(cfg, env={"QIP_TEST_METRICS": "sentinel-metrics-1b2c3d4e5f"})
    assert "sentinel-metrics-1b2c3d4e5f" in config.secrets()
    assert "sentinel-metrics-1b2c3d4e5f" not in Scrubber(config.secrets()).text("scraped with sentinel-metrics-1b2c3d4e5f")


def test_the_collectors_headers_are_secrets_whichever_variable_holds_them(tmp_path, monkeypatch):
    """Only the variable telemetry.headers_env names was on the list, as written: the standard
    OTEL_EXPORTER_OTLP_HEADERS / _TRACES_HEADERS (which the exporter sends in any case) were not, nor
    the URL-decoded value that goes out ("Bearer%20tok" is sent as "Bearer tok")."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-honeycomb-team=sentinel-team-5e6f7a8b9c")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "Authorization=Bearer%20sentinel-otlp-0a1b2c3d")
    monkeypatch.setenv("QIP_TEST_OTLP", "api-key=sentinel%2Fnamed-9f8e7d")
    cfg = base_config(tmp_path)
    cfg["telemetry"] = {"otlp_endpoint": "http://127.0.0.1:4318", "headers_env": "QIP_TEST_OTLP"}
    scrub = Scrubber(parse_config(cfg, env={}).secrets()).text
    for sent in ("sentinel-team-5e6f7a8b9c", "sentinel-otlp-0a1b2c3d", "sentinel/named-9f8e7d", "sentinel%2Fnamed-9f8e7d"):
        assert sent not in scrub(f"collector said: unknown team {sent}")


def test_a_collectors_plain_headers_are_no_secrets(tmp_path, monkeypatch):
    """A tenant or dataset name is no credential: as a secret it was cut from every log line and revised
    prompt ("x-tenant=prod" turned "a product photo" into "a [redacted]uct photo")."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=prod,x-scope-orgid=acme,dd-api-key=sentinel-dd-1a2b")
    cfg = base_config(tmp_path)
    cfg["telemetry"] = {"otlp_endpoint": "http://127.0.0.1:4318"}
    scrub = Scrubber(parse_config(cfg, env={}).secrets()).text
    assert scrub("a product photo for acme") == "a product photo for acme"
    assert "sentinel-dd-1a2b" not in scrub("rejected key sentinel-dd-1a2b")
