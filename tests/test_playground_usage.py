"""The playground's usage view in a real browser (headless Chromium): images and cost per day by model and
route, read from the usage API with an admin key; a key without admin rights sees the API's 403."""

from __future__ import annotations

import json
import urllib.request

import pytest

from proxy import build_app, parse_config

from .conftest import base_config
from .test_playground import TIMEOUT_MS, Loop, browser, serve  # noqa: F401

pytestmark = pytest.mark.browser
ADMIN, USER = "sk-usage-admin-0000", "sk-usage-user-0000"


@pytest.fixture(scope="module")
def live_usage(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground-usage")
    cfg = base_config(tmp, server={"api_keys": [{"name": "ops", "key": ADMIN, "admin": True},
                                                {"name": "app", "key": USER, "project": "mobile"}]})
    cfg["models"]["qwen-image-placeholder"]["routes"] = [{"provider": "placeholder", "price": {"per_image": 0.25}}]
    loop = Loop()
    runner, url = loop.run(serve(build_app(parse_config(cfg))))
    try:
        body = json.dumps({"model": "qwen-image-placeholder", "prompt": "a fox", "n": 2, "size": "1024x1024",
                           "response_format": "b64_json"}).encode()
        req = urllib.request.Request(f"{url}/v1/images/generations", data=body, method="POST", headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {USER}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
        yield url
    finally:
        loop.run(runner.cleanup())
        loop.close()


def open_page(browser, url: str, key: str):  # noqa: F811
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('qip.apiKey', {json.dumps(key)});")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{url}/playground")
    page.wait_for_function("() => document.querySelectorAll('#model option').length > 0")
    return context, page, errors


def test_usage_view_shows_images_and_cost_per_day(browser, live_usage):  # noqa: F811
    context, page, errors = open_page(browser, live_usage, ADMIN)
    page.click("#usage-panel summary")
    page.click("#usage-load")
    page.locator("#usage-rows tr").first.wait_for()
    cells = page.locator("#usage-rows tr").first.locator("td").all_inner_texts()
    assert cells[1:5] == ["qwen-image-placeholder · placeholder", "1", "2", "$0.5000"]
    assert page.locator("#usage-chart .usage-day").count() == 7
    seg = page.locator("#usage-chart .usage-bar .seg")
    assert seg.count() == 1 and seg.get_attribute("title") == "qwen-image-placeholder · placeholder: 2 images"
    assert page.locator("#usage-chart .usage-total").last.inner_text() == "2 images"  # today is the last day
    assert page.locator("#error").is_hidden()
    assert not errors
    context.close()


def test_usage_view_by_project(browser, live_usage):  # noqa: F811
    """The key's project (server.api_keys[].project) as the group: both endpoints group by project_id."""
    context, page, errors = open_page(browser, live_usage, ADMIN)
    page.click("#usage-panel summary")
    page.select_option("#usage-group", "project_id")
    page.click("#usage-load")
    page.locator("#usage-rows tr").first.wait_for()
    cells = page.locator("#usage-rows tr").first.locator("td").all_inner_texts()
    assert cells[1:5] == ["mobile", "1", "2", "$0.5000"]
    assert not errors
    context.close()


def test_usage_view_without_an_admin_key_shows_the_apis_error(browser, live_usage):  # noqa: F811
    context, page, errors = open_page(browser, live_usage, USER)
    page.click("#usage-panel summary")
    page.click("#usage-load")
    page.locator("#error").wait_for()
    text = page.inner_text("#error")
    assert "admin key" in text and "403" in text and "insufficient_permissions" in text
    assert not errors
    context.close()
