"""build_app(config) and the mountable middleware: the HTTP side of the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aiohttp
from aiohttp import web

from .config import Config
from .errors import (
    AuthenticationFailed,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ProxyError,
)
from .metrics import Metrics
from .output import OutputSettings, check_output_request, render_images
from .passthrough import Passthrough
from .providers import Provider, ProviderContext, build_providers
from .request import ImageRequest, build_request, parse_body, parse_json_bytes
from .router import Router
from .sizing import resolve_size
from .store import FilesystemStore

log = logging.getLogger("proxy")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_KEEPALIVE_SECONDS = 15
REQUEST_ID = web.RequestKey("qip_request_id", str)
MODEL = web.RequestKey("qip_model", str)
# The raw body once read, so a request for a model served elsewhere can still be passed on.
BODY = web.RequestKey("qip_body", bytes)


class NotServedHere(Exception):
    """An image call for a model this proxy does not serve: the next handler (or passthrough) gets it."""


class Gateway:
    """Everything the proxy owns: providers, router, store, passthrough, metrics and the handlers."""

    def __init__(self, config: Config, providers: dict[str, Provider] | None = None):
        self.config = config
        self.metrics = Metrics()
        self.providers = providers if providers is not None else build_providers(config)
        self.router = Router(config.models, self.providers, self.metrics)
        self.size_tables = {name: config.size_table(name) for name in config.models}
        self.store = FilesystemStore(config.store.path, config.store.ttl_seconds)
        self.output = OutputSettings(
            rehost_upstream_urls=config.store.rehost_upstream_urls,
            max_download_bytes=int(config.store.max_download_mb * 1024 * 1024),
        )
        self.passthrough = Passthrough(config.passthrough) if config.passthrough.enabled else None
        # Mounted in another app (image_proxy_middleware): calls for other models go on to its handlers.
        self.mounted = False
        self.default_model = config.server.default_model or next(iter(config.models), None)
        self._keys = [k.encode() for k in config.server.api_keys]
        self.http: aiohttp.ClientSession | None = None
        self._started = False
        self._start_lock = asyncio.Lock()
        self._routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self.health},
            "/metrics": {"GET": self.metrics_endpoint},
            "/v1/models": {"GET": self.list_models},
            "/v1/images/generations": {"POST": self.generations},
        }

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            self.http = aiohttp.ClientSession(headers={"User-Agent": "qwen-image-proxy"})
            await self.store.start()
            if self.passthrough:
                await self.passthrough.start()
            ctx = ProviderContext(http=self.http, extras={"metrics": self.metrics})
            for provider in self.providers.values():
                await provider.start(ctx)
            for name in self.config.models:
                if not self.router.usable(name):
                    log.warning("model %s has no usable route yet: %s", name, self.router.why_unusable(name))
            self._started = True

    async def close(self) -> None:
        if not self._started:
            return
        for provider in self.providers.values():
            with contextlib.suppress(Exception):
                await provider.close()
        if self.passthrough:
            await self.passthrough.close()
        await self.store.close()
        await self.http.close()
        self._started = False

    # ---- dispatch ---------------------------------------------------------------------------------

    def match(self, request: web.Request) -> Handler | None:
        """The handler for a request this gateway answers itself; None for anything else."""
        path = request.path
        if path.startswith("/images/"):
            methods = {"GET": self.image_file, "HEAD": self.image_file}
        elif path.startswith("/v1/models/"):
            methods = {"GET": self.get_model}
        else:
            methods = self._routes.get(path)
        if methods is None:
            return None
        if request.method not in methods:
            allowed = ", ".join(methods)
            raise MethodNotAllowed(f"{request.method} is not allowed on {path}; use {allowed}.",
                                   headers={"Allow": allowed})
        return methods[request.method]

    def middleware(self, fallback: Handler | None = None):
        """The aiohttp middleware: answers image calls for our models, hands the rest on.

        `fallback`, when given, replaces the next handler for what this gateway does not serve
        (the standalone app uses it for passthrough); mounted in another app it is None.
        """

        @web.middleware
        async def qwen_image_proxy(request: web.Request, handler: Handler) -> web.StreamResponse:
            request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
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
            try:
                # Health, metrics and image links stay open: probes, scrapers and browsers carry no key.
                if request.path not in ("/health", "/metrics") and not request.path.startswith("/images/"):
                    self.authenticate(request)
                response = await target(request)
            except NotServedHere:
                return await (fallback or handler)(request)
            except ProxyError as e:
                response = e.to_response()
            except web.HTTPException as e:
                response = _from_http_exception(e).to_response()
            except Exception:
                log.exception("request %s failed", request_id)
                response = ProxyError(f"The proxy failed to handle the request (request id {request_id}).",
                                      code="internal_error").to_response()
            model = request.get(MODEL, "")
            # Templates, not raw paths: every image URL as its own label value would grow without bound.
            endpoint = ("/images/{name}" if request.path.startswith("/images/")
                        else "/v1/models/{model}" if request.path.startswith("/v1/models/") else request.path)
            self.metrics.requests.labels(endpoint=endpoint, model=model, status=str(response.status)).inc()
            if model:
                self.metrics.latency.labels(endpoint=endpoint, model=model).observe(time.monotonic() - started)
            return _with_id(response, request_id)

        return qwen_image_proxy

    def authenticate(self, request: web.Request) -> None:
        if not self._keys:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Compare against every key so the time taken says nothing about which one was close.
        ok = [hmac.compare_digest(given, key) for key in self._keys]
        if not given or not any(ok):
            raise AuthenticationFailed(
                "Missing or invalid API key: send 'Authorization: Bearer <key>' with a key configured "
                "under server.api_keys."
            )

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """What the standalone app does with requests no gateway route answers."""
        request_id = request.get(REQUEST_ID) or uuid.uuid4().hex
        try:
            if self.passthrough and request.path.startswith("/v1/"):
                self.authenticate(request)
                self._check_length(request)
                # A client's key for this proxy is no key for the upstream: never forward it.
                response = await self.passthrough.forward(request, body=request.get(BODY),
                                                          drop_client_auth=bool(self._keys))
                self.metrics.passthrough.labels(status=str(response.status)).inc()
                return response
            raise NotFound(f"Invalid URL ({request.method} {request.path}).", code="unknown_url")
        except ProxyError as e:
            return _with_id(e.to_response(), request_id)

    def _check_length(self, request: web.Request) -> None:
        limit = self.config.server.max_body_mb * 1024 * 1024
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"The request body is larger than the limit of {limit:.0f} bytes.")

    # ---- handlers ---------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        models = {
            name: {"ready": bool(self.router.usable(name)),
                   "routes": [r.provider.describe() for r in self.router.routes[name]]}
            for name in self.config.models
        }
        status = "ok" if all(m["ready"] for m in models.values()) else "degraded"
        return web.json_response({"status": status, "models": models})

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        for provider in self.providers.values():
            if hasattr(provider, "queue_depth"):
                self.metrics.local_queue.labels(provider=provider.name).set(provider.queue_depth)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": self.metrics.content_type})

    def _model_card(self, name: str) -> dict:
        cfg = self.config.models[name]
        card = {"id": name, "object": "model", "created": 0, "owned_by": cfg.owned_by}
        if cfg.description:
            card["description"] = cfg.description
        return card

    async def list_models(self, request: web.Request) -> web.Response:
        data = [self._model_card(name) for name in self.config.models]
        if self.passthrough:
            data += await self._upstream_models(request, exclude={m["id"] for m in data})
        return web.json_response({"object": "list", "data": data})

    async def _upstream_models(self, request: web.Request, exclude: set[str]) -> list[dict]:
        """The passthrough upstream's models, so apps see one list; ours win on a name clash."""
        headers = {}
        auth = self.config.passthrough.api_key
        if auth:
            headers["Authorization"] = f"Bearer {auth}"
        elif "Authorization" in request.headers and not self._keys:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with self.http.get(f"{self.passthrough.base_url}/models", headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
                payload = await resp.json(content_type=None) if resp.status == 200 else {}
        except (TimeoutError, aiohttp.ClientError, ValueError):
            payload = {}
        items = payload.get("data") if isinstance(payload, dict) else None
        return [m for m in items or [] if isinstance(m, dict) and m.get("id") not in exclude]

    async def get_model(self, request: web.Request) -> web.StreamResponse:
        name = request.path[len("/v1/models/"):]
        if name in self.config.models:
            return web.json_response(self._model_card(name))
        if self.passthrough or self.mounted:
            raise NotServedHere
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")

    async def image_file(self, request: web.Request) -> web.StreamResponse:
        name = request.path[len("/images/"):]
        found = await asyncio.to_thread(self.store.lookup, name)
        if found is None:
            raise NotFound("This image does not exist or has expired.", code="image_not_found")
        path, content_type = found
        return web.FileResponse(path, headers={"Content-Type": content_type, "Cache-Control": "private, max-age=3600"})

    async def read_fields(self, request: web.Request) -> dict:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            return {k: v for k, v in form.items() if isinstance(v, str)}
        raw = await request.read()
        request[BODY] = raw
        return parse_json_bytes(raw)

    async def parse_generation(self, request: web.Request) -> ImageRequest:
        fields = await self.read_fields(request)
        model = fields.get("model") or self.default_model
        if not isinstance(model, str):
            raise InvalidRequest("Invalid 'model': must be a string.", param="model")
        if model not in self.config.models:
            if self.passthrough or self.mounted:
                raise NotServedHere
            served = ", ".join(self.config.models) or "none"
            raise ModelNotFound(f"The model '{model}' does not exist. Models served here: {served}.",
                                param="model")
        request[MODEL] = model
        body = parse_body(fields)
        width, height = resolve_size(self.size_tables[model], body.size, body.aspect_ratio, body.resolution)
        req = build_request(body, model, width, height)
        check_output_request(req)
        return req

    async def generations(self, request: web.Request) -> web.StreamResponse:
        req = await self.parse_generation(request)
        if req.stream:
            return await self._stream(request, req, "image_generation")
        payload = await self._generate(request, req)
        return web.Response(text=dumps_with_b64(payload), content_type="application/json")

    async def _generate(self, request: web.Request, req: ImageRequest) -> dict:
        deadline = time.monotonic() + self.config.server.request_timeout
        result = await self.router.generate(req, deadline)
        items, formats = await render_images(
            result.images, req, store=self.store, http=self.http,
            base_url=self.config.server.public_base_url or f"{request.scheme}://{request.host}",
            settings=self.output,
        )
        self.metrics.images.labels(model=req.model, route=result.route.name).inc(len(items))
        out_format = next((f for f in formats if f), req.output_format or "png")
        payload = {"created": int(time.time()), "data": items, "output_format": out_format, "size": req.size_text}
        for key in ("quality", "background"):
            if getattr(req, key) is not None:
                payload[key] = getattr(req, key)
        seeds = [img.seed for img in result.images]
        if all(s is not None for s in seeds):
            payload["seeds"] = seeds
        return payload

    async def _stream(self, request: web.Request, req: ImageRequest, prefix: str) -> web.StreamResponse:
        """OpenAI image streaming: one `completed` event per image (keepalive comments while waiting)."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        work = asyncio.ensure_future(self._generate(request, replace(req, response_format="b64_json")))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=SSE_KEEPALIVE_SECONDS)
                if not work.done():
                    await response.write(b": keepalive\n\n")
            payload = work.result()
        except ProxyError as e:
            await response.write(_sse("error", e.to_dict()))
            await response.write_eof()
            return response
        finally:
            if not work.done():
                work.cancel()
        for item in payload["data"]:
            event = {"type": f"{prefix}.completed", "b64_json": item["b64_json"], "created_at": payload["created"],
                     "size": payload["size"], "quality": req.quality or "auto",
                     "background": req.background or "auto", "output_format": payload["output_format"],
                     "revised_prompt": item["revised_prompt"]}
            await response.write(_sse(event["type"], event))
        await response.write_eof()
        return response


def dumps_with_b64(payload: dict) -> str:
    """json.dumps, with the megabytes of base64 spliced in rather than scanned for escaping.

    Base64 text has no character JSON would escape, so it goes in as it is.
    """
    # A random marker: no text a client sent (a prompt, say) can collide with it.
    nonce = secrets.token_hex(16)
    images = [item.pop("b64_json", None) for item in payload["data"]]
    for i, b64 in enumerate(images):
        if b64 is not None:
            payload["data"][i] = {"b64_json": f"{nonce}-{i}", **payload["data"][i]}
    parts, rest = [], json.dumps(payload)
    for i, b64 in enumerate(images):
        if b64 is not None:
            head, _, rest = rest.partition(f'"{nonce}-{i}"')
            parts += [head, '"', b64, '"']
    parts.append(rest)
    return "".join(parts)


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


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


def build_app(config: Config, providers: dict[str, Provider] | None = None) -> web.Application:
    """The standalone proxy: the gateway's routes, passthrough for other /v1 calls, OpenAI errors for the rest."""
    gateway = Gateway(config, providers)
    app = web.Application(
        middlewares=[gateway.middleware(fallback=gateway.fallback)],
        client_max_size=int(config.server.max_body_mb * 1024 * 1024),
    )
    app[GATEWAY] = gateway
    # Every request reaches the middleware; this route only makes aiohttp let it through.
    app.router.add_route("*", "/{tail:.*}", gateway.fallback)

    async def on_startup(_app: web.Application) -> None:
        await gateway.start()

    async def on_cleanup(_app: web.Application) -> None:
        await gateway.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def image_proxy_middleware(config: Config, app: web.Application | None = None):
    """The interception as a middleware for an existing aiohttp app.

    Image calls for the models in `config` are answered here; everything else reaches the app's own
    routes. Pass `app` so the gateway is closed with it (it starts on the first request).
    """
    gateway = Gateway(config)
    gateway.mounted = True
    if app is not None:
        app[GATEWAY] = gateway

        async def on_cleanup(_app: web.Application) -> None:
            await gateway.close()

        app.on_cleanup.append(on_cleanup)
    return gateway.middleware()
