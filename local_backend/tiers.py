"""Speed tiers: Lightning-style adapters and their scheduler settings on one set of weights.

A tier is a name for "these LoRAs, this scheduler, this many steps, this CFG scale" (config.TierSpec).
The engine loads its weights once; each tier's LoRAs are loaded at start-up as pinned adapters on
that same transformer (never evicted, about the size of the LoRA file each), and each tier with
scheduler overrides gets its own scheduler, made once from the engine's scheduler config plus the
tier's overrides. A call of a tier turns on the tier's LoRAs next to the request's own (and the
engine's base_loras), and swaps the pipeline's scheduler for the tier's during the call only.

"base" always exists: no tier LoRAs, the engine's scheduler, default_steps and default_cfg_scale.
Jobs of different tiers never share a pipeline call (the tier is part of the batch key).

Choosing a tier for a request (`choose_tier`, used by the proxy): an explicit tier wins; then fal's
`use_turbo: true` (the fastest tier); then fal's `acceleration` ("none": base, "regular": the
accelerated tier with the most steps, "high": the one with the fewest); then OpenAI's `quality`
through `quality_tiers` (an unmapped quality: base). Without configured tiers every one of those
but an explicit unknown tier name means base.

With a block cache configured (EngineConfig.cache, local_backend.accel), `acceleration` picks the
cache level instead and no longer picks a tier: tiers then come from `tier`, `use_turbo` and
`quality` only, so "acceleration: high" with "quality: low" means the low-quality tier, cached hard.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import EngineConfig, LoraSpec, TierSpec, lora_spec
from .errors import EngineError, InvalidParamsError

if TYPE_CHECKING:
    from .loras import LoraManager

BASE = "base"
ACCELERATIONS = ("none", "regular", "high")


@dataclass
class Tier:
    name: str
    loras: list[LoraSpec] = field(default_factory=list)
    scheduler: dict = field(default_factory=dict)
    steps: int | None = None  # None: the engine's default_steps
    cfg_scale: float | None = None  # None: the engine's default_cfg_scale


def _lora(value: object, where: str) -> LoraSpec:
    try:
        return lora_spec(value, where)
    except ValueError as e:
        raise EngineError(str(e)) from None


def _tier(name: object, value: object) -> Tier:
    where = f"tiers.{name}"
    if not isinstance(name, str) or not name.strip():
        raise EngineError("tiers: a tier name must be a non-empty string")
    if name == BASE:
        raise EngineError('tiers: "base" is built in (no tier LoRAs, the engine\'s defaults): use another name')
    if isinstance(value, TierSpec):
        value = {"loras": value.loras, "scheduler": value.scheduler, "steps": value.steps,
                 "cfg_scale": value.cfg_scale}
    if not isinstance(value, dict):
        raise EngineError(f"{where} must be a mapping of loras, scheduler, steps, cfg_scale")
    unknown = set(value) - {"loras", "scheduler", "steps", "cfg_scale"}
    if unknown:
        raise EngineError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                          "known: cfg_scale, loras, scheduler, steps")
    loras = value.get("loras") or []
    if not isinstance(loras, (list, tuple)):
        raise EngineError(f"{where}.loras must be a list")
    scheduler = value.get("scheduler") or {}
    if not isinstance(scheduler, dict):
        raise EngineError(f"{where}.scheduler must be a mapping of scheduler settings")
    steps, cfg = value.get("steps"), value.get("cfg_scale")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise EngineError(f"{where}.steps must be a positive integer")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, (int, float))
                            or not math.isfinite(cfg) or cfg < 0):
        raise EngineError(f"{where}.cfg_scale must be a finite number >= 0")
    return Tier(name, [_lora(v, f"{where}.loras[{i}]") for i, v in enumerate(loras)], dict(scheduler), steps,
                None if cfg is None else float(cfg))


def parse_tiers(config: EngineConfig) -> dict[str, Tier]:
    """The config's tiers, checked, "base" first. Raises EngineError naming the bad field."""
    if not isinstance(config.tiers, dict):
        raise EngineError("tiers must be a mapping of tier name -> settings")
    tiers = {BASE: Tier(BASE)}
    for name, value in config.tiers.items():
        tiers[name] = _tier(name, value)
    if not isinstance(config.quality_tiers, dict):
        raise EngineError("quality_tiers must be a mapping of quality -> tier name")
    for quality, name in config.quality_tiers.items():
        if name not in tiers:
            raise EngineError(f"quality_tiers.{quality}: no tier named {name!r} "
                              f"(tiers: {', '.join(tiers)})")
    return tiers


def _steps(config: EngineConfig, tier: Tier) -> int:
    return config.default_steps if tier.steps is None else tier.steps


def tier_summary(config: EngineConfig) -> list[dict]:
    """[{name, steps, cfg_scale}] for every tier, base first (what /v1/models lists)."""
    return [
        {"name": t.name, "steps": _steps(config, t),
         "cfg_scale": config.default_cfg_scale if t.cfg_scale is None else t.cfg_scale}
        for t in parse_tiers(config).values()
    ]


def _flag(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # multipart forms
        return value.strip().lower() == "true"
    raise InvalidParamsError(f"{name} must be a boolean", name)


def choose_tier(config: EngineConfig, *, tier: object = None, quality: object = None, use_turbo: object = None,
                acceleration: object = None) -> str | None:
    """The tier for a request's fields (None: base). Only an explicit `tier` can name an unknown tier:
    the engine refuses it (InvalidParamsError("tier")). A bad use_turbo / acceleration value raises
    InvalidParamsError here."""
    if tier is not None:  # TierSet.get refuses a name it does not know, a non-string included
        return tier if isinstance(tier, str) else repr(tier)
    tiers = parse_tiers(config)
    accelerated = sorted((t for t in tiers.values() if t.name != BASE), key=lambda t: _steps(config, t))
    if use_turbo is not None and _flag(use_turbo, "use_turbo"):
        return accelerated[0].name if accelerated else None
    if acceleration is not None and acceleration not in ACCELERATIONS:
        raise InvalidParamsError(f"acceleration must be one of {', '.join(ACCELERATIONS)}", "acceleration")
    if acceleration is not None and config.cache in (None, False):  # with a cache it is the cache's level
        if acceleration == "none" or not accelerated:
            return None
        if acceleration == "high":
            return accelerated[0].name
        most = max(_steps(config, t) for t in accelerated)  # regular: the slowest accelerated tier
        return next(t.name for t in accelerated if _steps(config, t) == most)
    if isinstance(quality, str):
        return config.quality_tiers.get(quality)
    return None


class TierSet:
    """The engine's tiers at run time. `load` runs once with the pipeline; the rest on the worker."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tiers = parse_tiers(config)
        self._refs: dict[str, list] = {name: [] for name in self.tiers}  # tier -> its LoraRefs
        self._schedulers: dict[str, object] = {}  # tier -> its own scheduler (only with overrides)

    def get(self, name: str | None) -> Tier:
        """The tier a job asks for (None: base). Unknown -> InvalidParamsError("tier")."""
        if name is None:
            return self.tiers[BASE]
        if not isinstance(name, str) or name not in self.tiers:
            shown = name[:100] if isinstance(name, str) else type(name).__name__
            raise InvalidParamsError(f"unknown tier {shown!r}; this model has: {', '.join(self.tiers)}", "tier")
        return self.tiers[name]

    def load(self, pipe: Any, loras: LoraManager, base_refs: list,
             progress: Callable[[str], None] | None = None) -> None:
        """Load every tier's LoRAs as pinned adapters and build each tier's scheduler."""
        extra = [t for t in self.tiers.values() if t.name != BASE]
        if extra and progress:
            progress(f"loading {len(extra)} speed tier(s)")
        for tier in extra:
            if tier.scheduler:
                self._schedulers[tier.name] = _scheduler(pipe.scheduler, tier)
            if tier.loras:
                refs = [loras.resolve(spec, trusted=True) for spec in tier.loras]
                loras.activate(pipe, base_refs + refs, pinned=True)  # loads them once, for good
                self._refs[tier.name] = refs
        if any(self._refs.values()):
            loras.activate(pipe, base_refs)  # back to the base model's adapters

    def loras(self, name: str) -> list:
        return self._refs[name]

    def scheduler(self, name: str) -> Any:  # a diffusers scheduler
        """The tier's own scheduler, or None when it uses the pipeline's."""
        return self._schedulers.get(name)


def _scheduler(base: Any, tier: Tier) -> Any:
    cls = type(base)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(tier.scheduler) - accepted
    if unknown:
        raise EngineError(f"tiers.{tier.name}.scheduler: {cls.__name__} has no setting(s) "
                          f"{', '.join(sorted(map(str, unknown)))}")
    try:
        return cls.from_config(base.config, **tier.scheduler)
    except Exception as e:
        raise EngineError(f"tiers.{tier.name}.scheduler: {type(e).__name__}: {e}") from None
