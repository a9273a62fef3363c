"""How much memory a model takes, known before any weight is read: each component's parameters counted
on the meta device from its config.json, times the bytes a weight takes (dtype, GGUF file, quantization),
plus the activations of the largest call the route allows. local_backend.placement turns this into a
placement.

Where the configs come from: the model's own folder (or its Hugging Face cache), else the copies shipped
in local_backend/model_configs/ for the published models (so `qwen-image-proxy plan` works offline and
before a download): Qwen-Image's 20B transformer and VAE (diffusers' defaults are the real config), the
Qwen2.5-VL-7B-Instruct text encoder; Qwen-Image-2.1's 7B transformer and VAE (diffusers' defaults) and
its Qwen3-VL-8B-Instruct text encoder.

Activations are a model of the peak, not a measurement: the transformer holds about ACT_FACTOR copies
of its hidden states (batch x tokens x width) at once; Qwen-Image-2.1 also keeps the text and reference
tokens' keys and values of every block (its KV cache, for the conditional and the unconditional pass);
the VAE decoder about VAE_FACTOR copies of its first-stage feature map at full resolution, for one image
on a GPU (the engine decodes a batch one image at a time there), for the whole batch on the CPU. Check them
with bench/bench_engine.py --gpu (torch.cuda.max_memory_allocated) before trusting the last GiB.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import EngineConfig, default_dtype
from .errors import EngineError
from .tiny import tiny_pipeline_dir
from .tiny21 import tiny21_pipeline_dir

if TYPE_CHECKING:
    import torch

SHIPPED = Path(__file__).parent / "model_configs"
# Published repos -> the shipped configs of their architecture (the edit models share Qwen-Image's).
KNOWN_MODELS = {
    "Qwen/Qwen-Image": "qwen-image",
    "Qwen/Qwen-Image-2512": "qwen-image",
    "Qwen/Qwen-Image-Edit": "qwen-image",
    "Qwen/Qwen-Image-Edit-2509": "qwen-image",
    "Qwen/Qwen-Image-Edit-2511": "qwen-image",
    "Qwen/Qwen-Image-2.1": "qwen-image-2.1",
}
COMPONENTS = ("transformer", "text_encoder", "vae")
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Bytes per weight of the quantization options (bitsandbytes, torchao): the linear layers' share of
# the parameters dominates, so the whole count is charged at this rate (plus a little for scales).
QUANT_BYTES = {"int8": 1.0, "int8wo": 1.0, "float8wo": 1.0, "nf4": 0.55, "fp4": 0.55}
# Bits per weight of GGUF types (llama.cpp's block layouts), for a file not on this machine.
GGUF_BITS = {"Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K": 5.5, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K": 4.5, "Q4_0": 4.5,
             "Q4_1": 5.0, "Q3_K": 3.4375, "Q2_K": 2.625, "BF16": 16.0, "F16": 16.0, "F32": 32.0}
ACT_FACTOR = 16  # hidden-state copies live at once in a transformer block (qkv, attention out, MLP, residual)
VAE_FACTOR = 8  # feature-map copies live at once in the decoder's last stage
TEXT_TOKENS = 512  # prompt tokens budgeted (diffusers' max_sequence_length default)
TOKEN_PIXELS = 16 * 16  # one transformer token per 16x16 pixels (both families)
REFERENCE_PIXELS = 1024 * 1024  # edits and 2.1 work on references of about 1 MP


@dataclass
class ComponentSize:
    name: str
    params: int  # parameters, counted on the meta device
    bytes: int  # what its weights take in memory (dtype, GGUF file or quantization)
    precision: str  # bfloat16, GGUF Q4_K, int8...
    largest_leaf: int  # bytes of its largest leaf module (what group/sequential offload hold at once)
    width: int = 0  # hidden size (activations)
    blocks: int = 0  # transformer blocks (2.1's KV cache)


@dataclass
class Estimate:
    model: str
    family: str  # qwen-image | qwen-image-2.1
    components: dict[str, ComponentSize]
    activations: dict[str, int]  # bytes per phase: text_encoder, transformer, vae
    size: tuple[int, int]  # the largest image planned for
    batch: int
    references: int
    device: str = "cuda"  # what the plan is for: cuda (placements on a GPU) or cpu (a route with device: cpu)
    notes: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(c.bytes for c in self.components.values())


def component_configs(model: str, local_only: bool = True) -> tuple[dict[str, dict], str]:
    """{component: config dict} for the model and where they came from (its files, or the shipped copies)."""
    source = os.path.expanduser(model)
    if model in ("tiny", "tiny-edit"):  # the offline tiny models: built on first use (seconds)
        source = str(tiny_pipeline_dir(edit=model == "tiny-edit"))
    elif model == "tiny-2.1":
        source = str(tiny21_pipeline_dir())
    found = {}
    for name in COMPONENTS:
        config = _read_config(source, name, local_only)
        if config is not None:
            found[name] = config
    if len(found) == len(COMPONENTS):
        return found, source
    shipped = KNOWN_MODELS.get(model)
    if shipped is None:
        missing = ", ".join(n for n in COMPONENTS if n not in found)
        raise EngineError(
            f"cannot estimate {model}: its {missing} config.json is not on this machine, and it is not one of "
            f"the models whose configs ship with the proxy ({', '.join(KNOWN_MODELS)})"
        )
    return {name: json.loads((SHIPPED / shipped / name / "config.json").read_text()) for name in COMPONENTS}, \
        f"shipped configs ({shipped})"


def _read_config(source: str, name: str, local_only: bool) -> dict | None:
    try:
        if Path(source).is_dir():
            path = Path(source) / name / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, f"{name}/config.json")
            if not isinstance(cached, str):
                if local_only:
                    return None
                from huggingface_hub import hf_hub_download

                cached = hf_hub_download(source, f"{name}/config.json")
            path = Path(cached)
        return json.loads(path.read_text()) if path.is_file() else None
    except Exception:  # not there, not a repo id: the shipped copy, or a clear error above
        return None


def build_on_meta(name: str, config: dict) -> Any:  # a torch module on the meta device
    """The component as a module on the meta device (no memory): diffusers' or transformers' class."""
    import torch

    with torch.device("meta"):
        if "_class_name" in config:
            import diffusers

            cls = getattr(diffusers, config["_class_name"])
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        import transformers

        cls = getattr(transformers, (config.get("architectures") or ["AutoModel"])[0])
        return cls(cls.config_class.from_dict(config))


def count(module: torch.nn.Module, bytes_per_param: float) -> tuple[int, int, int]:
    """(parameters, weight bytes, bytes of the largest leaf module) of a module on any device."""
    params = sum(p.numel() for p in module.parameters())
    largest = 0
    for sub in module.modules():
        if next(sub.children(), None) is None:
            largest = max(largest, sum(p.numel() for p in sub.parameters(recurse=False)))
    return params, int(params * bytes_per_param), int(largest * bytes_per_param)


def _precision(config: EngineConfig, name: str, dtype: str) -> tuple[float | None, str]:
    """Bytes per weight of a component, and what to call it (None: the GGUF file decides)."""
    quant = None
    if name == "transformer":
        if config.transformer:
            return None, "GGUF"
        quant = config.quantization
    elif name == "text_encoder":  # its own option, else bitsandbytes' (which covers both); torchao: not it
        own = (config.text_encoder or {}).get("quantization")
        quant = own or (config.quantization if config.quantization in ("int8", "nf4", "fp4") else None)
    if quant:
        return QUANT_BYTES[quant], quant
    return DTYPE_BYTES[dtype], dtype


def gguf_bytes(path: str | None, spec: str, params: int) -> tuple[int, str]:
    """A GGUF transformer's weight bytes: the file's tensor data when the file is here, else its type's
    bits per weight (the type read from the name, e.g. ...-Q4_K_M.gguf)."""
    if path and Path(path).is_file():
        from gguf import GGUFReader

        reader = GGUFReader(path)
        kinds: dict[str, int] = {}
        for t in reader.tensors:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + int(t.n_elements)
        main = max(kinds, key=lambda kind: kinds[kind])
        return sum(int(t.n_bytes) for t in reader.tensors), f"GGUF {main}"
    upper = Path(spec).name.upper()
    kind = next((k for k in sorted(GGUF_BITS, key=len, reverse=True) if k in upper), None)
    if kind is None:
        raise EngineError(f"transformer: cannot tell the GGUF type of {spec} (not on this machine, no type in its name)")
    return int(params * GGUF_BITS[kind] / 8), f"GGUF {kind} (from the name)"


def estimate(config: EngineConfig, *, size: tuple[int, int] | None = None, batch: int | None = None,
             references: int | None = None, gguf_path: str | None = None, source: str | None = None) -> Estimate:
    """The memory estimate of `config`'s model for calls of up to `batch` images of `size` (default: the
    largest square under max_pixels, and max_batch), with `references` input images (default: 1 for a
    model that edits)."""
    configs, _ = component_configs(source or config.model, True if config.local_files_only is None
                                   else config.local_files_only)
    # A route with device: cpu loads in float32 unless its dtype says otherwise (local_backend.loading):
    # its plan counts those bytes. Without a device the plan is for a GPU (where auto places the model).
    device = "cpu" if (config.device or "cuda").split(":")[0] == "cpu" else "cuda"
    device_dtype = config.dtype or default_dtype(device)
    family = "qwen-image-2.1" if configs["transformer"].get("_class_name") == "QwenImage21Transformer2DModel" \
        else "qwen-image"
    components: dict[str, ComponentSize] = {}
    for name in COMPONENTS:
        module = build_on_meta(name, configs[name])
        per, label = _precision(config, name, device_dtype)
        params, weights, leaf = count(module, per if per is not None else DTYPE_BYTES[device_dtype])
        if per is None:
            weights, label = gguf_bytes(gguf_path, config.transformer or "", params)  # per is None: GGUF
            leaf = int(leaf * weights / max(1, params * DTYPE_BYTES[device_dtype]))
        width, blocks = _shape(name, configs[name])
        components[name] = ComponentSize(name, params, weights, label, leaf, width, blocks)
    if size is None:
        side = int((config.max_pixels ** 0.5) // 16 * 16)
        size = (side, side)
    batch = batch or config.max_batch
    edits = config.task == "edit" or family == "qwen-image-2.1"
    references = (1 if edits else 0) if references is None else references
    activations = _activations(family, components, size, batch, references, DTYPE_BYTES[device_dtype],
                               sliced_vae=device == "cuda")
    return Estimate(config.model, family, components, activations, size, batch, references, device)


def _shape(name: str, config: dict) -> tuple[int, int]:
    if name == "transformer":
        return int(config["num_attention_heads"]) * int(config["attention_head_dim"]), int(config["num_layers"])
    if name == "text_encoder":
        text = config.get("text_config") or config
        return int(text["hidden_size"]), int(text["num_hidden_layers"])
    return int(config.get("decoder_base_dim") or config.get("base_dim", 96)), 0


def _activations(family: str, parts: dict[str, ComponentSize], size: tuple[int, int], batch: int,
                 references: int, unit: int, sliced_vae: bool = True) -> dict[str, int]:
    """Peak activation bytes of each phase (see the module's docstring for the model)."""
    width, height = size
    image_tokens = width * height // TOKEN_PIXELS
    ref_tokens = references * REFERENCE_PIXELS // TOKEN_PIXELS
    transformer = parts["transformer"]
    tokens = image_tokens + ref_tokens + TEXT_TOKENS
    denoise = batch * tokens * transformer.width * unit * ACT_FACTOR
    if family == "qwen-image-2.1":  # keys and values of the text and reference tokens, every block, cond + uncond
        denoise += 2 * batch * transformer.blocks * (TEXT_TOKENS + ref_tokens) * 2 * transformer.width * unit
    encoder = parts["text_encoder"]
    vision_tokens = references * REFERENCE_PIXELS // (28 * 28) if references else 0
    text = batch * (TEXT_TOKENS + vision_tokens) * encoder.width * unit * ACT_FACTOR // 2
    # On a GPU the VAE is sliced: one image at a time (offload.place); on the CPU it decodes the batch at once.
    vae = (1 if sliced_vae else batch) * width * height * parts["vae"].width * unit * VAE_FACTOR
    return {"text_encoder": text, "transformer": denoise, "vae": vae}
