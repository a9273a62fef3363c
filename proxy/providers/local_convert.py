"""The `diffusers` kind's pure converters: models.yaml options -> local_backend.EngineConfig, an
ImageRequest -> local_backend.GenerationParams (its speed tier and its input images decoded included),
the engine's Pillow images -> encoded bytes, and whether the weights are on disk. No event loop here:
LocalProvider (local.py) is the thin async I/O around them; the Ray pools (ray.py) and
`qwen-image-proxy generate` use the same mapping.

torch and diffusers are imported only when a config uses this kind: local_backend, Pillow and
huggingface_hub are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from local_backend import EngineConfig, EngineError, GenerationParams, LoraSpec
from local_backend.accel_options import validate as validate_accel
from local_backend.config import plain_options
from local_backend.edit import UNIFIED_PIPELINES
from local_backend.loading import declared_pipeline, local_files_only, validate_config
from local_backend.tiers import choose_tier, parse_tiers, tier_summary

from ..errors import InvalidRequest
from ..media import pixels
from ..media.output import encode_image
from ..request import ImageRequest, InputImage
from . import enhance

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

# Options that belong to the provider, not to the engine.
_PROVIDER_OPTIONS = {"timeout", "load_in_background"}


def engine_config(options: dict[str, Any]) -> EngineConfig:
    """models.yaml provider options -> local_backend.EngineConfig, with clear errors for unknown keys."""
    known = {f.name for f in fields(EngineConfig)}
    unknown = set(options) - known - _PROVIDER_OPTIONS
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    values = plain_options({k: v for k, v in options.items() if k in known})
    if "prompt_enhancement" in values:  # with: text_encoder -> the engine's; with: chat -> the provider's
        values["prompt_enhancement"] = enhance.engine_spec(enhance.parse_options(values["prompt_enhancement"]))
    config = EngineConfig(**values)
    try:
        validate_config(config)  # offload: auto on a CPU route, a transformer that is no .gguf, ...
        parse_tiers(config)  # a bad tier is a config error now, not at load
        validate_accel(config)  # so is a bad speed option (compile, cache, attention_backend)
    except EngineError as e:
        raise ValueError(str(e)) from None
    return config


def advertised_tiers(config: EngineConfig | None) -> list[dict] | None:
    """What /v1/models lists as the model's speed tiers ([{name, steps, cfg_scale}], base first): None
    without tiers beyond base. The same for an in-process engine and a Ray pool of the same options."""
    if config is None or not config.tiers:
        return None
    return tier_summary(config)


def advertised_accelerations(config: EngineConfig | None) -> list[str] | None:
    """fal's acceleration levels /v1/models lists: the block cache's, when one is configured."""
    return ["none", "regular", "high"] if config is not None and config.cache else None


def model_abilities(config: EngineConfig) -> tuple[bool, bool]:
    """(edits, masks) of the configured model, from the pipeline class its model_index.json declares:
    the edit pipelines edit and inpaint (one input image with a mask); Qwen-Image-2.1 generates and
    edits with reference images, without masks; a text-to-image model does neither."""
    if declared_pipeline(config) in UNIFIED_PIPELINES:
        return True, False
    edits = config.task == "edit"
    return edits, edits


def generates(config: EngineConfig) -> bool:
    """Whether the configured model makes images from text alone: an edit model (task: edit) does not,
    unless its pipeline also generates (Qwen-Image-2.1)."""
    return config.task != "edit" or declared_pipeline(config) in UNIFIED_PIPELINES


def request_tier(req: ImageRequest, config: EngineConfig) -> str | None:
    """The speed tier a request asks for (local_backend.tiers.choose_tier): the `tier` field, fal's
    use_turbo / acceleration, or OpenAI's quality through quality_tiers. None: base."""
    return choose_tier(config, tier=req.extra.get("tier"), quality=req.quality,
                       use_turbo=req.extra.get("use_turbo"), acceleration=req.extra.get("acceleration"))


def to_params(req: ImageRequest, on_step: Callable[[int, int], None] | None = None,
              images: Iterable[PILImage] = (), mask: PILImage | None = None,
              on_partial: Callable[[int, int, PILImage], None] | None = None,
              tier: str | None = None) -> GenerationParams:
    """ImageRequest -> local_backend.GenerationParams (pure). `images` and `mask` are the request's
    input images decoded (decode_inputs); without on_partial no previews are made; `tier` is
    request_tier()'s answer."""
    return GenerationParams(
        prompt=req.prompt,
        width=req.width,
        height=req.height,
        negative_prompt=req.negative_prompt,
        num_inference_steps=req.num_inference_steps,
        cfg_scale=req.cfg_scale,
        seed=req.seed,
        n=req.n,
        loras=[LoraSpec(lora.path, lora.scale) for lora in req.loras],
        on_step=on_step,
        images=list(images),
        mask=mask,
        partial_images=(req.partial_images or 0) if on_partial is not None else 0,
        on_partial=on_partial,
        tier=tier,
        acceleration=req.extra.get("acceleration"),  # the cache level, when the engine has a cache
        prompt_enhancement=enhance.requested(req.prompt_enhancement),
    )


# The edit pipelines condition on about 1 MP of each input (and paste the kept area back at the output
# size): an input is decoded at no less than that, and no larger than it needs to be.
CONDITION_PIXELS = 1024 * 1024


def decode_inputs(req: ImageRequest) -> tuple[list[PILImage], PILImage | None]:
    """The request's input images and mask as Pillow images, each decoded once, a JPEG at the smallest
    scale that covers both the output size and CONDITION_PIXELS (CPU work: run it off the event loop)."""
    from PIL import Image

    def decode(item: InputImage, param: str) -> PILImage:
        at_least = pixels.cover_size(item.width, item.height, (req.width, req.height), CONDITION_PIXELS)
        try:
            return pixels.open_scaled(item.data, at_least)
        except Exception as e:  # checked at parse time, so this is rare: still the client's input
            raise InvalidRequest(f"the {param} could not be decoded: {type(e).__name__}", param=param) from None

    images = [decode(item, "image") for item in req.images]
    mask = decode(req.mask, "mask") if req.mask is not None else None
    first = req.images[0] if req.images else None
    sent_alike = req.mask is not None and first is not None and (
        (req.mask.width, req.mask.height) == (first.width, first.height))
    if mask is not None and sent_alike and mask.size != images[0].size:
        # One of the two was a JPEG decoded at a smaller scale: the mask follows the image.
        mask = mask.resize(images[0].size, Image.Resampling.NEAREST)
    return images, mask


def client_param(req: ImageRequest, param: str | None) -> str | None:
    """The engine's name for a parameter -> the one the client sent: its `images` are the client's
    `image` (multipart) or `images` (the JSON variant), as recorded when the inputs were read."""
    if param == "images" and req.images:
        return req.images[0].param.split("[", 1)[0]
    return param


def weights_problem(config: EngineConfig) -> str | None:
    """Why the model cannot load from here (None: it can): neither a folder nor a repo id, or its weights
    not on disk when they may not be downloaded."""
    from pathlib import Path

    from huggingface_hub import try_to_load_from_cache

    model = config.model
    if model in ("tiny", "tiny-edit", "tiny-2.1"):
        return None
    if Path(model).expanduser().is_dir():
        return None if (Path(model).expanduser() / "model_index.json").is_file() else (
            f"{model} has no model_index.json (not a diffusers pipeline folder)")
    # Checked whether downloads are allowed or not: a mistyped folder (/models/qwen-imgae) is no repo id
    # either, and passed check-config to fail only at load.
    try:
        cached = try_to_load_from_cache(model, "model_index.json")  # reads the cache's folders only
    except ValueError:  # huggingface_hub's HFValidationError: not a repo id
        return f"{model} is neither a pipeline folder on this machine nor a Hugging Face repo id"
    if not local_files_only(config) or isinstance(cached, str):
        return None
    return (f"the weights of {model} are not in the Hugging Face cache "
            f"(run `hf download {model}`, or set local_files_only: false)")


def encode_all(images: Iterable[PILImage], fmt: str, compression: int | None) -> list[bytes]:
    """The engine's images in the request's format (CPU work: run it off the event loop)."""
    return [encode_image(im, fmt, compression) for im in images]
