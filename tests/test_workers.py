"""`serve --workers N`: several processes on one port, all stopped by one SIGTERM; local routes refused."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from .conftest import base_config
from .fake_openai_upstream import free_port

ROOT = Path(__file__).resolve().parent.parent


def write_config(tmp_path, **extra) -> Path:
    cfg = base_config(tmp_path)
    cfg.update(extra)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


async def test_two_workers_share_the_port_and_stop_together(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(write_config(tmp_path)),
                             "--port", str(port), "--workers", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pids: set[int] = set()
        deadline = time.monotonic() + 60
        body = {"model": "qwen-image-placeholder", "prompt": "p", "size": "512x512", "response_format": "b64_json"}

        async def one(session) -> None:
            try:
                async with session.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body) as r:
                    assert r.status == 200
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    pids.add((await r.json())["pid"])
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.2)  # not listening yet

        while len(pids) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode()
            # New connections each time, several at once, so both workers take some.
            sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) for _ in range(6)]
            try:
                await asyncio.gather(*(one(s) for s in sessions))
            finally:
                for s in sessions:
                    await s.close()
        assert len(pids) == 2 and proc.pid not in pids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        for pid in pids:  # every worker is gone
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_workers_refuse_local_routes(tmp_path):
    path = write_config(tmp_path)
    cfg = yaml.safe_load(path.read_text())
    cfg["providers"]["local"] = {"kind": "diffusers", "model": "tiny", "device": "cpu"}
    cfg["models"]["tiny"] = {"sizes": "qwen-image", "routes": ["local"]}
    path.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path), "--port",
                          str(free_port()), "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "cannot be shared between processes" in run.stderr and "local" in run.stderr
    assert "Traceback" not in run.stderr
