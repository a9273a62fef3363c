"""What a job store does (SQLite for one machine, Redis for several): the interface."""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Protocol

from ..errors import ServiceUnavailable

if TYPE_CHECKING:
    from .model import Job


class JobStoreUnavailable(ServiceUnavailable):
    code = "job_store_unavailable"

    def __init__(self, message: str = "The job store is unavailable; retry shortly.", *, retry_after: float = 2):
        super().__init__(message, retry_after=retry_after)


class JobStore(Protocol):
    """Every write that depends on who holds a job (a claim, a lease) is atomic in the store, so two
    processes never both run a job, and a process that lost its lease writes nothing."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, job: Job, request: bytes, max_active: int) -> bool:
        """Add a queued job with its stored request; False (nothing added) when its owner already has
        `max_active` jobs queued or running."""

    async def get(self, job_id: str) -> Job | None: ...

    async def request(self, job_id: str) -> bytes | None: ...

    async def result(self, job_id: str) -> bytes | None: ...

    async def list(self, owner: str, *, limit: int, after: str | None, status: str | None) -> builtins.list[Job]:
        """The owner's jobs, newest first; `after`: the id of the last job of the previous page."""

    async def active_count(self, owner: str) -> int:
        """The owner's queued and running jobs."""

    async def claim(self, worker: str, lease: float, skip_owners: frozenset[str] = frozenset()) -> Job | None:
        """The oldest queued job not of `skip_owners` (owners whose key has no free slot now), now
        in_progress and held by `worker` for `lease` seconds."""

    async def claim_expired(self, worker: str, lease: float) -> Job | None:
        """A running job whose holder's lease ran out (its process died), now held by `worker`."""

    async def renew(self, job_id: str, worker: str, lease: float) -> Job | None:
        """Extend the lease; the job (to see a cancel request), or None when `worker` no longer holds it."""

    async def save(self, job: Job, worker: str, *, result: bytes | None = None, release: bool = False) -> bool:
        """Write a job `worker` holds (its result too; `release`: give up the lease); False if not held."""

    async def cancel(self, job_id: str, worker: str, lease: float) -> tuple[Job | None, bool]:
        """A queued job: taken by `worker` (in_progress, held) to be ended as cancelled; a running one:
        marked to be stopped by its holder. (The job as it is now or None, whether `worker` took it.)"""

    async def due_deliveries(self, worker: str, now: float, hold: float, limit: int = 50) -> builtins.list[Job]:
        """At most `limit` jobs with a webhook delivery due by `now`, held by `worker` for `hold` seconds
        for the attempt."""

    async def save_deliveries(self, job: Job, worker: str) -> None:
        """Write the job's deliveries back and let go of the hold."""

    async def delete(self, job_id: str) -> None: ...

    async def purge(self, before: float) -> builtins.list[str]:
        """Remove finished jobs whose webhooks are settled and that ended before `before`; their ids."""
