"""Request ids, one log line per image request and per passthrough call, and the request counters behind
/metrics."""

from __future__ import annotations

import functools
import logging
import re
import secrets
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ..errors import ProxyError, ShuttingDown
from ..telemetry.metrics import Metrics

access_log = logging.getLogger("proxy.requests")
# The client's X-Request-Id, or one made up for it: in the log line and the answer's headers.
REQUEST_ID = web.RequestKey("qip_request_id", str)


# A client's X-Request-Id is kept only if it looks like an id: one with spaces wrote fields of its own into
# the text log line ("abc key=admin status=200"), and one of kilobytes went into every log line, the ledger
# and the spans. Anything else gets an id made up here (the answer's X-Request-Id says which).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}").fullmatch


def request_id_of(given: str | None) -> str:
    return given if given is not None and _CLIENT_ID(given) else secrets.token_hex(16)


def with_id(response: web.StreamResponse, request_id: str) -> web.StreamResponse:
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def log_request(metrics: Metrics, *, path: str, request_id: str, model: str, key: Any, status: int,
                seconds: float, outcome: str, result: Any = None, trace_id: str = "",
                error_code: str | None = None) -> None:
    """Count every request the gateway answers; log a line for image requests (never for probes, nor for the
    jobs API's polls, lists and cancels: the submit is the image request).
    `key` is the caller's key (its name is logged, never its value); `result` the RouteResult, if any;
    `trace_id` the request's trace ("" when it is not traced); `error_code` the OpenAI error code of an
    error answer, or of the error event a stream ended with after its 200 (counted under the proxy's own
    codes; anything an upstream made up counts as `other`)."""
    # Templates, not raw paths: every image URL or job id as its own label value would grow without bound
    # (a job id is whatever the client put in the path, answered 401 or 404 too).
    endpoint = ("/images/{name}" if path.startswith("/images/")
                else "/v1/models/{model}" if "/v1/models/" in path
                else job_endpoint(path) if path.startswith(JOBS_PREFIX) else path)
    status_text = str(status)
    metrics.child(metrics.requests, endpoint, model, status_text).inc()
    if key is not None:
        metrics.child(metrics.requests_by_key, key.name, endpoint, model, status_text).inc()
    if status >= 400 or error_code is not None:  # (a stream that ended in an error event went out as a 200)
        code = error_code if error_code in own_codes() else "other"
        metrics.child(metrics.errors, model, code).inc()
    if not path.startswith("/v1/images/") or path.startswith(JOBS_PATH):  # (a job's poll is no image request)
        return
    metrics.child(metrics.outcomes, model, outcome).inc()
    if model:
        metrics.child(metrics.latency, endpoint, model).observe(seconds)
    fields = {"request_id": request_id, "trace_id": trace_id or "-", "key": key.name if key else "-",
              "endpoint": endpoint, "model": model or "-", "route": result.route.name if result else "-",
              "attempts": result.calls if result else 0, "status": status,
              "duration_ms": round(seconds * 1000), "outcome": outcome}
    if access_log.isEnabledFor(logging.INFO):
        # What access_log.info(...) makes, without its walk up the stack for the caller (a fifth of the
        # line's cost): the caller is this line. The fields again as `qip_fields`: the JSON log format
        # (log_format: json) writes them as keys.
        here = sys._getframe()
        access_log.handle(access_log.makeRecord(
            access_log.name, logging.INFO, here.f_code.co_filename, here.f_lineno, _LINE, tuple(fields.values()),
            None, here.f_code.co_name, {"qip_fields": fields}))


JOBS_PATH = "/v1/images/jobs"
JOBS_PREFIX = JOBS_PATH + "/"


def job_endpoint(path: str) -> str:
    """The template of a path under /v1/images/jobs/: the job's id (and anything after it) replaced."""
    return JOBS_PREFIX + ("{id}/cancel" if path.endswith("/cancel") else "{id}")


_LINE = ("request_id=%s trace_id=%s key=%s endpoint=%s model=%s route=%s attempts=%d status=%d duration_ms=%d "
         "outcome=%s")
# A passthrough call's line: the image line's fields, then its method.
_PASSTHROUGH_LINE = _LINE + " method=%s"
# The client's path is logged percent-encoded (no space, quote or control character: no field of its own in
# the line) and cut to this many characters; its query never (a vendor's key may ride there).
_PATH_CHARS = 200
_PATH_SAFE = "/[]!$&'()*+,;:@-._~"


def log_passthrough(*, request_id: str, trace_id: str, key: Any, method: str, path: str, status: int,
                    seconds: float, outcome: str, called: bool, scrub: Callable[[str], str]) -> None:
    """The log line of a call forwarded to the passthrough upstream (written once its answer has ended,
    streams included): the image line's fields with model=- (the body goes on unread), route=passthrough and
    attempts=1 (route=- and attempts=0 when it was refused before the upstream was called; a chunked body cut
    at the size limit was called, and says so beside its 413), then method. Counted in /metrics elsewhere
    (qip_passthrough_requests_total). `path` is the client's, `scrub` what removes secrets from it; `key` as
    in log_request."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    endpoint = quote(scrub(path), safe=_PATH_SAFE)
    if len(endpoint) > _PATH_CHARS:
        endpoint = endpoint[:_PATH_CHARS] + "..."
    fields = {"request_id": request_id, "trace_id": trace_id or "-", "key": key.name if key else "-",
              "endpoint": endpoint, "model": "-", "route": "passthrough" if called else "-",
              "attempts": int(called), "status": status, "duration_ms": round(seconds * 1000), "outcome": outcome,
              "method": quote(method[:16], safe="")}  # (a method is any token the client likes)
    access_log.info(_PASSTHROUGH_LINE, *fields.values(), extra={"qip_fields": fields})


def outcome_of_status(status: int) -> str:
    """The `outcome` of an answer with this status (an upstream's, passed on): the words outcome_of uses."""
    if status < 400:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status < 500:
        return "client_error"
    return "timeout" if status == 504 else "failed"


# The codes the proxy gives an error where it raises one (InvalidRequest(..., code="invalid_json")) rather
# than by its class: its own words too, not an upstream's (tests/test_metrics_labels.py keeps this whole).
RAISED_CODES = frozenset({
    "client_closed_request", "content_policy_violation", "image_not_found", "internal_error", "invalid_body",
    "invalid_content_type", "invalid_form", "invalid_idempotency_key", "invalid_image", "invalid_image_format",
    "invalid_image_url", "invalid_json", "invalid_multipart", "invalid_webhook_url", "job_not_cancellable",
    "job_not_finished", "job_not_found", "malformed_request", "missing_required_parameter",
    "string_above_max_length", "timeout", "too_many_fields", "too_many_jobs", "unknown_url", "usage_disabled",
    "usage_unavailable", "webhooks_not_configured",
})


@functools.cache
def own_codes() -> frozenset[str]:
    """The error codes of the proxy's own errors (every ProxyError subclass's, and RAISED_CODES), read once all
    are imported."""
    found, todo = set(), [ProxyError]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if isinstance(cls.__dict__.get("code"), str):
            found.add(cls.__dict__["code"])
    return frozenset(found | RAISED_CODES)


def outcome_of(error: ProxyError) -> str:
    """The `outcome` label of a request that ended in this error."""
    if isinstance(error, ShuttingDown):
        return "shutdown"
    if error.status == 429:
        return "rate_limited"
    if error.status < 500:
        return "client_error"
    return "timeout" if error.status == 504 else "failed"
