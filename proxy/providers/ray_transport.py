"""How the `ray` kind reaches its pool: the Ray connection, the Serve application's status, and one
generation call over a Serve handle or over Serve's HTTP ingress (failures -> the proxy's errors)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from local_backend.ray_wire import wire_to_json

from ..errors import ProxyError, UpstreamError
from .base import answer_lines, read_answer
from .ray_convert import http_error, ray_error

# What a call hands each preview to (a replica's {"index", "partial_index", "b64"...} dict), awaited.
OnPartial = Callable[[dict], Awaitable[None]]
# What a call hands each step the replica reports to: (steps done, steps in all).
OnProgress = Callable[[int, int], None]

log = logging.getLogger(__name__)


# ----- the Ray connection (one per process: ray.init is global) ---------------------------------------

_connect_lock = threading.Lock()
_connected_by_us: set[str] = set()  # providers whose ray.init this process made


def connect(address: str, owner: str) -> None:
    """Join the cluster as a driver unless this process already is one (blocking: run in a thread)."""
    import ray

    with _connect_lock:
        if ray.is_initialized():
            return
        # Ray's core worker installs a C-level handler for SIGTERM (and crash signals) that dumps a stack
        # and kills the process: the proxy would die at once instead of draining its requests.
        try:
            from ray._private import ray_constants

            ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        except (ImportError, AttributeError):  # another Ray: its default stays
            pass
        # From a thread other than the main one, ray.init installs no Python signal handlers either.
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        _connected_by_us.add(owner)


def disconnect(owner: str) -> None:
    import ray

    with _connect_lock:
        if owner in _connected_by_us:
            _connected_by_us.discard(owner)
            if not _connected_by_us:
                ray.shutdown()


def app_status(app_name: str, deployment: str) -> tuple[str | None, dict[str, int], str]:
    """(application status or None when it is not deployed, replica states, message) from serve.status()."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return None, {}, ""
    dep = app.deployments.get(deployment)
    states = {str(k): int(v) for k, v in (dep.replica_states if dep else {}).items()}
    message = app.message or (dep.message if dep else "")
    return str(getattr(app.status, "value", app.status)), states, message or ""


# ----- one generation call ----------------------------------------------------------------------------


async def _event(event: dict, on_partial: OnPartial | None, on_progress: OnProgress | None) -> bool:
    """A stream's step or preview handed on (True), or False for the reply."""
    if "progress" in event:
        if on_progress is not None:
            on_progress(int(event["progress"]["step"]), int(event["progress"]["total"]))
        return True
    if "partial" in event:
        if on_partial is not None:
            await on_partial(event["partial"])
        return True
    return False


async def call_handle(handle: Any, wire: dict, on_partial: OnPartial | None, name: str,
                      on_progress: OnProgress | None = None) -> dict:
    """One request through a Serve handle: the reply; on_partial (async) gets each preview first and
    on_progress each step (either asks for the replica's stream)."""
    loop = asyncio.get_running_loop()
    try:
        if on_partial is None and on_progress is None:
            response = handle.generate.remote(wire)
            try:
                return await response
            except BaseException:
                # Cancelling the awaiting task does not cancel a Serve request: do it (it blocks
                # briefly when the request is being assigned, so not on the loop).
                loop.run_in_executor(None, _cancel, response)
                raise
        stream = handle.options(stream=True).generate_stream.remote(wire)
        reply = None
        try:
            async for event in stream:
                if not await _event(event, on_partial, on_progress):
                    reply = event
        except BaseException:
            loop.run_in_executor(None, _cancel, stream)
            raise
        if reply is None:
            raise UpstreamError("the Ray pool's stream ended without a result")
        return reply
    except (asyncio.CancelledError, ProxyError):
        raise
    except Exception as e:
        error = ray_error(e)
        log.warning("provider %s: %s (%s)", name, error.message, type(e).__name__)
        raise error from None


async def call_http(http: aiohttp.ClientSession, url: str, wire: dict, on_partial: OnPartial | None,
                    max_bytes: int, on_progress: OnProgress | None = None) -> dict:
    """One request through Serve's HTTP ingress at url: the reply; on_partial (async) gets each preview first
    and on_progress each step (either asks for a stream). The reply (each line of a stream) may take max_bytes."""
    streamed = on_partial is not None or on_progress is not None
    body = await asyncio.to_thread(lambda: json.dumps({"params": wire_to_json(wire), "stream": streamed}))
    try:
        # Leaving this block early (cancelled) closes the connection: Serve cancels the replica's job.
        async with http.post(url, data=body, headers={"Content-Type": "application/json"},
                             allow_redirects=False) as resp:
            if not streamed or resp.status != 200:
                text = await read_answer(resp, max_bytes, "the Ray pool's HTTP ingress")
                try:
                    reply = json.loads(text)
                except ValueError:
                    reply = None
                if not isinstance(reply, dict) or "ok" not in reply:
                    raise http_error(resp.status, resp.headers)
                return reply
            reply = None
            async for line in answer_lines(resp.content, max_bytes, "the Ray pool's HTTP ingress"):
                if not line.strip():
                    continue
                event = json.loads(line)
                if not await _event(event, on_partial, on_progress):
                    reply = event
            if reply is None:
                raise UpstreamError("the Ray pool's stream ended without a result")
            return reply
    except aiohttp.ClientError as e:
        raise UpstreamError(f"the Ray pool's HTTP ingress failed: {type(e).__name__}") from None
    except ValueError:
        raise UpstreamError("the Ray pool's HTTP ingress sent something that is not JSON") from None


def _cancel(response: Any) -> None:  # a ray.serve DeploymentResponse(Generator)
    """Cancel a Serve call (best effort, in a thread: it waits for the call's replica assignment)."""
    # It raises when the call failed or finished already (cancel fetches its outcome): nothing to stop.
    with contextlib.suppress(Exception):
        response.cancel()
