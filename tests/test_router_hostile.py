"""The router against a hostile world: flapping upstreams, short answers, stale requests around a
half-open breaker, deadlines that leave routes untried (the openai package where a user would notice)."""

from __future__ import annotations

import asyncio
import copy
import logging

import pytest
from aiohttp import web
from openai import APIStatusError

from proxy.errors import InvalidRequest, UpstreamError, UpstreamTimeout

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream, seed_colour
from .test_generations_e2e import decode
from .test_router import FakeProvider, hang, ok, request, router_for, soon


class FlappingUpstream(FakeOpenAIUpstream):
    """Fails every other image call (the 2nd, 4th, ...) with a 502, whatever order they arrive in."""

    async def _generations(self, request: web.Request, received) -> web.Response:
        if len(self.image_calls) % 2 == 0:
            return self.error(502, "BAD_GATEWAY", "flapped")
        return await super()._generations(request, received)


def one_route_config(tmp_path, up: FakeOpenAIUpstream, **route) -> dict:
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(SMALL_SIZES)
    cfg["providers"]["a"] = {"kind": "openai", "base_url": f"{up.url}/openai/v1", "api_key": up.api_key}
    cfg["models"]["qwen-image"] = {"sizes": "small", "routes": [{"provider": "a", **route}]}
    cfg["routing"] = {"retries": 2, "backoff_base": 0.01, "backoff_max": 0.05}
    return cfg


# --- n split into calls: what succeeded is kept -----------------------------------------------------------


async def test_an_upstream_failing_every_other_call_still_serves_n(start_proxy, tmp_path, aiohttp_server):
    # Before: each attempt remade all 4 calls, so every attempt had a failed call: 12 calls, then a 502.
    up = await FlappingUpstream().start(aiohttp_server)
    _, client = await start_proxy(one_route_config(tmp_path, up, max_images_per_call=1))
    r = await client.images.generate(model="qwen-image", prompt="p", n=4, response_format="b64_json",
                                     extra_body={"seed": 10})
    colours = [decode(d.b64_json).convert("RGB").getpixel((0, 0)) for d in r.data]
    assert colours == [seed_colour(s) for s in (10, 11, 12, 13)]
    # 4 calls (2 fail), then the 2 failed ones (1 fails), then the last one.
    assert len(up.image_calls) == 7


class OneImageMore(FakeOpenAIUpstream):
    """Answers every image call with one image more than its `n` asked for (seed + n for the extra one)."""

    async def _generations(self, request: web.Request, received) -> web.Response:
        received.json["n"] = int(received.json.get("n") or 1) + 1
        return await super()._generations(request, received)


async def test_a_surplus_image_is_not_taken_for_the_next_calls(start_proxy, tmp_path, aiohttp_server):
    # n=4 in two calls of 2 (seeds 40 and 42), each answered with 3 images. Before: the first call's extra
    # image was taken for the second call's first one, so the answer held seed 42's image twice, labelled
    # 42 and 42, and seed 43's was lost.
    up = await OneImageMore().start(aiohttp_server)
    _, client = await start_proxy(one_route_config(tmp_path, up, max_images_per_call=2))
    r = await client.images.generate(model="qwen-image", prompt="p", n=4, response_format="b64_json",
                                     extra_body={"seed": 40})
    assert r.to_dict()["seeds"] == [40, 41, 42, 43]
    colours = [decode(d.b64_json).convert("RGB").getpixel((0, 0)) for d in r.data]
    assert colours == [seed_colour(s) for s in (40, 41, 42, 43)]


def per_call(behaviours: dict[int, list]):
    """A provider behaviour by the chunk's first image: each call takes the next of its list."""
    async def behaviour(req):
        step = behaviours[req.first_index].pop(0)
        if isinstance(step, asyncio.Event):
            await step.wait()
            return await ok(req)
        if isinstance(step, BaseException):
            raise step
        return [] if step == "short" else await ok(req)

    return behaviour


@pytest.mark.parametrize("failure", [UpstreamError("HTTP 502"), "short"])
async def test_a_failed_call_is_retried_alone_and_its_sibling_is_not_cancelled(failure):
    # The call for image 1 succeeds after the call for image 0 failed (or came back with no image): it
    # is neither cancelled nor made again. Before: 4 calls, the slow good one cancelled and remade.
    gate = asyncio.Event()
    a = FakeProvider("a", per_call({0: [failure, "ok"], 1: [gate, "ok"]}))
    task = asyncio.create_task(router_for(a, retries=1).generate(request(n=2, seed=3), soon()))
    await asyncio.sleep(0.05)
    gate.set()
    result = await task
    assert len(result.images) == 2 and [img.seed for img in result.images] == [3, 4]
    assert sorted(r.first_index for r, _ in a.calls) == [0, 0, 1]


async def test_images_a_finish_refused_are_all_made_again():
    # Which image was bad is not known: none of that attempt's images is reused.
    a = FakeProvider("a")
    refused = []

    async def finish(images, req, provider):
        if not refused:
            refused.append(True)
            raise UpstreamError("the route returned a bad image: PNG truncated")
        return images

    result = await router_for(a, retries=1).generate(request(n=2), soon(), finish)
    assert len(result.images) == 2
    assert len(a.calls) == 4


async def test_no_retry_left_cancels_the_siblings_at_once():
    a = FakeProvider("a", per_call({0: [UpstreamError("HTTP 502")], 1: [asyncio.Event()]}))
    with pytest.raises(UpstreamError) as e:
        await asyncio.wait_for(router_for(a, retries=0).generate(request(n=2), soon()), 30)
    assert "HTTP 502" in e.value.message


# --- the breaker's one probe ------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["cancelled", "client_error"])
async def test_a_stale_request_ending_does_not_let_a_second_probe_through(ending):
    # A request that reached route a while its breaker was closed ends (its client leaves, or a 400)
    # while a's one half-open probe is still running. Before: that freed the probe slot, and the next
    # request became a second concurrent probe of a route known to be failing.
    stale_gate, probe_gate = asyncio.Event(), asyncio.Event()
    calls = {"n": 0}

    async def behaviour(req):
        calls["n"] += 1
        if calls["n"] == 1:
            await stale_gate.wait()
            raise InvalidRequest("bad prompt")
        await probe_gate.wait()
        return await ok(req)

    a, b = FakeProvider("a", behaviour), FakeProvider("b")
    router = router_for(a, b, breaker_threshold=1, breaker_cooldown=0)
    breaker = router.routes["m"][0].breaker
    stale = asyncio.create_task(router.generate(request(), soon()))
    await asyncio.sleep(0.01)
    breaker.record(False)  # other requests failed meanwhile: open, and (cooldown 0) half-open
    probe = asyncio.create_task(router.generate(request(), soon()))
    await asyncio.sleep(0.01)
    assert calls["n"] == 2 and breaker.probing
    if ending == "cancelled":
        stale.cancel()
    else:
        stale_gate.set()
    with pytest.raises((asyncio.CancelledError, InvalidRequest)):
        await stale
    assert breaker.probing
    assert (await router.generate(request(), soon())).route.name == "b"
    assert calls["n"] == 2
    probe_gate.set()
    assert (await probe).route.name == "a"
    assert breaker.state == "closed" and not breaker.probing


async def test_the_breaker_says_when_it_opens_and_closes(caplog):
    a = FakeProvider("a", per_call({0: [UpstreamError("HTTP 500")] * 2 + ["ok"]}))
    router = router_for(a, FakeProvider("b"), breaker_threshold=2, breaker_cooldown=0)
    with caplog.at_level(logging.WARNING, logger="proxy.router"):
        for _ in range(3):
            await router.generate(request(), soon())
    lines = [r.getMessage() for r in caplog.records if "circuit" in r.getMessage()]
    assert any("route a" in line and "circuit open" in line and "2 failed requests" in line for line in lines)
    assert any("route a" in line and "circuit closed" in line for line in lines)


# --- the request deadline ---------------------------------------------------------------------------------


async def test_routes_the_deadline_left_untried_are_named():
    a, b = FakeProvider("a", hang), FakeProvider("b")
    router = router_for(a, b, routes=[{"provider": "a", "timeout": 30}, "b"])
    with pytest.raises(UpstreamTimeout) as e:
        await router.generate(request(), soon(0.1))
    assert "route 'a': the request deadline (server.request_timeout) passed after" in e.value.message
    assert "route 'b': skipped: the request deadline" in e.value.message
    assert b.calls == []


async def test_a_request_cut_by_request_timeout_is_a_504_that_says_so(start_proxy, tmp_path, aiohttp_server):
    slow = await FakeOpenAIUpstream(delay=30).start(aiohttp_server)
    spare = await FakeOpenAIUpstream(api_key="key-b").start(aiohttp_server)
    cfg = one_route_config(tmp_path, slow, timeout=60)
    cfg["providers"]["b"] = {"kind": "openai", "base_url": f"{spare.url}/openai/v1", "api_key": "key-b"}
    cfg["models"]["qwen-image"]["routes"].append("b")
    cfg["server"] = {"request_timeout": 0.5}
    _, client = await start_proxy(cfg)
    with pytest.raises(APIStatusError) as e:
        await asyncio.wait_for(client.images.generate(model="qwen-image", prompt="p"), 20)
    assert e.value.status_code == 504
    message = e.value.response.json()["error"]["message"]
    assert "server.request_timeout" in message and "route 'b'" in message
    assert spare.image_calls == []
