"""Load a QwenImagePipeline for the engine: source, dtype, device, offload, quantization, compile."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .config import DTYPES, OFFLOAD_MODES, EngineConfig
from .errors import EngineError

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

# name -> (backend package, builder of the PipelineQuantizationConfig)
QUANTIZATIONS = ("int8", "nf4", "fp4", "int8wo", "float8wo")


def validate_config(config: EngineConfig) -> None:
    """Fail early, with the field's name, on values that would only break later."""
    if config.offload not in OFFLOAD_MODES:
        raise EngineError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {config.offload!r}")
    if config.dtype is not None and config.dtype not in DTYPES:
        raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, not {config.dtype!r}")
    if config.quantization is not None and config.quantization not in QUANTIZATIONS:
        raise EngineError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {config.quantization!r}"
        )
    for name in ("max_batch", "max_queue", "max_pixels", "default_steps", "lora_cache_size"):
        if getattr(config, name) < 1:
            raise EngineError(f"{name} must be at least 1")


def resolve_device(config: EngineConfig) -> str:
    import torch

    if config.device:
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(config: EngineConfig, device: str):
    import torch

    name = config.dtype or ("float32" if device == "cpu" else "bfloat16")
    return getattr(torch, name)


def local_files_only(config: EngineConfig) -> bool:
    if config.local_files_only is not None:
        return config.local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _quantization_config(name: str, dtype):
    from diffusers import PipelineQuantizationConfig

    if name in ("int8", "nf4", "fp4"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise EngineError(
                f"quantization {name!r} needs the bitsandbytes package (pip install bitsandbytes)"
            )
        if name == "int8":
            backend, kwargs = "bitsandbytes_8bit", {"load_in_8bit": True}
        else:
            backend = "bitsandbytes_4bit"
            kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": name, "bnb_4bit_compute_dtype": dtype}
        return PipelineQuantizationConfig(
            quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=["transformer", "text_encoder"]
        )
    if importlib.util.find_spec("torchao") is None:
        raise EngineError(f"quantization {name!r} needs the torchao package (pip install torchao)")
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    quant_type = Int8WeightOnlyConfig() if name == "int8wo" else Float8WeightOnlyConfig()
    # diffusers' TorchAoConfig takes AOBaseConfig objects, which transformers' does not share,
    # so only the transformer (the 20B part) is quantized with torchao.
    return PipelineQuantizationConfig(quant_mapping={"transformer": TorchAoConfig(quant_type)})


def _model_source(config: EngineConfig, progress: Progress) -> str:
    if config.model == "tiny":
        from .tiny import TINY_VERSION, tiny_pipeline_dir

        progress(f"preparing the tiny pipeline ({TINY_VERSION})")
        return str(tiny_pipeline_dir())
    return os.path.expanduser(config.model)


def _place(pipe, config: EngineConfig, device: str, progress: Progress) -> None:
    import torch

    offload = config.offload
    if offload != "none" and device == "cpu":
        log.warning("offload=%s has no effect on the CPU; ignored", offload)
        offload = "none"
    if offload == "none":
        progress(f"moving the pipeline to {device}")
        pipe.to(device)
    elif offload == "model":
        progress("enabling model CPU offload")
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        progress("enabling sequential CPU offload")
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        progress("enabling group offload")
        # leaf_level + a CUDA stream prefetches the next layer while this one runs: close to
        # no-offload speed at a fraction of the memory (diffusers' own recommendation).
        is_cuda = torch.device(device).type == "cuda"
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=is_cuda,
        )


def load_pipeline(config: EngineConfig, progress: Progress | None = None):
    """Return (pipeline, device, seconds). Raises EngineError with a readable message."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    report = progress or (lambda stage: None)
    validate_config(config)
    started = time.monotonic()
    device = resolve_device(config)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} was asked for but CUDA is not available")
    dtype = resolve_dtype(config, device)
    source = _model_source(config, report)
    kwargs = {"dtype": dtype}
    if not Path(source).is_dir():
        kwargs["local_files_only"] = local_files_only(config)
    if config.quantization:
        report(f"preparing {config.quantization} quantization")
        kwargs["quantization_config"] = _quantization_config(config.quantization, dtype)

    report(f"loading {config.model} ({str(dtype).removeprefix('torch.')})")
    try:
        pipe = QwenImagePipeline.from_pretrained(source, **kwargs)
    except EngineError:
        raise
    except Exception as exc:  # from_pretrained raises many kinds; keep the message, drop the trace
        hint = (
            " (offline: only the local Hugging Face cache is used)" if kwargs.get("local_files_only") else ""
        )
        raise EngineError(
            f"could not load model {config.model!r}{hint}: {type(exc).__name__}: {exc}"
        ) from exc
    pipe.set_progress_bar_config(disable=True)

    if config.scheduler:
        report("applying scheduler overrides")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, **config.scheduler
        )

    _place(pipe, config, device, report)
    if config.compile:
        report("compiling the transformer")
        # Regional compilation: every transformer block shares one compiled graph, so the
        # first call compiles in seconds instead of minutes, at the same speed.
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    seconds = time.monotonic() - started
    report(f"loaded in {seconds:.1f}s")
    return pipe, device, seconds
