"""A real Prometheus server for tests (Debian package `prometheus`): a throwaway config and data folder,
loopback only, on a free port; and promtool beside it."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from .services import free_port, service_missing


def require(binary: str) -> str:
    """The binary's path; without it a skip (a failure under QIP_REQUIRE_SERVICES, as in CI)."""
    path = shutil.which(binary)
    if path is None:
        service_missing(f"{binary} is not installed (apt-get install -y prometheus)")
    return path


class Prometheus:
    """prometheus scraping `targets` every second and evaluating `rule_files` every second."""

    def __init__(self, folder: Path, targets: list[str], rule_files: list[Path]):
        self.binary = require("prometheus")
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": "qwen-image-proxy", "static_configs": [{"targets": targets}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None
        self.log = folder / "prometheus.log"

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--config.file={self.folder / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.folder / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
                 "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def exited(self) -> str | None:
        """Its log, if it has exited (a bad config)."""
        if self.proc is not None and self.proc.poll() is not None:
            return self.log.read_text(errors="replace")
        return None


async def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    """Await `check()` until it returns something truthy (the proxy under test shares this event loop:
    nothing here may block it); its last answer goes into the error."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} within {timeout} s; last: {last!r}")
