"""Edits: input images and masks for the edit pipelines, the processor, and the working sizes.

What diffusers 0.42.1 offers, and how the engine uses it:

- QwenImageEditPlusPipeline (Qwen-Image-Edit-2509/2511): 1 to 3 input images, one prompt per call
  (several prompts in one call raise), any output size (width/height, multiples of 16). Several
  images of ONE prompt share a call (num_images_per_prompt, one generator each).
- QwenImageEditPipeline (the first Qwen-Image-Edit): the same, with one input image.
- QwenImageEditInpaintPipeline: an edit with a mask (white = repaint). It takes the same components
  as the edit pipelines, so the engine builds it around the loaded ones (no extra memory). Limits:
  ONE input image (its prompt template is the first Edit model's, one picture; with Edit-2509 weights
  that template is not the one they were tuned on, so expect somewhat weaker edits than without a
  mask), and the output size is not free: it always works at about 1 megapixel with the input's
  aspect ratio (width/height are ignored). The engine therefore stretches the input and mask to the
  asked aspect ratio first, resizes the result to the asked size, and pastes the input's own pixels
  back outside the mask, so what the mask keeps is kept exactly.

Masks follow OpenAI: a mask with an alpha channel marks the area to edit with transparent pixels;
a mask without one is read as grey levels, white = edit (diffusers' convention).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidParamsError

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

# How many input images each edit pipeline takes (by class name).
MAX_IMAGES = {"QwenImageEditPlusPipeline": 3, "QwenImageEditPipeline": 1}
EDIT_PIPELINES = tuple(MAX_IMAGES)
# Pipelines that make images from text alone and edit with reference images (0 to N): one model serves
# both endpoints. Qwen-Image-2.1 takes up to 10 references (its model card) and no mask.
UNIFIED_PIPELINES = {"QwenImage21Pipeline": 10}
MAX_INPUT_PIXELS = 64 * 1024 * 1024  # per input image; the pipeline resizes to ~1 MP anyway
MAX_ASPECT = 8.0  # longest side / shortest side: beyond it diffusers' 32-rounding breaks down
# A scaled working area never goes below this: diffusers rounds sides to multiples of 32, so at 64x64
# an input up to MAX_ASPECT (and beyond) still gets two non-zero sides.
MIN_WORKING_AREA = 64 * 64


def check_images(images: object, max_images: int) -> list[Image]:
    """The input images as RGB, or InvalidParamsError("images"). Alpha is flattened on white."""
    from PIL import Image

    if not isinstance(images, (list, tuple)):
        raise InvalidParamsError("images must be a list of images", "images")
    if len(images) > max_images:
        raise InvalidParamsError(
            f"this model takes at most {max_images} input image{'s' if max_images > 1 else ''}, "
            f"not {len(images)}",
            "images",
        )
    prepared = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InvalidParamsError(f"images[{i}] is not an image", "images")
        _check_shape(image, f"images[{i}]", "images")
        try:
            prepared.append(_rgb(image))
        except Exception as e:  # a truncated or broken file surfaces only when the pixels are read
            raise InvalidParamsError(f"images[{i}] cannot be read: {type(e).__name__}", "images") from None
    return prepared


def _check_shape(image: Image, name: str, param: str) -> None:
    w, h = image.size
    if w < 1 or h < 1:
        raise InvalidParamsError(f"{name} is empty ({w}x{h})", param)
    if w * h > MAX_INPUT_PIXELS:
        raise InvalidParamsError(f"{name} is too large ({w}x{h}); the limit is {MAX_INPUT_PIXELS} pixels", param)
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise InvalidParamsError(
            f"{name} is too narrow ({w}x{h}): the sides may differ by a factor of {MAX_ASPECT:g} at most", param
        )


def _rgb(image: Image) -> Image:
    from PIL import Image

    if image.mode == "RGB":
        image.load()
        return image
    if "A" in image.getbands() or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def check_mask(mask: object, first: Image) -> Image:
    """The mask as an "L" image, 255 = repaint, 0 = keep; or InvalidParamsError("mask")."""
    from PIL import Image

    if not isinstance(mask, Image.Image):
        raise InvalidParamsError("mask is not an image", "mask")
    if mask.size != first.size:
        raise InvalidParamsError(
            f"the mask must be the size of the first image ({first.width}x{first.height}), "
            f"not {mask.width}x{mask.height}",
            "mask",
        )
    try:
        if "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info):
            alpha = mask.convert("RGBA").getchannel("A")
            return alpha.point(lambda a: 255 if a < 128 else 0)  # transparent = edit (OpenAI)
        return mask.convert("L").point(lambda v: 255 if v >= 128 else 0)  # white = edit
    except Exception as e:
        raise InvalidParamsError(f"the mask cannot be read: {type(e).__name__}", "mask") from None


def paste_kept(result: Image, original: Image, mask: Image) -> Image:
    """`result` with `original`'s pixels wherever the mask keeps them (both already result's size).

    Inside the mask, the first pixels from its edge blend softly into the original, so the seam does
    not show; outside it, the original comes back exactly.
    """
    from PIL import Image, ImageChops, ImageFilter

    radius = max(1.0, min(result.size) / 256)
    soft = ImageChops.multiply(mask, mask.filter(ImageFilter.GaussianBlur(radius)))
    return Image.composite(result, original, soft)


# ----- the processor -----


def load_processor(source: str, hub_kwargs: dict, class_name: str = "Qwen2VLProcessor") -> Any:
    """The pipeline's processor (Qwen2VLProcessor for the edit pipelines, Qwen3VLProcessor for
    Qwen-Image-2.1), from the model's `processor/` folder.

    transformers builds these processors with a video processor, which needs torchvision. Where
    torchvision is missing (or does not import beside this torch, as with PyPI's CPU wheels), the
    processor is put together from its image processor (the Pillow one), tokenizer and chat template
    alone: the pipelines never pass videos.
    """
    import transformers
    from transformers import AutoTokenizer

    if _torchvision_works():
        return getattr(transformers, class_name).from_pretrained(source, subfolder="processor", **hub_kwargs)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(source, subfolder="processor", **hub_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="processor", **hub_kwargs)
    extra = {}
    if class_name != "Qwen2VLProcessor":  # 2.1 counts its system turn's tokens with the chat template
        extra["chat_template"] = _chat_template(source, hub_kwargs) or getattr(tokenizer, "chat_template", None)
    return processor_class(class_name)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **extra
    )


def _chat_template(source: str, hub_kwargs: dict) -> str | None:
    """The processor folder's chat_template.jinja, if it has one."""
    if Path(source).is_dir():
        path = Path(source) / "processor" / "chat_template.jinja"
        return path.read_text() if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, "processor/chat_template.jinja", **hub_kwargs)).read_text()
    except Exception:  # not in the repo (or not cached): the tokenizer's own template is used
        return None


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:
        return False
    return True


_IMAGE_ONLY: dict[str, type] = {}


def processor_class(class_name: str) -> type:
    """A subclass of transformers' `class_name` processor that accepts video_processor=None (its class
    check needs torchvision)."""
    if class_name not in _IMAGE_ONLY:
        import transformers

        base = getattr(transformers, class_name)

        def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return base.check_argument_for_proper_class(self, argument_name, argument)

        _IMAGE_ONLY[class_name] = type(f"ImageOnly{class_name}", (base,),
                                       {"check_argument_for_proper_class": check_argument_for_proper_class})
    return _IMAGE_ONLY[class_name]


# ----- working sizes -----

_AREA = threading.local()
_HOOK_LOCK = threading.Lock()
_HOOKED = False


def _install_area_hook() -> None:
    """Route the edit modules' calculate_dimensions through the calling thread's area scale.

    Every working size of the edit pipelines (the VAE's ~1 MP, the vision encoder's 384x384, the
    inpaint pipeline's ~1 MP) comes from calculate_dimensions(target_area, ratio). The scale is
    per thread, and each engine runs its pipeline calls on its own thread, so a tiny test model
    never changes the sizes a real model in the same process works at.
    """
    global _HOOKED
    with _HOOK_LOCK:
        if _HOOKED:
            return
        from diffusers.pipelines.qwenimage import (
            pipeline_qwenimage_edit,
            pipeline_qwenimage_edit_inpaint,
            pipeline_qwenimage_edit_plus,
        )

        for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, pipeline_qwenimage_edit_inpaint):
            original = module.calculate_dimensions

            def scaled(target_area: float, ratio: float, _original: Callable[..., Any] = original) -> Any:
                scale = getattr(_AREA, "scale", None)
                if scale:
                    target_area = max(target_area * scale, MIN_WORKING_AREA)
                return _original(target_area, ratio)

            module.calculate_dimensions = scaled
        _HOOKED = True


@contextlib.contextmanager
def working_area_scale(scale: float | None) -> Iterator[None]:
    """Within this block, on this thread, the edit pipelines work at `scale` times their areas."""
    if not scale or scale == 1:
        yield
        return
    _install_area_hook()
    before = getattr(_AREA, "scale", None)
    _AREA.scale = scale
    try:
        yield
    finally:
        _AREA.scale = before


def inpaint_working_size(aspect_size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """The size QwenImageEditInpaintPipeline works at for an input of this shape (call it inside the
    same working_area_scale block as the pipeline)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as module

    width, height, _ = module.calculate_dimensions(1024 * 1024, aspect_size[0] / aspect_size[1])
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)
