"""Background image jobs over HTTP: submitting one (202 + Location), GET one or a list, cancel, DELETE."""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from ..errors import InvalidRequest, NotFound, ProxyError, RateLimited
from ..jobs.ask import BACKGROUND
from ..jobs.factory import make_job_store
from ..jobs.model import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    RERUN_SAFE_KINDS,
    STATUSES,
    Job,
    new_job_id,
    public_request,
    request_to_bytes,
)
from ..jobs.runner import JobRunner, Work
from ..jobs.webhooks import Deliverer
from ..media.fetch import FetchError, FetchPolicy
from ..request import SEED_MAX, ImageRequest
from ..routing.policy import API_KEY
from ..state.idempotency import REPLAYED, client_scope
from ..state.shared import Answer
from ..state.store import valid_name
from ..telemetry import tracing
from .context import METER
from .serving import public_base_url

if TYPE_CHECKING:
    from ..config.jobs import KeyWebhook
    from ..routing.policy import Lease
    from .context import Handler
    from .gateway import Gateway

PREFIX = "/v1/images/jobs"
_ID = re.compile(r"imgjob_[0-9a-f]{24}")
MAX_WEBHOOK_URL = 2048


class JobConflict(ProxyError):
    status = 409
    type = "invalid_request_error"
    code = "job_conflict"


class JobsDisabled(InvalidRequest):
    code = "background_disabled"


# ---- wiring -------------------------------------------------------------------------------------------


def webhook_policy(gw: Gateway) -> FetchPolicy:
    """Webhook URLs are URLs we did not choose: the guarded fetcher's rules, the fetch section's exceptions."""
    jobs, fetch = gw.config.jobs, gw.config.fetch
    return FetchPolicy(allow_http=fetch.allow_http, allowed_networks=tuple(fetch.allowed_networks),
                       max_bytes=int(jobs.webhook_max_response_kb * 1024), timeout=jobs.webhook_timeout,
                       max_redirects=0)


def attach(gw: Gateway, work: Work) -> None:
    """Give the gateway its job runner (None with jobs.enabled: false); `work` runs one job's request."""
    gw.jobs = build_runner(gw, work)


def build_runner(gw: Gateway, work: Work) -> JobRunner | None:
    settings = gw.config.jobs
    if not settings.enabled:
        return None

    async def slot(key_name: str | None) -> Lease:
        key = gw.policy.named(key_name)
        return await gw.policy.limits.acquire(key_name or "-", rpm=None,
                                              concurrency=key.concurrency if key else None)

    deliverer = Deliverer(gw.fetcher, webhook_policy(gw), backoff_base=settings.webhook_backoff_base,
                          backoff_max=settings.webhook_backoff_max, window=settings.webhook_retry_window)

    def unused_hold(doc: dict) -> None:
        gw.usage.release(gw.usage.held(doc))

    return JobRunner(make_job_store(gw.config), settings, work, slot=slot, deliverer=deliverer,
                     scrub=gw.scrubber.text, metrics=gw.metrics, tracing=gw.tracing, unused_hold=unused_hold)


def serves(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def methods(gw: Gateway, path: str) -> dict[str, Handler] | None:
    """The handlers of a jobs path (None: not one)."""
    if path == PREFIX:
        return {"GET": partial(list_jobs, gw)}
    rest = path[len(PREFIX) + 1:]
    if rest.endswith("/cancel") and rest.count("/") == 1:
        return {"POST": partial(cancel_job, gw)}
    if rest and "/" not in rest:
        return {"GET": partial(get_job, gw), "DELETE": partial(delete_job, gw)}
    return None


async def runner(gw: Gateway) -> JobRunner:
    if gw.jobs is None:
        raise JobsDisabled("Background requests are turned off on this server (jobs.enabled: false).",
                           param="background")
    await gw.start_jobs()
    return gw.jobs


# ---- submitting ---------------------------------------------------------------------------------------


async def submit(gw: Gateway, request: web.Request, req: ImageRequest) -> web.Response:
    """202 with the new job (or, with an Idempotency-Key seen before, the same job again)."""
    jobs = await runner(gw)
    ask = request[BACKGROUND]
    if req.stream:
        raise InvalidRequest("A background request cannot stream: drop 'stream' or 'background'.", param="stream")
    key = request.get(API_KEY)
    key_hook = gw.config.jobs.key_webhooks.get(key.name) if key is not None else None
    url = ask.webhook_url or (key_hook.url if key_hook else None)
    if ask.webhook_url:
        await check_webhook_url(gw, ask.webhook_url, key_hook)
    base_url = public_base_url(gw, request)

    async def work() -> Answer:
        # A seed now, so that a job run again after a restart makes the same images.
        run_req = req if req.seed is not None else replace(req, seed=random.randint(0, SEED_MAX))
        routes = gw.config.models[req.model].routes
        job = Job(id=new_job_id(), owner=client_scope(request), key_name=key.name if key else None,
                  model=req.model, kind="edit" if req.is_edit else "generation",
                  request=public_request(run_req), base_url=base_url, webhook_url=url,
                  rerun_safe=all(gw.providers[r.provider].kind in RERUN_SAFE_KINDS for r in routes),
                  no_cache="no-cache" in request.headers.get("Cache-Control", "").lower(),
                  traceparent=tracing.traceparent())
        # The key's budget, as for a synchronous call: a key that is spent is told now (429
        # insufficient_quota), not when the job runs; the hold goes with the job and is settled at its end.
        # A seeded repeat the cache holds needs none (should it expire before the job runs, the run
        # reserves then, and a spent key's job fails with insufficient_quota).
        cached = await gw.usage.cached(req, key, request.headers.get("Cache-Control"))
        hold = None if cached else await gw.usage.reserve(req, key)
        job.budget_hold = gw.usage.hold_doc(hold)
        try:
            added = await jobs.submit(job, request_to_bytes(run_req))
        except BaseException:
            gw.usage.release(hold)
            raise
        if not added:
            gw.usage.release(hold)
            limit = gw.config.jobs.max_queued_per_key
            raise RateLimited(f"Too many background jobs: this API key may have {limit} queued or running at "
                              "once; retry when one finishes.", code="too_many_jobs", retry_after=5)
        headers = {"Location": f"{base_url}{PREFIX}/{job.id}"}
        if ask.prefer_header:
            headers["Preference-Applied"] = "respond-async"
        return Answer(202, json.dumps(job.public()).encode(), headers)

    # A repeat with the same Idempotency-Key is the same job only if it asked for the same job: a
    # synchronous call, or another webhook, is another request (422 idempotency_key_mismatch).
    marked = replace(req, extra={**req.extra, "background": {"webhook_url": url}})
    answer, replayed = await gw.idempotency.run(request, marked, work)
    if answer.status == 202:  # the job is the image request the ledger records, at its end; not this 202
        request.pop(METER, None)
        tracing.annotate_request({"qip.job_id": answer.headers["Location"].rsplit("/", 1)[-1]})
    response = web.Response(body=answer.whole().body, status=answer.status, content_type="application/json",
                            headers=answer.headers)
    if replayed:
        response.headers[REPLAYED] = "true"
    return response


async def check_webhook_url(gw: Gateway, url: str, key_hook: KeyWebhook | None) -> None:
    """400 for a webhook URL the guarded fetcher would refuse (private addresses, no https, ...)."""
    # What the sender signs with (WebhookSender.secret_for): a key's own secret only for the key's own URL;
    # any other URL needs jobs.webhook_secret (a job accepted without one would fail its every delivery).
    own_secret = key_hook is not None and key_hook.secret and key_hook.url == url
    if not (gw.config.jobs.webhook_secret or own_secret):
        why = (" (this key's own webhook secret signs only its configured webhook URL)"
               if key_hook is not None and key_hook.secret else "")
        raise InvalidRequest("Webhooks to a URL of the request's choosing are not set up on this server: it needs "
                             f"jobs.webhook_secret (a whsec_ secret to sign them with){why}.", param="webhook_url",
                             code="webhooks_not_configured")
    if len(url) > MAX_WEBHOOK_URL:
        raise InvalidRequest(f"Invalid 'webhook_url': longer than {MAX_WEBHOOK_URL} characters.",
                             param="webhook_url", code="invalid_webhook_url")
    policy = webhook_policy(gw)
    try:
        async with asyncio.timeout(policy.timeout):  # the host name is resolved: a slow DNS is bounded
            parsed = gw.fetcher.parse(url)
            host = gw.fetcher.check(parsed, policy)
            await gw.fetcher.vet_addresses(host, parsed, policy)
    except FetchError as e:
        raise InvalidRequest(f"Invalid 'webhook_url': {e}.", param="webhook_url",
                             code="invalid_webhook_url") from None
    except TimeoutError:
        raise InvalidRequest("Invalid 'webhook_url': its host name could not be resolved in time.",
                             param="webhook_url", code="invalid_webhook_url") from None


# ---- reading, cancelling, deleting --------------------------------------------------------------------


async def _own_job(gw: Gateway, request: web.Request) -> tuple[JobRunner, Job]:
    """The caller's job named in the path; 404 for an unknown id and for another key's job alike."""
    jobs = await runner(gw)
    job_id = request.path[len(PREFIX) + 1:].split("/", 1)[0]
    job = await jobs.store.get(job_id) if _ID.fullmatch(job_id) else None
    if job is None or job.owner != client_scope(request):
        raise NotFound(f"No job found with id '{job_id[:64]}'.", param="id", code="job_not_found")
    return jobs, job


async def _result(jobs: JobRunner, job: Job) -> dict | None:
    if not job.has_result:
        return None
    raw = await jobs.store.result(job.id)
    if raw is None:
        return None
    return await asyncio.to_thread(json.loads, raw) if len(raw) > 65536 else json.loads(raw)


def _json(data: dict, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


async def get_job(gw: Gateway, request: web.Request) -> web.Response:
    jobs, job = await _own_job(gw, request)
    raw = await jobs.store.result(job.id) if job.has_result else None
    if raw is None:
        return _json(job.public(None))
    # The stored answer (megabytes of base64 with b64_json) goes in as it is: not parsed, not re-encoded.
    marker = secrets.token_hex(16)
    head, _, tail = json.dumps(job.public(marker)).encode().partition(f'"{marker}"'.encode())
    return web.Response(body=b"".join((head, raw, tail)), content_type="application/json")


async def list_jobs(gw: Gateway, request: web.Request) -> web.Response:
    """The caller's jobs, newest first: ?limit= (1-100, default 20), ?after=<id>, ?status=."""
    jobs = await runner(gw)
    query = request.query
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequest("Invalid 'limit': an integer from 1 to 100.", param="limit")
    status = query.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"Invalid 'status': one of {', '.join(STATUSES)}.", param="status")
    after = query.get("after")
    found = await jobs.store.list(client_scope(request), limit=limit + 1, after=after, status=status)
    page = found[:limit]
    data = []
    for job in page:  # url results inline; b64_json ones are GET /v1/images/jobs/{id} away
        small = job.request.get("response_format") == "url"
        data.append(job.public(await _result(jobs, job) if small else None))
    return _json({"object": "list", "data": data, "first_id": page[0].id if page else None,
                  "last_id": page[-1].id if page else None, "has_more": len(found) > limit})


async def cancel_job(gw: Gateway, request: web.Request) -> web.Response:
    jobs, job = await _own_job(gw, request)
    if job.status in (COMPLETED, "failed"):
        raise JobConflict(f"The job {job.id} has already ended ({job.status}); nothing to cancel.",
                          code="job_not_cancellable")
    if job.status != CANCELLED:
        job = await jobs.cancel(job.id) or job
    return _json(job.public(None))


async def delete_job(gw: Gateway, request: web.Request) -> web.Response:
    jobs, job = await _own_job(gw, request)
    if job.status in ACTIVE:
        raise JobConflict(f"The job {job.id} is {job.status}: cancel it first, or wait until it ends.",
                          code="job_not_finished")
    result = await _result(jobs, job)
    for item in (result or {}).get("data") or ():
        name = urlsplit(item.get("url") or "").path.rsplit("/", 1)[-1]
        if valid_name(name):  # the image goes now, not at the end of its TTL
            await gw.store.delete(name)
    await jobs.store.delete(job.id)
    return _json({"id": job.id, "object": "image.job.deleted", "deleted": True})
