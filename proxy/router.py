"""model -> ordered routes: retries with backoff, fallback, circuit breaking, loading waits, deadlines.

A route attempt is the provider call *and* the step that makes its images final (download, checks,
conversion: `finish`), so a route whose images turn out bad fails like one that answered 5xx.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .config import ModelConfig, RouteConfig, RoutingConfig
from .errors import (
    ModelLoading,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from .output import generate_n
from .providers.base import GeneratedImage, Provider
from .request import ImageRequest, with_route_defaults

log = logging.getLogger(__name__)

# What the router does with a route's images before the attempt counts as a success.
Finish = Callable[[list[GeneratedImage], ImageRequest, Provider], Awaitable[list[Any]]]


async def _as_is(images: list[GeneratedImage], req: ImageRequest, provider: Provider) -> list[Any]:
    return images


@dataclass
class CircuitBreaker:
    """Closed -> open after `threshold` failed requests in a row -> half-open after `cooldown`.

    Half-open lets one probe request through at a time: its success closes the breaker, its failure
    opens it for another cooldown.
    """

    threshold: int = 5
    cooldown: float = 30.0
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False

    @property
    def state(self) -> str:
        if self.failures < self.threshold:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half_open"

    def allow(self) -> bool:
        """Whether a request may use the route now; in half-open, claims the one probe slot."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self.probing:
            self.probing = True
            return True
        return False

    def record(self, ok: bool) -> None:
        self.probing = False
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown

    def release(self) -> None:
        """The request ended without judging the route (client error, cancelled): free the probe slot."""
        self.probing = False


@dataclass
class Route:
    config: RouteConfig
    provider: Provider
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    retries: int = 2

    @property
    def name(self) -> str:
        return self.config.provider

    @property
    def per_call(self) -> int:
        return self.config.max_images_per_call or self.provider.capabilities.max_images_per_call

    @property
    def timeout(self) -> float:
        return self.config.timeout or self.provider.default_timeout

    @property
    def state(self) -> str:
        """ready | loading | circuit_open | half_open | unavailable (for /ready and /metrics)."""
        if self.provider.unavailable_reason is not None:
            return "loading" if self.provider.loading_stage else self.provider.state
        breaker = self.breaker.state
        return {"closed": "ready", "open": "circuit_open"}.get(breaker, breaker)


@dataclass
class RouteResult:
    images: list[Any]
    route: Route
    attempts: list[tuple[str, str]]

    @property
    def calls(self) -> int:
        """Calls made to routes, retries included (x-qip-attempts)."""
        return sum(1 for _, why in self.attempts if not why.startswith("skipped"))


def _retries(route: RouteConfig, provider: Provider, routing: RoutingConfig) -> int:
    """The route's own `retries`, else its provider's `retries` option, else routing.retries."""
    if route.retries is not None:
        return route.retries
    value = provider.options.get("retries")
    return routing.retries if value is None else int(value)


class Router:
    def __init__(self, models: dict[str, ModelConfig], providers: dict[str, Provider], metrics=None,
                 routing: RoutingConfig | None = None, max_load_wait: float = 120.0,
                 scrub: Callable[[str], str] = str):
        self.metrics = metrics
        self.scrub = scrub
        self.routing = routing or RoutingConfig()
        self.max_load_wait = max_load_wait
        self.routes: dict[str, list[Route]] = {}
        # One breaker per provider: a dead upstream is dead for every model that uses it.
        breakers: dict[str, CircuitBreaker] = {}
        for model, cfg in models.items():
            self.routes[model] = [
                Route(r, providers[r.provider],
                      breakers.setdefault(r.provider, CircuitBreaker(self.routing.breaker_threshold,
                                                                     self.routing.breaker_cooldown)),
                      _retries(r, providers[r.provider], self.routing))
                for r in cfg.routes
            ]

    def candidates(self, model: str) -> list[Route]:
        """Routes that serve now or will once their model has loaded."""
        return [r for r in self.routes[model]
                if r.provider.unavailable_reason is None or r.provider.loading_stage]

    def usable(self, model: str) -> list[Route]:
        return [r for r in self.routes[model] if r.provider.unavailable_reason is None]

    def why_unusable(self, model: str) -> str:
        return "; ".join(f"route '{r.name}': {r.provider.unavailable_reason}" for r in self.routes[model])

    async def generate(self, req: ImageRequest, deadline: float, finish: Finish = _as_is) -> RouteResult:
        """Walk the model's routes in order until one makes all req.n images and `finish` accepts them."""
        routes = self.candidates(req.model)
        if not routes:
            raise ServiceUnavailable(
                f"Model '{req.model}' has no usable route: {self.why_unusable(req.model)}."
            )
        if req.is_edit:
            able = [r for r in routes if r.provider.capabilities.edits
                    and (req.mask is None or r.provider.capabilities.masks)]
            if not able:
                what = "an edit with a mask" if req.mask is not None else "edits"
                raise ServiceUnavailable(f"No usable route of model '{req.model}' takes {what}.")
            routes = able
        attempts: list[tuple[str, str]] = []
        failures: list[ProxyError] = []
        for i, route in enumerate(routes):
            later = routes[i + 1:]
            last = not later
            if route.provider.unavailable_reason is not None:
                # Loading: worth waiting for only when nothing after it can serve now.
                if any(r.provider.unavailable_reason is None for r in later):
                    attempts.append((route.name, f"skipped: {route.provider.loading_stage}"))
                    continue
                if not await self._wait_loaded(route, deadline, attempts, failures):
                    continue
            if not route.breaker.allow():
                if not last:
                    attempts.append((route.name, "skipped: circuit open after repeated failures"))
                    continue
                route.breaker.probing = True  # the last route is never skipped: this call is its probe
            try:
                images = await self._try_route(route, req, deadline, finish, attempts, failures, last)
            except BaseException:
                route.breaker.release()
                raise
            if images is not None:
                route.breaker.record(True)
                return RouteResult(images, route, attempts)
            if time.monotonic() >= deadline:
                break
        raise self._final_error(req.model, attempts, failures)

    async def _wait_loaded(self, route: Route, deadline: float, attempts, failures) -> bool:
        wait = min(self.max_load_wait, deadline - time.monotonic())
        stage = route.provider.loading_stage
        if wait > 0 and await route.provider.wait_ready(wait):
            return True
        stage = route.provider.loading_stage or stage
        if route.provider.unavailable_reason is not None and not route.provider.loading_stage:
            why = f"the model failed to load: {route.provider.unavailable_reason}"
            failures.append(UpstreamError(why))
        else:
            why = f"still {stage} after waiting {max(wait, 0):.0f} s"
            failures.append(ModelLoading(why, retry_after=min(30.0, max(self.max_load_wait, 1.0))))
        attempts.append((route.name, why))
        return False

    async def _try_route(self, route: Route, req: ImageRequest, deadline: float, finish: Finish,
                         attempts: list, failures: list, last: bool) -> list[Any] | None:
        """The route's calls, retries included: its images, or None after recording why it failed."""
        # The route's `params` fill what the client left unset (before n is split: seeds follow).
        route_req = with_route_defaults(req, route.config.params, route.config.drop)
        for attempt in range(route.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            limit = min(route.timeout, remaining)
            try:
                async with asyncio.timeout(limit):
                    images = await generate_n(self._call(route), route_req, route.per_call)
                    images = await finish(images, route_req, route.provider)
            except TimeoutError:
                error: ProxyError = UpstreamTimeout(f"timed out after {limit:.3g} s")
            except ProxyError as e:
                if not e.retryable:
                    self._count(req.model, route, "client_error")
                    raise
                error = e
            except Exception as e:
                # A provider bug must not cost the request: log it and try again / the next route.
                log.exception("model %s: route %s raised", req.model, route.name)
                error = UpstreamError(f"internal error in the route ({type(e).__name__})")
            else:
                self._count(req.model, route, "ok")
                attempts.append((route.name, "ok"))
                return images
            self._count(req.model, route, "error")
            log.warning("model %s: route %s failed (attempt %d): %s", req.model, route.name, attempt + 1,
                        self.scrub(error.message))
            attempts.append((route.name, error.message))
            failures.append(error)
            if attempt == route.retries or not error.retry_same_route:
                break
            wait = self._backoff(attempt, error, last)
            if wait is None or time.monotonic() + wait >= deadline:
                break
            await asyncio.sleep(wait)
        route.breaker.record(False)
        return None

    def _backoff(self, attempt: int, error: ProxyError, last: bool) -> float | None:
        """Seconds before the next try on the same route; None to move on to the next route now."""
        cfg = self.routing
        if error.retry_after is not None:
            # Honour the upstream's wait; a long one is worth sitting out only on the last route.
            return error.retry_after if last or error.retry_after <= cfg.backoff_max else None
        # Full jitter (AWS architecture blog): spreads out clients that failed together.
        return random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** attempt))

    def _call(self, route: Route):
        async def call(chunk: ImageRequest) -> list[GeneratedImage]:
            return await route.provider.generate(chunk, route.config)

        return call

    def _count(self, model: str, route: Route, outcome: str) -> None:
        if self.metrics:
            self.metrics.child(self.metrics.route_attempts, model, route.name, outcome).inc()

    @staticmethod
    def _final_error(model: str, attempts: list[tuple[str, str]], failures: list[ProxyError]) -> ProxyError:
        detail = "; ".join(f"route '{name}': {why}" for name, why in attempts) or "the request deadline passed"
        message = f"All routes for model '{model}' failed: {detail}."
        if not failures:
            return UpstreamTimeout(message)
        waits = [f.retry_after for f in failures if f.retry_after is not None]
        if all(isinstance(f, RateLimited) for f in failures):
            return RateLimited(message, retry_after=min(waits) if waits else None)
        # Every route said "later" (rate limited, overloaded with a Retry-After, loading): so do we.
        if all(f.retry_after is not None for f in failures):
            code = "model_loading" if all(isinstance(f, ModelLoading) for f in failures) else None
            return ServiceUnavailable(message, retry_after=min(waits), code=code or "upstream_unavailable")
        if all(isinstance(f, UpstreamTimeout) for f in failures):
            return UpstreamTimeout(message)
        return UpstreamError(message)
