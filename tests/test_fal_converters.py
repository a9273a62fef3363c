"""fal.ai's pure converters: to_native, from_native, error mapping, status parsing, queue URLs."""

from __future__ import annotations

import base64
import copy
from dataclasses import replace

import pytest
from multidict import CIMultiDict

from proxy.config import ConfigError, parse_config
from proxy.errors import (
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.providers import build_providers
from proxy.providers.fal import FalProvider
from proxy.providers.fal_convert import (
    app_id,
    edit_image_field,
    error_from_status,
    failed_request_error,
    from_native,
    poll_state,
    queue_handle,
    requests_base,
    to_native,
    to_native_edit,
)
from proxy.request import InputImage, build_request, parse_body, with_route_defaults

from .fake_openai_upstream import SMALL_SIZES


def request(width=112, height=64, **fields):
    fields.setdefault("prompt", "a cat")
    return build_request(parse_body(fields), "qwen-image", width, height)


# ---- to_native --------------------------------------------------------------------------------------


def test_minimal_input():
    assert to_native(request()) == {"prompt": "a cat", "image_size": {"width": 112, "height": 64}, "num_images": 1}


def test_size_is_the_resolved_pixels():
    body = to_native(request(1365, 768, size="16:9", aspect_ratio="4:3", resolution="1K"))
    assert body["image_size"] == {"width": 1365, "height": 768}
    assert not {"size", "aspect_ratio", "resolution"} & set(body)


def test_fields_renamed_and_converted():
    req = request(n=3, seed=7, negative_prompt="blur", cfg_scale=3.5, num_inference_steps=20,
                  loras=[{"path": "https://h/a.safetensors", "scale": 0.7}, {"path": "owner/b"}],
                  prompt_enhancement="on", quality="high", style="vivid", user="u1")
    body = to_native(req)
    assert body == {
        "prompt": "a cat", "image_size": {"width": 112, "height": 64}, "num_images": 3, "seed": 7,
        "negative_prompt": "blur", "guidance_scale": 3.5, "num_inference_steps": 20,
        "loras": [{"path": "https://h/a.safetensors", "scale": 0.7}, {"path": "owner/b", "scale": 1.0}],
    }


def test_only_fal_extras_pass():
    req = request(acceleration="high", enable_safety_checker=False, sync_mode=True, use_turbo=True,
                  go_fast=True, watermark=True, lora_weights="x", something_unknown=1)
    body = to_native(req)
    assert (body["acceleration"], body["enable_safety_checker"], body["sync_mode"], body["use_turbo"]) == (
        "high", False, True, True)
    assert not {"go_fast", "watermark", "lora_weights", "something_unknown"} & set(body)


def test_extras_cannot_override_converted_fields():
    req = request(seed=3, num_images=4, image_size="square_hd", guidance_scale=9, prompt_extend=True)
    body = to_native(req)
    assert body["num_images"] == 1 and body["image_size"] == {"width": 112, "height": 64}
    assert "guidance_scale" not in body and "prompt_extend" not in body


def test_route_params_reach_fal():
    req = with_route_defaults(request(), {"acceleration": "regular", "num_inference_steps": 12})
    body = to_native(req)
    assert body["acceleration"] == "regular" and body["num_inference_steps"] == 12


@pytest.mark.parametrize(("fmt", "compression", "asked"), [
    (None, None, None), ("png", None, "png"), ("jpeg", None, "jpeg"), ("jpg", None, "jpeg"),
    ("jpeg", 40, "png"),  # fal has no quality setting: the proxy encodes the jpeg from a lossless png
    ("webp", None, "png"), ("webp", 50, "png"), ("avif", None, "png"), ("gif", None, "png"),
])
def test_output_format(fmt, compression, asked):
    fields = {"output_format": fmt} if fmt else {}
    if compression is not None:
        fields["output_compression"] = compression
    body = to_native(request(**fields))
    assert body.get("output_format") == asked
    assert "output_compression" not in body and "output_quality" not in body


# ---- from_native ------------------------------------------------------------------------------------


def output(n=2, seed=100, **extra):
    return {"images": [{"url": f"https://v3.fal.media/files/{i}.png", "content_type": "image/png",
                        "file_name": f"{i}.png", "file_size": 10, "width": 112, "height": 64} for i in range(n)],
            "seed": seed, "timings": {"inference": 1.0}, "has_nsfw_concepts": [False] * n,
            "prompt": "a cat, as fal used it", **extra}


def test_from_native():
    images = from_native(output(), request(n=2))
    assert [im.url for im in images] == ["https://v3.fal.media/files/0.png", "https://v3.fal.media/files/1.png"]
    assert [im.seed for im in images] == [100, 101]
    assert all((im.width, im.height, im.mime) == (112, 64, "image/png") for im in images)
    assert all(im.revised_prompt == "a cat, as fal used it" for im in images)
    assert all(im.data is None and im.b64 is None and not im.compression_applied for im in images)


def test_seed_wraps_and_may_be_missing():
    assert [im.seed for im in from_native(output(seed=2**32 - 1), request())] == [2**32 - 1, 0]
    payload = output()
    del payload["seed"], payload["prompt"]
    images = from_native(payload, request())
    assert [im.seed for im in images] == [None, None] and images[0].revised_prompt is None


def test_nsfw_image_is_returned_as_fal_made_it():
    images = from_native(output(n=1, has_nsfw_concepts=[True]), request())
    assert len(images) == 1 and images[0].url.endswith("0.png")


def test_data_uri_from_sync_mode_is_kept_as_url():
    payload = output(n=1)
    payload["images"][0]["url"] = "data:image/png;base64,iVBORw0KGgo="
    assert from_native(payload, request())[0].url.startswith("data:image/png;base64,")


@pytest.mark.parametrize("payload", [None, [], {}, {"images": []}, {"images": "x"}, {"images": [{}]},
                                     {"images": [{"url": ""}]}, {"images": ["https://x/y.png"]}])
def test_from_native_malformed(payload):
    with pytest.raises(UpstreamError) as e:
        from_native(payload, request())
    assert not isinstance(e.value, InvalidRequest)


# ---- errors -----------------------------------------------------------------------------------------


def test_422_names_the_param_in_the_proxys_words():
    detail = [{"loc": ["body", "guidance_scale"], "msg": "Input should be less than or equal to 20",
               "type": "less_than_equal"}]
    e = error_from_status(422, {"detail": detail})
    assert isinstance(e, InvalidRequest) and e.status == 400
    assert e.param == "cfg_scale"
    assert "guidance_scale: Input should be less than or equal to 20" in e.message and "HTTP 422" in e.message
    e = error_from_status(422, {"detail": [{"loc": ["body", "image_size", "width"], "msg": "too big", "type": "x"},
                                           {"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]})
    assert e.param == "size" and "image_size.width: too big; prompt: Field required" in e.message
    e = error_from_status(422, {"detail": [{"loc": ["body", "num_inference_steps"], "msg": "m", "type": "t"}]})
    assert e.param == "num_inference_steps"
    assert error_from_status(422, {"detail": "content policy violation"}).param is None


@pytest.mark.parametrize(("status", "payload", "headers", "cls", "retry_after"), [
    (401, {"detail": "Invalid Key"}, {}, UpstreamRefused, None),
    (403, {"detail": "User is locked"}, {}, UpstreamRefused, None),
    (402, {"detail": "Exhausted balance"}, {}, UpstreamRefused, None),
    (404, {"detail": "Application not found"}, {}, UpstreamRefused, None),
    (429, {"detail": "Too many requests"}, {"Retry-After": "4"}, RateLimited, 4.0),
    (504, {"detail": "Request timed out", "error_type": "request_timeout"}, {}, UpstreamTimeout, None),
    (500, {"detail": "boom"}, {"X-Fal-Error-Type": "startup_timeout"}, UpstreamTimeout, None),
    (503, {"detail": "no runners"}, {"Retry-After": "2"}, UpstreamUnavailable, 2.0),
    (500, {"detail": "runner crashed"}, {}, UpstreamError, None),
    (502, "not json", {}, UpstreamError, None),
    (500, {"detail": "bad input for the model"}, {"X-Fal-Retryable": "false"}, UpstreamRefused, None),
    (500, {"detail": "flaky"}, {"X-Fal-Retryable": "true"}, UpstreamError, None),
])
def test_error_mapping(status, payload, headers, cls, retry_after):
    e = error_from_status(status, payload, CIMultiDict(headers))
    assert type(e) is cls
    assert e.retryable and not isinstance(e, InvalidRequest)
    assert e.retry_after == retry_after
    assert f"HTTP {status}" in e.message
    if isinstance(payload, dict):
        assert payload["detail"] in e.message
    if cls is UpstreamRefused:
        assert not e.retry_same_route
    if status in (401, 403):
        assert "authentication failed" in e.message


def test_failed_request_error():
    e = failed_request_error({"status": "COMPLETED", "error": "CUDA out of memory", "error_type": "runner_server_error"})
    assert type(e) is UpstreamError and e.retryable
    assert "runner_server_error: CUDA out of memory" in e.message
    assert type(failed_request_error({"error": "slow", "error_type": "request_timeout"})) is UpstreamTimeout


def test_poll_state():
    assert poll_state({"status": "IN_QUEUE", "queue_position": 3}) == ("IN_QUEUE", False)
    assert poll_state({"status": "IN_PROGRESS", "logs": None}) == ("IN_PROGRESS", False)
    assert poll_state({"status": "COMPLETED", "metrics": {}}) == ("COMPLETED", False)
    assert poll_state({"status": "COMPLETED", "error": "x", "error_type": "y"}) == ("COMPLETED", True)
    for bad in (None, {}, {"status": "DONE"}, ["COMPLETED"]):
        with pytest.raises(UpstreamError):
            poll_state(bad)


# ---- model ids and queue URLs -------------------------------------------------------------------------


def test_app_id():
    assert app_id("fal-ai/qwen-image") == "fal-ai/qwen-image"
    assert app_id("qwen-image") == "fal-ai/qwen-image"
    assert app_id("/fal-ai/flux/dev/") == "fal-ai/flux/dev"
    for bad in ("fal-ai/../admin", "fal-ai/qwen image", "fal-ai/x?y=1", "fal-ai//x", "https://evil/x"):
        with pytest.raises(UpstreamRefused):
            app_id(bad)


def test_requests_base_like_fal_client():
    base = "https://queue.fal.run"
    assert requests_base(base, "fal-ai/qwen-image") == f"{base}/fal-ai/qwen-image/requests"
    assert requests_base(base, "fal-ai/flux/dev") == f"{base}/fal-ai/flux/requests"
    assert requests_base(base, "workflows/me/flow/sub") == f"{base}/workflows/me/flow/requests"


def submit_answer(host: str, app: str = "fal-ai/qwen-image", rid: str = "abc-123") -> dict:
    url = f"{host}/{app}/requests/{rid}"
    return {"request_id": rid, "status": "IN_QUEUE", "response_url": url, "status_url": f"{url}/status",
            "cancel_url": f"{url}/cancel"}


def test_queue_urls_followed_on_trusted_origins():
    h = queue_handle(submit_answer("http://127.0.0.1:9000"), "http://127.0.0.1:9000", "fal-ai/qwen-image")
    assert h.status_url == "http://127.0.0.1:9000/fal-ai/qwen-image/requests/abc-123/status"
    # fal's own queue host is trusted even behind a mirror base_url.
    h = queue_handle(submit_answer("https://queue.fal.run"), "https://mirror.example/fal", "fal-ai/qwen-image")
    assert h.cancel_url == "https://queue.fal.run/fal-ai/qwen-image/requests/abc-123/cancel"


def test_foreign_queue_urls_are_rebuilt_from_base_url():
    answer = submit_answer("http://169.254.169.254")
    h = queue_handle(answer, "https://mirror.example/fal", "fal-ai/flux/dev")
    base = "https://mirror.example/fal/fal-ai/flux/requests/abc-123"
    assert (h.request_id, h.response_url, h.status_url, h.cancel_url) == (
        "abc-123", base, f"{base}/status", f"{base}/cancel")
    answer = {"request_id": "abc-123", "status_url": "https://queue.fal.run.evil.com/x", "response_url": 5}
    h = queue_handle(answer, "https://queue.fal.run", "fal-ai/qwen-image")
    assert h.status_url == "https://queue.fal.run/fal-ai/qwen-image/requests/abc-123/status"
    assert h.response_url == "https://queue.fal.run/fal-ai/qwen-image/requests/abc-123"


@pytest.mark.parametrize("answer", [None, {}, {"request_id": ""}, {"request_id": "../../x"},
                                    {"request_id": 5}, {"request_id": "a b"}])
def test_submit_answer_without_request_id(answer):
    with pytest.raises(UpstreamError):
        queue_handle(answer, "https://queue.fal.run", "fal-ai/qwen-image")


# ---- the provider's options ----------------------------------------------------------------------------


def test_options_and_defaults(tmp_path):
    cfg = {"store": {"path": str(tmp_path)}, "size_tables": {"small": copy.deepcopy(SMALL_SIZES)},
           "providers": {"fal": {"kind": "fal", "api_key": "${FAL_KEY}"},
                         "fal2": {"kind": "fal", "api_key": "k", "base_url": "http://127.0.0.1:1/",
                                  "poll_interval": "0.01", "poll_max_interval": 0.5, "max_images_per_call": 2,
                                  "timeout": 30, "retries": 1}},
           "models": {"qwen-image": {"sizes": "small", "routes": [{"provider": "fal", "model": "fal-ai/qwen-image"}, "fal2"]}}}
    providers = build_providers(parse_config(cfg, env={}))
    fal, fal2 = providers["fal"], providers["fal2"]
    assert isinstance(fal, FalProvider)
    assert fal.base_url == "https://queue.fal.run" and fal.trusted_origin == "https://queue.fal.run"
    assert fal.unavailable_reason == "no API key (set FAL_KEY)" and fal.state == "missing_key"
    assert fal.capabilities.max_images_per_call == 4
    assert fal.capabilities.output_formats == frozenset({"png", "jpeg"})
    assert (fal.poll_interval, fal.poll_max_interval, fal.default_timeout) == (0.25, 2.0, 300.0)
    assert fal2.unavailable_reason is None and fal2.base_url == "http://127.0.0.1:1"
    assert fal2.trusted_origin == "http://127.0.0.1:1"
    assert (fal2.poll_interval, fal2.poll_max_interval, fal2.default_timeout) == (0.01, 0.5, 30.0)
    assert fal2.capabilities.max_images_per_call == 2

    cfg["providers"]["fal2"]["api_kye"] = "typo"
    with pytest.raises(ConfigError, match="api_kye"):
        parse_config(cfg, env={})


# ---- edits ----------------------------------------------------------------------------------------------


def edit_request(count=1, width=80, height=64, **fields):
    images = tuple(InputImage(bytes([i]) * 8, "png", 64, 48) for i in range(count))
    return replace(request(width, height, **fields), images=images)


def uri(i: int) -> str:
    return "data:image/png;base64," + base64.b64encode(bytes([i]) * 8).decode()


@pytest.mark.parametrize(("model", "option", "field"), [
    ("fal-ai/qwen-image-edit", None, "image_url"),
    ("fal-ai/qwen-image-edit-lora", None, "image_url"),
    ("fal-ai/qwen-image-edit-2511", None, "image_urls"),
    ("fal-ai/qwen-image-edit-2511/lora", None, "image_urls"),
    ("fal-ai/qwen-image-edit-plus", None, "image_urls"),
    ("fal-ai/qwen-image-2/edit", None, "image_urls"),
    ("fal-ai/qwen-image-edit", "image_urls", "image_urls"),
    ("someone/custom-edit", "image_url", "image_url"),
])
def test_edit_image_field(model, option, field):
    assert edit_image_field(model, option) == field


def test_edit_input_for_a_list_endpoint():
    req = edit_request(3, n=2, seed=5, negative_prompt="blur", cfg_scale=4.0, num_inference_steps=28,
                       prompt_enhancement="on", loras=[{"path": "owner/l"}], output_format="jpeg", quality="high",
                       acceleration="regular", enable_safety_checker="false", sync_mode="true", use_turbo=True,
                       go_fast=True, watermark=True, mystery=1)
    assert to_native_edit(req, "fal-ai/qwen-image-edit-2511") == {
        "prompt": "a cat", "image_urls": [uri(0), uri(1), uri(2)], "image_size": {"width": 80, "height": 64},
        "num_images": 2, "seed": 5, "negative_prompt": "blur", "guidance_scale": 4.0, "num_inference_steps": 28,
        "output_format": "jpeg", "acceleration": "regular", "enable_safety_checker": False, "sync_mode": True,
    }


def test_edit_input_for_a_single_image_endpoint():
    body = to_native_edit(edit_request(1), "fal-ai/qwen-image-edit")
    assert body == {"prompt": "a cat", "image_url": uri(0), "image_size": {"width": 80, "height": 64},
                    "num_images": 1}
    with pytest.raises(UpstreamRefused, match="takes one input image") as e:
        to_native_edit(edit_request(2), "fal-ai/qwen-image-edit")
    assert not e.value.retry_same_route and e.value.retryable


def test_edit_loras_only_to_lora_endpoints():
    req = edit_request(1, loras=[{"path": "owner/l", "scale": 0.5}])
    assert "loras" not in to_native_edit(req, "fal-ai/qwen-image-edit-2511")
    for model in ("fal-ai/qwen-image-edit-2511/lora", "fal-ai/qwen-image-edit-lora", "fal-ai/qwen-image-edit-plus-lora"):
        assert to_native_edit(req, model)["loras"] == [{"path": "owner/l", "scale": 0.5}]


def test_edit_extras_cannot_override_the_images():
    req = edit_request(1, image_urls=["https://elsewhere/x.png"], image_url="https://elsewhere/y.png")
    body = to_native_edit(req, "fal-ai/qwen-image-edit-2511")
    assert body["image_urls"] == [uri(0)] and "image_url" not in body


def test_generation_extras_from_a_form_are_booleans():
    assert to_native(request(enable_safety_checker="False", use_turbo="true"))["enable_safety_checker"] is False
    assert to_native(request(use_turbo="true"))["use_turbo"] is True
    assert to_native(request(use_turbo="maybe"))["use_turbo"] == "maybe"  # fal names it in its 422


def test_422_on_an_image_names_image():
    error = error_from_status(422, {"detail": [{"loc": ["body", "image_urls", 1], "msg": "Could not load",
                                                "type": "image_load_error"}]})
    assert isinstance(error, InvalidRequest) and error.param == "image"
    assert "image_urls.1: Could not load" in error.message


def test_edit_capabilities_and_option(tmp_path):
    provider = FalProvider("fal", {"api_key": "k"})
    assert provider.capabilities.edits is True and provider.capabilities.masks is False
    assert provider.edit_image_field is None
    assert FalProvider("fal", {"api_key": "k", "edit_image_field": "image_url"}).edit_image_field == "image_url"
    cfg = {"store": {"path": str(tmp_path)}, "size_tables": {"small": copy.deepcopy(SMALL_SIZES)},
           "providers": {"fal": {"kind": "fal", "api_key": "k", "edit_image_field": "images"}},
           "models": {"m": {"sizes": "small", "routes": ["fal"]}}}
    with pytest.raises(ConfigError, match="edit_image_field"):
        parse_config(cfg, env={})
