"""The guarded fetcher against real servers on loopback: what it refuses, what it lets through, its caps."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from proxy.media.fetch import (
    FetchFailed,
    FetchPolicy,
    FetchRefused,
    GuardedFetcher,
    address_refusal,
    parse_numeric_host,
)

PAYLOAD = b"\x89PNG fake image bytes " * 10
# Lets loopback through so the test servers are reachable; everything else stays as the defaults.
LOCAL = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",))


class Target:
    """A test server that records every path it is asked for."""

    def __init__(self):
        self.hits: list[str] = []
        self.url = ""
        self.port = 0
        self.gate = asyncio.Event()  # /held answers once this is set

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path_qs)
        path = request.path
        if path == "/data":
            return web.Response(body=PAYLOAD, content_type="image/png")
        if path == "/secret":
            return web.Response(text="the secret")
        if path == "/redirect":
            return web.Response(status=int(request.query.get("status", "302")),
                                headers={"Location": request.query["to"]})
        if path == "/loop":
            return web.Response(status=302, headers={"Location": "/loop"})
        if path == "/big":
            return web.Response(body=b"x" * 5000)
        if path == "/big-chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(50):
                await resp.write(b"y" * 100)
            await resp.write_eof()
            return resp
        if path == "/held":
            await self.gate.wait()
            return web.Response(body=PAYLOAD, content_type="image/png")
        if path == "/slow":
            await asyncio.sleep(60)
            return web.Response(body=PAYLOAD)
        if path.startswith("/status/"):
            return web.Response(status=int(path.rsplit("/", 1)[1]), text="upstream error page")
        return web.Response(status=404)


async def start(aiohttp_server, host: str = "127.0.0.1", port: int | None = None) -> Target:
    target = Target()
    server = await aiohttp_server(target.app(), host=host, **({"port": port} if port else {}))
    target.port = server.port
    target.url = f"http://{host}:{server.port}"
    return target


@pytest.fixture
async def good(aiohttp_server) -> Target:
    return await start(aiohttp_server)


@pytest.fixture
async def secret(aiohttp_server) -> Target:
    return await start(aiohttp_server)


class Names:
    """A resolver for test names that records each lookup."""

    def __init__(self, table: dict[str, list[str]]):
        self.table = table
        self.calls: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "unknown test name")
        return self.table[host]


@pytest.fixture
async def names():
    return Names({"good.test": ["127.0.0.1"], "evil.test": ["127.0.0.1"], "loop.test": ["127.0.0.1"],
                  "a.example.com": ["127.0.0.1"], "mixed.test": ["127.0.0.1", "10.0.0.1"],
                  "metadata.test": ["169.254.169.254"], "v6loop.test": ["::1"]})


@pytest.fixture
async def fetcher(names):
    f = GuardedFetcher(resolver=names)
    yield f
    await f.close()


# ---- allowed ------------------------------------------------------------------------------------


async def test_many_fetches_at_once(fetcher, good):
    """No cap on fetches in flight (an HTTP client's usual 100 connections would queue the rest, each on
    its own timeout): 120 slow image downloads all reach the host at once."""
    fetches = [asyncio.ensure_future(fetcher.fetch(f"{good.url}/held", LOCAL)) for _ in range(120)]
    for _ in range(100):
        if len(good.hits) == 120:
            break
        await asyncio.sleep(0.05)
    reached = len(good.hits)
    good.gate.set()
    results = await asyncio.gather(*fetches)
    assert reached == 120
    assert all(r == PAYLOAD for r in results)


async def test_allowed_by_network(fetcher, good):
    assert await fetcher.fetch(f"{good.url}/data", LOCAL) == PAYLOAD
    assert good.hits == ["/data"]


async def test_allowed_by_allow_private(fetcher, good):
    policy = FetchPolicy(allow_http=True, allow_private=True)
    assert await fetcher.fetch(f"{good.url}/data", policy) == PAYLOAD
    assert await fetcher.fetch(f"http://localhost:{good.port}/data", policy) == PAYLOAD


async def test_allowed_by_name_and_allowlist(fetcher, good, names):
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.1/32",),
                         allowed_hosts=frozenset({"good.test", "*.example.com"}))
    assert await fetcher.fetch(f"http://good.test:{good.port}/data", policy) == PAYLOAD
    assert await fetcher.fetch(f"http://A.Example.com.:{good.port}/data", policy) == PAYLOAD
    assert names.calls == ["good.test", "a.example.com"]  # one lookup per fetch


async def test_resolver_kinds(good):
    class Resolver(AbstractResolver):
        async def resolve(self, host, port=0, family=socket.AF_INET):
            return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                     "proto": 0, "flags": 0}]

        async def close(self):
            pass

    async def async_names(host):
        return ["127.0.0.1"]

    for resolver in (Resolver(), async_names):
        f = GuardedFetcher(resolver=resolver)
        try:
            assert await f.fetch(f"http://any.test:{good.port}/data", LOCAL) == PAYLOAD
        finally:
            await f.close()


async def test_connects_to_the_checked_address_only(aiohttp_server, good):
    """DNS rebinding: the name's first answer is checked; a second lookup would give another address."""
    try:
        other = await start(aiohttp_server, host="127.0.0.2", port=good.port)
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound here")
    answers = iter([["127.0.0.1"]])
    calls = []

    def rebinding(host):
        calls.append(host)
        return next(answers, ["127.0.0.2"])

    f = GuardedFetcher(resolver=rebinding)
    try:
        policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.1/32",))
        assert await f.fetch(f"http://rebind.test:{good.port}/data", policy) == PAYLOAD
        # The next fetch gets the other answer and is refused before connecting.
        with pytest.raises(FetchRefused, match="127.0.0.2, which is loopback"):
            await f.fetch(f"http://rebind.test:{good.port}/secret", policy)
    finally:
        await f.close()
    assert calls == ["rebind.test", "rebind.test"]
    assert good.hits == ["/data"] and other.hits == []


# ---- refused addresses --------------------------------------------------------------------------

REFUSED_HOSTS = [
    ("127.0.0.1", "loopback"), ("localhost", "loopback"), ("LOCALHOST.", "loopback"),
    ("foo.localhost", "loopback"), ("loop.test", "loopback"), ("v6loop.test", "loopback"),
    ("0x7f000001", "loopback"), ("2130706433", "loopback"), ("127.1", "loopback"),
    ("0177.0.0.1", "loopback"), ("0x7f.0.0.1", "loopback"), ("[::1]", "loopback"),
    ("[::ffff:127.0.0.1]", "loopback"), ("[::ffff:7f00:1]", "loopback"), ("[64:ff9b::7f00:1]", "loopback"),
    ("[2002:7f00:1::]", "loopback"), ("[::127.0.0.1]", "loopback"), ("[::ffff:0:127.0.0.1]", "loopback"),
    ("169.254.169.254", "link-local"), ("metadata.test", "link-local"), ("[fe80::1]", "link-local"),
    ("[::ffff:169.254.169.254]", "link-local"), ("10.0.0.1", "private"), ("192.168.1.1", "private"),
    ("172.16.0.1", "private"), ("mixed.test", "loopback"), ("100.64.0.1", "CGNAT"), ("[fc00::1]", "private"),
    ("[fd12:3456::1]", "private"), ("[fec0::1]", "site-local"), ("0.0.0.0", "unspecified"), ("0", "unspecified"),
    ("[::]", "unspecified"), ("224.0.0.1", "multicast"), ("[ff02::1]", "multicast"),
    ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"), ("198.18.0.1", "private"),
    ("192.0.2.1", "private"), ("[2001:db8::1]", "private"), ("[64:ff9b:1::1]", "local-use NAT64"),
]


@pytest.mark.parametrize(("host", "rule"), REFUSED_HOSTS)
async def test_refused_addresses(names, secret, host, rule):
    f = GuardedFetcher(resolver=names)
    policy = FetchPolicy(allow_http=True)
    started = time.monotonic()
    with pytest.raises(FetchRefused) as e:
        await f.fetch(f"http://{host}:{secret.port}/secret", policy)
    assert rule in str(e.value)
    assert time.monotonic() - started < 10
    # No connection was tried: the fetcher never even made its HTTP session.
    assert f._session is None and secret.hits == []
    # Literal addresses are never looked up.
    assert names.calls == ([host.lower().rstrip(".")] if host in names.table else [])
    # The same host over https is refused the same way.
    with pytest.raises(FetchRefused, match=rule):
        await f.fetch(f"https://{host}/secret", FetchPolicy())


async def test_loopback_refused_by_default_though_it_serves(secret):
    # The server is there and answers: only the rule stands between the fetcher and the secret.
    f = GuardedFetcher()
    try:
        for url in (f"{secret.url}/secret", f"http://localhost:{secret.port}/secret"):
            with pytest.raises(FetchRefused, match="loopback"):
                await f.fetch(url, FetchPolicy(allow_http=True))
        assert await f.fetch(f"{secret.url}/secret", LOCAL) == b"the secret"
    finally:
        await f.close()
    assert secret.hits == ["/secret"]


async def test_allowed_networks_are_exact(fetcher, secret):
    policy = FetchPolicy(allow_http=True, allowed_networks=("10.1.0.0/16", "::1/128"))
    with pytest.raises(FetchRefused, match="address 127.0.0.1 is loopback"):
        await fetcher.fetch(f"{secret.url}/secret", policy)
    with pytest.raises(FetchRefused, match="10.2.0.1 is private"):
        await fetcher.fetch("http://10.2.0.1/secret", policy)
    # A name with one allowed and one refused address is refused.
    with pytest.raises(FetchRefused, match="mixed.test resolves to 10.0.0.1"):
        await fetcher.fetch(f"http://mixed.test:{secret.port}/secret", LOCAL)
    assert secret.hits == []


def test_address_rules():
    public = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]
    for a in public:
        assert address_refusal(ipaddress.ip_address(a)) is None, a
    assert parse_numeric_host("example.com") is None and parse_numeric_host("0xabc.com") is None
    assert str(parse_numeric_host("0x7f.1")) == "127.0.0.1"
    assert str(parse_numeric_host("10.0x10.0377")) == "10.16.0.255"
    for bad in ("256.0.0.1", "0x100000000", "08.0.0.1", "1.2.3.4.5"):
        with pytest.raises(ValueError):
            if parse_numeric_host(bad) is None:
                raise ValueError(bad)
    with pytest.raises(ValueError):
        FetchPolicy(allowed_networks=("not-a-network",))


async def test_non_canonical_public_numbers_refused(fetcher):
    with pytest.raises(FetchRefused, match="non-canonical"):
        await fetcher.fetch("https://134744072/x", FetchPolicy())  # 8.8.8.8
    with pytest.raises(FetchRefused, match="not a valid IPv4"):
        await fetcher.fetch("https://999.1.1.1/x", FetchPolicy())
    assert fetcher._session is None


# ---- URL rules ----------------------------------------------------------------------------------


async def test_scheme_rules(fetcher, good):
    with pytest.raises(FetchRefused, match="scheme http is not allowed"):
        await fetcher.fetch(f"{good.url}/data", FetchPolicy(allowed_networks=("127.0.0.0/8",)))
    for url, rule in [("file:///etc/passwd", "scheme file"), ("ftp://example.com/x", "scheme ftp"),
                      ("gopher://example.com/", "scheme gopher"), ("data:image/png;base64,AAAA", "data: URLs"),
                      ("DATA:text/plain,hi", "data: URLs"), ("/relative/path", r"scheme \(none\)")]:
        with pytest.raises(FetchRefused, match=rule):
            await fetcher.fetch(url, LOCAL)
    assert good.hits == [] and fetcher._session is None


async def test_allowlist(fetcher, good):
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",),
                         allowed_hosts=frozenset({"good.test", "*.example.com"}))
    for host in ("evil.test", "example.com", "good.test.evil.test", "127.0.0.1", "xexample.com"):
        with pytest.raises(FetchRefused, match=f"host {host} is not on the allowlist"):
            await fetcher.fetch(f"http://{host}:{good.port}/data", policy)
    assert good.hits == []


async def test_userinfo_refused(fetcher, good):
    with pytest.raises(FetchRefused, match="user information"):
        await fetcher.fetch(f"http://user:pw@good.test:{good.port}/data", LOCAL)
    with pytest.raises(FetchRefused, match="malformed"):
        await fetcher.fetch(f"http://good.test\\@127.0.0.1:{good.port}/data", LOCAL)
    assert good.hits == []


# ---- redirects ----------------------------------------------------------------------------------


async def test_redirect_followed(fetcher, good):
    for status in (301, 302, 303, 307, 308):
        assert await fetcher.fetch(f"{good.url}/redirect?status={status}&to=/data", LOCAL) == PAYLOAD
    assert await fetcher.fetch(f"{good.url}/redirect?to=data", LOCAL) == PAYLOAD  # relative


async def test_redirect_to_host_off_the_allowlist(fetcher, good, secret):
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",), allowed_hosts=frozenset({"good.test"}))
    to = f"http://evil.test:{secret.port}/secret"
    with pytest.raises(FetchRefused, match="host evil.test is not on the allowlist"):
        await fetcher.fetch(f"http://good.test:{good.port}/redirect?to={to}", policy)
    assert good.hits == [f"/redirect?to={to}"] and secret.hits == []


async def test_redirect_to_forbidden_address(fetcher, good, secret):
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.1/32",))
    for to, rule in [("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://10.0.0.1/", "private"),
                     (f"http://127.0.0.2:{secret.port}/secret", "loopback"),
                     ("http://metadata.test/", "link-local"), ("file:///etc/passwd", "scheme file"),
                     ("data:text/plain,hi", "data: URLs"), (f"https://127.0.0.1:{secret.port}/secret", "fetching from 127.0.0.1 failed")]:
        with pytest.raises((FetchRefused, FetchFailed), match=rule) as e:
            await fetcher.fetch(f"{good.url}/redirect?to={to}", policy)
        # https to a plain http server fails on the handshake; everything else is refused by a rule.
        assert isinstance(e.value, FetchRefused) or to.startswith("https://")
    assert secret.hits == []


async def test_too_many_redirects(fetcher, good):
    with pytest.raises(FetchFailed, match="more than 3 redirects"):
        await fetcher.fetch(f"{good.url}/loop", LOCAL)
    assert good.hits == ["/loop"] * 4
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",), max_redirects=0)
    with pytest.raises(FetchFailed, match="more than 0 redirects"):
        await fetcher.fetch(f"{good.url}/redirect?to=/data", policy)


# ---- caps and failures --------------------------------------------------------------------------


async def test_size_cap(fetcher, good):
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",), max_bytes=1000)
    with pytest.raises(FetchFailed, match="larger than the 1000 byte limit"):
        await fetcher.fetch(f"{good.url}/big", policy)  # Content-Length: 5000
    with pytest.raises(FetchFailed, match="larger than the 1000 byte limit"):
        await fetcher.fetch(f"{good.url}/big-chunked", policy)  # no Content-Length
    exact = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",), max_bytes=5000)
    assert len(await fetcher.fetch(f"{good.url}/big", exact)) == 5000
    assert len(await fetcher.fetch(f"{good.url}/big-chunked", exact)) == 5000


async def test_timeout(fetcher, good):
    policy = FetchPolicy(allow_http=True, allowed_networks=("127.0.0.0/8",), timeout=0.3)
    started = time.monotonic()
    with pytest.raises(FetchFailed, match="did not finish within 0.3 s"):
        await fetcher.fetch(f"{good.url}/slow", policy)
    assert time.monotonic() - started < 15  # /slow answers after 60 s


async def test_http_status(fetcher, good):
    for status in (404, 500, 204):
        with pytest.raises(FetchFailed, match=f"HTTP {status}") as e:
            await fetcher.fetch(f"{good.url}/status/{status}", LOCAL)
        assert e.value.status == status
        assert "upstream error page" not in str(e.value)
    with pytest.raises(FetchFailed, match="HTTP 302 without a Location"):
        await fetcher.fetch(f"{good.url}/status/302", LOCAL)


async def test_unreachable_and_unknown_names(fetcher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FetchFailed, match="failed"):
        await fetcher.fetch(f"http://127.0.0.1:{port}/x", LOCAL)
    with pytest.raises(FetchFailed, match="could not be resolved"):
        await fetcher.fetch("https://nowhere.test/x", FetchPolicy())


async def test_concurrent_fetches_keep_their_own_policies(fetcher, good, secret):
    """A fetch that may reach loopback does not open the door for a concurrent one that may not."""
    strict = FetchPolicy(allow_http=True)
    results = await asyncio.gather(
        *[fetcher.fetch(f"http://good.test:{good.port}/data", LOCAL) for _ in range(5)],
        *[fetcher.fetch(f"http://good.test:{secret.port}/secret", strict) for _ in range(5)],
        return_exceptions=True,
    )
    assert results[:5] == [PAYLOAD] * 5
    assert all(isinstance(r, FetchRefused) for r in results[5:])
    assert secret.hits == []
