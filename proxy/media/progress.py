"""Steps done of the request being routed: a provider that counts steps reports them, a background job
shows them. The job sets a callback (a context variable, so it reaches the route attempts it starts);
without one, reporting does nothing."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable

StepCallback = Callable[[int, int], None]

_WATCHER: contextvars.ContextVar[StepCallback | None] = contextvars.ContextVar("qip_progress", default=None)


def watch(callback: StepCallback) -> None:
    """Receive (steps done, steps in all) on the event loop from everything the current task starts."""
    _WATCHER.set(callback)


def step_reporter() -> StepCallback | None:
    """A function any thread (the local engine's worker) may call with (step, total); None when nobody
    watches. Call it on the loop: it binds the loop."""
    callback = _WATCHER.get()
    if callback is None:
        return None
    loop = asyncio.get_running_loop()

    def report(step: int, total: int) -> None:
        loop.call_soon_threadsafe(callback, step, total)

    return report
