"""Router: fallback between routes, client errors, circuit breaking and deadlines (in-process fakes)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import ModelConfig, RouteConfig, RoutingConfig
from proxy.errors import (
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.providers.base import Capabilities, GeneratedImage, Provider
from proxy.request import ImageRequest
from proxy.routing.breaker import CircuitBreaker
from proxy.routing.router import Router

Behaviour = Callable[[ImageRequest], Awaitable[list[GeneratedImage]]]


class FakeProvider(Provider):
    kind = "fake"

    def __init__(self, name: str, behaviour: Behaviour | None = None, *, reason: str | None = None,
                 per_call: int = 1, timeout: float = 30):
        super().__init__(name, {"timeout": timeout})
        self.behaviour = behaviour or ok
        self.reason = reason
        self.capabilities = Capabilities(max_images_per_call=per_call)
        self.calls: list[tuple[ImageRequest, RouteConfig]] = []

    @property
    def unavailable_reason(self) -> str | None:
        return self.reason

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        self.calls.append((req, route))
        return await self.behaviour(req)


async def ok(req: ImageRequest) -> list[GeneratedImage]:
    return [GeneratedImage(data=b"img") for _ in range(req.n)]


def failing(error: Exception) -> Behaviour:
    async def behaviour(req):
        raise error

    return behaviour


async def hang(req: ImageRequest) -> list[GeneratedImage]:
    await asyncio.sleep(30)
    return []


def request(model: str = "m", **kwargs) -> ImageRequest:
    return ImageRequest(prompt="a cat", model=model, **kwargs)


def router_for(*providers: FakeProvider, routes: list | None = None, extra_models: dict | None = None,
               max_load_wait: float = 120, **routing) -> Router:
    """A router over fake providers; no retries within a route unless `retries` is given."""
    models = {"m": ModelConfig.model_validate({"sizes": "t", "routes": routes or [p.name for p in providers]})}
    for name, model_routes in (extra_models or {}).items():
        models[name] = ModelConfig.model_validate({"sizes": "t", "routes": model_routes})
    routing = {"retries": 0, "backoff_base": 0.01, "backoff_max": 0.05, **routing}
    return Router(models, {p.name: p for p in providers}, routing=RoutingConfig(**routing),
                  max_load_wait=max_load_wait)


def soon(seconds: float = 10) -> float:
    return time.monotonic() + seconds


# --- fallback -----------------------------------------------------------------------------------


async def test_first_route_serves_when_it_works():
    a, b = FakeProvider("a"), FakeProvider("b")
    result = await router_for(a, b).generate(request(), soon())
    assert result.route.name == "a"
    assert result.attempts == [("a", "ok")]
    assert len(result.images) == 1
    assert len(a.calls) == 1 and b.calls == []


@pytest.mark.parametrize(
    "error",
    [UpstreamError("HTTP 503: overloaded"), RateLimited("HTTP 429: slow down", retry_after=3),
     UpstreamTimeout("no answer within 5 s")],
)
async def test_retryable_errors_fall_back_to_the_next_route(error):
    a, b = FakeProvider("a", failing(error)), FakeProvider("b")
    result = await router_for(a, b).generate(request(), soon())
    assert result.route.name == "b"
    assert result.attempts == [("a", error.message), ("b", "ok")]
    assert len(a.calls) == 1 and len(b.calls) == 1


async def test_route_timeout_falls_back():
    a, b = FakeProvider("a", hang), FakeProvider("b")
    router = router_for(a, b, routes=[{"provider": "a", "timeout": 0.05}, "b"])
    t0 = time.monotonic()
    result = await router.generate(request(), soon())
    assert time.monotonic() - t0 < 10  # route a hangs for ever
    assert result.route.name == "b"
    assert result.attempts[0][0] == "a"
    assert "timed out" in result.attempts[0][1]


async def test_provider_default_timeout_applies_without_a_route_timeout():
    a, b = FakeProvider("a", hang, timeout=0.05), FakeProvider("b")
    result = await router_for(a, b).generate(request(), soon())
    assert result.route.name == "b"


async def test_invalid_request_returns_at_once():
    a = FakeProvider("a", failing(InvalidRequest("The upstream rejected the prompt", param="prompt")))
    b = FakeProvider("b")
    with pytest.raises(InvalidRequest) as e:
        await router_for(a, b).generate(request(), soon())
    assert e.value.param == "prompt"
    assert b.calls == []


async def test_invalid_request_does_not_trip_the_breaker():
    a = FakeProvider("a", failing(InvalidRequest("bad")))
    router = router_for(a, FakeProvider("b"))
    for _ in range(10):
        with pytest.raises(InvalidRequest):
            await router.generate(request(), soon())
    assert len(a.calls) == 10
    assert router.routes["m"][0].breaker.state == "closed"


async def test_route_config_reaches_the_provider():
    a = FakeProvider("a")
    router = router_for(a, routes=[{"provider": "a", "model": "qwen-image-upstream", "params": {"k": 1}}])
    await router.generate(request(), soon())
    route = a.calls[0][1]
    assert route.model == "qwen-image-upstream"
    assert route.params == {"k": 1}


async def test_n_is_split_by_the_route_and_seeds_follow():
    a = FakeProvider("a", per_call=4)
    router = router_for(a, routes=[{"provider": "a", "max_images_per_call": 2}])
    result = await router.generate(request(n=5, seed=10), soon())
    assert sorted((r.n, r.seed) for r, _ in a.calls) == [(1, 14), (2, 10), (2, 12)]
    assert [img.seed for img in result.images] == [10, 11, 12, 13, 14]


async def test_provider_capability_sets_images_per_call():
    a = FakeProvider("a", per_call=3)
    await router_for(a).generate(request(n=5), soon())
    assert sorted(r.n for r, _ in a.calls) == [2, 3]


async def test_a_route_that_makes_too_few_images_falls_back():
    async def short(req):
        return []

    a, b = FakeProvider("a", short), FakeProvider("b")
    result = await router_for(a, b).generate(request(n=2), soon())
    assert result.route.name == "b"
    assert "0 of 2" in result.attempts[0][1]


# --- when everything fails -------------------------------------------------------------------------


async def test_all_failed_is_a_502_naming_each_route():
    a = FakeProvider("a", failing(UpstreamError("HTTP 500: boom")))
    b = FakeProvider("b", failing(RateLimited("HTTP 429: busy", retry_after=1)))
    c = FakeProvider("c", hang)
    router = router_for(a, b, c, routes=["a", "b", {"provider": "c", "timeout": 0.05}])
    with pytest.raises(UpstreamError) as e:
        await router.generate(request(), soon())
    err = e.value
    assert type(err) is UpstreamError
    assert err.status == 502
    assert "route 'a': HTTP 500: boom" in err.message
    assert "route 'b': HTTP 429: busy" in err.message
    assert "route 'c': timed out" in err.message
    assert "'m'" in err.message


async def test_all_rate_limited_is_a_429_with_the_shortest_wait():
    a = FakeProvider("a", failing(RateLimited("busy", retry_after=7)))
    b = FakeProvider("b", failing(RateLimited("busy too", retry_after=3)))
    with pytest.raises(RateLimited) as e:
        await router_for(a, b).generate(request(), soon())
    assert e.value.status == 429
    assert e.value.retry_after == 3
    assert e.value.headers["Retry-After"] == "3"


async def test_all_rate_limited_without_a_wait():
    a = FakeProvider("a", failing(RateLimited("busy")))
    with pytest.raises(RateLimited) as e:
        await router_for(a).generate(request(), soon())
    assert e.value.retry_after is None
    assert "Retry-After" not in e.value.headers


async def test_all_timed_out_is_a_504():
    a = FakeProvider("a", failing(UpstreamTimeout("slow")))
    b = FakeProvider("b", hang)
    router = router_for(a, b, routes=["a", {"provider": "b", "timeout": 0.05}])
    with pytest.raises(UpstreamTimeout) as e:
        await router.generate(request(), soon())
    assert e.value.status == 504


async def test_no_usable_route_is_503_naming_the_reason():
    a = FakeProvider("a", reason="no API key (set A_KEY)")
    b = FakeProvider("b", reason="no CUDA GPU")
    with pytest.raises(ServiceUnavailable) as e:
        await router_for(a, b).generate(request(), soon())
    assert e.value.status == 503
    assert "route 'a': no API key (set A_KEY)" in e.value.message
    assert "route 'b': no CUDA GPU" in e.value.message
    assert a.calls == [] and b.calls == []


async def test_unusable_routes_are_passed_over():
    a = FakeProvider("a", reason="no API key (set A_KEY)")
    b = FakeProvider("b")
    router = router_for(a, b)
    assert [r.name for r in router.usable("m")] == ["b"]
    result = await router.generate(request(), soon())
    assert result.route.name == "b"
    assert a.calls == []


# --- circuit breaker --------------------------------------------------------------------------------


def test_breaker_unit(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("proxy.routing.router.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker(threshold=3, cooldown=10)
    for _ in range(2):
        breaker.record(False)
    assert breaker.state == "closed" and breaker.allow()
    breaker.record(False)
    assert breaker.state == "open" and not breaker.allow()
    now[0] += 9.9
    assert not breaker.allow()
    now[0] += 0.2
    assert breaker.state == "half_open"
    assert breaker.allow()  # the one probe...
    assert not breaker.allow()  # ...at a time
    breaker.record(False)  # which fails: open again at once, for a whole cooldown
    assert breaker.state == "open" and not breaker.allow()
    now[0] += 10.1
    assert breaker.allow()
    breaker.release()  # a probe that ended in a client error judges nothing: the slot frees
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()
    assert breaker.failures == 0


async def test_breaker_opens_after_threshold_and_skips_the_route():
    a, b = FakeProvider("a", failing(UpstreamError("down"))), FakeProvider("b")
    router = router_for(a, b)
    threshold = router.routes["m"][0].breaker.threshold
    for _ in range(threshold):
        assert (await router.generate(request(), soon())).route.name == "b"
    assert len(a.calls) == threshold

    result = await router.generate(request(), soon())
    assert len(a.calls) == threshold  # skipped
    assert result.route.name == "b"
    assert result.attempts[0][0] == "a"
    assert "circuit open" in result.attempts[0][1]


async def test_breaker_closes_after_cooldown_and_success_resets():
    outcomes = iter([UpstreamError("down")] * 2 + [None] * 10)

    async def flaky(req):
        error = next(outcomes)
        if error:
            raise error
        return await ok(req)

    a, b = FakeProvider("a", flaky), FakeProvider("b")
    router = router_for(a, b)
    breaker = router.routes["m"][0].breaker
    breaker.threshold, breaker.cooldown = 2, 0.05
    for _ in range(2):
        await router.generate(request(), soon())
    assert breaker.state == "open"
    assert (await router.generate(request(), soon())).route.name == "b"
    assert len(a.calls) == 2
    await asyncio.sleep(0.06)
    result = await router.generate(request(), soon())
    assert result.route.name == "a"
    assert len(a.calls) == 3
    assert breaker.failures == 0


async def test_breaker_never_skips_the_last_route():
    a = FakeProvider("a", failing(UpstreamError("down")))
    router = router_for(a)
    threshold = router.routes["m"][0].breaker.threshold
    for _ in range(threshold + 3):
        with pytest.raises(UpstreamError):
            await router.generate(request(), soon())
    assert len(a.calls) == threshold + 3


async def test_breaker_is_shared_by_models_using_the_same_provider():
    a, b = FakeProvider("a", failing(UpstreamError("down"))), FakeProvider("b")
    router = router_for(a, b, extra_models={"other": ["a", "b"], "solo": ["a"]})
    threshold = router.routes["m"][0].breaker.threshold
    for _ in range(threshold):
        await router.generate(request("m"), soon())
    assert len(a.calls) == threshold
    # another model with the same provider skips it too...
    assert (await router.generate(request("other"), soon())).route.name == "b"
    assert len(a.calls) == threshold
    # ...but where it is the last route it is still tried
    with pytest.raises(UpstreamError):
        await router.generate(request("solo"), soon())
    assert len(a.calls) == threshold + 1


async def test_breaker_open_on_every_route_still_tries_the_last():
    a = FakeProvider("a", failing(UpstreamError("a down")))
    b = FakeProvider("b", failing(UpstreamError("b down")))
    router = router_for(a, b)
    threshold = router.routes["m"][0].breaker.threshold
    for _ in range(threshold):
        with pytest.raises(UpstreamError):
            await router.generate(request(), soon())
    with pytest.raises(UpstreamError) as e:
        await router.generate(request(), soon())
    assert len(a.calls) == threshold and len(b.calls) == threshold + 1
    assert "circuit open" in e.value.message
    assert "b down" in e.value.message


# --- deadlines ---------------------------------------------------------------------------------------


async def test_deadline_cuts_a_slow_route_and_stops_the_walk():
    a, b = FakeProvider("a", hang), FakeProvider("b")
    router = router_for(a, b, routes=[{"provider": "a", "timeout": 30}, "b"])
    t0 = time.monotonic()
    with pytest.raises(UpstreamTimeout) as e:
        await router.generate(request(), time.monotonic() + 0.1)
    elapsed = time.monotonic() - t0
    assert 0.09 <= elapsed < 10  # not the route's 30 s
    assert b.calls == []
    assert "route 'a'" in e.value.message


async def test_deadline_already_passed_calls_nothing():
    a = FakeProvider("a")
    with pytest.raises(UpstreamTimeout) as e:
        await router_for(a).generate(request(), time.monotonic() - 1)
    assert a.calls == []
    assert "deadline" in e.value.message


async def test_route_timeout_is_capped_by_the_remaining_time():
    a = FakeProvider("a", failing(UpstreamError("down")))
    b = FakeProvider("b", hang)
    router = router_for(a, b, routes=["a", {"provider": "b", "timeout": 30}])
    t0 = time.monotonic()
    with pytest.raises(UpstreamError):
        await router.generate(request(), time.monotonic() + 0.1)
    assert time.monotonic() - t0 < 10  # not route b's 30 s
    assert len(b.calls) == 1


# --- retries within a route ----------------------------------------------------------------------------


def flaky_then_ok(*errors: Exception) -> Behaviour:
    """Fails with each error in turn, then succeeds."""
    pending = list(errors)

    async def behaviour(req):
        if pending:
            raise pending.pop(0)
        return await ok(req)

    return behaviour


async def test_a_flaky_route_is_retried_before_falling_back():
    a = FakeProvider("a", flaky_then_ok(UpstreamError("HTTP 502"), UpstreamError("HTTP 502")))
    b = FakeProvider("b")
    result = await router_for(a, b, retries=2).generate(request(), soon())
    assert result.route.name == "a"
    assert len(a.calls) == 3 and b.calls == []
    assert result.calls == 3
    assert [why for _, why in result.attempts] == ["HTTP 502", "HTTP 502", "ok"]


async def test_retries_run_out_then_the_next_route():
    a = FakeProvider("a", failing(UpstreamError("HTTP 500")))
    b = FakeProvider("b")
    result = await router_for(a, b, retries=2).generate(request(), soon())
    assert result.route.name == "b"
    assert len(a.calls) == 3
    assert result.calls == 4


async def test_route_retries_override():
    a = FakeProvider("a", failing(UpstreamError("HTTP 500")))
    router = router_for(a, FakeProvider("b"), retries=2, routes=[{"provider": "a", "retries": 0}, "b"])
    await router.generate(request(), soon())
    assert len(a.calls) == 1


async def test_client_errors_are_never_retried():
    a = FakeProvider("a", failing(InvalidRequest("bad prompt", param="prompt")))
    with pytest.raises(InvalidRequest):
        await router_for(a, retries=3).generate(request(), soon())
    assert len(a.calls) == 1


async def test_backoff_is_exponential_with_full_jitter(monkeypatch):
    waits: list[float] = []
    bounds: list[float] = []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds):
        waits.append(seconds)
        await real_sleep(0)

    def uniform(lo, hi):
        bounds.append(hi)
        return hi / 2

    monkeypatch.setattr("proxy.routing.router.asyncio.sleep", fake_sleep)
    monkeypatch.setattr("proxy.routing.router.random.uniform", uniform)
    a = FakeProvider("a", failing(UpstreamError("HTTP 500")))
    with pytest.raises(UpstreamError):
        await router_for(a, retries=4, backoff_base=0.5, backoff_max=3).generate(request(), soon(60))
    assert bounds == [0.5, 1.0, 2.0, 3.0]  # doubling, capped at backoff_max
    assert waits == [0.25, 0.5, 1.0, 1.5]


async def test_retry_after_is_honoured_on_the_same_route():
    a = FakeProvider("a", flaky_then_ok(UpstreamUnavailable("HTTP 503", retry_after=0.3)))
    t0 = time.monotonic()
    result = await router_for(a, retries=1, backoff_max=1).generate(request(), soon())
    assert 0.29 <= time.monotonic() - t0 < 10
    assert result.route.name == "a" and len(a.calls) == 2


async def test_a_long_retry_after_moves_on_when_another_route_is_left():
    a = FakeProvider("a", failing(RateLimited("busy", retry_after=30)))
    b = FakeProvider("b")
    t0 = time.monotonic()
    result = await router_for(a, b, retries=2, backoff_max=1).generate(request(), soon())
    assert time.monotonic() - t0 < 10  # not the 30 s Retry-After
    assert result.route.name == "b" and len(a.calls) == 1


async def test_a_retry_after_past_the_deadline_is_not_waited_for():
    a = FakeProvider("a", failing(RateLimited("busy", retry_after=60)))
    t0 = time.monotonic()
    with pytest.raises(RateLimited) as e:
        await router_for(a, retries=2).generate(request(), soon(1))
    assert time.monotonic() - t0 < 10  # not the 60 s Retry-After
    assert e.value.headers["Retry-After"] == "60"


async def test_every_route_overloaded_with_retry_after_is_a_503_with_retry_after():
    a = FakeProvider("a", failing(UpstreamUnavailable("HTTP 503", retry_after=4)))
    b = FakeProvider("b", failing(RateLimited("HTTP 429", retry_after=2)))
    with pytest.raises(ServiceUnavailable) as e:
        await router_for(a, b).generate(request(), soon())
    assert e.value.status == 503
    assert e.value.headers["Retry-After"] == "2"


async def test_a_bad_image_in_finish_is_a_route_failure():
    # The finish step (download, checks, conversion) is part of the route attempt.
    a, b = FakeProvider("a"), FakeProvider("b")
    seen = []

    async def finish(images, req, provider):
        seen.append(req)
        if len(seen) == 1:
            raise UpstreamError("the route returned a bad image: PNG truncated")
        return ["final"]

    result = await router_for(a, b).generate(request(), soon(), finish)
    assert result.route.name == "b"
    assert result.images == ["final"]
    assert "truncated" in result.attempts[0][1]


async def test_a_crash_in_finish_falls_back_too():
    async def finish(images, req, provider):
        if not finish.crashed:
            finish.crashed = True
            raise OSError("image file is truncated")
        return images

    finish.crashed = False
    result = await router_for(FakeProvider("a"), FakeProvider("b")).generate(request(), soon(), finish)
    assert result.route.name == "b"


# --- half-open ----------------------------------------------------------------------------------------


async def test_half_open_lets_one_probe_through_at_a_time():
    gate = asyncio.Event()
    calls = {"n": 0}

    async def probe_waits(req):
        calls["n"] += 1
        await gate.wait()
        return await ok(req)

    a, b = FakeProvider("a", probe_waits), FakeProvider("b")
    router = router_for(a, b, breaker_threshold=1, breaker_cooldown=0.05)
    breaker = router.routes["m"][0].breaker
    breaker.record(False)
    assert breaker.state == "open"
    await asyncio.sleep(0.06)
    assert router.routes["m"][0].state == "half_open"
    probe = asyncio.create_task(router.generate(request(), soon()))
    await asyncio.sleep(0.01)
    # While the probe runs, others go to b.
    others = [await router.generate(request(), soon()) for _ in range(3)]
    assert [r.route.name for r in others] == ["b"] * 3
    assert calls["n"] == 1
    gate.set()
    assert (await probe).route.name == "a"
    assert breaker.state == "closed"
    assert (await router.generate(request(), soon())).route.name == "a"


async def test_a_cancelled_probe_frees_the_slot():
    a, b = FakeProvider("a", hang), FakeProvider("b")
    router = router_for(a, b, breaker_threshold=1, breaker_cooldown=0)
    breaker = router.routes["m"][0].breaker
    breaker.record(False)
    task = asyncio.create_task(router.generate(request(), soon()))
    await asyncio.sleep(0.01)
    assert breaker.probing
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not breaker.probing


# --- loading routes ------------------------------------------------------------------------------------


class LoadingProvider(FakeProvider):
    """A provider whose model loads until `loaded` is set (or fails to load)."""

    def __init__(self, name: str, **kwargs):
        super().__init__(name, **kwargs)
        self.loaded = asyncio.Event()
        self.failed: str | None = None
        self.waited: list[float] = []

    @property
    def unavailable_reason(self):
        if self.failed:
            return self.failed
        return None if self.loaded.is_set() else "loading the model"

    @property
    def loading_stage(self):
        return None if self.loaded.is_set() or self.failed else "loading the model: transformer (3 s so far)"

    async def wait_ready(self, timeout):
        self.waited.append(timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.loaded.wait(), timeout)
        return self.unavailable_reason is None


async def test_a_request_waits_for_a_loading_route():
    a = LoadingProvider("a")
    router = router_for(a)
    assert [r.name for r in router.candidates("m")] == ["a"]
    task = asyncio.create_task(router.generate(request(), soon()))
    await asyncio.sleep(0.05)
    assert not task.done()
    a.loaded.set()
    result = await task
    assert result.route.name == "a" and len(a.calls) == 1


async def test_loading_past_max_load_wait_is_a_503_with_retry_after_and_the_stage():
    a = LoadingProvider("a")
    t0 = time.monotonic()
    with pytest.raises(ServiceUnavailable) as e:
        await router_for(a, max_load_wait=0.1).generate(request(), soon())
    assert 0.09 <= time.monotonic() - t0 < 10  # the load never ends
    assert e.value.status == 503 and e.value.code == "model_loading"
    assert "transformer" in e.value.message
    assert int(e.value.headers["Retry-After"]) >= 1


async def test_loading_wait_is_capped_by_the_deadline():
    a = LoadingProvider("a")
    with pytest.raises(ServiceUnavailable):
        await router_for(a, max_load_wait=60).generate(request(), soon(0.1))
    assert a.waited and a.waited[0] <= 0.1


async def test_a_loading_route_is_skipped_when_a_later_one_can_serve():
    a, b = LoadingProvider("a"), FakeProvider("b")
    result = await router_for(a, b).generate(request(), soon())
    assert result.route.name == "b" and a.waited == []
    assert "loading" in result.attempts[0][1]


async def test_a_load_that_fails_while_waiting_is_a_route_failure():
    a = LoadingProvider("a")

    async def fail_soon():
        await asyncio.sleep(0.05)
        a.failed = "failed to load: out of memory"
        a.loaded.set()

    asyncio.create_task(fail_soon())
    with pytest.raises(UpstreamError) as e:
        await router_for(a).generate(request(), soon())
    assert "out of memory" in e.value.message


async def test_a_refused_login_is_not_retried_on_the_same_route():
    a = FakeProvider("a", failing(UpstreamRefused("authentication with the upstream failed (HTTP 401)")))
    result = await router_for(a, FakeProvider("b"), retries=2).generate(request(), soon())
    assert result.route.name == "b" and len(a.calls) == 1


async def test_a_route_drops_fields_it_must_not_send():
    a = FakeProvider("a")
    router = router_for(a, routes=[{"provider": "a", "params": {"go_fast": True, "negative_prompt": "x"},
                                    "drop": ["negative_prompt", "go_fast", "seed", "watermark"]}])
    req = request(seed=5, negative_prompt="blur")
    req = dataclasses.replace(req, extra={"watermark": True, "custom": 1})
    await router.generate(req, soon())
    sent, _ = a.calls[0]
    assert sent.negative_prompt is None and sent.seed is None
    assert sent.extra == {"custom": 1}


def test_core_fields_cannot_be_dropped():
    with pytest.raises(ValueError, match="prompt cannot be dropped"):
        RouteConfig(provider="a", drop=["prompt"])
