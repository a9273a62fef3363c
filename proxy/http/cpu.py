"""CPU work off the event loop — except on payloads so small that the thread hop costs more.

A hop to the default executor costs about 0.1 ms; parsing, checking or base64 of a few kilobytes
costs microseconds. Work on more than INLINE_BYTES always runs in a thread (megabytes of JSON,
base64 or Pillow would stall every other request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
INLINE_BYTES = 64 * 1024


async def run_cpu(size: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the loop when `size` (the bytes it works on) is small, else in a thread."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
