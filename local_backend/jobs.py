"""A submitted job and the small helpers that settle it: what the engine's queue holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING

from . import stages
from .config import GenerationParams, GenerationResult
from .errors import EngineError

if TYPE_CHECKING:
    from .loras import LoraRef


class Job:
    """One submitted request. `future` yields a GenerationResult or raises an EngineError.

    `on_cancel` is what cancelling it does (the engine that queued it drops or interrupts it): the job
    knows nothing of the engine."""

    def __init__(self, on_cancel: Callable[[Job], None], params: GenerationParams, plan: dict,
                 loras: list[LoraRef]) -> None:
        self.future: Future[GenerationResult] = Future()
        self.params = params
        self.seeds: list[int] = plan["seeds"]
        self.size: tuple[int, int] = plan["size"]  # what the caller gets
        self.gen_size: tuple[int, int] = plan["gen_size"]  # what the pipeline makes
        self.steps: int = plan["steps"]
        self.cfg: float = plan["cfg"]
        self.negative: str | None = plan["negative"]  # None: no CFG
        self.inputs: list = plan["images"]  # edits: the input images, RGB
        self.mask = plan["mask"]  # inpainting: "L", 255 = repaint
        self.preview_at: list[int] = plan["preview_at"]  # steps after which previews are due
        self.partials_sent: dict[int, int] = {}  # image index -> previews handed over (never twice)
        self.loras = loras  # the request's own (the tier's and the engine's base LoRAs join them)
        self.tier: str = plan["tier"]
        self.cache: str = plan["cache"]  # the cache-dit level it runs at (local_backend.accel)
        self.enhance: bool = plan["enhance"]  # its prompt is rewritten before its first call (then False)
        self.revised_prompt: str | None = None
        self.images: list = [None] * len(self.seeds)
        self.next_index = 0  # images handed to pipeline calls so far
        self.steps_run = 0
        self.batch_size = 0
        self.submitted_at = time.monotonic()
        # Its share of the pipeline calls' time: a call's seconds split by the images each job had in it.
        self.gpu_seconds = 0.0
        self.started_at: float | None = None
        self.cancelled = False
        self.deadline_hit = False
        self.picked_up = stages.start(params.trace, "queue_wait", {})  # ends when the worker takes it
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Drop the job if it waits; interrupt it at the next denoising step if it runs."""
        self._on_cancel(self)

    @property
    def ready(self) -> bool:  # its LoRA downloads, if any, are done
        return all(ref.ready for ref in self.loras)

    @property
    def remaining(self) -> int:
        return len(self.seeds) - self.next_index


def settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Complete a future unless the caller already cancelled it."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the set
        pass


def summary(exc: BaseException) -> str:
    """The exception's type and first line: safe to show, no traceback."""
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return type(exc).__name__ + (f": {detail}" if detail else "")


def is_oom(exc: BaseException) -> bool:
    return "OutOfMemory" in type(exc).__name__


def empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def wrap_error(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if is_oom(exc):
        return EngineError("out of GPU memory: try a smaller size, fewer images, or offload")
    return EngineError(f"generation failed: {summary(exc)}")
