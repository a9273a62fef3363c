"""What the native vendor providers (fal, Replicate, DashScope) share: a key, a base URL on their own
origin, the gateway's HTTP session, and remote cancels sent in the background."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from ..errors import ProxyError, redact
from .base import Provider, ProviderContext

log = logging.getLogger(__name__)


def origin_of(url: str) -> str | None:
    """scheme://host:port of an absolute http(s) URL; None for anything else."""
    try:
        parsed = URL(url)
        return str(parsed.origin()) if parsed.is_absolute() and parsed.scheme in ("http", "https") else None
    except ValueError:
        return None


class VendorProvider(Provider):
    # How long close() waits for cancels already sent (each has a short timeout of its own).
    cancel_timeout: ClassVar[float] = 5.0

    def __init__(self, name, options, missing_vars=None):
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
