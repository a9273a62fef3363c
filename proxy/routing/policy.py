"""Who may call what: client API keys (checked in constant time), the models each key may use, and its
limits — requests per minute, and image requests in flight at once.

The counting sits behind `Limits`, so a shared store (Redis, for several proxy processes) can replace
the in-process `MemoryLimits` without touching the rest: `acquire` counts one request for a key and, for
image calls, holds one of its concurrency slots until the returned lease is released.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from ..config.server import ApiKey, ServerConfig
from ..errors import AuthenticationFailed, ProxyError, RateLimited
from ..state.shared import StateUnavailable
from ..telemetry.metrics import Metrics

# The key a request was made with, once authenticated (absent when the proxy has no keys).
API_KEY = web.RequestKey("qip_api_key", ApiKey)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConcurrencyLimited(RateLimited):
    code = "concurrency_limit_exceeded"


# An image call of a key whose every concurrency slot was held when it came in (nothing counted yet): refused
# once it turns out to need one (a synchronous call, or one passed on), let through when it does not (a
# background submit: its rpm counts then, and its job takes a slot when it runs). Absent for every call
# that found a slot.
SLOT_REFUSED = web.RequestKey("qip_slot_refused", ConcurrencyLimited)


class ModelNotAllowed(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


# ---- counting ---------------------------------------------------------------------------------------


class Lease(Protocol):
    async def release(self) -> None:
        """Give the concurrency slot back (idempotent; nothing to do for a lease without one)."""


class Limits(Protocol):
    async def acquire(self, key: str, *, rpm: int | None, concurrency: int | None) -> Lease:
        """Count one request for `key` (a key's name) against `rpm`, and with `concurrency` hold one of its
        slots until the lease is released. Raises RateLimited when the minute's requests are spent and
        ConcurrencyLimited when every slot is held; a refused request counts against nothing."""


class _NoLease:
    async def release(self) -> None:
        return None


NO_LEASE = _NoLease()


class _Slot:
    __slots__ = ("_limits", "_key", "_held")

    def __init__(self, limits: MemoryLimits, key: str) -> None:
        self._limits, self._key, self._held = limits, key, True

    async def release(self) -> None:
        if self._held:
            self._held = False
            self._limits._release(self._key)


class MemoryLimits:
    """Limits for one process: a token bucket per key for rpm (up to `rpm` requests at once, refilled at
    `rpm` a minute) and a count of slots held. Nothing here awaits, so each acquire is atomic on the loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)
        self._in_flight: dict[str, int] = {}

    def in_flight(self, key: str) -> int:
        return self._in_flight.get(key, 0)

    async def acquire(self, key: str, *, rpm: int | None, concurrency: int | None) -> Lease:
        held = self._in_flight.get(key, 0)
        if concurrency is not None and held >= concurrency:
            raise ConcurrencyLimited(
                f"Concurrency limit reached: this API key may have {concurrency} image "
                f"request{'s' if concurrency != 1 else ''} in progress at once; retry when one finishes.",
                retry_after=1)
        if rpm is not None:
            now = self._clock()
            tokens, then = self._buckets.get(key, (float(rpm), now))
            tokens = min(float(rpm), tokens + (now - then) * rpm / 60)
            if tokens < 1:
                self._buckets[key] = (tokens, now)
                wait = (1 - tokens) * 60 / rpm
                raise RateLimited(f"Rate limit reached: this API key may make {rpm} request"
                                  f"{'s' if rpm != 1 else ''} per minute; retry in {math.ceil(wait)} s.",
                                  retry_after=wait)
            self._buckets[key] = (tokens - 1, now)
        if concurrency is None:
            return NO_LEASE
        self._in_flight[key] = held + 1
        return _Slot(self, key)

    def _release(self, key: str) -> None:
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)


# ---- the policy -------------------------------------------------------------------------------------


def _digest(value: bytes) -> bytes:
    # Compared as digests: equal lengths, so not even a key's length shows in the time taken.
    return hashlib.sha256(value).digest()


def _bearer(authorization: str | None) -> bytes:
    scheme, _, token = (authorization or "").partition(" ")
    # aiohttp hands non-UTF-8 header bytes on as surrogates: back to those bytes (a wrong key, not a crash).
    return token.strip().encode("utf-8", "surrogateescape") if scheme.lower() == "bearer" else b""


class KeyPolicy:
    """The configured keys, their models and limits, and the key /metrics asks for."""

    def __init__(self, server: ServerConfig, metrics: Metrics | None = None, limits: Limits | None = None) -> None:
        self.keys = list(server.keys)
        self._digests = [(_digest(key.value.encode()), key) for key in self.keys]
        self._named = {key.name: key for key in self.keys}
        self._metrics_digest = _digest(server.metrics_key.encode()) if server.metrics_key else None
        self.limits: Limits = limits if limits is not None else MemoryLimits()
        self.metrics = metrics

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key an `Authorization` header carries; None when no keys are configured; else 401."""
        if not self.keys:
            return None
        given = _bearer(authorization)
        digest = _digest(given)
        found = None
        # Every key is compared, so the time taken says nothing about which one was close.
        for value, key in self._digests:
            if hmac.compare_digest(digest, value):
                found = key
        if not given or found is None:
            raise AuthenticationFailed(
                "Missing or invalid API key: send a key configured under server.api_keys as a Bearer token "
                "in the Authorization header."
            )
        return found

    def named(self, name: str | None) -> ApiKey | None:
        """The configured key of this name (a background job keeps its key's name, never the key)."""
        return self._named.get(name) if name is not None else None

    def check_metrics_key(self, authorization: str | None) -> None:
        """/metrics with server.metrics_key set: that key, and no other, or 401."""
        if self._metrics_digest is None:
            return
        given = _bearer(authorization)
        if not given or not hmac.compare_digest(_digest(given), self._metrics_digest):
            raise AuthenticationFailed("Missing or invalid metrics key: send 'Authorization: Bearer <key>' "
                                       "with the key configured as server.metrics_key.")

    async def admit(self, key: ApiKey, *, image: bool, spends: bool = True) -> Lease:
        """Count a request against the key's rpm; an image call also takes a concurrency slot.

        When the shared counter (Redis) cannot be reached, a call that spends (an image call, a call passed
        on to the passthrough upstream) is refused: 503 state_unavailable, for a limit that cannot be
        counted cannot be kept. One that spends nothing (`spends=False`: the proxy's own answers from what
        it holds, such as the model list, a job's status or the usage reports) goes on uncounted."""
        try:
            return await self.limits.acquire(key.name, rpm=key.rpm,
                                             concurrency=key.concurrency if image else None)
        except RateLimited as e:
            self._rejected(key, e.code)
            raise
        except StateUnavailable:
            if spends:
                raise
            return NO_LEASE

    def guard(self, key: ApiKey, handler: Handler) -> Handler:
        """`handler`, admitted under the key's limits and holding its slot until it ends, however it ends
        (an answer, an error, or a client that hung up)."""

        async def limited(request: web.Request) -> web.StreamResponse:
            try:
                lease = await self.limits.acquire(key.name, rpm=key.rpm, concurrency=key.concurrency)
            except ConcurrencyLimited as full:  # (refused, it counted nothing: see without_slot)
                lease, request[SLOT_REFUSED] = NO_LEASE, full
            except RateLimited as e:
                self._rejected(key, e.code)
                raise
            try:
                return await handler(request)
            finally:
                await lease.release()

        return limited

    async def without_slot(self, request: web.Request) -> None:
        """A background submit, which needs no concurrency slot: if it came in while every slot of its key
        was held, its request still counts against the key's rpm (429 past it)."""
        if request.get(SLOT_REFUSED) is not None:
            del request[SLOT_REFUSED]
            await self.admit(request[API_KEY], image=False)

    def needs_slot(self, request: web.Request) -> None:
        """An image call about to route (not a background submit): 429 concurrency_limit_exceeded if it came
        in while every slot of its key was held."""
        refused = request.get(SLOT_REFUSED)
        if refused is not None:
            self._rejected(request[API_KEY], refused.code)
            raise refused

    def check_model(self, key: ApiKey | None, model: str | None) -> None:
        """403 for a model the key may not use."""
        if key is None or key.models is None or model is None or model in key.models:
            return
        self._rejected(key, ModelNotAllowed.code)
        raise ModelNotAllowed(f"This API key may not use the model '{model}'. Models it may use: "
                              f"{', '.join(key.models)}.", param="model")

    def _rejected(self, key: ApiKey, reason: str | None) -> None:
        if self.metrics is not None:
            self.metrics.key_rejections.labels(key=key.name, reason=reason or "-").inc()
