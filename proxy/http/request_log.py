"""Request ids, one log line per image request, and the request counters behind /metrics."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ..errors import ProxyError, ShuttingDown
from ..telemetry.metrics import Metrics

access_log = logging.getLogger("proxy.requests")
# The client's X-Request-Id, or one made up for it: in the log line and the answer's headers.
REQUEST_ID = web.RequestKey("qip_request_id", str)


def with_id(response: web.StreamResponse, request_id: str) -> web.StreamResponse:
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def log_request(metrics: Metrics, *, path: str, request_id: str, model: str, key: Any, status: int,
                seconds: float, outcome: str, result: Any = None) -> None:
    """Count every request the gateway answers; log a line for image requests (never for probes).
    `key` is the caller's key (its name is logged, never its value); `result` the RouteResult, if any."""
    # Templates, not raw paths: every image URL as its own label value would grow without bound.
    endpoint = ("/images/{name}" if path.startswith("/images/")
                else "/v1/models/{model}" if "/v1/models/" in path else path)
    metrics.child(metrics.requests, endpoint, model, str(status)).inc()
    if key is not None:
        metrics.child(metrics.requests_by_key, key.name, endpoint, model, str(status)).inc()
    if not path.startswith("/v1/images/"):
        return
    metrics.child(metrics.outcomes, model, outcome).inc()
    if model:
        metrics.child(metrics.latency, endpoint, model).observe(seconds)
    route = result.route.name if result else "-"
    attempts = result.calls if result else 0
    access_log.info("request_id=%s key=%s endpoint=%s model=%s route=%s attempts=%d status=%d "
                    "duration_ms=%.0f outcome=%s", request_id, key.name if key else "-", endpoint,
                    model or "-", route, attempts, status, seconds * 1000, outcome)


def outcome_of(error: ProxyError) -> str:
    """The `outcome` label of a request that ended in this error."""
    if isinstance(error, ShuttingDown):
        return "shutdown"
    if error.status == 429:
        return "rate_limited"
    if error.status < 500:
        return "client_error"
    return "timeout" if error.status == 504 else "failed"
