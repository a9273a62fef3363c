"""The engine as a Ray Serve application: a pool of replicas, one Engine each (one per GPU).

Each replica owns one `Engine` (its queue, batching, LoRA cache) on its own GPU
(`ray_actor_options: {num_gpus: 1}`; the tiny model gets a CPU), and Serve spreads requests over the
replicas and adds or removes replicas with the load (`min_replicas` / `max_replicas`). Deploy it with
`qwen-image-proxy ray-serve --config models.yaml` (every `kind: ray` provider), `serve run
local_backend.ray_app:app` (the tiny model, one CPU replica), or a Serve config file whose application
has `import_path: local_backend.ray_app:build_app` and the pool options as `args` (KubeRay does that).

Pool options (the same keys as a `kind: ray` provider in models.yaml; see POOL_OPTIONS):

    engine:                  EngineConfig fields ({model: Qwen/Qwen-Image, max_batch: 4, ...})
    num_replicas:            a fixed pool (default 1) ...
    min_replicas, max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s:
                             ... or an autoscaled one (target_ongoing_requests defaults to max_batch)
    max_ongoing_requests:    requests Serve sends one replica at once (default 2 * max_batch, at most
                             max_queue + max_batch); the rest wait in Serve, for the first free replica
    max_queued_requests:     requests each caller holds while every replica is full (default -1, no
                             limit: they wait for the deadline); past it a call fails at once (429)
    ray_actor_options:       default {num_gpus: 1}; {num_cpus: 1} for the tiny models or device cpu
    graceful_shutdown_timeout_s: how long a stopping replica may finish its jobs (default 60)

The wire format is plain data, so the caller needs neither torch nor this module's classes:

- a request is a dict of GenerationParams fields (params_to_wire): values left at their defaults are
  left out, callbacks never travel, LoRAs are {path, scale}, images and the mask are encoded image
  files (bytes), and `deadline` is a time.time() instant (each replica turns it into its own
  time.monotonic(); keep the clocks in sync, as NTP does);
- a reply (`generate`, and the last item of `generate_stream`) is {"ok": true, "images": [PNG
  bytes], "seeds", "steps_run", "batch_size", "seconds", "replica", "queue_depth"} or {"ok": false,
  "error": {"type", "message", "param", "retry_after"}, ...}, where type is queue_full,
  invalid_params, cancelled, deadline or engine; nothing raises across the wire on purpose;
- `generate_stream` yields {"partial": {"image_index", "partial_index", "data": PNG bytes}} previews
  first (when partial_images > 0);
- over HTTP (Serve's ingress, for callers outside the cluster) the same dicts are JSON with the bytes
  in base64: POST <route_prefix> {"params": {...}, "stream": false} answers the reply (status 200, 400,
  429 with Retry-After, 503 or 500); with "stream": true, one JSON object a line (NDJSON).
  GET <route_prefix>/stats answers every replica's counters: {"replicas": {id: stats}}.
- `stats` answers this replica's counters and queue; the whole pool's are in a small named actor
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
import base64
import binascii
import contextlib
import io
import json
import logging
import threading
import time
from dataclasses import MISSING, fields, is_dataclass
from typing import Any

from .config import EngineConfig, GenerationParams, LoraSpec
from .errors import (
    DeadlineExceededError,
    EngineError,
    InvalidParamsError,
    JobCancelledError,
    QueueFullError,
)

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "QwenImageEngine"
DEFAULT_APP_NAME = "qwen-image"
IMPORT_PATH = "local_backend.ray_app:build_app"

# The options of a pool (build_app's args). Anything else is an error.
POOL_OPTIONS = (
    "engine",
    "num_replicas",
    "min_replicas",
    "max_replicas",
    "target_ongoing_requests",
    "upscale_delay_s",
    "downscale_delay_s",
    "max_ongoing_requests",
    "max_queued_requests",
    "ray_actor_options",
    "graceful_shutdown_timeout_s",
)
_AUTOSCALING = ("min_replicas", "max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s")
# A replica that is stopped (scale-down, redeploy) lets its jobs finish for this long: Serve's 20 s
# default is shorter than one large image on a busy GPU.
DEFAULT_SHUTDOWN_TIMEOUT = 60.0


# ----- options -----------------------------------------------------------------------------------


def engine_config(options: dict | None) -> EngineConfig:
    """A pool's `engine` options -> EngineConfig; unknown keys are a ValueError that names them."""
    options = dict(options or {})
    known = {f.name for f in fields(EngineConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown engine option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")

    def spec(value) -> LoraSpec:
        if isinstance(value, LoraSpec):
            return value
        return LoraSpec(value) if isinstance(value, str) else LoraSpec(**value)

    if "loras" in options:
        options["loras"] = {name: spec(v) for name, v in (options["loras"] or {}).items()}
    if "base_loras" in options:
        options["base_loras"] = [spec(v) for v in options["base_loras"] or []]
    for key in ("lora_dirs", "lora_url_hosts"):
        if key in options:
            options[key] = [v for v in options[key] or [] if v]
    for key in ("tiers", "quality_tiers"):
        if key in options:
            options[key] = options[key] or {}
    if "prompt_enhancement" in options:
        options["prompt_enhancement"] = pool_enhancement(options["prompt_enhancement"])
    config = EngineConfig(**options)
    _check(config)
    return config


def pool_enhancement(value):
    """A pool's prompt_enhancement, as models.yaml writes it ({with: text_encoder | chat, ...}) -> the
    replicas' engine option: with: chat is done by the proxy before it calls the pool (it has the
    upstream's key and the HTTP session), so the replicas then rewrite nothing themselves."""
    if not isinstance(value, dict):
        return value
    value = dict(value)
    if value.get("with") == "chat":
        return None
    if isinstance(value.get("default"), str):  # "on" / "off", as a request says it
        flag = value["default"].strip().lower()
        if flag in ("on", "true", "yes", "1", "off", "false", "no", "0"):
            value["default"] = flag in ("on", "true", "yes", "1")
    return value


def _check(config: EngineConfig) -> None:
    """The options an engine checks when it starts, checked here (on the proxy's side too), so that a bad
    one is a config error that names it rather than replicas failing to start. Pure: imports diffusers
    only to check an attention backend's name, and only where it is installed."""
    from . import accel_options, enhance
    from .loading import validate_config
    from .tiers import parse_tiers

    try:
        validate_config(config)
        parse_tiers(config)
        accel_options.parse_compile(config.compile)
        accel_options.parse_cache(config.cache)
        accel_options.check_skip(config)
        if config.attention_backend is not None:
            if not isinstance(config.attention_backend, str):
                raise EngineError("attention_backend must be a backend name")
            if accel_options.installed("diffusers"):
                accel_options.check_attention_backend(config.attention_backend)
        enhance.parse_spec(config.prompt_enhancement)
    except EngineError as e:
        raise ValueError(str(e)) from None


def _on_cpu(config: EngineConfig) -> bool:
    return (config.device or "").startswith("cpu") or (config.device is None and config.model in ("tiny", "tiny-edit"))


def deployment_options(options: dict | None) -> dict[str, Any]:
    """Pool options -> the keyword arguments of Serve's `Deployment.options()` (pure; checks them)."""
    options = dict(options or {})
    unknown = set(options) - set(POOL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown pool option(s) {', '.join(sorted(unknown))}; known: {', '.join(POOL_OPTIONS)}")
    config = engine_config(options.get("engine"))
    out: dict[str, Any] = {}
    autoscaled = any(options.get(k) is not None for k in _AUTOSCALING)
    if autoscaled:
        if options.get("num_replicas") is not None:
            raise ValueError("give either num_replicas (a fixed pool) or min_replicas/max_replicas (autoscaled)")
        low = options.get("min_replicas")
        high = options.get("max_replicas")
        low = 1 if low is None else int(low)
        high = max(low, 1) if high is None else int(high)
        if low < 0 or high < 1 or low > high:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1 (got {low}, {high})")
        scaling: dict[str, Any] = {
            "min_replicas": low,
            "max_replicas": high,
            # A replica is busy, not overloaded, while it has a full batch of jobs.
            "target_ongoing_requests": float(options.get("target_ongoing_requests") or config.max_batch),
        }
        for key in ("upscale_delay_s", "downscale_delay_s"):
            if options.get(key) is not None:
                scaling[key] = float(options[key])
        out["autoscaling_config"] = scaling
    else:
        replicas = options.get("num_replicas")
        replicas = 1 if replicas is None else int(replicas)
        if replicas < 1:
            raise ValueError("num_replicas must be at least 1")
        out["num_replicas"] = replicas
    ongoing = options.get("max_ongoing_requests")
    if ongoing is None:
        # The batch a replica runs and the next one, waiting to join it: enough to keep its GPU busy and
        # its batches full. Serve holds the rest and gives each to the first replica with room, a new
        # one included (a job queued inside an engine stays there). Never more than the engine takes.
        ongoing = min(2 * config.max_batch, config.max_queue + config.max_batch)
    out["max_ongoing_requests"] = int(ongoing)
    if options.get("max_queued_requests") is not None:
        out["max_queued_requests"] = int(options["max_queued_requests"])
    actor = options.get("ray_actor_options")
    if actor is None:
        actor = {"num_cpus": 1} if _on_cpu(config) else {"num_gpus": 1}
    if not isinstance(actor, dict):
        raise ValueError("ray_actor_options must be a mapping (e.g. {num_gpus: 1})")
    out["ray_actor_options"] = dict(actor)
    timeout = options.get("graceful_shutdown_timeout_s")
    out["graceful_shutdown_timeout_s"] = float(DEFAULT_SHUTDOWN_TIMEOUT if timeout is None else timeout)
    return out


def serve_application(name: str, options: dict | None, route_prefix: str | None = None) -> dict:
    """One entry of a Serve config file's `applications` (serve deploy, KubeRay's serveConfigV2)."""
    deployment_options(options)  # checked before anything is written
    return {
        "name": name,
        "route_prefix": route_prefix or f"/{name}",
        "import_path": IMPORT_PATH,
        "args": {k: v for k, v in (options or {}).items() if v is not None},
    }


# ----- the wire format -----------------------------------------------------------------------------


def _encode_png(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _plain(value):
    """A GenerationParams value as plain data: dataclasses -> dicts, Pillow images -> PNG bytes."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if hasattr(value, "save") and hasattr(value, "size"):  # a Pillow image
        return _encode_png(value)
    return value


def _default(f):
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def params_to_wire(params: GenerationParams) -> dict:
    """GenerationParams -> the plain dict a replica takes (pure; the caller's side).

    Every field travels except callbacks (a replica makes its own) and values left at their default.
    `images` and `mask` may be Pillow images or already-encoded image files (bytes, sent as they are).
    `deadline`, a time.monotonic() instant here, becomes a time.time() one.
    """
    wire: dict[str, Any] = {}
    for f in fields(GenerationParams):
        value = getattr(params, f.name)
        if callable(value) or value == _default(f):
            continue
        if f.name == "deadline":
            value = time.time() + (value - time.monotonic())
        wire[f.name] = _plain(value)
    return wire


def _decode_image(data, name: str):
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        raise InvalidParamsError(f"{name} must be an encoded image file", name)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:
        raise InvalidParamsError(f"the {name} could not be decoded: {type(e).__name__}", name) from None
    return image


def params_from_wire(wire: dict, on_partial=None) -> GenerationParams:
    """The plain dict -> GenerationParams (the replica's side; InvalidParamsError for what is wrong).

    A field this engine does not know is refused (a caller newer than the pool): it would be ignored
    otherwise. Fields are converted by their declared type, so new plain fields need no code here.
    """
    if not isinstance(wire, dict):
        raise InvalidParamsError("the request must be a mapping of generation parameters")
    known = {f.name: f for f in fields(GenerationParams)}
    unknown = set(wire) - set(known)
    if unknown:
        raise InvalidParamsError(
            f"this pool's engine does not know the parameter(s) {', '.join(sorted(unknown))}", sorted(unknown)[0]
        )
    values: dict[str, Any] = {}
    for name, value in wire.items():
        kind = str(known[name].type)
        if name == "deadline" and value is not None:
            if not isinstance(value, (int, float)):
                raise InvalidParamsError("deadline must be a time.time() instant", "deadline")
            value = time.monotonic() + (float(value) - time.time())
        elif callable(value):
            raise InvalidParamsError(f"{name} cannot be sent to a pool", name)
        elif "LoraSpec" in kind and value is not None:
            try:
                value = [LoraSpec(**v) if isinstance(v, dict) else LoraSpec(v) for v in value]
            except TypeError as e:
                raise InvalidParamsError(f"loras: {e}", "loras") from None
        elif "Image" in kind and value is not None:
            value = [_decode_image(v, name) for v in value] if isinstance(value, list) else _decode_image(value, name)
        values[name] = value
    if "prompt" not in values:
        raise InvalidParamsError("prompt is required", "prompt")
    params = GenerationParams(**values)
    params.on_partial = on_partial if params.partial_images else None
    return params


def error_reply(exc: BaseException) -> dict:
    """An engine exception -> the serializable error of a reply."""
    if isinstance(exc, QueueFullError):
        kind = "queue_full"
    elif isinstance(exc, InvalidParamsError):
        kind = "invalid_params"
    elif isinstance(exc, DeadlineExceededError):
        kind = "deadline"
    elif isinstance(exc, JobCancelledError):
        kind = "cancelled"
    else:
        kind = "engine"
    message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
    return {
        "type": kind,
        "message": message[:1000],
        "param": getattr(exc, "param", None),
        "retry_after": getattr(exc, "retry_after", None),
    }


# Reply error type -> HTTP status on Serve's HTTP ingress.
HTTP_STATUS = {"queue_full": 429, "invalid_params": 400, "cancelled": 503, "deadline": 504, "engine": 500}


def _b64_in(value):
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


def wire_to_json(data):
    """bytes -> base64 text, recursively (for JSON)."""
    if isinstance(data, (bytes, bytearray)):
        return base64.b64encode(data).decode("ascii")
    if isinstance(data, dict):
        return {k: wire_to_json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [wire_to_json(v) for v in data]
    return data


def params_from_json(body: dict) -> dict:
    """The HTTP body's params: the wire dict with images and mask in base64."""
    params = dict(body)
    try:
        if isinstance(params.get("images"), list):
            params["images"] = [_b64_in(v) for v in params["images"]]
        if params.get("mask") is not None:
            params["mask"] = _b64_in(params["mask"])
    except (binascii.Error, ValueError):
        raise InvalidParamsError("images and mask must be base64 text", "images") from None
    return params


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

    def __init__(self):
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


def stats_actor(app_name: str, create: bool = False):
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

    def __init__(self, engine: dict | None = None):
        from .engine import Engine

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
        try:
            params = params_from_wire(wire)
        except InvalidParamsError as e:
            return self._reply_error(e)
        return await self._run(params)

    async def generate_stream(self, wire: dict):
        """Previews as the job makes them ({"partial": ...}), then the reply. Closing it cancels the job."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_partial(index: int, partial_index: int, image) -> None:  # the engine's worker thread
            loop.call_soon_threadsafe(queue.put_nowait, (index, partial_index, image))

        try:
            params = params_from_wire(wire, on_partial)
        except InvalidParamsError as e:
            yield self._reply_error(e)
            return
        task = asyncio.ensure_future(self._run(params))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            # Partials are queued (call_soon_threadsafe) before the job's result reaches the task, so
            # every preview comes before the end marker.
            while (item := await queue.get()) is not None:
                index, partial_index, image = item
                data = await asyncio.to_thread(_encode_png, image)
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

    def __del__(self):  # Serve calls it when it stops the replica
        if hasattr(self, "_stopping"):
            self._stopping.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def _report(self) -> None:
        """The stats thread: this replica's stats to the stats actor every STATS_INTERVAL seconds."""
        import ray

        actor = None
        while not self._stopping.wait(STATS_INTERVAL):
            try:
                if actor is None:
                    actor = stats_actor(self.app_name, create=True)
                ray.get(actor.report.remote(self.replica_id, self.stats()), timeout=5)
            except Exception:  # the actor's replica went away: make (or find) a new one next time
                actor = None
        if actor is not None:
            with contextlib.suppress(Exception):
                actor.forget.remote(self.replica_id)

    # ----- HTTP (Serve's ingress) -----

    async def __call__(self, request):
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

            async def lines():
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
        images = await asyncio.to_thread(lambda: [_encode_png(im) for im in result.images])
        self._count("completed", len(images))
        return {
            "ok": True,
            "images": images,
            "seeds": list(result.seeds),
            "revised_prompt": result.revised_prompt,
            "steps_run": result.steps_run,
            "batch_size": result.batch_size,
            "seconds": result.seconds,
            "replica": self.replica_id,
            "queue_depth": self.engine.queue_depth,
        }


def _json_reply(reply: dict):
    from starlette.responses import JSONResponse

    status, headers = 200, {}
    if not reply.get("ok"):
        error = reply.get("error") or {}
        status = HTTP_STATUS.get(error.get("type"), 500)
        if error.get("retry_after") is not None:
            headers["Retry-After"] = str(max(1, round(error["retry_after"])))
    return JSONResponse(wire_to_json(reply), status_code=status, headers=headers)


# ----- Serve ----------------------------------------------------------------------------------------

_deployment = None


def engine_deployment():
    """EngineReplica as a Serve deployment (imports ray)."""
    global _deployment
    if _deployment is None:
        from ray import serve

        _deployment = serve.deployment(name=DEPLOYMENT_NAME)(EngineReplica)
    return _deployment


def build_app(args: dict | None = None):
    """The Serve application of a pool (Serve's application builder: `import_path: ...:build_app`)."""
    args = dict(args or {})
    options = deployment_options(args)
    return engine_deployment().options(**options).bind(args.get("engine") or {})


def __getattr__(name: str):
    # `serve run local_backend.ray_app:app`: the tiny model, one CPU replica. Built on first use, so
    # importing this module does not import ray.
    if name == "app":
        return build_app({})
    if name == "EngineDeployment":
        return engine_deployment()
    raise AttributeError(name)
