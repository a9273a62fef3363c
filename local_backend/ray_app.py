"""The engine as a Ray Serve application: a pool of replicas, one Engine each (one per GPU).

Each replica owns one `Engine` (its queue, batching, LoRA cache) on its own GPU
(`ray_actor_options: {num_gpus: 1}`; the tiny model gets a CPU), and Serve spreads requests over the
replicas and adds or removes replicas with the load (`min_replicas` / `max_replicas`). Deploy it with
`qwen-image-proxy ray-serve --config models.yaml` (every `kind: ray` provider), `serve run
local_backend.ray_app:app` (the tiny model, one CPU replica), or a Serve config file whose application
has `import_path: local_backend.ray_app:build_app` and the pool options as `args` (KubeRay does that).

A pool's options are local_backend.ray_options (POOL_OPTIONS); its requests and replies (`generate`,
`generate_stream`, the HTTP ingress) are the plain data of local_backend.ray_wire.

`stats` answers this replica's counters and queue; the whole pool's are in a small named actor
(stats_actor(app_name)) that every replica reports to each second, readable without waiting behind
requests (calls through Serve wait for a free replica slot).

A caller that cancels its request (DeploymentResponse.cancel(), or an HTTP client that hangs up)
cancels the replica's task, and with it the engine job: dropped from the queue, or stopped at the next
denoising step.

Importing this module imports neither ray nor torch: `app`, `EngineDeployment` and `build_app` import
ray when used, so the proxy can check a pool's options without ray installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from .config import GenerationParams
from .engine import Engine
from .errors import (
    DeadlineExceededError,
    EngineError,
    InvalidParamsError,
    JobCancelledError,
    QueueFullError,
)
from .ray_options import deployment_options, engine_config
from .ray_tracing import job_trace
from .ray_wire import HTTP_STATUS, encode_png, error_reply, params_from_json, params_from_wire, wire_to_json

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "QwenImageEngine"


# ----- the pool's stats: a side channel that never waits behind requests -----------------------------

# Every replica reports its stats each STATS_INTERVAL seconds to one small actor per application (no
# CPU, named in STATS_NAMESPACE); callers read the whole pool from it with one actor call. Not through
# Serve: a call there waits for a free slot on a replica, which a busy pool has none of. The actor
# belongs to the replica that made it; if that replica goes, the others make a new one.
STATS_NAMESPACE = "qwen-image-proxy"
STATS_INTERVAL = 1.0
STATS_TTL = 5.0  # a replica silent this long has gone (stopped, killed, its node lost)


def stats_actor_name(app_name: str) -> str:
    return f"pool-stats:{app_name}"


class PoolStats:
    """The stats actor's class (wrapped with ray.remote by stats_actor)."""

    def __init__(self) -> None:
        self._replicas: dict[str, tuple[float, dict]] = {}

    def report(self, replica_id: str, stats: dict) -> None:
        self._replicas[replica_id] = (time.monotonic(), stats)

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def snapshot(self) -> dict[str, dict]:
        """replica id -> its last stats, for the replicas heard from lately."""
        now = time.monotonic()
        self._replicas = {k: v for k, v in self._replicas.items() if now - v[0] <= STATS_TTL}
        return {k: v[1] for k, v in self._replicas.items()}


_remote_stats = None


def stats_actor(app_name: str, create: bool = False) -> Any:  # a ray ActorHandle
    """The application's stats actor (ValueError when there is none and create is false)."""
    global _remote_stats
    import ray

    name = stats_actor_name(app_name)
    if not create:
        return ray.get_actor(name, namespace=STATS_NAMESPACE)
    if _remote_stats is None:
        _remote_stats = ray.remote(PoolStats)
    return _remote_stats.options(name=name, namespace=STATS_NAMESPACE, get_if_exists=True, num_cpus=0).remote()


# ----- the replica ----------------------------------------------------------------------------------


def _replica_context() -> tuple[str, str | None]:
    """(this replica's id, its application's name); outside Serve (a test, a plain process) no app."""
    try:
        from ray import serve

        context = serve.get_replica_context()
        return context.replica_id.unique_id, context.app_name
    except Exception:
        import os

        return f"pid{os.getpid()}", None


class EngineReplica:
    """One replica of the pool: one Engine, its worker thread, and plain-data methods around it.

    Plain Python: Serve wraps it (EngineDeployment); it can be used without Ray in a test.
    """

    def __init__(self, engine: dict | None = None) -> None:
        self.config = engine_config(engine)
        self.replica_id, self.app_name = _replica_context()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.counts = {"completed": 0, "failed": 0, "rejected": 0, "cancelled": 0, "expired": 0, "images": 0}
        self.active = 0  # requests in this replica now (waiting or running)
        self.engine = Engine(self.config)
        started = time.monotonic()
        self.engine.start()  # loads the pipeline (blocking: Serve waits for the constructor)
        log.info("replica %s: %s loaded in %.1f s", self.replica_id, self.config.model, time.monotonic() - started)
        if self.app_name is not None:
            threading.Thread(target=self._report, name="qwen-image-pool-stats", daemon=True).start()

    # ----- what callers use -----

    async def generate(self, wire: dict) -> dict:
        """One request; the reply is plain data (see the module's docstring). Cancelling cancels the job."""
        wire, traceparent = _without_trace(wire)
        try:
            params = params_from_wire(wire)
        except InvalidParamsError as e:
            return self._reply_error(e)
        return await self._traced(params, traceparent)

    async def generate_stream(self, wire: dict) -> AsyncIterator[dict]:
        """Steps done ({"progress": {"step", "total"}}) and previews ({"partial": ...}) as the job makes
        them, then the reply. Closing it cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_partial(index: int, partial_index: int, image: Image) -> None:  # the engine's worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (index, partial_index, image))

        def on_step(step: int, total: int) -> None:  # the engine's worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (step, total))

        wire, traceparent = _without_trace(wire)
        try:
            params = params_from_wire(wire, on_partial)
        except InvalidParamsError as e:
            yield self._reply_error(e)
            return
        params.on_step = on_step
        task = asyncio.ensure_future(self._traced(params, traceparent))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            # Steps and partials are queued (call_soon_threadsafe) before the job's result reaches the
            # task, so every one comes before the end marker.
            while (item := await queue.get()) is not None:
                if len(item) == 2:
                    yield {"progress": {"step": item[0], "total": item[1]}}
                    continue
                index, partial_index, image = item
                data = await asyncio.to_thread(encode_png, image)
                yield {"partial": {"image_index": index, "partial_index": partial_index, "data": data}}
            yield await task
        finally:
            if not task.done():  # the caller went away (cancelled, or closed the stream)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def stats(self) -> dict:
        """This replica's counters and queue (cheap: for /ready, /metrics and tests)."""
        with self._lock:
            counts = dict(self.counts)
        return {"replica": self.replica_id, "queue_depth": self.engine.queue_depth, "active": self.active,
                "model": self.config.model, "warnings": self.engine.warnings, **counts}

    def check_health(self) -> None:
        """Serve's health check: a closed engine or a dead worker thread restarts the replica."""
        thread = getattr(self.engine, "_thread", None)
        if getattr(self.engine, "_closed", False) or thread is None or not thread.is_alive():
            raise RuntimeError("the engine's worker is not running")

    async def pool_stats(self) -> dict[str, dict]:
        """Every replica's stats from the stats actor (this one's alone without it)."""
        if self.app_name is not None:
            try:
                actor = await asyncio.to_thread(stats_actor, self.app_name)
                async with asyncio.timeout(5):
                    return await actor.snapshot.remote()
            except Exception:  # not made yet, or being remade
                pass
        return {self.replica_id: self.stats()}

    def close(self) -> None:
        self._stopping.set()
        self.engine.close()

    def __del__(self) -> None:  # Serve calls it when it stops the replica
        if hasattr(self, "_stopping"):
            self._stopping.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def _report(self) -> None:
        """The stats thread: this replica's stats to the stats actor every STATS_INTERVAL seconds."""
        import ray

        app_name = self.app_name
        if app_name is None:  # started only inside a Serve application
            return
        actor = None
        while not self._stopping.wait(STATS_INTERVAL):
            try:
                if actor is None:
                    actor = stats_actor(app_name, create=True)
                ray.get(actor.report.remote(self.replica_id, self.stats()), timeout=5)
            except Exception:  # the actor's replica went away: make (or find) a new one next time
                actor = None
        if actor is not None:
            with contextlib.suppress(Exception):
                actor.forget.remote(self.replica_id)

    # ----- HTTP (Serve's ingress) -----

    async def __call__(self, request: Any) -> Any:  # a starlette Request -> Response
        from starlette.responses import JSONResponse, StreamingResponse

        if request.method == "GET" and request.url.path.rstrip("/").endswith("/stats"):
            return JSONResponse({"replicas": await self.pool_stats()})
        if request.method != "POST":
            return JSONResponse({"ok": False, "error": {"type": "invalid_params", "message": "POST a JSON body"}},
                                status_code=405)
        try:
            body = json.loads(await request.body())
            if not isinstance(body, dict) or not isinstance(body.get("params"), dict):
                raise InvalidParamsError('the body must be {"params": {...}, "stream": false}', "params")
            wire = params_from_json(body["params"])
        except (ValueError, InvalidParamsError) as e:
            error = e if isinstance(e, InvalidParamsError) else InvalidParamsError(f"the body is not JSON: {e}")
            return _json_reply(self._reply_error(error))
        if body.get("stream"):

            async def lines() -> AsyncIterator[str]:
                async for event in self.generate_stream(wire):
                    yield json.dumps(wire_to_json(event)) + "\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")
        return _json_reply(await self.generate(wire))

    # ----- inside -----

    def _count(self, key: str, images: int = 0) -> None:
        with self._lock:
            self.counts[key] += 1
            self.counts["images"] += images

    def _reply_error(self, exc: BaseException) -> dict:
        return {"ok": False, "error": error_reply(exc), "replica": self.replica_id,
                "queue_depth": self.engine.queue_depth}

    async def _traced(self, params: GenerationParams, traceparent: str | None) -> dict:
        """_run, as a part of the caller's trace when it sent one (local_backend.ray_tracing)."""
        with job_trace(traceparent, self.replica_id) as hook:
            params.trace = hook
            return await self._run(params)

    async def _run(self, params: GenerationParams) -> dict:
        self.active += 1  # on the replica's event loop only
        try:
            return await self._generate(params)
        finally:
            self.active -= 1

    async def _generate(self, params: GenerationParams) -> dict:
        try:
            result = await self.engine.generate(params)
        except asyncio.CancelledError:  # the caller cancelled (deadline, client gone): the job is cancelled
            self._count("cancelled")
            raise
        except QueueFullError as e:
            self._count("rejected")
            return self._reply_error(e)
        except DeadlineExceededError as e:
            self._count("expired")
            return self._reply_error(e)
        except JobCancelledError as e:
            self._count("cancelled")
            return self._reply_error(e)
        except EngineError as e:
            self._count("failed")
            return self._reply_error(e)
        images = await asyncio.to_thread(lambda: [encode_png(im) for im in result.images])
        self._count("completed", len(images))
        return {
            "ok": True,
            "images": images,
            "seeds": list(result.seeds),
            "revised_prompt": result.revised_prompt,
            "steps_run": result.steps_run,
            "batch_size": result.batch_size,
            "seconds": result.seconds,
            "gpu_seconds": result.gpu_seconds,
            "replica": self.replica_id,
            "queue_depth": self.engine.queue_depth,
        }


def _without_trace(wire: Any) -> tuple[Any, Any]:
    """(the wire without its traceparent, the traceparent): the caller's trace context rides along with
    the parameters (the proxy sends it when it traces) but is none of them."""
    if not isinstance(wire, dict) or "traceparent" not in wire:
        return wire, None
    wire = dict(wire)
    return wire, wire.pop("traceparent")


def _json_reply(reply: dict) -> Any:  # a starlette JSONResponse
    from starlette.responses import JSONResponse

    status, headers = 200, {}
    if not reply.get("ok"):
        error = reply.get("error") or {}
        status = HTTP_STATUS.get(str(error.get("type")), 500)
        if error.get("retry_after") is not None:
            headers["Retry-After"] = str(max(1, round(error["retry_after"])))
    return JSONResponse(wire_to_json(reply), status_code=status, headers=headers)


# ----- Serve ----------------------------------------------------------------------------------------

_deployment = None


def engine_deployment() -> Any:  # a ray.serve Deployment
    """EngineReplica as a Serve deployment (imports ray)."""
    global _deployment
    if _deployment is None:
        from ray import serve

        _deployment = serve.deployment(name=DEPLOYMENT_NAME)(EngineReplica)
    return _deployment


def build_app(args: dict | None = None) -> Any:  # a ray.serve Application
    """The Serve application of a pool (Serve's application builder: `import_path: ...:build_app`)."""
    args = dict(args or {})
    options = deployment_options(args)
    return engine_deployment().options(**options).bind(args.get("engine") or {})


def __getattr__(name: str) -> Any:
    # `serve run local_backend.ray_app:app`: the tiny model, one CPU replica. Built on first use, so
    # importing this module does not import ray.
    if name == "app":
        return build_app({})
    if name == "EngineDeployment":
        return engine_deployment()
    raise AttributeError(name)
