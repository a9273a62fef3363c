"""Work limits through the running proxy: oversized requests are refused before any work starts."""

from __future__ import annotations

import base64
import io
import time

import pytest
from openai import BadRequestError
from PIL import Image

from proxy.errors import InvalidRequest
from proxy.media.sizing import DEFAULT_MAX_PIXELS
from proxy.providers import placeholder
from proxy.providers.placeholder import MAX_CALL_PIXELS, MAX_PIXELS, PlaceholderProvider
from proxy.request import ImageRequest

from .conftest import base_config
from .test_generations_e2e import assert_openai_error, call

MODEL = "qwen-image-placeholder"
SHIPPED_MAX_PIXELS = 2048 * 2048  # the qwen-image table in models.yaml


def shipped_config(tmp_path) -> dict:
    """The placeholder on a qwen-image table with the shipped models.yaml's max_pixels."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["qwen-image"]["max_pixels"] = SHIPPED_MAX_PIXELS
    return cfg


@pytest.fixture
def provider_calls(monkeypatch) -> list[ImageRequest]:
    """Every request that reaches the placeholder provider (a refusal must come before it)."""
    calls: list[ImageRequest] = []
    real = PlaceholderProvider.generate

    async def generate(self, req, route):
        calls.append(req)
        return await real(self, req, route)

    monkeypatch.setattr(PlaceholderProvider, "generate", generate)
    return calls


@pytest.mark.parametrize("config", [base_config, shipped_config], ids=["no-max_pixels", "shipped"])
@pytest.mark.parametrize("body", [
    {"size": "13000x13000", "n": 4},
    {"size": "14142x14142"},
    {"size": "14142x14142", "stream": True},
    {"size": "13000x13000", "n": 4, "response_format": "b64_json", "output_format": "webp"},
])
async def test_oversized_sizes_are_refused_at_once(start_proxy, tmp_path, provider_calls, config, body):
    server, _ = await start_proxy(config(tmp_path))
    status, _, text = await call(server, "POST", "/v1/images/generations",
                                 json_body={"model": MODEL, "prompt": "a huge lighthouse", **body})
    assert status == 400
    err = assert_openai_error(text, param="size", type_="invalid_request_error")
    assert body["size"] in err["message"] and "pixels" in err["message"]
    assert provider_calls == []  # nothing was drawn (before: 22 s of CPU for 13000x13000 n=4)


async def test_oversized_size_through_the_openai_client(start_proxy, tmp_path, provider_calls):
    _, client = await start_proxy(shipped_config(tmp_path))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model=MODEL, prompt="a lighthouse", size="13000x13000", n=4)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "size"
    assert str(SHIPPED_MAX_PIXELS) in e.value.body["message"]
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model=MODEL, prompt="a lighthouse", size="2049x2048")  # one row too many
    assert e.value.body["param"] == "size"
    assert provider_calls == []


async def test_n_times_pixels_over_the_request_cap_names_n(start_proxy, tmp_path, provider_calls):
    # 5 x 2048x2048 = 21 MP: each image is allowed, together they are more than 4 x max_pixels.
    _, client = await start_proxy(shipped_config(tmp_path))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model=MODEL, prompt="a lighthouse", size="2048x2048", n=5)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "n"
    assert "at most 4" in e.value.body["message"]
    assert provider_calls == []  # refused while parsing, before the router


async def test_n_times_pixels_over_the_default_cap_names_n(start_proxy, tmp_path):
    # A table without max_pixels: 16 MP per image, 4 x 16 MP per request.
    server, _ = await start_proxy(base_config(tmp_path))
    status, _, text = await call(server, "POST", "/v1/images/generations",
                                 json_body={"model": MODEL, "prompt": "p", "size": "4096x4096", "n": 5})
    assert status == 400
    assert_openai_error(text, param="n")


@pytest.mark.parametrize("size", ["2048x2048", "4096x1024", "1024x4096"])
async def test_a_size_at_the_limit_works_and_has_exactly_that_size(start_proxy, tmp_path, size):
    _, client = await start_proxy(shipped_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size=size,
                                     response_format="b64_json", extra_body={"seed": 5})
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    im.load()
    assert f"{im.size[0]}x{im.size[1]}" == size == r.size
    assert im.size[0] * im.size[1] == SHIPPED_MAX_PIXELS


async def test_the_placeholder_at_its_largest_size_and_n(start_proxy, tmp_path):
    # A table without max_pixels allows 4096x4096 (the default limit), 4 of them per request.
    assert DEFAULT_MAX_PIXELS == MAX_PIXELS and 4 * MAX_PIXELS == MAX_CALL_PIXELS
    _, client = await start_proxy(base_config(tmp_path))
    started = time.perf_counter()
    r = await client.images.generate(model=MODEL, prompt="a lighthouse at dusk", size="4096x4096", n=4,
                                     response_format="b64_json", extra_body={"seed": 9})
    elapsed = time.perf_counter() - started
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in r.data]
    for im in images:
        im.load()
    assert [im.size for im in images] == [(4096, 4096)] * 4
    assert len({im.tobytes()[:100_000] for im in images}) == 4  # seeds 9..12 differ
    print(f"placeholder 4 x 4096x4096 through the proxy: {elapsed:.2f} s")


def test_the_placeholder_draws_at_most_about_a_megapixel(monkeypatch):
    drawn = []
    real = placeholder._draw

    def spy(prompt, seed, width, height, label):
        drawn.append((width, height))
        return real(prompt, seed, width, height, label)

    monkeypatch.setattr(placeholder, "_draw", spy)
    for width, height in [(4096, 4096), (14142, 1186), (64, 48), (1024, 1024)]:
        im = placeholder.draw_placeholder("a fox", 1, width, height)
        assert im.size == (width, height)
        w, h = drawn[-1]
        assert w * h <= placeholder.DRAW_PIXELS * 1.01
        assert abs(w / h - width / height) < 0.02 * width / height
    assert drawn[-2:] == [(64, 48), (1024, 1024)]  # small sizes are drawn as they are
    # Deterministic in (prompt, seed), also when scaled up.
    assert placeholder.render_png("a fox", 3, 2048, 2048) == placeholder.render_png("a fox", 3, 2048, 2048)


async def test_the_placeholder_refuses_above_its_own_limits(monkeypatch):
    # Whatever a size table allows, the placeholder itself draws at most MAX_PIXELS an image and
    # MAX_CALL_PIXELS a call, and refuses before drawing anything.
    monkeypatch.setattr(placeholder, "render_png", lambda *a: pytest.fail("drew an image"))
    provider = PlaceholderProvider("placeholder", {})
    for width, height, n, param in [(4097, 4096, 1, "size"), (13000, 13000, 4, "size"), (4096, 4096, 5, "n")]:
        req = ImageRequest(prompt="p", model=MODEL, width=width, height=height, n=n)
        with pytest.raises(InvalidRequest) as e:
            await provider.generate(req, None)
        assert e.value.param == param and e.value.status == 400


@pytest.mark.parametrize("kind", ["multipart", "urlencoded"])
async def test_a_form_with_too_many_fields_is_a_400_naming_the_limit(start_proxy, tmp_path, kind):
    """1,001 fields in a small form is the client's mistake, not a body over max_body_mb (413)."""
    from urllib.parse import urlencode

    import aiohttp

    server, _ = await start_proxy(base_config(tmp_path))
    url = server.make_url("/v1/images/generations")
    async with aiohttp.ClientSession() as s:
        for count in (1000, 1001):
            fields = [("model", MODEL), ("prompt", "a fox")] + [(f"x{i}", "1") for i in range(count - 2)]
            if kind == "multipart":
                form = aiohttp.FormData(fields)
                form._is_multipart = True  # noqa: SLF001 - multipart/form-data although no part is a file
                send = {"data": form}
            else:
                send = {"data": urlencode(fields), "headers": {"Content-Type": "application/x-www-form-urlencoded"}}
            async with s.post(url, **send) as r:
                text = await r.text()
            if count == 1000:  # read (the unknown fields would go upstream as extras)
                assert r.status != 413 and "too_many_fields" not in text, text
                continue
            assert r.status == 400, (r.status, text)
            err = assert_openai_error(text, code="too_many_fields", type_="invalid_request_error")
            assert "1000" in err["message"]
