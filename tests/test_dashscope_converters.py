"""The DashScope provider's pure converters: sizes, bodies, answers, errors (no network)."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from proxy.config import ConfigError, parse_config
from proxy.errors import InvalidRequest, RateLimited, UpstreamError, UpstreamRefused, UpstreamTimeout
from proxy.providers import build_providers
from proxy.providers.dashscope import DEFAULT_BASE_URL, DashScopeProvider
from proxy.providers.dashscope_convert import (
    DEFAULT_SIZES,
    edit_max_images,
    edit_size,
    error_from_payload,
    from_native,
    native_seed,
    native_size,
    parse_sizes,
    resolve_mode,
    task_error,
    task_id_of,
    task_status_of,
    to_native,
    to_native_edit,
)
from proxy.request import InputImage, build_request, parse_body

NEWER_SIZES = parse_sizes(["1664*928", "1472*1104", "1328*1328", "1104*1472", "928*1664"])


def request(width=1365, height=768, **fields):
    fields.setdefault("prompt", "a cat")
    return build_request(parse_body(fields), "qwen-image", width, height)


# --- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("wh", "expected"), [
    ((1365, 768), (1664, 928)),   # 16:9
    ((1024, 1024), (1328, 1328)),
    ((768, 1365), (928, 1664)),
    ((1183, 887), (1472, 1140)),  # 4:3
    ((887, 1182), (1140, 1472)),
    ((1254, 836), (1472, 1140)),  # 3:2 (log 0.405) is nearer 4:3 (0.256) than 16:9 (0.584)
    ((836, 1254), (1140, 1472)),
    ((4000, 500), (1664, 928)),   # anything wider: the widest
    ((64, 64), (1328, 1328)),     # scale does not matter, only the shape
    ((1664, 928), (1664, 928)),   # an allowed size is itself
])
def test_nearest_default_size(wh, expected):
    assert native_size(*wh) == expected


def test_newer_sizes_and_tie_on_pixels():
    assert native_size(1183, 887, NEWER_SIZES) == (1472, 1104)
    assert native_size(887, 1182, NEWER_SIZES) == (1104, 1472)
    # Two sizes of one shape: the one nearer in pixel count.
    sizes = parse_sizes(["64*64", "1328*1328", "512x512"])
    assert native_size(70, 70, sizes) == (64, 64)
    assert native_size(1000, 1000, sizes) == (1328, 1328)
    assert native_size(500, 500, sizes) == (512, 512)


def test_parse_sizes():
    assert parse_sizes(None) == DEFAULT_SIZES
    assert parse_sizes(["1664*928", " 928 x 1664 "]) == ((1664, 928), (928, 1664))
    for bad in (["1664:928"], ["big"], [], ["0*5"]):
        with pytest.raises(ValueError, match="sizes"):
            parse_sizes(bad)


# --- to_native -----------------------------------------------------------------------------------------


def test_async_body_minimal():
    assert to_native(request(), "qwen-image") == {
        "model": "qwen-image", "input": {"prompt": "a cat"}, "parameters": {"size": "1664*928", "n": 1}}


def test_sync_body_minimal():
    assert to_native(request(1024, 1024), "qwen-image-max", mode="sync") == {
        "model": "qwen-image-max",
        "input": {"messages": [{"role": "user", "content": [{"text": "a cat"}]}]},
        "parameters": {"size": "1328*1328", "n": 1},
    }


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_field_renamed_or_dropped(mode):
    req = request(negative_prompt="blurry", seed=7, prompt_enhancement="off", cfg_scale=4.0,
                  num_inference_steps=20, loras=[{"path": "owner/lora", "scale": 0.5}], output_format="jpeg",
                  output_compression=50, quality="hd", style="vivid", user="u1",
                  watermark=True, go_fast=True, acceleration="high", enable_safety_checker=False,
                  some_unknown_field={"x": 1})
    body = to_native(req, "qwen-image", mode=mode)
    assert body["parameters"] == {"size": "1664*928", "n": 1, "negative_prompt": "blurry", "seed": 7,
                                  "prompt_extend": False, "watermark": True}
    text = repr(body)
    for absent in ("cfg", "guidance", "steps", "lora", "jpeg", "compression", "quality", "vivid", "u1",
                   "go_fast", "acceleration", "safety", "some_unknown_field"):
        assert absent not in text, absent


@pytest.mark.parametrize(("value", "expected"), [("on", True), ("off", False), (True, True), (False, False)])
def test_prompt_enhancement_to_prompt_extend(value, expected):
    assert to_native(request(prompt_enhancement=value), "m")["parameters"]["prompt_extend"] is expected
    assert "prompt_extend" not in to_native(request(), "m")["parameters"]


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", True), ("False", False)])
def test_watermark(value, expected):
    assert to_native(request(watermark=value), "m")["parameters"]["watermark"] is expected


@pytest.mark.parametrize("value", ["yes", 1, None, {"a": 1}])
def test_watermark_not_a_boolean(value):
    with pytest.raises(InvalidRequest) as e:
        to_native(request(watermark=value), "m")
    assert e.value.param == "watermark"


@pytest.mark.parametrize(("seed", "expected"), [(0, 0), (2**31 - 1, 2**31 - 1), (2**31, 0), (2**32 - 1, 2**31 - 1),
                                                (3_000_000_000, 3_000_000_000 - 2**31)])
def test_seed_wraps_into_dashscope_range(seed, expected):
    assert native_seed(seed) == expected
    assert to_native(request(seed=seed), "m")["parameters"]["seed"] == expected


def test_n_is_sent_as_asked():
    assert to_native(request(n=3), "m")["parameters"]["n"] == 3


def test_limits_checked_before_any_call():
    to_native(request(prompt="x" * 800, negative_prompt="y" * 500), "m")
    with pytest.raises(InvalidRequest) as e:
        to_native(request(prompt="x" * 801), "m")
    assert e.value.param == "prompt" and "800" in e.value.message and "801" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        to_native(request(negative_prompt="y" * 501), "m", mode="sync")
    assert e.value.param == "negative_prompt" and "500" in e.value.message


def test_custom_sizes_reach_the_body():
    sizes = parse_sizes(["104*58", "83*83", "58*104"])
    assert to_native(request(80, 64), "m", sizes=sizes)["parameters"]["size"] == "83*83"
    assert to_native(request(112, 64), "m", sizes=sizes)["parameters"]["size"] == "104*58"


def test_resolve_mode():
    assert resolve_mode("auto", "qwen-image") == "async"
    assert resolve_mode("auto", "qwen-image-plus") == "async"
    assert resolve_mode("auto", "qwen-image-max") == "sync"
    assert resolve_mode("sync", "qwen-image") == "sync"
    assert resolve_mode("async", "qwen-image-max") == "async"


# --- from_native -------------------------------------------------------------------------------------


def test_sync_answer():
    payload = {"output": {"choices": [{"finish_reason": "stop", "message": {
        "role": "assistant", "content": [{"image": "https://oss.example/a.png?Expires=1"}]}}]},
        "usage": {"width": 1664, "height": 928, "image_count": 1}, "request_id": "r"}
    (img,) = from_native(payload)
    assert (img.url, img.width, img.height, img.revised_prompt) == ("https://oss.example/a.png?Expires=1", 1664, 928,
                                                                   None)
    assert img.data is None and img.b64 is None


def test_sync_answer_with_text_is_the_revised_prompt():
    payload = {"output": {"choices": [{"message": {"content": [{"text": "a fluffy cat"}, {"image": "https://x/1"}]}}]}}
    (img,) = from_native(payload)
    assert img.revised_prompt == "a fluffy cat" and img.width is None


def test_task_answer():
    payload = {"request_id": "r", "output": {"task_id": "t", "task_status": "SUCCEEDED", "results": [
        {"orig_prompt": "a cat", "actual_prompt": "a cat on a sofa, soft light", "url": "https://oss/1.png"},
        {"orig_prompt": "a cat", "url": "https://oss/2.png"}]}, "usage": {"image_count": 2}}
    images = from_native(payload)
    assert [i.url for i in images] == ["https://oss/1.png", "https://oss/2.png"]
    assert [i.revised_prompt for i in images] == ["a cat on a sofa, soft light", None]
    assert task_status_of(payload) == "SUCCEEDED"


def test_task_result_that_failed_inspection():
    payload = {"output": {"task_status": "SUCCEEDED", "results": [
        {"code": "DataInspectionFailed", "message": "Output data may contain inappropriate content."}]}}
    with pytest.raises(InvalidRequest) as e:
        from_native(payload)
    assert "inappropriate" in e.value.message and e.value.code == "content_policy_violation"


@pytest.mark.parametrize("payload", [
    None, [], {}, {"output": None}, {"output": {}}, {"output": {"choices": []}},
    {"output": {"choices": [{"message": {"content": [{"text": "no image"}]}}]}},
    {"output": {"choices": [{"message": None}]}},
    {"output": {"results": []}}, {"output": {"results": [{"orig_prompt": "p"}]}}, {"output": {"results": ["x"]}},
])
def test_malformed_answers_are_upstream_errors(payload):
    with pytest.raises(UpstreamError) as e:
        from_native(payload)
    assert e.value.retryable and not isinstance(e.value, InvalidRequest)


def test_task_id_and_status():
    assert task_id_of({"output": {"task_status": "PENDING", "task_id": "abc"}}) == "abc"
    assert task_status_of({"output": {"task_status": "running"}}) == "RUNNING"
    for bad in ({}, {"output": {"task_status": "PENDING"}}, {"output": {"task_id": ""}}):
        with pytest.raises(UpstreamError):
            task_id_of(bad)
    with pytest.raises(UpstreamError):
        task_status_of({"output": {}})


# --- errors --------------------------------------------------------------------------------------------


def err(status, code, message="m"):
    return error_from_payload(status, {"code": code, "message": message, "request_id": "r"}, retry_after=None)


def test_no_error():
    assert error_from_payload(200, {"output": {"task_id": "t"}}) is None
    assert error_from_payload(200, {"output": {}, "code": ""}) is None


@pytest.mark.parametrize(("status", "code", "cls", "retry_same"), [
    (400, "InvalidParameter", InvalidRequest, None),
    (400, "DataInspectionFailed", InvalidRequest, None),
    (400, "InternalError.Algo.InvalidParameter", InvalidRequest, None),
    (400, "SomethingNew", InvalidRequest, None),
    (200, "InvalidParameter", InvalidRequest, None),       # an error that arrives as HTTP 200
    (401, "InvalidApiKey", UpstreamRefused, False),
    (403, "AccessDenied", UpstreamRefused, False),
    (400, "Arrearage", UpstreamRefused, False),
    (404, "ModelNotFound", UpstreamRefused, False),
    (429, "Throttling", RateLimited, True),
    (429, "Throttling.RateQuota", RateLimited, True),
    (200, "Throttling.AllocationQuota", RateLimited, True),
    (500, "InternalError", UpstreamError, True),
    (200, "InternalError", UpstreamError, True),
    (502, "", UpstreamError, True),
    (504, "RequestTimeOut", UpstreamTimeout, True),
])
def test_error_mapping(status, code, cls, retry_same):
    e = err(status, code, "the vendor's reason")
    assert type(e) is cls
    assert "the vendor's reason" in e.message
    if cls is InvalidRequest:
        assert e.status == 400 and not e.retryable
    else:
        assert e.retryable and e.retry_same_route is retry_same


def test_auth_error_message():
    e = err(401, "InvalidApiKey", "Invalid API-key provided.")
    assert e.message.startswith("upstream authentication failed") and "InvalidApiKey" in e.message
    assert e.status == 502


def test_rate_limit_keeps_retry_after():
    e = error_from_payload(429, {"code": "Throttling.RateQuota", "message": "slow"}, retry_after=3.0)
    assert isinstance(e, RateLimited) and e.retry_after == 3.0 and e.headers["Retry-After"] == "3"


def test_non_json_error_body():
    e = error_from_payload(500, None)
    assert type(e) is UpstreamError and "HTTP 500" in e.message


@pytest.mark.parametrize(("message", "param"), [
    ("The size is not match the allowed size ['1664*928']", "size"),
    ("Range of negative_prompt length should be [0, 500]", "negative_prompt"),
    ("input.prompt is required", "prompt"),
    ("seed should be in [0, 2147483647]", "seed"),
    ("prompt_extend should be a boolean", "prompt_enhancement"),
    ("Model not exist.", None),
])
def test_invalid_parameter_names_the_field(message, param):
    e = err(400, "InvalidParameter", message)
    assert e.param == param


def test_data_inspection_is_a_content_policy_error():
    e = err(400, "DataInspectionFailed", "Input data may contain inappropriate content.")
    assert e.code == "content_policy_violation" and e.param is None


@pytest.mark.parametrize(("output", "cls"), [
    ({"task_status": "FAILED", "code": "DataInspectionFailed", "message": "Output data may contain x"},
     InvalidRequest),
    ({"task_status": "FAILED", "code": "InvalidParameter", "message": "size bad"}, InvalidRequest),
    ({"task_status": "FAILED", "code": "InternalError", "message": "algo crashed"}, UpstreamError),
    ({"task_status": "FAILED"}, UpstreamError),
    ({"task_status": "FAILED", "code": "Throttling", "message": "busy"}, RateLimited),
    ({"task_status": "CANCELED"}, UpstreamError),
    ({"task_status": "UNKNOWN"}, UpstreamError),
])
def test_task_errors(output, cls):
    e = task_error(output)
    assert type(e) is cls
    if cls is not InvalidRequest:
        assert e.retryable
    if output.get("message"):
        assert output["message"] in e.message


# --- the provider's options ---------------------------------------------------------------------------


def config(**options):
    return {"providers": {"ds": {"kind": "dashscope", **options}},
            "size_tables": {"t": {"tiers": {"1K": {"1:1": "1024x1024"}}}},
            "models": {"qwen-image": {"sizes": "t", "routes": [{"provider": "ds"}]}}}


def test_defaults_and_missing_key():
    cfg = parse_config(config(api_key="${DASHSCOPE_API_KEY}"), env={})
    (provider,) = build_providers(cfg).values()
    assert isinstance(provider, DashScopeProvider)
    assert provider.base_url == DEFAULT_BASE_URL and provider.mode == "auto" and provider.sizes == DEFAULT_SIZES
    assert provider.capabilities.max_images_per_call == 1
    assert provider.capabilities.output_formats == frozenset({"png"})
    assert provider.state == "missing_key"
    assert "DASHSCOPE_API_KEY" in provider.unavailable_reason
    assert provider.trusted_origin == "https://dashscope-intl.aliyuncs.com"


def test_options_are_typed_and_checked():
    cfg = parse_config(config(api_key="k", base_url="http://127.0.0.1:9/api/v1/", mode="sync",
                              sizes=["64*64"], poll_interval="0.01", max_images_per_call=2, timeout=30), env={})
    (provider,) = build_providers(cfg).values()
    assert provider.unavailable_reason is None
    assert provider.base_url == "http://127.0.0.1:9/api/v1" and provider.trusted_origin == "http://127.0.0.1:9"
    assert provider.sizes == ((64, 64),) and provider.poll_interval == 0.01 and provider.default_timeout == 30
    assert provider.capabilities.max_images_per_call == 2
    with pytest.raises(ConfigError, match="mode"):
        parse_config(config(api_key="k", mode="fast"), env={})
    with pytest.raises(ConfigError, match="did you mean 'poll_interval'"):
        parse_config(config(api_key="k", poll_intervall=1), env={})
    with pytest.raises(ConfigError, match="sizes"):
        build_providers(parse_config(config(api_key="k", sizes=["huge"]), env={}))


# --- edits -------------------------------------------------------------------------------------------


def edit_request(count=1, width=1183, height=887, **fields):
    images = tuple(InputImage(bytes([i]) * 8, "webp", 640, 480) for i in range(count))
    return replace(request(width, height, **fields), images=images)


def uri(i: int) -> str:
    return "data:image/webp;base64," + base64.b64encode(bytes([i]) * 8).decode()


def test_edit_body():
    req = edit_request(3, n=4, seed=2**31 + 5, negative_prompt="blur", prompt_enhancement="off", watermark="true",
                       cfg_scale=3.0, num_inference_steps=20, loras=[{"path": "owner/l"}], go_fast=True, mystery=1)
    assert to_native_edit(req, "qwen-image-edit-plus") == {
        "model": "qwen-image-edit-plus",
        "input": {"messages": [{"role": "user", "content": [
            {"image": uri(0)}, {"image": uri(1)}, {"image": uri(2)}, {"text": "a cat"}]}]},
        "parameters": {"size": "1183*887", "n": 4, "seed": 5, "negative_prompt": "blur", "prompt_extend": False,
                       "watermark": True},
    }


@pytest.mark.parametrize(("model", "wh", "size"), [
    ("qwen-image-edit-plus", (1183, 887), "1183*887"),
    ("qwen-image-edit-plus-2025-12-15", (512, 2048), "512*2048"),
    ("qwen-image-edit-max", (1024, 1024), "1024*1024"),
    ("qwen-image-edit-plus", (80, 64), None),      # below what it takes: follows the input
    ("qwen-image-edit-plus", (2049, 1024), None),
    ("qwen-image-edit", (1024, 1024), None),       # no custom size documented
    ("some-other-edit", (1024, 1024), None),
])
def test_edit_size_only_where_documented(model, wh, size):
    assert edit_size(edit_request(1, *wh), model) == size
    assert to_native_edit(edit_request(1, *wh), model)["parameters"].get("size") == size


@pytest.mark.parametrize(("model", "most"), [
    ("qwen-image-edit", 1), ("qwen-image-edit-2025-08-19", 1), ("qwen-image-edit-plus", 3),
    ("qwen-image-edit-plus-2025-10-30", 3), ("qwen-image-edit-max", 3), ("qwen-image-2.0", None),
])
def test_edit_max_images(model, most):
    assert edit_max_images(model) == most


def test_too_many_images_refuse_the_route():
    with pytest.raises(UpstreamRefused, match="at most 1 input image") as e:
        to_native_edit(edit_request(2), "qwen-image-edit")
    assert not e.value.retry_same_route
    with pytest.raises(UpstreamRefused, match="at most 3"):
        to_native_edit(edit_request(4), "qwen-image-edit-plus")
    assert len(to_native_edit(edit_request(4), "unknown-edit")["input"]["messages"][0]["content"]) == 5


def test_edit_limits_checked_before_any_call():
    with pytest.raises(InvalidRequest) as e:
        to_native_edit(edit_request(1, prompt="x" * 801), "qwen-image-edit-plus")
    assert e.value.param == "prompt"


def test_edit_capabilities():
    caps = DashScopeProvider("ds", {"api_key": "k"}).capabilities
    assert caps.edits is True and caps.masks is False
