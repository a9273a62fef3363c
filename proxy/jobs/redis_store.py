"""Jobs in Redis (with state.redis_url): every proxy on the same Redis shares the queue. Each step that
depends on who holds a job is one Lua script, so a job is claimed by exactly one proxy, a lease that ran out
is taken over by exactly one, and a proxy that lost its lease writes nothing.

Keys under the prefix: job:<id> (a hash: doc, status, owner, seq, request, result, lease_owner, cancel),
queue (zset by seq), running (zset by lease end, ms), owner:<hash> (zset by seq), active:<hash> (the
owner's queued and running ids), deliveries (zset by next attempt, ms), seq (a counter). The redis package
is imported only when a RedisJobStore is made.

The scripts build their keys from the prefix (ARGV[1]) and name one of them (the queue) as KEYS[1], which
routes them on a Redis Cluster. There, the prefix holds a hash tag ({jobs}), so that every job key sits in
one slot: a claim looks at the queue, the job and its owner's keys in one atomic step, which no set of keys
spread over slots allows. So all the jobs live on one master of the cluster (its memory bounds how many
wait and are kept); the rest of the state is spread by API key and model."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any

from ..state.shared_redis import check_not_cluster, connect, not_a_cluster, redis_errors
from .model import IN_PROGRESS, Job
from .store import JobStoreUnavailable

log = logging.getLogger("proxy.jobs")
# While Redis stays away, its failure is logged once and then at most this often.
FAILURE_LOG_SECONDS = 60.0

_CREATE = """
local p, id = ARGV[1], ARGV[2]
if redis.call('SCARD', p..'active:'..ARGV[4]) >= tonumber(ARGV[5]) then return 0 end
local seq = redis.call('INCR', p..'seq')
redis.call('HSET', p..'job:'..id, 'doc', ARGV[3], 'owner', ARGV[4], 'status', 'queued', 'seq', seq, 'request', ARGV[6])
redis.call('ZADD', p..'queue', seq, id)
redis.call('ZADD', p..'owner:'..ARGV[4], seq, id)
redis.call('SADD', p..'active:'..ARGV[4], id)
return 1
"""
# ARGV: prefix, worker, lease end (ms), now (ms), mode (queued | expired | the id to cancel)
# How far down the queue a claim looks past the jobs of keys with no free slot (a bound on the script's time).
SKIP_SCAN = 200
_TAKE = """
local p, worker = ARGV[1], ARGV[2]
local id
if ARGV[5] == 'queued' then
  if #ARGV == 5 then
    id = redis.call('ZRANGE', p..'queue', 0, 0)[1]
  else  -- the oldest of the first SKIP_SCAN whose owner is not one of ARGV[6..] (keys with no free slot)
    local skip = {}
    for i = 6, #ARGV do skip[ARGV[i]] = true end
    for _, queued in ipairs(redis.call('ZRANGE', p..'queue', 0, SKIP_SCAN - 1)) do
      if not skip[redis.call('HGET', p..'job:'..queued, 'owner') or ''] then id = queued; break end
    end
  end
elseif ARGV[5] == 'expired' then
  id = redis.call('ZRANGEBYSCORE', p..'running', '-inf', ARGV[4], 'LIMIT', 0, 1)[1]
else
  id = ARGV[5]
  if redis.call('HGET', p..'job:'..id, 'status') ~= 'queued' then return nil end
end
if not id then return nil end
local k = p..'job:'..id
if redis.call('EXISTS', k) == 0 then
  redis.call('ZREM', p..'queue', id)
  redis.call('ZREM', p..'running', id)
  return nil
end
redis.call('ZREM', p..'queue', id)
redis.call('HSET', k, 'status', 'in_progress', 'lease_owner', worker)
redis.call('ZADD', p..'running', ARGV[3], id)
return {id, redis.call('HGET', k, 'doc'), redis.call('HGET', k, 'cancel') or '0'}
""".replace("SKIP_SCAN", str(SKIP_SCAN))
_RENEW = """
local p, id = ARGV[1], ARGV[2]
local k = p..'job:'..id
if redis.call('HGET', k, 'lease_owner') ~= ARGV[3] or redis.call('HGET', k, 'status') ~= 'in_progress' then
  return nil
end
redis.call('ZADD', p..'running', ARGV[4], id)
return {redis.call('HGET', k, 'doc'), redis.call('HGET', k, 'cancel') or '0'}
"""
# ARGV: prefix, id, worker, status, doc, release (0/1), next delivery (ms, '' for none), ttl (ms), has result
_SAVE = """
local p, id = ARGV[1], ARGV[2]
local k = p..'job:'..id
if redis.call('HGET', k, 'lease_owner') ~= ARGV[3] then return 0 end
local status = ARGV[4]
redis.call('HSET', k, 'doc', ARGV[5], 'status', status)
if ARGV[9] == '1' then redis.call('HSET', k, 'result', ARGV[10]) end
if ARGV[6] == '1' then
  redis.call('HDEL', k, 'lease_owner')
  redis.call('ZREM', p..'running', id)
end
if status == 'queued' then redis.call('ZADD', p..'queue', redis.call('HGET', k, 'seq'), id) end
if status == 'completed' or status == 'failed' or status == 'cancelled' then
  redis.call('SREM', p..'active:'..redis.call('HGET', k, 'owner'), id)
  redis.call('HDEL', k, 'request')
  redis.call('PEXPIRE', k, ARGV[8])
end
if ARGV[7] ~= '' then redis.call('ZADD', p..'deliveries', ARGV[7], id) else redis.call('ZREM', p..'deliveries', id) end
return 1
"""
_CANCEL_FLAG = """
local k = ARGV[1]..'job:'..ARGV[2]
if redis.call('HGET', k, 'status') == 'in_progress' then redis.call('HSET', k, 'cancel', '1') end
return 1
"""
_DUE = """
local p = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', p..'deliveries', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for _, id in ipairs(ids) do
  local doc = redis.call('HGET', p..'job:'..id, 'doc')
  if doc then
    redis.call('ZADD', p..'deliveries', ARGV[3], id)
    table.insert(out, doc)
  else
    redis.call('ZREM', p..'deliveries', id)
  end
end
return out
"""
_DELETE = """
local p, id = ARGV[1], ARGV[2]
local k = p..'job:'..id
local owner = redis.call('HGET', k, 'owner')
redis.call('DEL', k)
redis.call('ZREM', p..'queue', id) redis.call('ZREM', p..'running', id) redis.call('ZREM', p..'deliveries', id)
if owner then
  redis.call('ZREM', p..'owner:'..owner, id)
  redis.call('SREM', p..'active:'..owner, id)
end
return 1
"""
_SAVE_DELIVERIES = """
local p, id = ARGV[1], ARGV[2]
local k = p..'job:'..id
if redis.call('EXISTS', k) == 0 then return 0 end
redis.call('HSET', k, 'doc', ARGV[3])
if ARGV[4] ~= '' then redis.call('ZADD', p..'deliveries', ARGV[4], id) else redis.call('ZREM', p..'deliveries', id) end
return 1
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisJobStore:
    kind = "redis"

    def __init__(self, url: str, *, prefix: str = "qip:jobs:", socket_timeout: float = 2, ttl: float = 7 * 86400,
                 cluster: bool = False):
        try:
            import redis.asyncio  # noqa: F401
        except ImportError:  # pragma: no cover - the message is the point
            raise RuntimeError("state.redis_url needs the redis package: pip install 'qwen-image-proxy[redis]'") \
                from None
        self.url, self.prefix, self.socket_timeout, self.ttl, self.cluster = url, prefix, socket_timeout, ttl, cluster
        self._client: Any = None
        self._failing_since: float | None = None  # when Redis stopped answering (None: it answers)
        self._failure_logged = 0.0

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect(self.url, cluster=self.cluster, socket_timeout=self.socket_timeout)
        return self._client

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            found = await asyncio.wait_for(awaitable, self.socket_timeout * 2)
        except redis_errors() as e:
            # Said once, then once a minute while Redis stays away: the claim loop, the lease keeper and the
            # webhook sender call it many times a second (20 warnings/s). The URL may hold a password.
            now = time.monotonic()
            if self._failing_since is None or now - self._failure_logged >= FAILURE_LOG_SECONDS:
                since = "" if self._failing_since is None else f" (for {now - self._failing_since:.0f} s)"
                log.warning("jobs: Redis call failed%s: %s", since, type(e).__name__)
                self._failure_logged = now
                if self._failing_since is None:
                    self._failing_since = now
            raise JobStoreUnavailable() from None
        if self._failing_since is not None:
            log.warning("jobs: Redis answers again after %.0f s", time.monotonic() - self._failing_since)
            self._failing_since = None
        return found

    async def _eval(self, script: str, *args: Any) -> Any:
        # KEYS[1] (the queue) only routes the script to the node of the jobs' slot on a cluster.
        return await self._call(self.client.eval(script, 1, f"{self.prefix}queue", self.prefix, *args))

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    async def start(self) -> None:
        try:
            await self._call(self.client.ping())
            if not self.cluster:
                await check_not_cluster(self.client, "jobs")
        except JobStoreUnavailable:
            if self.cluster:
                await not_a_cluster(self.url, self.socket_timeout, "jobs")

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None

    @staticmethod
    def _job(doc: bytes, status: bytes | None = None, cancel: bytes | None = None) -> Job:
        job = Job.from_doc(doc)
        if status:
            job.status = status.decode()
        if cancel == b"1":
            job.cancel_requested = True
        return job

    # ---- the interface ------------------------------------------------------------------------------

    async def create(self, job: Job, request: bytes, max_active: int) -> bool:
        return bool(await self._eval(_CREATE, job.id, job.to_doc(), job.owner, max_active, request))

    async def get(self, job_id: str) -> Job | None:
        doc, status, cancel = await self._call(self.client.hmget(self._key(job_id), "doc", "status", "cancel"))
        return self._job(doc, status, cancel) if doc else None

    async def request(self, job_id: str) -> bytes | None:
        return await self._call(self.client.hget(self._key(job_id), "request"))

    async def result(self, job_id: str) -> bytes | None:
        return await self._call(self.client.hget(self._key(job_id), "result"))

    async def list(self, owner: str, *, limit: int, after: str | None, status: str | None) -> builtins.list[Job]:
        zkey = f"{self.prefix}owner:{owner}"
        top = "+inf"
        if after is not None:
            seq = await self._call(self.client.zscore(zkey, after))
            if seq is None:
                return []
            top = f"({int(seq)}"
        found: list[Job] = []
        while len(found) < limit:
            rows = await self._call(self.client.zrevrangebyscore(zkey, top, "-inf", start=0, num=100,
                                                                 withscores=True))
            if not rows:
                break
            pipe = self.client.pipeline(transaction=False)
            for job_id, _ in rows:
                pipe.hmget(self._key(job_id.decode()), "doc", "status", "cancel")
            for (job_id, _), (doc, st, cancel) in zip(rows, await self._call(pipe.execute()), strict=True):
                if doc is None:  # expired: drop it from the owner's list
                    await self._call(self.client.zrem(zkey, job_id))
                    continue
                job = self._job(doc, st, cancel)
                if status is None or job.status == status:
                    found.append(job)
            top = f"({int(rows[-1][1])}"
        return found[:limit]

    async def active_count(self, owner: str) -> int:
        return await self._call(self.client.scard(f"{self.prefix}active:{owner}"))

    async def _take(self, worker: str, lease: float, mode: str, skip_owners: frozenset[str] = frozenset()) -> Job | None:
        now = time.time()
        row = await self._eval(_TAKE, worker, _ms(now + lease), _ms(now), mode, *sorted(skip_owners))
        if not row:
            return None
        job = self._job(row[1], b"in_progress", row[2])
        return job

    async def claim(self, worker: str, lease: float, skip_owners: frozenset[str] = frozenset()) -> Job | None:
        return await self._take(worker, lease, "queued", skip_owners)

    async def claim_expired(self, worker: str, lease: float) -> Job | None:
        return await self._take(worker, lease, "expired")

    async def renew(self, job_id: str, worker: str, lease: float) -> Job | None:
        row = await self._eval(_RENEW, job_id, worker, _ms(time.time() + lease))
        return self._job(row[0], IN_PROGRESS.encode(), row[1]) if row else None

    async def save(self, job: Job, worker: str, *, result: bytes | None = None, release: bool = False) -> bool:
        due = job.next_delivery_at
        return bool(await self._eval(
            _SAVE, job.id, worker, job.status, job.to_doc(), int(release), "" if due is None else _ms(due),
            _ms(self.ttl), int(result is not None), result if result is not None else b""))

    async def cancel(self, job_id: str, worker: str, lease: float) -> tuple[Job | None, bool]:
        taken = await self._take(worker, lease, job_id)
        if taken is not None:
            return taken, True
        job = await self.get(job_id)
        if job is not None and job.status == IN_PROGRESS:
            await self._eval(_CANCEL_FLAG, job_id)
            job.cancel_requested = True
        return job, False

    async def due_deliveries(self, worker: str, now: float, hold: float, limit: int = 50) -> builtins.list[Job]:
        docs = await self._eval(_DUE, _ms(now), _ms(now + hold), limit)
        return [Job.from_doc(doc) for doc in docs]

    async def save_deliveries(self, job: Job, worker: str) -> None:
        due = job.next_delivery_at
        await self._eval(_SAVE_DELIVERIES, job.id, job.to_doc(), "" if due is None else _ms(due))

    async def delete(self, job_id: str) -> None:
        await self._eval(_DELETE, job_id)  # one script: a cluster client has no MULTI across commands

    async def purge(self, before: float) -> builtins.list[str]:
        return []  # finished jobs expire by themselves (PEXPIRE jobs.ttl_seconds when they end)

