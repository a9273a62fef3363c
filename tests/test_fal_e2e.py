"""End to end: the official openai package -> the proxy -> a fal-kind route -> the fake fal queue."""

from __future__ import annotations

import asyncio
import base64
import copy
import io

import pytest
from openai import APITimeoutError, BadRequestError, InternalServerError, RateLimitError
from PIL import Image

from .conftest import base_config
from .fake_fal import FakeFal, seed_colour
from .fake_openai_upstream import SMALL_SIZES

FAL_KEY = "fal-id-1234:fal-secret-5678"
CLIENT_KEY = "client-secret-key-123"
ROUTE = {"provider": "fal", "model": "fal-ai/qwen-image"}


@pytest.fixture
def fake_fal(aiohttp_server):
    """fake_fal(**knobs) -> a started FakeFal."""

    async def make(**kwargs) -> FakeFal:
        return await FakeFal(**kwargs).start(aiohttp_server)

    return make


def fal_config(tmp_path, fal: FakeFal, routes: list | None = None, **options) -> dict:
    """base_config plus a fal provider (key from ${FAL_KEY}) and a model 'qwen-image' on the small sizes."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["fal"] = {"kind": "fal", "base_url": fal.url, "api_key": "${FAL_KEY}",
                               "poll_interval": 0.01, "poll_max_interval": 0.05, **options}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": routes or [ROUTE]}
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    return cfg


async def start(start_proxy, cfg, key=FAL_KEY):
    return await start_proxy(cfg, env={"FAL_KEY": key} if key else {}, api_key=CLIENT_KEY)


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


# ---- the request fal receives, the images the client gets ---------------------------------------------


async def test_request_conversion_and_images(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(revise_prompt="a fox, as fal read it")
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(
        model="qwen-image", prompt="a fox", n=3, response_format="b64_json",
        extra_body={"seed": 10, "aspect_ratio": "16:9", "negative_prompt": "blur", "cfg_scale": 3.5,
                    "num_inference_steps": 20, "loras": [{"path": "owner/lora", "scale": 0.7}],
                    "prompt_enhancement": "on", "go_fast": True, "watermark": True, "acceleration": "high",
                    "enable_safety_checker": False, "disable_safety_checker": True, "mystery": 1})

    (submit,) = fal.submits  # n=3 is native: one call
    assert submit.path == "/fal-ai/qwen-image"
    assert submit.headers["Authorization"] == f"Key {FAL_KEY}"
    assert CLIENT_KEY not in str(dict(submit.headers))
    assert submit.json == {
        "prompt": "a fox", "image_size": {"width": 112, "height": 64}, "num_images": 3, "seed": 10,
        "negative_prompt": "blur", "guidance_scale": 3.5, "num_inference_steps": 20,
        "loras": [{"path": "owner/lora", "scale": 0.7}], "acceleration": "high", "enable_safety_checker": False,
    }
    # Status and result calls carry the key too and follow the answer's URLs.
    rid = next(iter(fal.jobs))
    for call in fal.status_calls + fal.result_calls:
        assert call.headers["Authorization"] == f"Key {FAL_KEY}"
        assert call.path.startswith(f"/fal-ai/qwen-image/requests/{rid}")

    assert r.to_dict()["seeds"] == [10, 11, 12]
    for i, item in enumerate(r.data):
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("PNG", (112, 64))
        assert im.convert("RGB").getpixel((0, 0)) == seed_colour(10 + i)
        assert item.revised_prompt == "a fox, as fal read it"


async def test_n_above_max_images_per_call(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", n=6, response_format="b64_json",
                                     extra_body={"seed": 40})
    assert sorted((b["num_images"], b["seed"]) for b in fal.inputs) == [(2, 44), (4, 40)]
    assert r.to_dict()["seeds"] == list(range(40, 46))
    assert [decode(d.b64_json).convert("RGB").getpixel((0, 0)) for d in r.data] == [
        seed_colour(s) for s in range(40, 46)]


async def test_seed_comes_from_fal_when_the_client_sends_none(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", n=2, response_format="b64_json")
    assert "seed" not in fal.inputs[0]
    fal_seed = next(iter(fal.jobs.values())).result["seed"]
    assert r.to_dict()["seeds"] == [fal_seed, fal_seed + 1]


@pytest.mark.parametrize(("fmt", "compression", "asked", "pil"), [
    (None, None, None, "PNG"),
    ("png", None, "png", "PNG"),
    ("jpeg", None, "jpeg", "JPEG"),
    ("jpeg", 30, "png", "JPEG"),   # the proxy encodes at the requested quality from fal's lossless png
    ("webp", None, "png", "WEBP"),
    ("avif", 50, "png", "AVIF"),
])
async def test_output_formats(start_proxy, tmp_path, fake_fal, fmt, compression, asked, pil):
    fal = await fake_fal()
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    kwargs = {"output_format": fmt} if fmt else {}
    if compression is not None:
        kwargs["output_compression"] = compression
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json", **kwargs)
    assert fal.inputs[0].get("output_format") == asked
    im = decode(r.data[0].b64_json)
    assert (im.format, im.size) == (pil, (64, 64))


async def test_url_response_is_rehosted(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    server, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="url")
    assert r.data[0].url.startswith(str(server.make_url("/images/")))
    assert len(fal.calls("GET", ".png")) == 1  # downloaded from fal's media URL (the provider's own origin)


async def test_other_size_from_fal_ends_at_the_resolved_size(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(fixed_size=(96, 48))
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", size="4:3", response_format="b64_json")
    assert fal.inputs[0]["image_size"] == {"width": 80, "height": 64}
    assert decode(r.data[0].b64_json).size == (80, 64)


async def test_sync_mode_data_uris(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", n=2, response_format="b64_json",
                                     extra_body={"sync_mode": True, "seed": 3})
    assert fal.inputs[0]["sync_mode"] is True
    assert fal.files == {} and fal.calls("GET", ".png") == []
    assert [decode(d.b64_json).convert("RGB").getpixel((0, 0)) for d in r.data] == [seed_colour(3), seed_colour(4)]


async def test_nsfw_flagged_image_is_returned_as_fal_made_it(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(nsfw=True)
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).convert("RGB").getpixel((0, 0)) == (0, 0, 0)


async def test_route_params_and_vendor_extras(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    route = {**ROUTE, "params": {"acceleration": "regular", "use_turbo": True, "go_fast": True}}
    _, client = await start(start_proxy, fal_config(tmp_path, fal, [route]))
    await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                 extra_body={"acceleration": "none"})
    body = fal.inputs[0]
    assert (body["acceleration"], body["use_turbo"]) == ("none", True)
    assert "go_fast" not in body


# ---- the queue: polling, URLs, cancellation ------------------------------------------------------------


async def test_polling_sequence_with_backoff(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(statuses=("IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "IN_PROGRESS"))
    _, client = await start(start_proxy, fal_config(tmp_path, fal, poll_interval=0.02, poll_max_interval=0.05))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    kinds = [("submit" if c.method == "POST" else "status" if c.path.endswith("/status")
              else "cancel" if c.method == "PUT" else "result" if "/requests/" in c.path else "file")
             for c in fal.requests]
    assert kinds == ["submit"] + ["status"] * 5 + ["result", "file"]
    polls = [c.at for c in fal.status_calls]
    # Waits of 0.02, 0.03, 0.045, then capped at 0.05 between the five polls.
    assert polls[-1] - polls[0] >= 0.02 + 0.03 + 0.045 + 0.05 - 0.01
    assert fal.cancel_calls == []


async def test_foreign_queue_urls_are_not_followed(start_proxy, tmp_path, fake_fal):
    # The answer points at another host: the provider builds the URLs from base_url, as fal_client does
    # (owner/alias only, without the endpoint's sub-path).
    fal = await fake_fal(foreign_urls=True)
    route = {"provider": "fal", "model": "fal-ai/qwen-image/text-to-image"}
    _, client = await start(start_proxy, fal_config(tmp_path, fal, [route]))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert fal.submits[0].path == "/fal-ai/qwen-image/text-to-image"
    rid = next(iter(fal.jobs))
    assert fal.status_calls and all(c.path == f"/fal-ai/qwen-image/requests/{rid}/status" for c in fal.status_calls)
    assert [c.path for c in fal.result_calls] == [f"/fal-ai/qwen-image/requests/{rid}"]


async def test_client_disconnect_cancels_the_fal_request(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(hang=True)
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    with pytest.raises(APITimeoutError):
        await client.with_options(timeout=3).images.generate(model="qwen-image", prompt="p")
    await asyncio.wait_for(fal.cancelled.wait(), 30)
    rid = next(iter(fal.jobs))
    (cancel,) = fal.cancel_calls
    assert cancel.path == f"/fal-ai/qwen-image/requests/{rid}/cancel"
    assert cancel.headers["Authorization"] == f"Key {FAL_KEY}"
    assert fal.jobs[rid].cancelled
    # And the polling stopped.
    polls = len(fal.status_calls)
    await asyncio.sleep(0.2)
    assert len(fal.status_calls) == polls


async def test_route_deadline_cancels_and_falls_back(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(hang=True)
    route = {**ROUTE, "timeout": 0.3, "retries": 1}
    _, client = await start(start_proxy, fal_config(tmp_path, fal, [route, "placeholder"]))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)  # the placeholder's image
    for _ in range(50):
        if len(fal.cancel_calls) == 2:
            break
        await asyncio.sleep(0.05)
    # Each attempt (the first and its retry) was cancelled at fal.
    assert len(fal.submits) == 2
    assert {c.path.split("/")[-2] for c in fal.cancel_calls} == set(fal.jobs)


# ---- failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("retryable", [None, "false"])
async def test_failed_request_falls_back(start_proxy, tmp_path, fake_fal, retryable):
    fal = await fake_fal()
    fal.fail_request(500, "CUDA error: out of memory",
                     headers={"X-Fal-Retryable": retryable} if retryable else None)
    _, client = await start(start_proxy, fal_config(tmp_path, fal, [ROUTE, "placeholder"]))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    # Retried on the route (2 retries), unless fal said another try would not help.
    expected = 1 if retryable == "false" else 3
    assert len(fal.submits) == len(fal.result_calls) == expected
    assert fal.cancel_calls == []  # the requests completed (failed): nothing to cancel


async def test_failed_request_message_when_no_route_is_left(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    fal.fail_request(500, "CUDA error: out of memory")
    cfg = fal_config(tmp_path, fal)
    cfg["routing"]["retries"] = 0
    _, client = await start(start_proxy, cfg)
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 502
    assert "route 'fal'" in e.value.message and "CUDA error: out of memory" in e.value.message


async def test_submit_5xx_is_retried(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    fal.fail_submit(503, "no runners available", times=1)
    _, client = await start(start_proxy, fal_config(tmp_path, fal))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(fal.submits) == 2


@pytest.mark.parametrize(("validate_at", "extra", "param", "reason"), [
    ("run", {"num_inference_steps": 300}, "num_inference_steps", "num_inference_steps: Input should be between 2 and 250"),
    ("submit", {"cfg_scale": 30}, "cfg_scale", "guidance_scale: Input should be between 0 and 20"),
])
async def test_client_error_is_400_with_fals_reason(start_proxy, tmp_path, fake_fal, validate_at, extra, param,
                                                    reason):
    fal = await fake_fal(validate_at=validate_at)
    _, client = await start(start_proxy, fal_config(tmp_path, fal, [ROUTE, "placeholder"]))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", prompt="p", extra_body=extra)
    assert e.value.status_code == 400
    assert reason in e.value.message
    body = e.value.response.json()["error"]
    assert body["param"] == param and body["type"] == "invalid_request_error"
    assert len(fal.submits) == 1  # not retried, no fallback


async def test_auth_failure_is_502_naming_the_route(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal(echo_key_in_errors=True)
    _, client = await start(start_proxy, fal_config(tmp_path, fal), key="fal-id-9999:wrong-secret-0000")
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 502
    text = e.value.response.text
    assert "route 'fal'" in e.value.message and "authentication failed" in e.value.message
    assert "wrong-secret-0000" not in text and "fal-id-9999" not in text and CLIENT_KEY not in text
    assert len(fal.submits) == 1  # a refused login is not retried on the same route


async def test_rate_limited(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    fal.fail_submit(429, "Too many concurrent requests", headers={"Retry-After": "3"})
    cfg = fal_config(tmp_path, fal)
    cfg["routing"]["retries"] = 0
    _, client = await start(start_proxy, cfg)
    with pytest.raises(RateLimitError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 429
    assert e.value.response.headers["retry-after"] == "3"
    assert "Too many concurrent requests" in e.value.message
    assert len(fal.submits) == 1


async def test_missing_key_makes_the_route_unavailable(start_proxy, tmp_path, fake_fal):
    fal = await fake_fal()
    _, client = await start(start_proxy, fal_config(tmp_path, fal), key=None)
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 503
    assert "FAL_KEY" in e.value.message and "fal" in e.value.message
    assert fal.requests == []
