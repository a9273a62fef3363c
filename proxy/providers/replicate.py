"""Replicate: POST {base_url}/models/{owner}/{name}/predictions, then poll the prediction until it ends.

The create call asks Replicate to hold the answer while the model runs (`Prefer: wait`); an answer that is
still `starting` / `processing` is polled with backoff. A prediction the proxy abandons (the client hung
up, the route's deadline passed, polling broke) is cancelled upstream in the background.

The pure converters (to_native, to_native_edit, from_native, error_from_status, ...) live in
replicate_convert.py and are tested without a network; ReplicateProvider is the thin I/O around them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import aiohttp

from ..config import RouteConfig
from ..errors import ProxyError, UpstreamError, UpstreamTimeout, retry_after_from_headers
from ..http.cpu import run_cpu
from ..media.progress import step_reporter
from ..request import ImageRequest
from ..telemetry import tracing
from .base import SMALL_ANSWER, Capabilities, GeneratedImage, answer_limit, json_or_none, read_answer, started
from .replicate_convert import (
    PENDING,
    TERMINAL,
    compression_applied,
    error_from_status,
    from_native,
    prediction_url,
    short_text,
    split_model,
    steps_from_logs,
    to_native,
    to_native_edit,
)
from .vendor import VendorProvider, poll_wait

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.replicate.com/v1"
# Consecutive failed polls (5xx, 429, connection errors) tolerated before the route gives up.
MAX_POLL_ERRORS = 3


class ReplicateProvider(VendorProvider):
    kind = "replicate"
    options_schema = {
        "base_url": str | None,
        "api_key": str | None,
        "timeout": (float, {"gt": 0}),
        "retries": (int, {"ge": 0, "le": 10}),
        # Prefer: wait=N on the create call (0: answer at once and poll from the start).
        "wait_seconds": (int, {"ge": 0, "le": 60}),
        # First wait between polls; it doubles up to poll_max_interval.
        "poll_interval": (float, {"gt": 0}),
        "poll_max_interval": (float, {"gt": 0}),
        # Send Cancel-After (the route's timeout), so Replicate stops a prediction the proxy stopped waiting for
        # even while the create call was still holding (before its id was known).
        "cancel_after": bool,
    }
    # Edits go to the route's model (an edit model); Replicate's Qwen edit models take no mask.
    capabilities = Capabilities(max_images_per_call=1, output_formats=frozenset({"png", "jpeg", "webp"}),
                                output_compression=True, edits=True, masks=False)

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)
        self.base_url = str(options.get("base_url") or DEFAULT_BASE_URL).rstrip("/")
        wait = options.get("wait_seconds")
        self.wait_seconds = 60 if wait is None else int(wait)
        self.poll_interval = float(options.get("poll_interval") or 0.25)
        self.poll_max_interval = max(self.poll_interval, float(options.get("poll_max_interval") or 2.0))
        self.cancel_after = bool(options.get("cancel_after", True))

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json",
                "Accept": "application/json"}

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        model = route.model or req.model
        owner, name, version = split_model(model)
        if req.is_edit:
            # Megabytes of base64: built off the event loop.
            native_input = await asyncio.to_thread(to_native_edit, req, model)
        else:
            native_input = to_native(req)
        body: dict[str, Any] = {"input": native_input}
        if version:
            url = f"{self.base_url}/predictions"
            body["version"] = version
        else:
            url = f"{self.base_url}/models/{owner}/{name}/predictions"
        limit = route.timeout or self.default_timeout
        headers = self._headers()
        if self.wait_seconds:
            headers["Prefer"] = "wait" if self.wait_seconds == 60 else f"wait={self.wait_seconds}"
        if self.cancel_after:
            headers["Cancel-After"] = f"{max(1, math.ceil(limit))}s"

        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        data = await asyncio.to_thread(json.dumps, body) if req.is_edit else json.dumps(body)
        max_bytes = answer_limit(req)  # of each answer: a prediction may carry its output as data URIs
        status, payload, retry_after = await self._call("POST", url, data.encode(), headers, limit, "create",
                                                        max_bytes)
        if status >= 300:
            raise self._redacted(error_from_status(status, payload, retry_after, req))
        if not isinstance(payload, dict):
            raise UpstreamError(f"the upstream answered HTTP {status} with a body that is not a prediction")
        try:
            with tracing.span("vendor.poll", {"qip.provider": self.name}):
                prediction = await self._wait(payload, end, max_bytes)
        except BaseException:
            # Cancelled (client gone, route deadline), timed out or polling broke: stop paying for it.
            self._cancel_later(payload)
            raise
        try:
            return from_native(prediction, req, compression_applied(req, native_input))
        except ProxyError as e:
            raise self._redacted(e) from None

    async def _call(self, method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float,
                    what: str, max_bytes: int) -> tuple[int, Any, float | None]:
        """One HTTP call; `body` is JSON already encoded (the headers say application/json)."""
        try:
            async with started(self.http).request(method, url, data=body, headers=headers, allow_redirects=False,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                raw = await read_answer(resp, max_bytes)
                status, retry_after = resp.status, retry_after_from_headers(resp.headers)
        except TimeoutError:
            raise UpstreamTimeout(f"no answer to the {what} call within {timeout:.3g} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"cannot reach the upstream ({type(e).__name__})") from None
        return status, await run_cpu(len(raw), json_or_none, raw), retry_after

    async def _wait(self, prediction: dict[str, Any], end: float, max_bytes: int) -> dict[str, Any]:
        """Poll until the prediction ends; exponential backoff, bounded by `end` (loop time)."""
        loop = asyncio.get_running_loop()
        get_url = None
        delay = self.poll_interval
        errors = 0
        report = step_reporter()  # a background job's progress: the logs' progress bar
        # A status that is no string (a list is unhashable) is polled like one that is unknown.
        while str(prediction.get("status")) not in TERMINAL:
            if get_url is None:
                get_url = prediction_url(prediction, "get", self.base_url)
            if loop.time() + delay >= end:
                raise UpstreamTimeout(f"the prediction was still {short_text(prediction.get('status'))} at the deadline")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.poll_max_interval)
            try:
                status, payload, retry_after = await self._call(
                    "GET", get_url, None, self._headers(), max(0.1, min(30.0, end - loop.time())), "poll",
                    max_bytes)
            except UpstreamError as e:  # connection error or a slow answer: try again a few times
                errors += 1
                if errors >= MAX_POLL_ERRORS or not e.retry_same_route:
                    raise self._redacted(e) from None
                continue
            if status >= 300:
                error = error_from_status(status, payload, retry_after)
                if status in (401, 403):
                    raise self._redacted(error)
                if not (status == 429 or status >= 500):  # 404 and the like: not the client's fault here
                    raise self._redacted(UpstreamError(f"polling the prediction failed: {error.message}"))
                # A 429 is no failure: Replicate said how long to wait, and `end` bounds the waiting (giving
                # up would create the prediction again, and pay for it twice).
                if status != 429:
                    errors += 1
                    if errors >= MAX_POLL_ERRORS:
                        raise self._redacted(error)
                delay = poll_wait(delay, error.retry_after)
                continue
            if not isinstance(payload, dict):
                errors += 1
                if errors >= MAX_POLL_ERRORS:
                    raise UpstreamError("the upstream answered a poll with a body that is not a prediction")
                continue
            state = payload.get("status")
            if not isinstance(state, str) or (state not in PENDING and state not in TERMINAL):
                # Polled on, it would hold the request to the route's timeout (5 min by default) with no
                # fallback: a few in a row fail the attempt, as fal's unknown statuses do.
                errors += 1
                if errors >= MAX_POLL_ERRORS:
                    raise UpstreamError(f"the upstream answered an unknown prediction status {short_text(state)}")
                continue
            errors = 0
            prediction = payload
            if report is not None and (steps := steps_from_logs(prediction.get("logs"))) is not None:
                report(*steps)
        return prediction

    def _cancel_later(self, prediction: dict[str, Any]) -> None:
        """POST the prediction's cancel URL in a background task (the caller may itself be cancelled)."""
        try:
            url = prediction_url(prediction, "cancel", self.base_url)
        except UpstreamError:
            return
        self.in_background(self._cancel(url))

    async def _cancel(self, url: str) -> None:
        try:
            async with started(self.http).post(url, headers=self._headers(), timeout=aiohttp.ClientTimeout(total=10),
                                      allow_redirects=False) as r:
                await read_answer(r, SMALL_ANSWER)
                if r.status >= 300:
                    log.warning("provider %s: cancelling a prediction answered HTTP %d", self.name, r.status)
        # RuntimeError: the session closed; UpstreamError: a redirect, or an answer past the limit
        except (aiohttp.ClientError, TimeoutError, RuntimeError, UpstreamError) as e:
            log.warning("provider %s: cancelling a prediction failed (%s)", self.name, type(e).__name__)
