"""Waiting for something to happen, with a generous limit: tests hold on a busy machine."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def eventually(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.02) -> None:
    """Returns once predicate() (sync or async) is true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {timeout} s")
        await asyncio.sleep(interval)
