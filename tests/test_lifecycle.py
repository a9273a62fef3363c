"""Health and readiness, loading waits, graceful shutdown on SIGTERM, and the mounted middleware."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from openai import AsyncOpenAI, BadRequestError, InternalServerError
from PIL import Image

from proxy import image_proxy_middleware, parse_config
from proxy.app import GATEWAY
from proxy.providers.placeholder import PlaceholderProvider

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, free_port
from .waiting import eventually

ROOT = Path(__file__).resolve().parent.parent


class SlowLoadingPlaceholder(PlaceholderProvider):
    """The placeholder, behind a model 'load' that finishes when the test says so."""

    def __init__(self, name, options, missing_vars=None):
        super().__init__(name, options, missing_vars)
        self.loaded = asyncio.Event()

    @property
    def unavailable_reason(self):
        return None if self.loaded.is_set() else "loading the model"

    @property
    def loading_stage(self):
        return None if self.loaded.is_set() else "loading the model: transformer (2 s so far)"

    async def wait_ready(self, timeout):
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.loaded.wait(), timeout)
        return self.loaded.is_set()


async def get_json(server, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.get(server.make_url(path)) as r:
        return r.status, await r.json()


# ---- /health, /ready and loading --------------------------------------------------------------------


async def test_ready_follows_loading_and_requests_wait_for_it(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"max_load_wait": 30}
    cfg["providers"]["slow"] = {"kind": "placeholder"}
    cfg["models"]["qwen-image-slow"] = {"sizes": "qwen-image", "routes": ["slow"]}
    slow = SlowLoadingPlaceholder("slow", {})
    providers = {"placeholder": PlaceholderProvider("placeholder", {}), "slow": slow}
    server, client = await start_proxy(cfg, providers=providers)

    status, health = await get_json(server, "/health")
    assert status == 200 and health["status"] == "ok"  # liveness: the process serves
    status, ready = await get_json(server, "/ready")
    assert status == 503 and ready["status"] == "not_ready" and ready["waiting_for"] == ["qwen-image-slow"]
    route = ready["models"]["qwen-image-slow"]["routes"][0]
    assert route["state"] == "loading" and "transformer" in route["reason"]
    assert ready["models"]["qwen-image-placeholder"]["ready"] is True

    # A request that arrives while the model loads waits for it instead of failing.
    pending = asyncio.create_task(client.images.generate(model="qwen-image-slow", prompt="p", size="64x64",
                                                         response_format="b64_json"))
    await asyncio.sleep(0.3)
    assert not pending.done()
    slow.loaded.set()
    r = await asyncio.wait_for(pending, 10)
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 64)
    status, ready = await get_json(server, "/ready")
    assert status == 200 and ready["status"] == "ready"


async def test_loading_past_max_load_wait_is_503_with_retry_after(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"max_load_wait": 0.2}
    cfg["providers"]["slow"] = {"kind": "placeholder"}
    cfg["models"]["qwen-image-slow"] = {"sizes": "qwen-image", "routes": ["slow"]}
    providers = {"placeholder": PlaceholderProvider("placeholder", {}),
                 "slow": SlowLoadingPlaceholder("slow", {})}
    _, client = await start_proxy(cfg, providers=providers)
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image-slow", prompt="p", size="64x64")
    assert e.value.status_code == 503
    assert e.value.body["code"] == "model_loading"
    assert "transformer" in e.value.body["message"]
    assert int(e.value.response.headers["Retry-After"]) >= 1


async def test_shipped_offline_config_is_ready_without_keys_or_gpu(tmp_path, monkeypatch):
    """models.yaml as `make run` serves it: qwen-image has no possible route here, the rest serve.

    From an empty cache, as on a new machine: both tiny models are built and loaded at once."""
    from proxy import build_app, load_config

    monkeypatch.setenv("QWEN_IMAGE_PROXY_CACHE", str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUMENFALL", "QIP_"))}
    env["QIP_STORE_PATH"] = str(tmp_path / "images")
    config = load_config(ROOT / "models.yaml", env=env)
    app = build_app(config)
    gateway = app[GATEWAY]
    await gateway.start()
    try:
        from proxy.api.admin import model_states

        deadline = time.monotonic() + 60
        while model_states(gateway)["qwen-image-tiny"]["state"] == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        while model_states(gateway)["qwen-image-edit-tiny"]["state"] == "loading" and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        states = model_states(gateway)
        assert states["qwen-image-tiny"]["ready"] and states["qwen-image-placeholder"]["ready"]
        assert states["qwen-image-edit-tiny"]["ready"], states["qwen-image-edit-tiny"]
        assert not states["qwen-image"]["possible"]
        assert {r["state"] for r in states["qwen-image"]["routes"]} <= {"missing_key", "no_gpu", "unavailable"}
    finally:
        await gateway.close()


async def test_ready_turns_503_while_draining(start_proxy, tmp_path):
    server, client = await start_proxy(base_config(tmp_path))
    assert (await get_json(server, "/ready"))[0] == 200
    await server.app[GATEWAY].drain()
    status, ready = await get_json(server, "/ready")
    assert status == 503 and ready["status"] == "draining"
    assert (await get_json(server, "/health"))[0] == 200
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image-placeholder", prompt="p", size="64x64")
    assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
    assert e.value.response.headers["Retry-After"] == "1"


async def test_metrics_show_route_states_and_outcomes(start_proxy, tmp_path):
    server, client = await start_proxy(base_config(tmp_path))
    await client.images.generate(model="qwen-image-placeholder", prompt="p", size="64x64")
    with pytest.raises(BadRequestError):
        await client.images.generate(model="qwen-image-placeholder", prompt="p", n=99)
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        text = await r.text()
    assert 'qip_route_state{model="qwen-image-placeholder",route="placeholder",state="ready"} 1.0' in text
    assert 'qip_request_outcomes_total{model="qwen-image-placeholder",outcome="ok"} 1.0' in text
    assert 'qip_request_outcomes_total{model="qwen-image-placeholder",outcome="client_error"} 1.0' in text


async def test_one_log_line_per_request(start_proxy, tmp_path, caplog):
    _, client = await start_proxy(base_config(tmp_path))
    caplog.set_level("INFO", logger="proxy.requests")
    r = await client.images.with_raw_response.generate(model="qwen-image-placeholder", prompt="p", size="64x64")
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "proxy.requests"]
    assert len(lines) == 1
    line = lines[0]
    assert f"request_id={r.headers['x-request-id']}" in line
    for part in ("model=qwen-image-placeholder", "route=placeholder", "attempts=1", "status=200", "outcome=ok"):
        assert part in line
    assert r.headers["x-qip-route"] == "placeholder" and r.headers["x-qip-attempts"] == "1"


# ---- SIGTERM --------------------------------------------------------------------------------------


class SlowUpstream:
    """An OpenAI-compatible image API that answers after `delay` seconds."""

    def __init__(self, delay: float):
        self.delay = delay
        self.url = ""
        self.received = 0  # image calls that reached it

    async def start(self, aiohttp_server):
        from .fake_openai_upstream import make_image

        async def generations(request):
            body = await request.json()
            self.received += 1
            await asyncio.sleep(self.delay)
            w, h = (int(v) for v in body["size"].split("x"))
            data = base64.b64encode(make_image(w, h, 1)).decode()
            return web.json_response({"created": 1, "data": [{"b64_json": data}]})

        app = web.Application()
        app.router.add_post("/v1/images/generations", generations)
        server = await aiohttp_server(app)
        self.url = str(server.make_url("/v1"))
        return self


def serve(cfg: dict, tmp_path) -> tuple[subprocess.Popen, Path]:
    """`python -m proxy serve` started on cfg, written to tmp_path/models.yaml (returned too); its log in
    proc.stdout. wait_listening() until it takes requests."""
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, path


def start_serving(tmp_path, upstream_url: str, grace: float) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port, "shutdown_grace": grace}
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["slow"] = {"kind": "openai", "base_url": upstream_url, "api_key": "k", "timeout": 60}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["slow"]}
    proc, _ = serve(cfg, tmp_path)
    return proc, port


async def wait_listening(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120  # an interpreter start on a busy machine
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the proxy did not start")


async def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        raise AssertionError(f"still running {timeout} s after SIGTERM")
    return proc.returncode


async def test_serve_lifts_the_open_files_limit(tmp_path):
    """A service manager's soft limit on open files (1024 is usual) would stop accepting at a few hundred
    slow generations in flight (two sockets each): `serve` raises it to the hard limit, and says so."""
    import resource

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))

    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=low_soft_limit)
    try:
        await wait_listening(port, proc)  # the socket listens before the limit is lifted: wait for it

        def open_files_limit() -> list[str]:
            limits = Path(f"/proc/{proc.pid}/limits").read_text()
            return next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]

        await eventually(lambda: open_files_limit() == ["4096", "4096"])
    finally:
        proc.terminate()
        proc.wait(10)
    # Said in the log, with what it allows (two sockets per request in flight).
    assert "open files: limit raised from 256 to 4096 (about 2048 requests in flight at most)" in \
        proc.stdout.read().decode()


async def test_a_burst_of_connections_waits_in_the_accept_queue(tmp_path):
    """Thousands of clients connecting at the same moment wait in the listening socket's queue: with the
    server not accepting at all (stopped), 300 connections still complete their handshake (a queue of
    128, Python's and aiohttp's default, drops the rest, and each client retries a second or more later)."""
    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients: list[socket.socket] = []
    try:
        await wait_listening(port, proc)
        await asyncio.sleep(1)  # aiohttp's site has set up the socket (the queue is set again there)
        os.kill(proc.pid, signal.SIGSTOP)  # accepts nothing from now on
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            clients.append(sock)

        def handshakes_done() -> int:
            _, writable, _ = select.select([], clients, [], 0)
            return sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in writable)

        await eventually(lambda: handshakes_done() == 300, timeout=20)
    finally:
        for sock in clients:
            sock.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


async def test_sigterm_lets_in_flight_requests_finish(aiohttp_server, tmp_path):
    up = await SlowUpstream(delay=1.5).start(aiohttp_server)
    proc, port = start_serving(tmp_path, up.url, grace=60)
    try:
        await wait_listening(port, proc)
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        calls = [asyncio.create_task(client.images.generate(model="qwen-image", prompt="p", size="64x64",
                                                             response_format="b64_json")) for _ in range(3)]
        await eventually(lambda: up.received == 3)  # all in flight, however busy the machine
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*calls)
        for r in results:
            assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 64)
        await wait_exit(proc, 40)
        assert time.monotonic() - t0 < 40  # done when the calls are, not at the 60 s grace
        await client.close()
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_sigterm_past_the_grace_ends_requests_with_a_clear_error(aiohttp_server, tmp_path):
    up = await SlowUpstream(delay=30).start(aiohttp_server)
    proc, port = start_serving(tmp_path, up.url, grace=1)
    try:
        await wait_listening(port, proc)
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
        plain = asyncio.create_task(client.images.generate(model="qwen-image", prompt="p", size="64x64"))

        async def streamed():
            stream = await client.images.generate(model="qwen-image", prompt="p", size="64x64", stream=True)
            return [event async for event in stream]

        stream_call = asyncio.create_task(streamed())
        await eventually(lambda: up.received == 2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(InternalServerError) as e:
            await plain
        assert e.value.status_code == 503 and e.value.body["code"] == "shutting_down"
        with pytest.raises(Exception) as e:
            await stream_call
        assert "shutting down" in str(e.value)
        assert await wait_exit(proc, 10) == 0
        assert time.monotonic() - t0 < 20  # the grace (1 s), not the upstream's 30 s
        await client.close()
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- mounted in another app -------------------------------------------------------------------------


async def test_mounted_leaves_the_host_routes_alone_and_cancels_on_disconnect(aiohttp_server, tmp_path):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def never_answers(request):
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.json_response({})

    up_app = web.Application()
    up_app.router.add_post("/v1/images/generations", never_answers)
    up = await aiohttp_server(up_app)

    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["hang"] = {"kind": "openai", "base_url": str(up.make_url("/v1")), "api_key": "k"}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["hang"]}

    host = web.Application()
    host.router.add_get("/health", lambda r: web.json_response({"host": "health"}))
    host.router.add_get("/v1/models", lambda r: web.json_response({"host": "models"}))
    host.middlewares.append(image_proxy_middleware(parse_config(cfg, env={}), host, admin_prefix="/qip"))
    # A host app served the aiohttp default way: handler_cancellation off.
    runner = web.AppRunner(host)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as s:
            for path, expected in (("/health", {"host": "health"}), ("/v1/models", {"host": "models"})):
                async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                    assert await r.json() == expected
            async with s.get(f"http://127.0.0.1:{port}/qip/ready") as r:
                assert r.status == 200 and (await r.json())["status"] == "ready"
            async with s.get(f"http://127.0.0.1:{port}/qip/v1/models") as r:
                assert {m["id"] for m in (await r.json())["data"]} >= {"qwen-image", "qwen-image-placeholder"}

            # The client gives up: the gateway notices and cancels its upstream call.
            body = json.dumps({"model": "qwen-image", "prompt": "p", "size": "64x64"})
            call = asyncio.create_task(s.post(f"http://127.0.0.1:{port}/v1/images/generations", data=body,
                                              headers={"Content-Type": "application/json"}))
            await asyncio.wait_for(started.wait(), 10)
            call.cancel()
            await asyncio.wait_for(cancelled.wait(), 30)
    finally:
        await runner.cleanup()


async def test_models_list_what_each_model_can_do(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))
    models = {m.id: m for m in (await client.models.list()).data}
    caps = models["qwen-image-placeholder"].model_extra["capabilities"]
    assert caps["default_size"] == "1024x1024" and caps["sizes"]["1K"]["16:9"] == "1365x768"
    assert caps["max_n"] == 10 and caps["edits"] is False
    assert caps["routes"] == [{"name": "placeholder", "kind": "placeholder", "state": "ready"}]


class SlowPlaceholder(PlaceholderProvider):
    async def generate(self, req, route):
        await asyncio.sleep(0.4)
        return await super().generate(req, route)


async def test_streams_send_keepalives_and_carry_the_request_id(start_proxy, tmp_path):
    server, _ = await start_proxy(base_config(tmp_path), providers={"placeholder": SlowPlaceholder("placeholder", {})})
    server.app[GATEWAY].keepalive_seconds = 0.1
    body = {"model": "qwen-image-placeholder", "prompt": "p", "size": "64x64", "stream": True}
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"), json=body,
                                                    headers={"X-Request-Id": "trace-123"}) as r:
        text = await r.text()
        assert r.headers["X-Request-Id"] == "trace-123"
    assert text.count(": keepalive") >= 2
    assert text.rstrip().endswith("}") and "event: image_generation.completed" in text
