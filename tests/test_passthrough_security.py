"""Passthrough stays under its prefix, and chunked bodies are capped like sized ones.

The fake upstream serves the passthrough prefix (/openai/v1) and, beside it, an /admin area that
must never be reached through the proxy. Adversarial paths go out over a raw socket, so no client
library tidies them up on the way.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from proxy import parse_config
from proxy.api.passthrough import Passthrough, confined_path
from proxy.config import PassthroughConfig

from .conftest import base_config

LIMIT_MB = 0.01  # 10485 bytes
LIMIT = int(LIMIT_MB * 1024 * 1024)


@dataclass
class Hit:
    method: str
    raw_path: str
    raw_query: str
    chunked: bool
    received: int = 0
    complete: bool = False


class Upstream:
    """Records every request it gets; answers under /openai/v1 with an echo, under /admin with a secret."""

    def __init__(self):
        self.hits: list[Hit] = []
        self.url = ""

    @property
    def admin_hits(self) -> list[Hit]:
        return [h for h in self.hits if not h.raw_path.startswith("/openai/v1/")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(request.method, request.rel_url.raw_path, request.rel_url.raw_query_string,
                  chunked=request.content_length is None and request.body_exists)
        self.hits.append(hit)
        async for chunk in request.content.iter_any():
            hit.received += len(chunk)
        hit.complete = True
        if not hit.raw_path.startswith("/openai/v1/"):
            return web.json_response({"secret": "admin area"})
        return web.json_response({"path": hit.raw_path, "query": hit.raw_query, "received": hit.received})

    async def start(self, aiohttp_server) -> Upstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        server = await aiohttp_server(app)
        self.url = str(server.make_url("")).rstrip("/")
        return self


@pytest.fixture
async def upstream(aiohttp_server) -> Upstream:
    return await Upstream().start(aiohttp_server)


@pytest.fixture
async def proxy(start_proxy, tmp_path, upstream):
    cfg = base_config(tmp_path)
    cfg["server"] = {"max_body_mb": LIMIT_MB}
    cfg["passthrough"] = {"base_url": f"{upstream.url}/openai/v1"}
    server, client = await start_proxy(cfg)
    yield server
    await client.close()


async def raw_request(port: int, method: str, target: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request with the target exactly as written; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n" if body else "\r\n"
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if any(line.lower() == "transfer-encoding: chunked" for line in lines[1:]):
        out = b""
        while payload:
            size, _, payload = payload.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, payload = out + payload[:n], payload[n + 2:]
        payload = out
    return int(lines[0].split()[1]), payload


def assert_unknown_url(body: bytes) -> None:
    error = json.loads(body)
    assert set(error) == {"error"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] is None and error["error"]["code"] == "unknown_url"
    assert set(error["error"]) == {"message", "type", "param", "code"}


ESCAPES = [
    "/v1/../admin/secret",
    "/v1/../../admin/secret",
    "/v1/files/../../admin/secret",
    "/v1/%2e%2e/admin/secret",
    "/v1/%2E%2E/admin/secret",
    "/v1/.%2e/admin/secret",
    "/v1/%2e./admin/secret",
    "/v1/..%2fadmin/secret",
    "/v1/..%2Fadmin/secret",
    "/v1/%2e%2e%2fadmin/secret",
    "/v1%2f..%2fadmin/secret",
    "/v1/files%2f..%2f..%2fadmin/secret",
    "/v1/files/x%2f..%2f..%2f..%2fadmin/secret",
    "/v1/%252e%252e/admin/secret",
    "/v1/%25252e%25252e/admin/secret",
    "/v1/%252e%252e%252fadmin/secret",
    "/v1/..\\admin/secret",
    "/v1\\..\\admin/secret",
    "/v1/%5c..%5cadmin/secret",
    "/v1/..%5cadmin/secret",
    "/v1/..;x/admin/secret",
    "/v1/a//../../../admin/secret",
    "/v1/./../admin/secret",
    "/v1/..",
    "/v1/%00/chat/completions",
    "/v1/chat%0d%0aX-Injected:%201/completions",
]


@pytest.mark.parametrize("path", ESCAPES)
async def test_paths_that_leave_the_prefix_are_404(proxy, upstream, path):
    for method in ("GET", "POST"):
        status, body = await raw_request(proxy.port, method, path, b'{"model": "m"}' if method == "POST" else b"")
        assert status == 404, (method, path, body)
        assert_unknown_url(body)
    assert upstream.hits == []


async def test_raw_client_sees_the_same(proxy, upstream):
    """The same through aiohttp with encoded=True: no client-side normalisation either."""
    from yarl import URL

    async with aiohttp.ClientSession() as s:
        for path in ("/v1/../admin/secret", "/v1/%2e%2e/admin/secret", "/v1/%252e%252e/admin/secret"):
            url = URL(f"http://127.0.0.1:{proxy.port}{path}", encoded=True)
            async with s.get(url) as r:
                assert r.status == 404
                assert_unknown_url(await r.read())
    assert upstream.hits == []


@pytest.mark.parametrize(("path", "forwarded"), [
    ("/v1/chat/completions", "/openai/v1/chat/completions"),
    ("/v1/models/gpt-4o", "/openai/v1/models/gpt-4o"),
    ("/v1/models/ft:gpt-4o:org:custom%3Aid", "/openai/v1/models/ft:gpt-4o:org:custom%3Aid"),
    ("/v1/models/accounts%2Ffireworks%2Fmodels%2Fllama", "/openai/v1/models/accounts%2Ffireworks%2Fmodels%2Fllama"),
    ("/v1/files/file-abc/content", "/openai/v1/files/file-abc/content"),
    ("/v1/models/a...b", "/openai/v1/models/a...b"),
    ("/v1/./models/x", "/openai/v1/models/x"),
    ("/v1/models/../chat/completions", "/openai/v1/chat/completions"),
    ("/v1/models/%2e%2e/embeddings", "/openai/v1/embeddings"),
    ("/v1//embeddings", "/openai/v1/embeddings"),
    ("/v1/models/", "/openai/v1/models/"),
])
async def test_legit_paths_forwarded(proxy, upstream, path, forwarded):
    status, body = await raw_request(proxy.port, "GET", path + "?b=2&a=1&a=%2e%2e%2f")
    assert status == 200, body
    (hit,) = upstream.hits
    assert hit.raw_path == forwarded and hit.raw_query == "b=2&a=1&a=%2e%2e%2f"
    assert json.loads(body)["path"] == forwarded


async def test_post_forwarded(proxy, upstream):
    status, body = await raw_request(proxy.port, "POST", "/v1/chat/completions", b'{"model": "m"}')
    assert status == 200 and json.loads(body)["received"] == len(b'{"model": "m"}')
    assert [h.raw_path for h in upstream.hits] == ["/openai/v1/chat/completions"]


def test_confined_path_rules():
    assert confined_path("/v1/a/./b/../c") == "/v1/a/c"
    assert confined_path("/v1/a/b/..") == "/v1/a/"
    assert confined_path("/v1/a/.") == "/v1/a/"
    assert confined_path("/..") is None and confined_path("/a/../..") is None
    assert confined_path("/a/%2e%2e/%2e%2e") is None
    assert confined_path("/a/%25%32%65%25%32%65/b") == "/b"  # %2e%2e spelled with encoded percent signs
    assert confined_path("/a/%" + "25" * 6 + "2e%" + "25" * 6 + "2e/b") == "/b"  # seven levels deep
    assert confined_path("/a/%" + "25" * 20 + "2e") is None  # still changing after 8 rounds: refused
    assert confined_path("/a/%%%2e/b") == "/a/%%%2e/b"  # stray percent signs settle
    assert confined_path("relative") is None and confined_path("") is None


# ---- chunked bodies -----------------------------------------------------------------------------


async def chunks(n: int, size: int = 1000):
    for _ in range(n):
        yield b"x" * size
        # A pause between chunks, so the proxy streams the first ones upstream before the cap is hit.
        await asyncio.sleep(0.002)


async def post_chunked(port: int, n: int) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        try:
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=chunks(n),
                              headers={"Content-Type": "application/json"}) as r:
                return r.status, await r.read()
        except aiohttp.ClientError as e:
            return 0, repr(e).encode()


async def settled(upstream: Upstream) -> None:
    """Wait until the upstream handlers have seen the end of what they were sent."""
    for _ in range(100):
        if all(h.complete for h in upstream.hits):
            return
        await asyncio.sleep(0.02)


async def test_chunked_body_over_the_cap(proxy, upstream):
    # Needs app.py to hand server.max_body_mb to Passthrough(max_body_bytes=...).
    status, body = await post_chunked(proxy.port, 40)  # 40000 bytes, no Content-Length
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "payload_too_large"
    await settled(upstream)
    # At most the limit reached the upstream, and never the end of the body.
    assert all(h.received <= LIMIT and not h.complete for h in upstream.hits), upstream.hits


async def test_chunked_body_under_the_cap(proxy, upstream):
    status, body = await post_chunked(proxy.port, 5)
    assert status == 200, body
    assert json.loads(body)["received"] == 5000
    (hit,) = upstream.hits
    assert hit.chunked and hit.complete and hit.received == 5000


async def test_sized_body_over_the_cap(proxy, upstream):
    status, body = await raw_request(proxy.port, "POST", "/v1/chat/completions", b"x" * (LIMIT + 1))
    assert status == 413
    assert json.loads(body)["error"]["code"] == "payload_too_large"
    assert upstream.hits == []


async def test_passthrough_cap_on_its_own(aiohttp_server, upstream):
    """Passthrough(max_body_bytes=...) without the rest of the proxy: the same caps."""
    passthrough = Passthrough(PassthroughConfig(base_url=f"{upstream.url}/openai/v1"), max_body_bytes=3000)
    await passthrough.start()

    async def handler(request: web.Request) -> web.StreamResponse:
        from proxy.errors import ProxyError

        try:
            return await passthrough.forward(request)
        except ProxyError as e:
            return e.to_response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app)
    try:
        assert (await post_chunked(server.port, 2))[0] == 200
        status, _ = await post_chunked(server.port, 10)
        assert status == 413
        status, _ = await raw_request(server.port, "POST", "/v1/chat/completions", b"y" * 3001)
        assert status == 413
        status, body = await raw_request(server.port, "GET", "/v1/%2e%2e/admin/secret")
        assert status == 404
        assert_unknown_url(body)
        await settled(upstream)
        assert [h.received for h in upstream.hits if h.complete] == [2000]
        assert upstream.admin_hits == []
    finally:
        await passthrough.close()


def test_config_still_parses(tmp_path):
    cfg = base_config(tmp_path)
    cfg["passthrough"] = {"base_url": "http://127.0.0.1:9/openai/v1"}
    assert parse_config(cfg, env={}).passthrough.enabled
