"""The image requests being routed now: stopped when their client hangs up, drained at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from ..errors import ShuttingDown

log = logging.getLogger("proxy")

# How often the watcher looks for requests whose client has gone.
DISCONNECT_POLL_SECONDS = 0.5
# Looks in a row with nothing to watch before the watcher stops (the next request starts it again): an
# idle server need not wake for it, and a busy one does not start it again for every request.
IDLE_LOOKS = 4


class InFlight:
    """Routing runs in the request's own task, registered here while it runs.

    One watcher task looks at every registered request's connection every DISCONNECT_POLL_SECONDS and
    cancels the routing of those whose client has gone (also when the server does not cancel handlers,
    as a host app's may not); it stops after IDLE_LOOKS looks with nothing to watch. A wait with a timeout per request did the same at the cost of a task, a
    timer and two extra turns of the event loop for every request.
    """

    def __init__(self) -> None:
        self._tasks: dict[asyncio.Task, web.Request] = {}
        self._stopped_for_shutdown: set[asyncio.Task] = set()
        self._watcher: asyncio.Task | None = None

    def __bool__(self) -> bool:
        return bool(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, request: web.Request, coro: Coroutine[Any, Any, Any]) -> Any:
        """Await coro in the current task, registered for the watcher and for drain()."""
        task = asyncio.current_task()
        assert task is not None  # called from a handler: always inside a task
        self._tasks[task] = request
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())
        try:
            return await coro
        except asyncio.CancelledError:
            if task in self._stopped_for_shutdown:
                task.uncancel()
                raise ShuttingDown("The server is shutting down and stopped this request before it finished; "
                                   "retry it.", retry_after=1) from None
            raise
        finally:
            del self._tasks[task]
            self._stopped_for_shutdown.discard(task)

    async def _watch(self) -> None:
        idle = 0
        while idle < IDLE_LOOKS:
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)
            idle = 0 if self._tasks else idle + 1
            for task, request in list(self._tasks.items()):
                transport = request.transport
                if (transport is None or transport.is_closing()) and not task.cancelling():
                    task.cancel("the client disconnected")

    async def drain(self, grace: float) -> None:
        """Let the requests being routed finish within `grace` seconds, then stop the rest: each ends with
        ShuttingDown (a 503, or an error event on a stream) rather than a dropped connection."""
        pending = set(self._tasks)
        if pending:
            log.info("draining: %d request(s) in flight, up to %.0f s", len(pending), grace)
            await asyncio.wait(pending, timeout=grace)
        left = set(self._tasks)  # still routing (a task leaves the table when its routing ends)
        if left:
            log.warning("draining: cancelling %d request(s) still running after %.0f s", len(left), grace)
            self._stopped_for_shutdown |= left
            for task in left:
                task.cancel("the server is shutting down")
            await asyncio.wait(left, timeout=2)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
