"""The local engine's speed options as models.yaml gives them: parsed, checked, and what can be known
of them before loading (local_backend.accel applies them at load and per call).

Malformed values (an unknown cache level or key, an unknown attention backend, a bad warm size) are
EngineError: a config error. What only this machine decides (a package not installed, a GPU-only
backend on a CPU route) is a warning: the route serves without that option.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import EngineConfig
from .errors import EngineError

LEVELS = ("none", "regular", "high")  # fal's `acceleration` values
# Starting points, from cache-dit's defaults (regular: its DBCacheConfig defaults, F8B0, threshold
# 0.08, 8 warm-up steps) and from the settings vllm-omni documents for Qwen-Image (high: F1B0,
# threshold 0.24, 4 warm-up steps). Measure before changing them: see bench/bench_engine.py --gpu.
DEFAULT_LEVELS = {
    "regular": {"Fn_compute_blocks": 8, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.08,
                "max_warmup_steps": 8},
    "high": {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": 0.24,
             "max_warmup_steps": 4},
}
# name -> (minimum, integer?) for the DBCache settings a level may set
LEVEL_KEYS = {
    "Fn_compute_blocks": (1, True),
    "Bn_compute_blocks": (0, True),
    "residual_diff_threshold": (0.0, False),
    "max_warmup_steps": (0, True),
    "warmup_interval": (1, True),
    "max_cached_steps": (-1, True),  # -1: no limit
    "max_continuous_cached_steps": (-1, True),
}
# Qwen-Image's own aspect-ratio table: what `warm_sizes: table` means without the proxy (the proxy
# replaces "table" with the sizes of the models its route serves).
NATIVE_SIZES = [(1328, 1328), (1664, 928), (928, 1664), (1472, 1104), (1104, 1472), (1584, 1056), (1056, 1584)]
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_KEYS = ("warm_sizes", "mode", "dynamic", "fullgraph", "backend")
DEFAULT_QUANT_SKIP = ["img_in", "txt_in", "time_text_embed", "norm_out", "proj_out",
                      "transformer_blocks.0", "transformer_blocks.{last}"]
TORCHAO = ("int8wo", "float8wo")
# Attention backends that run on the CPU (the others need CUDA, or an NPU / XLA device).
CPU_BACKENDS = ("native", "_native_math", "flex")


@dataclass
class CompileSpec:
    warm_sizes: list[tuple[int, int]] = field(default_factory=list)  # [] -> one small check call
    mode: str | None = None  # torch.compile mode
    dynamic: bool | None = None  # None: torch decides (a second shape makes the graph dynamic)
    fullgraph: bool = True
    backend: str = "inductor"


@dataclass
class CacheSpec:
    levels: dict[str, dict]  # "regular" / "high" -> DBCache settings
    default: str = "none"  # the level of a request that does not say


def installed(package: str) -> bool:
    """Whether a package can be imported here (without importing it)."""
    return importlib.util.find_spec(package) is not None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_sizes(value: object, where: str) -> list[tuple[int, int]] | str:
    if value == "table":
        return "table"
    if not isinstance(value, (list, tuple)):
        raise EngineError(f'{where} must be "table" or a list of [width, height] pairs')
    sizes = []
    for item in value:
        if isinstance(item, str) and "x" in item:  # "1024x1024" works too
            item = item.split("x", 1)
            item = [int(v) if v.strip().isdigit() else v for v in item]
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not all(_is_int(v) and v > 0 for v in item)):
            raise EngineError(f'{where}: {item!r} is not a [width, height] pair of positive integers')
        sizes.append((int(item[0]), int(item[1])))
    return sizes


def parse_compile(value: object) -> CompileSpec | None:
    """EngineConfig.compile -> CompileSpec (None: off). Raises EngineError naming the bad field."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileSpec()
    if not isinstance(value, dict):
        raise EngineError("compile must be true, false or a mapping of " + ", ".join(COMPILE_KEYS))
    unknown = set(value) - set(COMPILE_KEYS)
    if unknown:
        raise EngineError(f"compile: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"known: {', '.join(COMPILE_KEYS)}")
    spec = CompileSpec()
    if "warm_sizes" in value:
        sizes = parse_sizes(value["warm_sizes"] or [], "compile.warm_sizes")
        spec.warm_sizes = list(NATIVE_SIZES) if isinstance(sizes, str) else sizes  # "table"
    if value.get("mode") not in COMPILE_MODES:
        raise EngineError(f"compile.mode must be one of {', '.join(str(m) for m in COMPILE_MODES[1:])}")
    spec.mode = value.get("mode")
    if value.get("dynamic") not in (None, True, False):
        raise EngineError("compile.dynamic must be true, false or null")
    spec.dynamic = value.get("dynamic")
    if not isinstance(value.get("fullgraph", True), bool):
        raise EngineError("compile.fullgraph must be true or false")
    spec.fullgraph = value.get("fullgraph", True)
    backend = value.get("backend", "inductor")
    if not isinstance(backend, str) or not backend:
        raise EngineError("compile.backend must be a torch.compile backend name (e.g. inductor)")
    spec.backend = backend
    return spec


def _level(name: str, value: object) -> dict:
    where = f"cache.{name}"
    if value is None or value is True:
        value = {}
    if not isinstance(value, dict):
        raise EngineError(f"{where} must be a mapping of DBCache settings ({', '.join(LEVEL_KEYS)})")
    unknown = set(value) - set(LEVEL_KEYS)
    if unknown:
        raise EngineError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          f"known: {', '.join(LEVEL_KEYS)}")
    settings = {**DEFAULT_LEVELS[name], **value}
    for key, v in settings.items():
        low, integer = LEVEL_KEYS[key]
        ok = _is_int(v) if integer else (isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and math.isfinite(v))
        if not ok or v < low or (key == "residual_diff_threshold" and v <= 0):
            kind = "an integer" if integer else "a number"
            raise EngineError(f"{where}.{key} must be {kind} {'above' if not integer else '>='} {low}")
    return settings


def parse_cache(value: object) -> CacheSpec | None:
    """EngineConfig.cache -> CacheSpec (None: off). `true` means both levels with their defaults."""
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise EngineError("cache must be true, false or a mapping of level -> DBCache settings "
                          "(levels: regular, high; and default: the level of requests that do not say)")
    unknown = set(value) - {"regular", "high", "default"}
    if unknown:
        extra = " (none is built in: no cache)" if "none" in unknown else ""
        raise EngineError(f"cache: unknown level(s) {', '.join(sorted(map(str, unknown)))}{extra}; "
                          "known: regular, high, default")
    default = value.get("default", "none")
    if default not in LEVELS:
        raise EngineError(f"cache.default must be one of {', '.join(LEVELS)}")
    return CacheSpec({name: _level(name, value.get(name)) for name in ("regular", "high")}, default)


def attention_backends() -> list[str]:
    """The attention backend names this diffusers knows."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def check_attention_backend(name: object) -> None:
    if name is None:
        return
    known = attention_backends()
    if name not in known:
        raise EngineError(f"attention_backend {name!r} is not one of diffusers' backends: {', '.join(known)}")


def check_skip(config: EngineConfig) -> None:
    skip = config.quantization_skip
    if skip is None:
        return
    if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) and s.strip() for s in skip):
        raise EngineError("quantization_skip must be a list of module names (e.g. img_in, transformer_blocks.0)")
    if config.quantization not in TORCHAO:
        raise EngineError(f"quantization_skip applies to quantization {' or '.join(TORCHAO)}, "
                          f"not {config.quantization!r}")


def validate(config: EngineConfig) -> tuple[CompileSpec | None, CacheSpec | None]:
    """Check every speed option; EngineError names the bad field. Returns the parsed compile and cache."""
    compile_spec, cache_spec = parse_compile(config.compile), parse_cache(config.cache)
    if config.attention_backend is not None and not isinstance(config.attention_backend, str):
        raise EngineError("attention_backend must be a backend name")
    check_attention_backend(config.attention_backend)
    check_skip(config)
    return compile_spec, cache_spec


def cache_configured(config: EngineConfig) -> bool:
    return config.cache not in (None, False)


def static_warnings(config: EngineConfig, device: str) -> list[str]:
    """What would leave an option off here, known without loading (for check-config and /ready)."""
    found = []
    if cache_configured(config) and not installed("cache_dit"):
        found.append("cache: cache-dit is not installed (pip install cache-dit); serving without block caching")
    name = config.attention_backend
    if name is not None and name in attention_backends():
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _check_attention_backend_requirements,
        )

        try:
            _check_attention_backend_requirements(AttentionBackendName(name))
        except Exception as e:
            found.append(f"attention_backend {name}: {first_line(e)}; serving with diffusers' default attention")
        else:
            if device == "cpu" and name not in CPU_BACKENDS:
                found.append(f"attention_backend {name} needs a GPU and this route runs on the CPU; "
                             "serving with diffusers' default attention")
    return found


def static_problems(config: EngineConfig, device: str) -> list[str]:
    """What would make the load fail, known without loading (quantization stays a load failure)."""
    if config.quantization in TORCHAO and not installed("torchao"):
        return [f"quantization {config.quantization} needs the torchao package (pip install torchao)"]
    return []


def transformer_layers(source: str, local_only: bool) -> int | None:
    """The transformer's block count from its config.json (None when it cannot be read here)."""
    try:
        if Path(source).is_dir():
            path = Path(source) / "transformer" / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "transformer/config.json", local_files_only=local_only))
        return int(json.loads(path.read_text())["num_layers"])
    except Exception:  # from_pretrained will say what is wrong
        return None


def quant_skip(config: EngineConfig, layers: int | None) -> list[str]:
    """The module names torchao leaves unquantized, "{last}" resolved (Qwen-Image has 60 blocks)."""
    names = DEFAULT_QUANT_SKIP if config.quantization_skip is None else config.quantization_skip
    last = (layers or 60) - 1
    return list(dict.fromkeys(name.strip().replace("{last}", str(last)) for name in names))


def skipped(module_name: str, skip: list[str]) -> bool:
    """Whether torchao leaves this module unquantized: the rule diffusers' modules_to_not_convert
    applies to parameter names, for module names (what bench/bench_engine.py quantizes with)."""
    return any(key + "." in module_name + "." for key in skip)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300].rstrip(".") if str(exc).strip() else ""
    return type(exc).__name__ + (f": {text}" if text else "")
