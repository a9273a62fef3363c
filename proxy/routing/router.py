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

from ..config import ModelConfig, RouteConfig, RoutingConfig
from ..errors import (
    NO_RETRY,
    InvalidRequest,
    ModelLoading,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from ..media.output import all_images, generate_n
from ..providers.base import GeneratedImage, Provider
from ..request import ImageRequest, with_route_defaults
from ..telemetry import tracing
from ..telemetry.metrics import Metrics
from ..usage.meter import note_call
from .breaker import CircuitBreaker
from .timer import AttemptTimer

log = logging.getLogger("proxy.router")  # its name before proxy/ had packages: logging configs keep working

# What the router does with a route's images before the attempt counts as a success.
Finish = Callable[[list[GeneratedImage], ImageRequest, Provider], Awaitable[list[Any]]]


async def _as_is(images: list[GeneratedImage], req: ImageRequest, provider: Provider) -> list[Any]:
    return images


@dataclass
class Route:
    config: RouteConfig
    provider: Provider
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    retries: int = 2

    def __post_init__(self) -> None:
        # Read by every request, worked out once: a route's config and its provider's limits stay as built.
        self.name: str = self.config.provider
        self.per_call: int = self.config.max_images_per_call or self.provider.capabilities.max_images_per_call
        self.timeout: float = self.config.timeout or self.provider.default_timeout

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


def hands_on(route: Route, field: str) -> bool:
    """Whether a route's upstream gets `field` as the client sent it (its provider hands fields on, and the
    route does not drop it): a route that hands `background` on may make a transparent one."""
    return route.provider.capabilities.hands_on_fields and field not in route.config.drop


class Router:
    def __init__(self, models: dict[str, ModelConfig], providers: dict[str, Provider], metrics: Metrics | None = None,
                 routing: RoutingConfig | None = None, max_load_wait: float = 120.0,
                 scrub: Callable[[str], str] = str) -> None:
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
        # Models with a route that edits only (an edit model on a local GPU): a generation skips those routes,
        # and is the client's mistake where no route generates (a 400 pointing at /v1/images/edits).
        self._edit_only_routes = {model for model, routes in self.routes.items()
                                  if any(not r.provider.capabilities.generates for r in routes)}

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
        if not routes:  # none loading either (no key, no GPU): the openai SDKs' quick retries cannot help
            raise ServiceUnavailable(f"Model '{req.model}' has no usable route: {self.why_unusable(req.model)}.",
                                     headers=NO_RETRY)
        if req.is_edit:
            able = [r for r in routes if r.provider.capabilities.edits
                    and (req.mask is None or r.provider.capabilities.masks)]
            if not able:
                what = "an edit with a mask" if req.mask is not None else "edits"
                raise ServiceUnavailable(f"No usable route of model '{req.model}' takes {what}.", headers=NO_RETRY)
            routes = able
        elif req.model in self._edit_only_routes:
            routes = [r for r in routes if r.provider.capabilities.generates]
            if not routes:
                raise InvalidRequest(f"The model '{req.model}' edits images: it makes none from text alone. Send "
                                     "the request to /v1/images/edits with the image(s) to edit.", param="model")
        if req.background == "transparent":  # never an opaque image from a route that cannot make it
            routes = [r for r in routes if hands_on(r, "background")]
            if not routes:  # (a model with no such route at all: a 400 when the request was read)
                raise ServiceUnavailable(f"No usable route of model '{req.model}' makes transparent backgrounds.",
                                         headers=NO_RETRY)
        attempts: list[tuple[str, str]] = []
        failures: list[ProxyError] = []
        tried: Route | None = None
        for i, route in enumerate(routes):
            later = routes[i + 1:]
            last = not later
            if route.provider.unavailable_reason is not None:
                # Loading: worth waiting for only when nothing after it can serve now.
                if any(r.provider.unavailable_reason is None for r in later):
                    attempts.append((route.name, f"skipped: {route.provider.loading_stage}"))
                    self._fallback(req.model, route, "loading")
                    continue
                if not await self._wait_loaded(route, deadline, attempts, failures):
                    continue
            breaker = route.breaker
            # Not closed: allow() claims the probe slot if this passes (closed, it lets every request by).
            probe = breaker.failures >= breaker.threshold
            if probe and not breaker.allow():
                if not last:
                    attempts.append((route.name, "skipped: circuit open after repeated failures"))
                    self._fallback(req.model, route, "circuit_open")
                    continue
                breaker.probing = True  # the last route is never skipped: this call is its probe
            tried = route
            try:
                images = await self._try_route(route, req, deadline, finish, attempts, failures, last)
            except BaseException:
                breaker.release(probe)
                raise
            self._record(route, images is not None, probe)
            if images is not None:
                return RouteResult(images, route, attempts)
            if time.monotonic() >= deadline:
                # Name the routes the deadline left untried: the client sees why they did not serve.
                attempts += [(r.name, "skipped: the request deadline (server.request_timeout) passed first")
                             for r in later]
                break
            if not last:
                self._fallback(req.model, route, "failed")
        error = self._final_error(req.model, attempts, failures)
        if tried is not None:
            error.routed = RouteResult([], tried, attempts)
        raise error

    async def _wait_loaded(self, route: Route, deadline: float, attempts: list[tuple[str, str]],
                           failures: list[ProxyError]) -> bool:
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
                         attempts: list[tuple[str, str]], failures: list[ProxyError], last: bool) -> list[Any] | None:
        """The route's calls, retries included: its images, or None after recording why it failed.
        The client's own errors are raised."""
        # The route's `params` fill what the client left unset (before n is split: seeds follow).
        route_req = with_route_defaults(req, route.config.params, route.config.drop)
        parts = _Parts(route, self._may_retry, last)
        for attempt in range(route.retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            limit = min(route.timeout, remaining)
            parts.attempt = attempt
            traced = tracing.current() is not None
            with tracing.span("route_attempt", {
                    "qip.route": route.name, "qip.provider": route.provider.kind, "qip.attempt": attempt + 1,
                    "qip.route_index": self.routes[req.model].index(route), "qip.breaker_state": route.breaker.state,
                    "qip.timeout_s": round(limit, 3)} if traced else None) as span:
                # One try: its images made and final (in parts.images), else the error why not (awaited
                # here, not in a method of its own: a coroutine frame fewer on every request's way down).
                try:
                    with AttemptTimer(limit):  # asyncio.timeout's rules, without its two coroutines
                        images = await parts.generate(route_req)
                        try:
                            parts.images = await finish(images, route_req, route.provider)
                        except BaseException:
                            parts.done.clear()  # which image was bad is not known: make them all again
                            raise
                    error = None
                except Exception as e:
                    error = self._attempt_error(e, req.model, route, limit)
                if traced:
                    span.set_attribute("qip.outcome", "ok" if error is None else "error")
                    if error is not None:
                        span.set_attribute("qip.error", self.scrub(error.message))
            if error is None:
                self._count(req.model, route, "ok")
                attempts.append((route.name, "ok"))
                return parts.images
            self._count(req.model, route, "error")
            log.warning("model %s: route %s failed (attempt %d): %s", req.model, route.name, attempt + 1,
                        self.scrub(error.message))
            attempts.append((route.name, error.message))
            failures.append(error)
            if not self._may_retry(error, attempt, route, last):
                break
            wait = self._backoff(attempt, error, last)
            if time.monotonic() + wait >= deadline:
                break
            with tracing.span("retry_wait", {"qip.route": route.name, "qip.wait_s": round(wait, 3)}):
                await asyncio.sleep(wait)
        return None

    def _attempt_error(self, e: Exception, model: str, route: Route, limit: float) -> ProxyError:
        """Why a try on the route failed, from what it raised; the client's own errors are raised again."""
        if isinstance(e, TimeoutError):
            why = "the request deadline (server.request_timeout) passed" if limit < route.timeout else "timed out"
            return UpstreamTimeout(f"{why} after {limit:.3g} s")
        if isinstance(e, ProxyError):
            if not e.retryable:
                self._count(model, route, "client_error")
                raise e
            return e
        # A provider bug must not cost the request: log it and try again / the next route.
        log.exception("model %s: route %s raised", model, route.name, exc_info=e)
        return UpstreamError(f"internal error in the route ({type(e).__name__})")

    def _may_retry(self, error: ProxyError, attempt: int, route: Route, last: bool) -> bool:
        """Whether the route gets another try after this failure (the deadline aside)."""
        if attempt >= route.retries or not error.retryable or not error.retry_same_route:
            return False
        # A long Retry-After is worth sitting out only on the last route.
        return error.retry_after is None or last or error.retry_after <= self.routing.backoff_max

    def _backoff(self, attempt: int, error: ProxyError, last: bool) -> float:
        """Seconds before the next try on the same route (when _may_retry allows one)."""
        cfg = self.routing
        if error.retry_after is not None:
            return error.retry_after  # the upstream's own wait
        # Full jitter (AWS architecture blog): spreads out clients that failed together.
        return random.uniform(0, min(cfg.backoff_max, cfg.backoff_base * 2 ** attempt))

    @staticmethod
    def _record(route: Route, ok: bool, probe: bool) -> None:
        """The route's outcome for its breaker; a change of state is logged (it changes who gets served)."""
        breaker = route.breaker
        if ok and breaker.failures < breaker.threshold:  # closed and stays closed (most requests): nothing to log
            breaker.record(ok, probe)
            return
        before = breaker.state
        breaker.record(ok, probe)
        after = route.breaker.state
        if after == before or (before == "open" and after == "half_open"):
            return
        if after == "closed":
            log.warning("route %s: circuit closed: it served again", route.name)
        else:
            log.warning("route %s: circuit open after %d failed requests in a row: skipped for %.3g s "
                        "where another route can serve", route.name, route.breaker.failures,
                        route.breaker.cooldown)

    def _fallback(self, model: str, route: Route, reason: str) -> None:
        """The request moves past `route` to the next one: counted, and an event on its trace."""
        if self.metrics:
            self.metrics.child(self.metrics.fallbacks, model, route.name, reason).inc()
        with tracing.span("route_skipped" if reason != "failed" else "fallback",
                          {"qip.route": route.name, "qip.reason": reason}):
            pass

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


class _Parts:
    """The calls that make req.n images on one route (n split by per_call), kept across its retries.

    A retry makes only the calls that failed or came back short: an upstream that fails one call in two
    would otherwise fail every attempt at n=4 (some call always fails) though half its calls made good
    images. While the route will be tried again, a failed call lets its siblings finish rather than
    cancelling them; otherwise (no retry left, a refusal, the client's error) they are cancelled at once.
    """

    def __init__(self, route: Route, may_retry: Callable[[ProxyError, int, Route, bool], bool], last: bool) -> None:
        self.route = route
        self.done: dict[tuple[int, int], list[GeneratedImage]] = {}
        self.errors: list[ProxyError] = []
        self.fatal: BaseException | None = None
        self.may_retry = may_retry  # Router._may_retry
        self.last = last  # the model's last route
        self.attempt = 0  # the route's attempt now running (0: its first)
        self.images: list[Any] = []  # the final images of the attempt that succeeded
        self.per_call = max(1, route.per_call)

    async def call(self, chunk: ImageRequest) -> list[GeneratedImage]:
        key = (chunk.first_index, chunk.n)
        if key in self.done:
            return self.done[key]
        try:
            images = await self.route.provider.generate(chunk, self.route.config)
        except ProxyError as e:
            note_call(self.route, chunk, None)  # for the usage ledger: a failed call
            if not self.may_retry(e, self.attempt, self.route, self.last):  # whether the route gets another try
                self.fatal = e
                raise
            self.errors.append(e)
            return []  # generate_n finds too few images; generate() raises this error instead
        except BaseException:
            # Cut short (the attempt's timeout or the request's deadline, the client gone, a sibling call's
            # failure) or a provider bug: the call was made all the same, and the ledger says so (no images:
            # not charged on a priced route, an unknown cost on one without a price).
            note_call(self.route, chunk, None)
            raise
        note_call(self.route, chunk, images)  # charged even if the images fail their checks later
        if len(images) > chunk.n:
            # A surplus (an upstream that ignored `n`) would be taken for the next call's images when n is
            # split: a duplicate image in the answer, with the seeds shifted, and the last image lost.
            images = images[:chunk.n]
        if len(images) >= chunk.n:
            self.done[key] = images
        return images

    async def generate(self, req: ImageRequest) -> list[GeneratedImage]:
        self.errors, self.fatal = [], None
        try:
            if req.n <= self.per_call:  # one call makes them all (the common case): awaited without generate_n
                return all_images(req, await self.call(req))
            return await generate_n(self.call, req, self.per_call)
        except UpstreamError as e:
            if self.errors and e is not self.fatal:  # too few images because a call failed: say why
                raise self.errors[0] from None
            raise
