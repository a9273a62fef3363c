"""A pool replica's part of its caller's trace: spans when the caller sent a traceparent, the replica's
environment names an OTLP collector (the standard OTEL_* variables, e.g. in the pool's
ray_actor_options.runtime_env.env_vars) and OpenTelemetry is installed; otherwise nothing at all."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .stages import SpanStages, StageHook

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger("local_backend.ray")

_lock = threading.Lock()
_made: list[Tracer | None] = []  # [tracer or None], once per process


def _make_tracer() -> Tracer | None:
    environ = os.environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return None
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter_class: type[SpanExporter]
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            exporter_class = GrpcExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            exporter_class = HttpExporter
    except ImportError as e:
        log.warning("an OTLP endpoint is set but OpenTelemetry is not installed (%s): this replica sends no "
                    "spans; pip install 'qwen-image-proxy[otel]' on the cluster's nodes", e.name)
        return None
    # The exporter reads its endpoint, headers and timeout from the same variables.
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "qwen-image-pool"}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter_class()))
    return provider.get_tracer("qwen-image-pool")


def tracer() -> Tracer | None:
    """This process's tracer, made on first use; None when spans are off here."""
    with _lock:
        if not _made:
            _made.append(_make_tracer())
        return _made[0]


@contextlib.contextmanager
def job_trace(traceparent: str | None, replica_id: str) -> Iterator[StageHook | None]:
    """A `pool.generate` span under the caller's span for the length of one job, and the engine's stage
    hook under it (None when this job is not traced)."""
    found = tracer() if isinstance(traceparent, str) and traceparent else None
    if found is None:
        yield None
        return
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    span = found.start_span("pool.generate", context=parent, kind=SpanKind.SERVER,
                            attributes={"qip.replica": replica_id, "qip.pid": os.getpid()})
    started = time.monotonic()
    try:
        yield SpanStages(found, set_span_in_context(span))
    finally:
        span.set_attribute("qip.seconds", round(time.monotonic() - started, 3))
        span.end()
