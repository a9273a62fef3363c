"""The playground: GET / and /playground (the page) and /web/<file> (its script and style sheet).

Static files shipped inside the package (proxy/web/), read once with importlib.resources; no build
step and nothing loaded from elsewhere. Every answer carries a strict Content-Security-Policy (only
this origin's scripts, styles and connections; images also from data: and blob: URLs, which is how
the page shows what it receives), and an ETag so a reload costs a 304.
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib import resources
from typing import NamedTuple

from aiohttp import web

PAGE_PATHS = ("/", "/playground", "/playground/")
ASSET_PREFIX = "/web/"
# The only files served, with their types: anything else under /web/ is not ours to answer.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "mask.js": "text/javascript; charset=utf-8",
    "snippets.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "state.js": "text/javascript; charset=utf-8",
    "key.js": "text/javascript; charset=utf-8",
    "models.js": "text/javascript; charset=utf-8",
    "edit-images.js": "text/javascript; charset=utf-8",
    "loras.js": "text/javascript; charset=utf-8",
    "request.js": "text/javascript; charset=utf-8",
    "results.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "usage.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = ("default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# The files are small and change only with the package: revalidate each time, answer 304 when unchanged.
CACHE_CONTROL = "no-cache"


class StaticFile(NamedTuple):
    body: bytes
    content_type: str
    etag: str


_cache: dict[str, StaticFile] = {}


def serves(path: str) -> bool:
    """Whether a path is the playground's (the page, or one of its files)."""
    return path in PAGE_PATHS or (path.startswith(ASSET_PREFIX) and path[len(ASSET_PREFIX):] in FILES)


def _read(name: str) -> StaticFile:
    body = resources.files("proxy").joinpath("web", name).read_bytes()
    return StaticFile(body, FILES[name], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')


async def load(name: str) -> StaticFile:
    found = _cache.get(name)
    if found is None:
        found = _cache[name] = await asyncio.to_thread(_read, name)
    return found


async def handle(request: web.Request) -> web.StreamResponse:
    """GET/HEAD of the page or one of its files."""
    path = request.path
    name = "index.html" if path in PAGE_PATHS else path[len(ASSET_PREFIX):]
    if name not in FILES:  # the dispatcher only sends paths serves() accepts
        raise web.HTTPNotFound()
    found = await load(name)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": found.etag, **SECURITY_HEADERS}
    if _unchanged(request.headers.get("If-None-Match", ""), found.etag):
        return web.Response(status=304, headers=headers)
    headers["Content-Type"] = found.content_type
    return web.Response(body=found.body, headers=headers)


def _unchanged(if_none_match: str, etag: str) -> bool:
    """If-None-Match with the weak comparison RFC 9110 asks for: a reverse proxy that compresses (nginx
    with gzip on) hands the browser W/"..." for our tag, and "*" means any version the client has."""
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in tags or etag in tags
