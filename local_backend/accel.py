"""Speed options of the local engine: attention backend, compilation, block caching, FP8 skip list.

Each option is off unless models.yaml turns it on (EngineConfig.attention_backend, compile, cache,
quantization_skip), and each is applied at load by `Accel`:

- attention_backend: diffusers' `transformer.set_attention_backend(name)` ("flash", "_flash_3",
  "sage", "native", ...). A name diffusers does not know is a config error; a backend that cannot
  run here (its package missing, no CUDA) leaves diffusers' default attention, reported.
- compile: torch.compile of the transformer's repeated blocks (regional compilation: every block
  shares one compiled graph, seconds to compile rather than minutes), then a short warm-up call
  (2 steps) per pre-warmed shape, a batch of 2 and each cache level, for every speed tier (its LoRAs
  on, its scheduler: the engine's own call path), so the first real request does not pay for
  compiling. `true`
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
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from .accel_options import LEVELS, first_line, installed, static_warnings, validate
from .config import EngineConfig
from .errors import EngineError, InvalidParamsError

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
# one warm-up call: (generation size, batch, cache level, tier) -> None, through the engine's call path
WarmCall = Callable[[tuple[int, int], int, str, str], None]

PROBE_SIZE = (256, 256)  # the check call's size when no shape is to be warmed
WARM_STEPS = 2
GRAPHS_PER_CALL = 4  # at most this many new graphs per warm-up call (measured on the tiny model: 4)


# Warm-up calls asked for so far by the engines of this process (counted under local_backend.exclusive).
_WARM_CALLS = 0


def _allow_recompiles(calls: int) -> None:
    """Let the compiled blocks keep a graph per warmed variant. Every block shares one code object, and
    torch's default of 8 graphs per code object is reached by a few warm-up calls: each can add up to
    GRAPHS_PER_CALL (the text length of the CFG pass, the text mask present or not, the batch of 2 and
    the first size are static until a second value is seen, each tier's LoRA set is new to the guards).
    Past the limit a fullgraph compile fails, and the engine would serve uncompiled. The limit is
    per code object, so the engines of one process share it (every engine's blocks run the same code):
    each engine's calls add to those of the engines before it. Only raised."""
    import torch._dynamo

    global _WARM_CALLS
    _WARM_CALLS += calls
    dynamo = torch._dynamo.config
    wanted = GRAPHS_PER_CALL * _WARM_CALLS + 8
    if dynamo.recompile_limit < wanted:
        dynamo.recompile_limit = wanted
    if dynamo.accumulated_recompile_limit < wanted:
        dynamo.accumulated_recompile_limit = wanted


def _set_own_backend(transformer: Any, name: str) -> None:
    """transformer.set_attention_backend(name), for this model alone. diffusers also makes it the process's
    default backend, which every model without one of its own then used: another provider's model, and
    this one after a failed check call (reset_attention_backend leaves its processors on the default)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    try:
        transformer.set_attention_backend(name)
    finally:
        _AttentionBackendRegistry.set_active_backend(before)


class Accel:
    """The speed options of one engine: applied once at load, then per call (cache levels)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.compile_spec, self.cache_spec = validate(config)
        self.warnings: list[str] = []  # options left off at load, with the reason
        self.compiled = False
        self.attention: str | None = None  # the backend set, once it worked
        self.levels: dict[str, dict[str, Any]] = {}  # cache level -> its DBCacheConfig fields, once enabled
        self._transformer: Any = None  # the pipeline's transformer (a torch module), once prepared
        self._plain_forward: Any = None  # the transformer's forward without cache-dit (None: the class's)
        self._cached_forward: Any = None

    # ----- per request -----

    def level(self, acceleration: object) -> str:
        """The cache level a job runs at: its acceleration (or the configured default), "none" when
        that level is not enabled. A value outside none/regular/high -> InvalidParamsError."""
        if acceleration is not None and acceleration not in LEVELS:
            raise InvalidParamsError(f"acceleration must be one of {', '.join(LEVELS)}", "acceleration")
        if self.cache_spec is None:
            return "none"
        wanted = acceleration if acceleration is not None else self.cache_spec.default
        return wanted if wanted in self.levels else "none"

    @contextlib.contextmanager
    def call(self, level: str, steps: int, cfg: bool) -> Iterator[None]:
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

    def prepare(self, pipe: Any, device: str, progress: Progress) -> None:
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
                    _set_own_backend(transformer, name)
                    self.attention = name
                except Exception as e:
                    self._warn(f"attention_backend {name}: {first_line(e)}; serving with diffusers' default attention")
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
                self._warn(f"compile: {first_line(e)}; serving uncompiled")

    def _enable_cache(self, transformer: Any, progress: Progress) -> None:
        if not installed("cache_dit"):
            self._warn("cache: cache-dit is not installed (pip install cache-dit); serving without block caching")
            return
        if self.config.offload == "group":
            self._warn("cache: cache-dit does not work with group offload; serving without block caching")
            return
        blocks = len(getattr(transformer, "transformer_blocks", []))
        usable = {}
        levels = self.cache_spec.levels if self.cache_spec is not None else {}
        for name, settings in levels.items():
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
            self._warn(f"cache: cache-dit could not be enabled ({first_line(e)}); serving without block caching")
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

    def warm_up(self, progress: Progress, gen_size: Callable[[int, int], tuple[int, int]], max_batch: int,
                run: WarmCall, tiers: list[str] | tuple[str, ...] = ("base",)) -> None:
        """Compile (and check) at load: 2-step calls at each warmed shape, then a batch of 2 and each
        cache level at the first shape, for every speed tier (its LoRAs on, its scheduler: a tier's
        adapters are other modules to the compiler, so its first call would compile again). `run`
        makes one call through the engine's own call path. Without compile, one small call checks the
        attention backend. A failure turns compile off, then the attention backend, and says so; the
        engine fails to load only when the model cannot run even without them."""
        if not self.compiled and self.attention is None:
            return
        sizes = [PROBE_SIZE]
        if self.compiled and self.compile_spec is not None and self.compile_spec.warm_sizes:
            sizes = list(self.compile_spec.warm_sizes)
        made = []
        for w, h in sizes:
            try:
                made.append(gen_size(w, h))
            except EngineError as e:  # e.g. larger than max_pixels: nothing to warm there
                self._warn(f"compile.warm_sizes: {w}x{h} skipped ({e})")
        sizes = list(dict.fromkeys(made)) or [gen_size(*PROBE_SIZE)]
        shapes = [(size, 1, "none") for size in sizes]
        if self.compiled:
            if max_batch > 1:
                shapes.append((sizes[0], 2, "none"))  # the batch dimension, once
            shapes += [(sizes[0], 1, level) for level in self.levels]
        first = tiers[0] if tiers else "base"
        calls = [(*shape, tier) for tier in (tiers if self.compiled else [first]) for shape in shapes]
        if self.compiled:
            _allow_recompiles(len(calls))
        what = "warming up the compiled transformer" if self.compiled else "checking the attention backend"
        for i, (size, batch, level, tier) in enumerate(calls):
            shown = f"{size[0]}x{size[1]}" + (f", batch {batch}" if batch > 1 else "")
            shown += f", cache {level}" if level != "none" else ""
            shown += f", tier {tier}" if tier != first else ""
            progress(f"{what}: {shown} ({i + 1}/{len(calls)})")
            if not self._try(run, size, batch, level, tier):
                return

    def _try(self, run: WarmCall, size: tuple[int, int], batch: int, level: str, tier: str) -> bool:
        """One warm-up call; on failure drop compile, then the attention backend. False: stop warming."""
        while True:
            try:
                run(size, batch, level, tier)
                return True
            except Exception as e:
                if self.compiled:
                    self._uncompile()
                    self._warn(f"compile: the warm-up call failed ({first_line(e)}); serving uncompiled")
                elif self.attention is not None:
                    name = self.attention
                    self._reset_attention()
                    self._warn(f"attention_backend {name}: a check call failed ({first_line(e)}); "
                               "serving with diffusers' default attention")
                else:
                    raise EngineError(f"the model failed a check call at {size[0]}x{size[1]}: "
                                      f"{first_line(e)}") from e
                if not self.compiled and self.attention is None:
                    # what is left is the plain model: one call proves it runs, no more warming
                    run(size, 1, "none", tier)
                    return False

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)
