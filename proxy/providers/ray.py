"""The `ray` kind: a pool of local engines on a Ray cluster, one replica per GPU (local_backend.ray_app).

The pool is a Ray Serve application (deployed by `qwen-image-proxy ray-serve`, `serve run` or KubeRay).
The proxy reaches it one of two ways:

- `handle`: the proxy process joins the cluster as a driver (`ray.init(address=...)`) and calls the
  application through a Serve handle: Ray's own transport, streaming and cancellation;
- `http`: Serve's HTTP ingress (`http_url`), for a proxy outside the cluster (no ray needed here).

`transport: auto` (the default) takes the handle when `ray` is installed and the cluster answers, else
the HTTP ingress when `http_url` is set. Either way a request is the local route's request
(proxy.providers.local_convert.to_params, then local_backend.ray_wire.params_to_wire): every field,
LoRAs, edits, seeds (image i gets seed + i), partial images; the replica answers PNG images, which the
proxy converts like any route's. Cancelling the call (deadline, client gone) cancels the replica's
job; a full engine queue is a 429 with Retry-After; a replica that dies with the request is a
retryable failure, so the router tries again and Serve picks a live replica.

Pool options (engine, num_replicas, min/max_replicas, ...) are local_backend.ray_options.POOL_OPTIONS:
this provider checks them and `ray-serve` deploys them; they must match what was deployed.

This module holds the provider: its options, the pool's status and replica stats, and the request's
way through; ray_transport reaches the pool (the connection, one call over either transport) and
ray_convert holds the pure conversions (the request -> the replica's wire dict, what comes back -> images
or errors).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp

from local_backend.ray_app import DEPLOYMENT_NAME, stats_actor
from local_backend.ray_options import (
    DEFAULT_APP_NAME,
    POOL_OPTIONS,
    deployment_options,
    engine_config,
)

from ..config import RouteConfig
from ..errors import UpstreamError
from ..media.partials import PartialImage, threadsafe_emitter
from ..media.progress import step_reporter
from ..request import ImageRequest
from ..telemetry import tracing
from . import enhance
from .base import (
    SMALL_ANSWER,
    Capabilities,
    GeneratedImage,
    Provider,
    ProviderContext,
    answer_limit,
    read_answer,
    started,
)
from .local_convert import advertised_accelerations, advertised_tiers, generates, model_abilities
from .ray_convert import images_from_reply, reencode, to_wire, unb64
from .ray_transport import OnPartial, app_status, call_handle, call_http, connect, disconnect

log = logging.getLogger(__name__)

# The options that belong to the proxy's side; the rest describe the pool (ray_options.POOL_OPTIONS).
CLIENT_OPTIONS = ("address", "app_name", "http_url", "route_prefix", "transport", "timeout", "retries",
                  "status_interval")
# Seconds one status probe may take before the proxy stops waiting for it.
_PROBE_TIMEOUT = 5.0


class RayProvider(Provider):
    kind = "ray"
    options_schema = {
        # where the pool is
        "address": str,  # ray.init address: "auto" (a node of the cluster), "ray://head:10001", "head:6379"
        "app_name": str,  # the Serve application's name (default qwen-image)
        "http_url": str | None,  # Serve's HTTP ingress, e.g. http://head:8000 (the transport outside the cluster)
        "route_prefix": str | None,  # the application's HTTP route (default /<app_name>)
        "transport": ("auto", "handle", "http"),
        "timeout": (float, {"gt": 0}),
        "retries": (int, {"ge": 0, "le": 10}),
        "status_interval": (float, {"gt": 0}),  # seconds between pool status polls (default 5)
        # the pool itself (local_backend.ray_options.POOL_OPTIONS): what `ray-serve` deploys
        "engine": dict,
        "num_replicas": (int, {"ge": 1}),
        "min_replicas": (int, {"ge": 0}),
        "max_replicas": (int, {"ge": 1}),
        "target_ongoing_requests": (float, {"gt": 0}),
        "upscale_delay_s": (float, {"ge": 0}),
        "downscale_delay_s": (float, {"ge": 0}),
        "max_ongoing_requests": (int, {"ge": 1}),
        "max_queued_requests": (int, {"ge": -1}),
        "ray_actor_options": dict,
        "graceful_shutdown_timeout_s": (float, {"ge": 0}),
    }

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)

        # Strict: a pool that could not be deployed is a config error, not a route that never works.
        self.pool_options = {k: v for k, v in options.items() if k in POOL_OPTIONS and v is not None}
        self.deployment = deployment_options(self.pool_options)
        self.engine_config = engine_config(self.pool_options.get("engine"))
        self.app_name = options.get("app_name") or DEFAULT_APP_NAME
        self.address = options.get("address") or "auto"
        self.route_prefix = options.get("route_prefix") or f"/{self.app_name}"
        self.http_url = (options.get("http_url") or "").rstrip("/") or None
        self.transport_option = options.get("transport") or "auto"
        if self.transport_option == "http" and not self.http_url:
            raise ValueError("transport: http needs http_url (Serve's HTTP ingress, e.g. http://head:8000)")
        if not self.route_prefix.startswith("/"):
            raise ValueError("route_prefix must start with /")
        self.status_interval = float(options.get("status_interval") or 5.0)
        # A Qwen-Image-2.1 pool edits without masks; known when the model is readable here (or tiny-2.1).
        edits, masks = model_abilities(self.engine_config)
        self.capabilities = Capabilities(
            max_images_per_call=self.engine_config.max_batch, output_formats=frozenset({"png"}),
            output_compression=False, edits=edits, masks=masks, generates=generates(self.engine_config),
        )
        # What /v1/models lists (and the playground offers): the same as an in-process engine of these options.
        self.tiers: list[dict] | None = advertised_tiers(self.engine_config)
        self.accelerations: list[str] | None = advertised_accelerations(self.engine_config)
        self.transport: str | None = None  # handle | http, once connected
        self._handle: Any = None  # a ray.serve DeploymentHandle, once connected
        self._http: aiohttp.ClientSession | None = None
        self._state: str | None = "not started"
        self._stage: str | None = None  # while connecting or while the pool starts
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.app_status: str | None = None
        self.replica_states: dict[str, int] = {}
        self.replicas: dict[str, dict] = {}  # replica id -> its last stats (+ "served" by this proxy)
        self._stats_actor: Any = None  # the pool's stats actor (a ray ActorHandle)
        # prompt_enhancement with: chat is done here, before the pool is called (proxy.providers.enhance); the
        # replicas get no rewriter then (local_backend.ray_options.pool_enhancement). with: text_encoder: theirs.
        self.chat_enhancer: enhance.ChatEnhancer | None = None
        chat = enhance.parse_options((self.pool_options.get("engine") or {}).get("prompt_enhancement"))
        if chat is not None and chat.with_ == "chat":
            self.chat_enhancer = enhance.ChatEnhancer(chat, name, self.engine_config.task)

    # ----- state -----

    @property
    def qualities(self) -> frozenset[str]:
        return frozenset(self.engine_config.quality_tiers)

    @property
    def unavailable_reason(self) -> str | None:
        return self._stage or self._state

    @property
    def loading_stage(self) -> str | None:
        return self._stage

    @property
    def default_timeout(self) -> float:
        return float(self.options.get("timeout", 1800))

    @property
    def trusted_origin(self) -> str | None:
        return None  # the pool answers bytes, never URLs

    @property
    def running_replicas(self) -> int:
        return self.replica_states.get("RUNNING", 0)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting in the pool's engines (the replicas' last reports)."""
        return sum(int(r.get("queue_depth") or 0) for r in self.replicas.values())

    @property
    def replica_queue_depths(self) -> dict[str, int]:
        return {rid: int(r.get("queue_depth") or 0) for rid, r in self.replicas.items()}

    @property
    def warnings(self) -> list[str]:
        """Speed options the pool's replicas serve without, with the reason (each replica's Engine.warnings,
        as its last stats report had them; the same option on several replicas is listed once)."""
        found = (w for r in self.replicas.values() for w in r.get("warnings", ()))
        return list(dict.fromkeys(found))

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            transport=self.transport, app=self.app_name, app_status=self.app_status,
            replicas=dict(self.replica_states), queue_depth=self.queue_depth,
            replica_stats={rid: {k: v for k, v in r.items() if k not in ("seen", "warnings")}
                           for rid, r in self.replicas.items()},
        )
        return info

    def preflight(self) -> str | None:
        if self.transport_option == "http":
            return None
        try:
            import ray  # noqa: F401
        except ImportError:
            if self.transport_option == "handle" or not self.http_url:
                return "ray is not installed (pip install '.[ray]'), and no http_url is set"
        return None

    async def wait_ready(self, timeout: float) -> bool:
        if self._stage is not None and timeout > 0:
            try:
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
            except TimeoutError:
                pass
        return self.unavailable_reason is None

    # ----- lifecycle -----

    async def start(self, ctx: ProviderContext) -> None:
        self._http = ctx.http
        self._stage = f"connecting to the Ray pool '{self.app_name}'"
        self._state = None
        self._task = asyncio.create_task(self._watch(), name=f"ray-pool-{self.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.transport == "handle":
            await asyncio.to_thread(disconnect, self.name)
        self._handle = None
        self._state, self._stage = "closed", None

    async def _watch(self) -> None:
        """Connect, then poll the pool's status and replica stats every status_interval seconds."""
        while self.transport is None:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # shown as the reason; tried again
                self._set(None, f"cannot reach the Ray pool: {type(e).__name__}: {str(e)[:300]}")
            if self.transport is None:
                await asyncio.sleep(self.status_interval)
        while True:
            try:
                await self._poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("provider %s: status poll failed: %s: %s", self.name, type(e).__name__, e)
                self._set(None, f"the Ray pool does not answer: {type(e).__name__}")
            await asyncio.sleep(self.status_interval)

    def _set(self, stage: str | None, state: str | None) -> None:
        self._stage, self._state = stage, state
        if stage is None:
            self._ready.set()  # wake waiters: ready, or failed for a reason they should see
        else:
            self._ready.clear()

    async def _connect(self) -> None:
        want_handle = self.transport_option in ("auto", "handle")
        if want_handle:
            try:
                self._stage = f"connecting to the Ray cluster at {self.address}"
                await asyncio.to_thread(connect, self.address, self.name)
                self.transport = "handle"
            except ImportError:
                if self.transport_option == "handle" or not self.http_url:
                    self._set(None, "ray is not installed (pip install '.[ray]'), and no http_url is set")
                    return
            except Exception as e:
                if self.transport_option == "handle" or not self.http_url:
                    raise
                log.info("provider %s: no Ray cluster at %s (%s); using the HTTP ingress", self.name,
                         self.address, type(e).__name__)
        if self.transport is None:
            self.transport = "http"
        log.info("provider %s: Ray pool '%s' over %s", self.name, self.app_name, self.transport)
        await self._poll()

    async def _poll(self) -> None:
        if self.transport == "handle":
            await self._poll_handle()
        else:
            await self._poll_http()

    async def _poll_handle(self) -> None:
        from ray import serve


        status, states, message = await asyncio.to_thread(app_status, self.app_name, DEPLOYMENT_NAME)
        self.app_status, self.replica_states = status, states
        if status is None:
            self._handle = None
            self._set(None, f"the Ray Serve application '{self.app_name}' is not deployed "
                            "(qwen-image-proxy ray-serve --config <models.yaml> deploys it)")
            return
        if self._handle is None:
            self._handle = await asyncio.to_thread(serve.get_app_handle, self.app_name)
        running = self.running_replicas
        if running or status == "RUNNING":  # RUNNING with 0 replicas: scaled to zero, Serve starts one
            self._set(None, None)
        elif status in ("DEPLOYING", "NOT_STARTED"):
            total = sum(states.values())
            self._set(f"the Ray pool is starting ({running} of {total} replicas running)", None)
        else:
            self._set(None, f"the Ray pool is {status.lower()}{': ' + message[:300] if message else ''}")
        try:
            self._update(await self._read_stats())
        except Exception as e:  # the replicas make it within a second of starting; the last view stays
            log.debug("provider %s: no pool stats yet (%s)", self.name, type(e).__name__)

    async def _read_stats(self) -> dict:
        if self._stats_actor is None:
            self._stats_actor = await asyncio.to_thread(stats_actor, self.app_name)
        try:
            async with asyncio.timeout(_PROBE_TIMEOUT):
                return await self._stats_actor.snapshot.remote()
        except BaseException:
            self._stats_actor = None  # gone with its replica: look it up again next time
            raise

    async def _poll_http(self) -> None:
        url = f"{self.http_url}{self.route_prefix}/stats"
        try:
            async with started(self._http).get(url, timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT),
                                      allow_redirects=False) as resp:
                if resp.status == 404:
                    self._set(None, f"the Ray pool's HTTP ingress has no application at {self.route_prefix}")
                    return
                body = json.loads(await read_answer(resp, SMALL_ANSWER)) if resp.status == 200 else None
        except (aiohttp.ClientConnectionError, OSError) as e:
            self._set(None, f"the Ray pool's HTTP ingress at {self.http_url} does not answer ({type(e).__name__})")
            return
        except (TimeoutError, aiohttp.ClientError, ValueError, UpstreamError):
            body = None  # busy (the call waits for a free replica like any request): still there
        if isinstance(body, dict) and isinstance(body.get("replicas"), dict):
            self._update(body["replicas"])
            self.replica_states = {"RUNNING": len(self.replicas)}
            self.app_status = "RUNNING"
        self._set(None, None)

    def _update(self, snapshot: dict) -> None:
        """The pool's replicas as the stats actor has them: the others are gone, unless one answered a
        request lately (a new replica answers before its first stats report reaches the actor)."""
        for stats in snapshot.values():
            if isinstance(stats, dict) and stats.get("replica"):
                self._remember(stats)
        recent = time.monotonic() - max(2 * self.status_interval, 10.0)
        self.replicas = {rid: r for rid, r in self.replicas.items()
                         if rid in snapshot or r.get("seen", 0.0) > recent}

    def _remember(self, stats: dict, served: int = 0) -> None:
        rid = str(stats["replica"])
        entry = self.replicas.setdefault(rid, {"served": 0})
        entry.update({k: v for k, v in stats.items() if k != "replica" and isinstance(v, (int, float, str))})
        if isinstance(stats.get("warnings"), list):
            entry["warnings"] = [str(w)[:500] for w in stats["warnings"][:20]]
        entry["served"] += served
        entry["seen"] = time.monotonic()

    # ----- generating -----

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        if self.transport is None or (self.transport == "handle" and self._handle is None):
            raise UpstreamError(f"the Ray pool is not connected ({self.unavailable_reason})")
        emit = threadsafe_emitter() if req.partial_images else None
        fmt = req.output_format or "png"
        wire = to_wire(req, self.engine_config, route.timeout or self.default_timeout,
                       partials=emit is not None)
        revised = await self._chat_rewrite(req, wire)

        on_partial: OnPartial | None = None
        if emit is not None:
            send = emit

            async def relay(p: dict) -> None:
                data = unb64(p["data"])
                if fmt != "png":  # the replica sends PNG: re-encode in the request's format
                    data = await asyncio.to_thread(reencode, data, fmt, req.output_compression)
                send(PartialImage(image_index=req.first_index + int(p["image_index"]),
                                  partial_index=int(p["partial_index"]), data=data, format=fmt))

            on_partial = relay

        with tracing.span("pool.call", {"qip.provider": self.name, "qip.transport": self.transport}) as span:
            if (parent := tracing.traceparent()) is not None:  # the replica's spans join this trace
                wire["traceparent"] = parent
            report = step_reporter()  # a background job's progress: the replica streams its steps
            if self.transport == "handle":
                reply = await call_handle(self._handle, wire, on_partial, self.name, report)
            else:
                reply = await call_http(started(self._http), f"{self.http_url}{self.route_prefix}", wire,
                                        on_partial, answer_limit(req), report)
            span.set_attribute("qip.replica", str(reply.get("replica")))
        return self._images(reply, req, revised)

    async def _chat_rewrite(self, req: ImageRequest, wire: dict) -> str | None:
        """With prompt_enhancement `with: chat`: the rewritten prompt (already put into the wire), or None."""
        if self.chat_enhancer is None:
            return None
        wire.pop("prompt_enhancement", None)  # the replicas have no rewriter of their own here
        if not self.chat_enhancer.enabled(enhance.requested(req.prompt_enhancement)):
            return None
        revised = await self.chat_enhancer.rewrite(started(self._http), req.prompt)
        if revised is not None:
            wire["prompt"] = revised
        return revised

    def _images(self, reply: dict, req: ImageRequest, revised: str | None = None) -> list[GeneratedImage]:
        """The reply's images; a replica's reply, ok or not, also updates what this proxy knows of it."""
        if isinstance(reply, dict) and reply.get("replica"):
            self._remember({"replica": reply["replica"], "queue_depth": reply.get("queue_depth", 0)},
                           served=1 if reply.get("ok") else 0)
        return images_from_reply(reply, req, revised)
