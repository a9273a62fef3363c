"""The engine: one pipeline, one worker thread, a bounded queue, batching and cancellation.

A diffusers pipeline is not thread-safe (two concurrent calls corrupt the scheduler's step
index), so every pipeline call, LoRA load included, runs on the single worker thread. Callers
submit jobs from any thread (or await them from asyncio) and get a concurrent Future back.

Batching: the worker takes the first ready job and fills the call, up to max_batch images, with
other waiting jobs that need the same pipeline arguments (size, steps, cfg, CFG on/off, LoRAs
and scales, speed tier: local_backend.tiers). Each image has its own CPU generator seeded with its own seed, so it gets the same
initial noise as it would alone. Prompts of different lengths can share a call: diffusers pads
the prompt embeddings and passes a mask, and the transformer's text RoPE positions do not depend
on the padded length. Measured on the tiny model: a batched image differs from the same image
made alone by at most ~1e-6 before quantization (at most 1/255 per pixel after), and that much
also for a batch of identical prompts, so it is float rounding of batch-size-dependent kernels
(matmul/conv blocking), not padding. Bit-exact batch invariance is not possible with these
kernels (on GPUs neither), so all prompts batch together.

Edits (an engine with task="edit") run one job per call: the edit pipelines take one prompt per
call, so a job's own images (n, with one generator each) share a call and nothing else does. A
mask switches the job to the inpainting pipeline built around the same components
(local_backend.edit says what it can and cannot do).

Partial images: a job with partial_images > 0 and an on_partial callback gets that many previews
per image, made from the latents in the step callback (local_backend.previews), each job's for its
own images only.

Isolation: one job never fails another. Text the tokenizer cannot take (lone surrogates) is refused
at submit, before it can join a batch. If a batched call raises anyway, each of its jobs runs again
in a call of its own: the culprit fails alone (as InvalidParamsError when the tokenizer rejects its
text, the client's fault), the others get exactly the images they would get alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from concurrent.futures import Future, InvalidStateError

from .config import EngineConfig, GenerationParams, GenerationResult
from .edit import MAX_IMAGES, check_images, check_mask, inpaint_working_size, paste_kept, working_area_scale
from .errors import (
    DeadlineExceededError,
    EngineError,
    InvalidParamsError,
    JobCancelledError,
    LoraError,
    QueueFullError,
)
from .loading import load_pipeline, validate_config
from .loras import LoraManager, LoraRef
from .previews import MAX_PARTIALS, Previewer, preview_steps
from .tiers import TierSet

log = logging.getLogger(__name__)

MAX_N = 16
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1


class Job:
    """One submitted request. `future` yields a GenerationResult or raises an EngineError."""

    def __init__(self, engine: Engine, params: GenerationParams, plan: dict, loras: list[LoraRef]):
        self.future: Future[GenerationResult] = Future()
        self.params = params
        self.seeds: list[int] = plan["seeds"]
        self.size: tuple[int, int] = plan["size"]  # what the caller gets
        self.gen_size: tuple[int, int] = plan["gen_size"]  # what the pipeline makes
        self.steps: int = plan["steps"]
        self.cfg: float = plan["cfg"]
        self.negative: str | None = plan["negative"]  # None: no CFG
        self.inputs: list = plan["images"]  # edits: the input images, RGB
        self.mask = plan["mask"]  # inpainting: "L", 255 = repaint
        self.preview_at: list[int] = plan["preview_at"]  # steps after which previews are due
        self.partials_sent: dict[int, int] = {}  # image index -> previews handed over (never twice)
        self.loras = loras  # the request's own (the tier's and the engine's base LoRAs join them)
        self.tier: str = plan["tier"]
        self.images: list = [None] * len(self.seeds)
        self.next_index = 0  # images handed to pipeline calls so far
        self.steps_run = 0
        self.batch_size = 0
        self.started_at: float | None = None
        self.cancelled = False
        self.deadline_hit = False
        self._engine = engine

    def cancel(self) -> None:
        """Drop the job if it waits; interrupt it at the next denoising step if it runs."""
        self._engine._cancel(self)

    @property
    def ready(self) -> bool:  # its LoRA downloads, if any, are done
        return all(ref.ready for ref in self.loras)

    @property
    def remaining(self) -> int:
        return len(self.seeds) - self.next_index


def _settle(future: Future, result=None, error: BaseException | None = None) -> None:
    """Complete a future unless the caller already cancelled it."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the set
        pass


def _summary(exc: BaseException) -> str:
    """The exception's type and first line: safe to show, no traceback."""
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return type(exc).__name__ + (f": {detail}" if detail else "")


def _is_oom(exc: BaseException) -> bool:
    return "OutOfMemory" in type(exc).__name__


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _wrap(exc: BaseException) -> EngineError:
    if isinstance(exc, EngineError):
        return exc
    if _is_oom(exc):
        return EngineError("out of GPU memory: try a smaller size, fewer images, or offload")
    return EngineError(f"generation failed: {_summary(exc)}")


class Engine:
    def __init__(self, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        validate_config(self.config)
        try:
            self._tiers = TierSet(self.config)  # checks the tiers config
        except EngineError:
            raise
        except Exception as e:  # a malformed tiers config (e.g. an unhashable name)
            raise EngineError(f"tiers: {type(e).__name__}: {e}") from None
        self._pipe = None
        self._device: str | None = None
        self._multiple = 16  # size granularity; read from the pipeline once loaded
        self._max_images = 0  # input images an edit takes (0: a text-to-image pipeline)
        self._area_scale: float | None = None  # edit working sizes (tiny models: local_backend.edit)
        self._inpaint = None  # the inpainting pipeline around the edit pipeline's components
        self._previewer: Previewer | None = None
        self._loras = LoraManager(self.config)
        self._base_loras: list[LoraRef] = []
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._waiting: list[Job] = []
        self._running: list[Job] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self._call_seconds: float | None = None  # moving average, for retry_after
        self._call_started: float | None = None

    # ----- lifecycle -----

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def pipe(self):
        """The pipeline itself. Only touch it while no job runs (it is not thread-safe)."""
        return self._pipe

    def load(self, progress=None) -> float:
        """Load the pipeline and the base LoRAs (blocking). Returns seconds spent."""
        with self._load_lock:
            if self._closed:
                raise EngineError("the engine is closed")
            if self._pipe is not None:
                return 0.0
            started = time.monotonic()
            pipe, device, _ = load_pipeline(self.config, progress)
            if self.config.base_loras:
                if progress:
                    progress(f"loading {len(self.config.base_loras)} base LoRA(s)")
                refs = [self._loras.resolve(spec, trusted=True) for spec in self.config.base_loras]
                self._loras.activate(pipe, refs, pinned=True)
                self._base_loras = refs
            self._tiers.load(pipe, self._loras, self._base_loras, progress)
            if self._closed:  # closed while it loaded: drop the pipeline rather than keep it
                raise EngineError("the engine was closed while it loaded")
            self._multiple = pipe.vae_scale_factor * 2
            if self.config.task == "edit":
                self._max_images = MAX_IMAGES.get(type(pipe).__name__, 1)
                self._area_scale = getattr(pipe, "working_area_scale", None)
                self._inpaint = _inpaint_pipeline(pipe)
            self._previewer = Previewer(pipe, self.config.preview)  # fits its map on first use
            self._pipe, self._device = pipe, device
            return time.monotonic() - started

    def start(self) -> None:
        """Load if needed and start the worker thread."""
        self.load()
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="qwen-image-engine", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the worker: waiting jobs fail, a running call is interrupted at its next step."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in waiting:
            _settle(job.future, error=EngineError("the engine was closed"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=120)  # the running call stops at its next step
        self._loras.close()
        if self._thread is None or not self._thread.is_alive():
            self._release_pipeline()

    def _release_pipeline(self) -> None:
        import torch

        self._pipe = self._inpaint = self._previewer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- submitting -----

    def submit(self, params: GenerationParams) -> Job:
        """Validate and queue. Raises InvalidParamsError/LoraError/QueueFullError at once."""
        self._check_open()
        plan = self._plan(params)
        loras = self._loras.resolve_request(list(params.loras or []))  # may start a download
        job = Job(self, params, plan, loras)
        with self._cond:
            self._check_open()
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(retry_after=self._retry_after())
            if params.deadline is not None and time.monotonic() >= params.deadline:
                _settle(job.future, error=DeadlineExceededError())
                return job
            self._waiting.append(job)
            self._cond.notify_all()
        for ref in loras:  # a finished download makes the job ready: wake the worker
            ref.source.add_done_callback(lambda _: self._wake())
        if params.deadline is not None:
            # A timer, not the worker, enforces it: the worker may be busy for a long while.
            timer = threading.Timer(max(0.0, params.deadline - time.monotonic()), self._expire, (job,))
            timer.daemon = True
            timer.start()
            job.future.add_done_callback(lambda _: timer.cancel())
        job.future.add_done_callback(lambda fut, job=job: fut.cancelled() and self._cancel(job))
        return job

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the engine is closed")
        if self._thread is None:
            raise EngineError("the engine is not started: call Engine.start() first")

    async def generate(self, params: GenerationParams) -> GenerationResult:
        """submit + await; cancelling the awaiting task cancels the job."""
        # submit() reads LoRA headers and the HF cache: keep that disk I/O off the event loop.
        submitting = asyncio.get_running_loop().run_in_executor(None, self.submit, params)
        try:
            job = await asyncio.shield(submitting)
        except asyncio.CancelledError:
            submitting.add_done_callback(_cancel_submitted)
            raise
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.cancel()
            raise

    def generate_sync(self, params: GenerationParams) -> GenerationResult:
        return self.submit(params).future.result()

    def _plan(self, p: GenerationParams) -> dict:
        cfg = self.config
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
        gen_size = self._generation_size(p.width, p.height)
        tier = self._tiers.get(p.tier)  # its steps and cfg_scale, unless the request sets them
        default_steps = cfg.default_steps if tier.steps is None else tier.steps
        default_scale = cfg.default_cfg_scale if tier.cfg_scale is None else tier.cfg_scale
        steps = default_steps if p.num_inference_steps is None else p.num_inference_steps
        if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
            raise InvalidParamsError(f"num_inference_steps must be an integer from 1 to {MAX_STEPS}", "steps")
        scale = default_scale if p.cfg_scale is None else p.cfg_scale
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise InvalidParamsError("cfg_scale must be a finite number >= 0", "cfg_scale")
        seed = random.randrange(2**31) if p.seed is None else p.seed
        if not _is_int(seed) or not 0 <= seed <= MAX_SEED - p.n:
            raise InvalidParamsError(f"seed must be an integer from 0 to {MAX_SEED - p.n}", "seed")
        # True CFG runs only with a negative prompt; " " is the official default. At cfg <= 1 the
        # pipeline ignores the negative prompt, so drop it (one batch key for all such jobs).
        do_cfg = scale > 1
        negative = (p.negative_prompt if p.negative_prompt is not None else " ") if do_cfg else None
        partials = p.partial_images
        if not _is_int(partials) or not 0 <= partials <= MAX_PARTIALS:
            raise InvalidParamsError(f"partial_images must be an integer from 0 to {MAX_PARTIALS}", "partial_images")
        images, mask = self._plan_inputs(p)
        return {
            "seeds": [seed + i for i in range(p.n)],
            "size": (p.width, p.height),
            "gen_size": gen_size,
            "steps": steps,
            "cfg": float(scale) if do_cfg else 1.0,
            "negative": negative,
            "images": images,
            "mask": mask,
            "preview_at": preview_steps(steps, partials) if p.on_partial is not None else [],
            "tier": tier.name,
        }

    def _plan_inputs(self, p: GenerationParams) -> tuple[list, object]:
        """The input images and mask of an edit, checked and converted (RGB, "L")."""
        images = p.images if p.images is not None else []
        if self.config.task != "edit":
            if images or p.mask is not None:
                raise InvalidParamsError(
                    "this model makes images from text: it takes no input images or mask (use an edit model)",
                    "images" if images else "mask",
                )
            return [], None
        if isinstance(images, (list, tuple)) and not images:
            many = self._max_images
            raise InvalidParamsError(
                f"this model edits images: give {'1 to ' + str(many) if many > 1 else 'one'} input "
                f"image{'s' if many > 1 else ''}",
                "images",
            )
        prepared = check_images(images, self._max_images)
        if p.mask is None:
            return prepared, None
        if self._inpaint is None:
            raise InvalidParamsError("masks are not supported by this model", "mask")
        if len(prepared) > 1:
            raise InvalidParamsError(
                f"a mask works with one input image, and this edit has {len(prepared)}: "
                "send the image to edit alone, or drop the mask",
                "mask",
            )
        return prepared, check_mask(p.mask, prepared[0])

    def _generation_size(self, width: int, height: int) -> tuple[int, int]:
        """The nearest size the model can make (a multiple of vae_scale_factor * 2); resized after."""
        m = self._multiple

        def nearest(v: int) -> int:
            return max(m, int(v / m + 0.5) * m)

        gen = (nearest(width), nearest(height))
        if gen[0] * gen[1] > self.config.max_pixels:  # rounding up crossed the limit: round down
            gen = (max(m, width // m * m), max(m, height // m * m))
        if gen[0] * gen[1] > self.config.max_pixels:  # only for extreme aspect ratios
            raise InvalidParamsError(f"size {width}x{height} is too narrow for this model", "size")
        return gen

    def _retry_after(self) -> float:
        # A queue slot frees when the worker takes its next batch, i.e. when the current call ends.
        per_call = self._call_seconds or 1.0
        elapsed = time.monotonic() - self._call_started if self._call_started else 0.0
        return round(max(0.5, per_call - elapsed), 1)

    # ----- cancelling -----

    def _cancel(self, job: Job) -> None:
        self._stop(job, JobCancelledError, "cancelled")

    def _expire(self, job: Job) -> None:
        self._stop(job, DeadlineExceededError, "deadline_hit")

    def _stop(self, job: Job, error: type[JobCancelledError], flag: str) -> None:
        """Drop a waiting job at once; flag a running one (the step callback interrupts it)."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                _settle(job.future, error=error(steps_run=job.steps_run))
            elif job in self._running:
                setattr(job, flag, True)  # the call's end settles it
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _sweep(self) -> None:
        """Drop waiting jobs whose LoRA download failed. Holds the lock."""
        for job in list(self._waiting):
            failed = next((r for r in job.loras if r.ready and r.source.exception() is not None), None)
            if failed is not None:
                self._waiting.remove(job)
                _settle(job.future, error=failed.source.exception())

    # ----- the worker -----

    def _work(self) -> None:
        while True:
            try:
                slots = self._take_batch()
            except Exception:  # a bug here must not leave every later job hanging
                log.exception("the engine worker could not take a batch")
                time.sleep(0.1)
                continue
            if slots is None:
                return
            try:
                self._run(slots)
            except BaseException as exc:  # the worker must outlive any failure
                log.exception("local generation failed")
                self._fail(slots, exc, log_it=False)
            finally:
                with self._cond:
                    self._running = []
                    self._call_started = None

    def _run(self, slots: list[tuple[Job, int]]) -> None:
        """One pipeline call for `slots`; if it fails, find the job that broke it.

        A batched call that raises is run again one job per call, so one bad job (an input the
        pipeline chokes on, an out-of-memory at the larger batch) fails alone and every other job
        gets exactly the images it would get alone (the same seeds, a batch of its own). A call of
        one job is never retried.
        """
        try:
            self._execute(slots)
        except Exception as exc:
            if len(slots) == 1 or isinstance(exc, LoraError) or self._closed:
                # LoRAs are shared by the whole call (they are part of the batch key): alone, each
                # job would fail the same way.
                self._fail(slots, exc)
                return
            log.warning(
                "a batched call of %d jobs failed (%s); running them one by one", len(slots), _summary(exc)
            )
            if _is_oom(exc):
                _empty_cuda_cache()
            for job, count in slots:
                with self._cond:
                    stopped = self._closed or job.cancelled or job.deadline_hit
                if stopped:
                    self._finish(job)  # settles it with its reason
                    continue
                try:
                    self._execute([(job, count)])
                except Exception as lone:
                    self._fail([(job, count)], lone)

    def _take_batch(self) -> list[tuple[Job, int]] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                self._sweep()
                first = next((job for job in self._waiting if job.ready), None)
                if first is not None:
                    break
                self._cond.wait()
            now = time.monotonic()
            key = self._batch_key(first)
            slots, room = [], self.config.max_batch
            for job in list(self._waiting):
                if room == 0:
                    break
                if job is not first and (not job.ready or self._batch_key(job) != key):
                    continue
                if job.started_at is None:
                    if not job.future.set_running_or_notify_cancel():  # cancelled via its future
                        self._waiting.remove(job)
                        continue
                    job.started_at = now
                count = min(job.remaining, room)
                slots.append((job, count))
                room -= count
                self._waiting.remove(job)  # _finish puts it back first if images remain
            self._running = [job for job, _ in slots]
            self._call_started = now
            return slots

    def _batch_key(self, job: Job) -> tuple:
        if job.inputs:  # an edit: one prompt per call, so a call of its own
            return ("edit", id(job))
        weights: dict[str, float] = {}
        for ref in self._active_loras(job):
            weights[ref.key()] = weights.get(ref.key(), 0.0) + ref.scale
        # The tier too: two tiers may share LoRAs but not their schedulers.
        return (job.gen_size, job.steps, job.cfg, job.negative is not None, tuple(sorted(weights.items())),
                job.tier)

    def _active_loras(self, job: Job) -> list[LoraRef]:
        return self._base_loras + self._tiers.loras(job.tier) + job.loras

    def _execute(self, slots: list[tuple[Job, int]]) -> None:
        import torch

        first = slots[0][0]
        jobs = [job for job, _ in slots]
        prompts, negatives, generators, owners = [], [], [], []
        for job, count in slots:
            for index in range(job.next_index, job.next_index + count):
                prompts.append(job.params.prompt)
                negatives.append(job.negative)
                # CPU generators: the same seed gives the same noise on every device.
                generators.append(torch.Generator("cpu").manual_seed(job.seeds[index]))
                owners.append((job, index))
        self._loras.activate(self._pipe, self._active_loras(first))

        steps_done = 0
        previous = None  # the last step's latents, kept only when a preview is due after this step
        previews = any(job.preview_at for job in jobs)

        def on_step_end(pipeline, step, timestep, tensors):
            nonlocal steps_done, previous
            steps_done = step + 1
            for job in jobs:
                if job.params.on_step is not None and not job.cancelled:
                    try:
                        job.params.on_step(steps_done, first.steps)
                    except Exception:  # a caller's callback must not kill the batch
                        log.exception("on_step callback failed")
            if previews:
                previous = self._make_previews(pipeline, tensors["latents"], previous, steps_done, owners, work_size)
            with self._cond:
                if self._closed or all(job.cancelled or job.deadline_hit for job in jobs):
                    pipeline._interrupt = True  # diffusers skips the remaining steps
            return {}

        with working_area_scale(self._area_scale):
            pipe, kwargs, work_size = self._call(first, prompts, negatives, generators)
            started = time.monotonic()
            scheduler = self._tiers.scheduler(first.tier)
            saved = pipe.scheduler
            if scheduler is not None:  # the tier's scheduler for this call only
                pipe.scheduler = scheduler
            try:
                output = pipe(
                    true_cfg_scale=first.cfg,
                    num_inference_steps=first.steps,
                    generator=generators,
                    callback_on_step_end=on_step_end,
                    output_type="pil",
                    **kwargs,
                )
            finally:
                if scheduler is not None:
                    pipe.scheduler = saved
        seconds = time.monotonic() - started
        self._call_seconds = (
            seconds if self._call_seconds is None else 0.7 * self._call_seconds + 0.3 * seconds
        )

        for (job, index), image in zip(owners, output.images, strict=True):
            job.images[index] = _final_image(job, image)
        for job, count in slots:  # only now: a failed call is run again from the same images
            job.next_index += count
        for job in jobs:
            job.steps_run = steps_done if job.steps_run == 0 else min(job.steps_run, steps_done)
            job.batch_size = max(job.batch_size, len(prompts))
            self._finish(job)

    def _call(self, first: Job, prompts: list, negatives: list, generators: list):
        """(pipeline, its arguments, the size it works at) for a call of these images."""
        cfg = first.negative is not None
        if not first.inputs:  # text to image: any number of prompts
            kwargs = {"prompt": prompts, "negative_prompt": negatives if cfg else None}
            kwargs.update(width=first.gen_size[0], height=first.gen_size[1])
            return self._pipe, kwargs, first.gen_size
        # An edit: one prompt, its images made with num_images_per_prompt (one generator each).
        kwargs = {
            "prompt": first.params.prompt,
            "negative_prompt": first.negative,
            "num_images_per_prompt": len(generators),
        }
        if first.mask is None:
            many = self._max_images > 1
            kwargs.update(image=list(first.inputs) if many else first.inputs[0])
            kwargs.update(width=first.gen_size[0], height=first.gen_size[1])
            return self._pipe, kwargs, first.gen_size
        # Inpainting works at ~1 MP of its input's aspect ratio, whatever the asked size: give it the
        # input stretched to the asked shape, so the result only needs resizing (local_backend.edit).
        from PIL import Image

        image, mask = first.inputs[0], first.mask
        if image.size != first.gen_size:
            image = image.resize(first.gen_size, Image.LANCZOS)
            mask = mask.resize(first.gen_size, Image.NEAREST)
        kwargs.update(image=image, mask_image=mask, strength=1.0)
        return self._inpaint, kwargs, inpaint_working_size(first.gen_size, self._multiple)

    def _make_previews(self, pipeline, latents, previous, steps_done: int, owners: list, work_size):
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
            try:
                estimate = self._previewer.estimate(
                    latents[rows], None if previous is None else previous[rows], pipeline.scheduler
                )
                made = self._previewer.render(estimate, work_size, [owners[row][0].size for row in rows])
            except Exception:  # previews are a courtesy: never worth a job
                log.exception("could not make partial images")
                made = None
            if made is not None:
                by_row = dict(zip(rows, made, strict=True))
                for row, job, index, k in due:
                    job.partials_sent[index] = k + 1
                    try:
                        job.params.on_partial(index, k, by_row[row])
                    except Exception:  # a caller's callback must not kill the job
                        log.exception("on_partial callback failed")
        wanted = any(
            steps_done + 1 in job.preview_at and not job.cancelled and job.params.on_partial is not None
            for job, _ in owners
        )
        return latents.detach().clone() if wanted else None

    def _finish(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                error = EngineError("the engine was closed")
            elif job.cancelled:
                error = JobCancelledError(steps_run=job.steps_run)
            elif job.deadline_hit:
                error = DeadlineExceededError(steps_run=job.steps_run)
            elif job.remaining:  # n > max_batch: its next images go first
                self._waiting.insert(0, job)
                return
            else:
                error = None
        if error is not None:
            _settle(job.future, error=error)
            return
        result = GenerationResult(
            images=list(job.images),
            seeds=list(job.seeds),
            steps_run=job.steps_run,
            batch_size=job.batch_size,
            seconds=time.monotonic() - (job.started_at or time.monotonic()),
        )
        _settle(job.future, result)

    def _fail(self, slots: list[tuple[Job, int]], exc: BaseException, log_it: bool = True) -> None:
        """Settle the jobs of a call that raised. A job alone in its call gets its own diagnosis."""
        error = self._diagnose(slots[0][0], exc) if len(slots) == 1 else _wrap(exc)
        if log_it and isinstance(error, InvalidParamsError):  # the client's fault: no traceback
            log.info("local job refused: %s", error)
        elif log_it:
            log.error("local generation failed: %s", error, exc_info=exc)
        with self._cond:
            closed = self._closed
            for job, _ in slots:
                if job in self._waiting:
                    self._waiting.remove(job)
        for job, _ in slots:
            _settle(job.future, error=EngineError("the engine was closed") if closed else error)
        if _is_oom(exc):
            _empty_cuda_cache()

    def _diagnose(self, job: Job, exc: BaseException) -> EngineError:
        """What made a call of this job alone fail: its own text (a client error) or the engine."""
        if not isinstance(exc, Exception) or isinstance(exc, EngineError) or _is_oom(exc):
            return _wrap(exc)
        # Runs on the worker thread between calls: the tokenizer is not in use.
        tokenizer = getattr(self._pipe, "tokenizer", None)
        texts = [("prompt", job.params.prompt), ("negative_prompt", job.negative)]  # as the call used them
        for name, text in texts:
            if tokenizer is None or text is None:
                continue
            try:
                tokenizer(text)
            except Exception as e:
                return InvalidParamsError(f"the model's tokenizer cannot read the {name}: {_summary(e)}", name)
        return _wrap(exc)


def _inpaint_pipeline(pipe):
    """QwenImageEditInpaintPipeline around an edit pipeline's own components (no extra memory)."""
    from diffusers import QwenImageEditInpaintPipeline

    if type(pipe).__name__ not in MAX_IMAGES:
        return None
    # The constructor, not from_pipe: from_pipe casts the shared modules to its dtype (fp32 by default).
    inpaint = QwenImageEditInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    return inpaint


def _final_image(job: Job, image):
    """The pipeline's image as the caller gets it: exactly the asked size, a mask's kept area restored."""
    from PIL import Image

    if image.size != job.size:
        image = image.resize(job.size, Image.LANCZOS)
    if job.mask is None:
        return image
    original, mask = job.inputs[0], job.mask
    if original.size != job.size:
        original = original.resize(job.size, Image.LANCZOS)
        mask = mask.resize(job.size, Image.NEAREST)
    return paste_kept(image, original, mask)


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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cancel_submitted(submitting: asyncio.Future) -> None:
    """The caller gave up while its job was being submitted: cancel the job once it exists."""
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()
