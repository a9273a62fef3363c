"""A Ray pool's options -> its EngineConfig and Serve's deployment options: pure functions, no ray.

The proxy checks a `kind: ray` provider's options with these before anything is deployed, and
local_backend.ray_app builds its Serve application from them.

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
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from . import accel_options, enhance
from .config import EngineConfig, plain_options
from .errors import EngineError
from .loading import validate_config
from .tiers import parse_tiers

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


def engine_config(options: dict | None) -> EngineConfig:
    """A pool's `engine` options -> EngineConfig; unknown keys are a ValueError that names them."""
    options = dict(options or {})
    known = {f.name for f in fields(EngineConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown engine option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")

    options = plain_options(options)
    if "prompt_enhancement" in options:
        options["prompt_enhancement"] = pool_enhancement(options["prompt_enhancement"])
    config = EngineConfig(**options)
    _check(config)
    return config


def pool_enhancement(value: object) -> Any:
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
    return (config.device or "").startswith("cpu") or (config.device is None and config.model in ("tiny", "tiny-edit", "tiny-2.1"))


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
