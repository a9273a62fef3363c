"""model -> ordered routes: fallback on retryable failures, circuit breaking, deadlines."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from .config import ModelConfig, RouteConfig
from .errors import ProxyError, RateLimited, ServiceUnavailable, UpstreamError, UpstreamTimeout
from .output import generate_n
from .providers.base import GeneratedImage, Provider
from .request import ImageRequest, with_route_defaults

log = logging.getLogger(__name__)


@dataclass
class CircuitBreaker:
    """Skips a route after `threshold` failures in a row, for `cooldown` seconds."""

    threshold: int = 5
    cooldown: float = 30.0
    failures: int = 0
    open_until: float = 0.0

    def is_open(self) -> bool:
        return self.failures >= self.threshold and time.monotonic() < self.open_until

    def record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = time.monotonic() + self.cooldown


@dataclass
class Route:
    config: RouteConfig
    provider: Provider
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def name(self) -> str:
        return self.config.provider

    @property
    def per_call(self) -> int:
        return self.config.max_images_per_call or self.provider.capabilities.max_images_per_call

    @property
    def timeout(self) -> float:
        return self.config.timeout or self.provider.default_timeout


@dataclass
class RouteResult:
    images: list[GeneratedImage]
    route: Route
    attempts: list[tuple[str, str]]


class Router:
    def __init__(self, models: dict[str, ModelConfig], providers: dict[str, Provider], metrics=None):
        self.metrics = metrics
        self.routes: dict[str, list[Route]] = {}
        # One breaker per provider: a dead upstream is dead for every model that uses it.
        breakers: dict[str, CircuitBreaker] = {}
        for model, cfg in models.items():
            self.routes[model] = [
                Route(r, providers[r.provider], breakers.setdefault(r.provider, CircuitBreaker()))
                for r in cfg.routes
            ]

    def usable(self, model: str) -> list[Route]:
        return [r for r in self.routes[model] if r.provider.unavailable_reason is None]

    def why_unusable(self, model: str) -> str:
        return "; ".join(f"route '{r.name}': {r.provider.unavailable_reason}" for r in self.routes[model])

    async def generate(self, req: ImageRequest, deadline: float) -> RouteResult:
        """Walk the model's routes in order until one makes all req.n images."""
        routes = self.usable(req.model)
        if not routes:
            raise ServiceUnavailable(
                f"Model '{req.model}' has no usable route: {self.why_unusable(req.model)}."
            )
        attempts: list[tuple[str, str]] = []
        failures: list[ProxyError] = []
        for i, route in enumerate(routes):
            last = i == len(routes) - 1
            if route.breaker.is_open() and not last:
                attempts.append((route.name, "skipped: circuit open after repeated failures"))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(min(route.timeout, remaining)):
                    # The route's `params` fill what the client left unset (before n is split: seeds follow).
                    route_req = with_route_defaults(req, route.config.params)
                    images = await generate_n(self._call(route), route_req, route.per_call)
            except TimeoutError:
                error: ProxyError = UpstreamTimeout(f"timed out after {min(route.timeout, remaining):.3g} s")
            except ProxyError as e:
                if not e.retryable:
                    self._count(req.model, route, "client_error")
                    raise
                error = e
            except Exception as e:
                # A provider bug must not cost the request: log it and try the next route.
                log.exception("model %s: route %s raised", req.model, route.name)
                error = UpstreamError(f"internal error in the route ({type(e).__name__})")
            else:
                route.breaker.record(True)
                self._count(req.model, route, "ok")
                return RouteResult(images, route, attempts + [(route.name, "ok")])
            route.breaker.record(False)
            self._count(req.model, route, "error")
            log.warning("model %s: route %s failed: %s", req.model, route.name, error.message)
            attempts.append((route.name, error.message))
            failures.append(error)
        raise self._final_error(req.model, attempts, failures)

    def _call(self, route: Route):
        async def call(chunk: ImageRequest) -> list[GeneratedImage]:
            return await route.provider.generate(chunk, route.config)

        return call

    def _count(self, model: str, route: Route, outcome: str) -> None:
        if self.metrics:
            self.metrics.route_attempts.labels(model=model, route=route.name, outcome=outcome).inc()

    @staticmethod
    def _final_error(model: str, attempts: list[tuple[str, str]], failures: list[ProxyError]) -> ProxyError:
        detail = "; ".join(f"route '{name}': {why}" for name, why in attempts) or "the request deadline passed"
        message = f"All routes for model '{model}' failed: {detail}."
        if failures and all(isinstance(f, RateLimited) for f in failures):
            waits = [f.retry_after for f in failures if f.retry_after is not None]
            return RateLimited(message, retry_after=min(waits) if waits else None)
        if failures and all(isinstance(f, UpstreamTimeout) for f in failures):
            return UpstreamTimeout(message)
        if not failures:
            return UpstreamTimeout(message)
        return UpstreamError(message)
