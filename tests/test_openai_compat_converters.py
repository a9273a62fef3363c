"""The OpenAI-compatible provider's pure converters: to_native, from_native, error_from_status, redact."""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from PIL import Image

from proxy import parse_config
from proxy.config import RouteConfig
from proxy.errors import (
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    redact,
    retry_after_from_headers,
)
from proxy.media.output import decode_b64
from proxy.providers.base import ProviderContext
from proxy.providers.openai_compat import OpenAICompatProvider, error_from_status, from_native, to_native
from proxy.request import LoraRef, build_request, parse_body

ALL = frozenset({"png", "jpeg", "webp"})


def png_b64(size=(8, 8)) -> str:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def request(width=1365, height=768, **fields):
    fields.setdefault("prompt", "a cat")
    return build_request(parse_body(fields), "qwen-image", width, height)


# --- to_native ---------------------------------------------------------------------------------------


def test_minimal_body():
    body = to_native(request(), "qwen-image-upstream", output_formats=ALL)
    assert body == {"model": "qwen-image-upstream", "prompt": "a cat", "n": 1, "size": "1365x768",
                    "response_format": "b64_json"}


def test_size_is_the_resolved_pixels_not_the_client_text():
    body = to_native(request(width=1365, height=768, size="16:9", aspect_ratio="4:3", resolution="1K"), "m",
                     output_formats=ALL)
    assert body["size"] == "1365x768"


def test_all_optional_fields_are_sent():
    req = request(n=3, seed=42, negative_prompt="blurry", quality="high", background="opaque", style="vivid",
                  moderation="low", user="u1", input_fidelity="high", cfg_scale=4.0, num_inference_steps=30,
                  prompt_enhancement=True)
    body = to_native(req, "m", output_formats=ALL)
    assert body["n"] == 3
    assert body["seed"] == 42
    assert body["negative_prompt"] == "blurry"
    assert (body["quality"], body["background"], body["style"], body["moderation"], body["user"]) == (
        "high", "opaque", "vivid", "low", "u1")
    assert body["input_fidelity"] == "high"
    assert body["cfg_scale"] == 4.0
    assert body["num_inference_steps"] == 30
    assert body["prompt_enhancement"] == "on"


def test_seed_zero_is_sent():
    assert to_native(request(seed=0), "m", output_formats=ALL)["seed"] == 0


def test_unset_fields_are_not_sent():
    body = to_native(request(), "m", output_formats=ALL)
    for name in ("seed", "negative_prompt", "cfg_scale", "loras", "output_format", "output_compression",
                 "prompt_enhancement", "stream", "partial_images", "aspect_ratio", "resolution"):
        assert name not in body


def test_extras_pass_through_but_cannot_override_core_fields():
    req = request(watermark=False, acceleration="high", model_variant="x")
    req = dataclasses.replace(req, extra={**req.extra, "model": "evil", "prompt": "evil", "n": 9, "size": "1x1",
                                          "response_format": "url"})
    body = to_native(req, "qwen-image", output_formats=ALL)
    # Unknown fields pass through; fields of another vendor (Alibaba's, fal's) do not.
    assert "watermark" not in body and "acceleration" not in body
    assert body["model_variant"] == "x"
    assert (body["model"], body["prompt"], body["n"], body["size"], body["response_format"]) == (
        "qwen-image", "a cat", 1, "1365x768", "b64_json")


def test_response_format_can_be_url():
    assert to_native(request(), "m", output_formats=ALL, response_format="url")["response_format"] == "url"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_format_sent_when_the_upstream_makes_it(fmt):
    body = to_native(request(output_format=fmt), "m", output_formats=ALL)
    assert body["output_format"] == fmt


@pytest.mark.parametrize("fmt", ["gif", "avif"])
def test_output_format_not_sent_when_the_proxy_converts(fmt):
    body = to_native(request(output_format=fmt, output_compression=50), "m", output_formats=ALL)
    assert "output_format" not in body
    assert "output_compression" not in body


def test_output_compression_rides_with_a_native_format_only():
    assert to_native(request(output_format="jpeg", output_compression=40), "m",
                     output_formats=ALL)["output_compression"] == 40
    body = to_native(request(output_format="webp", output_compression=40), "m", output_formats=frozenset({"png"}))
    assert "output_format" not in body and "output_compression" not in body
    # no format asked: the upstream's own default format stays, no compression sent
    assert "output_compression" not in to_native(request(output_compression=40), "m", output_formats=ALL)


def test_loras_as_plain_dicts():
    req = request(loras=[{"path": "https://h/a.safetensors", "scale": 0.7}, {"path": "b"}])
    assert req.loras[0] == LoraRef(path="https://h/a.safetensors", scale=0.7)
    body = to_native(req, "m", output_formats=ALL)
    assert body["loras"] == [{"path": "https://h/a.safetensors", "scale": 0.7}, {"path": "b", "scale": 1.0}]
    assert all(type(item) is dict for item in body["loras"])


def test_body_is_json_serialisable():
    req = request(seed=1, loras='[{"path": "a"}]', watermark=True)
    assert json.loads(json.dumps(to_native(req, "m", output_formats=ALL)))["loras"] == [{"path": "a", "scale": 1.0}]


# --- from_native --------------------------------------------------------------------------------------


def test_b64_items():
    b64 = png_b64()
    images = from_native({"created": 1, "data": [{"b64_json": b64, "revised_prompt": "a red square"},
                                                 {"b64_json": b64}]}, request(), compression_sent=False)
    assert len(images) == 2
    assert images[0].b64 == b64  # kept as text: handed on without decoding when nothing changes
    assert images[0].data is None and images[0].url is None
    assert images[0].revised_prompt == "a red square"
    assert images[1].revised_prompt is None
    assert Image.open(io.BytesIO(decode_b64(images[0].b64))).size == (8, 8)


def test_url_items_and_metadata_ignored():
    payload = {"created": 1, "data": [{"url": "https://cdn.example/a.png", "revised_prompt": "r"}],
               "metadata": {"provider": "fal", "cost": 0.02}}
    images = from_native(payload, request(), compression_sent=False)
    assert [(i.url, i.data, i.b64, i.revised_prompt) for i in images] == [("https://cdn.example/a.png", None, None, "r")]


def test_b64_wins_over_url_when_both_are_there():
    b64 = png_b64()
    images = from_native({"data": [{"b64_json": b64, "url": "https://x/y.png"}]}, request(), compression_sent=False)
    assert images[0].b64 == b64 and images[0].url is None


@pytest.mark.parametrize("sent", [True, False])
def test_compression_applied_follows_what_was_sent(sent):
    images = from_native({"data": [{"url": "https://x/y.jpeg"}]}, request(), compression_sent=sent)
    assert images[0].compression_applied is sent


@pytest.mark.parametrize(
    "payload",
    [
        {"data": []},
        {"data": None},
        {"images": [{"url": "https://x"}]},
        {},
        [],
        None,
        "data",
        {"data": "https://x"},
        {"data": ["https://x"]},
        {"data": [{"revised_prompt": "no image"}]},
        {"data": [{"b64_json": "", "url": ""}]},
        {"data": [{"b64_json": 5}]},
        {"data": [{"url": "https://x"}, {}]},
    ],
)
def test_payloads_without_images_are_upstream_errors(payload):
    with pytest.raises(UpstreamError):
        from_native(payload, request(), compression_sent=False)


def test_undecodable_b64_is_an_upstream_error():
    with pytest.raises(UpstreamError):
        decode_b64("abc")


# --- error_from_status ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 422])
def test_client_errors_return_at_once_with_the_upstream_message(status):
    payload = {"error": {"message": "Your prompt was flagged", "type": "invalid_request_error",
                         "code": "CONTENT_POLICY_VIOLATION", "param": "prompt"}}
    err = error_from_status(status, payload, None)
    assert type(err) is InvalidRequest
    assert err.retryable is False
    assert err.status == 400
    assert err.param == "prompt"
    assert "Your prompt was flagged" in err.message
    assert str(status) in err.message


def test_error_code_used_when_there_is_no_message():
    err = error_from_status(400, {"error": {"code": "INVALID_REQUEST"}}, None)
    assert "INVALID_REQUEST" in err.message
    assert err.param is None


def test_error_as_a_plain_string_or_missing():
    assert "bad size" in error_from_status(400, {"error": "bad size"}, None).message
    err = error_from_status(400, None, None)
    assert type(err) is InvalidRequest and "HTTP 400" in err.message


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_fall_back(status):
    err = error_from_status(status, {"error": {"message": "Invalid API key", "code": "AUTHENTICATION_FAILED"}}, None)
    assert isinstance(err, UpstreamError) and not err.retry_same_route
    assert err.retryable is True
    assert err.status == 502  # the client's own key is fine: not a 401 for them
    assert "api_key" in err.message
    assert "Invalid API key" in err.message


@pytest.mark.parametrize("headers, expected, header", [
    ({"Retry-After": "7"}, 7.0, "7"), ({"Retry-After": "2.5"}, 2.5, "3"), ({}, None, None),
    ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, "1"),  # a date in the past: now
    ({"Retry-After": "nan"}, None, None), ({"Retry-After": "inf"}, None, None), ({"Retry-After": "-3"}, None, None),
    ({"retry-after-ms": "1500", "Retry-After": "9"}, 1.5, "2"),  # OpenAI's millisecond header wins
    ({"Retry-After": "soon"}, None, None),
])
def test_rate_limited_keeps_retry_after(headers, expected, header):
    retry_after = retry_after_from_headers(CIMultiDict(headers))
    err = error_from_status(429, {"error": {"message": "slow down", "code": "RATE_LIMITED"}}, retry_after)
    assert type(err) is RateLimited
    assert err.retryable is True
    assert err.status == 429
    assert err.retry_after == expected
    assert err.headers.get("Retry-After") == header
    assert "slow down" in err.message


@pytest.mark.parametrize("status", [500, 502, 503, 504, 520])
def test_server_errors_fall_back(status):
    err = error_from_status(status, {"error": {"message": "All providers exhausted",
                                               "code": "ALL_PROVIDERS_EXHAUSTED"}}, 5.0)
    assert type(err) is (UpstreamUnavailable if status == 503 else UpstreamError)
    assert err.retryable is True
    assert err.retry_after == 5.0  # honoured by the router before it retries the route
    assert str(status) in err.message


@pytest.mark.parametrize("status", [402, 404, 409])
def test_other_upstream_4xx_fall_back(status):
    # insufficient balance, model not found upstream: another route may serve
    err = error_from_status(status, {"error": {"message": "nope"}}, None)
    assert isinstance(err, UpstreamError) and not err.retry_same_route
    assert err.retryable is True


def test_408_is_a_timeout():
    err = error_from_status(408, None, None)
    assert type(err) is UpstreamTimeout
    assert err.retryable is True
    assert err.status == 504


# --- redaction ------------------------------------------------------------------------------------


def test_redact_removes_the_key():
    key = "sk-live-0123456789abcdef"
    text = f"Invalid key {key}; got Bearer {key}"
    out = redact(text, [key])
    assert key not in out
    assert out == "Invalid key [redacted]; got Bearer [redacted]"


def test_redact_ignores_empty_and_tiny_secrets():
    assert redact("a b c", ["", "a"]) == "a b c"
    assert redact("token abcd", ["abcd", ""]) == "token [redacted]"


async def test_provider_redacts_a_key_the_upstream_echoes(aiohttp_server):
    key = "lf-secret-key-123456"

    async def generations(request):
        assert request.headers["Authorization"] == f"Bearer {key}"
        body = await request.json()
        assert body["size"] == "1365x768"
        return web.json_response({"error": {"message": f"key {key} has no balance", "code": "INSUFFICIENT_BALANCE"}},
                                 status=402)

    app = web.Application()
    app.router.add_post("/v1/images/generations", generations)
    server = await aiohttp_server(app)
    provider = OpenAICompatProvider("up", {"base_url": str(server.make_url("/v1")), "api_key": key})
    async with aiohttp.ClientSession() as http:
        await provider.start(ProviderContext(http=http))
        with pytest.raises(UpstreamError) as e:
            await provider.generate(request(), RouteConfig(provider="up"))
    assert key not in e.value.message
    assert "[redacted]" in e.value.message
    assert "402" in e.value.message


# --- parse_answer: the image answer parsed without copying its base64 twice --------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from proxy.providers.openai_compat import parse_answer  # noqa: E402

# Text made of pieces that trip a naive cutter: quotes, escapes, and the key itself inside strings.
_texts = st.lists(st.sampled_from(list('ab "\\:{},\n\u00e9\u2603') + ['"b64_json"', '\\"b64_json\\": "']),
                  max_size=12).map("".join)
_b64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=", max_size=200)
_item = st.fixed_dictionaries({"b64_json": _b64}, optional={"revised_prompt": _texts, "url": _texts})
_answer = st.fixed_dictionaries({"data": st.lists(_item, max_size=5)},
                                optional={"created": st.integers(), "note": _texts, "b64_json": _texts})


@settings(max_examples=300, deadline=None)
@given(_answer, st.sampled_from([None, 2]))
def test_parse_answer_equals_json_loads_on_any_answer(answer, indent):
    raw = json.dumps(answer, indent=indent, ensure_ascii=indent is None).encode()
    assert parse_answer(raw) == json.loads(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | _texts.map(str.encode))
def test_parse_answer_never_raises(raw):
    got = parse_answer(raw)
    try:
        expected = json.loads(raw)
    except ValueError:
        return
    assert got == expected


def test_parse_answer_with_an_image_in_a_prompt():
    doc = {"data": [{"revised_prompt": 'say "b64_json": "AAAA"', "b64_json": "iVBORw0KGgo="}]}
    assert parse_answer(json.dumps(doc).encode()) == doc
    assert parse_answer(b"not json") is None


# --- split_answer: the same answer, each image left in the body as a memoryview (no copy) ----------

from proxy.providers.openai_compat import split_answer  # noqa: E402


def _as_text(doc):
    """split_answer's views as the strings json.loads gives."""
    for item in doc["data"]:
        if isinstance(item, dict) and isinstance(item.get("b64_json"), memoryview):
            item["b64_json"] = str(item["b64_json"], "utf-8")
    return doc


@settings(max_examples=300, deadline=None)
@given(_answer, st.sampled_from([None, 2]))
def test_split_answer_is_json_loads_or_declines(answer, indent):
    raw = json.dumps(answer, indent=indent, ensure_ascii=indent is None).encode()
    doc = split_answer(raw)
    if doc is None:  # the caller parses the whole body instead
        return
    images = [item["b64_json"] for item in doc["data"] if "b64_json" in item]
    assert all(isinstance(v, memoryview) and v.obj is raw for v in images)  # views of the body: no copy
    assert _as_text(doc) == json.loads(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | _texts.map(str.encode))
def test_split_answer_never_raises(raw):
    doc = split_answer(raw)
    if doc is not None:
        assert isinstance(doc, dict)


def test_an_unset_base_url_variable_is_named(tmp_path):
    # "no base_url configured" left the operator to guess that ${LUMEN_URL} was unset (the key's case named it).
    cfg = {"providers": {"up": {"kind": "openai", "base_url": "${LUMEN_URL}", "api_key": "k"}},
           "models": {"m": {"routes": ["up"]}}, "store": {"path": str(tmp_path / "images")}}
    config = parse_config(cfg, env={})
    provider = OpenAICompatProvider("up", config.providers["up"].options, config.missing_vars.get("up"))
    assert provider.unavailable_reason == "no base_url configured (unset in this provider: LUMEN_URL)"
    assert OpenAICompatProvider("up", {"api_key": "k"}).unavailable_reason == "no base_url configured"
