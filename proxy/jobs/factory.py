"""The job store the config asks for: Redis with state.redis_url (several proxies share the jobs), else SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .redis_store import RedisJobStore
from .sqlite_store import SqliteJobStore
from .store import JobStore

if TYPE_CHECKING:
    from ..config import Config


def make_job_store(config: Config) -> JobStore:
    state = config.state
    if state.redis_url:
        # On a cluster every job key shares the hash tag {jobs}: a job's scripts touch the queue, the job and
        # its owner's sets at once (redis_store.py). On one node the names stay as they always were.
        prefix = state.key_prefix + ("{jobs}:" if state.redis_cluster else "jobs:")
        return RedisJobStore(state.redis_url, prefix=prefix, socket_timeout=state.socket_timeout,
                             ttl=config.jobs.ttl_seconds, cluster=state.redis_cluster)
    return SqliteJobStore(config.jobs.path)
