"""A job's plan: its parameters checked against the engine's config and the loaded pipeline.

Pure apart from drawing a random seed when none is given: everything a job needs (sizes, steps, CFG,
tier, cache level, edit inputs, preview steps) is decided here, once, at submit time, so that a bad
parameter is the caller's error before the job can share a pipeline call with anyone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import enhance
from .config import EngineConfig, GenerationParams, PromptEnhancement
from .edit import check_images, check_mask
from .errors import InvalidParamsError
from .previews import MAX_PARTIALS, preview_steps

if TYPE_CHECKING:
    from .accel import Accel
    from .tiers import TierSet

MAX_N = 16
MAX_STEPS = 1000
# torch's CPU generator seeds its Mersenne Twister with the low 32 bits only (manual_seed(2**32) draws
# what manual_seed(0) draws), so there are 2**32 distinct seeds: image i gets (seed + i) mod 2**32.
MAX_SEED = 2**32 - 1


@dataclass
class LoadedFacts:
    """What planning needs to know of the engine and its loaded pipeline."""

    config: EngineConfig
    tiers: TierSet
    accel: Accel
    enhance: PromptEnhancement | None
    multiple: int  # generation sizes are multiples of this (vae_scale_factor * 2)
    max_images: int  # input images an edit takes (0: a text-to-image pipeline)
    can_inpaint: bool  # a mask can be used (the inpainting pipeline exists)
    images_optional: bool = False  # input images may be given or not (a model that generates and edits)


def plan_job(p: GenerationParams, pipe: LoadedFacts) -> dict:
    """Check a job's parameters against the engine and the loaded pipeline; return its plan (what
    local_backend.jobs.Job is made of). Raises InvalidParamsError naming the parameter."""
    cfg = pipe.config
    if not isinstance(p.prompt, str):
        raise InvalidParamsError("prompt must be a string", "prompt")
    if p.negative_prompt is not None and not isinstance(p.negative_prompt, str):
        raise InvalidParamsError("negative_prompt must be a string", "negative_prompt")
    _check_text(p.prompt, "prompt")
    if p.negative_prompt is not None:
        _check_text(p.negative_prompt, "negative_prompt")
    if not _is_int(p.n) or not 1 <= p.n <= MAX_N:
        raise InvalidParamsError(f"n must be an integer from 1 to {MAX_N}", "n")
    for name in ("width", "height"):
        if not _is_int(getattr(p, name)) or getattr(p, name) < 1:
            raise InvalidParamsError(f"{name} must be a positive integer", "size")
    if p.width * p.height > cfg.max_pixels:
        raise InvalidParamsError(
            f"size {p.width}x{p.height} is larger than the limit of {cfg.max_pixels} pixels", "size"
        )
    gen_size = generation_size(pipe, p.width, p.height)
    tier = pipe.tiers.get(p.tier)  # its steps and cfg_scale, unless the request sets them
    default_steps = cfg.default_steps if tier.steps is None else tier.steps
    default_scale = cfg.default_cfg_scale if tier.cfg_scale is None else tier.cfg_scale
    steps = default_steps if p.num_inference_steps is None else p.num_inference_steps
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InvalidParamsError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}", "steps")
    scale = default_scale if p.cfg_scale is None else p.cfg_scale
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise InvalidParamsError("cfg_scale must be a finite number >= 0", "cfg_scale")
    seed = random.randrange(2**31) if p.seed is None else p.seed
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InvalidParamsError(f"seed must be an integer from 0 to {MAX_SEED}", "seed")
    # True CFG runs only with a negative prompt; " " is the official default. At cfg <= 1 the
    # pipeline ignores the negative prompt, so drop it (one batch key for all such jobs).
    do_cfg = scale > 1
    negative = (p.negative_prompt if p.negative_prompt is not None else " ") if do_cfg else None
    partials = p.partial_images
    if not _is_int(partials) or not 0 <= partials <= MAX_PARTIALS:
        raise InvalidParamsError(f"partial_images must be an integer from 0 to {MAX_PARTIALS}", "partial_images")
    images, mask = _plan_inputs(pipe, p)
    return {
        "seeds": [(seed + i) % (MAX_SEED + 1) for i in range(p.n)],
        "size": (p.width, p.height),
        "gen_size": gen_size,
        "steps": steps,
        "cfg": float(scale) if do_cfg else 1.0,
        "negative": negative,
        "images": images,
        "mask": mask,
        "preview_at": preview_steps(steps, partials) if p.on_partial is not None else [],
        "tier": tier.name,
        "cache": pipe.accel.level(p.acceleration),
        "enhance": enhance.wanted(pipe.enhance, p.prompt_enhancement),
    }

def _plan_inputs(pipe: LoadedFacts, p: GenerationParams) -> tuple[list, object]:
    """The input images and mask of an edit, checked and converted (RGB, "L")."""
    images = p.images if p.images is not None else []
    if pipe.images_optional and isinstance(images, (list, tuple)) and not images:
        if p.mask is not None:
            raise InvalidParamsError("masks are not supported by this model", "mask")
        return [], None
    if pipe.config.task != "edit" and not pipe.images_optional:
        if images or p.mask is not None:
            raise InvalidParamsError(
                "this model makes images from text: it takes no input images or mask (use an edit model)",
                "images" if images else "mask",
            )
        return [], None
    if isinstance(images, (list, tuple)) and not images:
        many = pipe.max_images
        raise InvalidParamsError(
            f"this model edits images: give {'1 to ' + str(many) if many > 1 else 'one'} input "
            f"image{'s' if many > 1 else ''}",
            "images",
        )
    prepared = check_images(images, pipe.max_images)
    if p.mask is None:
        return prepared, None
    if not pipe.can_inpaint:
        raise InvalidParamsError("masks are not supported by this model", "mask")
    if len(prepared) > 1:
        raise InvalidParamsError(
            f"a mask works with one input image, and this edit has {len(prepared)}: "
            "send the image to edit alone, or drop the mask",
            "mask",
        )
    return prepared, check_mask(p.mask, prepared[0])

def generation_size(pipe: LoadedFacts, width: int, height: int) -> tuple[int, int]:
    """The nearest size the model can make (a multiple of vae_scale_factor * 2); resized after."""
    m = pipe.multiple

    def nearest(v: int) -> int:
        return max(m, int(v / m + 0.5) * m)

    gen = (nearest(width), nearest(height))
    if gen[0] * gen[1] > pipe.config.max_pixels:  # rounding up crossed the limit: round down
        gen = (max(m, width // m * m), max(m, height // m * m))
    if gen[0] * gen[1] > pipe.config.max_pixels:  # only for extreme aspect ratios
        raise InvalidParamsError(f"size {width}x{height} is too narrow for this model", "size")
    return gen


def _check_text(text: str, name: str) -> None:
    """Text the tokenizer cannot take fails here, before it can share a pipeline call.

    Measured with the tiny pipeline's byte-level BPE tokenizer (the Rust `tokenizers` backend, as
    Qwen-Image's): only lone surrogates (JSON escapes like "\\ud800") break it, with a TypeError
    inside the Rust code; NUL, other control characters, special-token text, noncharacters, empty
    and very long prompts all encode. This check costs about 0.5 us for 4000 characters; running
    the tokenizer itself would cost 1.5 ms and catch nothing more.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParamsError(
            f"{name} is not valid Unicode text: it contains a lone surrogate"
            f" ({ascii(text[e.start])[1:-1]}) at character {e.start}",
            name,
        ) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
