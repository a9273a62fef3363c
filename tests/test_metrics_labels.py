"""/metrics and span names as a scraper and a collector see them: label values are templates and the proxy's
own words, never what a client put in a URL, however many clients send; and what fails is counted."""

from __future__ import annotations

import aiohttp
import pytest

from .conftest import base_config
from .fake_openai_upstream import free_port
from .otlp_receiver import OtlpReceiver

KEY = "metrics-labels-key-5b8e1d"


def samples(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_job_ids_in_paths_never_become_label_values(start_proxy, tmp_path):
    """Every job id a client polls (or makes up, without a key) was a series of its own in
    qip_requests_total and qip_requests_by_key_total, for the life of the process."""
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": [{"name": "team-a", "key": KEY}]}
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, _ = await start_proxy(cfg)
    auth = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            async with s.get(server.make_url(f"/v1/images/jobs/imgjob_nokey{i}")) as r:
                assert r.status == 401
            async with s.get(server.make_url(f"/v1/images/jobs/imgjob_made_up{i}"), headers=auth) as r:
                assert r.status == 404
            async with s.post(server.make_url(f"/v1/images/jobs/imgjob_made_up{i}/cancel"), headers=auth) as r:
                assert r.status == 404
        async with s.get(server.make_url("/metrics")) as r:
            text = await r.text()
    assert "imgjob_" not in text, [line for line in text.splitlines() if "imgjob_" in line]
    requests = samples(text, "qip_requests_total")
    assert 'qip_requests_total{endpoint="/v1/images/jobs/{id}",model="",status="401"} 3.0' in requests
    assert 'qip_requests_total{endpoint="/v1/images/jobs/{id}",model="",status="404"} 3.0' in requests
    assert 'qip_requests_total{endpoint="/v1/images/jobs/{id}/cancel",model="",status="404"} 3.0' in requests
    by_key = samples(text, "qip_requests_by_key_total")
    assert 'qip_requests_by_key_total{endpoint="/v1/images/jobs/{id}",key="team-a",model="",status="404"} 3.0' in by_key


async def test_job_polls_are_not_image_requests_in_the_outcomes_or_the_log(start_proxy, tmp_path, caplog):
    """A job's polls and lists got an image request's log line (model "") and counted in
    qip_request_outcomes_total; the submit is the image request."""
    caplog.set_level("INFO", logger="proxy.requests")
    cfg = base_config(tmp_path)
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, _ = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        body = {"model": "qwen-image-placeholder", "prompt": "p", "size": "64x64", "background": True}
        async with s.post(server.make_url("/v1/images/generations"), json=body) as r:
            assert r.status == 202
            job = await r.json()
        for path in (f"/v1/images/jobs/{job['id']}", "/v1/images/jobs", "/v1/images/jobs/imgjob_none"):
            async with s.get(server.make_url(path)) as r:
                assert r.status in (200, 404)
        async with s.get(server.make_url("/metrics")) as r:
            text = await r.text()
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
    assert len(lines) == 1 and "endpoint=/v1/images/generations" in lines[0] and "status=202" in lines[0]
    outcomes = samples(text, "qip_request_outcomes_total")
    assert outcomes == ['qip_request_outcomes_total{model="qwen-image-placeholder",outcome="ok"} 1.0'], outcomes


async def test_job_paths_are_one_span_name(start_proxy, tmp_path, aiohttp_server, monkeypatch):
    """A span named after each job's own path made every poll its own operation in a collector."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    receiver = await OtlpReceiver().start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    server, _ = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        async with s.get(server.make_url("/v1/images/jobs/imgjob_abc")) as r:
            assert r.status == 404
        async with s.post(server.make_url("/v1/images/jobs/imgjob_abc/cancel")) as r:
            assert r.status == 404
    get = await receiver.trace_with("GET /v1/images/jobs/{id}", timeout=15)
    cancel = await receiver.trace_with("POST /v1/images/jobs/{id}/cancel", timeout=15)
    for span in get + cancel:
        assert "imgjob_abc" not in span.name and "imgjob_abc" not in str(span.attributes), span


async def test_the_proxys_own_error_codes_are_counted_by_name(start_proxy, tmp_path):
    """qip_errors_total counted every code the proxy gives an error where it raises it (invalid_json,
    job_not_found, invalid_content_type...) as `other`, the bucket meant for codes an upstream made up."""
    cfg = base_config(tmp_path)
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, _ = await start_proxy(cfg)
    model = "qwen-image-placeholder"
    async with aiohttp.ClientSession() as s:
        async with s.post(server.make_url("/v1/images/generations"), data=b'{"model": "' + model.encode() + b'", ',
                          headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "invalid_json"
        async with s.get(server.make_url("/v1/images/jobs/imgjob_none")) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "job_not_found"
        async with s.get(server.make_url("/metrics")) as r:
            text = await r.text()
    errors = samples(text, "qip_errors_total")
    assert 'qip_errors_total{code="job_not_found",model=""} 1.0' in errors, errors
    assert any('code="invalid_json"' in line for line in errors), errors
    assert not [line for line in errors if 'code="other"' in line], errors


def test_every_code_the_proxy_raises_by_name_counts_as_its_own():
    """RAISED_CODES holds each `code="..."` the proxy's source gives an error (a new one lands in `other`)."""
    import re
    from pathlib import Path

    from proxy.http.request_log import own_codes

    root = Path(__file__).resolve().parent.parent / "proxy"
    raised = {code for path in root.rglob("*.py") for code in re.findall(r'\bcode="([a-z_]+)"', path.read_text())}
    assert raised and raised <= own_codes(), sorted(raised - own_codes())


async def test_passthrough_calls_that_never_reach_the_upstream_are_counted(start_proxy, tmp_path):
    """A passthrough upstream that cannot be reached answered every call 502, and /metrics counted none of
    them (not in qip_passthrough_requests_total, nor anywhere else): an outage looked like no traffic."""
    cfg = base_config(tmp_path)
    cfg["passthrough"] = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "api_key": "pt-key-2c9d41"}
    server, _ = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            async with s.post(server.make_url(path), json={}) as r:
                assert r.status == 502 and (await r.json())["error"]["code"] == "upstream_error"
        async with s.get(server.make_url("/metrics")) as r:
            text = await r.text()
    assert samples(text, "qip_passthrough_requests_total") == ['qip_passthrough_requests_total{status="502"} 2.0']
