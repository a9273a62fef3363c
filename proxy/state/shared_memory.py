"""The shared state in this process's memory (the default): idempotency records with an LRU bound and TTLs.
Per-key limits stay with proxy.routing.policy's in-process MemoryLimits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .shared import Answer, Record, Records

if TYPE_CHECKING:
    from .shared_redis import RedisLimits


@dataclass
class _MemoryEntry:
    fingerprint: str
    expires: float
    owner: str | None = None
    answer: Answer | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryRecords:
    """Records in this process: LRU-bounded by count and by the bytes of stored answers, each with a TTL.
    A claim in progress is never evicted (it holds no answer yet)."""

    def __init__(self, max_records: int = 10000, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _MemoryEntry] = OrderedDict()
        self._bytes = 0

    def _get(self, key: str) -> _MemoryEntry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= time.monotonic():
            self._drop(key)
            return None
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.answer is not None:
                self._bytes -= len(entry.answer.body)
            entry.changed.set()

    def _evict(self) -> None:
        now = time.monotonic()
        for key in [k for k, e in self._entries.items() if e.expires <= now]:
            self._drop(key)
        while self._entries and (len(self._entries) > self.max_records or self._bytes > self.max_bytes):
            victim = next((k for k, e in self._entries.items() if e.answer is not None), None)
            if victim is None:
                break
            self._drop(victim)

    @staticmethod
    def _record(entry: _MemoryEntry) -> Record:
        return Record(entry.fingerprint, entry.answer)

    async def claim(self, key: str, fingerprint: str, owner: str, ttl: float) -> Record | None:
        entry = self._get(key)
        if entry is not None:
            return self._record(entry)
        self._entries[key] = _MemoryEntry(fingerprint, time.monotonic() + ttl, owner=owner)
        self._evict()
        return None

    async def finish(self, key: str, fingerprint: str, owner: str, answer: Answer, ttl: float) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.owner != owner:
            return
        entry.owner, entry.answer, entry.expires = None, answer, time.monotonic() + ttl
        self._bytes += len(answer.body)
        entry.changed.set()
        self._entries.move_to_end(key)
        self._evict()

    async def release(self, key: str, fingerprint: str, owner: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.owner == owner:
            self._drop(key)

    async def wait(self, key: str, deadline: float) -> Record | None:
        loop = asyncio.get_running_loop()
        while True:
            entry = self._get(key)
            if entry is None or entry.answer is not None:
                return None if entry is None else self._record(entry)
            left = min(deadline, loop.time() + max(0.0, entry.expires - time.monotonic())) - loop.time()
            if left <= 0:
                return self._record(entry)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.changed.wait(), left)


class MemoryState:
    kind = "memory"
    reachable = True  # in this process: always

    def health(self) -> dict[str, Any]:
        return {"backend": "memory", "reachable": True}

    def __init__(self, max_records: int = 10000, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.records: Records = MemoryRecords(max_records, max_bytes)
        # None: proxy.routing.policy keeps its own in-process MemoryLimits.
        self.limits: RedisLimits | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
