"""The real `serve` against slow clients (raw sockets on loopback): a request head trickled byte by byte, a
connection that says nothing, an idle keep-alive connection, a body that stalls; and the bind guard."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy import cli
from proxy.http.server import ConnectionLimits, GuardedAppRunner

from .conftest import base_config

ROOT = Path(__file__).resolve().parent.parent
HEAD, BODY, IDLE = 1.0, 1.0, 2.0  # server.header_timeout, body_timeout, keepalive_timeout
MARGIN = 2.0  # scheduling slack on a busy machine


class Serving:
    """`python -m proxy serve` in a subprocess; its output is collected by a thread (the pipe never fills)."""

    def __init__(self, tmp_path: Path, server: dict, *args: str):
        cfg = base_config(tmp_path)
        cfg["server"] = server
        path = tmp_path / "models.yaml"
        path.write_text(yaml.safe_dump(cfg))
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path), *args],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"serving on (http://\S+)", line):
                self.url = m.group(1)
                self._started.set()
        self._started.set()

    def wait_started(self, timeout: float = 30) -> str:
        self._started.wait(timeout)
        assert self.url, "the server never said where it listens:\n" + "".join(self.lines)
        return self.url

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    serving = Serving(tmp_path_factory.mktemp("slow"),
                      {"header_timeout": HEAD, "body_timeout": BODY, "keepalive_timeout": IDLE}, "--port", "0")
    try:
        url = serving.wait_started()
        yield int(url.rsplit(":", 1)[1])
    finally:
        assert serving.stop() == 0
        assert "Traceback" not in "".join(serving.lines), "".join(serving.lines)


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, time.monotonic()
        if not chunk:
            return data, time.monotonic()
        data += chunk
    raise AssertionError(f"the connection was still open after {limit} s (got {data[:200]!r})")


def response_of(data: bytes) -> tuple[int, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_a_trickled_request_head_is_cut_off(port):
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 500
    with connect(port) as sock:
        opened = time.monotonic()
        closed_at, got = None, b""
        for byte in head:  # one byte every 50 ms; bounded: HEAD + MARGIN at most
            if time.monotonic() - opened > HEAD + MARGIN:
                break
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed_at = time.monotonic()
                break
            if select.select([sock], [], [], 0.05)[0]:
                got, closed_at = read_until_closed(sock, MARGIN)
                break
        assert closed_at is not None, f"still open {HEAD + MARGIN} s into a trickled head"
    assert HEAD - 0.2 <= closed_at - opened <= HEAD + MARGIN
    assert got == b"" or got.startswith(b"HTTP/1.1 408 Request Timeout")


def test_a_connection_that_sends_nothing_is_closed(port):
    with connect(port) as sock:
        opened = time.monotonic()
        _, closed_at = read_until_closed(sock, HEAD + MARGIN)
    assert closed_at - opened <= HEAD + MARGIN


def test_an_idle_keepalive_connection_is_closed(port):
    with connect(port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        length = int(re.search(rb"(?i)content-length: (\d+)", data).group(1))
        while len(data.partition(b"\r\n\r\n")[2]) < length:
            data += sock.recv(65536)
        answered = time.monotonic()
        assert response_of(data)[0] == 200
        rest, closed_at = read_until_closed(sock, IDLE + MARGIN)
    assert rest == b""
    assert IDLE - 0.2 <= closed_at - answered <= IDLE + MARGIN


def post_head(length: int) -> bytes:
    return (f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_a_stalled_body_is_a_400_and_the_connection_closes(port):
    body = json.dumps({"model": "qwen-image-placeholder", "prompt": "p", "size": "64x64"}).encode()
    with connect(port) as sock:
        sock.sendall(post_head(len(body)) + body[:10])
        stalled = time.monotonic()
        data, closed_at = read_until_closed(sock, BODY + MARGIN)
    assert closed_at - stalled <= BODY + MARGIN
    status, payload = response_of(data)
    assert status == 400
    error = json.loads(payload)["error"]
    assert error["code"] == "invalid_body" and "stalled" in error["message"]
    # A body nobody reads (the answer came first) is not waited for past body_timeout either.
    with connect(port) as sock:
        sock.sendall(post_head(len(body)).replace(b"/v1/images/generations", b"/nowhere") + body[:10])
        stalled = time.monotonic()
        data, closed_at = read_until_closed(sock, BODY + MARGIN)
    assert closed_at - stalled <= BODY + MARGIN
    assert response_of(data)[0] == 404


def test_a_slow_but_steady_body_is_served(port):
    body = json.dumps({"model": "qwen-image-placeholder", "prompt": "p" * 50, "size": "64x64",
                       "response_format": "b64_json"}).encode()
    with connect(port) as sock:
        sock.sendall(post_head(len(body)))
        third = len(body) // 3
        for piece in (body[:third], body[third:2 * third], body[2 * third:]):
            time.sleep(BODY * 0.6)  # each gap shorter than body_timeout; the whole body takes longer
            sock.sendall(piece)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
    assert response_of(data)[0] == 200


async def test_a_body_the_handler_is_not_reading_yet_does_not_count_as_stalled():
    """GuardedAppRunner in process: a big body held back by flow control (the handler is busy) is not the
    client's stall; the connection then serves its next request as usual."""
    limits = ConnectionLimits(header_timeout=1, body_timeout=0.2, keepalive_timeout=5)

    async def busy_then_read(request: web.Request) -> web.Response:
        await asyncio.sleep(3 * limits.body_timeout)
        return web.Response(text=str(len(await request.read())))

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/", busy_then_read)
    runner = GuardedAppRunner(app, limits)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        async with aiohttp.ClientSession() as s:
            for size in (2 * 1024 * 1024, 10):
                async with s.post(url, data=b"x" * size) as r:
                    assert r.status == 200 and await r.text() == str(size)
    finally:
        await runner.cleanup()


# ---- the bind guard -------------------------------------------------------------------------------------


def test_serve_without_keys_refuses_other_addresses_than_loopback(tmp_path, capsys):
    # In process (the same cmd_serve as the command): it stops before serving anything.
    cfg = base_config(tmp_path)
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--config", str(tmp_path / "models.yaml"), "--host", "0.0.0.0", "--port", "0"])
    assert e.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"error: refusing to serve on 0\.0\.0\.0:\d+ without API keys: set server\.api_keys, listen on "
        r"127\.0\.0\.1, or set server\.allow_unauthenticated: true", lines[0]), lines


def test_allow_unauthenticated_starts_with_a_warning(tmp_path):
    # Bound to every interface only for a moment; no traffic is sent anywhere.
    serving = Serving(tmp_path, {"allow_unauthenticated": True}, "--host", "0.0.0.0", "--port", "0")
    try:
        url = serving.wait_started()
        assert url.startswith("http://0.0.0.0:")
        warnings = [line for line in serving.lines if "WARNING" in line and "without API keys" in line]
        assert len(warnings) == 1 and "server.allow_unauthenticated" in warnings[0]
    finally:
        assert serving.stop() == 0


# ---- a client that stops reading its answer -----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_stops_reading_its_answer_is_dropped(start_proxy, tmp_path, aiohttp_server, stream):
    """A client that takes none of a big answer for server.send_timeout is cut off: the answer (here 17 MB
    of images, as JSON or as a stream's completed events) is not kept in memory as long as the client
    pleases."""
    import base64
    import io
    import os

    from PIL import Image

    from .fake_openai_upstream import FakeOpenAIUpstream

    noise = Image.frombytes("RGB", (1024, 1024), os.urandom(1024 * 1024 * 3))
    png = io.BytesIO()
    noise.save(png, "PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    up = await FakeOpenAIUpstream(api_key="k", payload_override={
        "created": 1, "data": [{"b64_json": b64} for _ in range(4)]}).start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["server"] = {"send_timeout": 1}
    cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": "k",
                              "max_images_per_call": 4, "output_formats": ["png"]}
    cfg["models"]["qwen-image"] = {"sizes": "qwen-image", "routes": ["up"]}
    server, _ = await start_proxy(cfg)

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)  # before connecting: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    body = json.dumps({"model": "qwen-image", "prompt": "noise", "n": 4, "size": "1024x1024",
                       "response_format": "b64_json", "stream": stream}).encode()
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200")
    if not stream:
        assert int(re.search(rb"(?i)content-length: (\d+)", head).group(1)) > 16_000_000
    await asyncio.sleep(1 + 2 * MARGIN)  # reading nothing (a stream's images come a moment after its head)
    received = 0
    with contextlib.suppress(ConnectionResetError):  # a client kept waiting would time out here instead
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(chunk)
    assert received < 16_000_000  # cut off: not all four images
    writer.close()
