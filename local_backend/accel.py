"""Speed options of the local engine: attention backend, compilation, block caching, FP8 skip list.

Each option is off unless models.yaml turns it on (EngineConfig.attention_backend, compile, cache,
quantization_skip), and each is applied at load by `Accel`:

- attention_backend: diffusers' `transformer.set_attention_backend(name)` ("flash", "_flash_3",
  "sage", "native", ...). A name diffusers does not know is a config error; a backend that cannot
  run here (its package missing, no CUDA) leaves diffusers' default attention, reported.
- compile: torch.compile of the transformer's repeated blocks (regional compilation: every block
  shares one compiled graph, seconds to compile rather than minutes), then a short warm-up call
  (2 steps) per pre-warmed shape so the first real request does not pay for compiling. `true`
  compiles and checks the compiled model with one small call; a mapping (CompileSpec) names the
  shapes to warm and torch.compile's mode, dynamic, fullgraph and backend. A compile that fails
  (no C compiler, a graph break with fullgraph) leaves the blocks uncompiled, reported.
- cache: cache-dit's DBCache (dual block cache), one set of thresholds per fal `acceleration`
  level ("none" = off, "regular", "high"), chosen per request. cache-dit is enabled once on the
  transformer alone (a persistent context, no patching of the pipeline class); before each call the
  level's settings are loaded into that context with refresh_context (with the call's step count
  and whether it runs CFG), and a "none" call runs the transformer's own forward, untouched, so it
  gives exactly the image of an engine without cache. Levels never share a pipeline call (the level
  is part of the engine's batch key). cache-dit missing or failing leaves the engine without cache,
  reported; requests asking for a level then run uncached.
- quantization_skip: the layers torchao's int8wo / float8wo leave in the model's dtype (module name
  parts, as diffusers' TorchAoConfig modules_to_not_convert matches them; "{last}" is the index of
  the last transformer block). By default the input embedders, the output norm and projection and
  the first and last blocks, the layers that lose the most when quantized.

Why "serve without it, reported" rather than "route unavailable": every option here only changes
speed (or, for cache levels, trades a little fidelity for speed on request); the model still makes
correct images without it, so the route stays up and /ready and `check-config` carry the reason.
Quantization is the exception and stays a load failure (local_backend.loading): it is chosen to make
the model fit, and loading without it may not fit at all.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import EngineConfig
from .errors import EngineError, InvalidParamsError

log = logging.getLogger(__name__)
Progress = Callable[[str], None]

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
PROBE_SIZE = (256, 256)  # the check call's size when no shape is to be warmed
WARM_STEPS = 2
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_sizes(value, where: str) -> list[tuple[int, int]] | str:
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


def parse_compile(value) -> CompileSpec | None:
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
        spec.warm_sizes = list(NATIVE_SIZES) if sizes == "table" else sizes
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


def _level(name: str, value) -> dict:
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


def parse_cache(value) -> CacheSpec | None:
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


def check_attention_backend(name) -> None:
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
            found.append(f"attention_backend {name}: {_first_line(e)}; serving with diffusers' default attention")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0][:300].rstrip(".") if str(exc).strip() else ""
    return type(exc).__name__ + (f": {text}" if text else "")


class Accel:
    """The speed options of one engine: applied once at load, then per call (cache levels)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.compile_spec, self.cache_spec = validate(config)
        self.warnings: list[str] = []  # options left off at load, with the reason
        self.compiled = False
        self.attention: str | None = None  # the backend set, once it worked
        self.levels: dict[str, object] = {}  # cache level -> its DBCacheConfig fields, once enabled
        self._transformer = None
        self._plain_forward = None  # the transformer's forward without cache-dit (None: the class's)
        self._cached_forward = None

    # ----- per request -----

    def level(self, acceleration) -> str:
        """The cache level a job runs at: its acceleration (or the configured default), "none" when
        that level is not enabled. A value outside none/regular/high -> InvalidParamsError."""
        if acceleration is not None and acceleration not in LEVELS:
            raise InvalidParamsError(f"acceleration must be one of {', '.join(LEVELS)}", "acceleration")
        if self.cache_spec is None:
            return "none"
        wanted = acceleration if acceleration is not None else self.cache_spec.default
        return wanted if wanted in self.levels else "none"

    @contextlib.contextmanager
    def call(self, level: str, steps: int, cfg: bool):
        """Around one pipeline call: the cache level's settings, or the transformer untouched."""
        if level == "none" or level not in self.levels:
            yield
            return
        import cache_dit

        settings = dict(self.levels[level], num_inference_steps=steps, enable_separate_cfg=cfg)
        transformer = self._transformer
        transformer.forward = self._cached_forward
        try:
            cache_dit.refresh_context(transformer, cache_config=cache_dit.DBCacheConfig(**settings))
            yield
        finally:
            self._restore_forward()

    def summary(self) -> dict:
        """What /v1/models and the bench show: the enabled options."""
        return {"attention_backend": self.attention, "compiled": self.compiled,
                "cache_levels": ["none", *self.levels] if self.levels else []}

    # ----- at load -----

    def prepare(self, pipe, device: str, progress: Progress) -> None:
        """Attention backend, cache and compile, in that order; a failing option is left off, reported."""
        transformer = pipe.transformer
        self._transformer = transformer
        name = self.config.attention_backend
        if name is not None:
            progress(f"setting the attention backend to {name}")
            problem = next((w for w in static_warnings(self.config, str(device).split(":")[0])
                            if w.startswith("attention_backend")), None)
            if problem:
                self._warn(problem)
            else:
                try:
                    transformer.set_attention_backend(name)
                    self.attention = name
                except Exception as e:
                    self._warn(f"attention_backend {name}: {_first_line(e)}; serving with diffusers' default attention")
        if self.cache_spec is not None:
            self._enable_cache(transformer, progress)
        if self.compile_spec is not None:
            spec = self.compile_spec
            progress(f"compiling the transformer's repeated blocks ({spec.backend}"
                     f"{', mode ' + spec.mode if spec.mode else ''})")
            try:
                transformer.compile_repeated_blocks(fullgraph=spec.fullgraph, dynamic=spec.dynamic,
                                                    mode=spec.mode, backend=spec.backend)
                self.compiled = True
            except Exception as e:
                self._uncompile()
                self._warn(f"compile: {_first_line(e)}; serving uncompiled")

    def _enable_cache(self, transformer, progress: Progress) -> None:
        if not installed("cache_dit"):
            self._warn("cache: cache-dit is not installed (pip install cache-dit); serving without block caching")
            return
        if self.config.offload == "group":
            self._warn("cache: cache-dit does not work with group offload; serving without block caching")
            return
        blocks = len(getattr(transformer, "transformer_blocks", []))
        usable = {}
        for name, settings in self.cache_spec.levels.items():
            computed = settings["Fn_compute_blocks"] + settings["Bn_compute_blocks"]
            if computed >= blocks:
                self._warn(f"cache.{name}: Fn_compute_blocks + Bn_compute_blocks = {computed} leaves none of "
                           f"the model's {blocks} blocks to cache; requests at {name} run uncached")
            else:
                usable[name] = settings
        if not usable:
            return
        progress(f"enabling cache-dit block caching (levels {', '.join(usable)})")
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # its INFO logs print tables per call
        try:
            import cache_dit

            self._plain_forward = transformer.__dict__.get("forward")  # accelerate's offload hook, if any
            first = next(iter(usable.values()))
            cache_dit.enable_cache(transformer, cache_config=cache_dit.DBCacheConfig(**first))
            self._cached_forward = transformer.__dict__.get("forward")
            if self._cached_forward is None or self._cached_forward is self._plain_forward:
                raise EngineError("cache-dit did not wrap the transformer's forward")
        except Exception as e:
            self._restore_forward()
            self._warn(f"cache: cache-dit could not be enabled ({_first_line(e)}); serving without block caching")
            return
        self._restore_forward()  # plain by default: only calls at a cache level run the cached forward
        self.levels = usable

    def _restore_forward(self) -> None:
        transformer = self._transformer
        if transformer is None:
            return
        if self._plain_forward is None:
            transformer.__dict__.pop("forward", None)
        else:
            transformer.forward = self._plain_forward

    def _uncompile(self) -> None:
        for module in self._transformer.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
        self.compiled = False

    def _reset_attention(self) -> None:
        reset = getattr(self._transformer, "reset_attention_backend", None)
        if reset is not None:
            reset()
        else:
            self._transformer.set_attention_backend("native")
        self.attention = None

    def warm_up(self, pipe, progress: Progress, gen_size: Callable[[int, int], tuple[int, int]],
                max_batch: int, edit: bool = False) -> None:
        """Compile (and check) at load: 2-step calls at each warmed shape, then a batch of 2 and each
        cache level at the first shape. Without compile, one small call checks the attention backend.
        A failure turns compile off, then the attention backend, and says so; the engine fails to load
        only when the model cannot run even without them."""
        if not self.compiled and self.attention is None:
            return
        sizes = [PROBE_SIZE]
        if self.compiled and self.compile_spec.warm_sizes:
            sizes = list(self.compile_spec.warm_sizes)
        made = []
        for w, h in sizes:
            try:
                made.append(gen_size(w, h))
            except EngineError as e:  # e.g. larger than max_pixels: nothing to warm there
                self._warn(f"compile.warm_sizes: {w}x{h} skipped ({e})")
        sizes = list(dict.fromkeys(made)) or [gen_size(*PROBE_SIZE)]
        calls = [(size, 1, "none") for size in sizes]
        if self.compiled:
            if max_batch > 1:
                calls.append((sizes[0], 2, "none"))  # the batch dimension, once
            calls += [(sizes[0], 1, level) for level in self.levels]
        what = "warming up the compiled transformer" if self.compiled else "checking the attention backend"
        for i, (size, batch, level) in enumerate(calls):
            shown = f"{size[0]}x{size[1]}" + (f", batch {batch}" if batch > 1 else "")
            shown += f", cache {level}" if level != "none" else ""
            progress(f"{what}: {shown} ({i + 1}/{len(calls)})")
            if not self._try(pipe, size, batch, level, edit):
                return

    def _try(self, pipe, size, batch, level, edit) -> bool:
        """One warm-up call; on failure drop compile, then the attention backend. False: stop warming."""
        while True:
            try:
                self._warm_call(pipe, size, batch, level, edit)
                return True
            except Exception as e:
                if self.compiled:
                    self._uncompile()
                    self._warn(f"compile: the warm-up call failed ({_first_line(e)}); serving uncompiled")
                elif self.attention is not None:
                    name = self.attention
                    self._reset_attention()
                    self._warn(f"attention_backend {name}: a check call failed ({_first_line(e)}); "
                               "serving with diffusers' default attention")
                else:
                    raise EngineError(f"the model failed a check call at {size[0]}x{size[1]}: "
                                      f"{_first_line(e)}") from e
                if not self.compiled and self.attention is None:
                    # what is left is the plain model: one call proves it runs, no more warming
                    self._warm_call(pipe, size, 1, "none", edit)
                    return False

    def _warm_call(self, pipe, size, batch: int, level: str, edit: bool) -> None:
        import torch

        width, height = size
        kwargs = dict(true_cfg_scale=4.0, num_inference_steps=WARM_STEPS, width=width, height=height,
                      generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)], output_type="pil")
        if edit:
            from PIL import Image

            many = type(pipe).__name__ != "QwenImageEditPipeline"
            image = Image.new("RGB", (width, height), (128, 128, 128))
            kwargs.update(prompt="warm up", negative_prompt=" ", image=[image] if many else image,
                          num_images_per_prompt=batch)
        else:
            # two prompt lengths (and the negative " "): the text length is not baked into the graph
            kwargs.update(prompt=["warm up", "warm up the compiled blocks at this size"][:batch] if batch > 1
                          else ["warm up"], negative_prompt=[" "] * batch)
        with self.call(level, WARM_STEPS, True):
            pipe(**kwargs)

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)
