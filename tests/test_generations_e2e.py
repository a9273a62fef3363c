"""End to end: the official openai package against the running proxy (placeholder and fake upstreams)."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import os
import time
from pathlib import Path

import aiohttp
import pytest
from openai import (
    APIError,
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
)
from PIL import Image

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream, free_port, make_image, seed_colour

MODEL = "qwen-image-placeholder"
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif", "avif": "image/avif"}
CLIENT_KEY = "client-secret-key-123"


# ---- helpers ----------------------------------------------------------------------------------------


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


async def download(url: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.read()


async def call(server, method: str, path: str, *, json_body=None, data=None, headers=None):
    """A raw request to the proxy: (status, headers, text) — for what the SDK hides."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if json_body is not None:
        data = json.dumps(json_body)
    async with aiohttp.ClientSession() as s, s.request(method, server.make_url(path), data=data,
                                                       headers=hdrs) as r:
        return r.status, r.headers, await r.text()


def assert_openai_error(text: str, *, param=..., code=..., type_=...) -> dict:
    """The body is OpenAI's error JSON (and never a traceback); returns the `error` object."""
    assert "Traceback" not in text
    body = json.loads(text)
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if param is not ...:
        assert err["param"] == param
    if code is not ...:
        assert err["code"] == code
    if type_ is not ...:
        assert err["type"] == type_
    return err


def stored_file(tmp_path: Path, url: str) -> Path:
    return tmp_path / "images" / url.rsplit("/", 1)[1]


@pytest.fixture
def fake_upstream(aiohttp_server):
    """fake_upstream(**knobs) -> a started FakeOpenAIUpstream."""

    async def make(**kwargs) -> FakeOpenAIUpstream:
        return await FakeOpenAIUpstream(**kwargs).start(aiohttp_server)

    return make


def openai_provider(fake_or_url, key: str, **options) -> dict:
    base = fake_or_url if isinstance(fake_or_url, str) else f"{fake_or_url.url}/openai/v1"
    return {"kind": "openai", "base_url": base, "api_key": key, **options}


def upstream_config(tmp_path, providers: dict, routes: list, **extra_models) -> dict:
    """base_config plus openai-kind providers and a model 'qwen-image' on the small size table."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"].update(providers)
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": routes}
    # The default retries within a route (2), with backoffs short enough for tests.
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    for name, model_routes in extra_models.items():
        cfg["models"][name] = {"sizes": "small", "routes": model_routes}
    return cfg


# ---- placeholder model: formats, n, sizes, URLs -----------------------------------------------------


async def test_url_and_b64_json(start_proxy, tmp_path):
    server, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a lighthouse", size="64x48", response_format="url")
    assert len(r.data) == 1 and r.data[0].b64_json is None
    assert r.data[0].url.startswith(str(server.make_url("/images/")))
    assert r.data[0].revised_prompt == "a lighthouse"
    status, ctype, body = await download(r.data[0].url)
    assert (status, ctype) == (200, "image/png")
    im = Image.open(io.BytesIO(body))
    assert (im.format, im.size) == ("PNG", (64, 48))

    r = await client.images.generate(model=MODEL, prompt="a lighthouse", size="64x48", response_format="b64_json")
    assert r.data[0].url is None
    im = decode(r.data[0].b64_json)
    assert (im.format, im.size) == ("PNG", (64, 48))
    assert r.size == "64x48" and r.output_format == "png" and r.created > 0
    assert r.data[0].revised_prompt == "a lighthouse"


async def test_none_from_an_app_means_the_default(start_proxy, tmp_path):
    # Apps pass their optional settings on as None; the openai package sends those as JSON null, which
    # OpenAI's reference allows for n, response_format and stream.
    server, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a lighthouse", size="64x48", n=None,
                                     response_format=None, stream=None)
    assert len(r.data) == 1 and r.data[0].url.startswith(str(server.make_url("/images/")))
    status, ctype, body = await download(r.data[0].url)
    assert (status, ctype) == (200, "image/png") and Image.open(io.BytesIO(body)).size == (64, 48)


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "gif", "avif"])
async def test_every_output_format(start_proxy, tmp_path, fmt, response_format):
    _, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a cat", size="64x64", output_format=fmt,
                                     response_format=response_format)
    assert r.output_format == fmt
    if response_format == "url":
        status, ctype, data = await download(r.data[0].url)
        assert status == 200 and ctype == MIME[fmt]
        assert r.data[0].url.endswith(f".{fmt}")
    else:
        data = base64.b64decode(r.data[0].b64_json)
    im = Image.open(io.BytesIO(data))
    assert (im.format, im.size) == (PIL_FORMAT[fmt], (64, 64))


async def test_output_compression_changes_lossy_size(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))
    sizes = {}
    for quality in (5, 95):
        r = await client.images.generate(model=MODEL, prompt="a detailed forest", size="256x256",
                                         output_format="jpeg", output_compression=quality,
                                         response_format="b64_json", extra_body={"seed": 1})
        assert decode(r.data[0].b64_json).format == "JPEG"
        sizes[quality] = len(base64.b64decode(r.data[0].b64_json))
    assert sizes[5] < sizes[95]


async def test_n_with_seed_is_distinct_and_reproducible(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))

    async def gen():
        r = await client.images.generate(model=MODEL, prompt="a robot", size="64x64", n=3,
                                         response_format="b64_json", extra_body={"seed": 42})
        return r, [base64.b64decode(d.b64_json) for d in r.data]

    first, images = await gen()
    assert len(images) == 3 and len(set(images)) == 3
    assert first.to_dict()["seeds"] == [42, 43, 44]
    for data in images:
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    _, again = await gen()
    assert again == images
    # Image i of n is image 0 of the request with seed + i.
    r = await client.images.generate(model=MODEL, prompt="a robot", size="64x64", response_format="b64_json",
                                     extra_body={"seed": 43})
    assert base64.b64decode(r.data[0].b64_json) == images[1]


async def test_n_without_seed(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a robot", size="64x64", n=3, response_format="url")
    assert len(r.data) == 3
    bodies = []
    for item in r.data:
        status, _, data = await download(item.url)
        assert status == 200
        bodies.append(data)
    assert len({d.url for d in r.data}) == 3
    assert len(set(bodies)) == 3


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"size": "640x480"}, (640, 480)),
    ({"size": "16:9"}, (1365, 768)),
    ({"extra_body": {"aspect_ratio": "3:4"}}, (887, 1182)),
    ({"extra_body": {"aspect_ratio": "7:3"}}, (1365, 768)),  # nearest supported ratio
    ({"extra_body": {"aspect_ratio": "4:3", "resolution": "1K"}}, (1183, 887)),
    ({"extra_body": {"resolution": "4K"}}, (1024, 1024)),  # nearest tier, default shape
    ({"size": "auto"}, (1024, 1024)),
    ({}, (1024, 1024)),
    ({"size": "640x480", "extra_body": {"aspect_ratio": "16:9", "resolution": "1K"}}, (640, 480)),  # size wins
])
async def test_size_rules(start_proxy, tmp_path, kwargs, expected):
    _, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a bridge", response_format="b64_json", **kwargs)
    assert decode(r.data[0].b64_json).size == expected
    assert r.size == f"{expected[0]}x{expected[1]}"


@pytest.mark.parametrize(("extra_body", "expected"), [
    ({"resolution": "0.016"}, (128, 128)),
    ({"resolution": "0.016", "aspect_ratio": "16:9"}, (224, 128)),
    ({"aspect_ratio": "16:9"}, (112, 64)),
    ({"resolution": "0.003"}, (64, 64)),
])
async def test_resolution_tiers(start_proxy, tmp_path, extra_body, expected):
    cfg = base_config(tmp_path)
    cfg["size_tables"]["tiered"] = {"default": "64x64", "tiers": {
        "0.004": {"1:1": "64x64", "16:9": "112x64"},
        "0.016": {"1:1": "128x128", "16:9": "224x128"},
    }}
    cfg["models"]["tiered"] = {"sizes": "tiered", "routes": ["placeholder"]}
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="tiered", prompt="p", response_format="b64_json", extra_body=extra_body)
    assert decode(r.data[0].b64_json).size == expected


async def test_image_url_expires(start_proxy, tmp_path):
    server, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="old news", size="32x32")
    url = r.data[0].url
    status, ctype, _ = await download(url)
    assert (status, ctype) == (200, "image/png")
    path = stored_file(tmp_path, url)
    assert path.exists()
    old = time.time() - 2 * 3600
    os.utime(path, (old, old))
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.status == 404
        assert_openai_error(await resp.text(), code="image_not_found")
    assert not path.exists()
    # Names that are not store ids never touch the filesystem.
    for bad in ("/images/nope.png", "/images/..%2F..%2Fetc%2Fpasswd", "/images/" + "a" * 32 + ".exe"):
        status, _, text = await call(server, "GET", bad)
        assert status == 404
        assert_openai_error(text)


async def test_short_ttl(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["store"]["ttl_seconds"] = 0.3
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model=MODEL, prompt="soon gone", size="32x32")
    assert (await download(r.data[0].url))[0] == 200
    await asyncio.sleep(0.4)
    status, _, _ = await download(r.data[0].url)
    assert status == 404


async def test_public_base_url(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"public_base_url": "https://img.example.test/qip/"}
    server, client = await start_proxy(cfg)
    r = await client.images.generate(model=MODEL, prompt="a cat", size="32x32")
    url = r.data[0].url
    assert url.startswith("https://img.example.test/qip/images/")
    name = url.rsplit("/", 1)[1]
    status, ctype, _ = await download(str(server.make_url(f"/images/{name}")))
    assert (status, ctype) == (200, "image/png")


# ---- openai-kind route to the fake upstream ------------------------------------------------------


async def test_upstream_request_conversion(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream(api_key="up-key-1")
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, "${LUMEN_KEY}")},
                          [{"provider": "lumen", "model": "qwen-image-upstream-name"}])
    _, client = await start_proxy(cfg, env={"LUMEN_KEY": "up-key-1"}, api_key=CLIENT_KEY)
    extras = {"cfg_scale": 3.5, "num_inference_steps": 20, "negative_prompt": "blur",
              "loras": [{"path": "owner/lora", "scale": 0.7}], "custom_flag": False, "custom_steps": 20}
    # Fields of one vendor (Alibaba's watermark, fal's acceleration, Replicate's go_fast) go only to it.
    vendor_only = {"watermark": False, "acceleration": "high", "go_fast": True}
    r = await client.images.generate(model="qwen-image", prompt="a fox", n=3, response_format="b64_json",
                                     extra_body={"seed": 10, "aspect_ratio": "16:9", **extras, **vendor_only})

    # max_images_per_call defaults to 1: three calls, seed + i each.
    assert len(up.image_calls) == 3
    bodies = sorted(up.image_bodies, key=lambda b: b["seed"])
    assert [b["seed"] for b in bodies] == [10, 11, 12]
    for body in bodies:
        assert body["model"] == "qwen-image-upstream-name"
        assert body["prompt"] == "a fox"
        assert body["n"] == 1
        assert body["size"] == "112x64"
        assert "aspect_ratio" not in body and "resolution" not in body
        assert body["response_format"] == "b64_json"
        for key, value in extras.items():
            assert body[key] == value, key
        assert not set(vendor_only) & set(body)
        assert type(body["custom_flag"]) is bool and type(body["num_inference_steps"]) is int
    for call_ in up.image_calls:
        assert call_.headers["Authorization"] == "Bearer up-key-1"
        assert call_.path == "/openai/v1/images/generations"
        assert not any(CLIENT_KEY in v for v in call_.headers.values())

    # The images come back in seed order, at the resolved size, with the upstream's revised prompt.
    assert r.to_dict()["seeds"] == [10, 11, 12]
    for i, item in enumerate(r.data):
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("PNG", (112, 64))
        assert im.convert("RGB").getpixel((0, 0)) == seed_colour(10 + i)
        assert item.revised_prompt == "a fox, revised by the fake"


async def test_upstream_cookies_are_not_kept(start_proxy, tmp_path, fake_upstream):
    """A cookie an upstream sets (a load balancer's, say) is not sent back on later calls: they are made
    for other clients, and the proxy's calls carry the route's key, never a session."""
    up = await fake_upstream(api_key="k", set_cookie="lb-session=client-a; Path=/")
    # By name: aiohttp's default cookie jar ignores cookies from IP addresses.
    base = f"{up.url}/openai/v1".replace("127.0.0.1", "localhost")
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(base, "k")}, ["lumen"])
    _, client = await start_proxy(cfg)
    for _ in range(2):
        r = await client.images.generate(model="qwen-image", prompt="a fox", response_format="b64_json")
        assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(up.image_calls) == 2
    assert [call.headers.get("Cookie") for call in up.image_calls] == [None, None]


async def test_many_slow_calls_reach_the_upstream_at_once(start_proxy, tmp_path, fake_upstream):
    """No hidden cap on connections to an upstream: 150 slow generations in flight are 150 calls in flight
    upstream, not 100 and a queue inside the HTTP client eating into each one's timeout."""
    up = await fake_upstream(api_key="k")
    # Every call is held until all 150 are in flight together (or a generous minute passes): with a
    # cap of 100 the last 50 never arrive while the first are held, however fast or busy the machine.
    up.hold_until_in_flight = 150
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, "k")}, ["lumen"])
    _, client = await start_proxy(cfg)
    calls = [client.images.generate(model="qwen-image", prompt=f"fox {i}", response_format="b64_json")
             for i in range(150)]
    results = await asyncio.gather(*calls)
    assert all(decode(r.data[0].b64_json).size == (64, 64) for r in results)
    assert len(up.image_calls) == 150 and up.most_in_flight == 150


async def test_route_params_are_defaults(start_proxy, tmp_path, fake_upstream):
    a = await fake_upstream()
    b = await fake_upstream()
    a.fail(503, "UNAVAILABLE", "down for maintenance")
    params_a = {"sampler": "none", "negative_prompt": "from route a"}
    params_b = {"sampler": "regular", "num_inference_steps": 30, "negative_prompt": "lowres", "watermark": True}
    cfg = upstream_config(tmp_path, {"a": openai_provider(a, a.api_key), "b": openai_provider(b, b.api_key)},
                          [{"provider": "a", "params": params_a}, {"provider": "b", "params": params_b}])
    _, client = await start_proxy(cfg)
    await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                 extra_body={"num_inference_steps": 12, "watermark": False})
    assert len(a.image_bodies) == 3  # the first call and its 2 retries, then route b
    sent_a, (sent_b,) = a.image_bodies[0], b.image_bodies
    assert (sent_a["sampler"], sent_a["negative_prompt"], sent_a["num_inference_steps"]) == (
        "none", "from route a", 12)
    # Each route's own params; what the client sent wins; another vendor's field never reaches it.
    assert sent_b["sampler"] == "regular" and sent_b["negative_prompt"] == "lowres"
    assert sent_b["num_inference_steps"] == 12 and "watermark" not in sent_b


async def test_route_max_images_per_call(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream()
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key)},
                          [{"provider": "lumen", "max_images_per_call": 2}])
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="p", n=3, response_format="b64_json",
                                     extra_body={"seed": 5})
    assert sorted((b["n"], b["seed"]) for b in up.image_bodies) == [(1, 7), (2, 5)]
    assert [decode(d.b64_json).convert("RGB").getpixel((0, 0)) for d in r.data] == [seed_colour(s) for s in (5, 6, 7)]


async def test_upstream_urls_are_rehosted(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream()
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key, response_format="url")}, ["lumen"])
    server, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="p", n=2, response_format="url",
                                     extra_body={"seed": 3})
    assert up.image_bodies[0]["response_format"] == "url"
    assert len(up.calls_to(".png")) == 2  # the proxy downloaded both files from the upstream
    for i, item in enumerate(r.data):
        assert item.url.startswith(str(server.make_url("/images/")))
        assert up.url not in item.url
        status, ctype, data = await download(item.url)
        assert (status, ctype) == (200, "image/png")
        # Nothing to convert: the upstream's bytes pass through untouched.
        assert data == make_image(64, 64, 3 + i, "png")


async def test_upstream_urls_handed_on_when_rehosting_is_off(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream()
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key, response_format="url")}, ["lumen"])
    cfg["store"]["rehost_upstream_urls"] = False
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="url")
    assert r.data[0].url.startswith(f"{up.url}/files/")
    # b64_json still needs the bytes.
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)


@pytest.mark.parametrize("upstream_formats", [None, ["jpeg"]])
async def test_jpeg_upstream_converted_to_png(start_proxy, tmp_path, fake_upstream, upstream_formats):
    # None: the proxy asks for png but the upstream answers jpeg anyway; ["jpeg"]: the proxy does not ask.
    up = await fake_upstream(image_format="jpeg")
    options = {"output_formats": upstream_formats} if upstream_formats else {}
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key, **options)}, ["lumen"])
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="p", output_format="png", response_format="b64_json")
    assert ("output_format" in up.image_bodies[0]) is (upstream_formats is None)
    im = decode(r.data[0].b64_json)
    assert (im.format, im.size) == ("PNG", (64, 64))
    assert r.output_format == "png"
    # Without output_format the upstream's jpeg comes through as it is.
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).format == "JPEG" and r.output_format == "jpeg"


@pytest.mark.parametrize("failure", ["500", "502", "401", "empty", "slow", "unreachable"])
async def test_fallback_to_second_route(start_proxy, tmp_path, fake_upstream, failure):
    first = await fake_upstream(api_key="key-a", delay=30.0 if failure == "slow" else 0.0)
    second = await fake_upstream(api_key="key-b")
    key_a = "key-a"
    if failure == "500":
        first.fail(500, "INTERNAL_ERROR", "boom")
    elif failure == "502":
        first.fail(502, "ALL_PROVIDERS_EXHAUSTED", "all providers exhausted")
    elif failure == "401":
        key_a = "wrong-key"
    elif failure == "empty":
        first.payload_override = {"created": 1, "data": []}
    target = f"http://127.0.0.1:{free_port()}/v1" if failure == "unreachable" else first
    cfg = upstream_config(tmp_path, {"a": openai_provider(target, key_a), "b": openai_provider(second, "key-b")},
                          [{"provider": "a", "timeout": 0.3}, "b"])
    _, client = await start_proxy(cfg)
    started = time.monotonic()
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert time.monotonic() - started < 15  # a slow first route answers after 30 s: only its timeout moves on
    assert decode(r.data[0].b64_json).size == (64, 64)
    # Retried twice on the route first, except a failed login: another try would fail the same way.
    assert len(first.image_calls) == {"unreachable": 0, "401": 1}.get(failure, 3)
    assert len(second.image_calls) == 1


@pytest.mark.parametrize("item", [{"b64_json": "!!!not base64!!!"},
                                  {"b64_json": base64.b64encode(b"not an image").decode()},
                                  {"revised_prompt": "neither url nor b64_json"}])
async def test_corrupt_upstream_answer_falls_back(start_proxy, tmp_path, fake_upstream, item):
    first, second = await fake_upstream(), await fake_upstream()
    first.payload_override = {"created": 1, "data": [item]}
    cfg = upstream_config(tmp_path, {"a": openai_provider(first, first.api_key),
                                     "b": openai_provider(second, second.api_key)}, ["a", "b"])
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(first.image_calls) == 3 and len(second.image_calls) == 1


@pytest.mark.parametrize("item", [{"b64_json": "!!!not base64!!!"},
                                  {"b64_json": base64.b64encode(b"not an image").decode()},
                                  {"revised_prompt": "neither url nor b64_json"}])
async def test_corrupt_upstream_answer(start_proxy, tmp_path, fake_upstream, item):
    up = await fake_upstream()
    up.payload_override = {"created": 1, "data": [item]}
    cfg = upstream_config(tmp_path, {"a": openai_provider(up, up.api_key)}, ["a"])
    _, client = await start_proxy(cfg)
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert e.value.status_code == 502
    assert_openai_error(e.value.response.text, type_="server_error")


async def test_client_error_returns_at_once(start_proxy, tmp_path, fake_upstream):
    first = await fake_upstream()
    second = await fake_upstream()
    first.fail(400, "INVALID_REQUEST", "negative_prompt is too long for this provider")
    cfg = upstream_config(tmp_path, {"a": openai_provider(first, first.api_key),
                                     "b": openai_provider(second, second.api_key)}, ["a", "b"])
    server, client = await start_proxy(cfg)
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 400
    assert "negative_prompt is too long for this provider" in e.value.message
    assert_openai_error(e.value.response.text, type_="invalid_request_error")
    assert len(first.image_calls) == 1
    assert second.image_calls == []


async def test_all_routes_down(start_proxy, tmp_path, fake_upstream):
    a = await fake_upstream(api_key="secret-key-a")
    c = await fake_upstream(api_key="secret-key-c")
    a.fail(500, "INTERNAL_ERROR", "internal failure while using key secret-key-a")
    c.fail(502, "ALL_PROVIDERS_EXHAUSTED", "every provider failed")
    cfg = upstream_config(tmp_path, {
        "route-a": openai_provider(a, "secret-key-a"),
        "route-b": openai_provider(f"http://127.0.0.1:{free_port()}/v1", "secret-key-b"),
        "route-c": openai_provider(c, "secret-key-c"),
    }, ["route-a", "route-b", "route-c"])
    server, client = await start_proxy(cfg, api_key=CLIENT_KEY)
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 502
    text = e.value.response.text
    err = assert_openai_error(text, type_="server_error")
    message = err["message"]
    for expected in ("route 'route-a'", "HTTP 500", "route 'route-b'", "cannot reach",
                     "route 'route-c'", "HTTP 502", "every provider failed"):
        assert expected in message, (expected, message)
    for secret in ("secret-key-a", "secret-key-b", "secret-key-c", CLIENT_KEY):
        assert secret not in text
        assert secret not in str(dict(e.value.response.headers))


async def test_a_failed_request_logs_the_route_it_failed_on(start_proxy, tmp_path, fake_upstream, caplog):
    # Its log line said route=- attempts=0 after three calls to two routes.
    caplog.set_level("INFO", logger="proxy.requests")
    a, b = await fake_upstream(api_key="ka"), await fake_upstream(api_key="kb")
    a.fail(500, "INTERNAL_ERROR", "down")
    b.fail(500, "INTERNAL_ERROR", "down too")
    cfg = upstream_config(tmp_path, {"route-a": openai_provider(a, "ka", retries=1),
                                     "route-b": openai_provider(b, "kb", retries=0)}, ["route-a", "route-b"])
    _, client = await start_proxy(cfg)
    with pytest.raises(InternalServerError):
        await client.images.generate(model="qwen-image", prompt="p")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
    assert "route=route-b attempts=3 status=502" in line and "outcome=failed" in line


async def test_all_routes_rate_limited(start_proxy, tmp_path, fake_upstream):
    a = await fake_upstream()
    b = await fake_upstream()
    a.fail(429, "RATE_LIMITED", "slow down", retry_after="7")
    b.fail(429, "RATE_LIMITED", "slow down too", retry_after="3")
    cfg = upstream_config(tmp_path, {"a": openai_provider(a, a.api_key), "b": openai_provider(b, b.api_key)},
                          ["a", "b"])
    cfg["routing"]["retries"] = 0  # else the last route sits out its 3 s before trying again
    _, client = await start_proxy(cfg)
    with pytest.raises(RateLimitError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 429
    assert e.value.response.headers["retry-after"] == "3"
    assert_openai_error(e.value.response.text, type_="rate_limit_error")
    assert len(a.image_calls) == len(b.image_calls) == 1


async def test_all_routes_time_out(start_proxy, tmp_path, fake_upstream):
    a = await fake_upstream(delay=1.0)
    cfg = upstream_config(tmp_path, {"a": openai_provider(a, a.api_key)}, [{"provider": "a", "timeout": 0.2}])
    _, client = await start_proxy(cfg)
    with pytest.raises(APIError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 504
    assert_openai_error(e.value.response.text, code="upstream_timeout")


async def test_missing_key_skips_route(start_proxy, tmp_path, fake_upstream):
    a = await fake_upstream()
    b = await fake_upstream()
    cfg = upstream_config(
        tmp_path,
        {"nokey": openai_provider(a, "${QIP_TEST_MISSING_KEY}"), "ok": openai_provider(b, "${QIP_TEST_OK_KEY}")},
        ["nokey", "ok"],
        dead=["nokey"],
    )
    server, client = await start_proxy(cfg, env={"QIP_TEST_OK_KEY": b.api_key})
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert a.requests == [] and len(b.image_calls) == 1

    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="dead", prompt="p")
    assert e.value.status_code == 503
    err = assert_openai_error(e.value.response.text, code="no_route_available")
    assert "QIP_TEST_MISSING_KEY" in err["message"] and "nokey" in err["message"]
    assert a.requests == []
    # No key will appear within the SDK's retries: it is told not to make them (it asked once, not three times).
    assert e.value.response.headers["x-should-retry"] == "false"
    retrying = client.with_options(max_retries=2)
    with pytest.raises(InternalServerError):
        await retrying.images.generate(model="dead", prompt="p")
    status, _, text = await call(server, "GET", "/metrics")
    assert 'qip_requests_total{endpoint="/v1/images/generations",model="dead",status="503"} 2.0' in text

    status, _, text = await call(server, "GET", "/health")
    health = json.loads(text)
    assert status == 200 and health["status"] == "ok"
    assert health["models"]["dead"]["ready"] is False
    assert health["models"]["dead"]["routes"][0]["state"] == "missing_key"
    assert health["models"]["qwen-image"]["ready"] is True
    # A model with no possible route does not hold readiness back; the others serve.
    status, _, text = await call(server, "GET", "/ready")
    assert status == 200 and json.loads(text)["waiting_for"] == []


async def test_stream_reports_upstream_failure(start_proxy, tmp_path, fake_upstream):
    a = await fake_upstream()
    a.fail(500, "INTERNAL_ERROR", "exploded")
    cfg = upstream_config(tmp_path, {"a": openai_provider(a, a.api_key)}, ["a"])
    _, client = await start_proxy(cfg)
    # Nothing streamed yet: the failure is the HTTP answer itself, as without stream.
    with pytest.raises(APIStatusError) as e:
        await client.images.generate(model="qwen-image", prompt="p", stream=True)
    assert e.value.status_code == 502 and "exploded" in e.value.message


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "status", "param", "code"), [
    (b"{not json", 400, None, "invalid_json"),
    (b"", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    (b'{"prompt": "x", "seed": ' + b"1" * 5000 + b"}", 400, None, "invalid_json"),
    (b'{"model": "qwen-image-placeholder"}', 400, "prompt", ...),
    (b'{"prompt": "   "}', 400, "prompt", ...),
    (b'{"prompt": "x", "n": 11}', 400, "n", ...),
    (b'{"prompt": "x", "n": 0}', 400, "n", ...),
    (b'{"prompt": "x", "n": "many"}', 400, "n", ...),
    (b'{"prompt": "x", "size": "huge"}', 400, "size", ...),
    (b'{"prompt": "x", "size": "0x64"}', 400, "size", ...),
    (b'{"prompt": "x", "size": "20000x64"}', 400, "size", ...),
    (b'{"prompt": "x", "size": 1024}', 400, "size", ...),
    (('{"prompt": "x", "size": "%sx1"}' % ("9" * 5000)).encode(), 400, "size", ...),
    (b'{"prompt": "x", "aspect_ratio": "wide"}', 400, "aspect_ratio", ...),
    (b'{"prompt": "x", "resolution": "huge"}', 400, "resolution", ...),
    (('{"prompt": "x", "resolution": "%sK"}' % ("9" * 200)).encode(), 400, "resolution", ...),
    (b'{"prompt": "x", "response_format": "svg"}', 400, "response_format", ...),
    (b'{"prompt": "x", "output_format": "bmp"}', 400, "output_format", ...),
    (b'{"prompt": "x", "output_format": "png", "output_compression": 50}', 400, "output_compression", ...),
    (b'{"prompt": "x", "seed": -1}', 400, "seed", ...),
    (b'{"prompt": "x", "model": 7}', 400, "model", ...),
    (b'{"prompt": "x", "loras": "not json"}', 400, "loras", ...),
    (b'{"prompt": "x", "model": "dall-e-9"}', 404, "model", "model_not_found"),
])
async def test_invalid_requests(start_proxy, tmp_path, body, status, param, code):
    server, _ = await start_proxy(base_config(tmp_path))
    got, _, text = await call(server, "POST", "/v1/images/generations", data=body)
    assert got == status, text
    assert_openai_error(text, param=param, code=code)


async def test_invalid_requests_through_the_sdk(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model=MODEL, prompt="x", n=11)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model=MODEL, prompt="x", size="big")  # type: ignore[arg-type]
    assert e.value.body["param"] == "size"
    with pytest.raises(NotFoundError) as e:
        await client.images.generate(model="no-such-model", prompt="x")
    assert e.value.body["code"] == "model_not_found"


async def test_prompts_longer_than_openais_limit_are_refused(start_proxy, tmp_path):
    # OpenAI takes prompts of up to 32,000 characters; a longer one (a 45 MB prompt was accepted) is echoed
    # in every background job's answer and list, and wrapped into the placeholder's picture.
    _, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a " * 16_000, size="64x48", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 48)
    word = "x" * 32_001  # one word: the placeholder wraps only what it shows
    for kwargs in ({"prompt": word}, {"prompt": "x", "extra_body": {"negative_prompt": word}},
                   {"prompt": word, "extra_body": {"background": True}}):
        with pytest.raises(BadRequestError) as e:
            await client.images.generate(model=MODEL, size="64x48", **kwargs)
        param = "negative_prompt" if "extra_body" in kwargs and "negative_prompt" in kwargs["extra_body"] else "prompt"
        assert e.value.body["param"] == param and "at most 32000 characters" in e.value.body["message"]


async def test_a_client_request_id_is_kept_only_if_it_looks_like_one(start_proxy, tmp_path, caplog):
    # One with spaces wrote fields of its own into the text log line; one of kilobytes went everywhere.
    caplog.set_level("INFO", logger="proxy.requests")
    server, _ = await start_proxy(base_config(tmp_path))
    body = {"model": MODEL, "prompt": "x", "size": "16x16", "response_format": "b64_json"}
    kept = ["req-77", "3f6c2a0e-9b1d-4c55-8a7e-0d1f2e3c4b5a", "trace:abc/42=x@y.z"]
    for given in [*kept, "abc key=admin status=200", "x" * 129, "a\tb"]:
        status, headers, _ = await call(server, "POST", "/v1/images/generations", json_body=body,
                                        headers={"X-Request-Id": given})
        assert status == 200
        if given in kept:
            assert headers["X-Request-Id"] == given
        else:
            assert headers["X-Request-Id"] != given and len(headers["X-Request-Id"]) == 32
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
    assert len(lines) == 6 and not any("key=admin" in line or "x" * 129 in line for line in lines)


async def test_method_and_path_errors(start_proxy, tmp_path):
    server, client = await start_proxy(base_config(tmp_path))
    status, headers, text = await call(server, "GET", "/v1/images/generations")
    assert status == 405 and "POST" in headers["Allow"]
    assert_openai_error(text, code="method_not_allowed")
    for path in ("/v1/nothing-here", "/v1/chat/completions", "/not-v1"):
        status, _, text = await call(server, "POST", path, json_body={"x": 1})
        assert status == 404, path
        assert_openai_error(text)
    with pytest.raises(NotFoundError):
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


async def test_body_too_large(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"max_body_mb": 0.01}
    server, client = await start_proxy(cfg)
    status, _, text = await call(server, "POST", "/v1/images/generations",
                                 json_body={"model": MODEL, "prompt": "x" * 20000})
    assert status == 413
    assert_openai_error(text, code="payload_too_large")
    r = await client.images.generate(model=MODEL, prompt="x" * 1000, size="16x16")
    assert r.data[0].url


async def test_api_keys(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": ["sekret-one", "sekret-two"]}
    server, client = await start_proxy(cfg, api_key="sekret-two")
    body = {"model": MODEL, "prompt": "x", "size": "16x16"}
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer "},
                    {"Authorization": "Basic sekret-one"}, {"Authorization": "Bearer sekret-one-extra"}):
        status, _, text = await call(server, "POST", "/v1/images/generations", json_body=body, headers=headers)
        assert status == 401, headers
        err = assert_openai_error(text, type_="authentication_error")
        assert "sekret" not in err["message"]
    status, _, _ = await call(server, "GET", "/v1/models")
    assert status == 401

    _, bad_client = await start_proxy(cfg, api_key="wrong")
    with pytest.raises(AuthenticationError):
        await bad_client.images.generate(model=MODEL, prompt="x", size="16x16")

    r = await client.images.generate(model=MODEL, prompt="x", size="16x16")
    # Image URLs and /health need no key.
    status, ctype, _ = await download(r.data[0].url)
    assert (status, ctype) == (200, "image/png")
    status, _, text = await call(server, "GET", "/health")
    assert status == 200 and json.loads(text)["status"] == "ok"
    # Nor do Prometheus scrapers.
    status, _, text = await call(server, "GET", "/metrics")
    assert status == 200 and "qip_requests_total" in text


# ---- models, health, metrics, streaming -----------------------------------------------------------


async def test_models_health_metrics(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["models"]["second-model"] = {"sizes": "qwen-image", "routes": ["placeholder"], "description": "two"}
    server, client = await start_proxy(cfg)
    page = await client.models.list()
    assert [m.id for m in page.data] == [MODEL, "second-model"]
    assert all(m.object == "model" and m.owned_by for m in page.data)
    model = await client.models.retrieve("second-model")
    assert model.id == "second-model"
    with pytest.raises(NotFoundError):
        await client.models.retrieve("missing-model")

    status, headers, text = await call(server, "GET", "/health", headers={"X-Request-Id": "req-77"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert headers["X-Request-Id"] == "req-77"
    health = json.loads(text)
    assert health["status"] == "ok" and set(health["models"]) == {MODEL, "second-model"}

    r = await client.images.generate(model=MODEL, prompt="x", size="16x16")
    await download(r.data[0].url)
    status, headers, text = await call(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert "qip_requests_total" in text
    assert any(line.startswith("qip_requests_total{") and f'model="{MODEL}"' in line and 'status="200"' in line
               for line in text.splitlines())
    # Image ids never become label values (unbounded cardinality).
    assert r.data[0].url.rsplit("/", 1)[1] not in text


async def test_stream(start_proxy, tmp_path):
    _, client = await start_proxy(base_config(tmp_path))
    stream = await client.images.generate(model=MODEL, prompt="a kite", size="48x32", n=2, stream=True,
                                          extra_body={"seed": 9})
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    images = [base64.b64decode(e.b64_json) for e in events]
    assert len(set(images)) == 2
    for e, data in zip(events, images, strict=True):
        im = Image.open(io.BytesIO(data))
        assert (im.format, im.size) == ("PNG", (48, 32))
        assert e.size == "48x32" and e.output_format == "png"
    with pytest.raises(BadRequestError):
        await client.images.generate(model=MODEL, prompt="a kite", size="nope", stream=True)  # type: ignore[arg-type]


async def test_stream_from_upstream(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream()
    cfg = upstream_config(tmp_path, {"a": openai_provider(up, up.api_key)}, ["a"])
    _, client = await start_proxy(cfg)
    stream = await client.images.generate(model="qwen-image", prompt="p", stream=True, extra_body={"seed": 4})
    events = [event async for event in stream]
    assert len(events) == 1 and events[0].type == "image_generation.completed"
    im = Image.open(io.BytesIO(base64.b64decode(events[0].b64_json)))
    assert im.convert("RGB").getpixel((0, 0)) == seed_colour(4)
    assert "stream" not in up.image_bodies[0] or up.image_bodies[0]["stream"] is False
