"""The Replicate provider's pure parts: sizes, to_native, from_native, errors, prediction URLs, options."""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest

from proxy import parse_config
from proxy.config import ConfigError
from proxy.errors import (
    InvalidRequest,
    RateLimited,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.providers import build_providers
from proxy.providers.replicate import DEFAULT_BASE_URL, ReplicateProvider
from proxy.providers.replicate_convert import (
    compression_applied,
    error_from_status,
    from_native,
    nearest_aspect_ratio,
    prediction_url,
    seed_from_logs,
    split_model,
    steps_from_logs,
    to_native,
    to_native_edit,
)
from proxy.request import InputImage, build_request, parse_body

BASE = "https://api.replicate.com/v1"


def request(width=1024, height=1024, **fields):
    fields.setdefault("prompt", "a cat")
    return build_request(parse_body(fields), "qwen-image", width, height)


# --- sizes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "ratio"), [
    ((1024, 1024), "1:1"), ((1365, 768), "16:9"), ((768, 1365), "9:16"), ((1183, 887), "4:3"),
    ((887, 1182), "3:4"), ((1254, 836), "3:2"), ((836, 1254), "2:3"), ((112, 64), "16:9"), ((80, 64), "4:3"),
    ((64, 80), "3:4"), ((3000, 1000), "16:9"), ((1000, 3000), "9:16"), ((1100, 1000), "1:1"),
    ((1300, 1000), "4:3"), ((1400, 1000), "4:3"), ((1450, 1000), "3:2"),
])
def test_nearest_aspect_ratio(size, ratio):
    assert nearest_aspect_ratio(*size) == ratio


def test_nearest_ratio_is_measured_on_a_log_scale():
    # 1.16 is linearly nearer 1 (0.16) than 4/3 (0.173), but on a log scale nearer 4:3 (0.139 vs 0.148).
    assert nearest_aspect_ratio(116, 100) == "4:3"
    assert nearest_aspect_ratio(100, 116) == "3:4"
    assert nearest_aspect_ratio(114, 100) == "1:1"


# --- to_native --------------------------------------------------------------------------------------


def test_minimal_input():
    assert to_native(request(1365, 768)) == {"prompt": "a cat", "aspect_ratio": "16:9"}


def test_fields_are_renamed():
    req = request(1183, 887, negative_prompt="blur", seed=42, num_inference_steps=28, cfg_scale=3.5,
                  prompt_enhancement="on", output_format="jpeg", output_compression=70)
    native = to_native(req)
    assert native == {"prompt": "a cat", "aspect_ratio": "4:3", "negative_prompt": "blur", "seed": 42,
                      "num_inference_steps": 28, "guidance": 3.5, "enhance_prompt": True,
                      "output_format": "jpg", "output_quality": 70}
    assert compression_applied(req, native) is True
    assert to_native(request(prompt_enhancement=False))["enhance_prompt"] is False


@pytest.mark.parametrize(("fmt", "native", "quality_sent"), [
    ("png", "png", False), ("jpeg", "jpg", True), ("webp", "webp", True),
    # gif and avif: the proxy converts from a lossless png and compresses itself.
    ("gif", "png", False), ("avif", "png", False),
])
def test_output_format(fmt, native, quality_sent):
    compression = 40 if fmt in ("jpeg", "webp", "avif") else None
    req = request(output_format=fmt, output_compression=compression)
    body = to_native(req)
    assert body["output_format"] == native
    assert ("output_quality" in body) is quality_sent
    assert compression_applied(req, body) is quality_sent


def test_compression_without_format_goes_to_the_default_webp():
    req = request(output_compression=55)
    body = to_native(req)
    assert "output_format" not in body and body["output_quality"] == 55
    assert compression_applied(req, body)


def test_loras():
    one = to_native(request(loras=[{"path": "https://hf.co/a.safetensors", "scale": 0.7}]))
    assert (one["lora_weights"], one["lora_scale"]) == ("https://hf.co/a.safetensors", 0.7)
    assert "extra_lora_weights" not in one and "extra_lora_scale" not in one
    three = to_native(request(loras=[{"path": "owner/first", "scale": 0.5}, {"path": "https://x/b.safetensors"},
                                     {"path": "huggingface.co/c/d", "scale": -1.5}]))
    assert three["lora_weights"] == "owner/first" and three["lora_scale"] == 0.5
    assert three["extra_lora_weights"] == ["https://x/b.safetensors", "huggingface.co/c/d"]
    assert three["extra_lora_scale"] == [1.0, -1.5]


def test_loras_override_native_lora_extras():
    body = to_native(request(loras=[{"path": "mine", "scale": 0.3}], lora_weights="theirs",
                             extra_lora_weights=["x"], extra_lora_scale=[2.0]))
    assert body["lora_weights"] == "mine" and body["lora_scale"] == 0.3
    assert "extra_lora_weights" not in body and "extra_lora_scale" not in body


def test_only_replicate_inputs_pass():
    extras = {"go_fast": False, "image_size": "optimize_for_speed", "disable_safety_checker": True,
              "replicate_weights": "https://w", "output_quality": 90, "lora_weights": "https://l",
              "lora_scale": 0.4, "extra_lora_weights": ["https://e"], "extra_lora_scale": [0.2],
              "guidance": 2.0, "enhance_prompt": False, "image": "https://img", "strength": 0.6}
    foreign = {"watermark": True, "acceleration": "high", "enable_safety_checker": False, "sync_mode": True,
               "use_turbo": True, "some_unknown_field": 1, "prompt_extend": True}
    body = to_native(request(**extras, **foreign))
    for key, value in extras.items():
        assert body[key] == value, key
    for key in foreign:
        assert key not in body, key


def test_proxy_fields_win_over_native_extras():
    body = to_native(request(cfg_scale=4.0, guidance=1.0, prompt_enhancement="off", enhance_prompt=True,
                             output_format="webp", output_compression=30, output_quality=90))
    assert body["guidance"] == 4.0 and body["enhance_prompt"] is False and body["output_quality"] == 30


def test_client_output_quality_alone_is_not_the_proxys_compression():
    req = request(output_format="webp", output_quality=90)
    assert not compression_applied(req, to_native(req))


# --- from_native ------------------------------------------------------------------------------------


def prediction(**fields) -> dict:
    return {"id": "abc123", "status": "succeeded", "output": ["https://replicate.delivery/x/out-0.webp"],
            "error": None, "logs": "", "urls": {"get": f"{BASE}/predictions/abc123",
                                                "cancel": f"{BASE}/predictions/abc123/cancel"}, **fields}


def test_output_list_and_string():
    for output in (["https://r.delivery/a.png"], "https://r.delivery/a.png"):
        (img,) = from_native(prediction(output=output), request(seed=7))
        assert img.url == "https://r.delivery/a.png" and img.seed == 7 and img.b64 is None and img.data is None
        assert img.revised_prompt is None


def test_seed_from_logs_wins():
    logs = "Loading pipeline...\nUsing seed: 98765\n100%|####| 30/30\n"
    (img,) = from_native(prediction(logs=logs), request(), compression_sent=True)
    assert img.seed == 98765 and img.compression_applied
    assert from_native(prediction(logs="no seed here"), request())[0].seed is None


@pytest.mark.parametrize(("logs", "seed"), [
    ("Using seed: 5", 5), ("Using seed:12\nUsing seed: 13\n", 13), ("using seed 5", None), (None, None),
    (["Using seed: 5"], None), (f"Using seed: {2**32}", None), ("Using seed: 4294967295", 4294967295),
])
def test_seed_from_logs(logs, seed):
    assert seed_from_logs(logs) == seed


def test_only_as_many_images_as_asked():
    images = from_native(prediction(output=["https://a/1.png", "https://a/2.png"]), request(seed=3))
    assert [i.url for i in images] == ["https://a/1.png"]


@pytest.mark.parametrize("output", [None, [], [""], [None], {"url": "x"}, 5])
def test_succeeded_without_images(output):
    with pytest.raises(UpstreamError, match="without an image"):
        from_native(prediction(output=output), request())


@pytest.mark.parametrize(("status", "error", "cls", "words"), [
    ("failed", "CUDA out of memory", UpstreamError, "the prediction failed: CUDA out of memory"),
    ("failed", None, UpstreamError, "no reason given"),
    ("canceled", None, UpstreamError, "canceled upstream"),
    ("aborted", None, UpstreamTimeout, "aborted upstream"),
    ("weird", None, UpstreamError, "status weird"),
])
def test_failed_predictions_are_retryable(status, error, cls, words):
    with pytest.raises(cls, match=words) as e:
        from_native(prediction(status=status, error=error, output=None), request())
    assert type(e.value) is cls and e.value.retryable and e.value.retry_same_route


def test_not_a_prediction():
    with pytest.raises(UpstreamError):
        from_native(["https://a/1.png"], request())


# --- errors -----------------------------------------------------------------------------------------


def test_422_names_the_field_by_the_proxys_name():
    payload = {"title": "Input validation failed", "status": 422,
               "detail": "- input.guidance: guidance must be less than or equal to 10",
               "invalid_fields": [{"type": "less_equal", "field": "input.guidance",
                                   "description": "guidance must be less than or equal to 10"}]}
    err = error_from_status(422, payload, None, request(cfg_scale=20))
    assert isinstance(err, InvalidRequest) and not err.retryable
    assert err.param == "cfg_scale"
    assert "guidance must be less than or equal to 10" in err.message and "HTTP 422" in err.message
    # A field the client sent by Replicate's own name keeps it.
    assert error_from_status(422, payload, None, request(guidance=20)).param == "guidance"


def test_400_and_422_without_invalid_fields():
    err = error_from_status(422, {"detail": "- input.num_inference_steps: must be <= 50", "status": 422}, None)
    assert isinstance(err, InvalidRequest) and err.param == "num_inference_steps"
    err = error_from_status(400, {"title": "Bad request", "status": 400}, None)
    assert isinstance(err, InvalidRequest) and err.param is None and "Bad request" in err.message
    err = error_from_status(422, None, None)
    assert isinstance(err, InvalidRequest) and "HTTP 422" in err.message


def test_429_retry_after_from_the_header_or_the_detail():
    payload = {"detail": "Request was throttled. Expected available in 4 seconds.", "status": 429}
    err = error_from_status(429, payload, 2.0)
    assert isinstance(err, RateLimited) and err.retry_after == 2.0 and err.headers["Retry-After"] == "2"
    assert "Request was throttled" in err.message
    assert error_from_status(429, payload, None).retry_after == 4.0
    assert error_from_status(429, {"detail": "Request was throttled. Expected available in 1 second."},
                             None).retry_after == 1.0
    assert error_from_status(429, {}, None).retry_after is None


@pytest.mark.parametrize(("status", "cls"), [
    (401, UpstreamRefused), (403, UpstreamRefused), (402, UpstreamRefused), (404, UpstreamRefused),
    (500, UpstreamError), (502, UpstreamError), (503, UpstreamUnavailable), (504, UpstreamTimeout),
    (408, UpstreamTimeout),
])
def test_other_statuses(status, cls):
    err = error_from_status(status, {"title": "T", "detail": "something", "status": status}, None)
    assert type(err) is cls and err.retryable
    assert f"HTTP {status}: something" in err.message
    if status in (401, 403):
        assert "authentication failed" in err.message and not err.retry_same_route


# --- prediction URLs and model names -----------------------------------------------------------------


def test_prediction_urls_on_the_api_origin_are_used():
    p = prediction(urls={"get": "https://api.replicate.com/v1/predictions/abc123?x=1",
                         "cancel": "https://api.replicate.com/v1/predictions/abc123/cancel"})
    assert prediction_url(p, "get", BASE) == "https://api.replicate.com/v1/predictions/abc123?x=1"
    assert prediction_url(p, "cancel", BASE) == "https://api.replicate.com/v1/predictions/abc123/cancel"


@pytest.mark.parametrize("urls", [
    {"get": "https://evil.example/v1/predictions/abc123", "cancel": "http://api.replicate.com/v1/x"},
    {"get": "https://api.replicate.com:8443/v1/predictions/abc123"},
    {"get": "/v1/predictions/abc123"}, {"get": 5}, None, "https://api.replicate.com/v1/predictions/abc123",
])
def test_other_prediction_urls_are_built_from_the_id(urls):
    p = prediction(urls=urls)
    assert prediction_url(p, "get", BASE) == f"{BASE}/predictions/abc123"
    assert prediction_url(p, "cancel", BASE) == f"{BASE}/predictions/abc123/cancel"


@pytest.mark.parametrize("pid", [None, "", "../../admin", "a/b", "x" * 200, 5])
def test_unusable_ids(pid):
    with pytest.raises(UpstreamError, match="prediction id"):
        prediction_url(prediction(id=pid, urls={}), "get", BASE)


def test_split_model():
    assert split_model("qwen/qwen-image") == ("qwen", "qwen-image", None)
    assert split_model("someone/my-lora:5a6b7c") == ("someone", "my-lora", "5a6b7c")
    for bad in ("qwen-image", "a/b/c", "/x", "a/", "a/b:", "a b/c", "a/b:v-1", "../x/y", "a/..", "a/b/"):
        with pytest.raises(UpstreamRefused, match="owner/name"):
            split_model(bad)


# --- options ----------------------------------------------------------------------------------------


def replicate_config(**options) -> dict:
    return {"providers": {"rep": {"kind": "replicate", **options}},
            "models": {"qwen-image": {"sizes": {"tiers": {"1K": {"1:1": "1024x1024"}}}, "routes": ["rep"]}}}


def test_options_and_defaults():
    cfg = parse_config(replicate_config(api_key="${REPLICATE_API_TOKEN}"), env={})
    provider = build_providers(cfg)["rep"]
    assert isinstance(provider, ReplicateProvider)
    assert provider.base_url == DEFAULT_BASE_URL and provider.trusted_origin == "https://api.replicate.com"
    assert (provider.wait_seconds, provider.poll_interval, provider.poll_max_interval) == (60, 0.25, 2.0)
    assert provider.capabilities.max_images_per_call == 1
    assert provider.state == "missing_key"
    assert "REPLICATE_API_TOKEN" in provider.unavailable_reason

    cfg = parse_config(replicate_config(api_key="k", base_url="http://127.0.0.1:9/v1/", wait_seconds="5",
                                        poll_interval=0.01, poll_max_interval=0.05, timeout=30, retries=1,
                                        cancel_after=False), env={})
    provider = build_providers(cfg)["rep"]
    assert provider.unavailable_reason is None
    assert provider.base_url == "http://127.0.0.1:9/v1" and provider.trusted_origin == "http://127.0.0.1:9"
    assert (provider.wait_seconds, provider.poll_interval, provider.poll_max_interval) == (5, 0.01, 0.05)
    assert provider.default_timeout == 30 and provider.cancel_after is False


@pytest.mark.parametrize("options", [{"wait_seconds": 61}, {"poll_interval": 0}, {"acceleration": "high"},
                                     {"wait_seconds": -1}])
def test_bad_options(options):
    with pytest.raises(ConfigError):
        parse_config(replicate_config(api_key="k", **options), env={})


# --- edits ------------------------------------------------------------------------------------------


def edit_request(count=1, width=1183, height=887, **fields):
    images = tuple(InputImage(bytes([i]) * 8, "jpeg", 640, 480) for i in range(count))
    return replace(request(width, height, **fields), images=images)


def uri(i: int) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(bytes([i]) * 8).decode()


def test_edit_input_follows_the_input_image():
    req = edit_request(3, seed=4, negative_prompt="blur", cfg_scale=3.0, num_inference_steps=20,
                       prompt_enhancement="on", loras=[{"path": "https://h/l.safetensors"}], output_format="png",
                       go_fast="false", disable_safety_checker="true", output_quality="90", image_size="x",
                       guidance=2, strength=0.5, watermark=True, acceleration="high", mystery=1)
    assert to_native_edit(req, "qwen/qwen-image-edit-plus") == {
        "prompt": "a cat", "image": [uri(0), uri(1), uri(2)], "aspect_ratio": "match_input_image", "seed": 4,
        "output_format": "png", "go_fast": False, "disable_safety_checker": True, "output_quality": 90,
    }


@pytest.mark.parametrize(("fields", "ratio"), [
    ({"size": "1365x768"}, "16:9"),
    ({"size": "auto"}, "match_input_image"),
    ({"aspect_ratio": "16:9"}, "16:9"),
    ({"resolution": "1K"}, "16:9"),
])
def test_edit_aspect_ratio_when_the_client_asked_a_size(fields, ratio):
    assert to_native_edit(edit_request(1, 1365, 768, **fields), "qwen/qwen-image-edit-plus")["aspect_ratio"] == ratio


def test_edit_compression_and_format():
    body = to_native_edit(edit_request(1, output_format="jpeg", output_compression=60), "qwen/qwen-image-edit-plus")
    assert (body["output_format"], body["output_quality"]) == ("jpg", 60)


def test_single_image_edit_model():
    body = to_native_edit(edit_request(1), "qwen/qwen-image-edit")
    assert body["image"] == uri(0)
    with pytest.raises(UpstreamRefused, match="takes one input image") as e:
        to_native_edit(edit_request(2), "qwen/qwen-image-edit:abc123")
    assert not e.value.retry_same_route


def test_generation_extras_from_a_form_are_typed():
    body = to_native(request(go_fast="false", enhance_prompt="true", output_quality="70", strength="0.5",
                             lora_scale="x"))
    assert (body["go_fast"], body["enhance_prompt"], body["output_quality"], body["strength"]) == (False, True, 70, 0.5)
    assert body["lora_scale"] == "x"  # Replicate names it in its 422


def test_422_on_the_image_names_image():
    error = error_from_status(422, {"detail": "- input.image: image must be a URI",
                                    "invalid_fields": [{"field": "input.image", "description": "bad"}]}, None)
    assert isinstance(error, InvalidRequest) and error.param == "image"


def test_edit_capabilities():
    caps = ReplicateProvider("rep", {"api_key": "k"}).capabilities
    assert caps.edits is True and caps.masks is False and caps.max_images_per_call == 1


@pytest.mark.parametrize("logs, steps", [
    (" 40%|####      | 20/50 [00:04<00:06,  4.95it/s]\n", (20, 50)),
    # tqdm redraws with \r: the latest bar counts, after an earlier one (loading shards)
    ("Loading checkpoint shards: 100%|##########| 4/4 [00:02<00:00]\n  0%|          | 0/28 [00:00<?, ?it/s]\r"
     "  4%|▍         | 1/28 [00:00<00:10,  2.5it/s]\r  7%|▋         | 2/28 [00:00<00:09,  2.7it/s]", (2, 28)),
    ("Using seed: 3\nprocessing...\n", None),
    ("50%|#####     | 9/3", None),  # more done than in all: not a bar to trust
    ("0%|          | 0/0", None),
    (None, None),
    ("x" * 100_000 + " 10%|#         | 5/50 [", (5, 50)),  # long logs: the tail is searched
])
def test_steps_from_logs(logs, steps):
    assert steps_from_logs(logs) == steps
