"""The playground's static files over plain HTTP: paths, types, caching, the Content-Security-Policy,
no inline script and nothing from elsewhere, auth, and what a mounted gateway leaves to its host."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from proxy import image_proxy_middleware, parse_config
from proxy.api import playground

from .conftest import base_config

ASSETS = [name for name in playground.FILES if name != "index.html"]


def web_file(name: str) -> bytes:
    return resources.files("proxy").joinpath("web", name).read_bytes()


@pytest.fixture
async def proxy(start_proxy, tmp_path):
    server, _ = await start_proxy(base_config(tmp_path))
    return server


async def get(server, path: str, method: str = "GET", **kwargs) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession() as session, session.request(
            method, server.make_url(path), allow_redirects=False, **kwargs) as resp:
        return resp, await resp.read()


@pytest.mark.parametrize("path", ["/", "/playground", "/playground/"])
async def test_the_page(proxy, path):
    resp, body = await get(proxy, path)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == web_file("index.html")
    assert resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Request-Id"]


@pytest.mark.parametrize("name", ASSETS)
async def test_the_files(proxy, name):
    resp, body = await get(proxy, f"/web/{name}")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == playground.FILES[name]
    assert body == web_file(name)
    assert resp.headers["Content-Security-Policy"] == playground.CSP


async def test_the_content_security_policy_is_strict(proxy):
    resp, _ = await get(proxy, "/")
    policy = {d.split()[0]: d.split()[1:] for d in resp.headers["Content-Security-Policy"].split("; ")}
    assert policy["default-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:", "blob:"]
    assert policy["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval', no other origin
    assert policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"] and policy["frame-ancestors"] == ["'none'"]


def test_the_docs_give_the_headers_the_page_is_served_with():
    # docs/playground.md spells out the security headers: it must say what is sent, word for word.
    docs = " ".join((Path(__file__).resolve().parent.parent / "docs" / "playground.md").read_text().split())
    for name, value in playground.SECURITY_HEADERS.items():
        assert f"`{name}: {value}`" in docs, name
    assert f"`Cache-Control: {playground.CACHE_CONTROL}`" in docs


def test_no_inline_script_or_style_and_nothing_from_elsewhere():
    html = web_file("index.html").decode()
    for attrs, body in re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S):
        assert 'src="/web/' in attrs and not body.strip()
    assert not re.search(r"<style\b", html)
    assert not re.search(r"\son[a-z]+\s*=", html, flags=re.I)  # no onclick= handlers
    assert not re.search(r"\sstyle\s*=", html, flags=re.I)
    for name in playground.FILES:
        text = web_file(name).decode()
        assert not re.search(r"(?<![\w$])(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, flags=re.I), name  # no CDN
        assert "eval(" not in text and "new Function" not in text, name


def test_every_file_shipped_is_served_and_every_reference_resolves():
    shipped = {p.name for p in resources.files("proxy").joinpath("web").iterdir() if p.is_file()}
    assert shipped - {"__init__.py"} == set(playground.FILES)
    html = web_file("index.html").decode()
    referenced = set(re.findall(r'(?:src|href)="/web/([^"]+)"', html))
    for name in playground.FILES:
        if name.endswith(".js"):
            referenced |= set(re.findall(r'from\s+"\./([^"]+)"', web_file(name).decode()))
    assert referenced and referenced <= set(playground.FILES)


async def test_etag_revalidation(proxy):
    first, _ = await get(proxy, "/web/app.js")
    again, body = await get(proxy, "/web/app.js", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and body == b""
    assert again.headers["ETag"] == first.headers["ETag"]
    changed, body = await get(proxy, "/web/app.js", headers={"If-None-Match": '"something-else"'})
    assert changed.status == 200 and body == web_file("app.js")


async def test_head(proxy):
    resp, body = await get(proxy, "/playground", method="HEAD")
    assert resp.status == 200 and body == b""
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"


async def test_other_methods_are_refused(proxy):
    resp, body = await get(proxy, "/", method="POST", data=b"x")
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert b'"error"' in body


@pytest.mark.parametrize("path", ["/web/", "/web/nope.js", "/web/../pyproject.toml", "/web/%2e%2e/app.py",
                                  "/web/app.js.map", "/web/sub/app.js", "/playground/app.js"])
async def test_unknown_files_are_404(proxy, path):
    async with aiohttp.ClientSession() as session, session.get(
            proxy.make_url("/").with_path(path, encoded=True)) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"


async def test_the_page_needs_no_key_but_the_api_does(start_proxy, tmp_path):
    server, _ = await start_proxy(base_config(tmp_path, server={"api_keys": ["pg-secret"]}))
    for path in ("/", "/playground", "/web/app.js"):
        resp, body = await get(server, path)
        assert resp.status == 200, path
        assert b"pg-secret" not in body
    resp, _ = await get(server, "/v1/models")
    assert resp.status == 401
    resp, _ = await get(server, "/v1/models", headers={"Authorization": "Bearer pg-secret"})
    assert resp.status == 200


async def test_a_mounted_gateway_leaves_the_root_to_its_host(aiohttp_client, tmp_path):
    async def home(request):
        return web.Response(text="the host's own page")

    app = web.Application()
    app.middlewares.append(image_proxy_middleware(parse_config(base_config(tmp_path)), app, admin_prefix=""))
    app.router.add_get("/", home)
    client = await aiohttp_client(app)
    resp = await client.get("/")
    assert resp.status == 200 and await resp.text() == "the host's own page"
    assert (await client.get("/playground")).status == 404
    assert (await client.get("/web/app.js")).status == 404
