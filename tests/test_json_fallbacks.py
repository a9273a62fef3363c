"""The JSON of an image call goes through pydantic_core (proxy.http.jsonbytes); what it refuses goes through
the standard library's json as before: a lone surrogate in a prompt or an upstream's revised prompt, an
answer with a byte order mark. Each test here takes one fallback and would fail without it."""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import json

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from proxy.api.generations import body_parts, dumps_with_b64
from proxy.config import RouteConfig
from proxy.http import jsonbytes
from proxy.providers.base import ProviderContext, json_or_none
from proxy.providers.openai_compat import OpenAICompatProvider
from proxy.request import build_request, parse_body

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES

LONE = "a \ud800 cat"  # a lone surrogate: JavaScript strings can hold one, UTF-8 cannot
BOM = b"\xef\xbb\xbf"


def png_b64(size=(8, 8)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def request(**fields):
    fields.setdefault("prompt", "a cat")
    return build_request(parse_body(fields), "qwen-image", 8, 8)


# ---- jsonbytes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [
    {"prompt": "a cat", "n": 1, "seed": 2**70, "cfg_scale": 3.5, "flag": False, "none": None, "list": [1, "x"]},
    {"prompt": "é \u2028 </script> \U0001f600", "nested": {"a": [{"b": -0.0}]}},
    {"x": float("nan"), "y": float("inf"), "z": -float("inf")},  # as json.dumps writes them
])
def test_dumps_is_the_same_json_values(value):
    text = jsonbytes.dumps(value)
    assert isinstance(text, bytes)
    got = json.loads(text)
    assert json.dumps(got, sort_keys=True) == json.dumps(value, sort_keys=True)


def test_dumps_writes_a_lone_surrogate_as_json_dumps_does():
    value = {"prompt": LONE}
    assert jsonbytes.dumps(value) == json.dumps(value).encode()  # its escape: ASCII, valid JSON
    assert json.loads(jsonbytes.dumps(value)) == value


@pytest.mark.parametrize("raw", [
    BOM + b'{"data": []}',                               # from_json refuses a byte order mark
    b'{"revised_prompt": "a \\ud800 cat"}',              # ... a lone surrogate's escape
    b'{"revised_prompt": "a \xed\xa0\x80 cat"}',         # ... a surrogate written as (not-quite) UTF-8
    "{\"a\": \"\u00e9\"}".encode("utf-16"),              # ... UTF-16 text
    b"[" * 300 + b"]" * 300,                             # ... nesting over 200 levels
    b'{"a": NaN, "b": -Infinity, "c": 1e400}',
    b'{"a": 1, "a": 2}',
])
def test_loads_is_json_loads(raw):
    assert repr(jsonbytes.loads(raw)) == repr(json.loads(raw))
    assert repr(json_or_none(raw)) == repr(json.loads(raw))


@pytest.mark.parametrize("raw", [b"", b"not json", b'{"a": 1,}', b'{"a": "\x01"}', b'"\xff"', b"1" * 5000])
def test_what_json_loads_refuses_is_not_json(raw):
    with pytest.raises(ValueError):
        json.loads(raw)
    with pytest.raises(ValueError):
        jsonbytes.loads(raw)
    assert json_or_none(raw) is None


# ---- the response body ----------------------------------------------------------------------------------


def test_body_with_a_lone_surrogate_in_a_revised_prompt():
    image = memoryview(b"xx" + b"QUJD" * 10 + b"yy")[2:-2]
    payload = {"created": 1, "data": [{"b64_json": image, "revised_prompt": LONE}], "size": "8x8"}
    parts = body_parts(dict(payload, data=[dict(payload["data"][0])]))
    assert any(part is image for part in parts)  # the image still handed on as it came
    body = b"".join(parts)
    assert body.isascii()  # json.dumps's escapes
    assert json.loads(body) == {"created": 1, "data": [{"b64_json": "QUJD" * 10, "revised_prompt": LONE}],
                                "size": "8x8"}


def test_body_is_utf8_json_with_the_images_where_they_belong():
    payload = {"created": 1, "data": [{"b64_json": "QUJD", "revised_prompt": "é"}, {"url": "http://x/1.png",
               "revised_prompt": "b"}, {"b64_json": b"RUZH", "revised_prompt": "c"}], "seeds": [1, 2, 3]}
    body = dumps_with_b64(json.loads(json.dumps(payload, default=bytes.decode)))
    assert "é".encode() in body
    assert json.loads(body) == json.loads(json.dumps(payload, default=bytes.decode))


# ---- the upstream call ----------------------------------------------------------------------------------


async def start_upstream(aiohttp_server, answer: bytes):
    """An OpenAI-compatible upstream: records each request's raw body and Content-Type, answers `answer`."""
    seen: list[tuple[str, bytes]] = []

    async def generations(req: web.Request) -> web.Response:
        seen.append((req.headers.get("Content-Type", ""), await req.read()))
        return web.Response(body=answer, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    server = await aiohttp_server(app)
    return str(server.make_url("/v1")), seen


async def generate(base_url: str, req):
    provider = OpenAICompatProvider("up", {"base_url": base_url, "api_key": "k"})
    async with aiohttp.ClientSession() as http:
        await provider.start(ProviderContext(http=http))
        return await provider.generate(req, RouteConfig(provider="up"))


async def test_the_upstream_gets_json_with_the_same_values(aiohttp_server):
    url, seen = await start_upstream(aiohttp_server, json.dumps({"data": [{"b64_json": png_b64()}]}).encode())
    req = request(prompt="un chat \u00e9 \U0001f600", seed=3, negative_prompt="blur", custom=[1, {"a": None}])
    await generate(url, req)
    (content_type, raw), = seen
    assert content_type == "application/json"
    assert json.loads(raw) == {"model": "qwen-image", "prompt": "un chat \u00e9 \U0001f600", "n": 1, "size": "8x8",
                               "response_format": "b64_json", "seed": 3, "negative_prompt": "blur",
                               "custom": [1, {"a": None}]}


async def test_a_prompt_with_a_lone_surrogate_reaches_the_upstream(aiohttp_server):
    """The HTTP API refuses one (400), but a caller of the provider (a job, the CLI) may hand one in: it
    goes out as json.dumps writes it, as before."""
    url, seen = await start_upstream(aiohttp_server, json.dumps({"data": [{"b64_json": png_b64()}]}).encode())
    images = await generate(url, dataclasses.replace(request(), prompt=LONE))
    assert len(images) == 1
    (content_type, raw), = seen
    assert content_type == "application/json"
    assert json.loads(raw)["prompt"] == LONE


@pytest.mark.parametrize("prefix", [b"", BOM])
async def test_an_answer_the_fast_parser_refuses_still_serves(aiohttp_server, prefix):
    answer = prefix + json.dumps({"data": [{"b64_json": png_b64(), "revised_prompt": LONE}]}).encode()
    url, _ = await start_upstream(aiohttp_server, answer)
    (image,) = await generate(url, request())
    assert image.revised_prompt == LONE
    assert base64.b64decode(image.b64) == base64.b64decode(png_b64())


async def test_a_lone_surrogate_in_a_revised_prompt_end_to_end(start_proxy, tmp_path, aiohttp_server):
    """Through the proxy with the official client: the answer is parsed and written by the fallbacks."""
    b64 = png_b64((64, 64))
    url, _ = await start_upstream(aiohttp_server, BOM + json.dumps(
        {"created": 1, "data": [{"b64_json": b64, "revised_prompt": LONE}]}).encode())
    cfg = base_config(tmp_path)
    cfg["providers"]["up"] = {"kind": "openai", "base_url": url, "api_key": "k"}
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": ["up"]}
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="a cat", size="64x64", response_format="b64_json")
    assert r.data[0].revised_prompt == LONE
    assert r.data[0].b64_json == b64
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert (im.format, im.size) == ("PNG", (64, 64))
