"""The polling vendors (fal, Replicate, DashScope) as a flaky or hostile vendor behaves, end to end: the
official openai package -> the proxy -> each vendor's fake, with one call of its wire format taken over.

What must hold: a job that already runs (or already ran) is neither abandoned nor submitted again for a
hiccup of its status or result endpoint (that would pay for it twice); a rate-limited poll waits as long as
the vendor asks; a vendor answer steers no call anywhere else; a call's images are exactly the ones asked.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import inspect
import io
import time

import pytest
from aiohttp import web
from openai import InternalServerError
from PIL import Image

from proxy.providers import dashscope as dashscope_provider
from proxy.providers import fal as fal_provider

from .conftest import base_config
from .fake_dashscope import FakeDashScope
from .fake_fal import FakeFal
from .fake_openai_upstream import SMALL_SIZES, seed_colour
from .fake_replicate import FakeReplicate

FAL_KEY = "fal-id-1234:fal-secret-5678"
DS_KEY = "ds-secret-key-0123456789"
SMALL_NATIVE = ["104*58", "83*83", "58*104", "92*71", "71*92"]


# ---- fakes with one call taken over --------------------------------------------------------------------


class Throttle:
    """A status endpoint rate limited for `window` seconds from its first poll: 429 with Retry-After."""

    def __init__(self, window: float = 1.0, retry_after: str = "0.3"):
        self.window, self.retry_after = window, retry_after
        self.started: float | None = None
        self.answered = 0  # 429s given

    def now(self) -> bool:
        t = time.monotonic()
        self.started = t if self.started is None else self.started
        if t - self.started < self.window:
            self.answered += 1
            return True
        return False


class TakenFal(FakeFal):
    """FakeFal whose status and result answers go through `on_status` / `on_result` first: each gets the
    request and the fake's own answer, and returns (or awaits) it or another one."""

    on_status = on_result = None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        answer = await super().dispatch(request)
        parts = [p for p in request.path.split("/") if p]
        if request.method != "GET" or "requests" not in parts:
            return answer
        hook = self.on_status if parts[-1] == "status" else self.on_result
        taken = hook(request, answer) if hook else answer
        return await taken if inspect.isawaitable(taken) else taken


class TakenReplicate(FakeReplicate):
    on_poll = None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.on_poll and request.method == "GET" and request.path.startswith("/v1/predictions/"):
            taken = self.on_poll(request)
            if taken is not None:
                return taken
        return await super().dispatch(request)


class TakenDashScope(FakeDashScope):
    on_poll = on_submit = None

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        if self.on_poll and request.method == "GET" and "/tasks/" in request.path:
            taken = self.on_poll(request)
            if inspect.isawaitable(taken):
                taken = await taken
            if taken is not None:
                return taken
        answer = await super().dispatch(request)
        if self.on_submit and request.path.endswith("/image-synthesis"):
            return self.on_submit(answer)
        return answer


# ---- configs -------------------------------------------------------------------------------------------


def config(tmp_path, provider: dict, route: dict) -> dict:
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["vendor"] = provider
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": [{"provider": "vendor", **route}]}
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    return cfg


async def start_fal(start_proxy, tmp_path, aiohttp_server, route: dict | None = None, **options):
    fal = await TakenFal().start(aiohttp_server)
    provider = {"kind": "fal", "base_url": fal.url, "api_key": "${FAL_KEY}", "poll_interval": 0.01,
                "poll_max_interval": 0.05, **options}
    _, client = await start_proxy(config(tmp_path, provider, {"model": "fal-ai/qwen-image", **(route or {})}),
                                  env={"FAL_KEY": FAL_KEY})
    return fal, client


async def start_replicate(start_proxy, tmp_path, aiohttp_server, route: dict | None = None, **knobs):
    fake = await TakenReplicate(**knobs).start(aiohttp_server)
    provider = {"kind": "replicate", "base_url": fake.base_url, "api_key": fake.api_key, "wait_seconds": 0,
                "poll_interval": 0.01, "poll_max_interval": 0.04}
    _, client = await start_proxy(config(tmp_path, provider, {"model": "qwen/qwen-image", **(route or {})}))
    return fake, client


async def start_dashscope(start_proxy, tmp_path, aiohttp_server, route: dict | None = None, *,
                          fake_knobs: dict | None = None, **options):
    fake = await TakenDashScope(api_key=DS_KEY, allowed_sizes=tuple(SMALL_NATIVE),
                                **(fake_knobs or {})).start(aiohttp_server)
    provider = {"kind": "dashscope", "base_url": fake.base_url, "api_key": DS_KEY, "sizes": SMALL_NATIVE,
                "poll_interval": 0.005, "poll_max_interval": 0.02, **options}
    _, client = await start_proxy(config(tmp_path, provider, {"model": "qwen-image", **(route or {})}))
    return fake, client


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def near(im: Image.Image, colour) -> bool:
    pixel = im.convert("RGB").getpixel((im.width // 2, im.height // 2))
    return all(abs(a - b) <= 10 for a, b in zip(pixel, colour, strict=True))


# ---- a job that ran is not submitted again -------------------------------------------------------------


@pytest.mark.parametrize("hiccup", [
    web.json_response({"detail": "upstream connect error"}, status=500),
    web.json_response({"detail": "Too many requests"}, status=429, headers={"Retry-After": "0"}),
    web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html"),
], ids=["500", "429", "html-200"])
async def test_fal_result_hiccup_is_fetched_again_not_submitted_again(start_proxy, tmp_path, aiohttp_server,
                                                                      hiccup):
    fal, client = await start_fal(start_proxy, tmp_path, aiohttp_server)
    hiccups = [hiccup]
    fal.on_result = lambda request, answer: hiccups.pop() if hiccups else answer
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                     extra_body={"seed": 7})
    im = decode(r.data[0].b64_json)
    assert im.size == (64, 64) and near(im, seed_colour(7))
    assert len(fal.submits) == 1 and len(fal.result_calls) == 2
    assert fal.cancel_calls == []


async def test_fal_status_answer_that_is_not_json_is_sat_out(start_proxy, tmp_path, aiohttp_server):
    # A proxy in front of fal answers one poll with an HTML page (HTTP 200): the request runs on.
    fal, client = await start_fal(start_proxy, tmp_path, aiohttp_server)
    hiccups = [web.Response(text="<html>upstream hiccup</html>", content_type="text/html")]
    fal.on_status = lambda request, answer: hiccups.pop() if hiccups else answer
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                     extra_body={"seed": 8})
    assert near(decode(r.data[0].b64_json), seed_colour(8))
    assert len(fal.submits) == 1 and fal.cancel_calls == []


# ---- a rate-limited poll waits as asked ----------------------------------------------------------------


def _throttled(vendor: str, throttle: Throttle) -> web.Response | None:
    if not throttle.now():
        return None
    headers = {"Retry-After": throttle.retry_after}
    if vendor == "fal":
        return web.json_response({"detail": "Too many requests"}, status=429, headers=headers)
    if vendor == "replicate":
        return web.json_response({"title": "Request was throttled.", "status": 429,
                                  "detail": "Request was throttled. Expected available in 1 second."},
                                 status=429, headers=headers)
    return web.json_response({"code": "Throttling.RateQuota", "request_id": "r-1",
                              "message": "Requests rate limit exceeded, please try again later."},
                             status=429, headers=headers)


@pytest.mark.parametrize("vendor", ["fal", "replicate", "dashscope"])
async def test_throttled_polls_wait_for_retry_after_and_keep_the_job(start_proxy, tmp_path, aiohttp_server,
                                                                      vendor):
    # The status endpoint is rate limited for a second (Retry-After: 0.3 s each time); the job runs on.
    throttle = Throttle()
    if vendor == "fal":
        fake, client = await start_fal(start_proxy, tmp_path, aiohttp_server)
        fake.on_status = lambda request, answer: _throttled("fal", throttle) or answer
        colour, submits, cancels = seed_colour(5), lambda: fake.submits, lambda: fake.cancel_calls
    elif vendor == "replicate":
        fake, client = await start_replicate(start_proxy, tmp_path, aiohttp_server, polls_before_done=1)
        fake.on_poll = lambda request: _throttled("replicate", throttle)
        colour, submits, cancels = seed_colour(5), lambda: fake.creates, lambda: fake.cancels
    else:
        fake, client = await start_dashscope(start_proxy, tmp_path, aiohttp_server)
        fake.on_poll = lambda request: _throttled("dashscope", throttle)
        colour, submits, cancels = seed_colour(5), lambda: fake.submits, lambda: fake.cancels
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                     extra_body={"seed": 5})
    assert near(decode(r.data[0].b64_json), colour)
    assert len(submits()) == 1 and cancels() == []
    # 0.3 s apart within the second: not a poll every few milliseconds.
    assert 1 <= throttle.answered <= 5


# ---- an answer steers no call elsewhere ----------------------------------------------------------------


async def test_dashscope_task_id_cannot_steer_the_poll(start_proxy, tmp_path, aiohttp_server):
    fake, client = await start_dashscope(start_proxy, tmp_path, aiohttp_server, route={"retries": 0})
    hostile = "../services/aigc/multimodal-generation/generation?x="
    fake.on_submit = lambda answer: web.json_response(
        {"output": {"task_status": "PENDING", "task_id": hostile}, "request_id": "r-1"})
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert e.value.status_code == 502 and "task_id" in e.value.message
    # Only the submit: no poll (nor cancel) went to another endpoint with the key.
    assert [(r.method, r.path) for r in fake.requests] == [("POST", "/api/v1/services/aigc/text2image/image-synthesis")]


# ---- a call's images are the ones it asked for ---------------------------------------------------------


async def test_fal_images_beyond_num_images_are_not_taken_for_the_next_call(start_proxy, tmp_path,
                                                                            aiohttp_server):
    # n=6 is two calls (4 + 2, seeds 40 and 44); fal answers one image more than num_images each time.
    fal, client = await start_fal(start_proxy, tmp_path, aiohttp_server, max_images_per_call=4)
    real_output = fal.make_output

    def one_more(body, base, input_size=None):
        out = real_output({**body, "num_images": body["num_images"] + 1}, base, input_size)
        out["has_nsfw_concepts"] = out["has_nsfw_concepts"][:-1]
        return out

    fal.make_output = one_more
    r = await client.images.generate(model="qwen-image", prompt="p", n=6, response_format="b64_json",
                                     extra_body={"seed": 40})
    assert r.to_dict()["seeds"] == list(range(40, 46))
    assert [near(decode(d.b64_json), seed_colour(40 + i)) for i, d in enumerate(r.data)] == [True] * 6


async def test_dashscope_results_beyond_n_are_not_taken_for_the_next_call(start_proxy, tmp_path, aiohttp_server):
    fake, client = await start_dashscope(start_proxy, tmp_path, aiohttp_server, max_images_per_call=4,
                                         fake_knobs={"max_n": 4})
    real_finish = fake._finish

    async def one_more(request, task):
        await real_finish(request, task)
        if task.results:  # the task's images again, with a surplus one (its last) at the end
            task.results = [*task.results, task.results[-1]]

    fake._finish = one_more
    r = await client.images.generate(model="qwen-image", prompt="p", n=6, response_format="b64_json",
                                     extra_body={"seed": 40})
    assert r.to_dict()["seeds"] == list(range(40, 46))
    assert [near(decode(d.b64_json), seed_colour(40 + i)) for i, d in enumerate(r.data)] == [True] * 6



# ---- a status the vendor never documented ----------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["replicate", "dashscope"])
async def test_an_unknown_job_status_fails_the_attempt_instead_of_polling_to_the_timeout(
        start_proxy, tmp_path, aiohttp_server, vendor):
    # Every poll answers a status the vendor does not document: like fal's, a few in a row fail the attempt
    # (so the next route can serve), instead of polling until the route's timeout runs out.
    route = {"retries": 0, "timeout": 20}
    if vendor == "replicate":
        fake, client = await start_replicate(start_proxy, tmp_path, aiohttp_server, route, polls_before_done=None)
        fake.on_poll = lambda request: web.json_response(
            {"id": request.path.rsplit("/", 1)[-1], "status": "hibernating", "output": None, "urls": {}})
    else:
        fake, client = await start_dashscope(start_proxy, tmp_path, aiohttp_server, route)
        fake.on_poll = lambda request: web.json_response(
            {"output": {"task_id": "t", "task_status": "SUSPENDED"}, "request_id": "r-1"})
    started = time.monotonic()
    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="p")
    assert time.monotonic() - started < 10
    assert e.value.status_code == 502 and "unknown" in e.value.message
    assert ("hibernating" if vendor == "replicate" else "SUSPENDED") in e.value.message


# ---- a poll that gets no answer ------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", ["fal", "dashscope"])
async def test_a_status_poll_that_hangs_is_made_again_and_the_job_kept(start_proxy, tmp_path, aiohttp_server,
                                                                        monkeypatch, vendor):
    # One status poll never answers: it is given up after the per-call limit and made again, and the job
    # runs on (neither cancelled and submitted a second time, nor waited for until the route's timeout).
    monkeypatch.setattr(fal_provider, "CALL_TIMEOUT", 0.3)
    monkeypatch.setattr(dashscope_provider, "POLL_TIMEOUT", 0.3, raising=False)
    release, hangs = asyncio.Event(), [True]

    async def hang_once(answer):
        if hangs:
            hangs.pop()
            await asyncio.wait_for(release.wait(), 10)
        return answer

    route = {"retries": 0, "timeout": 5}
    if vendor == "fal":
        fake, client = await start_fal(start_proxy, tmp_path, aiohttp_server, route)
        fake.on_status = lambda request, answer: hang_once(answer)
        submits, cancels = lambda: fake.submits, lambda: fake.cancel_calls
    else:
        fake, client = await start_dashscope(start_proxy, tmp_path, aiohttp_server, route)
        fake.on_poll = lambda request: hang_once(None)
        submits, cancels = lambda: fake.submits, lambda: fake.cancels
    started = time.monotonic()
    try:
        r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json",
                                         extra_body={"seed": 6})
    finally:
        release.set()
    assert near(decode(r.data[0].b64_json), seed_colour(6))
    assert time.monotonic() - started < 4
    assert len(submits()) == 1 and cancels() == []
