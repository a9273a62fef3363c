"""Real backing services for tests: a redis-server process and moto's S3 server, each on a free loopback
port, started and stopped by fixtures. Import the fixtures into a test module to use them:

    from .services import moto_server, redis_server, s3_bucket  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only. stop()/start() to test an outage,
    pause()/resume() (SIGSTOP/SIGCONT) to test a Redis that hangs."""

    def __init__(self, binary: str):
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)  # the port stays open, nothing answers

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)


def redis_binary() -> str | None:
    return shutil.which("redis-server")


@pytest.fixture
def redis_server():
    """A started redis-server on a free port (one per test: nothing leaks between tests)."""
    binary = redis_binary()
    if binary is None:
        message = ("redis-server is not installed (apt-get install -y redis-server); .ci/run installs it "
                   "and sets QIP_REQUIRE_SERVICES=1, which makes this a failure")
        if os.environ.get("QIP_REQUIRE_SERVICES") or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.resume()
        server.stop()


class MotoServer:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=S3_KEY_ID, aws_secret_access_key=S3_SECRET)


S3_KEY_ID = "AKIATESTPROXY0000001"
S3_SECRET = "test-secret-key-for-moto-0000000000000000"


@pytest.fixture(scope="session")
def moto_server():
    """moto's standalone S3 server in a thread, on a free port, for the whole session."""
    server = MotoServer()
    server.server.start()
    wait_for_port(server.port)
    try:
        yield server
    finally:
        server.server.stop()


@pytest.fixture
def s3_bucket(moto_server) -> str:
    """A new, empty bucket on the moto server."""
    name = f"qip-{uuid.uuid4().hex[:12]}"
    moto_server.client().create_bucket(Bucket=name)
    return name
