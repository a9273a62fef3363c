"""Sends background jobs' webhooks: finds the deliveries that are due in the job store, makes each
attempt (a span of its own, linked to the job's run), and stores the outcome. One per JobRunner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from ..errors import ProxyError
from ..telemetry.tracing import clean
from .model import Delivery, Job
from .store import JobStore

if TYPE_CHECKING:
    from ..config.jobs import JobsConfig
    from ..telemetry.metrics import Metrics
    from ..telemetry.tracing import Tracing
    from .webhooks import Deliverer

log = logging.getLogger("proxy.jobs")

# Deliveries attempted at once (each waits up to webhook_timeout on a receiver).
PARALLEL = 16


class WebhookSender:
    def __init__(self, store: JobStore, settings: JobsConfig, deliverer: Deliverer, worker: str, *,
                 metrics: Metrics | None = None, tracing: Tracing | None = None):
        self.store, self.settings, self.deliverer, self.worker = store, settings, deliverer, worker
        self.metrics, self.tracing = metrics, tracing
        self._wake = asyncio.Event()
        self.stopping = False

    def wake(self) -> None:
        """A delivery was added: look now, not at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        """Take no more deliveries (what is pending stays stored for the next start)."""
        self.stopping = True
        self._wake.set()

    def secret_for(self, job: Job) -> str | None:
        hook = self.settings.key_webhooks.get(job.key_name or "")
        if hook is not None and hook.url == job.webhook_url and hook.secret:
            return hook.secret
        return self.settings.webhook_secret

    async def run(self) -> None:
        s = self.settings
        hold = s.webhook_timeout * 2 + 5
        poll = min(1.0, max(0.05, s.webhook_backoff_base / 4))
        # Each job's deliveries go in a task of their own, at most PARALLEL at once, and a freed slot takes
        # the next due one at once: a receiver that hangs for webhook_timeout holds up its own messages, not
        # every other job's that was fetched with it (they waited for the slowest of the batch). Only as
        # many jobs are fetched as there are free slots, so none waits here while its hold runs out.
        sending: set[asyncio.Task] = set()
        try:
            while not self.stopping:
                self._wake.clear()  # before the look: a delivery added during it wakes the wait below
                free = PARALLEL - len(sending)
                due: list[Job] = []
                if free > 0:
                    try:
                        due = await self.store.due_deliveries(self.worker, time.time(), hold, limit=free)
                    except ProxyError:
                        due = []
                for job in due:
                    task = asyncio.ensure_future(self._deliver(job))
                    sending.add(task)
                    task.add_done_callback(partial(_sent, sending))
                if due and len(sending) < PARALLEL:
                    continue
                # Until a delivery is added, a slot frees, or the next poll.
                waker = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait({waker, *sending}, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
            if sending:  # stopped: attempts under way may end (close() cancels them)
                await asyncio.wait(set(sending))
        finally:
            for task in list(sending):
                task.cancel()

    async def _deliver(self, job: Job) -> None:
        """The job's due deliveries, one attempt each, then written back (and the hold let go)."""
        secret = self.secret_for(job)
        for d in job.deliveries:
            if d.state == "pending" and (d.next_attempt_at or 0) <= time.time():
                if secret is None:
                    d.state, d.next_attempt_at = "failed", None
                    d.attempts.append({"at": int(time.time()), "status": None,
                                       "error": "no webhook secret is configured"})
                else:
                    await self._attempt(job, d, secret)
        with contextlib.suppress(ProxyError):  # the hold runs out and the next look tries again
            await self.store.save_deliveries(job, self.worker)

    async def _attempt(self, job: Job, delivery: Delivery, secret: str) -> None:
        """One delivery attempt; traced, a span of its own linked to the job's run (or its submit)."""
        if self.tracing is None:
            await self.deliverer.attempt(delivery, secret)
        else:
            host = urlsplit(delivery.url).hostname  # the host alone: a URL's query or user info may be secret
            with self.tracing.background("webhook.deliver", {
                    "qip.job_id": job.id, "qip.webhook.event": delivery.event, "qip.webhook.id": delivery.id,
                    "qip.webhook.attempt": len(delivery.attempts) + 1, "server.address": host},
                    link=job.run_traceparent or job.traceparent, kind="internal") as span:
                await self.deliverer.attempt(delivery, secret)
                last = delivery.attempts[-1]
                span.set_attributes(clean({"http.response.status_code": last["status"], "qip.error": last["error"],
                                           "qip.outcome": _attempt_outcome(delivery)}))
                if _attempt_outcome(delivery) != "delivered":
                    self.tracing.failed(span)
        if self.metrics is not None:
            self.metrics.child(self.metrics.webhook_attempts, _attempt_outcome(delivery)).inc()


def _sent(sending: set[asyncio.Task], task: asyncio.Task) -> None:
    sending.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("jobs: a webhook delivery failed", exc_info=task.exception())


def _attempt_outcome(delivery: Delivery) -> str:
    """An attempt's result: delivered | retry (another attempt is due) | failed | gone."""
    return "retry" if delivery.state == "pending" else delivery.state
