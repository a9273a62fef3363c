"""The shared state in Redis (`state.redis_url`): idempotency records and per-key limits that every
process and machine using the same Redis sees.

Redis that is down or slow is never waited on for long: every call is bounded by `state.socket_timeout`,
and a failure is a StateUnavailable (503 state_unavailable with Retry-After). Whether Redis answers (every
call says, and a PING every few seconds when none comes) is what /ready, /health and qip_shared_state_up
show, and when it is back nothing needs a restart. What a request holds while
it runs (a concurrency slot, an idempotency claim) lives in Redis for a short lease that this process
renews while it holds it: one whose holder died, or whose taking timed out here although Redis did it a
moment later, frees itself within that lease. The limits (`RedisLimits`)
implement proxy.routing.policy's `Limits` for per-key rpm and concurrency. The redis package is imported
only when a RedisState is made (factory.py makes one when a redis_url is configured).

On a Redis Cluster (`state.redis_cluster`) the client is redis-py's cluster client, and every script or
multi-key command names keys that share a hash tag (`tag`), so they sit in one slot; on one node the key
names stay as they always were (nothing in a live Redis is renamed by an upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable
from typing import Any

from ..errors import RateLimited
from ..routing.policy import NO_LEASE, ConcurrencyLimited, Lease
from .shared import Answer, Record, Records, StateUnavailable, decode_record, running_value

log = logging.getLogger("proxy.state")  # the state's logger, whichever backend holds it
# The least a held slot or claim lives in Redis without a renewal (longer with a long socket_timeout).
LEASE_SECONDS = 15.0
# How often the state asks Redis whether it answers (PING), while it does and while it does not: /ready, the
# qip_shared_state_up gauge and the log see an outage that no request met, and its end within about a second.
CHECK_UP_SECONDS, CHECK_DOWN_SECONDS = 5.0, 1.0
# A Redis that stays away is logged once, then once a minute (every request that needs it fails meanwhile).
FAILURE_LOG_SECONDS = 60.0


def connect(url: str, *, cluster: bool, socket_timeout: float, **options: Any) -> Any:
    """A redis.asyncio client for `url`: redis.asyncio.RedisCluster (which finds the other nodes and follows
    MOVED / ASK) when `cluster`, else redis.asyncio.Redis."""
    if cluster:
        from redis.asyncio import RedisCluster

        return RedisCluster.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                     **options)
    from redis.asyncio import Redis

    return Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout, **options)


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a failing Redis call raises: RedisError, and the cluster client's RedisClusterException (not a
    RedisError: no node reachable, a slot nobody serves, keys of one command in several slots)."""
    from redis.exceptions import RedisClusterException, RedisError

    return RedisError, RedisClusterException, OSError, TimeoutError


# ---- idempotency records --------------------------------------------------------------------------


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
_RENEW_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


class RedisRecords:
    """Records in Redis: SET NX PX for the claim, Lua compare-and-set to finish or release, polling with a
    short backoff to wait for another process's attempt."""

    POLL_FIRST, POLL_MAX = 0.05, 0.5

    def __init__(self, state: RedisState) -> None:
        self.state = state

    def _key(self, key: str) -> str:
        return f"{self.state.prefix}idem:{key}"

    async def claim(self, key: str, fingerprint: str, owner: str, ttl: float) -> Record | None:
        redis = self.state.client
        running = running_value(fingerprint, owner)
        ttl = min(ttl, self.state.lease)  # renewed while the attempt runs
        for _ in range(5):  # the record may expire between SET NX and GET: then try again
            taken = await self.state.call(redis.set(self._key(key), running, nx=True, px=_ms(ttl)))
            if taken:
                self.state.hold(("claim", key, owner), _RENEW_CLAIM, self._key(key), running, _ms(ttl))
                return None
            value = await self.state.call(redis.get(self._key(key)))
            if value is not None:
                return decode_record(value)
        raise StateUnavailable("The idempotency record keeps changing under this request; retry it.")

    async def finish(self, key: str, fingerprint: str, owner: str, answer: Answer, ttl: float) -> None:
        self.state.drop(("claim", key, owner))
        await self.state.call(self.state.client.eval(
            _FINISH, 1, self._key(key), running_value(fingerprint, owner), answer.encode(fingerprint), _ms(ttl)))

    async def release(self, key: str, fingerprint: str, owner: str) -> None:
        self.state.drop(("claim", key, owner))
        await self.state.call(self.state.client.eval(_RELEASE, 1, self._key(key),
                                                     running_value(fingerprint, owner)))

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
# proxy.routing.policy.MemoryLimits: a token bucket for rpm (up to rpm at once, refilled at rpm a minute) and a
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
# Renew a slot that is still held (not expired, not taken back). ARGV: slot token, lease s.
_RENEW_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local score = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if score == nil or score < now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 1
"""


class _RedisLease:
    __slots__ = ("_limits", "_key", "_token")

    def __init__(self, limits: RedisLimits, key: str, token: str | None) -> None:
        self._limits, self._key, self._token = limits, key, token

    async def release(self) -> None:
        token, self._token = self._token, None
        if token is None:
            return
        state = self._limits.state
        state.drop(("slot", self._key, token))
        with contextlib.suppress(StateUnavailable):  # else the slot frees itself when its lease ends
            await state.call(state.client.zrem(self._limits.slots_key(self._key), token))


class RedisLimits:
    """proxy.routing.policy's `Limits` in Redis: per-key rpm and concurrency counted across every process."""

    def __init__(self, state: RedisState, lease: float) -> None:
        self.state = state
        self.lease = lease  # seconds a slot lives in Redis unless renewed

    # One admission touches both: on a cluster they share the key's hash tag.
    def bucket_key(self, key: str) -> str:
        return f"{self.state.prefix}rpm:{self.state.tag(key)}"

    def slots_key(self, key: str) -> str:
        return f"{self.state.prefix}slots:{self.state.tag(key)}"

    async def acquire(self, key: str, *, rpm: int | None, concurrency: int | None) -> Lease:
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
        if token is None:
            return NO_LEASE
        self.state.hold(("slot", key, token), _RENEW_SLOT, self.slots_key(key), token, self.lease)
        return _RedisLease(self, key, token)


# ---- the backend ------------------------------------------------------------------------------------


class RedisState:
    """One redis.asyncio client (a connection pool) shared by the records and the limits."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str = "qip:", socket_timeout: float = 2, lease: float | None = None,
                 cluster: bool = False) -> None:
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:  # pragma: no cover - the message is the point
            raise RuntimeError("state.redis_url needs the redis package: pip install 'qwen-image-proxy[redis]'") \
                from None
        self.url = url
        self.prefix = prefix
        self.cluster = cluster
        self.socket_timeout = socket_timeout
        self._client: Any = None
        # Short, and renewed every third of it, so a renewal has two more tries (each at most 2 x
        # socket_timeout) before what it keeps lapses.
        self.lease = lease if lease is not None else max(LEASE_SECONDS, 6 * socket_timeout)
        self._held: dict[tuple, tuple] = {}  # what this process holds -> (renewal script, key, args)
        self._keeper: asyncio.Task | None = None
        # Whether Redis answered the last call (a request's, or the watcher's PING), and since when it has not.
        self.reachable = True
        self.down_since: float | None = None  # time.time() of the first failed call of this outage
        self.down_error = ""  # that call's error type (never its message: the URL may hold a password)
        self._failure_logged = self._refusal_logged = -FAILURE_LOG_SECONDS
        self._watcher: asyncio.Task | None = None
        self.records: Records = RedisRecords(self)
        self.limits: RedisLimits | None = RedisLimits(self, self.lease)

    def tag(self, part: str) -> str:
        """`part` as a key's hash tag on a cluster ({part}: every key naming it sits in one slot), as it is
        on one node (the names single-node deployments have always had)."""
        return f"{{{part}}}" if self.cluster else part

    @property
    def client(self) -> Any:  # redis.asyncio.Redis or RedisCluster, imported only when Redis is used
        if self._client is None:
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # No retries inside the client: each call is bounded by socket_timeout, and `call` bounds the
            # whole of it again, so a Redis that is down or stalled costs a request at most that long.
            # (A cluster client still follows MOVED / ASK, and maps the slots again after a failed call.)
            options: dict[str, Any] = {"retry": Retry(NoBackoff(), 0), "health_check_interval": 30}
            if not self.cluster:
                options["retry_on_timeout"] = False
            self._client = connect(self.url, cluster=self.cluster, socket_timeout=self.socket_timeout, **options)
        return self._client

    async def call(self, awaitable: Awaitable[Any]) -> Any:
        """Await one Redis call; any failure to reach Redis is a StateUnavailable."""
        try:
            found = await asyncio.wait_for(awaitable, self.socket_timeout * 2)
        except redis_errors() as e:
            self._failed(e)
            raise StateUnavailable() from None
        if not self.reachable:
            log.warning("shared state: Redis answers again after %.0f s", time.time() - (self.down_since or 0))
            self.reachable, self.down_since, self.down_error = True, None, ""
        return found

    def _failed(self, e: BaseException) -> None:
        # Said once, then once a minute while Redis stays away (each request that needs it fails meanwhile).
        # The URL may carry a password: never in a message or a log.
        from redis.exceptions import ResponseError

        now, error = time.monotonic(), type(e).__name__
        if isinstance(e, ResponseError):
            # Redis answered, with an error (out of memory, MOVED from a cluster): reachable, so a PING would
            # say it is back at once; said at most once a minute, without flipping `reachable`.
            if now - self._refusal_logged >= FAILURE_LOG_SECONDS:
                self._refusal_logged = now
                log.warning("shared state: Redis refused a call: %s", error)
            return
        if self.reachable:
            self.reachable, self.down_since, self.down_error = False, time.time(), error
            self._failure_logged = now
            log.warning("shared state: Redis call failed: %s; requests that need it (per-key limits, "
                        "Idempotency-Key, budgets) get 503 state_unavailable until it answers", error)
        elif now - self._failure_logged >= FAILURE_LOG_SECONDS:
            self._failure_logged = now
            log.warning("shared state: Redis call failed (for %.0f s): %s", time.time() - (self.down_since or 0),
                        error)

    def health(self) -> dict[str, Any]:
        """What /ready and /health say of the shared state (never the URL: it may hold a password)."""
        if self.reachable:
            return {"backend": "redis", "reachable": True}
        return {"backend": "redis", "reachable": False, "error": self.down_error,
                "down_seconds": round(time.time() - (self.down_since or time.time()), 1)}

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(CHECK_UP_SECONDS if self.reachable else CHECK_DOWN_SECONDS)
            with contextlib.suppress(StateUnavailable):
                await self.call(self.client.ping())

    def hold(self, ident: tuple, script: str, key: str, *args: Any) -> None:
        """Renew `key` with `script` every third of the lease until `drop(ident)`."""
        self._held[ident] = (script, key, args)
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep())

    def drop(self, ident: tuple) -> None:
        self._held.pop(ident, None)

    async def _keep(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease / 3)
            held = list(self._held.values())
            if not held:
                break
            pipe = self.client.pipeline(transaction=False)
            for script, key, args in held:
                pipe.eval(script, 1, key, *args)
            with contextlib.suppress(StateUnavailable):  # Redis away: try again next time
                await self.call(pipe.execute())

    async def start(self) -> None:
        try:
            await self.call(self.client.ping())
            if not self.cluster:
                await check_not_cluster(self.client, "shared state")
        except StateUnavailable:
            # Serve anyway: requests that need the state get 503 until it is back (the watcher sees when).
            # A cluster client pointed at one plain Redis fails every call: say what to set.
            if self.cluster:
                await not_a_cluster(self.url, self.socket_timeout, "shared state")
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())

    async def close(self) -> None:
        self._held.clear()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait({self._watcher})
            self._watcher = None
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.wait({self._keeper})  # its end, without raising its cancellation here
            self._keeper = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None


async def check_not_cluster(client: Any, who: str) -> None:
    """Say so at start when a plain client was pointed at a cluster node: every call would fail with MOVED
    or CROSSSLOT (503 state_unavailable), and the log would only name the error's type."""
    with contextlib.suppress(*redis_errors()):
        info = await asyncio.wait_for(client.info("cluster"), 5)
        if str(info.get("cluster_enabled", 0)) == "1":
            log.error("%s: this Redis is a node of a Redis Cluster: set state.redis_cluster: true (until then "
                      "requests that need Redis get 503 state_unavailable)", who)


async def not_a_cluster(url: str, socket_timeout: float, who: str) -> bool:
    """Whether state.redis_cluster names a Redis that is no node of a cluster (then said at start, as an
    error): the cluster client refuses it ("Cluster mode is not enabled"), so every call fails, and the log
    only said Redis was "not reachable yet"."""
    plain = connect(url, cluster=False, socket_timeout=socket_timeout)
    try:
        info = await asyncio.wait_for(plain.info("cluster"), 5)
    except redis_errors():
        return False  # not reachable at all (or INFO refused): nothing more to say
    finally:
        with contextlib.suppress(Exception):
            await plain.aclose()
    if str(info.get("cluster_enabled", 0)) == "1":
        return False
    log.error("%s: this Redis is not a node of a Redis Cluster: set state.redis_cluster: false (until then "
              "requests that need Redis get 503 state_unavailable)", who)
    return True


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))
