"""The garbage collector under `serve`: full collections on a clock, not at every step of a burst's growth.

Each request in flight holds ~190 objects the collector tracks (its task, coroutines, request, headers,
upstream call). Python starts a full collection whenever the objects that reached the oldest generation
grew by a quarter since the last one, so a burst that grows from none to 4,000 requests in flight (750,000
objects) ran seven full collections over everything alive, up to 0.4 s each, 1.6 s of CPU for a burst of
4,000 (0.4 ms per request, a third of the proxy's CPU per request) that found no garbage (gc.callbacks,
bench/bench_gateway.py --burst). Here the young generations are collected as Python does; the oldest
one when no image request is in flight, and under a load that never pauses at most every
FULL_BUSY_SECONDS. What start-up built (modules, config, the app) is frozen out of every collection.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

CHECK_SECONDS = 1.0
FULL_BUSY_SECONDS = 30.0
# Python's own pace for the oldest generation: this many collections of the middle one first.
FULL_AFTER = 10
# The oldest generation's threshold while this module schedules it: never reached.
NEVER = 1_000_000_000


def tune_gc() -> bool:
    """Freeze what start-up built and hand the oldest generation's collections to `collect_forever`.
    Not when the collector is off or its oldest generation was tuned already (an operator's choice)."""
    young, middle, oldest = gc.get_threshold()
    if not gc.isenabled() or oldest != FULL_AFTER:
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(young, middle, NEVER)
    return True


async def collect_forever(busy: Callable[[], bool]) -> None:
    """A full collection once the middle generation was collected FULL_AFTER times since the last one: at
    once when no image request is being worked on (`busy()` is false), else every FULL_BUSY_SECONDS."""
    loop = asyncio.get_running_loop()
    last = loop.time()
    while True:
        await asyncio.sleep(CHECK_SECONDS)
        if gc.get_count()[2] < FULL_AFTER or (busy() and loop.time() - last < FULL_BUSY_SECONDS):
            continue
        gc.collect()
        last = loop.time()
