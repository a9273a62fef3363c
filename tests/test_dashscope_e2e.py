"""End to end: the openai package -> the proxy -> a dashscope route -> the fake DashScope."""

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
from openai import BadRequestError, InternalServerError, RateLimitError
from PIL import Image

from .conftest import base_config
from .fake_dashscope import ASYNC_PATH, SYNC_PATH, FakeDashScope
from .fake_openai_upstream import SMALL_SIZES, seed_colour

# The vendor's five shapes at a sixteenth of their size: quick to draw, and still other shapes than the
# small table's (80x64 is 1.25, its nearest here 92*71 is 1.30), so the proxy must crop.
SMALL_NATIVE = ["104*58", "83*83", "58*104", "92*71", "71*92"]
KEY = "ds-secret-key-0123456789"


@pytest.fixture
def fake_dashscope(aiohttp_server):
    async def make(**kwargs) -> FakeDashScope:
        kwargs.setdefault("api_key", KEY)
        kwargs.setdefault("allowed_sizes", tuple(SMALL_NATIVE))
        return await FakeDashScope(**kwargs).start(aiohttp_server)

    return make


def ds_config(tmp_path, fake: FakeDashScope, *, key: str = KEY, routes: list | None = None,
              model: str = "qwen-image", **options) -> dict:
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    provider = {"kind": "dashscope", "base_url": fake.base_url, "api_key": key, "sizes": SMALL_NATIVE,
                "poll_interval": 0.005, "poll_max_interval": 0.02, **options}
    cfg["providers"]["dash"] = {k: v for k, v in provider.items() if v is not None}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": routes or [{"provider": "dash", "model": model}]}
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    return cfg


WITH_FALLBACK = [{"provider": "dash", "model": "qwen-image"}, "placeholder"]


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def assert_colour(im: Image.Image, seed: int) -> None:
    pixel = im.convert("RGB").getpixel((im.width // 2, im.height // 2))
    assert all(abs(a - b) <= 2 for a, b in zip(pixel, seed_colour(seed), strict=True)), (pixel, seed)


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# ---- what the fake receives, what the client gets --------------------------------------------------


async def test_async_conversion_n_and_seeds(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope(pending_polls=2, running_polls=2)
    _, client = await start_proxy(ds_config(tmp_path, fake, model="qwen-image-plus"), api_key="client-key-123")
    extras = {"watermark": True, "go_fast": True, "acceleration": "high", "enable_safety_checker": False,
              "some_unknown": 1, "cfg_scale": 3.5, "num_inference_steps": 20,
              "loras": [{"path": "owner/lora", "scale": 0.7}]}
    raw = await client.images.with_raw_response.generate(
        model="qwen-image", prompt="a fox", n=3, response_format="b64_json",
        extra_body={"seed": 10, "aspect_ratio": "16:9", "negative_prompt": "blur", **extras})
    r = raw.parse()
    assert raw.headers["x-qip-route"] == "dash"

    # n=3 with one image per call: three tasks, seed + i each, only DashScope's fields.
    assert len(fake.submits) == 3
    bodies = sorted((s.json for s in fake.submits), key=lambda b: b["parameters"]["seed"])
    for i, body in enumerate(bodies):
        assert body == {"model": "qwen-image-plus", "input": {"prompt": "a fox"},
                        "parameters": {"size": "104*58", "n": 1, "seed": 10 + i, "negative_prompt": "blur",
                                       "watermark": True}}
    for sent in fake.submits:
        assert sent.headers["Authorization"] == f"Bearer {KEY}"
        assert sent.headers["X-DashScope-Async"] == "enable"
        assert "client-key-123" not in json.dumps(dict(sent.headers))
    # Each task polled PENDING, PENDING, RUNNING, RUNNING, then SUCCEEDED; nothing cancelled.
    assert [t.polls for t in fake.tasks.values()] == [5, 5, 5]
    assert {t.status for t in fake.tasks.values()} == {"SUCCEEDED"}
    assert fake.cancels == [] and len(fake.downloads) == 3

    # In seed order, cropped to the resolved size, with the rewritten prompt.
    assert r.to_dict()["seeds"] == [10, 11, 12]
    for i, item in enumerate(r.data):
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("PNG", (112, 64))
        assert_colour(im, 10 + i)
        assert item.revised_prompt == "a fox, rewritten by the fake"


async def test_prompt_enhancement_off_and_formats(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    server, client = await start_proxy(ds_config(tmp_path, fake))
    r = await client.images.generate(model="qwen-image", prompt="a boat", output_format="webp",
                                     output_compression=40, response_format="url",
                                     extra_body={"aspect_ratio": "4:3", "prompt_enhancement": "off", "seed": 3})
    params = fake.submits[0].json["parameters"]
    assert params == {"size": "92*71", "n": 1, "seed": 3, "prompt_extend": False}
    assert r.data[0].revised_prompt == "a boat"
    # Re-hosted by the proxy (the OSS link expires), converted to webp, cropped to 80x64.
    assert r.data[0].url.startswith(str(server.make_url("/images/")))
    assert fake.url not in r.data[0].url
    async with aiohttp.ClientSession() as s, s.get(r.data[0].url) as resp:
        im = Image.open(io.BytesIO(await resp.read()))
    assert (im.format, im.size) == ("WEBP", (80, 64))
    assert r.output_format == "webp"


@pytest.mark.parametrize(("model", "mode"), [("qwen-image-max", None), ("qwen-image", "sync")])
async def test_sync_mode_with_the_vendor_sizes(start_proxy, tmp_path, fake_dashscope, model, mode):
    # The real size set: the fake draws a 1664x928 image for 16:9 and the proxy brings it to 112x64.
    fake = await fake_dashscope(allowed_sizes=("1664*928", "1328*1328", "928*1664", "1472*1140", "1140*1472"))
    cfg = ds_config(tmp_path, fake, model=model, mode=mode, sizes=None)
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="a castle", size="16:9", response_format="b64_json",
                                     extra_body={"seed": 5, "watermark": False})
    assert fake.submits == [] and fake.polls == []
    (sent,) = fake.sync_calls
    assert "X-DashScope-Async" not in sent.headers
    assert sent.json == {"model": model,
                         "input": {"messages": [{"role": "user", "content": [{"text": "a castle"}]}]},
                         "parameters": {"size": "1664*928", "n": 1, "seed": 5, "watermark": False}}
    im = decode(r.data[0].b64_json)
    assert (im.format, im.size) == ("PNG", (112, 64))
    assert_colour(im, 5)
    assert r.data[0].revised_prompt == "a castle"


async def test_seed_beyond_dashscope_range_wraps(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    _, client = await start_proxy(ds_config(tmp_path, fake))
    r = await client.images.generate(model="qwen-image", prompt="p", n=2, response_format="b64_json",
                                     extra_body={"seed": 2**32 - 1})
    assert sorted(s.json["parameters"]["seed"] for s in fake.submits) == [0, 2**31 - 1]
    assert r.to_dict()["seeds"] == [2**32 - 1, 0]  # the client's seeds (seed + i wraps at 2**32)
    assert_colour(decode(r.data[0].b64_json), 2**31 - 1)


# ---- cancellation -------------------------------------------------------------------------------------


async def test_client_disconnect_cancels_the_task(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope(hold=True)
    server, _ = await start_proxy(ds_config(tmp_path, fake))

    async def request():
        async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/generations"),
                                                        json={"model": "qwen-image", "prompt": "slow"}) as r:
            return r.status

    task = asyncio.ensure_future(request())
    await wait_for(lambda: len(fake.polls) >= 2)
    task.cancel()  # the connection closes: the proxy cancels the request
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.wait_for(fake.cancelled.wait(), 30)
    ((task_id, remote),) = fake.tasks.items()
    assert remote.status == "CANCELED"
    assert fake.cancels[0].path.endswith(f"/tasks/{task_id}/cancel")
    assert fake.cancels[0].headers["Authorization"] == f"Bearer {KEY}"
    polls = len(fake.polls)
    await asyncio.sleep(0.2)
    assert len(fake.polls) == polls  # polling stopped


async def test_route_deadline_cancels_the_task_and_falls_back(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope(hold=True)
    routes = [{"provider": "dash", "model": "qwen-image", "timeout": 0.3, "retries": 0}, "placeholder"]
    _, client = await start_proxy(ds_config(tmp_path, fake, routes=routes))
    started = time.monotonic()
    raw = await client.images.with_raw_response.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert time.monotonic() - started < 15  # the held task never ends: only the 0.3 s deadline stops it
    assert raw.headers["x-qip-route"] == "placeholder"
    assert decode(raw.parse().data[0].b64_json).size == (64, 64)
    await asyncio.wait_for(fake.cancelled.wait(), 30)
    assert [t.status for t in fake.tasks.values()] == ["CANCELED"]


# ---- failures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["task_failed", "task_canceled", "task_unknown", "submit_500",
                                     "submit_200_error", "polls_fail", "result_url_gone", "unreachable"])
async def test_failures_fall_back_to_the_next_route(start_proxy, tmp_path, fake_dashscope, failure):
    fake = await fake_dashscope()
    if failure == "task_failed":
        fake.fail_task("InternalError.Algo", "An internal error has occured during execution")
    elif failure == "task_canceled":
        fake.fail_task("", "", final_status="CANCELED")
    elif failure == "task_unknown":
        fake.fail_task("", "", final_status="UNKNOWN")
    elif failure == "submit_500":
        fake.fail_call(500, "InternalError", "The request processing has failed due to some unknown error.")
    elif failure == "submit_200_error":
        fake.fail_call(200, "InternalError", "an error in an HTTP 200")
    elif failure == "polls_fail":
        fake.fail_poll(500, "InternalError", "poll failed")
    elif failure == "result_url_gone":
        fake.serve_files = False
    cfg = ds_config(tmp_path, fake, routes=WITH_FALLBACK)
    if failure == "unreachable":
        cfg["providers"]["dash"]["base_url"] = "http://127.0.0.1:9/api/v1"
    _, client = await start_proxy(cfg)
    raw = await client.images.with_raw_response.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert raw.headers["x-qip-route"] == "placeholder"
    assert decode(raw.parse().data[0].b64_json).size == (64, 64)
    # The failing route was tried three times (the first call and 2 retries).
    assert len(fake.submits) == (0 if failure == "unreachable" else 3)
    if failure == "polls_fail":
        # 1 + 3 tolerated failures per task, then given up and cancelled (the tasks were still PENDING).
        assert len(fake.polls) == 12
        await wait_for(lambda: len(fake.cancels) == 3)
        assert {t.status for t in fake.tasks.values()} == {"CANCELED"}
    else:
        assert fake.cancels == []


async def test_a_few_failed_polls_are_sat_out(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    fake.fail_poll(503, "ServiceUnavailable", "busy", times=2)
    _, client = await start_proxy(ds_config(tmp_path, fake))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(fake.submits) == 1 and len(fake.polls) == 2 + 3  # two failed, then PENDING, RUNNING, SUCCEEDED


@pytest.mark.parametrize(("where", "code", "message", "param"), [
    ("call", "InvalidParameter", "Range of input length should be [1, 800]", None),
    ("call_200", "InvalidParameter", "The size is not match the allowed size", "size"),
    ("call", "DataInspectionFailed", "Input data may contain inappropriate content.", None),
    ("task", "DataInspectionFailed", "Output data may contain inappropriate content.", None),
    ("task", "InvalidParameter", "negative_prompt is not valid", "negative_prompt"),
])
async def test_client_errors_are_400_without_fallback(start_proxy, tmp_path, fake_dashscope, where, code, message,
                                                      param):
    fake = await fake_dashscope()
    if where == "task":
        fake.fail_task(code, message)
    else:
        fake.fail_call(200 if where == "call_200" else 400, code, message)
    _, client = await start_proxy(ds_config(tmp_path, fake, routes=WITH_FALLBACK))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 400
    assert message in e.value.message and code in e.value.message
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"
    if code == "DataInspectionFailed":
        assert e.value.body["code"] == "content_policy_violation"
    assert len(fake.submits) == 1  # never retried, never fell back


async def test_a_size_the_vendor_refuses_is_its_400(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    _, client = await start_proxy(ds_config(tmp_path, fake, sizes=["64*64"]))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert "The size is not match the allowed size" in e.value.message
    assert e.value.body["param"] == "size"


@pytest.mark.parametrize(("field", "value", "limit"), [("prompt", "x" * 801, 800),
                                                       ("negative_prompt", "y" * 501, 500)])
async def test_limits_refused_before_calling(start_proxy, tmp_path, fake_dashscope, field, value, limit):
    fake = await fake_dashscope()
    _, client = await start_proxy(ds_config(tmp_path, fake, routes=WITH_FALLBACK))
    kwargs = {"prompt": value} if field == "prompt" else {"prompt": "p", "extra_body": {field: value}}
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", **kwargs)
    assert e.value.body["param"] == field and str(limit) in e.value.message
    assert fake.requests == []


async def test_watermark_must_be_a_boolean(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    _, client = await start_proxy(ds_config(tmp_path, fake))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", prompt="p", extra_body={"watermark": "maybe"})
    assert e.value.body["param"] == "watermark"
    assert fake.requests == []


async def test_auth_failure_is_502_naming_the_route(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    wrong = "ds-wrong-key-9876543210"
    _, client = await start_proxy(ds_config(tmp_path, fake, key=wrong))
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 502
    text = e.value.response.text
    assert "route 'dash'" in text and "upstream authentication failed" in text and "InvalidApiKey" in text
    assert wrong not in text and KEY not in text
    assert len(fake.submits) == 1  # a refused key is not tried again on the same route


async def test_rate_limited_once_then_served(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    fake.fail_call(429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.",
                   times=1, retry_after="0")
    _, client = await start_proxy(ds_config(tmp_path, fake))
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (64, 64)
    assert len(fake.submits) == 2


async def test_rate_limited_is_429_with_retry_after(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    fake.fail_call(429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.",
                   retry_after="2")
    _, client = await start_proxy(ds_config(tmp_path, fake, routes=[{"provider": "dash", "retries": 0}]))
    with pytest.raises(RateLimitError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.response.headers["retry-after"] == "2"
    assert "Throttling.RateQuota" in e.value.message
    assert len(fake.submits) == 1


async def test_missing_key_skips_the_route(start_proxy, tmp_path, fake_dashscope):
    fake = await fake_dashscope()
    cfg = ds_config(tmp_path, fake, key="${QIP_TEST_DASHSCOPE_KEY}", routes=WITH_FALLBACK)
    cfg["models"]["dash-only"] = {"sizes": "small", "routes": ["dash"]}
    _, client = await start_proxy(cfg, env={})
    raw = await client.images.with_raw_response.generate(model="qwen-image", prompt="p")
    assert raw.headers["x-qip-route"] == "placeholder"
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="dash-only", prompt="p")
    assert e.value.status_code == 503 and "QIP_TEST_DASHSCOPE_KEY" in e.value.message
    assert fake.requests == []


# ---- the fake speaks the protocol ------------------------------------------------------------------


async def test_fake_refuses_an_async_call_without_the_header(fake_dashscope):
    fake = await fake_dashscope()
    body = {"model": "qwen-image", "input": {"prompt": "p"}, "parameters": {"size": "83*83"}}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{fake.url}{ASYNC_PATH}", json=body, headers=headers) as r:
            assert r.status == 403
            assert await r.json() == {"code": "AccessDenied", "request_id": (await r.json())["request_id"],
                                      "message": "current user api does not support synchronous calls"}
        async with s.post(f"{fake.url}{SYNC_PATH}", json=body, headers={**headers, "X-DashScope-Async": "enable"}) as r:
            assert r.status == 403
        async with s.get(f"{fake.url}/api/v1/tasks/no-such-task", headers=headers) as r:
            assert (await r.json())["output"]["task_status"] == "UNKNOWN"
        async with s.post(f"{fake.url}{ASYNC_PATH}", json=body, headers={"Authorization": "Bearer nope",
                                                                         "X-DashScope-Async": "enable"}) as r:
            assert r.status == 401 and (await r.json())["code"] == "InvalidApiKey"
