"""Load the engine's pipeline: class (from the model's model_index.json), source, dtype, a GGUF
transformer (local_backend.single_file), quantization; then its placement (local_backend.offload,
planned before any weight is read when offload is auto).

The speed options (compile, cache, attention backend) are applied to the loaded pipeline by
local_backend.accel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .accel_options import TORCHAO, quant_skip, transformer_layers
from .config import DTYPES, OFFLOAD_MODES, PREVIEWS, TASKS, EngineConfig, default_dtype
from .edit import EDIT_PIPELINES, UNIFIED_PIPELINES, load_processor
from .errors import EngineError
from .exclusive import exclusive
from .offload import check_options, choose, place
from .single_file import check_gguf, gguf_file, load_transformer, transformer_config
from .tiny import EXTRAS_FILE, TINY_EDIT_VERSION, TINY_VERSION, tiny_pipeline_dir
from .tiny21 import TINY21_VERSION, tiny21_pipeline_dir

log = logging.getLogger(__name__)
if TYPE_CHECKING:
    import torch

Progress = Callable[[str], None]

# name -> (backend package, builder of the PipelineQuantizationConfig)
QUANTIZATIONS = ("int8", "nf4", "fp4", "int8wo", "float8wo")


# The devices a pipeline can be put on (torch's names, an index allowed: cuda:1). Anything else passed
# check-config and then failed the load with torch's RuntimeError (a traceback from `generate`).
DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:[0-9]+)?")


def validate_config(config: EngineConfig) -> None:
    """Fail early, with the field's name, on values that would only break later."""
    if config.device is not None and (not isinstance(config.device, str) or not DEVICE.fullmatch(config.device)):
        raise EngineError(f"device must be cpu, cuda or cuda:N (or mps, xpu), not {config.device!r}")
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
    if config.transformer is not None:
        if not isinstance(config.transformer, str) or not config.transformer.lower().endswith(".gguf"):
            raise EngineError(f"transformer must be a .gguf file, not {config.transformer!r}")
        if config.quantization is not None:
            raise EngineError(
                f"quantization {config.quantization!r} and a GGUF transformer cannot both apply: the GGUF file "
                "is already quantized (drop one of them)"
            )
    if config.task not in TASKS:
        raise EngineError(f"task must be one of {', '.join(TASKS)}, not {config.task!r}")
    if config.preview not in PREVIEWS:
        raise EngineError(f"preview must be one of {', '.join(PREVIEWS)}, not {config.preview!r}")
    check_options(config)  # text_encoder, gpu_memory, offload: auto
    tiny_task = {"tiny": "generate", "tiny-edit": "edit"}.get(config.model)  # tiny-2.1: both
    if tiny_task is not None and tiny_task != config.task:
        raise EngineError(f"model {config.model!r} is for task {tiny_task!r}, not {config.task!r}")


def resolve_device(config: EngineConfig) -> str:
    import torch

    if config.device:
        return config.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(config: EngineConfig, device: str) -> torch.dtype:
    import torch

    return getattr(torch, config.dtype or default_dtype(device))


def local_files_only(config: EngineConfig) -> bool:
    if config.local_files_only is not None:
        return config.local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _quantization_config(name: str, dtype: torch.dtype, skip: list[str] | None = None) -> Any:
    from diffusers import PipelineQuantizationConfig

    if name in ("int8", "nf4", "fp4"):
        if importlib.util.find_spec("bitsandbytes") is None:
            raise EngineError(
                f"quantization {name!r} needs the bitsandbytes package (pip install bitsandbytes)"
            )
        kwargs: dict[str, Any]
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
    # so only the transformer (the 20B part) is quantized with torchao. `skip`: the layers left in
    # the model's dtype (local_backend.accel_options.quant_skip).
    return PipelineQuantizationConfig(
        quant_mapping={"transformer": TorchAoConfig(quant_type, modules_to_not_convert=list(skip or []))}
    )


TINY_MODELS = ("tiny", "tiny-edit", "tiny-2.1")


def _text_encoder_quantization(existing: Any, name: str, dtype: torch.dtype) -> Any:
    """`existing` (a PipelineQuantizationConfig or None) plus the text encoder's own quantization
    (text_encoder.quantization): bitsandbytes int8 / nf4 on a GPU, torchao int8 weight-only anywhere."""
    import transformers
    from diffusers import PipelineQuantizationConfig

    te: Any  # a transformers quantization config
    if name == "int8wo":
        if importlib.util.find_spec("torchao") is None:
            raise EngineError("text_encoder.quantization int8wo needs the torchao package (pip install torchao)")
        from torchao.quantization import Int8WeightOnlyConfig

        te = transformers.TorchAoConfig(Int8WeightOnlyConfig())
    else:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise EngineError(f"text_encoder.quantization {name} needs the bitsandbytes package (pip install bitsandbytes)")
        te = (transformers.BitsAndBytesConfig(load_in_8bit=True) if name == "int8" else
              transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    mapping = dict(existing.quant_mapping or {}) if existing is not None else {}
    mapping["text_encoder"] = te
    return PipelineQuantizationConfig(quant_mapping=mapping)


def _model_source(config: EngineConfig, progress: Progress) -> str:
    if config.model == "tiny-2.1":
        progress(f"preparing the tiny pipeline ({TINY21_VERSION})")
        return str(tiny21_pipeline_dir())
    if config.model in ("tiny", "tiny-edit"):
        edit = config.model == "tiny-edit"
        progress(f"preparing the tiny pipeline ({TINY_EDIT_VERSION if edit else TINY_VERSION})")
        return str(tiny_pipeline_dir(edit=edit))
    return os.path.expanduser(config.model)


def _declared_class(source: str, local_only: bool) -> str | None:
    """The pipeline class a model declares in its model_index.json (None when it cannot be read here)."""
    try:
        if Path(source).is_dir():
            index = Path(source) / "model_index.json"
        else:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(source, "model_index.json", local_files_only=local_only))
        return json.loads(index.read_text()).get("_class_name")
    except Exception:  # from_pretrained will say what is wrong
        return None


def tiny_source(model: str) -> str:
    """The folder of a tiny model (built on first use)."""
    return _model_source(EngineConfig(model=model, task="edit" if model == "tiny-edit" else "generate"),
                         lambda stage: None)


def gguf_problem(config: EngineConfig) -> str | None:
    """Why the configured GGUF transformer cannot load here (None: it can, or there is none). Reads the
    file's header and builds the transformer on the meta device: no weights are read."""
    if not config.transformer:
        return None
    local_only = local_files_only(config)
    try:
        path = gguf_file(config.transformer, local_only)
        source = tiny_source(config.model) if config.model in TINY_MODELS else os.path.expanduser(config.model)
        check_gguf(path, config.transformer, transformer_config(source, local_only))
    except EngineError as e:
        return str(e)
    return None


def declared_pipeline(config: EngineConfig) -> str | None:
    """The pipeline class the configured model declares, read from disk only (no download, no torch):
    what the proxy needs to know before loading (whether the model edits, takes masks)."""
    known = {"tiny": "QwenImagePipeline", "tiny-edit": "QwenImageEditPlusPipeline",
             "tiny-2.1": "QwenImage21Pipeline"}
    if config.model in known:
        return known[config.model]
    return _declared_class(os.path.expanduser(config.model), True)


def _pipeline_class(config: EngineConfig, source: str, local_only: bool) -> Any:  # a pipeline class
    """The diffusers class the model declares in its model_index.json, checked against the task."""
    import diffusers

    declared = _declared_class(source, local_only)
    if declared in UNIFIED_PIPELINES:  # one model for both tasks
        return getattr(diffusers, declared)
    if config.task == "edit":
        if declared is not None and declared not in EDIT_PIPELINES:
            raise EngineError(
                f"model {config.model!r} is a {declared}, not an edit pipeline "
                f"({' or '.join(EDIT_PIPELINES)}): use task: generate, or an edit model"
            )
        return getattr(diffusers, declared or "QwenImageEditPlusPipeline")
    if declared in EDIT_PIPELINES:
        raise EngineError(f"model {config.model!r} is an edit pipeline ({declared}): set task: edit")
    return diffusers.QwenImagePipeline


def _area_scale(source: str) -> float | None:
    """The edit working-area factor a model folder asks for (the tiny edit model: local_backend.tiny)."""
    path = Path(source) / EXTRAS_FILE
    if not path.is_file():
        return None
    scale = json.loads(path.read_text()).get("edit_area_scale")
    if not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise EngineError(f"{path}: edit_area_scale must be a number in (0, 1]")
    return float(scale)


def _gguf_transformer(config: EngineConfig, source: str, dtype: torch.dtype, local_only: bool,
                      report: Progress) -> Any:  # a diffusers transformer
    spec = config.transformer
    if not spec:  # called only with one configured
        raise EngineError("no GGUF transformer is configured")
    path = gguf_file(spec, local_only)
    model_config = transformer_config(source, local_only)
    counts = check_gguf(path, spec, model_config)
    shown = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    report(f"loading the GGUF transformer {config.transformer} ({shown} tensors)")
    try:
        return load_transformer(path, source, model_config, dtype, local_only)
    except Exception as e:
        raise EngineError(f"could not load the GGUF transformer {config.transformer}: {type(e).__name__}: {e}") from e


def load_pipeline(config: EngineConfig, progress: Progress | None = None) -> Any:  # a diffusers pipeline
    """Return (pipeline, device, seconds). Raises EngineError with a readable message.

    An edit pipeline carries `working_area_scale` (None for real models: see local_backend.edit).
    from_pretrained patches torch for the whole process while it runs: one module-building step at a
    time per process, and nothing left patched after it (local_backend.exclusive).
    """
    with exclusive(progress):
        return _load_pipeline(config, progress)


def _load_pipeline(config: EngineConfig, progress: Progress | None = None) -> Any:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    report = progress or (lambda stage: None)
    validate_config(config)
    started = time.monotonic()
    device = resolve_device(config)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} was asked for but CUDA is not available")
    dtype = resolve_dtype(config, device)
    source = _model_source(config, report)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if not Path(source).is_dir():
        kwargs["local_files_only"] = local_files_only(config)
    if config.quantization:
        skip = None
        if config.quantization in TORCHAO:
            layers = transformer_layers(source, kwargs.get("local_files_only", True))
            skip = quant_skip(config, layers)
        shown = f", kept in {str(dtype).removeprefix('torch.')}: {', '.join(skip)}" if skip else ""
        report(f"preparing {config.quantization} quantization{shown}")
        kwargs["quantization_config"] = _quantization_config(config.quantization, dtype, skip)
    te_quant = (config.text_encoder or {}).get("quantization")
    if te_quant:
        report(f"preparing the text encoder's {te_quant} quantization")
        kwargs["quantization_config"] = _text_encoder_quantization(kwargs.get("quantization_config"), te_quant, dtype)

    local_only = kwargs.get("local_files_only", True)
    pipeline_class = _pipeline_class(config, source, local_only)
    # Before any weight is read: a model that fits nowhere fails now, not after minutes of loading.
    offload, te_device, placement = choose(config, source, device, report)
    if config.transformer:
        kwargs["transformer"] = _gguf_transformer(config, source, dtype, local_files_only(config), report)
    report(f"loading {config.model} ({str(dtype).removeprefix('torch.')})")
    try:
        if config.task == "edit" or pipeline_class.__name__ in UNIFIED_PIPELINES:
            hub = {} if Path(source).is_dir() else {"local_files_only": local_only}
            processor = "Qwen3VLProcessor" if pipeline_class.__name__ in UNIFIED_PIPELINES else "Qwen2VLProcessor"
            kwargs["processor"] = load_processor(source, hub, processor)
        pipe = pipeline_class.from_pretrained(source, **kwargs)
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
    if config.task == "edit" or pipeline_class.__name__ in UNIFIED_PIPELINES:
        pipe.working_area_scale = _area_scale(source)

    if config.scheduler:
        report("applying scheduler overrides")
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
            pipe.scheduler.config, **config.scheduler
        )

    place(pipe, offload, te_device, device, report)
    pipe.placement = placement  # what /ready shows (offload: auto: the pick and its estimate)
    # compile, cache and the attention backend: local_backend.accel, applied by the engine
    seconds = time.monotonic() - started
    report(f"loaded in {seconds:.1f}s")
    return pipe, device, seconds
