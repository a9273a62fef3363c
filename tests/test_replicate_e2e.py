"""End to end: the official openai package -> the proxy -> a replicate route -> the fake Replicate API."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import time

import aiohttp
import pytest
from openai import APIError, BadRequestError, InternalServerError, RateLimitError
from PIL import Image

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, seed_colour
from .fake_replicate import FakeReplicate
from .test_jobs_e2e import http, wait_progress

MODEL = "qwen-image"
CLIENT_KEY = "client-secret-key-123"


@pytest.fixture
def fake_replicate(aiohttp_server):
    async def make(**knobs) -> FakeReplicate:
        return await FakeReplicate(**knobs).start(aiohttp_server)

    return make


def rep_config(tmp_path, fake: FakeReplicate, *, routes=None, route: dict | None = None, **options) -> dict:
    """A model 'qwen-image' on the small size table, routed to provider 'rep' (the fake)."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["rep"] = {"kind": "replicate", "base_url": fake.base_url, "api_key": "${REPLICATE_API_TOKEN}",
                               "wait_seconds": 1, "poll_interval": 0.01, "poll_max_interval": 0.04, **options}
    cfg["models"][MODEL] = {"sizes": "small",
                            "routes": routes or [{"provider": "rep", "model": "qwen/qwen-image", **(route or {})}]}
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    return cfg


async def start(start_proxy, tmp_path, fake, **kwargs):
    return await start_proxy(rep_config(tmp_path, fake, **kwargs), env={"REPLICATE_API_TOKEN": fake.api_key},
                             api_key=CLIENT_KEY)


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def near(pixel, colour, tolerance=10) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


# ---- what Replicate receives ------------------------------------------------------------------------


async def test_request_conversion(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake)
    loras = [{"path": "https://hf.co/a/first.safetensors", "scale": 0.8}, {"path": "owner/second", "scale": 0.5},
             {"path": "https://hf.co/c/third.safetensors", "scale": 1.2}]
    raw = await client.images.with_raw_response.generate(
        model=MODEL, prompt="a fox in the snow", n=2, response_format="b64_json",
        extra_body={"seed": 10, "aspect_ratio": "16:9", "negative_prompt": "blur", "cfg_scale": 3.5,
                    "num_inference_steps": 20, "prompt_enhancement": "on", "output_format": "jpeg",
                    "output_compression": 70, "loras": loras,
                    # Replicate's own extras arrive; other vendors' (and unknown fields) do not.
                    "go_fast": True, "image_size": "optimize_for_speed", "disable_safety_checker": True,
                    "watermark": True, "acceleration": "high", "enable_safety_checker": False,
                    "mystery_field": 1})
    r = raw.parse()
    assert raw.headers["x-qip-route"] == "rep"

    # n is emulated: two predictions, seed + i.
    assert len(fake.creates) == 2
    inputs = sorted(fake.inputs, key=lambda i: i["seed"])
    assert [i["seed"] for i in inputs] == [10, 11]
    for inp in inputs:
        assert inp == {
            "prompt": "a fox in the snow", "aspect_ratio": "16:9", "seed": inp["seed"], "negative_prompt": "blur",
            "guidance": 3.5, "num_inference_steps": 20, "enhance_prompt": True, "output_format": "jpg",
            "output_quality": 70, "lora_weights": "https://hf.co/a/first.safetensors", "lora_scale": 0.8,
            "extra_lora_weights": ["owner/second", "https://hf.co/c/third.safetensors"],
            "extra_lora_scale": [0.5, 1.2], "go_fast": True, "image_size": "optimize_for_speed",
            "disable_safety_checker": True,
        }
    for create in fake.creates:
        assert create.path == "/v1/models/qwen/qwen-image/predictions"
        assert create.headers["Authorization"] == f"Bearer {fake.api_key}"
        assert create.headers["Prefer"] == "wait=1"
        assert create.headers["Cancel-After"].endswith("s")
        assert set(create.json) == {"input"}
        assert not any(CLIENT_KEY in v for v in create.headers.values())
    assert fake.polls == [] and fake.cancels == []  # answered within the wait

    # The vendor made 128x72 (its 16:9); the client gets the resolved 112x64, in order of seed.
    assert r.to_dict()["seeds"] == [10, 11]
    assert r.output_format == "jpeg" and r.size == "112x64"
    for i, item in enumerate(r.data):
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("JPEG", (112, 64))
        assert near(im.convert("RGB").getpixel((56, 32)), seed_colour(10 + i))
        assert item.revised_prompt == "a fox in the snow"


async def test_output_as_url_and_untouched_bytes(start_proxy, tmp_path, fake_replicate):
    # A vendor size equal to the resolved one: nothing to convert, the bytes pass through.
    fake = await fake_replicate(output_as_string=True, sizes={"1:1": (64, 64)})
    server, client = await start(start_proxy, tmp_path, fake)
    r = await client.images.generate(model=MODEL, prompt="p", response_format="url",
                                     extra_body={"seed": 3, "output_format": "png"})
    assert fake.inputs[0]["aspect_ratio"] == "1:1"
    assert r.data[0].url.startswith(str(server.make_url("/images/")))
    async with aiohttp.ClientSession() as s, s.get(r.data[0].url) as resp:
        data = await resp.read()
    (served,) = [body for body, _ in fake.files.values()]
    assert data == served
    assert Image.open(io.BytesIO(data)).size == (64, 64)


@pytest.mark.parametrize(("fmt", "asked", "pil"), [("png", "png", "PNG"), ("webp", "webp", "WEBP"),
                                                   ("gif", "png", "GIF"), ("avif", "png", "AVIF"),
                                                   (None, None, "WEBP")])
async def test_output_formats(start_proxy, tmp_path, fake_replicate, fmt, asked, pil):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake)
    extra = {"size": "64x80"} | ({"output_format": fmt} if fmt else {})
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json", extra_body=extra)
    assert fake.inputs[0].get("output_format") == asked
    assert fake.inputs[0]["aspect_ratio"] == "3:4"
    im = decode(r.data[0].b64_json)
    assert (im.format, im.size) == (pil, (64, 80))


# ---- polling ----------------------------------------------------------------------------------------


async def test_polls_until_succeeded(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate(polls_before_done=3)
    _, client = await start(start_proxy, tmp_path, fake)
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json",
                                     extra_body={"seed": 4, "output_format": "png"})
    assert decode(r.data[0].b64_json).size == (64, 64)
    (pid,) = fake.predictions
    assert fake.predictions[pid].status == "succeeded"
    # Answered `starting` after the wait, then processing, processing, processing, succeeded.
    assert [p.path for p in fake.polls] == [f"/v1/predictions/{pid}"] * 4
    assert all(p.headers["Authorization"] == f"Bearer {fake.api_key}" for p in fake.polls)
    times = [fake.creates[0].at] + [p.at for p in fake.polls]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.009  # the backoff is respected (0.01, 0.02, 0.04, 0.04)
    assert sum(gaps) >= 0.09
    assert fake.cancels == []


@pytest.mark.parametrize(("wait_seconds", "header"), [(60, "wait"), (7, "wait=7"), (0, None)])
async def test_prefer_wait(start_proxy, tmp_path, fake_replicate, wait_seconds, header):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake, wait_seconds=wait_seconds)
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert fake.creates[0].headers.get("Prefer") == header
    # Without Prefer: wait the first answer is `starting`: one poll finds it done.
    assert len(fake.polls) == (1 if header is None else 0)


async def test_foreign_poll_urls_are_not_followed(start_proxy, tmp_path, fake_replicate):
    # urls.get points at another host: the token must not go there; the proxy polls {base}/predictions/{id}.
    fake = await fake_replicate(polls_before_done=1, foreign_urls=True)
    _, client = await start(start_proxy, tmp_path, fake)
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    (pid,) = fake.predictions
    assert [p.path for p in fake.polls] == [f"/v1/predictions/{pid}"] * 2


async def test_a_failed_poll_is_tried_again(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate(polls_before_done=1)
    fake.fail_poll(500, "Internal server error", times=2)
    _, client = await start(start_proxy, tmp_path, fake, route={"retries": 0})
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(fake.creates) == 1 and len(fake.polls) == 4


async def test_seed_from_the_logs(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake)
    r = await client.images.generate(model=MODEL, prompt="p", n=2, response_format="b64_json")
    assert all("seed" not in i for i in fake.inputs)
    logged = {int(p.logs.split("Using seed: ")[1].split()[0]) for p in fake.predictions.values()}
    seeds = r.to_dict()["seeds"]
    assert set(seeds) == logged and len(logged) == 2
    for seed, item in zip(seeds, r.data, strict=True):
        assert near(decode(item.b64_json).convert("RGB").getpixel((32, 32)), seed_colour(seed))

    # Logs without a seed: the request's seed (+ i) is reported.
    fake.log_seed = False
    r = await client.images.generate(model=MODEL, prompt="p", n=2, response_format="b64_json",
                                     extra_body={"seed": 5})
    assert r.to_dict()["seeds"] == [5, 6]


async def test_community_model_version(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake,
                            routes=[{"provider": "rep", "model": "someone/qwen-image-lora:5a6b7c8d9e"}])
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    (create,) = fake.creates
    assert create.path == "/v1/predictions"
    assert create.json["version"] == "5a6b7c8d9e" and create.json["input"]["prompt"] == "p"


# ---- cancelling -------------------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_prediction(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate(polls_before_done=None)  # runs until cancelled
    server, _ = await start(start_proxy, tmp_path, fake)

    async def request():
        async with aiohttp.ClientSession() as s, s.post(
                server.make_url("/v1/images/generations"), json={"model": MODEL, "prompt": "p"},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as r:
            return await r.read()

    task = asyncio.ensure_future(request())
    await asyncio.wait_for(fake.polled.wait(), 30)
    task.cancel()  # the connection closes: the proxy's handler is cancelled
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.cancelled.wait(), 30)
    (pid,) = fake.predictions
    (cancel,) = fake.cancels
    assert cancel.path == f"/v1/predictions/{pid}/cancel"
    assert cancel.headers["Authorization"] == f"Bearer {fake.api_key}"
    assert fake.predictions[pid].status == "canceled"
    polls = len(fake.polls)
    await asyncio.sleep(0.15)
    assert len(fake.polls) == polls  # and polling stopped


async def test_deadline_cancels_the_prediction(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate(polls_before_done=None)
    _, client = await start(start_proxy, tmp_path, fake, route={"timeout": 0.4, "retries": 0})
    started = time.monotonic()
    with pytest.raises(APIError) as e:
        await client.images.generate(model=MODEL, prompt="p")
    assert time.monotonic() - started < 15  # the prediction never ends: only the 0.4 s deadline stops it
    assert e.value.status_code == 504
    assert json.loads(e.value.response.text)["error"]["code"] == "upstream_timeout"
    await asyncio.wait_for(fake.cancelled.wait(), 30)
    (pid,) = fake.predictions
    assert fake.predictions[pid].status == "canceled"
    assert fake.creates[0].headers["Cancel-After"] == "1s"


# ---- failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("outcome", "polls"), [("failed", 0), ("failed", 2), ("canceled", 1)])
async def test_failed_prediction_falls_back(start_proxy, tmp_path, fake_replicate, outcome, polls):
    fake = await fake_replicate(outcome=outcome, polls_before_done=polls)
    _, client = await start(start_proxy, tmp_path, fake,
                            routes=[{"provider": "rep", "model": "qwen/qwen-image"}, "placeholder"])
    raw = await client.images.with_raw_response.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert raw.headers["x-qip-route"] == "placeholder"
    assert decode(raw.parse().data[0].b64_json).size == (64, 64)
    assert len(fake.creates) == 3  # the call and its 2 retries, then the next route
    assert fake.cancels == []  # nothing left running


async def test_failure_reason_reaches_the_client_without_the_key(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate(outcome="failed")
    fake.error = f"NSFW content detected (token {fake.api_key} in use)"
    _, client = await start(start_proxy, tmp_path, fake, route={"retries": 0})
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model=MODEL, prompt="p")
    assert e.value.status_code == 502
    text = e.value.response.text
    assert "route 'rep'" in text and "the prediction failed: NSFW content detected" in text
    assert fake.api_key not in text


@pytest.mark.parametrize(("extra", "param", "words"), [
    ({"num_inference_steps": 80}, "num_inference_steps", "num_inference_steps must be an integer from 1 to 50"),
    ({"cfg_scale": 20}, "cfg_scale", "guidance must be a number from 0 to 10"),
    ({"image_size": "huge"}, "image_size", "image_size must be one of"),
])
async def test_client_errors_are_400_at_once(start_proxy, tmp_path, fake_replicate, extra, param, words):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake,
                            routes=[{"provider": "rep", "model": "qwen/qwen-image"}, "placeholder"])
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model=MODEL, prompt="p", extra_body=extra)
    assert e.value.status_code == 400
    assert words in e.value.message
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert len(fake.creates) == 1  # not retried, no fallback


async def test_auth_failure_is_502_naming_the_route(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    cfg = rep_config(tmp_path, fake)
    _, client = await start_proxy(cfg, env={"REPLICATE_API_TOKEN": "r8_wrong_token_abcdefghijklmnop"})
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model=MODEL, prompt="p")
    assert e.value.status_code == 502
    text = e.value.response.text
    message = json.loads(text)["error"]["message"]
    assert "route 'rep'" in message and "authentication failed" in message and "HTTP 401" in message
    assert "r8_wrong_token_abcdefghijklmnop" not in text
    assert len(fake.creates) == 1  # a refused token is not retried on the same route


async def test_rate_limited(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    fake.fail_create(429, "Request was throttled. Expected available in 3 seconds.", title="Too Many Requests",
                     headers={"Retry-After": "3"})
    _, client = await start(start_proxy, tmp_path, fake, route={"retries": 0})
    with pytest.raises(RateLimitError) as e:
        await client.images.generate(model=MODEL, prompt="p")
    assert e.value.status_code == 429
    assert e.value.response.headers["retry-after"] == "3"
    assert "Request was throttled" in e.value.message


async def test_throttled_once_then_served(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    fake.fail_create(429, "Request was throttled. Expected available in 0 seconds.", times=1)
    _, client = await start(start_proxy, tmp_path, fake)
    r = await client.images.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(fake.creates) == 2


async def test_server_error_falls_back(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    fake.fail_create(500, "Internal server error")
    _, client = await start(start_proxy, tmp_path, fake,
                            routes=[{"provider": "rep", "model": "qwen/qwen-image"}, "placeholder"])
    raw = await client.images.with_raw_response.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert raw.headers["x-qip-route"] == "placeholder"
    assert len(fake.creates) == 3


async def test_missing_token_skips_the_route(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    _, client = await start_proxy(rep_config(tmp_path, fake), env={})
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model=MODEL, prompt="p")
    assert e.value.status_code == 503
    assert "REPLICATE_API_TOKEN" in e.value.message and "rep" in e.value.message
    assert fake.requests == []


async def test_route_model_must_be_owner_and_name(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate()
    _, client = await start(start_proxy, tmp_path, fake, routes=["rep", "placeholder"])
    raw = await client.images.with_raw_response.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert raw.headers["x-qip-route"] == "placeholder"
    assert fake.requests == []


async def test_a_prediction_lost_while_polling_falls_back_and_is_cancelled(start_proxy, tmp_path, fake_replicate):
    fake = await fake_replicate(polls_before_done=None)
    fake.fail_poll(404, "The requested resource could not be found.", times=None)
    _, client = await start(start_proxy, tmp_path, fake,
                            routes=[{"provider": "rep", "model": "qwen/qwen-image", "retries": 0}, "placeholder"])
    raw = await client.images.with_raw_response.generate(model=MODEL, prompt="p", response_format="b64_json")
    assert raw.headers["x-qip-route"] == "placeholder"  # a 404 on a poll is the route's failure, not a 400
    assert len(fake.polls) == 1
    await asyncio.wait_for(fake.cancelled.wait(), 30)  # polling gave up: the prediction is stopped


async def test_a_background_job_shows_the_steps_in_the_predictions_logs(start_proxy, tmp_path, fake_replicate):
    """Replicate reports no steps in its API, but a cog model's logs carry diffusers' tqdm bar: a background
    job's `progress` follows it while the prediction runs."""
    fake = await fake_replicate(polls_before_done=None, progress_steps=50)
    cfg = rep_config(tmp_path, fake)
    cfg["jobs"] = {"path": str(tmp_path / "jobs.sqlite3")}
    server, client = await start_proxy(cfg, env={"REPLICATE_API_TOKEN": fake.api_key}, api_key=CLIENT_KEY)
    raw = await client.images.with_raw_response.generate(model=MODEL, prompt="a fox",
                                                         extra_body={"background": True})
    assert raw.http_response.status_code == 202
    job_id = raw.http_response.json()["id"]
    job = await wait_progress(server, job_id, client.api_key, steps=3, timeout=60)
    assert job["status"] == "in_progress" and job["progress"]["steps_total"] == 50
    status, _, _ = await http(server, "POST", f"/v1/images/jobs/{job_id}/cancel", client.api_key)
    assert status == 200
    await asyncio.wait_for(fake.cancelled.wait(), 30)  # the prediction is cancelled at Replicate too
