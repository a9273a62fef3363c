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
    pleases, one answer per request it makes. A slow client that keeps reading is never cut off.

    The write runs in this task, at once: in a task of its own it would start on the loop's next turn,
    behind whatever else is ready then (the last request's log line and ledger record), and a megabyte
    answer the socket takes whole would wait for them. A timer looks at the client's progress meanwhile."""
    if transport is None:
        await write
        return
    watch = _Watch(transport, stall)
    try:
        await write
    except (ConnectionError, RuntimeError):
        if not watch.dropped:
            raise
    finally:
        watch.stop()
    if watch.dropped:  # (a write waiting for the socket may also just end when the connection is aborted)
        raise ConnectionResetError(f"the client took none of its answer for {stall:g} s")


class _Watch:
    """Every `stall` seconds while a write waits: the bytes still waiting in the transport must have gone
    down since the last look, else the client is dropped (the transport aborted: the write fails)."""

    __slots__ = ("_transport", "_stall", "_loop", "_waiting", "_handle", "dropped")

    def __init__(self, transport: asyncio.Transport, stall: float) -> None:
        self._transport, self._stall = transport, stall
        self._loop = asyncio.get_running_loop()
        self._waiting = 0
        self.dropped = False
        # The first look on the loop's next turn, once the write has left in the transport what the socket
        # did not take (a write the socket takes whole is done before then, and stop() cancels it).
        self._handle: asyncio.Handle | None = self._loop.call_soon(self._look, True)

    def _look(self, first: bool = False) -> None:
        if self._transport.is_closing():  # gone already (the client left): the write fails on its own
            self._handle = None
            return
        now = self._transport.get_write_buffer_size()
        if not first and now and now >= self._waiting:  # not a byte taken since the last look
            log.info("dropping a client that took none of its answer for %g s (%d bytes waiting)", self._stall, now)
            self.dropped, self._handle = True, None
            self._transport.abort()
            return
        self._waiting = now
        self._handle = self._loop.call_later(self._stall, self._look)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
