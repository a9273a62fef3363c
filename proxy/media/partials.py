"""Partial images on their way to a stream: providers emit them, the SSE handler sends them.

The stream handler opens a sink (a context variable, so it reaches the route attempts it starts);
a provider that can preview calls `emit` from the event loop, or `threadsafe_emitter()`'s function
from any thread (the local engine's worker). Without an open sink (not a stream, or partial_images
is 0) emitting does nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class PartialImage:
    image_index: int  # which of the request's n images (0-based)
    partial_index: int  # 0, 1, ... in the order made
    data: bytes  # encoded in the request's output format
    format: str


class PartialSink:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[PartialImage] = asyncio.Queue()

    def put(self, partial: PartialImage) -> None:
        self.queue.put_nowait(partial)


_SINK: contextvars.ContextVar[PartialSink | None] = contextvars.ContextVar("qip_partial_sink", default=None)


def open_sink() -> PartialSink:
    """Start collecting partials for the current task and what it starts from now on."""
    sink = PartialSink()
    _SINK.set(sink)
    return sink


def partials_wanted() -> bool:
    """Whether the current request streams and collects partial images."""
    return _SINK.get() is not None


def emit(partial: PartialImage) -> None:
    sink = _SINK.get()
    if sink is not None:
        sink.put(partial)


def threadsafe_emitter() -> Callable[[PartialImage], None] | None:
    """A function other threads may call to emit into the current task's sink; None without a sink."""
    sink = _SINK.get()
    if sink is None:
        return None
    loop = asyncio.get_running_loop()

    def emit_threadsafe(partial: PartialImage) -> None:
        loop.call_soon_threadsafe(sink.put, partial)

    return emit_threadsafe
