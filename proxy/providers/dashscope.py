"""Alibaba Cloud Model Studio / DashScope: qwen-image, qwen-image-plus, qwen-image-max.

Two ways to call it, chosen by the `mode` option:

- async (POST {base_url}/services/aigc/text2image/image-synthesis with `X-DashScope-Async: enable`,
  then GET {base_url}/tasks/{task_id} until SUCCEEDED / FAILED / CANCELED / UNKNOWN). A task still
  waiting when the request is cancelled (client gone, route deadline) is cancelled with
  POST {base_url}/tasks/{task_id}/cancel, best effort (DashScope cancels PENDING tasks only).
- sync (POST {base_url}/services/aigc/multimodal-generation/generation): one HTTP call.
- auto (the default): async for the models DashScope documents it for (qwen-image, qwen-image-plus),
  sync for the others (qwen-image-max).

Edits (a request with input images) always use the sync endpoint. The request bodies, answers and errors
are converted by the pure functions of dashscope_convert.py (tested without a network; its docstring says
how edits and each field are sent); DashScopeProvider is the thin I/O around them.

Options (models.yaml):
  api_key            required (DASHSCOPE_API_KEY); a missing one makes the provider unavailable.
  base_url           default https://dashscope-intl.aliyuncs.com/api/v1 (Singapore, international keys);
                     mainland China keys: https://dashscope.aliyuncs.com/api/v1. Keys work in their own
                     region only.
  mode               auto | sync | async (default auto).
  sizes              the "W*H" sizes the model accepts (default: qwen-image's five, DEFAULT_SIZES); the
                     request's resolved size is sent as the nearest of them (aspect ratio on a log scale,
                     then pixel count), and the proxy crops the answer to the resolved size.
  max_images_per_call  images per call (default 1: qwen-image takes n=1 only); more are parallel calls.
  poll_interval      first wait between task polls, seconds (default 0.25); grows x1.5 per poll up to
  poll_max_interval  (default 2).
  timeout            seconds for the whole call, polling included (default 300).
  retries            extra attempts on this provider's routes after a retryable failure (default:
                     routing.retries; a route's own `retries` wins).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from ..config import RouteConfig
from ..errors import ProxyError, RateLimited, UpstreamError, UpstreamTimeout, clip, retry_after_from_headers
from ..http.cpu import run_cpu
from ..request import ImageRequest
from ..telemetry import tracing
from .base import SMALL_ANSWER, Capabilities, GeneratedImage, answer_limit, json_or_none, read_answer, started
from .dashscope_convert import (
    KIND,
    PENDING_STATES,
    TERMINAL_STATES,
    edit_json,
    error_from_payload,
    from_native,
    parse_sizes,
    resolve_mode,
    task_error,
    task_id_of,
    task_status_of,
    to_native,
)
from .vendor import VendorProvider, poll_wait, take_n

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://dashscope-intl.aliyuncs.com/api/v1"
MAINLAND_BASE_URL = "https://dashscope.aliyuncs.com/api/v1"
SYNC_PATH = "/services/aigc/multimodal-generation/generation"
ASYNC_PATH = "/services/aigc/text2image/image-synthesis"
# Transient errors in a row while polling a task before the attempt gives up.
MAX_POLL_FAILURES = 3
# Seconds allowed for the best-effort cancel of a task nobody waits for any more.
CANCEL_TIMEOUT = 5.0
# Seconds one task poll may take: a poll that hangs is given up and made again (the task runs on), rather
# than holding the request to the route's timeout.
POLL_TIMEOUT = 30.0


class DashScopeProvider(VendorProvider):
    cancel_timeout = CANCEL_TIMEOUT
    kind = KIND
    options_schema = {
        "api_key": str | None,
        "base_url": str | None,
        "mode": ("auto", "sync", "async"),
        "sizes": list[str],
        "max_images_per_call": (int, {"ge": 1}),
        "poll_interval": (float, {"gt": 0}),
        "poll_max_interval": (float, {"gt": 0}),
        "timeout": (float, {"gt": 0}),
        "retries": (int, {"ge": 0, "le": 10}),
    }

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)
        self.base_url = str(options.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        self.mode = options.get("mode") or "auto"
        self.sizes = parse_sizes(options.get("sizes"))
        self.poll_interval = float(options.get("poll_interval") or 0.25)
        self.poll_max_interval = max(self.poll_interval, float(options.get("poll_max_interval") or 2.0))
        # Edits go to the route's model (an edit model, on the sync endpoint); no masks.
        self.capabilities = Capabilities(max_images_per_call=int(options.get("max_images_per_call") or 1),
                                         output_formats=frozenset({"png"}), output_compression=False,
                                         edits=True, masks=False)

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        model = route.model or req.model
        deadline = time.monotonic() + (route.timeout or self.default_timeout)
        max_bytes = answer_limit(req)  # of each answer (DashScope answers with image URLs: far less)
        if req.is_edit:
            # Megabytes of base64 and JSON: built off the event loop. Edits have the sync endpoint only.
            encoded = await asyncio.to_thread(edit_json, req, model)
            status, payload, retry_after = await self._call("POST", SYNC_PATH, deadline, max_bytes, encoded)
            self._raise_for(status, payload, retry_after)
            return self._images(payload, req.n)
        mode = resolve_mode(self.mode, model)
        body = to_native(req, model, mode=mode, sizes=self.sizes)
        if mode == "sync":
            status, payload, retry_after = await self._call("POST", SYNC_PATH, deadline, max_bytes, body)
            self._raise_for(status, payload, retry_after)
            return self._images(payload, req.n)

        status, payload, retry_after = await self._call("POST", ASYNC_PATH, deadline, max_bytes, body,
                                                        asynchronous=True)
        self._raise_for(status, payload, retry_after)
        task_id = task_id_of(payload)
        try:
            with tracing.span("vendor.poll", {"qip.provider": self.name}):
                payload = await self._wait(task_id, deadline, max_bytes)
        except BaseException:
            # Cancelled (client gone, route deadline) or given up: nobody will collect this task.
            self._cancel_later(task_id)
            raise
        if task_status_of(payload) != "SUCCEEDED":
            raise self._redacted(task_error(payload["output"]))
        return self._images(payload, req.n)

    def _images(self, payload: Any, n: int) -> list[GeneratedImage]:
        try:
            return take_n(from_native(payload), n, "DashScope")
        except ProxyError as e:
            raise self._redacted(e) from None

    # ---- I/O ----------------------------------------------------------------------------------------

    def _headers(self, asynchronous: bool = False) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if asynchronous:
            headers["X-DashScope-Async"] = "enable"
        return headers

    async def _call(self, method: str, path: str, deadline: float, max_bytes: int,
                    body: dict | bytes | None = None, asynchronous: bool = False,
                    limit: float | None = None) -> tuple[int, Any, float | None]:
        """One HTTP call, of at most `limit` seconds (None: until the deadline); `body` is a JSON object, or
        JSON already encoded; an answer over max_bytes is an UpstreamError."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise UpstreamTimeout("DashScope did not finish in time")
        if limit is not None:
            remaining = min(remaining, limit)
        headers = self._headers(asynchronous)
        if isinstance(body, bytes):
            send: dict[str, Any] = {"data": body}
            headers["Content-Type"] = "application/json"
        else:
            send = {"json": body}
        try:
            async with started(self.http).request(method, f"{self.base_url}{path}", **send, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=remaining),
                                         allow_redirects=False) as resp:
                raw = await read_answer(resp, max_bytes, "DashScope")
                status, retry_after = resp.status, retry_after_from_headers(resp.headers)
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from DashScope within {remaining:.3g} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"cannot reach DashScope ({type(e).__name__})") from None
        payload = await run_cpu(len(raw), json_or_none, raw)
        if payload is None and status < 400:
            raise UpstreamError(f"DashScope answered HTTP {status} with a body that is not JSON")
        return status, payload, retry_after

    def _raise_for(self, status: int, payload: Any, retry_after: float | None) -> None:
        error = error_from_payload(status, payload, retry_after)
        if error is not None:
            raise self._redacted(error)

    async def _wait(self, task_id: str, deadline: float, max_bytes: int) -> dict:
        """Poll the task until it ends (its payload); backs off from poll_interval to poll_max_interval."""
        interval, failures = self.poll_interval, 0
        while True:
            wait = interval
            try:
                status, payload, retry_after = await self._call("GET", f"/tasks/{task_id}", deadline,
                                                                max_bytes, limit=POLL_TIMEOUT)
                self._raise_for(status, payload, retry_after)
                state = task_status_of(payload)
                if state not in PENDING_STATES and state not in TERMINAL_STATES:
                    # Polled on, it would hold the request to the route's timeout (5 min by default) with
                    # no fallback: a few in a row fail the attempt, as fal's unknown statuses do.
                    raise UpstreamError(f"DashScope answered an unknown task status {clip(state, 40)!r}")
            except ProxyError as e:
                if isinstance(e, UpstreamTimeout) and time.monotonic() >= deadline:
                    raise
                # A lost poll (no answer, 5xx) does not lose the task: a few transient failures in a row are
                # sat out. A 429 is none: DashScope said how long to wait, and the deadline bounds the waiting.
                if not isinstance(e, RateLimited):
                    failures += 1
                if not e.retryable or not e.retry_same_route or failures > MAX_POLL_FAILURES:
                    raise
                wait = poll_wait(wait, e.retry_after)
            else:
                failures = 0
                if state in TERMINAL_STATES:
                    return payload
            if time.monotonic() + wait >= deadline:
                raise UpstreamTimeout(f"the DashScope task {task_id} did not finish in time")
            await asyncio.sleep(wait)
            interval = min(interval * 1.5, self.poll_max_interval)

    def _cancel_later(self, task_id: str) -> None:
        self.in_background(self._cancel(task_id))

    async def _cancel(self, task_id: str) -> None:
        """POST /tasks/{id}/cancel, best effort: DashScope cancels only tasks still PENDING."""
        try:
            deadline = time.monotonic() + CANCEL_TIMEOUT
            status, payload, _ = await self._call("POST", f"/tasks/{task_id}/cancel", deadline, SMALL_ANSWER)
            if error_from_payload(status, payload) is None:
                log.info("%s: cancelled DashScope task %s", self.name, task_id)
            else:
                log.info("%s: DashScope did not cancel task %s (HTTP %s)", self.name, task_id, status)
        except Exception as e:  # best effort: the task ends on its own
            log.info("%s: cancelling DashScope task %s failed (%s)", self.name, task_id, type(e).__name__)
