"""Per-key policy through the running proxy: named keys from config, env, files; the models a key may use;
requests per minute and image requests in flight (429 with Retry-After); the /metrics key; key names (never
values) in metrics and logs; one-line config errors."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
from openai import AsyncOpenAI, AuthenticationError, PermissionDeniedError, RateLimitError

from proxy import parse_config
from proxy.config import ConfigError
from proxy.errors import RateLimited
from proxy.providers.placeholder import PlaceholderProvider
from proxy.routing.policy import ConcurrencyLimited, MemoryLimits

from .conftest import base_config
from .fake_openai_upstream import FakeOpenAIUpstream

MODEL = "qwen-image-placeholder"
OTHER = "qwen-image-other"
PLAIN = "sentinel-plain-5b1d93c0"
CI = "sentinel-ci-7e2a4f61"
ENV_KEY = "sentinel-env-90c3b2d8"
FILE_KEY = "sentinel-file-1f6e8a47"
LIST_KEY = "sentinel-list-3c7d5e92"
METRICS_KEY = "sentinel-metrics-6a0b4c18"
SECRETS = (PLAIN, CI, ENV_KEY, FILE_KEY, LIST_KEY, METRICS_KEY)


class GatedPlaceholder(PlaceholderProvider):
    """The placeholder, holding each call until the test opens the gate; it notes starts and cancellations."""

    def __init__(self, name, options, missing_vars=None):
        super().__init__(name, options, missing_vars)
        self.gate = asyncio.Event()
        self.started = 0
        self.cancelled = asyncio.Event()

    async def generate(self, req, route):
        self.started += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return await super().generate(req, route)


def with_keys(tmp_path, *keys, **server) -> dict:
    cfg = base_config(tmp_path)
    cfg["models"][OTHER] = {"sizes": "qwen-image", "routes": ["placeholder"]}
    cfg["server"] = {"api_keys": list(keys), **server}
    return cfg


_clients: list[AsyncOpenAI] = []


@pytest.fixture(autouse=True)
async def _close_clients():
    """Clients closed in their own test's loop (one left to the garbage collector logs an ERROR later)."""
    yield
    while _clients:
        await _clients.pop().close()


def client_for(server, key: str) -> AsyncOpenAI:
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=key, max_retries=0, timeout=30)
    _clients.append(client)
    return client


async def generate(client: AsyncOpenAI, model: str = MODEL):
    return await client.images.generate(model=model, prompt="p", size="64x64", response_format="b64_json")


async def get(server, path: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as s, s.get(server.make_url(path), headers=headers) as r:
        return r.status, await r.text()


async def wait_for(condition, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


# ---- where keys come from, and which models they may use ----------------------------------------------


async def test_keys_from_config_env_files_and_a_keys_file(start_proxy, tmp_path):
    (tmp_path / "ci.key").write_text(f"{FILE_KEY}\n")
    (tmp_path / "keys.yaml").write_text(f"- {LIST_KEY}\n- {{name: bot, key: sentinel-bot-42d1e0aa, rpm: 5}}\n")
    cfg = with_keys(tmp_path, PLAIN, {"name": "ci", "key": CI, "models": [MODEL]},
                    {"name": "from-env", "key_env": "QIP_TEST_KEY"},
                    {"name": "from-file", "key_file": str(tmp_path / "ci.key")},
                    api_keys_file=str(tmp_path / "keys.yaml"))
    server, _ = await start_proxy(cfg, env={"QIP_TEST_KEY": f" {ENV_KEY} "})
    for key in (PLAIN, CI, ENV_KEY, FILE_KEY, LIST_KEY, "sentinel-bot-42d1e0aa"):
        r = await generate(client_for(server, key))
        assert r.data[0].b64_json
    for wrong in ("nope", f"{CI}x", CI[:-1], "QIP_TEST_KEY", "ci"):  # neither variables nor names are keys
        with pytest.raises(AuthenticationError):
            await generate(client_for(server, wrong))


async def test_a_key_may_use_only_its_models(start_proxy, tmp_path):
    server, _ = await start_proxy(with_keys(tmp_path, {"name": "ci", "key": CI, "models": [MODEL]}, PLAIN))
    ci = client_for(server, CI)
    assert (await generate(ci)).data[0].b64_json
    with pytest.raises(PermissionDeniedError) as e:
        await generate(ci, OTHER)
    assert e.value.status_code == 403
    assert e.value.body["code"] == "model_not_allowed" and e.value.body["param"] == "model"
    assert OTHER in e.value.body["message"] and MODEL in e.value.body["message"]
    assert CI not in e.value.response.text
    # Checked before a stream starts: the same 403, not a 200 whose stream holds an error event.
    with pytest.raises(PermissionDeniedError) as e:
        await ci.images.generate(model=OTHER, prompt="p", size="64x64", stream=True, partial_images=1)
    assert e.value.status_code == 403 and e.value.body["code"] == "model_not_allowed"
    # A key without a models list may use every model.
    assert (await generate(client_for(server, PLAIN), OTHER)).data[0].b64_json


# ---- requests per minute ------------------------------------------------------------------------------


async def test_rpm_spent_is_429_with_retry_after(start_proxy, tmp_path, aiohttp_server):
    up = await FakeOpenAIUpstream(api_key="pt-key").start(aiohttp_server)
    cfg = with_keys(tmp_path, {"name": "ci", "key": CI, "rpm": 3}, PLAIN)
    cfg["passthrough"] = {"base_url": f"{up.url}/v1", "api_key": "pt-key"}
    server, _ = await start_proxy(cfg)
    ci = client_for(server, CI)
    await generate(ci)
    await ci.models.list()  # not an image call, but it counts against rpm
    await ci.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    for call in (lambda: generate(ci), lambda: ci.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(RateLimitError) as e:
            await call()
        body, headers = e.value.body, e.value.response.headers
        assert body["type"] == "rate_limit_error" and body["code"] == "rate_limit_exceeded"
        assert "3 requests per minute" in body["message"] and CI not in e.value.response.text
        assert 1 <= int(headers["Retry-After"]) <= 20  # a token comes back every 20 s
    assert len(up.calls_to("/chat/completions")) == 1  # the refused call never reached the upstream
    # Other keys have their own budget.
    for _ in range(4):
        await generate(client_for(server, PLAIN))


async def test_token_bucket_refills_at_rpm_per_minute():
    now = [1000.0]
    limits = MemoryLimits(clock=lambda: now[0])
    for _ in range(60):
        await limits.acquire("k", rpm=60, concurrency=None)
    with pytest.raises(RateLimited) as e:
        await limits.acquire("k", rpm=60, concurrency=None)
    assert e.value.code == "rate_limit_exceeded" and e.value.headers["Retry-After"] == "1"
    now[0] += 1.0
    await limits.acquire("k", rpm=60, concurrency=None)
    with pytest.raises(RateLimited):
        await limits.acquire("k", rpm=60, concurrency=None)
    # A refused request takes no slot.
    lease = await limits.acquire("c", rpm=None, concurrency=1)
    with pytest.raises(ConcurrencyLimited) as e:
        await limits.acquire("c", rpm=None, concurrency=1)
    assert e.value.code == "concurrency_limit_exceeded" and limits.in_flight("c") == 1
    await lease.release()
    await lease.release()  # idempotent
    assert limits.in_flight("c") == 0


# ---- concurrency --------------------------------------------------------------------------------------


async def test_concurrency_limit_and_release_after_completion(start_proxy, tmp_path):
    gated = GatedPlaceholder("placeholder", {})
    cfg = with_keys(tmp_path, {"name": "ci", "key": CI, "concurrency": 1}, PLAIN)
    server, _ = await start_proxy(cfg, providers={"placeholder": gated})
    ci = client_for(server, CI)
    first = asyncio.create_task(generate(ci))
    await wait_for(lambda: gated.started == 1)
    with pytest.raises(RateLimitError) as e:
        await generate(ci)
    assert e.value.body["code"] == "concurrency_limit_exceeded" and e.value.body["type"] == "rate_limit_error"
    assert "1 image request in progress" in e.value.body["message"] and CI not in e.value.response.text
    assert e.value.response.headers["Retry-After"] == "1"
    assert gated.started == 1  # refused before it reached the route
    # Other keys are not held back, and non-image calls do not take a slot.
    await client_for(server, CI).models.list()
    other = asyncio.create_task(generate(client_for(server, PLAIN)))
    await wait_for(lambda: gated.started == 2)
    gated.gate.set()
    await asyncio.wait_for(asyncio.gather(first, other), 10)
    # The slot came back when the request ended.
    assert (await generate(ci)).data[0].b64_json


async def test_a_key_at_its_concurrency_limit_can_still_queue_background_jobs(start_proxy, tmp_path):
    """A background submit holds no generation (its job takes the key's slot when it runs): with the key's
    one slot held, a submit is a 202 and its job runs once the slot is free, while a synchronous call is
    still refused (and only that one counts as a rejection)."""
    gated = GatedPlaceholder("placeholder", {})
    cfg = with_keys(tmp_path, {"name": "ci", "key": CI, "concurrency": 1})
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, _ = await start_proxy(cfg, providers={"placeholder": gated})
    ci = client_for(server, CI)
    first = asyncio.create_task(generate(ci))
    await wait_for(lambda: gated.started == 1)
    body = {"model": MODEL, "prompt": "later", "size": "64x64", "background": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {CI}"}) as s:
        async with s.post(server.make_url("/v1/images/generations"), json=body) as r:
            assert r.status == 202, await r.text()
            job = await r.json()
        with pytest.raises(RateLimitError) as e:  # a synchronous call still needs the slot
            await generate(ci)
        assert e.value.body["code"] == "concurrency_limit_exceeded"
        status, metrics = await get(server, "/metrics")
        assert 'qip_key_rejections_total{key="ci",reason="concurrency_limit_exceeded"} 1.0' in metrics
        assert gated.started == 1  # the job waits for the key's slot
        gated.gate.set()
        await asyncio.wait_for(first, 10)
        for _ in range(300):
            async with s.get(server.make_url(f"/v1/images/jobs/{job['id']}")) as r:
                done = await r.json()
            if done["status"] == "completed":
                break
            await asyncio.sleep(0.1)
        assert done["status"] == "completed" and gated.started == 2


async def test_a_background_submit_at_the_concurrency_limit_still_counts_against_rpm(start_proxy, tmp_path):
    gated = GatedPlaceholder("placeholder", {})
    cfg = with_keys(tmp_path, {"name": "ci", "key": CI, "concurrency": 1, "rpm": 2})
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, _ = await start_proxy(cfg, providers={"placeholder": gated})
    first = asyncio.create_task(generate(client_for(server, CI)))  # rpm 1 of 2, and the one slot
    await wait_for(lambda: gated.started == 1)
    body = {"model": MODEL, "prompt": "later", "size": "64x64", "background": True}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {CI}"}) as s:
        async with s.post(server.make_url("/v1/images/generations"), json=body) as r:
            assert r.status == 202  # rpm 2 of 2
        with pytest.raises(RateLimitError) as e:  # refused for its slot: counts nothing
            await generate(client_for(server, CI))
        assert e.value.body["code"] == "concurrency_limit_exceeded"
        async with s.post(server.make_url("/v1/images/generations"), json=body) as r:
            assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limit_exceeded"
    gated.gate.set()
    await asyncio.wait_for(first, 10)


async def test_a_key_at_its_limit_does_not_hold_the_job_workers(start_proxy, tmp_path):
    """Jobs of a key with no free slot stay queued, in their place, and the workers run other keys' jobs
    (a worker used to wait for the slot while showing the job in_progress, and held everyone's jobs up)."""
    gated = GatedPlaceholder("placeholder", {})
    cfg = with_keys(tmp_path, {"name": "ci", "key": CI, "concurrency": 1}, {"name": "plain", "key": PLAIN})
    cfg["providers"]["free"] = {"kind": "placeholder"}
    cfg["models"]["qwen-image-free"] = {"sizes": "qwen-image", "routes": ["free"]}
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3"), "workers": 2}
    server, _ = await start_proxy(cfg, providers={"placeholder": gated, "free": PlaceholderProvider("free", {})})
    first = asyncio.create_task(generate(client_for(server, CI)))  # holds ci's one slot
    await wait_for(lambda: gated.started == 1)

    async def submit(key: str, model: str) -> str:
        body = {"model": model, "prompt": "later", "size": "64x64", "background": True}
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, \
                s.post(server.make_url("/v1/images/generations"), json=body) as r:
            assert r.status == 202, await r.text()
            return (await r.json())["id"]

    async def job(key: str, job_id: str) -> dict:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as s, \
                s.get(server.make_url(f"/v1/images/jobs/{job_id}")) as r:
            return await r.json()

    waiting = [await submit(CI, "qwen-image-free") for _ in range(2)]  # two workers' worth for ci
    other = await submit(PLAIN, "qwen-image-free")
    for _ in range(300):
        if (await job(PLAIN, other))["status"] == "completed":
            break
        await asyncio.sleep(0.1)
    assert (await job(PLAIN, other))["status"] == "completed"  # not held up by ci's jobs
    for _ in range(50):  # waiting, not "running" (a look for a free slot shows one for milliseconds)
        waiting_now = [await job(CI, j) for j in waiting]
        if [j["status"] for j in waiting_now] == ["queued", "queued"]:
            break
        await asyncio.sleep(0.02)
    assert [(j["status"], j["started_at"]) for j in waiting_now] == [("queued", None), ("queued", None)]
    gated.gate.set()
    await asyncio.wait_for(first, 10)
    for _ in range(300):
        if [(await job(CI, j))["status"] for j in waiting] == ["completed", "completed"]:
            break
        await asyncio.sleep(0.1)
    assert [(await job(CI, j))["status"] for j in waiting] == ["completed", "completed"]


async def test_concurrency_slot_comes_back_when_the_client_hangs_up(start_proxy, tmp_path):
    gated = GatedPlaceholder("placeholder", {})
    server, _ = await start_proxy(with_keys(tmp_path, {"name": "ci", "key": CI, "concurrency": 1}),
                                  providers={"placeholder": gated})
    body = {"model": MODEL, "prompt": "p", "size": "64x64"}
    async with aiohttp.ClientSession() as s:
        call = asyncio.create_task(s.post(server.make_url("/v1/images/generations"), json=body,
                                          headers={"Authorization": f"Bearer {CI}"}))
        await wait_for(lambda: gated.started == 1)
        call.cancel()  # the client goes away mid-request
        await asyncio.wait_for(gated.cancelled.wait(), 30)
    gated.gate.set()
    ci = client_for(server, CI)
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            r = await generate(ci)
            break
        except RateLimitError:
            assert asyncio.get_running_loop().time() < deadline, "the slot of the cancelled request never came back"
            await asyncio.sleep(0.05)
    assert r.data[0].b64_json


# ---- /metrics, and what metrics and logs show ---------------------------------------------------------


@pytest.mark.parametrize("how", ["metrics_key", "metrics_key_env"])
async def test_metrics_can_need_their_own_key(start_proxy, tmp_path, how):
    server_cfg = {"metrics_key": METRICS_KEY} if how == "metrics_key" else {"metrics_key_env": "QIP_METRICS"}
    server, _ = await start_proxy(with_keys(tmp_path, CI, **server_cfg), env={"QIP_METRICS": METRICS_KEY})
    for key in (None, "wrong", CI):  # an API key is not the metrics key
        status, text = await get(server, "/metrics", key)
        assert status == 401 and json.loads(text)["error"]["type"] == "authentication_error"
        assert METRICS_KEY not in text
        # The scrubber left the instruction readable (it said "send 'Authorization: [redacted] <key>'").
        assert "send 'Authorization: Bearer <key>'" in json.loads(text)["error"]["message"]
    status, text = await get(server, "/metrics", METRICS_KEY)
    assert status == 200 and "qip_requests_total" in text
    for path in ("/health", "/ready"):  # probes stay open
        assert (await get(server, path))[0] == 200


async def test_metrics_and_logs_carry_key_names_never_values(start_proxy, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = with_keys(tmp_path, PLAIN, {"name": "ci", "key": CI, "rpm": 1, "models": [MODEL]})
    server, _ = await start_proxy(cfg)
    await generate(client_for(server, PLAIN))
    ci = client_for(server, CI)
    await generate(ci)
    with pytest.raises(RateLimitError):
        await generate(ci)
    status, text = await get(server, "/metrics")
    assert status == 200
    assert f'qip_requests_by_key_total{{endpoint="/v1/images/generations",key="key-1",model="{MODEL}",status="200"}} 1.0' in text
    assert f'qip_requests_by_key_total{{endpoint="/v1/images/generations",key="ci",model="{MODEL}",status="200"}} 1.0' in text
    assert 'qip_requests_by_key_total{endpoint="/v1/images/generations",key="ci",model="",status="429"} 1.0' in text
    assert 'qip_key_rejections_total{key="ci",reason="rate_limit_exceeded"} 1.0' in text
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
    assert len(lines) == 3
    assert "key=key-1 " in lines[0] and "key=ci " in lines[1] and "key=ci " in lines[2] and "status=429" in lines[2]
    everything = text + "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    for secret in SECRETS:
        assert secret not in everything


# ---- config errors ------------------------------------------------------------------------------------


BAD_KEYS = {
    "two sources": ({"name": "ci", "key": CI, "key_env": "X"},
                    "server.api_keys.0: give exactly one of key, key_env or key_file (got key, key_env)"),
    "no source": ({"name": "ci"}, "server.api_keys.0: give exactly one of key, key_env or key_file"),
    "unknown field": ({"key": CI, "rmp": 5}, "server.api_keys.0.rmp: unknown key; did you mean 'rpm'?"),
    "zero rpm": ({"key": CI, "rpm": 0}, "server.api_keys.0.rpm: Input should be greater than or equal to 1"),
    "bad concurrency": ({"key": CI, "concurrency": "many"},
                        "server.api_keys.0.concurrency: Input should be a valid integer"),
    "empty models": ({"key": CI, "models": []},
                     "server.api_keys.0.models: List should have at least 1 item after validation, not 0"),
    "bad name": ({"name": "c i", "key": CI}, "server.api_keys.0.name: a key's name is 1-64 letters, digits, "
                 "'.', '_' or '-' (it shows in logs and metrics)"),
    "name is the key": ({"name": "sentinel-x1234", "key": "sentinel-x1234"},
                        "server.api_keys.0: the name must not be the key itself: names show in logs and metrics"),
    "unset variable": ({"key_env": "QIP_NOT_SET"},
                       "server.api_keys.0: key_env: the environment variable QIP_NOT_SET is not set"),
    "missing file": ({"key_file": "/nonexistent/qip.key"},
                     "server.api_keys.0: key_file: cannot read /nonexistent/qip.key: No such file or directory"),
    "empty key": ({"key": " "}, "server.api_keys.0: the key is empty"),
}


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_bad_key_entries_are_one_line_errors(case):
    entry, line = BAD_KEYS[case]
    with pytest.raises(ConfigError) as e:
        parse_config({"server": {"api_keys": [entry]}}, env={})
    assert str(e.value).splitlines() == [f"config: {line}"]
    assert CI not in str(e.value) and "sentinel-x1234" not in str(e.value)


def test_bad_key_lists_and_files(tmp_path):
    def error(server: dict, env=None) -> list[str]:
        with pytest.raises(ConfigError) as e:
            parse_config({"server": server}, env=env or {})
        assert CI not in str(e.value) and "12345678" not in str(e.value)
        return str(e.value).splitlines()

    assert error({"api_keys": [{"name": "ci", "key": CI}, {"name": "ci", "key": "other-key"}]}) == [
        "config: server.api_keys: two keys are named 'ci'; give each key its own name"]
    assert error({"api_keys": [{"name": "key-2", "key": "other-key"}, CI]}) == [  # unnamed: key-<position>
        "config: server.api_keys: two keys are named 'key-2'; give each key its own name"]
    assert error({"api_keys": [CI, {"name": "ci", "key": CI}]}) == [
        "config: server.api_keys: the key named 'ci' has the same value as another key"]
    (tmp_path / "lines.txt").write_text(f"{CI}\nother-key\n")
    assert error({"api_keys_file": str(tmp_path / "lines.txt")}) == [
        f"config: server.api_keys_file: {tmp_path / 'lines.txt'} must hold a list of keys (strings, or mappings "
        "like api_keys entries)"]
    (tmp_path / "bad.yaml").write_text(f"- {CI}\n- {{key: other-key, rpm: 0}}\n")
    assert error({"api_keys_file": str(tmp_path / "bad.yaml")}) == [
        f"config: server.api_keys_file: {tmp_path / 'bad.yaml'}: 1.rpm: Input should be greater than or equal "
        "to 1, got 0"]
    (tmp_path / "number.yaml").write_text("- 12345678\n")
    assert error({"api_keys_file": str(tmp_path / "number.yaml")}) == [
        f"config: server.api_keys_file: {tmp_path / 'number.yaml'}: 0: each entry is a string or a mapping "
        "(quote keys that look like numbers)"]
    (tmp_path / "dup.yaml").write_text(f"- {CI}\n")
    assert error({"api_keys": [CI], "api_keys_file": str(tmp_path / "dup.yaml")}) == [
        "config: server.api_keys_file: the key named 'file-key-1' has the same value as another key (in "
        "api_keys and this file)"]
    assert error({"metrics_key": "a", "metrics_key_env": "M"}, {"M": "b"}) == [
        "config: server.metrics_key_env: give metrics_key or metrics_key_env, not both"]
    assert error({"metrics_key_env": "M"}) == ["config: server.metrics_key_env: the environment variable M is not set"]


def test_resolved_keys_keep_names_and_drop_empty_strings(tmp_path):
    (tmp_path / "keys.yaml").write_text("- file-one\n- {name: bot, key: file-two, concurrency: 2}\n")
    cfg = parse_config({"server": {"api_keys": ["one", "", {"key_env": "K", "models": [MODEL], "rpm": 9}],
                                   "api_keys_file": str(tmp_path / "keys.yaml")}}, env={"K": "three"})
    keys = cfg.server.keys
    assert [(k.name, k.models, k.rpm, k.concurrency) for k in keys] == [
        ("key-1", None, None, None), ("key-3", (MODEL,), 9, None), ("file-key-1", None, None, None),
        ("bot", None, None, 2)]
    # server.api_keys holds every accepted value; a key's repr never shows it.
    assert cfg.server.api_keys == ["one", "three", "file-one", "file-two"]
    assert "three" not in repr(keys[1])
