"""Spans where the proxy works, at no cost when tracing is off (OpenTelemetry is imported only when on).

Code anywhere in a request calls `span(name, attributes)`: with tracing off (no tracer for this request)
it returns one shared no-op context manager, so a request pays a context-variable read per span site.
With tracing on, the gateway's `Tracing` (proxy.telemetry.otel) is set for the request by
`Tracing.request(...)` in the middleware, and `span` starts an OpenTelemetry span under the current one.
Several gateways in one process (tests, mounted apps) each keep their own tracer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import aiohttp

    from local_backend.stages import StageHook


class Tracing(Protocol):
    """What the gateway holds when tracing is on (proxy.telemetry.otel.OtelTracing)."""

    record_prompts: bool

    def span(self, name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]: ...

    def request(self, method: str, path: str, headers: Mapping[str, str]) -> AbstractContextManager[Any]: ...

    def background(self, name: str, attributes: dict[str, Any], *, link: str | None,
                   kind: str = "internal") -> AbstractContextManager[Any]: ...

    def failed(self, span: Any) -> None: ...

    def engine_hook(self) -> StageHook: ...

    def traceparent(self) -> str | None: ...

    def client_trace_config(self) -> aiohttp.TraceConfig: ...

    def shutdown(self) -> None: ...


_tracing: ContextVar[Tracing | None] = ContextVar("qip_tracing", default=None)
_request_span: ContextVar[Any] = ContextVar("qip_request_span", default=None)

# The request's Tracing, or None when it is not traced: a C call, for the checks on the hot path.
current = _tracing.get


class _NoSpan:
    """The span of a request that is not traced: enters, exits and records nothing."""

    __slots__ = ()

    if TYPE_CHECKING:  # set below, as C callables: what a type checker sees of them
        __enter__: Callable[[], _NoSpan]
        __exit__: Callable[..., Any]  # "".format: returns "", which is false (an exception goes on)

    def set_attribute(self, key: str, value: Any) -> None:
        return None

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        return None

    def add_event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        return None


NO_SPAN = _NoSpan()
# `with NO_SPAN as span` runs on every span site of every untraced request, so its __enter__ and
# __exit__ are C callables rather than Python methods (being no descriptors, they get no `self`):
# __enter__ returns NO_SPAN, __exit__ returns "" (false: an exception goes on). Half the cost.
_NoSpan.__enter__ = itertools.repeat(NO_SPAN).__next__
_NoSpan.__exit__ = "".format


def span(name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A context manager for a span named `name` under the current one (yields it: set_attribute...)."""
    tracing = _tracing.get()
    if tracing is None:
        return NO_SPAN
    return tracing.span(name, attributes)


def active() -> bool:
    """Whether this request is traced (to skip building attributes that only a span would read)."""
    return _tracing.get() is not None


def annotate_request(attributes: dict[str, Any]) -> None:
    """Attributes of the request's own (root) span, from anywhere inside the request."""
    found = _request_span.get()
    if found is not None:
        found.set_attributes(clean(attributes))


def trace_id() -> str:
    """The current request's trace id (32 hex digits), or "" when it is not traced."""
    found = _request_span.get()
    return "" if found is None else format(found.get_span_context().trace_id, "032x")


def engine_hook() -> StageHook | None:
    """A local_backend stage hook that makes the engine's stages spans under the current span; None when
    this request is not traced (the engine then does nothing for it)."""
    tracing = _tracing.get()
    return None if tracing is None else tracing.engine_hook()


def traceparent() -> str | None:
    """The current span's W3C traceparent, for a call that carries it in its body (a Ray pool); None
    when this request is not traced."""
    tracing = _tracing.get()
    return None if tracing is None else tracing.traceparent()


def prompt_attributes(prompt: str | None) -> dict[str, Any]:
    """{'qip.prompt': prompt} where the operator opted in (telemetry.record_prompts), else {}."""
    tracing = _tracing.get()
    return {"qip.prompt": prompt} if tracing is not None and tracing.record_prompts and prompt else {}


def enter(tracing: Tracing, request_span: Any) -> tuple[Token[Tracing | None], Token[Any]]:
    """Make `tracing` and `request_span` this context's (the request's); `leave` undoes it."""
    return _tracing.set(tracing), _request_span.set(request_span)


def leave(tokens: tuple[Token[Tracing | None], Token[Any]]) -> None:
    _tracing.reset(tokens[0])
    _request_span.reset(tokens[1])


def clean(attributes: dict[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float (or lists of them): None is left out, others are text."""
    return {k: v if isinstance(v, str | bool | int | float) else str(v)
            for k, v in attributes.items() if v is not None}
