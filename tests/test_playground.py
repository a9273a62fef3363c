"""The playground in a real browser: headless Chromium (the system's, driven by Playwright) against the
proxy on a loopback port, with the placeholder model, the tiny local model (when diffusers is
installed) and an edit model served by a fake OpenAI-compatible upstream that records what it got.

Set QIP_UPDATE_SCREENSHOT=1 to write docs/playground.png from test_generate_and_reproduce.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image

from proxy import build_app, parse_config

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream
from .services import service_missing

try:
    from playwright import sync_api
except ImportError:  # the test extra installs it
    sync_api = None

pytestmark = pytest.mark.browser
CHROMIUM = (os.environ.get("QIP_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
            or "/usr/bin/chromium")

KEY = "pg-test-key-7d1e"
PLACEHOLDER = "qwen-image-placeholder"
EDIT = "qwen-image-edit"
TINY = "qwen-image-tiny"
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_MS = 20_000


# ---- the servers, on an event loop of their own ----------------------------------------------------------


class Loop:
    """An asyncio loop on a thread: the proxy and the fake upstream run there, the browser here."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="playground-servers", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


class Live:
    def __init__(self, url: str, upstream: FakeOpenAIUpstream, models: list[str]):
        self.url = url
        self.upstream = upstream
        self.models = models

    def post(self, path: str, body: dict) -> tuple[int, bytes]:
        """A direct call, as a client other than the page would make it."""
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


@pytest.fixture(scope="module")
def live(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    cfg = base_config(tmp, server={"api_keys": [KEY]}, jobs={"path": str(tmp / "jobs.sqlite3")})
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["models"][EDIT] = {"sizes": "small", "routes": ["up"], "max_input_images": 3,
                           "description": "Edits through a fake OpenAI-compatible upstream"}
    if HAS_DIFFUSERS:
        request.getfixturevalue("one_torch_thread")
        cfg["providers"]["tiny"] = {"kind": "diffusers", "model": str(request.getfixturevalue("tiny_dir")),
                                    "device": "cpu", "default_steps": 4, "load_in_background": False}
        cfg["models"][TINY] = {"sizes": "small", "routes": ["tiny"]}
    loop = Loop()
    upstream = FakeOpenAIUpstream()

    async def start():
        up_runner, up_url = await serve(upstream.app())
        upstream.url = up_url
        cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up_url}/v1", "api_key": upstream.api_key}
        runner, url = await serve(build_app(parse_config(cfg)))
        return up_runner, runner, url

    up_runner, runner, url = loop.run(start())
    try:
        yield Live(url, upstream, list(cfg["models"]))
    finally:
        loop.run(runner.cleanup())
        loop.run(up_runner.cleanup())
        loop.close()


# ---- the browser -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    missing = ("playwright is not installed (pip install -e '.[test]')" if sync_api is None
               else None if Path(CHROMIUM).exists()
               else f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set QIP_CHROMIUM)")
    if missing:
        service_missing(missing)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, live):
    """A fresh tab (its own sessionStorage) with the key already given, on the playground."""
    context = browser.new_context(viewport={"width": 1280, "height": 900},
                                  permissions=["clipboard-read", "clipboard-write"])
    context.add_init_script(f"sessionStorage.setItem('qip.apiKey', {json.dumps(KEY)});")
    errors: list[str] = []
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(f"{live.url}/playground")
    pg.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    yield pg
    context.close()
    assert not errors, f"errors in the page: {errors}"


def image_bytes(page, figure) -> bytes:
    """The bytes of a gallery image, through its Download link."""
    with page.expect_download() as download:
        figure.get_by_role("link", name="Download").click()
    return Path(download.value.path()).read_bytes()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def png(size, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def set_form(page, *, model=PLACEHOLDER, prompt="a lighthouse at dusk", size=None, n=None, seed=None,
             previews="off"):
    page.select_option("#model", model)
    page.fill("#prompt", prompt)
    if size is not None:
        page.select_option("#size", size)
    if n is not None:
        page.fill("#n", str(n))
    if seed is not None:
        page.fill("#seed", str(seed))
    page.select_option("#partials", previews)


def run_and_wait(page, submit=None) -> sync_api.Locator:
    """Send the form; the newest run once it has finished (or the error shown)."""
    before = page.locator("article.run").count()
    done = page.locator("article.run[data-state=done]").count()
    (submit or (lambda: page.click("#submit")))()
    page.wait_for_function(
        "([n]) => document.querySelectorAll('article.run[data-state=done]').length > n"
        " || !document.getElementById('error').hidden", arg=[done])
    assert page.locator("#error").is_hidden(), page.inner_text("#error")
    assert page.locator("article.run").count() == before + 1
    return page.locator("article.run").first


# ---- the tests -------------------------------------------------------------------------------------------


def test_the_key_stays_in_the_tab(browser, live):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{live.url}/")
    error = page.locator("#error")
    error.wait_for()
    # The API's own 401 message, and the key field to fix it.
    assert "Missing or invalid API key" in error.inner_text()
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", KEY)
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    assert error.is_hidden()
    assert page.locator("#model option").evaluate_all("os => os.map(o => o.value)") == live.models
    assert page.evaluate("sessionStorage.getItem('qip.apiKey')") == KEY
    assert page.evaluate("localStorage.length") == 0 and KEY not in page.evaluate("document.cookie")
    page.reload()  # the same tab keeps it
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    second = context.new_page()  # another tab does not
    second.goto(f"{live.url}/")
    second.locator("#error").wait_for()
    assert second.evaluate("sessionStorage.getItem('qip.apiKey')") is None
    # Every control has a name a screen reader can read out.
    unnamed = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
        .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.id || e.outerHTML)""")
    assert unnamed == []
    context.close()


def test_generate_and_reproduce(page, live, tmp_path):
    set_form(page, size="1365x768", n=2)
    run = run_and_wait(page)
    figures = run.locator("figure.image")
    assert figures.count() == 2
    seeds = [int(figures.nth(i).get_attribute("data-seed")) for i in range(2)]
    assert seeds[1] == seeds[0] + 1  # empty seed field: the page picked one, image i got seed + i
    for i in range(2):
        fig = figures.nth(i)
        assert decode(image_bytes(page, fig)).size == (1365, 768)
        assert fig.get_attribute("data-size") == "1365x768" and fig.get_attribute("data-format") == "png"
        assert fig.get_attribute("data-route") == "placeholder" and fig.get_attribute("data-attempts") == "1"
        caption = fig.locator("figcaption").inner_text()
        assert str(seeds[i]) in caption and "placeholder" in caption and "1365x768" in caption
        assert fig.locator("a[download]").get_attribute("download") == f"qwen-image-{seeds[i]}.png"
    first = image_bytes(page, figures.nth(0))
    assert "2 images" in page.inner_text("#status")

    if os.environ.get("QIP_UPDATE_SCREENSHOT"):
        page.mouse.move(0, 0)
        page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0); }")
        page.screenshot(path=str(ROOT / "docs" / "playground.png"))

    # The seed reproduces the image: "Use this seed", n=1, sent from the keyboard (Ctrl+Enter).
    figures.nth(0).get_by_role("button", name="Use this seed").click()
    assert page.input_value("#seed") == str(seeds[0])
    page.fill("#n", "1")
    page.focus("#prompt")
    again = run_and_wait(page, lambda: page.keyboard.press("Control+Enter"))
    assert again.locator("figure.image").count() == 1
    assert image_bytes(page, again.locator("figure.image").first) == first
    # ...and another seed gives another image.
    page.click("#dice")
    assert page.input_value("#seed") not in ("", str(seeds[0]))
    other = run_and_wait(page)
    assert image_bytes(page, other.locator("figure.image").first) != first


def test_copied_curl_and_python_make_the_same_image(page, live, tmp_path):
    set_form(page, size="1183x887", seed=4242, prompt="it's a \"quoted\" $HOME `prompt`")
    run = run_and_wait(page)
    shown = image_bytes(page, run.locator("figure.image").first)

    run.get_by_role("button", name="Copy as curl").click()
    code = run.locator("pre.code")
    page.wait_for_function("(el) => el.dataset.kind === 'curl'", arg=code.element_handle())
    command = code.inner_text()
    assert page.evaluate("navigator.clipboard.readText()") == command
    assert command.startswith("curl ") and KEY not in command and "$QIP_API_KEY" in command
    env = {**os.environ, "QIP_API_KEY": KEY}
    out = subprocess.run(["bash", "-c", command], capture_output=True, env=env, timeout=60, check=True).stdout
    answer = json.loads(out)
    assert answer["size"] == "1183x887" and answer["seeds"] == [4242]
    assert base64.b64decode(answer["data"][0]["b64_json"]) == shown

    run.get_by_role("button", name="Copy as Python").click()
    page.wait_for_function("(el) => el.dataset.kind === 'python'", arg=code.element_handle())
    script = code.inner_text()
    assert "from openai import OpenAI" in script and KEY not in script
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=60, check=True,
                   capture_output=True)
    assert (tmp_path / "image-0.png").read_bytes() == shown

    run.get_by_role("button", name="Copy as Node").click()
    page.wait_for_function("(el) => el.dataset.kind === 'node'", arg=code.element_handle())
    node = code.inner_text()
    assert 'import OpenAI from "openai"' in node and "client.images.generate(" in node
    assert '"seed": 4242' in node or "seed: 4242" in node


def test_streaming_shows_the_image_as_it_comes(page, live):
    """With the tiny local model (when installed), previews arrive before the final image, if the route
    makes them (asked of the API directly first); the completed image always streams in."""
    model = TINY if TINY in live.models else PLACEHOLDER
    body = {"model": model, "prompt": "a red fox", "seed": 3, "stream": True, "partial_images": 2,
            "num_inference_steps": 4}
    status, raw = live.post("/v1/images/generations", body)
    assert status == 200
    events = [line.split(": ", 1)[1] for line in raw.decode().splitlines() if line.startswith("event: ")]
    makes_previews = any(e.endswith(".partial_image") for e in events)
    assert events[-1].endswith(".completed")

    # Record, in the page, when each preview and each final image appears.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes) {
            if (n.nodeType !== 1) continue;
            if (n.matches('figure.preview')) window.seen.push('preview');
            if (n.matches('figure.image')) window.seen.push('final');
        } }).observe(document.body, {subtree: true, childList: true});
        document.getElementById('previews').addEventListener('load', () => window.seen.push('preview-load'), true);
    }""")
    set_form(page, model=model, prompt="a red fox", seed=3, previews="2")
    page.fill("#steps", "4")
    run = run_and_wait(page)
    seen = page.evaluate("window.seen")
    assert seen.count("final") == 1 and seen[-1] == "final"
    fig = run.locator("figure.image").first
    assert fig.get_attribute("data-seed") == "3"
    assert decode(image_bytes(page, fig)).size == (64, 64)
    if makes_previews:
        assert seen.index("preview") < seen.index("final"), seen
    assert page.locator("#previews figure").count() == 0  # previews make way for the result


def edits_listed(live) -> bool:
    """Whether /v1/models marks the edit model as one (capabilities.edits / max_input_images)."""
    req = urllib.request.Request(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        cards = {m["id"]: m for m in json.load(resp)["data"]}
    caps = cards[EDIT]["capabilities"]
    return caps.get("edits") is True or (caps.get("max_input_images") or 0) > 0


def test_edit_with_uploaded_and_dropped_images_and_a_painted_mask(page, live):
    if not edits_listed(live):
        pytest.skip("GET /v1/models does not mark edit models yet (capabilities.edits)")
    live.upstream.edit_forms.clear()
    page.select_option("#model", EDIT)
    assert page.locator("#edit-section").is_visible() and page.inner_text("#submit") == "Edit"
    page.set_input_files("#images-input", files=[{"name": "room.png", "mimeType": "image/png",
                                                  "buffer": png((64, 48))}])
    # A second image dropped onto the drop zone, as a file dragged in from the desktop.
    sofa = base64.b64encode(png((32, 32), (20, 40, 200))).decode()
    page.evaluate("""async ([b64]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], 'sofa.png', {type: 'image/png'}));
        document.getElementById('drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""", [sofa])
    page.wait_for_function("() => document.querySelectorAll('#thumbs li').length === 2")

    # Paint a stroke across the middle of the first image.
    canvas = page.locator("#mask-canvas")
    canvas.wait_for()
    box = canvas.bounding_box()
    page.fill("#brush", "20")
    page.mouse.move(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.65, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.locator("#mask-download").wait_for()

    page.fill("#prompt", "put the sofa in the room")
    page.fill("#seed", "11")
    page.select_option("#partials", "off")
    run = run_and_wait(page)
    fig = run.locator("figure.image").first
    assert decode(image_bytes(page, fig)).size == (80, 64)  # the first image's 4:3, from the size table
    assert fig.get_attribute("data-route") == "up"

    fields, files = live.upstream.edit_forms[-1]
    assert fields["prompt"] == "put the sofa in the room" and fields["seed"] == "11"
    assert [name for name, _, _ in files] == ["image[]", "image[]", "mask"]
    assert files[0][2] == png((64, 48)) and files[1][2] == png((32, 32), (20, 40, 200))  # in order, untouched
    mask = decode(files[2][2]).convert("RGBA")
    assert mask.size == (64, 48)
    assert mask.getpixel((32, 24))[3] == 0  # painted: transparent = the area to edit
    assert mask.getpixel((2, 2))[3] == 255 and mask.getpixel((61, 45))[3] == 255  # the rest is kept

    # The code for an edit names the files and reads the key from the environment.
    run.get_by_role("button", name="Copy as curl").click()
    command = run.locator("pre.code").inner_text()
    assert "image[]=@room.png" in command and "mask=@mask.png" in command and KEY not in command


def test_errors_show_the_apis_message(page, live):
    set_form(page, n=11)
    page.click("#submit")
    error = page.locator("#error")
    error.wait_for()
    status, raw = live.post("/v1/images/generations", {"model": PLACEHOLDER, "prompt": "x", "n": 11})
    assert status == 400
    message = json.loads(raw)["error"]["message"]
    assert message in error.inner_text() and "HTTP 400" in error.inner_text()
    assert page.get_attribute("#n", "aria-invalid") == "true"
    assert error.get_attribute("role") == "alert"
    assert page.locator("article.run").count() == 0

    # An error event in a stream (the upstream refuses the edit once it has begun) is shown the same way.
    if not edits_listed(live):
        return
    live.upstream.fail(400, "INVALID_REQUEST", "the upstream does not like this picture", times=1)
    page.fill("#n", "1")
    page.select_option("#model", EDIT)
    page.set_input_files("#images-input", files=[{"name": "a.png", "mimeType": "image/png",
                                                  "buffer": png((64, 64))}])
    page.fill("#prompt", "make it blue")
    page.select_option("#partials", "2")
    started = time.monotonic()
    page.click("#submit")
    page.wait_for_function("() => document.getElementById('error').innerText.includes('does not like this picture')")
    assert time.monotonic() - started < 15
    assert page.locator("#submit").is_enabled()


def test_phone_width(browser, live):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    context.add_init_script(f"sessionStorage.setItem('qip.apiKey', {json.dumps(KEY)});")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{live.url}/playground")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    set_form(page, size="768x1365")
    run = run_and_wait(page)
    assert run.locator("figure.image").count() == 1
    # One column, nothing wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    form, results = page.locator("#gen-form").bounding_box(), page.locator(".results").bounding_box()
    assert results["y"] >= form["y"] + form["height"] - 1
    assert page.locator("figure.image img").bounding_box()["width"] <= 390
    context.close()


def test_tiers_and_loras_follow_the_models_capabilities(page, live):
    """Speed tiers (when a model lists them) and LoRA rows (local routes) reach the request body."""
    def with_tiers(route):
        listing = route.fetch().json()
        for card in listing["data"]:
            if card["id"] == PLACEHOLDER:
                card["capabilities"]["tiers"] = ["lightning-8", "standard"]
                card["capabilities"]["routes"].append({"name": "gpu", "kind": "diffusers", "state": "ready"})
        route.fulfill(json=listing)

    assert page.locator("#tier-field").is_hidden() and page.locator("#loras-field").is_hidden()
    page.route("**/v1/models", with_tiers)
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    set_form(page)
    assert page.locator("#tier-field").is_visible() and page.locator("#loras-field").is_visible()
    page.select_option("#tier", "lightning-8")
    for i, (path, scale) in enumerate([("styles/ink.safetensors", "0.5"), ("my-style", "0.8")]):
        page.click("#add-lora")
        page.get_by_label(f"LoRA {i + 1} path").fill(path)
        page.get_by_label(f"LoRA {i + 1} scale").fill(scale)
    page.click("#add-lora")
    assert page.locator("#add-lora").is_disabled()  # at most 3
    page.get_by_role("button", name="Remove LoRA 3").click()
    with page.expect_request("**/v1/images/generations") as sent:
        run_and_wait(page)
    body = sent.value.post_data_json
    assert body["tier"] == "lightning-8"
    assert body["loras"] == [{"path": "styles/ink.safetensors", "scale": 0.5}, {"path": "my-style", "scale": 0.8}]
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"


def test_run_in_background_and_the_jobs_list(page, live):
    set_form(page, size="1024x1024", seed=4242)
    page.check("#background")
    run = run_and_wait(page)
    job_id = run.get_attribute("data-job")
    assert job_id and job_id.startswith("imgjob_")
    figure = run.locator("figure.image")
    assert figure.count() == 1 and figure.get_attribute("data-seed") == "4242"
    got = image_bytes(page, figure)
    status, body = live.post("/v1/images/generations", {"model": PLACEHOLDER, "prompt": "a lighthouse at dusk",
                                                         "size": "1024x1024", "seed": 4242,
                                                         "response_format": "b64_json", "output_format": "png"})
    assert status == 200 and got == base64.b64decode(json.loads(body)["data"][0]["b64_json"])
    # Listed under Background jobs, completed; Show brings its image back as a run of its own.
    item = page.locator(f'#jobs li[data-id="{job_id}"][data-status="completed"]')
    item.wait_for()
    before = page.locator("article.run").count()
    item.get_by_role("button", name="Show").click()
    page.wait_for_function("([n]) => document.querySelectorAll('article.run').length > n", arg=[before])
    shown = page.locator("article.run").first
    assert shown.get_attribute("data-job") == job_id
    assert image_bytes(page, shown.locator("figure.image")) == got
    # Another tab of the same key sees the job too: it outlives the page that made it.
    page.reload()
    page.locator(f'#jobs li[data-id="{job_id}"]').wait_for()


def test_a_ray_pool_model_offers_its_speed_tiers(browser, tmp_path):
    """A model served by a `kind: ray` pool gets the speed-tier field with its engine options' tiers (the
    pool need not be reachable: /v1/models lists them from the options)."""
    from .fake_openai_upstream import free_port

    cfg = base_config(tmp_path, server={"api_keys": [KEY]})
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["pool"] = {"kind": "ray", "transport": "http", "http_url": f"http://127.0.0.1:{free_port()}",
                                "engine": {"model": "tiny", "device": "cpu",
                                           "tiers": {"fast": {"steps": 1, "cfg_scale": 1.0}}}}
    cfg["models"]["pooled"] = {"sizes": "small", "routes": ["pool"]}
    loop = Loop()
    runner, url = loop.run(serve(build_app(parse_config(cfg))))
    context = browser.new_context()
    try:
        context.add_init_script(f"sessionStorage.setItem('qip.apiKey', {json.dumps(KEY)});")
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/playground")
        page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
        page.select_option("#model", PLACEHOLDER)
        assert page.locator("#tier-field").is_hidden()
        page.select_option("#model", "pooled")
        assert page.locator("#tier-field").is_visible()
        assert page.locator("#tier option").all_inner_texts() == ["Model default", "base", "fast"]
    finally:
        context.close()
        loop.run(runner.cleanup())
        loop.close()
