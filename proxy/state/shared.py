"""State shared by requests: idempotency records, and counts for per-key rate and concurrency limits.

In this process's memory by default (here); in Redis with `state.redis_url` (proxy.state_redis), so
that every process and machine using the same Redis sees the same records and counts.

Idempotency records (see proxy.idempotency for the HTTP side): a key is first *claimed* (a small
"running" record with an owner token and an expiry, SET NX in Redis), then *finished* (the stored answer
replaces it, kept for the idempotency TTL) or *released* (deleted, so a retry runs again). Finishing and
releasing only touch a record the same owner still holds.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeAlias

from ..http.errors import ServiceUnavailable

if TYPE_CHECKING:
    from ..config import Config
    from .shared_redis import RedisLimits, RedisState


class StateUnavailable(ServiceUnavailable):
    """The shared state (Redis) cannot be reached or did not answer in time."""

    code = "state_unavailable"

    def __init__(self, message: str = "The proxy's shared state (Redis) is unavailable; retry shortly.", *,
                 retry_after: float = 2):
        super().__init__(message, retry_after=retry_after)


# ---- idempotency records --------------------------------------------------------------------------


@dataclass
class Answer:
    """A stored HTTP answer: what a repeat of the request gets back."""

    status: int
    # A tuple: a large body in pieces (an image's text can be a view of the upstream's answer), sent one
    # after the other without joining them; joined (`whole`) only to be kept.
    body: bytes | tuple[bytes | memoryview, ...]
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def whole(self) -> Answer:
        """This answer with its body as one bytes object."""
        if isinstance(self.body, bytes):
            return self
        return replace(self, body=b"".join(self.body))

    def encode(self, fingerprint: str) -> bytes:
        head = json.dumps({"state": "done", "fp": fingerprint, "status": self.status, "headers": self.headers,
                           "content_type": self.content_type}, separators=(",", ":"))
        return head.encode() + b"\n" + self.body


@dataclass
class Record:
    """What a key holds: the fingerprint of the request that claimed it, and its answer once done."""

    fingerprint: str
    answer: Answer | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None


def running_value(fingerprint: str, owner: str) -> bytes:
    """A claim in progress as stored (in Redis); decode_record reads it back."""
    return json.dumps({"state": "running", "fp": fingerprint, "owner": owner}, separators=(",", ":")).encode()


def decode_record(value: bytes) -> Record:
    head, _, body = value.partition(b"\n")
    meta = json.loads(head)
    if meta["state"] != "done":
        return Record(meta["fp"])
    return Record(meta["fp"], Answer(meta["status"], body, meta.get("headers") or {},
                                     meta.get("content_type") or "application/json"))


class Records(Protocol):
    async def claim(self, key: str, fingerprint: str, owner: str, ttl: float) -> Record | None:
        """Take the key for a new attempt (None), or get the record someone else holds."""
        ...

    async def finish(self, key: str, fingerprint: str, owner: str, answer: Answer, ttl: float) -> None: ...

    async def release(self, key: str, fingerprint: str, owner: str) -> None: ...

    async def wait(self, key: str, deadline: float) -> Record | None:
        """Wait until the key's attempt is done (its record), gone (None) or the loop time `deadline`
        passes (the running record)."""
        ...


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

    def __init__(self, max_records: int = 10000, max_bytes: int = 512 * 1024 * 1024):
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


# ---- the two backends: this one, and proxy.state_redis.RedisState ----------------------------------


class MemoryState:
    kind = "memory"

    def __init__(self, max_records: int = 10000, max_bytes: int = 512 * 1024 * 1024):
        self.records: Records = MemoryRecords(max_records, max_bytes)
        # None: proxy.policy keeps its own in-process MemoryLimits.
        self.limits: RedisLimits | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


State: TypeAlias = "MemoryState | RedisState"


def make_state(config: Config) -> State:
    """The state `config.state` asks for. What a request holds in Redis (a concurrency slot, an idempotency
    claim) frees itself within a short lease should its process die holding it (proxy.state_redis)."""
    state = config.state
    if state.redis_url:
        from .shared_redis import RedisState

        return RedisState(state.redis_url, prefix=state.key_prefix, socket_timeout=state.socket_timeout)
    return MemoryState(state.memory_max_records, int(state.memory_max_mb * 1024 * 1024))
