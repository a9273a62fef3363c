"""The OpenTelemetry side of tracing: tracer and OTLP exporter, request spans, upstream HTTP spans, engine spans.

OpenTelemetry itself is imported only when a gateway's tracing is configured (configure()): with it off,
nothing of it loads. Client spans come from an
aiohttp TraceConfig on the gateway's session (as opentelemetry-instrumentation-aiohttp-client makes them,
whose releases pin another SDK than ours): method, host, port and the URL without its query or user info,
never headers; and the W3C traceparent goes out with each call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp

from local_backend.stages import SpanStages

from ..config import TelemetryConfig
from .settings import TraceSettings, settings_from
from .tracing import clean, enter, leave

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span


def configure(config: TelemetryConfig) -> OtelTracing | None:
    """A gateway's tracing, or None when it is off (then nothing of OpenTelemetry is imported)."""
    settings = settings_from(config)
    if settings is None:
        return None
    try:
        return OtelTracing(settings)
    except ImportError as e:
        raise RuntimeError(f"telemetry is configured but OpenTelemetry is not installed ({e.name}): "
                           "pip install 'qwen-image-proxy[otel]'") from None


def route_name(path: str) -> str:
    """The span name's route: known endpoints as they are, image links, job paths and other paths by template
    (a name per URL would make every trace its own operation, and an image link is a capability)."""
    if path.startswith("/images/"):
        return "/images/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/images/jobs/"):  # a job's id is as good as a URL of its own
        return "/v1/images/jobs/{id}/cancel" if path.endswith("/cancel") else "/v1/images/jobs/{id}"
    if path.startswith("/v1/"):
        return path if path.startswith("/v1/images/") or path == "/v1/models" else "/v1/* (passthrough)"
    return path if path in ("/health", "/ready", "/metrics") else "/*"


def _exporter(settings: TraceSettings) -> SpanExporter:
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=settings.endpoint, headers=tuple(settings.headers.items()) or None,
                            insecure=settings.endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.endpoint, headers=settings.headers or None)


class OtelTracing:
    """One gateway's tracer: its own TracerProvider (never the global one), batching spans to OTLP."""

    def __init__(self, settings: TraceSettings, exporter: SpanExporter | None = None) -> None:
        from opentelemetry import context
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import (
            Link,
            SpanKind,
            Status,
            StatusCode,
            get_current_span,
            set_span_in_context,
        )
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.settings = settings
        self.record_prompts = settings.record_prompts
        # A client's sampled traceparent is followed; new traces are kept at sample_ratio.
        sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio)) if settings.sample_ratio is not None else None
        self.provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}),
                                       sampler=sampler)
        self.provider.add_span_processor(BatchSpanProcessor(exporter or _exporter(settings)))
        self.tracer = self.provider.get_tracer("qwen-image-proxy")
        self.propagator = TraceContextTextMapPropagator()
        self._current_context = context.get_current
        self._in_context = set_span_in_context
        self._server, self._client = SpanKind.SERVER, SpanKind.CLIENT
        self._consumer, self._internal = SpanKind.CONSUMER, SpanKind.INTERNAL
        self._root, self._link, self._span_of = context.Context, Link, get_current_span
        self._error = Status(StatusCode.ERROR)

    @contextlib.contextmanager
    def span(self, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Any]:
        # An exception is marked by its type alone: its message may carry what an upstream echoed.
        with self.tracer.start_as_current_span(name, attributes=clean(attributes) if attributes else None,
                                               record_exception=False, set_status_on_exception=False) as span:
            try:
                yield span
            except BaseException as e:
                span.set_attribute("error.type", type(e).__name__)
                span.set_status(self._error)
                raise

    @contextlib.contextmanager
    def request(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The request's server span, continuing the client's traceparent when it sent one."""
        parent = self.propagator.extract(headers)
        with self.tracer.start_as_current_span(
                f"{method} {route_name(path)}", context=parent, kind=self._server,
                attributes={"http.request.method": method, "http.route": route_name(path)},
                record_exception=False, set_status_on_exception=False) as span:
            tokens = enter(self, span)
            try:
                yield span
            finally:
                leave(tokens)

    @contextlib.contextmanager
    def background(self, name: str, attributes: dict[str, Any], *, link: str | None,
                   kind: str = "internal") -> Iterator[Any]:
        """Work no request waits for (a background job, a webhook delivery): the root span of a trace of its
        own, linked to the span whose W3C traceparent is `link` (OpenTelemetry's way for work started by
        another trace, which may have ended long before), and this task's current span as a request's is."""
        links = []
        if link:
            found = self._span_of(self.propagator.extract({"traceparent": link})).get_span_context()
            if found.is_valid:
                links.append(self._link(found))
        with self.tracer.start_as_current_span(
                name, context=self._root(), kind=self._consumer if kind == "consumer" else self._internal,
                attributes=clean(attributes), links=links, record_exception=False,
                set_status_on_exception=False) as span:
            tokens = enter(self, span)
            try:
                yield span
            except BaseException as e:
                span.set_attribute("error.type", type(e).__name__)
                span.set_status(self._error)
                raise
            finally:
                leave(tokens)

    def failed(self, span: Span) -> None:
        span.set_status(self._error)

    def client_trace_config(self) -> aiohttp.TraceConfig:
        """Spans for the calls an aiohttp session makes (upstreams, vendor polls, downloads)."""
        config = aiohttp.TraceConfig()

        async def on_start(_session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams) -> None:
            url = params.url
            bare = url.with_user(None).with_password(None).with_query(None).with_fragment(None)
            # raw_host: the name as it goes on the wire. url.host decodes punycode and raises UnicodeError on
            # a broken label (xn--a.example.com): raised here, it failed the call itself (a 500, a route's
            # "internal error") where an untraced call only failed to connect.
            span = self.tracer.start_span(params.method, kind=self._client, attributes={
                "http.request.method": params.method, "server.address": url.raw_host or "",
                "server.port": url.port or 0, "url.full": str(bare)})
            ctx.qip_span = span
            self.propagator.inject(params.headers, context=self._in_context(span))

        async def on_end(_session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams) -> None:
            span = getattr(ctx, "qip_span", None)
            if span is not None:
                span.set_attribute("http.response.status_code", params.response.status)
                if params.response.status >= 400:
                    span.set_status(self._error)
                span.end()

        async def on_error(_session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestExceptionParams) -> None:
            span = getattr(ctx, "qip_span", None)
            if span is not None:
                span.set_attribute("error.type", type(params.exception).__name__)
                span.set_status(self._error)
                span.end()

        config.on_request_start.append(on_start)
        config.on_request_end.append(on_end)
        config.on_request_exception.append(on_error)
        return config

    def engine_hook(self) -> SpanStages:
        """The local engine's stages as spans under the current one (local_backend.stages)."""
        return SpanStages(self.tracer, self._current_context())

    def traceparent(self) -> str | None:
        """The W3C traceparent of the current span, for a call that is not HTTP (a Ray handle)."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        return carrier.get("traceparent")

    def shutdown(self) -> None:
        """Send what is still batched, then stop (blocks: call it off the event loop)."""
        self.provider.shutdown()
