"""Optional stage hooks: a job's caller hears when each stage of its work starts and ends (for tracing).

A hook is any callable `hook(stage, attributes, start_ns=None) -> end`, and `end(attributes=None)` closes
the stage; times are time.time_ns(). The engine never needs one (GenerationParams.trace is None by
default) and imports nothing for it: the proxy fills it with OpenTelemetry spans. A hook that raises is
logged and ignored: tracing must never cost a job.

Stages of one job: queue_wait (submit to pick-up), then per pipeline call `call` (batch size, steps,
tier, cache level, size) holding text_encode (each prompt encoding), denoise (its steps), preview (each
partial image made) and vae_decode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Tracer

log = logging.getLogger("local_backend.engine")

End = Callable[..., None]
StageHook = Callable[..., End]
PREFIX = "qip.engine."


def _noop(attributes: dict | None = None) -> None:
    return None


def start(hook: StageHook | None, stage: str, attributes: dict, start_ns: int | None = None) -> End:
    """Tell one hook a stage started; the `end` to call when it is over (a no-op without a hook)."""
    if hook is None:
        return _noop
    try:
        end = hook(stage, attributes, start_ns)
    except Exception:
        log.exception("a stage hook failed")
        return _noop

    ended: list[bool] = []

    def safe_end(attributes: dict | None = None) -> None:
        if ended:  # once: a job dropped from the queue may be told twice
            return
        ended.append(True)
        try:
            end(attributes)
        except Exception:
            log.exception("a stage hook failed")

    return safe_end


class CallStages:
    """The hooks of the jobs sharing one pipeline call, told of its stages together.

    Text encoding and VAE decoding happen inside the pipeline's own __call__: `watch(pipe)` wraps the
    pipeline's encode_prompt and its VAE's decode for the length of the call (instance attributes,
    removed after). Denoising is the time between the last encoding and the first decode; its span is
    opened at the first step's end (start time: when the encoding ended) so previews nest inside it.
    """

    def __init__(self, hooks: list[StageHook]):
        self.hooks = hooks
        self._denoise: list[End] = []
        self._encoded_ns: int | None = None
        self.steps = 0
        self.previewing = False  # previews may decode with the VAE too: that is no vae_decode stage
        self.facts: dict = {}  # the call's steps, tier and cache level: the denoise stage's attributes

    @contextlib.contextmanager
    def stage(self, name: str, attributes: dict, start_ns: int | None = None) -> Iterator[None]:
        ends = [start(hook, name, attributes, start_ns) for hook in self.hooks]
        failed: dict[str, Any] = {}
        try:
            yield
        except BaseException as e:
            failed = {"error": type(e).__name__}
            raise
        finally:
            for end in ends:
                end(failed or None)

    def step(self, steps_done: int) -> None:
        """After each denoising step (from the step callback)."""
        self.steps = steps_done
        if not self._denoise:
            facts = {k: self.facts[k] for k in ("steps", "tier", "cache") if k in self.facts}
            self._denoise = [start(hook, "denoise", facts, self._encoded_ns) for hook in self.hooks]

    def _end_denoise(self) -> None:
        ends, self._denoise = self._denoise, []
        for end in ends:
            end({"steps_run": self.steps})

    @contextlib.contextmanager
    def watch(self, pipe: Any) -> Iterator[None]:
        """Wrap encode_prompt and vae.decode of `pipe` for this call; the denoise stage closes after it."""
        patched = []
        encode = getattr(pipe, "encode_prompt", None)
        vae = getattr(pipe, "vae", None)
        if encode is not None:
            def encode_prompt(*args: Any, **kwargs: Any) -> Any:
                with self.stage("text_encode", {}):
                    result = encode(*args, **kwargs)
                self._encoded_ns = time.time_ns()
                return result

            pipe.__dict__["encode_prompt"] = encode_prompt
            patched.append((pipe, "encode_prompt"))
        if vae is not None and hasattr(vae, "decode"):
            decode = vae.decode

            def vae_decode(*args: Any, **kwargs: Any) -> Any:
                if self.previewing:
                    return decode(*args, **kwargs)
                self._end_denoise()
                with self.stage("vae_decode", {}):
                    return decode(*args, **kwargs)

            vae.__dict__["decode"] = vae_decode
            patched.append((vae, "decode"))
        try:
            yield
        finally:
            for owner, name in patched:
                owner.__dict__.pop(name, None)
            self._end_denoise()  # interrupted, or a pipeline that decodes otherwise


class SpanStages:
    """A stage hook that makes each stage an OpenTelemetry span `engine.<stage>`, nested in the stage
    that is open (call > denoise > preview), all under `parent` (an OpenTelemetry Context). For callers
    that trace (the proxy, a pool's replica); OpenTelemetry is imported only when one is made."""

    def __init__(self, tracer: Tracer, parent: Context) -> None:
        from opentelemetry.trace import Status, StatusCode, set_span_in_context

        self._error = Status(StatusCode.ERROR)
        self._in_context = set_span_in_context
        self.tracer = tracer
        self.stack = [parent]
        self.lock = threading.Lock()  # queue_wait starts on the submitting thread, the rest on the worker

    def __call__(self, stage: str, attributes: dict, start_ns: int | None = None) -> End:
        with self.lock:
            parent = self.stack[-1]
        span = self.tracer.start_span(f"engine.{stage}", context=parent, start_time=start_ns,
                                      attributes=_prefixed(attributes))
        nested = self._in_context(span)
        if stage != "queue_wait":  # it ends before any other starts, on another thread
            with self.lock:
                self.stack.append(nested)

        def end(attributes: dict | None = None) -> None:
            if attributes:
                span.set_attributes(_prefixed(attributes))
                if "error" in attributes:
                    span.set_status(self._error)
            span.end()
            with self.lock, contextlib.suppress(ValueError):
                self.stack.remove(nested)

        return end


def _prefixed(attributes: dict) -> dict:
    """qip.engine.<name> for each attribute OpenTelemetry can hold (None left out, others as text)."""
    return {PREFIX + k: v if isinstance(v, str | bool | int | float) else str(v)
            for k, v in attributes.items() if v is not None}
