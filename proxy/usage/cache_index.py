"""Where the seeded-request cache keeps its index (which stored images answer which request): in this
process's memory, or in Redis (state.redis_url) so that every proxy sharing it, and the image store,
shares the entries."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..state.shared_redis import RedisState


@dataclass
class Entry:
    names: list[str]  # in the image store
    formats: list[str]
    seeds: list[int | None]
    revised: list[str | None]
    route: str
    provider: str
    expires: float  # Unix time
    size: int  # bytes of its images


class CacheIndex(Protocol):
    async def get(self, model: str, key: tuple) -> Entry | None: ...

    async def put(self, model: str, key: tuple, entry: Entry, max_bytes: int) -> None: ...

    async def forget(self, model: str, key: tuple) -> None: ...


class MemoryIndex:
    """One LRU index per model, each within its model's max_mb."""

    def __init__(self) -> None:
        self._index: dict[str, OrderedDict[tuple, Entry]] = {}
        self._bytes: dict[str, int] = {}

    async def get(self, model: str, key: tuple) -> Entry | None:
        index = self._index.get(model)
        if index is None:
            return None
        entry = index.get(key)
        if entry is not None:
            index.move_to_end(key)
        return entry

    async def put(self, model: str, key: tuple, entry: Entry, max_bytes: int) -> None:
        await self.forget(model, key)
        index = self._index.setdefault(model, OrderedDict())
        index[key] = entry
        self._bytes[model] = self._bytes.get(model, 0) + entry.size
        while self._bytes[model] > max_bytes and index:
            await self.forget(model, next(iter(index)))

    async def forget(self, model: str, key: tuple) -> None:
        index = self._index.get(model)
        entry = index.pop(key, None) if index is not None else None
        if entry is not None:
            self._bytes[model] -= entry.size


# Puts the entry, drops expired ones from the model's books, then the oldest while over max_bytes.
_PUT = """
local now, expires, size, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do redis.call('HDEL', KEYS[3], k) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('SET', KEYS[1], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[2], expires, KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], size)
redis.call('PEXPIRE', KEYS[2], ARGV[6]) redis.call('PEXPIRE', KEYS[3], ARGV[6])
local total = 0
for _, v in ipairs(redis.call('HVALS', KEYS[3])) do total = total + tonumber(v) end
while total > limit do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then break end
  total = total - tonumber(redis.call('HGET', KEYS[3], first[1]) or '0')
  redis.call('ZREM', KEYS[2], first[1]) redis.call('HDEL', KEYS[3], first[1]) redis.call('DEL', first[1])
end
return 1
"""

_FORGET = """
redis.call('DEL', KEYS[1]) redis.call('ZREM', KEYS[2], KEYS[1]) redis.call('HDEL', KEYS[3], KEYS[1])
return 1
"""


class RedisIndex:
    """The index in Redis: an entry per request (expiring with it), and per model the entries by expiry and
    their sizes, so max_mb holds across every proxy (the first to expire go first when it is passed)."""

    def __init__(self, state: RedisState) -> None:
        self.state = state

    def _keys(self, model: str, key: tuple) -> tuple[str, str, str]:
        # repr of plain values (text, numbers, bytes, None, tuples) is the same in every process.
        digest = hashlib.sha256(repr(key).encode()).hexdigest()
        # A model's entries and its books share its hash tag on a cluster: a put may drop other entries.
        base = f"{self.state.prefix}cache:{self.state.tag(model)}"
        return f"{base}:{digest}", f"{base}:by-expiry", f"{base}:sizes"

    async def get(self, model: str, key: tuple) -> Entry | None:
        raw = await self.state.call(self.state.client.get(self._keys(model, key)[0]))
        return Entry(**json.loads(raw)) if raw else None

    async def put(self, model: str, key: tuple, entry: Entry, max_bytes: int) -> None:
        ttl_ms = max(1, int((entry.expires - time.time()) * 1000))
        await self.state.call(self.state.client.eval(
            _PUT, 3, *self._keys(model, key), time.time(), entry.expires, entry.size, max_bytes,
            json.dumps(asdict(entry)), ttl_ms))

    async def forget(self, model: str, key: tuple) -> None:
        await self.state.call(self.state.client.eval(_FORGET, 3, *self._keys(model, key)))
