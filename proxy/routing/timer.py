"""A route attempt's time limit: asyncio.timeout's rules in a plain context manager (no coroutines of its own)."""

from __future__ import annotations

import asyncio
from types import TracebackType


class AttemptTimer:
    """`with AttemptTimer(delay):` is `async with asyncio.timeout(delay):` (its rules as of Python 3.11.7):
    past the delay the task is cancelled, and that cancellation leaves the block as TimeoutError; a
    cancellation from elsewhere (the client left, the server drains) goes on as CancelledError.

    Every route attempt takes one. asyncio.timeout adds a coroutine for each of its enter and exit and an
    enum state machine around the same event-loop timer: ~5 us of a small answer's time at c=1 (cold
    caches, as every request runs), of the ~80 us the routing layers take. tests/test_attempt_timer.py
    holds the two to the same outcomes.
    """

    __slots__ = ("_task", "_handle", "_cancelling", "_expired")

    def __init__(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("AttemptTimer should be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()  # cancellations already asked for are not this timer's
        self._expired = False
        when = loop.time() + delay
        # Already past: on the loop's next turn, ahead of anything that turn's timers wake (as asyncio's).
        self._handle = loop.call_soon(self._expire) if when <= loop.time() else loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._task.cancel()
        self._expired = True

    def __enter__(self) -> AttemptTimer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._handle.cancel()
        # Ours only when no other cancellation came since: then this task's cancel is taken back.
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
