"""The playground against a hostile world: streams cut short or dropped mid-body, image events of tens
of megabytes, and caches that hand back weak ETags. The page's own files come from the real playground
handler; the /v1 side is a small fake that misbehaves on purpose (the proxy itself never does)."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from aiohttp import web
from PIL import Image

from proxy.api import playground

from .test_playground import (  # browser: the fixture, one headless Chromium for the module
    TIMEOUT_MS,
    Loop,
    browser,  # noqa: F401
    serve,
)

MODEL = "hostile-model"
CARD = {"id": MODEL, "object": "model", "capabilities": {"routes": [{"name": "r", "kind": "openai", "state": "ready"}]}}


def png_b64() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 120, 200)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def sse(kind: str, **data) -> bytes:
    return f"event: image_generation.{kind}\ndata: {json.dumps({'type': f'image_generation.{kind}', **data})}\n\n".encode()


class Fake:
    """The page's files, GET /v1/models, and a POST /v1/images/generations whose stream does `how`."""

    def __init__(self):
        self.how = "short"

    def app(self) -> web.Application:
        app = web.Application()
        for path in ("/", "/web/{name}"):
            app.router.add_get(path, playground.handle)
        app.router.add_get("/v1/models", lambda _: web.json_response({"object": "list", "data": [CARD]}))
        app.router.add_post("/v1/images/generations", self.generate)
        return app

    async def generate(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        image = png_b64()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse("partial_image", b64_json=image, partial_image_index=0, image_index=0,
                             output_format="png"))
        if self.how == "short":  # one image of the two asked for, then a clean end of the body
            await resp.write(sse("completed", b64_json=image, output_format="png", size="8x8"))
        elif self.how == "drop":  # the connection goes mid-body: no last chunk
            request.transport.close()
            return resp
        await resp.write_eof()
        return resp


@pytest.fixture(scope="module")
def fake():
    loop, server = Loop(), Fake()
    runner, url = loop.run(serve(server.app()))
    server.url = url
    try:
        yield server
    finally:
        loop.run(runner.cleanup())
        loop.close()


@pytest.fixture
def page(browser, fake):  # noqa: F811
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(f"{fake.url}/")
    pg.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    yield pg
    context.close()


def send_and_wait(page) -> str:
    """Send the form as a stream; the error shown once the request is over."""
    page.fill("#prompt", "a lighthouse")
    page.select_option("#partials", "2")
    page.click("#submit")
    page.wait_for_function("() => document.querySelector('.results').getAttribute('aria-busy') === 'false'")
    assert page.locator("#error").is_visible(), page.inner_text("#status")
    return page.inner_text("#error")


@pytest.mark.browser
def test_a_stream_that_ends_early_is_an_error_not_a_success(page, fake):
    # Two images asked for, one came, then the body ended with no error event: a restart, or a
    # reverse proxy's timeout. It used to read "1 image in 0.02 s." with the run marked done.
    fake.how = "short"
    page.fill("#n", "2")
    message = send_and_wait(page)
    assert "ended after 1 of 2 images" in message
    run = page.locator("article.run").first
    assert run.get_attribute("data-state") == "failed" and run.locator("figure.image").count() == 1

    # Only previews, then the end: it used to read "0 images", with an empty run in the gallery.
    fake.how = "previews"
    page.fill("#n", "1")
    assert "ended after 0 of 1 image" in send_and_wait(page)
    assert page.locator("article.run").count() == 1  # the empty run is gone again


@pytest.mark.browser
def test_a_connection_dropped_mid_stream_says_so(page, fake):
    fake.how = "drop"
    message = send_and_wait(page)  # Chromium's own words were all it showed: "network error"
    assert "connection to the proxy broke while the images were streaming" in message
    assert page.locator("#submit").is_enabled()


@pytest.mark.browser
def test_a_large_event_is_read_in_linear_work(page):
    """One completed event of 4 MB of base64 in 16 KB chunks, as the network delivers it. The page used
    to hand the whole growing buffer to its boundary regex on every chunk (quadratic: a 32 MB image
    took 5 s of the page's time); the work is counted as characters handed to RegExp exec, not timed."""
    handed, size, got = page.evaluate("""async () => {
      const api = await import('/web/api.js');
      const exec = RegExp.prototype.exec;
      let handed = 0;
      RegExp.prototype.exec = function (s) {
        if (this.source === String.raw`\\r?\\n\\r?\\n`) handed += String(s).length;
        return exec.call(this, s);
      };
      const text = 'event: image_generation.completed\\ndata: ' +
        JSON.stringify({ type: 'image_generation.completed', b64_json: 'A'.repeat(4 << 20) }) + '\\n\\n';
      const bytes = new TextEncoder().encode(text);
      const body = new ReadableStream({ start(c) {
        for (let i = 0; i < bytes.length; i += 16384) c.enqueue(bytes.slice(i, i + 16384));
        c.close();
      } });
      let got = 0;
      try {
        await api.readEvents(new Response(body), (type, data) => { got = data.b64_json.length; });
      } finally {
        RegExp.prototype.exec = exec;
      }
      return [handed, bytes.length, got];
    }""")
    assert got == 4 << 20
    # Linear: each chunk once, the joined event twice (its boundary, then none after it); it was ~130x.
    assert handed <= 4 * size, f"{handed} characters scanned for a {size}-byte stream"


@pytest.mark.browser
def test_a_key_no_header_can_carry_is_refused_where_it_is_typed(page):
    """A key pasted from rich text with a zero-width space: fetch() refuses such a header, and the page
    used to blame the network ("Could not reach the proxy ... Is it still running?") on every request."""
    page.fill("#api-key", "pg-\u200bkey")
    page.keyboard.press("Enter")
    page.locator("#error").wait_for()
    message = page.inner_text("#error")
    assert "U+200B at position 4" in message and "Could not reach" not in message
    assert page.evaluate("sessionStorage.getItem('qip.apiKey')") is None
    assert page.get_attribute("#api-key", "aria-invalid") == "true"
    page.fill("#api-key", "pg-key")  # a good one clears it
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.getElementById('error').hidden")
    assert page.evaluate("sessionStorage.getItem('qip.apiKey')") == "pg-key"


# ---- plain HTTP -------------------------------------------------------------------------------------------


def get(url: str, **headers) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:  # a 304 is one, to urllib
        return e.code, dict(e.headers), e.read()


@pytest.mark.parametrize("tag", ['W/{etag}', "*", '"other", W/{etag}'])
def test_a_weak_or_any_etag_revalidates(fake, tag):
    """A compressing reverse proxy (nginx with gzip) turns our ETag into W/"..."; the browser sends that
    back, and If-None-Match compares weakly (RFC 9110): it used to be a full 200 on every reload.
    (Plain HTTP, but sync: the module's Chromium holds the thread's event loop.)"""
    status, headers, _ = get(f"{fake.url}/web/app.js")
    etag = headers["ETag"]
    status, headers, body = get(f"{fake.url}/web/app.js", **{"If-None-Match": tag.format(etag=etag)})
    assert status == 304 and body == b""
    assert headers["Content-Security-Policy"] == playground.CSP and headers["ETag"] == etag
    status, _, _ = get(f"{fake.url}/web/app.js", **{"If-None-Match": 'W/"other"'})
    assert status == 200
