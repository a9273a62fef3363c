"""Runs background jobs: claims queued ones, keeps their leases, ends them (completed, failed, cancelled),
takes over jobs whose process died; its WebhookSender sends their webhooks. One per proxy process."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..errors import ProxyError
from ..media import progress
from ..routing.policy import ConcurrencyLimited
from ..telemetry.tracing import clean
from .model import (
    CANCELLED,
    COMPLETED,
    EVENTS,
    FAILED,
    IN_PROGRESS,
    QUEUED,
    TERMINAL,
    Delivery,
    Job,
    new_message_id,
    request_from_bytes,
    webhook_body,
)
from .store import JobStore
from .webhook_sender import WebhookSender

if TYPE_CHECKING:
    from ..config.jobs import JobsConfig
    from ..request import ImageRequest
    from ..telemetry.metrics import Metrics
    from ..telemetry.tracing import Tracing
    from .webhooks import Deliverer

log = logging.getLogger("proxy.jobs")

# Runs one job's request: (the answer's JSON bytes, the route that served it)
Work = Callable[["ImageRequest", Job], Awaitable[tuple[bytes, str]]]
# A key's concurrency slot for a job (by the key's name; None: no key): an object with `release()`.
Slot = Callable[[str | None], Awaitable[Any]]

# A running job's progress is written at most this often.
PROGRESS_WRITE_SECONDS = 1.0
# Why a running job's task is cancelled when the server stops (its work records it as "shutdown").
SHUTTING_DOWN = "the server is shutting down"
INTERRUPTED_UNSAFE = ("The proxy stopped while this job was running on a route that calls a paid upstream; it "
                      "was not run again, because the upstream may already have charged for it. Submit it again "
                      "if you still want the images.")


def _interrupted(message: str) -> dict:
    return {"message": message, "type": "server_error", "param": None, "code": "job_interrupted"}


class JobRunner:
    def __init__(self, store: JobStore, settings: JobsConfig, work: Work, *, slot: Slot, deliverer: Deliverer,
                 scrub: Callable[[str], str] = lambda s: s, metrics: Metrics | None = None,
                 tracing: Tracing | None = None, unused_hold: Callable[[dict], None] | None = None):
        self.store, self.settings, self.work, self.slot = store, settings, work, slot
        self.deliverer, self.scrub, self.metrics, self.tracing = deliverer, scrub, metrics, tracing
        # A job that ends without having run gives back the budget hold it took when submitted.
        self.unused_hold = unused_hold
        self.worker = secrets.token_hex(8)  # this process, as leases name it
        self.running: dict[str, asyncio.Task] = {}
        self._why_stopped: dict[str, str] = {}  # job id -> cancel | lost | shutdown
        self._progress_writers: dict[str, asyncio.Task] = {}
        self._wake = asyncio.Event()
        self.webhooks = WebhookSender(store, settings, deliverer, self.worker, metrics=metrics, tracing=tracing)
        self._loops: list[asyncio.Task] = []
        self._claim_failing = False
        self.stopping = False

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.store.start()
        # A context of their own: started from a request, they (and every job they run) would otherwise
        # carry its context variables: its usage meter, its trace.
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(f(), context=contextvars.Context())
                       for f in (self._claim_loop, self.webhooks.run, self._keep_loop)]

    async def drain(self, grace: float) -> None:
        """SIGTERM: take no more jobs; running ones get `grace` s to finish, then go back to the queue
        (or fail, where a rerun may be charged). Pending webhook deliveries stay stored for the next start."""
        self.stopping = True
        self._wake.set()
        self.webhooks.stop()
        pending = set(self.running.values())
        if pending:
            log.info("jobs: %d running, up to %.0f s to finish", len(pending), grace)
            await asyncio.wait(pending, timeout=grace)
        left = set(self.running.items())
        for job_id, task in left:
            self._why_stopped[job_id] = "shutdown"
            task.cancel(SHUTTING_DOWN)
        if left:
            await asyncio.wait({t for _, t in left}, timeout=5)

    async def close(self) -> None:
        self.stopping = True
        self.webhooks.stop()
        for task in [*self._loops, *self.running.values()]:
            task.cancel()
        for task in [*self._loops, *self.running.values()]:
            with contextlib.suppress(BaseException):
                await task
        self._loops = []
        await self.store.close()

    # ---- what the API asks -----------------------------------------------------------------------

    async def submit(self, job: Job, request: bytes) -> bool:
        added = await self.store.create(job, request, self.settings.max_queued_per_key)
        if added:
            self._wake.set()
        return added

    async def cancel(self, job_id: str) -> Job | None:
        job, taken = await self.store.cancel(job_id, self.worker, self.settings.lease_seconds)
        if job is None:
            return None
        if taken:  # it was queued: it ends here, never having run (a client hanging up does not stop that)
            job.status = CANCELLED
            await asyncio.shield(self._finish(job, None))
            return job
        task = self.running.get(job_id)
        if task is not None and job.status == IN_PROGRESS:  # ours: stop it now, as a hang-up would
            self._why_stopped[job_id] = "cancel"
            task.cancel("cancelled by the client")
            await asyncio.wait({task}, timeout=30)
        # Running on another proxy: its holder sees the request at its next lease renewal.
        return await self.store.get(job_id)

    # ---- running jobs ---------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self.stopping:
            # Owners whose key has no free concurrency slot now: their jobs stay queued, in their place, and
            # the workers take other keys' jobs (a worker waiting for one key's slot held up everyone's).
            full: set[str] = set()
            while len(self.running) < self.settings.workers and not self.stopping:
                try:
                    job = await self.store.claim(self.worker, self.settings.lease_seconds, frozenset(full))
                except ProxyError as e:
                    if not self._claim_failing:  # once per outage (the store logs its own failures)
                        log.warning("jobs: cannot claim: %s", e.message)
                    self._claim_failing = True
                    job = None
                else:
                    self._claim_failing = False
                if job is None:
                    break
                slot = await self._slot(job)
                if slot is None:
                    full.add(job.owner)
                    continue
                task = asyncio.ensure_future(self._run(job, slot))
                self.running[job.id] = task

                def done(_t: asyncio.Future[Any], job_id: str = job.id) -> None:
                    self._done(job_id)

                task.add_done_callback(done)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def _done(self, job_id: str) -> None:
        self.running.pop(job_id, None)
        self._why_stopped.pop(job_id, None)
        self._wake.set()

    async def _slot(self, job: Job) -> Any:
        """The key's concurrency slot for a claimed job (jobs count against the same limit as synchronous
        calls); None when every slot is held: the job goes back to the queue, in its place."""
        try:
            return await self.slot(job.key_name)
        except ConcurrencyLimited:
            pass
        except ProxyError as e:  # the limits' store (Redis) away: the job waits in the queue
            log.warning("jobs: cannot take a slot for %s: %s", job.id, e.message)
        job.status = QUEUED
        with contextlib.suppress(ProxyError):  # else its lease runs out and the lease keeper queues it again
            await self.store.save(job, self.worker, release=True)
        return None

    async def _run(self, job: Job, slot: Any) -> None:
        """Run a claimed job to its end, holding its key's slot; traced, its span is the root of a trace of
        its own, linked to the request that submitted it (it may run long after that request, or after a
        restart)."""
        try:
            await self._run_traced(job)
        finally:
            await slot.release()

    async def _run_traced(self, job: Job) -> None:
        if self.tracing is None:
            await self._run_job(job)
            return
        with self.tracing.background("image_job", {"qip.job_id": job.id, "qip.model": job.model,
                                                   "qip.key": job.key_name, "qip.job.kind": job.kind},
                                     link=job.traceparent, kind="consumer") as span:
            job.run_traceparent = self.tracing.traceparent()
            await self._run_job(job)
            span.set_attributes(clean({
                "qip.outcome": {QUEUED: "requeued", IN_PROGRESS: "lost"}.get(job.status, job.status),
                "qip.job.run": job.runs, "qip.job.recovered": job.runs > 1, "qip.route": job.route,
                "qip.error_code": (job.error or {}).get("code")}))
            if job.status == FAILED:
                self.tracing.failed(span)

    async def _run_job(self, job: Job) -> None:
        task = asyncio.current_task()
        assert task is not None  # a job always runs as a task of its own (see _claim_loop)
        keeper = asyncio.ensure_future(self._keep_lease(job.id, task))
        result: bytes | None = None
        try:
            try:
                if job.cancel_requested:
                    raise _Stop("cancel")
                req = request_from_bytes(await self.store.request(job.id) or b"")
                job.runs += 1
                job.started_at = time.time()
                if not await self.store.save(job, self.worker):
                    return
                job.progress = None
                progress.watch(lambda step, total: self._progress(job, step, total))
                result, job.route = await self.work(req, job)
                job.status, job.has_result = COMPLETED, True
            except asyncio.CancelledError:
                why = self._why_stopped.get(job.id, "shutdown")
                task.uncancel()
                raise _Stop(why) from None
        except _Stop as stop:
            if stop.why == "lost":
                return  # another process holds it now: write nothing
            if stop.why == "cancel":
                job.status = CANCELLED
            elif job.runs == 0 or job.rerun_safe:  # shutdown: back to the queue for the next start
                job.status = QUEUED
                await _quietly(self.store.save(job, self.worker, release=True))
                return
            else:
                job.status, job.error = FAILED, _interrupted(INTERRUPTED_UNSAFE)
        except ProxyError as e:
            job.status, job.error = FAILED, self._error(e)
        except Exception:
            log.exception("jobs: %s failed", job.id)
            job.status = FAILED
            job.error = {"message": f"The proxy failed to run the job {job.id}.", "type": "server_error",
                         "param": None, "code": "internal_error"}
        finally:
            keeper.cancel()
            writer = self._progress_writers.pop(job.id, None)
            if writer is not None:
                writer.cancel()
        await _quietly(self._finish(job, result))

    def _progress(self, job: Job, step: int, total: int) -> None:
        """A step done: shown on the job, written at most once a second."""
        if job.status != IN_PROGRESS:
            return
        job.progress = {"steps_done": step, "steps_total": total}
        if job.id not in self._progress_writers:
            self._progress_writers[job.id] = asyncio.ensure_future(self._write_progress(job))

    async def _write_progress(self, job: Job) -> None:
        await asyncio.sleep(PROGRESS_WRITE_SECONDS)
        self._progress_writers.pop(job.id, None)
        with contextlib.suppress(ProxyError):  # the lease keeper notices a store that is away
            await self.store.save(job, self.worker)

    def _error(self, e: ProxyError) -> dict:
        error = e.to_dict()["error"]
        error["message"] = self.scrub(error["message"])
        return error

    async def _keep_lease(self, job_id: str, task: asyncio.Task) -> None:
        lease = self.settings.lease_seconds
        while True:
            await asyncio.sleep(lease / 3)
            try:
                held = await self.store.renew(job_id, self.worker, lease)
            except ProxyError:
                continue  # the store is away: try again; the lease runs out only if it stays away
            if held is None or held.cancel_requested:
                self._why_stopped[job_id] = "lost" if held is None else "cancel"
                task.cancel()
                return

    async def _finish(self, job: Job, result: bytes | None) -> None:
        """End a job this process holds: its webhook message, the record, the lease given back."""
        job.finished_at = time.time()
        if job.budget_hold is not None and self.unused_hold is not None:  # no run took it over
            self.unused_hold(job.budget_hold)
            job.budget_hold = None
        url = job.webhook_url
        if url and job.status in TERMINAL:
            parsed = None
            if result is not None:
                parsed = await asyncio.to_thread(json.loads, result) if len(result) > 65536 else json.loads(result)
            body = webhook_body(job, EVENTS[job.status], parsed, job.finished_at)
            job.deliveries.append(Delivery(new_message_id(), EVENTS[job.status], url, body, job.finished_at,
                                           next_attempt_at=job.finished_at))
        saved = await self.store.save(job, self.worker, result=result, release=True)
        if saved and self.metrics is not None and job.status in TERMINAL:
            self.metrics.child(self.metrics.jobs, job.model, job.status).inc()
        if saved and job.deliveries:
            self.webhooks.wake()

    # ---- interrupted jobs, old jobs ---------------------------------------------------------------

    async def recover(self) -> int:
        """Jobs whose holder's lease ran out: queued again (same seed) or failed; how many."""
        count = 0
        while not self.stopping:
            job = await self.store.claim_expired(self.worker, self.settings.lease_seconds)
            if job is None:
                return count
            count += 1
            if job.runs == 0 or (job.rerun_safe and job.runs < self.settings.max_runs):
                log.warning("jobs: %s was interrupted (its proxy stopped); it runs again", job.id)
                job.status = QUEUED
                await self.store.save(job, self.worker, release=True)
                self._wake.set()
                continue
            log.warning("jobs: %s was interrupted (its proxy stopped); it fails", job.id)
            message = INTERRUPTED_UNSAFE if not job.rerun_safe else (
                f"The job was interrupted {job.runs} times (the proxy running it stopped); it is not run again.")
            job.status, job.error = FAILED, _interrupted(message)
            await self._finish(job, None)
        return count

    async def _keep_loop(self) -> None:
        purged_at = 0.0
        while not self.stopping:
            with contextlib.suppress(ProxyError):
                await self.recover()
                if time.time() - purged_at > 600:
                    purged_at = time.time()
                    await self.store.purge(time.time() - self.settings.ttl_seconds)
            await asyncio.sleep(max(0.2, self.settings.lease_seconds / 3))


class _Stop(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


async def _quietly(awaitable: Awaitable) -> None:
    """A write that must not be cut short, nor raise past the job (the lease expiring recovers it)."""
    task = asyncio.ensure_future(awaitable)
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("jobs: could not write a job: %s", type(task.exception()).__name__)
