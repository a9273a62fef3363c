"""State shared by requests: idempotency records, and counts for per-key rate and concurrency limits.

In this process's memory by default; in Redis with `state.redis_url`, so that every process and machine
using the same Redis sees the same records and counts. Redis that is down or slow is never waited on
for long: every call is bounded by `state.socket_timeout`, and a failure is a StateUnavailable (503
state_unavailable with Retry-After).

The limits (`RedisLimits`) implement proxy.policy's `Limits` for per-key rpm and concurrency.

Idempotency records (see proxy.idempotency for the HTTP side): a key is first *claimed* (a small
"running" record with an owner token and an expiry, SET NX in Redis), then *finished* (the stored answer
replaces it, kept for the idempotency TTL) or *released* (deleted, so a retry runs again). Finishing and
releasing only touch a record the same owner still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ServiceUnavailable

if TYPE_CHECKING:
    from .config import Config

log = logging.getLogger(__name__)


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


def _running_value(fingerprint: str, owner: str) -> bytes:
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


# Compare-and-set / compare-and-delete: only the owner of a running claim may finish or release it.
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisRecords:
    """Records in Redis: SET NX PX for the claim, Lua compare-and-set to finish or release, polling with a
    short backoff to wait for another process's attempt."""

    POLL_FIRST, POLL_MAX = 0.05, 0.5

    def __init__(self, state: RedisState):
        self.state = state

    def _key(self, key: str) -> str:
        return f"{self.state.prefix}idem:{key}"

    async def claim(self, key: str, fingerprint: str, owner: str, ttl: float) -> Record | None:
        redis = self.state.client
        running = _running_value(fingerprint, owner)
        for _ in range(5):  # the record may expire between SET NX and GET: then try again
            taken = await self.state.call(redis.set(self._key(key), running, nx=True, px=_ms(ttl)))
            if taken:
                return None
            value = await self.state.call(redis.get(self._key(key)))
            if value is not None:
                return decode_record(value)
        raise StateUnavailable("The idempotency record keeps changing under this request; retry it.")

    async def finish(self, key: str, fingerprint: str, owner: str, answer: Answer, ttl: float) -> None:
        await self.state.call(self.state.client.eval(
            _FINISH, 1, self._key(key), _running_value(fingerprint, owner), answer.encode(fingerprint), _ms(ttl)))

    async def release(self, key: str, fingerprint: str, owner: str) -> None:
        await self.state.call(self.state.client.eval(_RELEASE, 1, self._key(key),
                                                     _running_value(fingerprint, owner)))

    async def wait(self, key: str, deadline: float) -> Record | None:
        loop = asyncio.get_running_loop()
        delay = self.POLL_FIRST
        while True:
            value = await self.state.call(self.state.client.get(self._key(key)))
            if value is None:
                return None
            record = decode_record(value)
            if record.done or loop.time() >= deadline:
                return record
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 1.5, self.POLL_MAX)


# ---- rate and concurrency limits shared by processes ------------------------------------------------

# One atomic step per request, on Redis's own clock (every process agrees on it), with the semantics of
# proxy.policy.MemoryLimits: a token bucket for rpm (up to rpm at once, refilled at rpm a minute) and a
# set of held concurrency slots, each a lease that frees itself after ARGV[3] seconds if never released
# (a process that died holding it). Nothing is counted when the request is refused.
# KEYS: bucket hash, slots sorted set. ARGV: rpm (0: none), concurrency (-1: none), lease s, slot token.
# Returns {0} admitted, {1} every slot held, {2, seconds} out of tokens.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, conc, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {1} end
end
if rpm > 0 then
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
  local tokens, at = tonumber(b[1]) or rpm, tonumber(b[2]) or now
  tokens = math.min(rpm, tokens + math.max(0, now - at) * rpm / 60)
  if tokens < 1 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
    redis.call('PEXPIRE', KEYS[1], 61000)
    return {2, tostring((1 - tokens) * 60 / rpm)}
  end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], 61000)
end
if conc >= 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 1000))
end
return {0}
"""


class _RedisLease:
    __slots__ = ("_limits", "_key", "_token")

    def __init__(self, limits: RedisLimits, key: str, token: str | None):
        self._limits, self._key, self._token = limits, key, token

    async def release(self) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        state = self._limits.state
        with contextlib.suppress(StateUnavailable):  # else the slot frees itself when its lease ends
            await state.call(state.client.zrem(self._limits.slots_key(self._key), token))


class RedisLimits:
    """proxy.policy's `Limits` in Redis: per-key rpm and concurrency counted across every process."""

    def __init__(self, state: RedisState, lease: float = 900):
        self.state = state
        self.lease = lease

    def bucket_key(self, key: str) -> str:
        return f"{self.state.prefix}rpm:{key}"

    def slots_key(self, key: str) -> str:
        return f"{self.state.prefix}slots:{key}"

    async def acquire(self, key: str, *, rpm: int | None, concurrency: int | None):
        from .errors import RateLimited
        from .policy import NO_LEASE, ConcurrencyLimited

        if rpm is None and concurrency is None:
            return NO_LEASE
        token = secrets.token_hex(8) if concurrency is not None else None
        result = await self.state.call(self.state.client.eval(
            _ADMIT, 2, self.bucket_key(key), self.slots_key(key), rpm or 0,
            -1 if concurrency is None else concurrency, self.lease, token or ""))
        if result[0] == 1:
            raise ConcurrencyLimited(
                f"Concurrency limit reached: this API key may have {concurrency} image "
                f"request{'s' if concurrency != 1 else ''} in progress at once; retry when one finishes.",
                retry_after=1)
        if result[0] == 2:
            wait = float(result[1])
            raise RateLimited(f"Rate limit reached: this API key may make {rpm} request"
                              f"{'s' if rpm != 1 else ''} per minute; retry in {math.ceil(wait)} s.",
                              retry_after=wait)
        return NO_LEASE if token is None else _RedisLease(self, key, token)


# ---- the two backends -------------------------------------------------------------------------------


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


class RedisState:
    """One redis.asyncio client (a connection pool) shared by the records and the limits."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str = "qip:", socket_timeout: float = 2, lease: float = 900):
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:  # pragma: no cover - the message is the point
            raise RuntimeError("state.redis_url needs the redis package: pip install 'qwen-image-proxy[redis]'") \
                from None
        self.url = url
        self.prefix = prefix
        self.socket_timeout = socket_timeout
        self._client: Any = None
        self.records: Records = RedisRecords(self)
        self.limits: RedisLimits | None = RedisLimits(self, lease)

    @property
    def client(self):
        if self._client is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries inside the client: each call is bounded by socket_timeout, and `call` bounds the
            # whole of it again, so a Redis that is down or stalled costs a request at most that long.
            self._client = Redis.from_url(self.url, socket_timeout=self.socket_timeout,
                                          socket_connect_timeout=self.socket_timeout,
                                          retry=Retry(NoBackoff(), 0), retry_on_timeout=False,
                                          health_check_interval=30)
        return self._client

    async def call(self, awaitable):
        """Await one Redis call; any failure to reach Redis is a StateUnavailable."""
        from redis.exceptions import RedisError

        try:
            return await asyncio.wait_for(awaitable, self.socket_timeout * 2)
        except (RedisError, OSError, TimeoutError) as e:
            # The URL may carry a password: never in a message or a log.
            log.warning("shared state: Redis call failed: %s", type(e).__name__)
            raise StateUnavailable() from None

    async def start(self) -> None:
        try:
            await self.call(self.client.ping())
        except StateUnavailable:
            # Serve anyway: requests that need the state get 503 until it is back.
            log.warning("shared state: Redis is not reachable yet; requests that need it get 503 until it is")

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None


State = MemoryState | RedisState


def make_state(config: Config) -> State:
    """The state `config.state` asks for. A concurrency slot held in Redis frees itself a minute after the
    longest a request may run (server.request_timeout), should its process die holding it."""
    state = config.state
    if state.redis_url:
        return RedisState(state.redis_url, prefix=state.key_prefix, socket_timeout=state.socket_timeout,
                          lease=config.server.request_timeout + 60)
    return MemoryState(state.memory_max_records, int(state.memory_max_mb * 1024 * 1024))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
