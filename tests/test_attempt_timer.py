"""The router's AttemptTimer behaves as asyncio.timeout does, cancellations from elsewhere included."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from proxy.routing.timer import AttemptTimer


@contextlib.asynccontextmanager
async def limit(kind: str, delay: float):
    if kind == "asyncio":
        async with asyncio.timeout(delay):
            yield
    else:
        with AttemptTimer(delay):
            yield


async def outcome(kind: str, delay: float, body) -> tuple[str, int]:
    """What leaves the block (its exception's name, or 'ok'), and the task's pending cancellations after."""
    async def run() -> tuple[str, int]:
        try:
            async with limit(kind, delay):
                await body()
        except (TimeoutError, asyncio.CancelledError) as e:
            return type(e).__name__, asyncio.current_task().cancelling()
        return "ok", asyncio.current_task().cancelling()
    return await asyncio.create_task(run())


KINDS = ["asyncio", "attempt_timer"]


@pytest.mark.parametrize("kind", KINDS)
async def test_in_time(kind):
    assert await outcome(kind, 30, lambda: asyncio.sleep(0)) == ("ok", 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_past_the_delay_is_a_timeout_and_leaves_no_cancellation(kind):
    assert await outcome(kind, 0.01, lambda: asyncio.sleep(30)) == ("TimeoutError", 0)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancellation_from_elsewhere_goes_on(kind):
    async def cancelled_by_another():  # the client left (InFlight's watcher), the server drains
        task = asyncio.current_task()
        asyncio.get_running_loop().call_soon(task.cancel)
        await asyncio.sleep(30)

    assert await outcome(kind, 30, cancelled_by_another) == ("CancelledError", 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancellation_from_elsewhere_as_the_delay_passes_goes_on(kind):
    async def both():  # the timer and another's cancel land on the same turn of the loop
        task = asyncio.current_task()
        asyncio.get_running_loop().call_soon(task.cancel)
        await asyncio.sleep(30)

    assert await outcome(kind, 0, both) == ("CancelledError", 1)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancellation_asked_before_it_started_stays_asked(kind):
    async def run() -> tuple[str, int]:
        asyncio.current_task().cancel()  # pending: delivered at the first await inside the block
        try:
            async with limit(kind, 0):
                await asyncio.sleep(30)
        except (TimeoutError, asyncio.CancelledError) as e:
            return type(e).__name__, asyncio.current_task().cancelling()
        return "ok", asyncio.current_task().cancelling()

    # The delay had passed too: a timeout, and the earlier cancellation still counted for whoever asked it.
    assert await asyncio.create_task(run()) == ("TimeoutError", 1)
