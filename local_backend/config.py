"""The engine's public data types: what to load, what to generate, what comes back."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # PIL is only needed for the annotation
    from PIL.Image import Image

OFFLOAD_MODES = ("none", "model", "sequential", "group", "auto")
DTYPES = ("bfloat16", "float16", "float32")
TASKS = ("generate", "edit")
PREVIEWS = ("latent", "vae")


def default_dtype(device: str) -> str:
    """The dtype a pipeline loads in on `device` ("cpu", "cuda", "cuda:1") when the config sets none:
    float32 on the CPU, bfloat16 on a GPU. One rule for the loader and the memory plan, so that `plan`
    says what will really be loaded."""
    return "float32" if device.split(":")[0] == "cpu" else "bfloat16"


@dataclass
class LoraSpec:
    """A LoRA to load, named in the config or per request.

    `path` is a configured name, a .safetensors file under one of `lora_dirs`, a Hugging Face repo id
    ("owner/name" or "owner/name/weights.safetensors", local cache only) or an https URL whose host is
    in `lora_url_hosts`. For a configured name, the effective scale is the configured scale times
    this one.
    """

    path: str
    scale: float = 1.0


@dataclass
class TierSpec:
    """A speed tier: adapters and scheduler settings on the engine's one set of weights (local_backend.tiers).

    E.g. Lightning 8-step: loras=[LoraSpec(".../Qwen-Image-Lightning-8steps-V1.1.safetensors")], steps=8,
    cfg_scale=1.0 and the Lightning scheduler settings. A request's own num_inference_steps and
    cfg_scale still win over the tier's.
    """

    loras: list[LoraSpec] = field(default_factory=list)  # trusted (config) LoRAs, on for this tier's calls
    scheduler: dict = field(default_factory=dict)  # overrides on top of the engine's scheduler config
    steps: int | None = None  # None -> EngineConfig.default_steps
    cfg_scale: float | None = None  # None -> EngineConfig.default_cfg_scale


@dataclass
class PromptEnhancement:
    """Prompt rewriting with the pipeline's own text encoder before generation (local_backend.enhance).

    A job is rewritten when it asks (GenerationParams.prompt_enhancement=True), or when it does not
    say and `default` is true. A rewrite that fails, comes out empty or runs past `timeout` leaves the
    prompt as it was (GenerationResult.revised_prompt is then None).
    """

    max_new_tokens: int = 256  # at most this many tokens of rewritten prompt
    timeout: float = 20.0  # seconds of generation per rewrite
    instruction: str | None = None  # the system instruction; None: local_backend.enhance's for the task
    default: bool = False  # rewrite jobs that do not say


@dataclass
class EngineConfig:
    # "tiny" / "tiny-edit" = the tiny random pipelines (local_backend.tiny); else a folder or repo id
    model: str = "tiny"
    # generate: text-to-image (QwenImagePipeline); edit: an edit model (QwenImageEditPlusPipeline, or
    # QwenImageEditPipeline for the first Qwen-Image-Edit), whose jobs need input images
    task: str = "generate"
    device: str | None = None  # None = "cuda" if available else "cpu"
    dtype: str | None = None  # None = bfloat16 on cuda, float32 on cpu
    offload: str = "none"  # none | model | sequential | group | auto (local_backend.placement picks)
    quantization: str | None = None  # None | int8 | nf4 | fp4 (bitsandbytes) | int8wo | float8wo (torchao)
    # A GGUF transformer (local_backend.single_file): a .gguf file, or "owner/repo/file.gguf" from the
    # Hugging Face cache; the rest of the pipeline comes from `model`. None: the model's own transformer.
    transformer: str | None = None
    # Where the text encoder runs and in what precision (local_backend.placement):
    # {device: cpu | cuda, quantization: int8 | nf4 (bitsandbytes, GPU) | int8wo (torchao)}. None: with the
    # pipeline (its offload), in its dtype. Prompt enhancement runs wherever it is.
    text_encoder: dict | None = None
    # Cap on the GPU memory `offload: auto` plans with ("24GiB", or bytes); None: the GPU's free memory.
    gpu_memory: str | int | None = None
    # Speed options (local_backend.accel), all off by default. compile: torch.compile the transformer's
    # repeated blocks: true, or {warm_sizes: [[w, h], ...] | "table", mode, dynamic, fullgraph, backend}
    compile: bool | dict = False
    attention_backend: str | None = None  # diffusers' set_attention_backend name (flash, _flash_3, sage, ...)
    # cache-dit DBCache per fal `acceleration` level: true, or {regular: {...}, high: {...}, default: none}
    cache: bool | dict | None = None
    # int8wo / float8wo: module names left unquantized ("{last}": the last block); None: accel's default
    quantization_skip: list[str] | None = None
    max_batch: int = 4  # max images in one pipeline call
    max_queue: int = 16  # max waiting jobs; beyond -> QueueFullError
    max_pixels: int = 1328 * 1328 * 4  # width*height above -> InvalidParamsError
    default_steps: int = 50
    default_cfg_scale: float = 4.0
    scheduler: dict = field(default_factory=dict)  # FlowMatchEulerDiscreteScheduler config overrides
    loras: dict[str, LoraSpec] = field(default_factory=dict)  # named LoRAs usable by name in requests
    base_loras: list[LoraSpec] = field(default_factory=list)  # always active for this engine
    lora_dirs: list[str] = field(default_factory=list)  # allowed folders for request file paths
    lora_url_hosts: list[str] = field(default_factory=list)  # allowlist for https URLs (exact host)
    lora_cache_dir: str | None = None  # default ~/.cache/qwen-image-proxy/loras
    lora_max_bytes: int = 2 * 1024**3
    lora_cache_size: int = 8  # LRU of loaded adapters (base LoRAs are pinned and not counted)
    local_files_only: bool | None = None  # None = follow HF_HUB_OFFLINE
    preview: str = "latent"  # how partial images are made: latent (linear map, cheap) | vae (decoder pass)
    # Speed tiers by name (TierSpec, or a dict of its fields with LoRAs as paths or {path, scale});
    # "base" (no tier LoRAs, the defaults above) always exists and cannot be redefined.
    tiers: dict[str, TierSpec] = field(default_factory=dict)
    # OpenAI's `quality` (low | medium | high | auto | ...) -> tier name; an unmapped quality -> base
    quality_tiers: dict[str, str] = field(default_factory=dict)
    # Prompt rewriting with the text encoder (PromptEnhancement, or a dict of its fields); None: never
    prompt_enhancement: PromptEnhancement | None = None


@dataclass
class GenerationParams:
    prompt: str
    width: int = 1024
    height: int = 1024
    negative_prompt: str | None = None
    num_inference_steps: int | None = None  # None -> config default
    cfg_scale: float | None = None  # true_cfg_scale; None -> config default
    seed: int | None = None  # None -> random (returned); image i gets (seed + i) mod 2**32 (see planning)
    n: int = 1
    loras: list[LoraSpec] = field(default_factory=list)  # at most 3 (plus the engine's base_loras)
    deadline: float | None = None  # time.monotonic() deadline; past it the job is dropped/interrupted
    on_step: Callable[[int, int], None] | None = None  # (step, total_steps), from the worker thread
    # Edits (an engine with task="edit"): 1 to 3 input images (1 for the first Edit model), and an
    # optional mask the size of the first image: transparent pixels (or, without alpha, white ones)
    # are repainted, the rest is kept. A mask works with one input image.
    images: list[Image] = field(default_factory=list)
    mask: Image | None = None
    # Previews while the images are denoised: on_partial(image_index, partial_index, image) is called
    # partial_images times per image (0..3), from the worker thread; the preview is width x height.
    partial_images: int = 0
    on_partial: Callable[[int, int, Image], None] | None = None
    # A speed tier of EngineConfig.tiers (None: "base"); an unknown name -> InvalidParamsError("tier")
    tier: str | None = None
    # fal's acceleration (none | regular | high): the cache-dit level when EngineConfig.cache is set
    # (None: the cache's default level); without a cache it is checked and otherwise ignored
    acceleration: str | None = None
    # Rewrite the prompt first (EngineConfig.prompt_enhancement); None: that config's default. Without
    # a configured prompt_enhancement the engine never rewrites (True is then ignored).
    prompt_enhancement: bool | None = None
    # Told when each stage of the job starts and ends (local_backend.stages; the proxy's tracing): None: nothing
    trace: Callable[..., Callable[..., None]] | None = None


@dataclass
class GenerationResult:
    images: list[Image]  # exactly width x height each
    seeds: list[int]
    steps_run: int  # denoising steps actually run
    batch_size: int  # how many images shared the pipeline call(s)
    seconds: float  # time from pick-up by the worker to completion
    # The rewritten prompt the images were made from (prompt enhancement); None: the prompt as given
    revised_prompt: str | None = None
    # Seconds the job waited in the queue before the worker took it (its first call, for n > max_batch)
    queued_seconds: float = 0.0
    # The accelerator's time spent on this request's images (its share of each batched call).
    gpu_seconds: float = 0.0


def lora_spec(value: Any, where: str) -> LoraSpec:
    """A LoRA as the config writes it (a path, or {path, scale}) -> LoraSpec, checked now: a bad entry
    used to pass check-config and then fail every request naming it with a TypeError (a 502, three
    tracebacks in the log). Raises ValueError naming `where` (e.g. "loras.style")."""
    if isinstance(value, LoraSpec):
        spec = value
    elif isinstance(value, str):
        spec = LoraSpec(value)
    elif isinstance(value, dict):
        if set(value) - {"path", "scale"} or "path" not in value:
            raise ValueError(f"{where}: a LoRA is a path or {{path, scale}}, not {sorted(map(str, value))}")
        spec = LoraSpec(**value)
    else:
        raise ValueError(f"{where}: a LoRA is a path or {{path, scale}}")
    if not isinstance(spec.path, str) or not spec.path.strip():
        raise ValueError(f"{where}.path must be a non-empty string")
    scale = spec.scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{where}.scale must be a finite number, not {scale!r}")
    return spec


def plain_options(options: dict) -> dict:
    """models.yaml's spelling of EngineConfig fields -> their types (pure): LoRAs given as paths or
    {path, scale} become LoraSpec, empty entries of the path lists go, and tiers left empty become {}.
    Keys are neither checked nor dropped: the callers do that (the local provider, a Ray pool)."""

    values = dict(options)
    if "loras" in values:
        values["loras"] = {name: lora_spec(v, f"loras.{name}") for name, v in (values["loras"] or {}).items()}
    if "base_loras" in values:
        values["base_loras"] = [lora_spec(v, f"base_loras[{i}]") for i, v in enumerate(values["base_loras"] or [])]
    for key in ("lora_dirs", "lora_url_hosts"):
        if key in values:
            values[key] = [v for v in values[key] or [] if v]
    for key in ("tiers", "quality_tiers"):
        if key in values:
            values[key] = values[key] or {}
    return values
