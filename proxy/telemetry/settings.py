"""Where traces go: models.yaml's telemetry section over the standard OTEL_* variables (pure)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from ..config import TelemetryConfig


@dataclass(frozen=True)
class TraceSettings:
    endpoint: str  # the full URL spans are sent to
    protocol: str  # http/protobuf | grpc
    sample_ratio: float | None  # None: the OTEL_TRACES_SAMPLER variables (default: every request)
    service_name: str
    headers: dict[str, str]
    record_prompts: bool


def settings_from(config: TelemetryConfig, environ: Mapping[str, str] = os.environ) -> TraceSettings | None:
    """The exporter's settings, or None when tracing is off (no endpoint anywhere, or OTEL_SDK_DISABLED)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    protocol = (config.protocol or environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol not in ("http/protobuf", "grpc"):
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: '{protocol}' is not supported; use http/protobuf or grpc")
    signal_url = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")  # used as it is, by the standard
    base = config.otlp_endpoint or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if config.otlp_endpoint is None and signal_url:
        endpoint = signal_url
    elif base:
        endpoint = base.rstrip("/")
        if protocol == "http/protobuf" and not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
    else:
        return None
    ratio = config.sample_ratio
    if ratio is None and environ.get("OTEL_TRACES_SAMPLER", "") in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = min(1.0, max(0.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))))
        except ValueError:
            ratio = 1.0
    headers_text = (environ.get(config.headers_env, "") if config.headers_env
                    else environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or environ.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    headers = {}
    for item in headers_text.split(","):
        name, sep, value = item.partition("=")
        if sep and name.strip():
            headers[name.strip().lower()] = unquote(value.strip())  # the standard's values are URL-encoded
    service = config.service_name or environ.get("OTEL_SERVICE_NAME") or "qwen-image-proxy"
    return TraceSettings(endpoint, protocol, ratio, service, headers, config.record_prompts)
