"""The engine's exceptions. Messages are short and safe to show to a client (no tracebacks)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class: anything the local engine raises on purpose."""


class QueueFullError(EngineError):
    """Too many jobs are waiting. `retry_after` is an estimate in seconds."""

    def __init__(self, message: str = "the local engine's queue is full", retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidParamsError(EngineError):
    """The request itself is wrong; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class LoraError(InvalidParamsError):
    """A LoRA could not be resolved, read or applied."""

    def __init__(self, message: str, param: str | None = "loras") -> None:
        super().__init__(message, param)


class JobCancelledError(EngineError):
    """The job was cancelled before it finished. `steps_run` says how far it got."""

    def __init__(self, message: str = "the job was cancelled", steps_run: int = 0) -> None:
        super().__init__(message)
        self.steps_run = steps_run


class DeadlineExceededError(JobCancelledError):
    """The job's deadline passed while it waited or ran."""

    def __init__(self, message: str = "the job's deadline passed", steps_run: int = 0) -> None:
        super().__init__(message, steps_run)
