"""The job store the config asks for: Redis with state.redis_url (several proxies share the jobs), else SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .redis_store import RedisJobStore
from .sqlite_store import SqliteJobStore
from .store import JobStore

if TYPE_CHECKING:
    from ..config import Config


def make_job_store(config: Config) -> JobStore:
    if config.state.redis_url:
        return RedisJobStore(config.state.redis_url, prefix=config.state.key_prefix + "jobs:",
                             socket_timeout=config.state.socket_timeout, ttl=config.jobs.ttl_seconds)
    return SqliteJobStore(config.jobs.path)
