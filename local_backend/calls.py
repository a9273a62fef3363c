"""One pipeline call's pieces: the arguments for a call of these images, the previews due after a
step, and the images as the caller gets them. Run on the engine's worker thread."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import stages
from .edit import MAX_IMAGES, UNIFIED_PIPELINES, inpaint_working_size, paste_kept

if TYPE_CHECKING:
    from PIL.Image import Image
    from torch import Generator, Tensor

    from .jobs import Job
    from .previews import Previewer

log = logging.getLogger("local_backend.engine")  # the engine's logger: these run as part of its calls


def call_arguments(first: Job, prompts: list[str], negatives: list[str | None], generators: list[Generator], *,
                   pipe: Any, inpaint: Any, max_images: int,
                   multiple: int) -> tuple[Any, dict[str, Any], tuple[int, int]]:
    """(pipeline, its arguments, the size it works at) for a call of these images."""
    cfg = first.negative is not None
    kwargs: dict[str, Any]
    if not first.inputs:  # text to image: any number of prompts
        kwargs = {"prompt": prompts, "negative_prompt": negatives if cfg else None}
        kwargs.update(width=first.gen_size[0], height=first.gen_size[1], **unified_arguments(pipe, first.steps))
        return pipe, kwargs, first.gen_size
    # An edit: one prompt, its images made with num_images_per_prompt (one generator each).
    kwargs = {
        "prompt": first.params.prompt,
        "negative_prompt": first.negative,
        "num_images_per_prompt": len(generators),
    }
    if first.mask is None:
        many = max_images > 1
        kwargs.update(image=list(first.inputs) if many else first.inputs[0])
        kwargs.update(width=first.gen_size[0], height=first.gen_size[1], **unified_arguments(pipe, first.steps))
        return pipe, kwargs, first.gen_size
    # Inpainting works at ~1 MP of its input's aspect ratio, whatever the asked size: give it the
    # input stretched to the asked shape, so the result only needs resizing (local_backend.edit).
    from PIL import Image

    image, mask = first.inputs[0], first.mask
    if image.size != first.gen_size:
        image = image.resize(first.gen_size, Image.Resampling.LANCZOS)
        mask = mask.resize(first.gen_size, Image.Resampling.NEAREST)
    kwargs.update(image=image, mask_image=mask, strength=1.0)
    return inpaint, kwargs, inpaint_working_size(first.gen_size, multiple)


def unified_arguments(pipe: Any, steps: int) -> dict:
    """The extra arguments of a Qwen-Image-2.1 call (nothing for the other pipelines).

    sigmas: a 2.1 checkpoint may carry its own schedule (sample_sigmas), whose length then decides the
    number of steps whatever num_inference_steps says; a request for another count gets the default
    linear schedule of that many steps. output_resolution: the side reference images are resized to
    (1024), shrunk for the tiny model like the edit pipelines' working areas (local_backend.edit).
    """
    if type(pipe).__name__ not in UNIFIED_PIPELINES:
        return {}
    kwargs: dict = {}
    schedule = pipe.config.get("sample_sigmas") if hasattr(pipe.config, "get") else None
    if schedule and len(schedule) != steps:
        kwargs["sigmas"] = [1.0 - (1.0 - 1.0 / steps) * i / max(1, steps - 1) for i in range(steps)]
    scale = getattr(pipe, "working_area_scale", None)
    if scale:
        kwargs["output_resolution"] = max(32, round(1024 * scale**0.5 / 32) * 32)
    return kwargs


def hand_out_previews(previewer: Previewer, pipeline: Any, latents: Tensor, previous: Tensor | None, steps_done: int,
                      owners: list[tuple[Job, int]], work_size: tuple[int, int]) -> Tensor | None:
    """Hand out the previews due after this step; return the latents to keep for the next step."""
    due = []  # (row, job, image index, partial index)
    for row, (job, index) in enumerate(owners):
        if job.cancelled or job.params.on_partial is None:
            continue
        for k, at in enumerate(job.preview_at):
            if at == steps_done and k >= job.partials_sent.get(index, 0):
                due.append((row, job, index, k))
    if due:
        rows = sorted({row for row, *_ in due})
        ends = [stages.start(job.params.trace, "preview", {"step": steps_done, "image_index": index,
                                                           "partial_image_index": k})
                for _, job, index, k in due]
        try:
            estimate = previewer.estimate(
                latents[rows], None if previous is None else previous[rows], pipeline.scheduler
            )
            made = previewer.render(estimate, work_size, [owners[row][0].size for row in rows])
        except Exception:  # previews are a courtesy: never worth a job
            log.exception("could not make partial images")
            made = None
        if made is not None:
            by_row = dict(zip(rows, made, strict=True))
            for row, job, index, k in due:
                job.partials_sent[index] = k + 1
                callback = job.params.on_partial
                try:
                    if callback is not None:  # checked above: only jobs with one have previews due
                        callback(index, k, by_row[row])
                except Exception:  # a caller's callback must not kill the job
                    log.exception("on_partial callback failed")
        for end in ends:
            end({"made": made is not None})
    wanted = any(
        steps_done + 1 in job.preview_at and not job.cancelled and job.params.on_partial is not None
        for job, _ in owners
    )
    return latents.detach().clone() if wanted else None


def inpaint_pipeline(pipe: Any) -> Any:
    """QwenImageEditInpaintPipeline around an edit pipeline's own components (no extra memory)."""
    from diffusers import QwenImageEditInpaintPipeline

    if type(pipe).__name__ not in MAX_IMAGES:
        return None
    # The constructor, not from_pipe: from_pipe casts the shared modules to its dtype (fp32 by default).
    inpaint = QwenImageEditInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def final_image(job: Job, image: Image) -> Image:
    """The pipeline's image as the caller gets it: exactly the asked size, a mask's kept area restored."""
    from PIL import Image

    if image.size != job.size:
        image = image.resize(job.size, Image.Resampling.LANCZOS)
    if job.mask is None:
        return image
    original, mask = job.inputs[0], job.mask
    if original.size != job.size:
        original = original.resize(job.size, Image.Resampling.LANCZOS)
        mask = mask.resize(job.size, Image.Resampling.NEAREST)
    return paste_kept(image, original, mask)
