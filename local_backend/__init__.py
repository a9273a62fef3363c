"""In-process Qwen-Image generation with diffusers: one pipeline on one worker thread.

Usable on its own::

    from local_backend import Engine, EngineConfig, GenerationParams
    with Engine(EngineConfig(model="tiny")) as engine:
        result = engine.generate_sync(GenerationParams("a cat", width=256, height=256))
    with Engine(EngineConfig(model="tiny-edit", task="edit")) as engine:  # edits: 1-3 input images
        edited = engine.generate_sync(GenerationParams("make it red", 256, 256, images=result.images))
    with Engine(EngineConfig(model="tiny-2.1")) as engine:  # Qwen-Image-2.1: generates, and edits with 1-10 images
        both = engine.generate_sync(GenerationParams("a cat", 64, 64, images=[]))

Importing this package does not import torch or diffusers; loading a pipeline does.
"""

from .config import EngineConfig, GenerationParams, GenerationResult, LoraSpec
from .engine import Engine
from .errors import (
    DeadlineExceededError,
    EngineError,
    InvalidParamsError,
    JobCancelledError,
    LoraError,
    QueueFullError,
)
from .jobs import Job
from .tiny import build_tiny_edit_pipeline, build_tiny_pipeline

__all__ = [
    "DeadlineExceededError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "GenerationParams",
    "GenerationResult",
    "InvalidParamsError",
    "Job",
    "JobCancelledError",
    "LoraError",
    "LoraSpec",
    "QueueFullError",
    "build_tiny_edit_pipeline",
    "build_tiny_pipeline",
]
