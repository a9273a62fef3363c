"""Writing an answer to a client that may stop reading it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger("proxy")


async def send_or_drop(write: Awaitable[None], transport: asyncio.Transport | None, stall: float) -> None:
    """Await `write`, a write to the client that waits while the client's socket is full.

    A client that takes nothing of its answer for `stall` seconds is dropped (the connection aborted, and
    ConnectionResetError raised): else it could keep megabytes of images in this process for as long as it
    pleases, one answer per request it makes. A slow client that keeps reading is never cut off."""
    if transport is None:
        await write
        return
    task = asyncio.ensure_future(write)
    try:
        waiting = transport.get_write_buffer_size()
        while True:
            done, _ = await asyncio.wait({task}, timeout=stall)
            if done:
                return task.result()
            now = transport.get_write_buffer_size()
            if now >= waiting:  # not a byte taken since the last look
                log.info("dropping a client that took none of its answer for %g s (%d bytes waiting)", stall, now)
                transport.abort()
                await asyncio.wait({task})  # it fails: the connection is lost
                raise ConnectionResetError(f"the client took none of its answer for {stall:g} s")
            waiting = now
    finally:
        if not task.done():
            task.cancel()
