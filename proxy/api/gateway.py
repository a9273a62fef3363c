"""The Gateway: what the proxy owns (providers, router, store, state, passthrough, metrics) and its lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from ..config import Config
from ..errors import ProxyError, Scrubber
from ..jobs.runner import JobRunner
from ..media.fetch import FetchPolicy, GuardedFetcher
from ..media.output import OutputSettings
from ..providers import Provider, ProviderContext, build_providers
from ..request import QUALITIES
from ..routing.inflight import InFlight
from ..routing.policy import KeyPolicy
from ..routing.router import Router, hands_on
from ..state.factory import make_state, make_store
from ..state.idempotency import Idempotency
from ..telemetry import otel
from ..telemetry.metrics import Metrics
from ..usage.service import Usage
from .passthrough import Passthrough

log = logging.getLogger("proxy")


class Gateway:
    """Everything the proxy owns: providers, router, store, state, passthrough, metrics; started and closed
    together. The handlers (proxy/api/) work with it; proxy/app.py routes requests to them."""

    def __init__(self, config: Config, providers: dict[str, Provider] | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        # OpenTelemetry spans when telemetry (or OTEL_EXPORTER_OTLP_ENDPOINT) is set; None: off, free.
        self.tracing = otel.configure(config.telemetry)
        self.providers = providers if providers is not None else build_providers(config)
        # Strings that come back from upstreams reach clients and logs only through this.
        self.scrubber = Scrubber(config.secrets())
        self.router = Router(config.models, self.providers, self.metrics, routing=config.routing,
                             max_load_wait=config.server.max_load_wait, scrub=self.scrubber.text)
        self.size_tables = {name: config.size_table(name) for name in config.models}
        # What each model's routes can honour (generations.check_choices): the values of `quality` (OpenAI's,
        # and its local routes' quality_tiers), and whether any route may make a transparent background.
        # (None: a route hands `quality` on to an upstream as sent, which judges the value itself.)
        self.qualities: dict[str, frozenset[str] | None] = {
            name: None if any(hands_on(r, "quality") for r in routes)
            else QUALITIES.union(*(r.provider.qualities for r in routes))
            for name, routes in self.router.routes.items()}
        self.transparent_models = {name for name, routes in self.router.routes.items()
                                   if any(hands_on(r, "background") for r in routes)}
        # Pillow's own bomb guard as a backstop at the largest limit the checks ever apply.
        limits = [t.pixel_limit for t in self.size_tables.values()] or [0]
        Image.MAX_IMAGE_PIXELS = max(OutputSettings.max_image_pixels, 4 * max(limits))
        self.store = make_store(config.store)
        # Idempotency records and shared counters: in memory, or in Redis with state.redis_url.
        self.state = make_state(config)
        self.idempotency = Idempotency.from_config(self.state, config)
        self.output = OutputSettings(
            rehost_upstream_urls=config.store.rehost_upstream_urls,
            fetch_policy=FetchPolicy(max_bytes=int(config.store.max_download_mb * 1024 * 1024),
                                     allowed_hosts=frozenset(config.fetch.upstream_image_hosts),
                                     allowed_networks=tuple(config.fetch.allowed_networks),
                                     allow_http=config.fetch.allow_http),
        )
        # Edit inputs named by URL: only from hosts the operator listed (data: URLs need no fetch).
        self.input_fetch_policy = FetchPolicy(
            max_bytes=int(config.server.max_body_mb * 1024 * 1024),
            allowed_hosts=frozenset(config.fetch.input_image_hosts),
            allowed_networks=tuple(config.fetch.allowed_networks), allow_http=config.fetch.allow_http,
        ) if config.fetch.input_image_hosts else None
        # Every URL the proxy fetches on data it did not choose goes through this one (SSRF rules).
        self.fetcher = GuardedFetcher(trace_configs=[self.tracing.client_trace_config()] if self.tracing else None)
        self.passthrough = (Passthrough(config.passthrough, max_body_bytes=int(config.server.max_body_mb * 1024 * 1024),
                                        scrub=self.scrubber.text, send_timeout=config.server.send_timeout)
                            if config.passthrough.enabled else None)
        # Mounted in another app (image_proxy_middleware): calls for other models go on to its handlers,
        # and the admin endpoints are served only under admin_prefix (None: not at all).
        self.mounted = False
        self.admin_prefix: str | None = ""
        self.default_model = config.server.default_model or next(iter(config.models), None)
        self._keys = [k.value.encode() for k in config.server.keys]
        self.json_logs = config.server.log_format == "json"
        # Who may call what: key names, per-key models and limits, the /metrics key.
        # Per-key rpm and concurrency: counted in Redis when state.redis_url is set, else in this process.
        self.policy = KeyPolicy(config.server, self.metrics, limits=self.state.limits)
        # The usage ledger, budgets and the seeded-request cache.
        self.usage = Usage(config, self.metrics, self.state, self.store, self.router, scrub=self.scrubber.text)
        self.http: aiohttp.ClientSession | None = None
        # Background jobs (proxy/api/jobs.py attaches the runner): the job store opens on the first job
        # call, or at start when it may hold jobs from before.
        self.jobs: JobRunner | None = None
        self._jobs_started = False
        self._jobs_lock = asyncio.Lock()
        self.keepalive_seconds = 15.0
        # SIGTERM: /ready turns 503, new image calls get 503, in-flight ones get shutdown_grace to finish.
        self.draining = False
        self.inflight = InFlight()
        self._started = False
        self._start_lock = asyncio.Lock()

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

    @property
    def started(self) -> bool:
        return self._started

    @property
    def busy(self) -> bool:
        """Whether image requests are being routed now (upstream calls, checks, conversions)."""
        return bool(self.inflight)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            # No cookie jar: a cookie one upstream answer sets must not ride along on other clients' calls.
            # No cap on connections (aiohttp's default is 100 at once): past it, slow generations would
            # wait in the client for a connection, on their own timeout. Keys' concurrency limits apply.
            self.http = aiohttp.ClientSession(headers={"User-Agent": "qwen-image-proxy"},
                                              cookie_jar=aiohttp.DummyCookieJar(),
                                              connector=aiohttp.TCPConnector(limit=0),
                                              trace_configs=[self.tracing.client_trace_config()] if self.tracing else None)
            await self.store.start()
            await self.state.start()
            await self.usage.start()
            if self.passthrough:
                await self.passthrough.start()
            ctx = ProviderContext(http=self.http, extras={"metrics": self.metrics})
            for provider in self.providers.values():
                await provider.start(ctx)
            if self.jobs is not None and (self.config.state.redis_url or Path(self.config.jobs.path).exists()):
                try:  # jobs queued, or interrupted, before this start
                    await self.start_jobs()
                except ProxyError as e:
                    log.warning("background jobs are not running: %s", e.message)
            for name in self.config.models:
                if not self.router.usable(name):
                    # One still loading serves in a moment (the tiny ones in a second): not a warning.
                    loading = any(r.provider.state == "loading" for r in self.router.routes[name])
                    log.log(logging.INFO if loading else logging.WARNING, "model %s has no usable route yet: %s",
                            name, self.router.why_unusable(name))
                    continue
                # A route skipped for good (no key, no GPU) while another serves: said once, or a key set
                # under the wrong name would leave the fallback answering in silence. Loading ones join later.
                for route in self.router.routes[name]:
                    if route.provider.unavailable_reason is not None and route.provider.state != "loading":
                        log.warning("model %s: route '%s' skipped, the model's other routes serve: %s",
                                    name, route.name, route.provider.unavailable_reason)
            self._started = True

    def _job_runner(self) -> JobRunner:
        if self.jobs is None:
            raise RuntimeError("background jobs are not set up (jobs.enabled is off)")
        return self.jobs

    async def start_jobs(self) -> None:
        """Open the job store and start running jobs (once; a store that fails to open is tried again
        by the next call, which meanwhile answer 503 job_store_unavailable)."""
        async with self._jobs_lock:
            if not self._jobs_started:
                await self._job_runner().start()
                self._jobs_started = True

    async def drain(self) -> None:
        """Graceful shutdown: let in-flight image requests finish within shutdown_grace, then end the rest
        with a clear 503 (or a stream error event) rather than a dropped connection. Background jobs get
        the same grace; those still running then, and the queued ones, wait for the next start."""
        self.draining = True
        grace = self.config.server.shutdown_grace
        await asyncio.gather(self.inflight.drain(grace), *([self._job_runner().drain(grace)] if self._jobs_started else []))
        # The handlers answer their clients on the next turns of the loop; aiohttp waits for them.
        await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.inflight.close()
        if not self._started:
            return
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.close()
        if self.passthrough:
            await self.passthrough.close()
        await self.usage.close()  # writes the ledger's queue
        if self._jobs_started:
            self._jobs_started = False
            await self._job_runner().close()
        await self.store.close()
        await self.state.close()
        await self.fetcher.close()
        if self.http is not None:
            await self.http.close()
        if self.tracing is not None:  # the spans still batched go out now
            await asyncio.to_thread(self.tracing.shutdown)
        self._started = False

    def run_work(self, request: web.Request, coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
        """Route a request in its own task, stopped if its client hangs up or the shutdown grace ends (await
        what this returns). Whether the caller's key may use the model was checked when the request was
        parsed (generations.served_model: a 403 before any work, or any stream, starts)."""
        return self.inflight.run(request, coro)
