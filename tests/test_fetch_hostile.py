"""The guarded fetcher against hostile URLs and hosts: names DNS cannot hold, broken punycode, IDNA allowlists.

Servers are real and bind to loopback; `allowed_networks` lets exactly 127.0.0.1 through where a test
needs to reach one. Names are answered by a recording stand-in for DNS, or by the real resolver where
the point is that the name never reaches it.
"""

from __future__ import annotations

import base64
import io
import socket

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from proxy.errors import InvalidRequest
from proxy.media.fetch import FetchFailed, FetchPolicy, FetchRefused, GuardedFetcher
from proxy.media.inputs import InputReader
from proxy.media.output import fetch_image

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream
from .test_fetch import Names

PAYLOAD = b"\x89PNG fake image bytes " * 10
LOOPBACK = ("127.0.0.1/32",)


@pytest.fixture
async def server(aiohttp_server):
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/data":
            return web.Response(body=PAYLOAD, content_type="image/png")
        return web.Response(status=404, text="not here")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    srv = await aiohttp_server(app, host="127.0.0.1")
    srv.hits = hits
    return srv


# Names no DNS can hold (an empty label, a label over 63 characters, a name over 253): the system
# resolver's IDNA step raised UnicodeError, which no caller expects from the fetcher.
# The last: an IPv6-looking host of 400 characters, whose whole text the refusal used to quote.
BAD_NAMES = ["x..example.com", "a" * 64 + ".example.com", ".example.com", ("abcdefghi." * 26) + "example.com",
             "[" + "1:" * 200 + "1]"]


@pytest.mark.parametrize("host", BAD_NAMES)
async def test_a_name_dns_cannot_hold_is_refused_by_rule(host):
    fetcher = GuardedFetcher()  # the real resolver: the name must be refused before it gets there
    try:
        with pytest.raises(FetchRefused, match="not a valid host name") as e:
            await fetcher.fetch(f"https://{host}/image.png", FetchPolicy())
    finally:
        await fetcher.close()
    assert len(str(e.value)) < 400  # a long name does not make a long message
    assert fetcher._session is None  # nothing was sent anywhere


async def test_an_edit_input_on_such_a_name_is_a_client_error_not_a_crash():
    """An edit image URL under an allowed wildcard, with an empty label: 400 invalid_image_url, not a 500."""
    fetcher = GuardedFetcher()
    reader = InputReader(fetcher, FetchPolicy(allowed_hosts=frozenset({"*.example.com"})), 16_000_000, 1 << 20)
    try:
        for host in ("x..example.com", "a" * 64 + ".example.com"):
            with pytest.raises(InvalidRequest, match="could not be fetched: .*not a valid host name") as e:
                await reader.from_url("image", f"https://{host}/in.png")
            assert e.value.code == "invalid_image_url"
    finally:
        await fetcher.close()


async def test_an_edit_request_naming_such_a_host_gets_a_400(aiohttp_server, start_proxy, tmp_path):
    """What the client sees: before, a 500 "The proxy failed to handle the request" and a traceback in the log."""
    up = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": up.api_key}
    cfg["models"]["qwen-image-edit"] = {"sizes": "small", "routes": ["up"], "max_input_images": 1}
    cfg["fetch"] = {"input_image_hosts": ["*.example.com"]}
    proxy, _ = await start_proxy(cfg)
    body = {"model": "qwen-image-edit", "prompt": "x", "images": [{"image_url": "https://cdn..example.com/in.png"}]}
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), json=body) as r:
        error = (await r.json())["error"]
    assert r.status == 400, error
    assert error["code"] == "invalid_image_url" and "not a valid host name" in error["message"]
    assert up.edit_forms == []


async def test_a_host_with_broken_punycode_fails_with_a_fetch_error(server):
    """`xn--a` is no valid A-label, yet a wildcard DNS answers for it: a 404 or a refused connection
    from it is a FetchFailed naming the host as written, not a UnicodeError from decoding it."""
    names = Names({"xn--a.test": ["127.0.0.1"]})
    fetcher = GuardedFetcher(resolver=names)
    policy = FetchPolicy(allow_http=True, allowed_networks=LOOPBACK)
    try:
        with pytest.raises(FetchFailed, match="HTTP 404 from xn--a.test") as e:
            await fetcher.fetch(f"http://xn--a.test:{server.port}/missing", policy)
        assert e.value.status == 404
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]
        with pytest.raises(FetchFailed, match=r"fetching from xn--a.test failed \(ClientConnectorError\)"):
            await fetcher.fetch(f"http://xn--a.test:{closed}/data", policy)
    finally:
        await fetcher.close()
    assert server.hits == ["/missing"]


async def test_unicode_allowlist_entries_match_the_names_they_stand_for(server):
    """An operator lists `bücher.test`; URLs reach the fetcher in their punycode form (xn--bcher-kva.test)."""
    names = Names({"xn--bcher-kva.test": ["127.0.0.1"], "img.xn--bcher-kva.test": ["127.0.0.1"]})
    fetcher = GuardedFetcher(resolver=names)
    policy = FetchPolicy(allow_http=True, allowed_networks=LOOPBACK,
                         allowed_hosts=frozenset({"Bücher.test.", "*.BÜCHER.test"}))
    try:
        for url in (f"http://bücher.test:{server.port}/data", f"http://xn--bcher-kva.test:{server.port}/data",
                    f"http://img.bücher.test:{server.port}/data"):
            assert await fetcher.fetch(url, policy) == PAYLOAD
        # Still exact: a look-alike name is not on the list.
        with pytest.raises(FetchRefused, match="host xn--evil-bcher-feb.test is not on the allowlist"):
            await fetcher.fetch(f"http://evil-bücher.test:{server.port}/data", policy)
    finally:
        await fetcher.close()
    assert server.hits == ["/data"] * 3
    assert names.calls == ["xn--bcher-kva.test", "xn--bcher-kva.test", "img.xn--bcher-kva.test"]
    # An entry that is no host name at all stays as written (it matches nothing) rather than stopping startup.
    assert "bad..entry" in FetchPolicy(allowed_hosts=frozenset({"bad..entry"})).allowed_hosts


def _png_b64() -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


async def test_a_data_url_in_upper_case_is_a_data_url(aiohttp_server, start_proxy, tmp_path):
    """A URL scheme is case-insensitive: `DATA:image/png;BASE64,...` is an image, not a URL to fetch. It was a
    400 "image URLs are not fetched by this server; send ... a data: URL", or, with input_image_hosts set,
    "could not be fetched: data: URLs are handled by the caller"."""
    up = await FakeOpenAIUpstream().start(aiohttp_server)
    image = _png_b64()
    for hosts in ([], ["*.example.com"]):
        cfg = base_config(tmp_path)
        cfg["size_tables"]["small"] = SMALL_SIZES
        cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": up.api_key}
        cfg["models"]["qwen-image-edit"] = {"sizes": "small", "routes": ["up"], "max_input_images": 1}
        cfg["fetch"] = {"input_image_hosts": hosts}
        proxy, _ = await start_proxy(cfg)
        for url in (f"DATA:image/png;base64,{image}", f"Data:image/png;BASE64,{image}"):
            body = {"model": "qwen-image-edit", "prompt": "x", "images": [{"image_url": url}]}
            async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), json=body) as r:
                answer = await r.json()
            assert r.status == 200, answer
            assert len(answer["data"]) == 1
    assert len(up.edit_forms) == 4
    # An upstream answer's image in an upper-case data URI is decoded, not handed to the fetcher.
    fetcher = GuardedFetcher()
    try:
        assert await fetch_image(fetcher, f"DATA:image/png;BASE64,{image}", FetchPolicy()) == base64.b64decode(image)
    finally:
        await fetcher.close()


async def test_broken_punycode_with_tracing_on_is_fetched_as_without_tracing(aiohttp_server, start_proxy, tmp_path,
                                                                             monkeypatch):
    """With telemetry on, the client span's hook read url.host, which raises UnicodeError on `xn--a` (a label
    DNS holds, which a wildcard DNS answers): an edit naming such a host got a 500, then (caught here) a 400
    "fetching ... failed (UnicodeError)". Tracing changes nothing now: the image is fetched as without it."""
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    from .otlp_receiver import OtlpReceiver

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2")
    receiver = await OtlpReceiver().start(aiohttp_server)
    up = await FakeOpenAIUpstream().start(aiohttp_server)
    up.files["in.png"] = (base64.b64decode(_png_b64()), "image/png")
    port = up.url.rsplit(":", 1)[1]
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": up.api_key}
    cfg["models"]["qwen-image-edit"] = {"sizes": "small", "routes": ["up"], "max_input_images": 1}
    # *.localhost is loopback whatever DNS says: the name reaches the connect without a DNS server.
    cfg["fetch"] = {"input_image_hosts": ["*.localhost"], "allowed_networks": ["127.0.0.0/8"], "allow_http": True}
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    proxy, _ = await start_proxy(cfg)
    url = f"http://xn--a.localhost:{port}/files/in.png"
    body = {"model": "qwen-image-edit", "prompt": "x", "images": [{"image_url": url}]}
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), json=body) as r:
        answer = await r.json()
    assert r.status == 200, answer
    assert len(answer["data"]) == 1 and len(up.edit_forms) == 1
    spans = await receiver.trace_with("POST /v1/images/edits")
    (download,) = [span for span in spans if span.name == "GET"]
    assert download.attributes["server.address"] == "xn--a.localhost" and download.attributes["url.full"] == url
