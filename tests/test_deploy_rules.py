"""deploy/: the Prometheus rules pass promtool, use only series the proxy serves, and a real Prometheus
scraping a proxy with a failing route fires the failing-route alert; the Grafana dashboard uses the same
series."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
from pathlib import Path

import aiohttp
import pytest
import yaml

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream
from .prometheus_service import Prometheus, require, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus" / "qwen-image-proxy.rules.yml"
RULES_TEST = DEPLOY / "prometheus" / "qwen-image-proxy.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "qwen-image-proxy.json"
# A series name in PromQL: not a recording rule's (level:name:ops) nor part of one, nor a function.
SERIES = re.compile(r"(?<![\w:])(qip_\w+)(?![\w:])")


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]


def served_names(exposition: str) -> set[str]:
    """Every sample name /metrics can serve: its families (# TYPE lines, present before any sample) and
    a histogram's _bucket, _sum and _count."""
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    promtool = require("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS" in check.stdout, check.stdout + check.stderr
    tests = subprocess.run([promtool, "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                           timeout=120, cwd=RULES_TEST.parent)
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr


async def test_every_series_in_rules_and_dashboard_is_served_by_metrics(start_proxy, tmp_path):
    server, _ = await start_proxy(base_config(tmp_path))
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        served = served_names(await r.text())
    used_by_rules = {name for expr in rule_exprs() for name in SERIES.findall(expr)}
    used_by_dashboard = {name for expr in dashboard_exprs() for name in SERIES.findall(expr)}
    assert len(used_by_rules) >= 9 and len(used_by_dashboard) >= 10
    assert used_by_rules - served == set()
    assert used_by_dashboard - served == set()
    # The dashboard reads the recording rules' series: each one it names is recorded.
    recorded = {rule["record"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
                if "record" in rule}
    named = {m for expr in dashboard_exprs() for m in re.findall(r"\b\w+:\w+:\w+\b", expr)}
    assert named and named <= recorded


def test_example_prometheus_config_is_valid():
    promtool = require("promtool")
    out = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


async def test_error_answers_are_counted_by_code(start_proxy, tmp_path, aiohttp_server):
    """qip_errors_total (QipStoreUnavailable, QipStateUnavailable): an error answer counts under its code."""
    up = await FakeOpenAIUpstream(api_key="k").start(aiohttp_server)
    up.fail(500, "server_error", "down")
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["failing"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "k"}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["failing"]}
    cfg["routing"] = {"retries": 0}
    server, _ = await start_proxy(cfg)
    async with aiohttp.ClientSession() as s:
        body = {"model": "qwen-image", "prompt": "a kite", "size": "64x64"}
        async with s.post(server.make_url("/v1/images/generations"), json=body) as r:
            assert r.status == 502
        async with s.post(server.make_url("/v1/images/generations"), json={**body, "n": "many"}) as r:
            assert r.status == 400
        async with s.get(server.make_url("/metrics")) as r:
            text = await r.text()
    assert 'qip_errors_total{code="upstream_error",model="qwen-image"} 1.0' in text
    assert 'qip_errors_total{code="invalid_value",model="qwen-image"} 1.0' in text


def test_dashboard_has_a_described_panel_per_question():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles)) >= 12
    for panel in dashboard["panels"]:
        assert panel["description"] and "\n" not in panel["description"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])


@pytest.mark.prometheus
async def test_prometheus_fires_the_failing_route_alert(start_proxy, tmp_path, aiohttp_server):
    """A real Prometheus loads the rules (QipRouteFailing's `for:` cut to 5 s in its copy), scrapes a proxy
    whose first route answers 500 and falls back to the placeholder, and fires the alert for that route."""
    up = await FakeOpenAIUpstream(api_key="k").start(aiohttp_server)
    up.fail(500, "server_error", "down for maintenance")
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["failing"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "k"}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["failing", "placeholder"]}
    cfg["routing"] = {"retries": 0, "breaker_threshold": 1000}
    server, _ = await start_proxy(cfg)
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "QipRouteFailing":
                rule["for"] = "5s"
    copy_path = tmp_path / "rules.yml"
    copy_path.write_text(yaml.safe_dump(rules))
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{server.port}"], [copy_path])
    prometheus.start()
    stop = asyncio.Event()

    async def traffic() -> None:
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                async with s.post(server.make_url("/v1/images/generations"),
                                  json={"model": "qwen-image", "prompt": "a kite", "size": "64x64"}) as r:
                    assert r.status == 200 and r.headers["x-qip-route"] == "placeholder"
                await asyncio.sleep(0.1)

    sender = asyncio.ensure_future(traffic())
    try:
        async with aiohttp.ClientSession() as api:
            async def get(path: str, **params):
                if (log := prometheus.exited()) is not None:
                    raise AssertionError(f"prometheus exited: {log}")
                try:
                    async with api.get(prometheus.url + path, params=params) as r:
                        return (await r.json())["data"] if r.status == 200 else None
                except aiohttp.ClientConnectionError:
                    return None  # still starting

            async def target_up():
                data = await get("/api/v1/targets")
                return data and [t for t in data["activeTargets"] if t["health"] == "up"]

            async def query(expr: str):
                data = await get("/api/v1/query", query=expr)
                return data and data["result"]

            await wait_until(target_up, 120, "the proxy is scraped")
            # The series the rules are built on exist, with the failing route's errors in them.
            attempts = await wait_until(lambda: query('qip_route_attempts_total{route="failing",outcome="error"}'),
                                        60, "the failing route's attempts are scraped")
            assert attempts[0]["metric"]["model"] == "qwen-image"
            await wait_until(lambda: query('qip_fallbacks_total{route="failing",reason="failed"}'), 60,
                             "the fallbacks are scraped")
            ratio = await wait_until(lambda: query('model_route:qip_route_error_ratio:rate5m{route="failing"}'),
                                     60, "the error ratio is recorded")
            assert float(ratio[0]["value"][1]) == 1.0
            served = await wait_until(lambda: query('model_route:qip_route_error_ratio:rate5m{route="placeholder"}'),
                                      60, "the serving route's ratio is recorded")
            assert float(served[0]["value"][1]) == 0.0

            async def firing():
                data = await get("/api/v1/alerts")
                return data and [a for a in data["alerts"] if a["labels"]["alertname"] == "QipRouteFailing"
                                 and a["state"] == "firing"]

            (alert,) = await wait_until(firing, 120, "QipRouteFailing fires")
            assert alert["labels"]["route"] == "failing" and alert["labels"]["model"] == "qwen-image"
            assert alert["labels"]["severity"] == "warning" and "fails 100%" in alert["annotations"]["summary"]
            rules_state = await get("/api/v1/rules", type="alert")
            loaded = {r["name"] for g in rules_state["groups"] for r in g["rules"]}
            assert {"QipCircuitOpen", "QipStoreUnavailable", "QipPoolDown"} <= loaded
    finally:
        stop.set()
        await asyncio.gather(sender, return_exceptions=True)
        prometheus.stop()
