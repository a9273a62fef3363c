"""Router: fallback between routes, client errors, circuit breaking and deadlines (in-process fakes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from proxy.config import ModelConfig, RouteConfig
from proxy.errors import (
    InvalidRequest,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.providers.base import Capabilities, GeneratedImage, Provider
from proxy.request import ImageRequest
from proxy.router import CircuitBreaker, Router

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


def router_for(*providers: FakeProvider, routes: list | None = None, extra_models: dict | None = None) -> Router:
    models = {"m": ModelConfig.model_validate({"sizes": "t", "routes": routes or [p.name for p in providers]})}
    for name, model_routes in (extra_models or {}).items():
        models[name] = ModelConfig.model_validate({"sizes": "t", "routes": model_routes})
    return Router(models, {p.name: p for p in providers})


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
    assert time.monotonic() - t0 < 1
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
    assert not router.routes["m"][0].breaker.is_open()


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
    monkeypatch.setattr("proxy.router.time.monotonic", lambda: now[0])
    breaker = CircuitBreaker(threshold=3, cooldown=10)
    for _ in range(2):
        breaker.record(False)
    assert not breaker.is_open()
    breaker.record(False)
    assert breaker.is_open()
    now[0] += 9.9
    assert breaker.is_open()
    now[0] += 0.2
    assert not breaker.is_open()  # half-open: the route gets another try
    breaker.record(False)  # which fails: open again at once
    assert breaker.is_open()
    breaker.record(True)
    assert not breaker.is_open()
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
    assert breaker.is_open()
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
    assert 0.09 <= elapsed < 1
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
    assert time.monotonic() - t0 < 1
    assert len(b.calls) == 1
