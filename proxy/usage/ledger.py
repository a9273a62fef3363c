"""The ledger's interface and its writer: records queue in memory and are written in batches off the
request path, so a slow or down database never fails or delays a generation."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from .aggregate import Partial
from .record import UsageRecord

log = logging.getLogger("proxy.usage")

# Records built on the loop between its other work: a full batch (500) at once held it for milliseconds.
BUILD_CHUNK = 50


class LedgerBackend(Protocol):
    """Where records live: SQLite (proxy/usage/sqlite.py) or PostgreSQL (proxy/usage/postgres.py)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def write(self, records: list[UsageRecord]) -> None:
        """Insert; a record whose id is there already is skipped (batches are retried). Raises on failure."""

    async def query(self, start: float, end: float) -> list[UsageRecord]:
        """Every record with start <= ts < end, oldest first."""

    async def aggregate(self, lo: float, hi: float, origin: float, width: int, by_call: bool = False) -> list[Partial]:
        """The records with lo <= ts < hi summed in the database per bucket (of `width` seconds from
        `origin`) and dimension (aggregate.py)."""


class LedgerWriter:
    """A bounded queue in front of a backend: `add` never waits; a task writes batches every
    flush_seconds (or sooner when a batch is full), and keeps a batch that failed to try it again."""

    def __init__(self, backend: LedgerBackend, *, queue_max: int, batch_size: int, flush_seconds: float,
                 write_timeout: float, on_drop: Callable[[int], object] | None = None,
                 scrub: Callable[[str], str] = str) -> None:
        self.backend = backend
        self.queue_max, self.batch_size = queue_max, batch_size
        self.flush_seconds, self.write_timeout = flush_seconds, write_timeout
        self.on_drop = on_drop or (lambda n: None)
        self.scrub = scrub  # a database URL may carry a password: never in a log line
        self._queue: collections.deque[UsageRecord | Callable[[], UsageRecord]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._writing = asyncio.Lock()  # one batch at a time: a flush() beside the task writes nothing twice
        self._failing_since: float | None = None
        self._last_drop_log = 0.0
        self.dropped = 0
        self.written = 0

    @property
    def pending(self) -> int:
        return len(self._queue)

    def add(self, record: UsageRecord | Callable[[], UsageRecord]) -> None:
        """Queue a record, or what builds it (then built by the writer, off the request's path): O(1);
        past queue_max it is dropped and counted."""
        if len(self._queue) >= self.queue_max:
            self.dropped += 1
            self.on_drop(1)
            now = time.monotonic()
            if now - self._last_drop_log >= 10:  # one line per 10 s, not one per request
                self._last_drop_log = now
                log.error("usage ledger: %d record(s) waiting (usage.queue_max); dropping new ones "
                          "(%d dropped so far)", len(self._queue), self.dropped)
            return
        self._queue.append(record)
        queued = len(self._queue)
        if queued == 1 or queued == self.batch_size:  # the writer waits for the first record, then a batch
            self._wake.set()

    async def start(self) -> None:
        await self.backend.start()
        self._task = asyncio.create_task(self._run(), name="usage-ledger-writer")

    async def _run(self) -> None:
        # Ends when close() sets _closing, not by cancellation alone (on Python 3.11 asyncio.wait_for may
        # swallow a cancellation that arrives as its wait ends, and a loop would then never stop).
        failing = False
        while not self._closing:
            if not self._queue:  # nothing to write: sleep until the first record (an idle server stays asleep)
                self._wake.clear()
                await self._wake.wait()
                continue
            if failing or len(self._queue) < self.batch_size:  # a batch's worth, or flush_seconds
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_seconds):
                        await self._wake.wait()
            failing = False
            while self._queue and not self._closing:
                if not await self._write_batch():
                    failing = True  # the database is failing: try again after flush_seconds
                    break

    async def _write_batch(self) -> bool:
        async with self._writing:
            return await self._write_locked()

    async def _write_locked(self) -> bool:
        if not self._queue:
            return True
        batch = []
        built = 0
        for i in range(min(self.batch_size, len(self._queue))):
            item = self._queue[i]
            if not isinstance(item, UsageRecord):  # built once: a retried batch keeps its records' ids
                item = self._queue[i] = item()
                built += 1
                if built % BUILD_CHUNK == 0:  # (records are only appended meanwhile: the indexes hold)
                    await asyncio.sleep(0)
            batch.append(item)
        try:
            async with asyncio.timeout(self.write_timeout):
                await self.backend.write(batch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - any database failure: keep the records, try later
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("usage ledger: writing %d record(s) failed (%s: %s); keeping them in memory "
                            "and retrying", len(batch), type(e).__name__, self.scrub(str(e)))
            return False
        for _ in batch:
            self._queue.popleft()
        self.written += len(batch)
        if self._failing_since is not None:
            log.warning("usage ledger: writing again after %.0f s", time.monotonic() - self._failing_since)
            self._failing_since = None
        return True

    async def flush(self, timeout: float = 10.0, failures: int | None = None) -> bool:
        """Write everything queued now (shutdown, the usage API); False if records are left after `timeout`
        or after `failures` failed writes (None: as many as fit in the time)."""
        deadline = time.monotonic() + timeout
        failed = 0
        while self._queue and time.monotonic() < deadline:
            if not await self._write_batch():
                failed += 1
                if failures is not None and failed >= failures:
                    break
                await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return not self._queue

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the task (it ends its batch under write_timeout), write what is queued within `timeout`,
        count the rest as dropped. Never waits longer than that."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=self.write_timeout + 1)
            if not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=1)
            self._task = None
        # A database that fails twice now will not recover in the seconds a shutdown has: exit promptly.
        if not await self.flush(timeout, failures=2):
            left = len(self._queue)
            self.dropped += left
            self.on_drop(left)
            log.error("usage ledger: %d record(s) could not be written before shutdown: dropped", left)
            self._queue.clear()
        await self.backend.close()
