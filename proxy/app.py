"""build_app(config) and the mountable middleware: dispatch, auth, errors, request log, draining."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from PIL import Image

from .api import admin, edits, generations, playground, usage
from .config import Config
from .errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    Scrubber,
    ShuttingDown,
)
from .fetch import FetchPolicy, GuardedFetcher
from .idempotency import Idempotency
from .inflight import InFlight
from .metrics import Metrics
from .output import OutputSettings
from .passthrough import Passthrough
from .policy import API_KEY, KeyPolicy
from .providers import Provider, ProviderContext, build_providers
from .request_log import log_request, outcome_of
from .router import Router
from .state import make_state
from .store import make_store
from .usage.service import Usage

log = logging.getLogger("proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("qip_request_id", str)
MODEL = web.RequestKey("qip_model", str)
# The raw body once read, so a request for a model served elsewhere can still be passed on.
BODY = web.RequestKey("qip_body", bytes)
# The RouteResult of a served image request (route name and attempts for headers and the log).
ROUTE = web.RequestKey("qip_route", object)
# Set when an image call was passed on (passthrough) rather than served here.
PASSED_ON = web.RequestKey("qip_passed_on", bool)
# The error a stream ended with (its HTTP status was 200 before it was known).
STREAM_ERROR = web.RequestKey("qip_stream_error", ProxyError)
# The usage meter of an image request (proxy/usage/): its calls and costs, recorded when it ends.
METER = web.RequestKey("qip_usage_meter", object)
# Paths that carry no key: probes, scrapers and browsers following image links.
OPEN_PATHS = ("/health", "/ready", "/metrics")
ADMIN_PATHS = ("/health", "/ready", "/metrics", "/v1/models", *usage.PATHS)


class NotServedHere(Exception):
    """An image call for a model this proxy does not serve: the next handler (or passthrough) gets it."""


class Gateway:
    """Everything the proxy owns: providers, router, store, passthrough, metrics and the handlers."""

    def __init__(self, config: Config, providers: dict[str, Provider] | None = None):
        self.config = config
        self.metrics = Metrics()
        self.providers = providers if providers is not None else build_providers(config)
        # Strings that come back from upstreams reach clients and logs only through this.
        self.scrubber = Scrubber(config.secrets())
        self.router = Router(config.models, self.providers, self.metrics, routing=config.routing,
                             max_load_wait=config.server.max_load_wait, scrub=self.scrubber.text)
        self.size_tables = {name: config.size_table(name) for name in config.models}
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
        self.fetcher = GuardedFetcher()
        self.passthrough = (Passthrough(config.passthrough, max_body_bytes=int(config.server.max_body_mb * 1024 * 1024),
                                        scrub=self.scrubber.text, send_timeout=config.server.send_timeout)
                            if config.passthrough.enabled else None)
        # Mounted in another app (image_proxy_middleware): calls for other models go on to its handlers,
        # and the admin endpoints are served only under admin_prefix (None: not at all).
        self.mounted = False
        self.admin_prefix: str | None = ""
        self.default_model = config.server.default_model or next(iter(config.models), None)
        self._keys = [k.encode() for k in config.server.api_keys]
        # Who may call what: key names, per-key models and limits, the /metrics key.
        # Per-key rpm and concurrency: counted in Redis when state.redis_url is set, else in this process.
        self.policy = KeyPolicy(config.server, self.metrics, limits=self.state.limits)
        self.http: aiohttp.ClientSession | None = None
        self.keepalive_seconds = 15.0
        # SIGTERM: /ready turns 503, new image calls get 503, in-flight ones get shutdown_grace to finish.
        self.draining = False
        self.inflight = InFlight()
        # The usage ledger, budgets and the seeded-request cache.
        self.usage = Usage(config, self.metrics, self.state, self.store, self.router, scrub=self.scrubber.text)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": partial(admin.health, self)},
            "/ready": {"GET": partial(admin.ready, self)},
            "/metrics": {"GET": partial(admin.metrics, self)},
            "/v1/models": {"GET": partial(admin.list_models, self)},
            "/v1/images/generations": {"POST": partial(generations.generations, self)},
            "/v1/images/edits": {"POST": partial(edits.edits, self)},
            **{path: {"GET": partial(handler, self)} for path, handler in usage.PATHS.items()},
        }

    @property
    def has_keys(self) -> bool:
        return bool(self._keys)

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
                                              connector=aiohttp.TCPConnector(limit=0))
            await self.store.start()
            await self.state.start()
            await self.usage.start()
            if self.passthrough:
                await self.passthrough.start()
            ctx = ProviderContext(http=self.http, extras={"metrics": self.metrics})
            for provider in self.providers.values():
                await provider.start(ctx)
            for name in self.config.models:
                if not self.router.usable(name):
                    log.warning("model %s has no usable route yet: %s", name, self.router.why_unusable(name))
            self._started = True

    async def drain(self) -> None:
        """Graceful shutdown: let in-flight image requests finish within shutdown_grace, then end the rest
        with a clear 503 (or a stream error event) rather than a dropped connection."""
        self.draining = True
        await self.inflight.drain(self.config.server.shutdown_grace)
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
        await self.usage.close()  # flushes the ledger's queue
        await self.store.close()
        await self.state.close()
        await self.fetcher.close()
        await self.http.close()
        self._started = False

    async def run_work(self, request: web.Request, coro: Coroutine[Any, Any, Any]) -> Any:
        """Route a request in its own task, stopped if its client hangs up or the shutdown grace ends."""
        try:  # the model is known now: may this key use it? (403)
            self.policy.check_model(request.get(API_KEY), request.get(MODEL))
        except ProxyError:
            coro.close()
            raise
        return await self.inflight.run(request, coro)

    # ---- dispatch ---------------------------------------------------------------------------------

    def match(self, request: web.Request) -> Handler | None:
        """The handler for a request this gateway answers itself; None for anything else."""
        path = request.path
        if not self.mounted and playground.serves(path):
            methods = {"GET": playground.handle, "HEAD": playground.handle}
        elif path.startswith("/images/"):
            methods = {"GET": partial(admin.image_file, self), "HEAD": partial(admin.image_file, self)}
        elif path.startswith("/v1/images/"):
            methods = self._routes.get(path)
        else:
            if self.admin_prefix is None or not path.startswith(self.admin_prefix):
                return None
            path = path[len(self.admin_prefix):]
            if path.startswith("/v1/models/"):
                methods = {"GET": partial(admin.get_model, self)}
            else:
                methods = self._routes.get(path) if path in ADMIN_PATHS else None
        if methods is None:
            return None
        if request.method not in methods:
            allowed = ", ".join(methods)
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}.",
                                   headers={"Allow": allowed})
        return methods[request.method]

    def middleware(self, fallback: Handler | None = None):
        """The aiohttp middleware: answers image calls for our models, hands the rest on.

        `fallback`, when given, replaces the next handler for what this gateway does not serve
        (the standalone app uses it for passthrough); mounted in another app it is None.
        """

        @web.middleware
        async def qwen_image_proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
            request_id = request.headers.get("X-Request-Id") or secrets.token_hex(16)
            request[REQUEST_ID] = request_id
            try:
                target = self.match(request)
            except ProxyError as e:
                return _with_id(e.to_response(), request_id)
            if target is None:
                return await (fallback or handler)(request)
            if not self._started:
                await self.start()
            started = time.monotonic()
            outcome = "ok"
            if request.path.startswith("/v1/images/"):
                request[METER] = self.usage.open()
            if fallback is not None:  # a model served elsewhere is passed on under the same limits
                target = _or_passed_on(target, fallback)
            try:
                # The key (401), and image calls held to its limits while they run (429).
                target = await self.authenticate(request, target)
                if self.draining and request.path.startswith("/v1/images/"):
                    raise ShuttingDown("The server is shutting down; retry on another instance.", retry_after=1)
                response = await target(request)
                if PASSED_ON in request:  # logged and counted as passthrough
                    return response
            except NotServedHere:  # mounted: the host app's own handlers answer
                return await handler(request)
            except asyncio.CancelledError:
                self._log_request(request, 499, started, "cancelled")
                raise
            except ProxyError as e:
                response, outcome = self.scrubber.error(e).to_response(), outcome_of(e)
            except web.HTTPException as e:
                error = _from_http_exception(e)
                response, outcome = error.to_response(), outcome_of(error)
            except Exception:
                log.exception("request %s failed", request_id)
                response = ProxyError(f"The proxy failed to handle the request (request id {request_id}).",
                                      code="internal_error").to_response()
                outcome = "error"
            if STREAM_ERROR in request:
                outcome = outcome_of(request[STREAM_ERROR])
            # aiohttp keeps a keep-alive connection's last request (and response) until the next request
            # arrives on it: let go of the megabytes they would hold meanwhile (its body, the images).
            result = request.pop(ROUTE, None)
            request.pop(BODY, None)
            # The log line and the counters run once the answer is on its way: they need not delay it.
            asyncio.get_running_loop().call_soon(self._log_request, request, response.status, started, outcome,
                                                 result)
            return _with_id(response, request_id)

        return qwen_image_proxy

    def _log_request(self, request: web.Request, status: int, started: float, outcome: str,
                     result: Any = None) -> None:
        meter = request.pop(METER, None)
        # Not for calls passed on, nor for ones without a valid key (a stream of bad keys fills no ledger).
        if meter is not None and PASSED_ON not in request and (API_KEY in request or not self.policy.enabled):
            self.usage.finish(meter, request_id=request[REQUEST_ID], key=request.get(API_KEY),
                              model=request.get(MODEL, ""), path=request.path, status=status, outcome=outcome,
                              seconds=time.monotonic() - started)
        log_request(self.metrics, path=request.path, request_id=request[REQUEST_ID], model=request.get(MODEL, ""),
                    key=request.get(API_KEY), status=status, seconds=time.monotonic() - started, outcome=outcome,
                    result=result)

    async def authenticate(self, request: web.Request, handler: Handler | None = None) -> Handler | None:
        """The caller's key (401 without a valid one; see proxy/policy.py), kept as request[API_KEY].

        An image call gets `handler` back wrapped to run under the key's limits (rpm and concurrency,
        429 past them), holding its slot until it ends; any other call counts against the key's rpm
        alone. Probes and image links carry no key; /metrics needs server.metrics_key when one is set.
        """
        prefix = self.admin_prefix or ""
        if request.path == f"{prefix}/metrics":
            self.policy.check_metrics_key(request.headers.get("Authorization"))
            return handler
        if (request.path.startswith(("/images/", *(f"{prefix}{p}" for p in OPEN_PATHS)))
                or (not self.mounted and playground.serves(request.path))):
            return handler  # the page loads without a key; its API calls carry one
        if API_KEY in request:  # admitted already: an image call for a model served elsewhere, passed on
            return handler
        key = self.policy.identify(request.headers.get("Authorization"))
        if key is None:
            return handler
        request[API_KEY] = key
        if handler is not None and request.path.startswith("/v1/images/"):
            return self.policy.guard(key, handler)
        await self.policy.admit(key, image=False)
        return handler

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """What the standalone app does with requests no gateway route answers."""
        request_id = request.get(REQUEST_ID) or secrets.token_hex(16)
        try:
            if self.passthrough and request.path.startswith("/v1/"):
                await self.authenticate(request)
                self._check_length(request)
                # A client's key for this proxy is no key for the upstream: never forward it.
                response = await self.passthrough.forward(request, body=request.get(BODY),
                                                          drop_client_auth=bool(self._keys))
                self.metrics.passthrough.labels(status=str(response.status)).inc()
                return response
            raise NotFound(f"Invalid URL ({request.method} {request.path}).", code="unknown_url")
        except ProxyError as e:
            return _with_id(self.scrubber.error(e).to_response(), request_id)

    def _check_length(self, request: web.Request) -> None:
        limit = self.config.server.max_body_mb * 1024 * 1024
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit:.0f} bytes.")


def _or_passed_on(target: Handler, fallback: Handler) -> Handler:
    """target, or for a model served elsewhere the fallback (passthrough) in its place: inside the
    key's limits, so a forwarded image call holds a concurrency slot like one served here."""

    async def served_or_passed_on(request: web.Request) -> web.StreamResponse:
        try:
            return await target(request)
        except NotServedHere:
            request[PASSED_ON] = True
            return await fallback(request)

    return served_or_passed_on


def _with_id(response: web.StreamResponse, request_id: str) -> web.StreamResponse:
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    return response


def _from_http_exception(e: web.HTTPException) -> ProxyError:
    if e.status == 413:
        return PayloadTooLarge(f"The request body is too large: {e.text or e.reason}.")
    if e.status == 405:
        return MethodNotAllowed(e.reason)
    if e.status == 404:
        return NotFound(e.reason)
    if 400 <= e.status < 500:
        error = InvalidRequest(e.text or e.reason)
        error.status = e.status
        return error
    return ProxyError(e.reason)


GATEWAY = web.AppKey("qwen_image_gateway", Gateway)


def _lifecycle(app: web.Application, gateway: Gateway) -> None:
    async def on_startup(_app: web.Application) -> None:
        await gateway.start()

    async def on_shutdown(_app: web.Application) -> None:
        await gateway.drain()

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.close()

    app[GATEWAY] = gateway
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)


def build_app(config: Config, providers: dict[str, Provider] | None = None) -> web.Application:
    """The standalone proxy: the gateway's routes, passthrough for other /v1 calls, OpenAI errors for the rest."""
    gateway = Gateway(config, providers)
    app = web.Application(
        middlewares=[gateway.middleware(fallback=gateway.fallback)],
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
    )
    # Every request reaches the middleware; this route only makes aiohttp let it through.
    app.router.add_route("*", "/{tail:.*}", gateway.fallback)
    _lifecycle(app, gateway)
    return app


def image_proxy_middleware(config: Config, app: web.Application | None = None, *,
                           admin_prefix: str | None = None):
    """The interception as a middleware for an existing aiohttp app.

    Only POST /v1/images/* for the models in `config` (and GET /images/<id> for url answers) are
    answered here; everything else reaches the app's own routes. /health, /ready, /metrics and
    /v1/models are served only when `admin_prefix` is given ("" for the root, or e.g. "/qip").
    Pass `app` so the gateway starts, drains and closes with it.
    """
    gateway = Gateway(config)
    gateway.mounted = True
    gateway.admin_prefix = admin_prefix.rstrip("/") if admin_prefix is not None else None
    if app is not None:
        _lifecycle(app, gateway)
    return gateway.middleware()
