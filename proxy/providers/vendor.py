"""What the native vendor providers (fal, Replicate, DashScope) share: a key, a base URL on their own
origin, the gateway's HTTP session, and remote cancels sent in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, ClassVar, TypeVar

import aiohttp
from yarl import URL

from ..errors import ProxyError, UpstreamError, redact
from .base import Provider, ProviderContext

log = logging.getLogger(__name__)
T = TypeVar("T")


def origin_of(url: str) -> str | None:
    """scheme://host:port of an absolute http(s) URL; None for anything else."""
    try:
        parsed = URL(url)
        return str(parsed.origin()) if parsed.is_absolute() and parsed.scheme in ("http", "https") else None
    except ValueError:
        return None


def take_n(images: list[T], n: int, upstream: str) -> list[T]:
    """The n images a call asked for. Fewer fail the call; a surplus is dropped: otherwise the router's n
    split over several calls would take it for the next call's images (and their seeds)."""
    if len(images) < n:
        raise UpstreamError(f"{upstream} answered {len(images)} of the {n} images asked for")
    return images[:n]


def poll_wait(interval: float, retry_after: float | None) -> float:
    """How long to sit before the next poll: the backoff, or longer where the vendor's Retry-After says so
    (the caller's deadline bounds it)."""
    return max(interval, retry_after or 0.0)


class VendorProvider(Provider):
    # How long close() waits for cancels already sent (each has a short timeout of its own).
    cancel_timeout: ClassVar[float] = 5.0

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)
        self.api_key = str(options.get("api_key") or "")
        self.base_url = ""  # set by the subclass, from its vendor's default
        self.http: aiohttp.ClientSession | None = None
        # Cancel calls in flight: referenced until they finish (a caller may itself be cancelled).
        self._cancels: set[asyncio.Task] = set()

    @property
    def unavailable_reason(self) -> str | None:
        if not self.api_key:
            hint = ", ".join(self.missing_vars) or "api_key in models.yaml"
            return f"no API key (set {hint})"
        return None

    @property
    def trusted_origin(self) -> str | None:
        return origin_of(self.base_url)

    async def start(self, ctx: ProviderContext) -> None:
        self.http = ctx.http

    async def close(self) -> None:
        # Let the cancels already sent finish before the shared session closes.
        if self._cancels:
            await asyncio.wait(set(self._cancels), timeout=self.cancel_timeout)

    def in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a best-effort call (a remote cancel) that must outlive the request that started it."""
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # the loop is closing
            work.close()
            return
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    def _redacted(self, error: ProxyError) -> ProxyError:
        error.message = redact(error.message, [self.api_key])
        return error
