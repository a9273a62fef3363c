"""build_app(config) and the mountable middleware: dispatch to the handlers, auth, errors, the request log."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from functools import partial
from typing import Any, overload

from aiohttp import web
from aiohttp.typedefs import Middleware

from .api import admin, edits, generations, playground, usage
from .api import jobs as jobs_api
from .api.context import BODY, FORWARDED, METER, MODEL, PASSED_ON, ROUTE, STREAM_ERROR, Handler, NotServedHere
from .api.gateway import Gateway
from .config import Config
from .errors import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    ShuttingDown,
    UpstreamError,
    from_http_exception,
)
from .http.request_log import (
    REQUEST_ID,
    log_passthrough,
    log_request,
    outcome_of,
    outcome_of_status,
    request_id_of,
    with_id,
)
from .http.wire_errors import install_log_scrubbing
from .providers import Provider
from .request import MAX_FORM_FIELDS
from .routing.policy import API_KEY, KeyPolicy
from .telemetry import tracing
from .telemetry.logs_json import REQUEST_ID_VAR

log = logging.getLogger("proxy")

# Paths that carry no key: probes, scrapers and browsers following image links.
OPEN_PATHS = ("/health", "/ready", "/metrics")
ADMIN_PATHS = ("/health", "/ready", "/metrics", "/v1/models", *usage.PATHS)


class Dispatcher:
    """Which handler answers a request, with whose key, and what it is logged as; one per mounted gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": partial(admin.health, gateway)},
            "/ready": {"GET": partial(admin.ready, gateway)},
            "/metrics": {"GET": partial(admin.metrics, gateway)},
            "/v1/models": {"GET": partial(admin.list_models, gateway)},
            "/v1/images/generations": {"POST": partial(generations.generations, gateway)},
            "/v1/images/edits": {"POST": partial(edits.edits, gateway)},
            **{path: {"GET": partial(handler, gateway)} for path, handler in usage.PATHS.items()},
        }

    def match(self, request: web.Request, path: str | None = None) -> Handler | None:
        """The handler for a request this gateway answers itself; None for anything else."""
        if path is None:
            path = request.path
        methods: dict[str, Handler] | None
        if path.startswith("/v1/images/") and not jobs_api.serves(path):  # image calls first: the most asked
            methods = self.routes.get(path)
        elif not self.gw.mounted and playground.serves(path):
            methods = {"GET": playground.handle, "HEAD": playground.handle}
        elif path.startswith("/images/"):
            methods = {"GET": partial(admin.image_file, self.gw), "HEAD": partial(admin.image_file, self.gw)}
        elif jobs_api.serves(path):
            methods = jobs_api.methods(self.gw, path)
        else:
            if self.gw.admin_prefix is None or not path.startswith(self.gw.admin_prefix):
                return None
            path = path[len(self.gw.admin_prefix):]
            if path.startswith("/v1/models/"):
                methods = {"GET": partial(admin.get_model, self.gw)}
            else:
                methods = self.routes.get(path) if path in ADMIN_PATHS else None
        if methods is None:
            return None
        method = request.method
        if method not in methods:
            allowed = ", ".join(methods)
            raise MethodNotAllowed(f"{method} is not allowed on {request.path}; use {allowed}.",
                                   headers={"Allow": allowed})
        return methods[method]

    def middleware(self, fallback: Handler | None = None) -> Middleware:
        """The aiohttp middleware: answers image calls for our models, hands the rest on.

        `fallback`, when given, replaces the next handler for what this gateway does not serve
        (the standalone app uses it for passthrough); mounted in another app it is None.
        """

        @web.middleware
        async def qwen_image_proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
            traced = self.gw.tracing
            assert traced is not None
            with traced.request(request.method, request.path, request.headers) as span:
                response = await serve(request, handler)
                span.set_attribute("http.response.status_code", response.status)
                if response.status >= 500:
                    traced.failed(span)
                return response

        # A model served elsewhere is passed on under the same limits: each fixed route's handler wrapped
        # so once, here, rather than on every request.
        passed_on = ({h: _or_passed_on(h, fallback, self.gw.policy) for methods in self.routes.values()
                      for h in methods.values()} if fallback is not None else {})

        async def serve(request: web.Request, handler: Handler) -> web.StreamResponse:
            request_id = request_id_of(request.headers.get("X-Request-Id"))
            request[REQUEST_ID] = request_id
            gw = self.gw
            if gw.json_logs:  # every log line of the request carries its id
                REQUEST_ID_VAR.set(request_id)
            path = request.path
            try:
                target = self.match(request, path)
            except ProxyError as e:
                return with_id(e.to_response(), request_id)
            if target is None:
                return await (fallback or handler)(request)
            if not gw.started:
                await gw.start()
            started = time.monotonic()
            outcome, error_code = "ok", None
            image_call = path.startswith("/v1/images/") and not jobs_api.serves(path)
            if image_call:
                request[METER] = gw.usage.open()
            if fallback is not None:
                target = passed_on.get(target) or _or_passed_on(target, fallback, gw.policy)
            try:
                # The key (401), and image calls held to its limits while they run (429).
                target = await self.authenticate(request, target)
                if gw.draining and image_call:
                    raise ShuttingDown("The server is shutting down; retry on another instance.", retry_after=1)
                response = await target(request)
                if PASSED_ON in request:  # logged and counted as passthrough
                    return response
            except NotServedHere:  # mounted: the host app's own handlers answer
                return await handler(request)
            except asyncio.CancelledError:
                self._log_request(request, 499, started, "cancelled", None, self._annotate(request, 499, "cancelled"),
                                  "client_closed_request")
                raise
            except ProxyError as e:
                response, outcome, error_code = gw.scrubber.error(e).to_response(), outcome_of(e), e.code
                if e.routed is not None:  # every route failed: the log line names the last one tried
                    request[ROUTE] = e.routed
            except web.HTTPException as e:
                error = from_http_exception(e)
                response, outcome, error_code = error.to_response(), outcome_of(error), error.code
            except Exception:
                log.exception("request %s failed", request_id)
                response, outcome, error_code = internal_error(request_id).to_response(), "error", "internal_error"
            if STREAM_ERROR in request:  # a stream that failed after its head: a 200 that ended in an error event
                stream_error = request[STREAM_ERROR]
                outcome, error_code = outcome_of(stream_error), stream_error.code
                if stream_error.routed is not None:  # as for an error answer: the line names the last route tried
                    request[ROUTE] = stream_error.routed
            # aiohttp keeps a keep-alive connection's last request (and response) until the next request
            # arrives on it: let go of the megabytes they would hold meanwhile (its body, the images).
            result = request.pop(ROUTE, None)
            request.pop(BODY, None)
            trace_id = self._annotate(request, response.status, outcome, result) if gw.tracing else ""
            # The log line and the counters run once the answer is on its way: they need not delay it.
            asyncio.get_running_loop().call_soon(self._log_request, request, response.status, started, outcome,
                                                 result, trace_id, error_code)
            return with_id(response, request_id)

        # Untraced (the gateway's tracing is set when it is made), serve is the middleware: no span around it,
        # and one coroutine fewer for each request.
        return qwen_image_proxy if self.gw.tracing is not None else web.middleware(serve)

    def _log_request(self, request: web.Request, status: int, started: float, outcome: str,
                     result: Any = None, trace_id: str = "", error_code: str | None = None) -> None:
        seconds = time.monotonic() - started
        meter = request.pop(METER, None)
        request_id, model, path = request[REQUEST_ID], request.get(MODEL, ""), request.path
        key = request.get(API_KEY) if self.gw.policy.enabled else None  # (no keys: never set)
        # Not for calls passed on, nor for ones without a valid key (a stream of bad keys fills no ledger).
        if meter is not None and (key is not None or not self.gw.policy.enabled) and PASSED_ON not in request:
            self.gw.usage.finish(meter, request_id=request_id, key=key, model=model, path=path, status=status,
                                 outcome=outcome, seconds=seconds)
        log_request(self.gw.metrics, path=path, request_id=request_id, model=model, key=key, status=status,
                    seconds=seconds, outcome=outcome, result=result, trace_id=trace_id, error_code=error_code)

    @staticmethod
    def _annotate(request: web.Request, status: int, outcome: str, result: Any = None) -> str:
        """The request's span gets what its log line says; its trace id for that line ("" untraced)."""
        if tracing.current() is None:
            return ""
        key = request.get(API_KEY)
        tracing.annotate_request({
            "qip.request_id": request[REQUEST_ID], "qip.model": request.get(MODEL), "qip.key": key.name if key else None,
            "qip.outcome": outcome, "http.response.status_code": status,
            "qip.route": result.route.name if result else None, "qip.attempts": result.calls if result else None})
        return tracing.trace_id()

    @overload
    async def authenticate(self, request: web.Request, handler: Handler) -> Handler: ...
    @overload
    async def authenticate(self, request: web.Request, handler: None = None) -> None: ...

    async def authenticate(self, request: web.Request, handler: Handler | None = None) -> Handler | None:
        """The caller's key (401 without a valid one; see proxy/routing/policy.py), kept as request[API_KEY].

        An image call gets `handler` back wrapped to run under the key's limits (rpm and concurrency,
        429 past them), holding its slot until it ends; any other call counts against the key's rpm
        alone (while the shared counter is unreachable, the proxy's own calls go on uncounted, and
        passthrough calls get 503 state_unavailable, as image calls do). Probes and image links carry no key; /metrics needs server.metrics_key when one is set.
        """
        path, policy = request.path, self.gw.policy
        if path.startswith("/v1/images/") and not jobs_api.serves(path):  # an image call (none is open)
            image_call = True
        else:
            prefix = self.gw.admin_prefix or ""
            if path == f"{prefix}/metrics":
                policy.check_metrics_key(request.headers.get("Authorization"))
                return handler
            if (path.startswith(("/images/", *(f"{prefix}{p}" for p in OPEN_PATHS)))
                    or (not self.gw.mounted and playground.serves(path))):
                return handler  # the page loads without a key; its API calls carry one
            image_call = False
        if not policy.enabled:  # no keys: nobody to identify, nothing to count
            return handler
        if API_KEY in request:  # admitted already: an image call for a model served elsewhere, passed on
            return handler
        key = policy.identify(request.headers.get("Authorization"))
        if key is None:
            return handler
        request[API_KEY] = key
        if handler is not None and image_call:
            return policy.guard(key, handler)
        # Without a handler it is a call passed on to the passthrough upstream: it spends there, so it is
        # refused (503) while its rpm cannot be counted; the proxy's own other calls spend nothing and go on.
        await policy.admit(key, image=False, spends=handler is None)
        return handler

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """What the standalone app does with requests no gateway route answers; a passthrough call gets its
        log line here once its answer has ended (image calls never come here unless passed on)."""
        request_id = request.get(REQUEST_ID) or secrets.token_hex(16)
        passthrough = self.gw.passthrough if request.path.startswith("/v1/") else None
        started = time.monotonic()
        status, outcome = 500, "error"  # what the log line says unless set below: the proxy's own failure
        try:
            if passthrough is not None:
                await self.authenticate(request)
                self._check_length(request)
                # A client's key for this proxy is no key for the upstream: never forward it.
                try:
                    response = await passthrough.forward(request, body=request.get(BODY),
                                                         drop_client_auth=self.gw.has_keys)
                except UpstreamError as e:  # unreachable, too slow, a bad answer: counted under our 502 / 504
                    self.gw.metrics.passthrough.labels(status=str(e.status)).inc()
                    raise
                self.gw.metrics.passthrough.labels(status=str(response.status)).inc()
                status, outcome = response.status, request.get(FORWARDED) or outcome_of_status(response.status)
                if outcome == "cancelled":
                    status = 499  # as an image request's line says of a client that left
                return response
            if request.path.startswith("/v1/") and not self.gw.passthrough:  # (an app pointed here for chat too)
                raise NotFound(f"Invalid URL ({request.method} {request.path}): this server answers OpenAI's "
                               "images API; other calls are forwarded only where it sets passthrough.base_url.",
                               code="unknown_url")
            raise NotFound(f"Invalid URL ({request.method} {request.path}).", code="unknown_url")
        except ProxyError as e:
            status, outcome = e.status, outcome_of(e)
            return with_id(self.gw.scrubber.error(e).to_response(), request_id)
        except asyncio.CancelledError:
            status, outcome = 499, "cancelled"
            raise
        except Exception:
            if request.writer.output_size > 0:  # the answer has begun: nothing can be sent but a cut
                raise
            # Never aiohttp's bare text 500 ("Server got itself in trouble"): the client gets OpenAI's shape.
            log.exception("request %s failed", request_id)
            return with_id(internal_error(request_id).to_response(), request_id)
        finally:
            if passthrough is not None:
                self._log_passthrough(request, request_id, status, started, outcome)

    def _log_passthrough(self, request: web.Request, request_id: str, status: int, started: float,
                         outcome: str) -> None:
        trace_id = self._annotate(request, status, outcome) if self.gw.tracing else ""
        log_passthrough(request_id=request_id, trace_id=trace_id,
                        key=request.get(API_KEY) if self.gw.policy.enabled else None, method=request.method,
                        path=request.path, status=status, seconds=time.monotonic() - started, outcome=outcome,
                        called=FORWARDED in request, scrub=self.gw.scrubber.text)

    def _check_length(self, request: web.Request) -> None:
        limit = self.gw.config.server.max_body_mb * 1024 * 1024
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit:.0f} bytes.")


def internal_error(request_id: str | None = None) -> ProxyError:
    """What a client gets for a failure of the proxy itself (500), in OpenAI's shape."""
    where = f" (request id {request_id})" if request_id else ""
    return ProxyError(f"The proxy failed to handle the request{where}.", code="internal_error")


def _or_passed_on(target: Handler, fallback: Handler, policy: KeyPolicy) -> Handler:
    """target, or for a model served elsewhere the fallback (passthrough) in its place: inside the
    key's limits, so a forwarded image call holds a concurrency slot like one served here."""

    async def served_or_passed_on(request: web.Request) -> web.StreamResponse:
        try:
            return await target(request)
        except NotServedHere:
            if policy.enabled:
                policy.needs_slot(request)
            request[PASSED_ON] = True
            return await fallback(request)

    return served_or_passed_on


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
    jobs_api.attach(gateway, partial(generations.run_job, gateway))
    dispatcher = Dispatcher(gateway)
    app = web.Application(
        middlewares=[dispatcher.middleware(fallback=dispatcher.fallback)],
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
        client_max_fields=MAX_FORM_FIELDS,
    )
    # Every request reaches the middleware; these routes only make aiohttp let it through. The image calls'
    # own paths first: aiohttp finds those with one lookup and no pattern to match.
    for path in (generations.GENERATIONS_PATH, generations.EDITS_PATH):
        app.router.add_route("*", path, dispatcher.fallback)
    app.router.add_route("*", "/{tail:.*}", dispatcher.fallback)
    _lifecycle(app, gateway)
    # aiohttp logs what a malformed request sent (a header with the key in it): never into the log.
    install_log_scrubbing(config.secrets())
    return app


def image_proxy_middleware(config: Config, app: web.Application | None = None, *,
                           admin_prefix: str | None = None) -> Middleware:
    """The interception as a middleware for an existing aiohttp app.

    Only POST /v1/images/* for the models in `config` (and GET /images/<id> for url answers) are
    answered here; everything else reaches the app's own routes. /health, /ready, /metrics and
    /v1/models are served only when `admin_prefix` is given ("" for the root, or e.g. "/qip").
    Pass `app` so the gateway starts, drains and closes with it.
    """
    gateway = Gateway(config)
    jobs_api.attach(gateway, partial(generations.run_job, gateway))
    install_log_scrubbing(config.secrets())
    gateway.mounted = True
    gateway.admin_prefix = admin_prefix.rstrip("/") if admin_prefix is not None else None
    if app is not None:
        _lifecycle(app, gateway)
    return Dispatcher(gateway).middleware()
