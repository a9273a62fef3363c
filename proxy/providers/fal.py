"""fal.ai through its queue API (fal-ai/qwen-image, the fal-ai/qwen-image-edit family and the like).

    POST {base_url}/{model}                 -> {request_id, status_url, response_url, cancel_url}
    GET  .../requests/{id}/status           -> {"status": IN_QUEUE | IN_PROGRESS | COMPLETED, ...}
    GET  .../requests/{id}                  -> {"images": [{url, content_type, width, height}], seed, prompt, ...}
    PUT  .../requests/{id}/cancel           (when the client hangs up or the route's deadline passes)

Every call carries `Authorization: Key <key>`. A COMPLETED status with an `error` is a failed request;
its result URL then answers the error itself (a 422 for an input fal refused, a 5xx for a runner failure).

The pure converters (to_native, to_native_edit, from_native, error_from_status, poll_state,
queue_handle) live in fal_convert.py and are tested without a network; FalProvider is the thin I/O
around them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp

from ..config import RouteConfig
from ..errors import ProxyError, RateLimited, UpstreamError, UpstreamTimeout
from ..http.cpu import run_cpu
from ..request import ImageRequest
from ..telemetry import tracing
from .base import SMALL_ANSWER, Capabilities, GeneratedImage, answer_limit, json_or_none, read_answer, started
from .fal_convert import (
    EDIT_IMAGE_FIELDS,
    NATIVE_FORMATS,
    QueueHandle,
    app_id,
    edit_json,
    error_from_status,
    failed_request_error,
    from_native,
    poll_state,
    queue_handle,
    to_native,
)
from .vendor import VendorProvider, poll_wait, take_n

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://queue.fal.run"
# Status polls that may fail in a row (connection errors, 429, 5xx) before the request counts as failed.
MAX_POLL_FAILURES = 3
# Each HTTP call gets at most this long (and never longer than what is left of the route's time).
CALL_TIMEOUT = 60.0
CANCEL_TIMEOUT = 5.0


def _sit_out(error: ProxyError, failures: int) -> int:
    """The count of transient failures in a row after `error`, which is raised past MAX_POLL_FAILURES. A 429
    does not count: fal said how long to wait, and the deadline bounds the waiting."""
    if not isinstance(error, RateLimited):
        failures += 1
    if failures > MAX_POLL_FAILURES or not error.retry_same_route:
        raise error
    return failures


class FalProvider(VendorProvider):
    kind = "fal"
    # The options this kind reads in models.yaml; any other key is a config error.
    options_schema = {
        "base_url": str | None,
        "api_key": str | None,
        "timeout": (float, {"gt": 0}),
        "retries": (int, {"ge": 0, "le": 10}),
        "max_images_per_call": (int, {"ge": 1, "le": 10}),
        "poll_interval": (float, {"gt": 0, "le": 60}),
        "poll_max_interval": (float, {"gt": 0, "le": 60}),
        # Where an edit's images go: image_url (one) or image_urls (a list); default: by the route's model id.
        "edit_image_field": EDIT_IMAGE_FIELDS,
    }

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)
        self.base_url = str(options.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        self.poll_interval = float(options.get("poll_interval") or 0.25)
        self.poll_max_interval = max(self.poll_interval, float(options.get("poll_max_interval") or 2.0))
        self.edit_image_field = options.get("edit_image_field")
        self.capabilities = Capabilities(
            max_images_per_call=int(options.get("max_images_per_call") or 4),
            output_formats=NATIVE_FORMATS,
            output_compression=False,
            # Edits go to the route's model (an edit endpoint); fal's Qwen edit endpoints take no mask.
            edits=True,
            masks=False,
        )

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.api_key}", "Accept": "application/json"}

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        model = app_id(route.model or req.model)
        limit = route.timeout or self.default_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        if req.is_edit:
            # Megabytes of base64 and JSON: built off the event loop.
            body = await asyncio.to_thread(edit_json, req, model, self.edit_image_field)
        else:
            body = json.dumps(to_native(req)).encode()
        max_bytes = answer_limit(req)  # of each answer: the result may carry the images (sync_mode)
        status, payload, headers = await self._call("POST", f"{self.base_url}/{model}", deadline, max_bytes,
                                                    body)
        if status >= 400:
            raise self._redacted(error_from_status(status, payload, headers))
        if payload is None:
            raise UpstreamError(f"fal answered the submit with HTTP {status} and a body that is not JSON")
        handle = queue_handle(payload, self.base_url, model)
        try:
            with tracing.span("vendor.poll", {"qip.provider": self.name}):
                failed = await self._wait(handle, deadline, limit, max_bytes)
        except BaseException:
            # Cancelled (client gone, route deadline), timed out or failed while the job may still run:
            # tell fal to drop it, from a task of its own (this one is being cancelled), then go on.
            self._cancel_later(handle)
            raise
        result = await self._result(handle, deadline, max_bytes, failed)
        return take_n(from_native(result, req), req.n, "fal")

    async def _wait(self, handle: QueueHandle, deadline: float, limit: float, max_bytes: int) -> dict | None:
        """Poll the status with backoff until COMPLETED: None, or the status answer when the request failed.

        A throttled poll (429) waits as long as Retry-After asks and is not a failure; a few other transient
        failures in a row (no answer, 5xx, a body that is no status) are sat out: the request runs on at
        fal, and giving up here would submit it again (and pay for it twice)."""
        loop = asyncio.get_running_loop()
        interval, failures = self.poll_interval, 0
        while True:
            if loop.time() >= deadline:
                raise UpstreamTimeout(f"fal did not finish within {limit:.3g} s")
            error: ProxyError | None = None
            try:
                status, payload, headers = await self._call("GET", handle.status_url, deadline, max_bytes)
            except UpstreamError as e:  # cannot reach fal for now, or no answer within CALL_TIMEOUT
                if isinstance(e, UpstreamTimeout) and loop.time() >= deadline:
                    raise
                error = e
            else:
                if status >= 400:
                    error = self._redacted(error_from_status(status, payload, headers))
                    if not (status == 429 or status >= 500):
                        raise error
                else:
                    try:
                        state, failed = poll_state(payload)
                    except UpstreamError as e:  # not JSON, or no status we know
                        error = e
                    else:
                        if state == "COMPLETED":
                            return payload if failed else None
            failures = 0 if error is None else _sit_out(error, failures)
            wait = poll_wait(interval, error.retry_after if error else None)
            await asyncio.sleep(max(0.0, min(wait, deadline - loop.time())))
            interval = min(interval * 1.5, self.poll_max_interval)

    async def _result(self, handle: QueueHandle, deadline: float, max_bytes: int, failed: dict | None) -> Any:
        """GET the result of a COMPLETED request. Transient failures (no answer, 429, 5xx, a body that is not
        JSON) are tried again, a few times: the request already ran, and a new submit would pay twice."""
        loop = asyncio.get_running_loop()
        interval, failures = self.poll_interval, 0
        while True:
            try:
                status, result, headers = await self._call("GET", handle.response_url, deadline, max_bytes)
            except UpstreamError as e:  # a call that got no answer in time is a hiccup until the route's deadline
                if isinstance(e, UpstreamTimeout) and loop.time() >= deadline:
                    raise
                error: ProxyError = e
            else:
                if status >= 400:
                    error = self._redacted(error_from_status(status, result, headers))
                    # A failed request's result is its error (a 422, the runner's 5xx): final.
                    if failed or not (status == 429 or status >= 500):
                        raise error
                elif failed:
                    raise self._redacted(failed_request_error(failed))
                elif result is None:
                    error = UpstreamError(f"fal answered the result with HTTP {status} and a body that is not JSON")
                else:
                    return result
            failures = _sit_out(error, failures)
            await asyncio.sleep(max(0.0, min(poll_wait(interval, error.retry_after), deadline - loop.time())))
            interval = min(interval * 1.5, self.poll_max_interval)

    async def _call(self, method: str, url: str, deadline: float, max_bytes: int,
                    body: bytes | None = None) -> tuple[int, Any, Any]:
        """One HTTP call; `body` is JSON already encoded; an answer over max_bytes is an UpstreamError."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise UpstreamTimeout("the route's time ran out before fal answered")
        timeout = aiohttp.ClientTimeout(total=min(CALL_TIMEOUT, remaining))
        headers = self._headers if body is None else {**self._headers, "Content-Type": "application/json"}
        try:
            async with started(self.http).request(method, url, data=body, headers=headers, timeout=timeout,
                                         allow_redirects=False) as resp:
                raw = await read_answer(resp, max_bytes, "fal")
                status, answer_headers = resp.status, resp.headers
        except TimeoutError:
            raise UpstreamTimeout(f"no answer from fal within {timeout.total:.3g} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"cannot reach fal ({type(e).__name__})") from None
        # sync_mode results carry the images as data URIs: megabytes of JSON, parsed off the event loop.
        payload = await run_cpu(len(raw), json_or_none, raw)
        return status, payload, answer_headers

    def _cancel_later(self, handle: QueueHandle) -> None:
        self.in_background(self._cancel(handle))

    async def _cancel(self, handle: QueueHandle) -> None:
        try:
            async with started(self.http).put(handle.cancel_url, headers=self._headers, allow_redirects=False,
                                     timeout=aiohttp.ClientTimeout(total=CANCEL_TIMEOUT)) as resp:
                await read_answer(resp, SMALL_ANSWER, "fal")
                log.info("fal request %s: cancel answered HTTP %d", handle.request_id, resp.status)
        # RuntimeError: the session closed; UpstreamError: a redirect, or an answer past the limit
        except (TimeoutError, aiohttp.ClientError, RuntimeError, UpstreamError) as e:
            log.info("fal request %s: cancel failed (%s)", handle.request_id, type(e).__name__)
