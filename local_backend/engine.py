"""The engine: one pipeline, one worker thread, a bounded queue, batching and cancellation.

A diffusers pipeline is not thread-safe (two concurrent calls corrupt the scheduler's step
index), so every pipeline call, LoRA load included, runs on the single worker thread. Callers
submit jobs from any thread (or await them from asyncio) and get a concurrent Future back.

Batching: the worker takes the first ready job and fills the call, up to max_batch images, with
other waiting jobs that need the same pipeline arguments (size, steps, cfg, CFG on/off, LoRAs
and scales, speed tier: local_backend.tiers, cache level: local_backend.accel). Each image has its
own CPU generator seeded with its own seed, so it gets the same initial noise as it would alone. Prompts of different lengths can share a call: diffusers pads
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

Prompt enhancement (EngineConfig.prompt_enhancement): a job that asks for it has its prompt rewritten
by the pipeline's own text encoder (local_backend.enhance) on the worker thread, right before its
first call; the images are made from the rewritten prompt, which the result carries.

Isolation: one job never fails another. Text the tokenizer cannot take (lone surrogates) is refused
at submit, before it can join a batch. If a batched call raises anyway, each of its jobs runs again
in a call of its own: the culprit fails alone (as InvalidParamsError when the tokenizer rejects its
text, the client's fault), the others get exactly the images they would get alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace

from . import enhance
from .accel import WARM_STEPS, Accel
from .calls import call_arguments, final_image, hand_out_previews, inpaint_pipeline
from .config import EngineConfig, GenerationParams, GenerationResult
from .edit import MAX_IMAGES, working_area_scale
from .errors import (
    DeadlineExceededError,
    EngineError,
    InvalidParamsError,
    JobCancelledError,
    LoraError,
    QueueFullError,
)
from .jobs import Job, empty_cuda_cache, is_oom, settle, summary, wrap_error
from .loading import load_pipeline, validate_config
from .loras import LoraManager, LoraRef
from .planning import LoadedFacts, generation_size, plan_job
from .previews import Previewer
from .tiers import TierSet

log = logging.getLogger(__name__)



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
        self._enhance = enhance.parse_spec(self.config.prompt_enhancement)  # None: never rewrite
        self._accel = Accel(self.config)  # checks the speed options (compile, cache, attention backend)
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
    def warnings(self) -> list[str]:
        """Speed options left off at load, each with the reason (local_backend.accel)."""
        return list(self._accel.warnings)

    @property
    def accel(self):
        """The engine's speed options (local_backend.accel.Accel): what is on, the cache levels."""
        return self._accel

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
            self._accel.prepare(pipe, device, progress or (lambda stage: None))
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
                self._inpaint = inpaint_pipeline(pipe)
            self._previewer = Previewer(pipe, self.config.preview)  # fits its map on first use
            with working_area_scale(self._area_scale):  # compile: warm the shapes up now, not on a request
                facts = self._facts()
                self._accel.warm_up(progress or (lambda stage: None),
                                    lambda width, height: generation_size(facts, width, height),
                                    self.config.max_batch,
                                    lambda size, batch, level, tier: self._warm_call(pipe, size, batch, level, tier),
                                    tiers=list(self._tiers.tiers))
            self._call_seconds = None  # the warm-up calls (compiling) say nothing of a real call's time
            self._pipe, self._device = pipe, device
            return time.monotonic() - started

    def _warm_call(self, pipe, size: tuple[int, int], batch: int, level: str, tier: str) -> None:
        """One short call at load (local_backend.accel.warm_up) through the path requests take: planned
        as a job, then _execute (the tier's LoRAs and scheduler, the cache level). True CFG, so the
        transformer sees two text lengths (the prompt and the negative " "); a batch of 2 is two
        prompts of different lengths (an edit: one prompt, 2 images)."""
        from PIL import Image

        facts = self._facts()
        width, height = size
        common = dict(width=width, height=height, num_inference_steps=WARM_STEPS, cfg_scale=4.0, seed=0,
                      tier=tier, acceleration=level, prompt_enhancement=False)
        if self.config.task == "edit":
            gray = Image.new("RGB", size, (128, 128, 128))
            params = [GenerationParams("warm up", n=batch, images=[gray], **common)]
        else:
            prompts = ["warm up", "warm up the compiled blocks at this size"][:batch]
            params = [GenerationParams(prompt, **common) for prompt in prompts]
        jobs = [Job(self, p, plan_job(p, facts), []) for p in params]
        self._execute([(job, job.remaining) for job in jobs], base=pipe)
        for job in jobs:
            job.future.result(0)  # raises what the call raised, if it settled with an error

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
            settle(job.future, error=EngineError("the engine was closed"))
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
        plan = plan_job(params, self._facts())
        loras = self._loras.resolve_request(list(params.loras or []))  # may start a download
        job = Job(self, params, plan, loras)
        with self._cond:
            self._check_open()
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFullError(retry_after=self._retry_after())
            if params.deadline is not None and time.monotonic() >= params.deadline:
                settle(job.future, error=DeadlineExceededError())
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

    def _facts(self) -> LoadedFacts:
        return LoadedFacts(
            config=self.config, tiers=self._tiers, accel=self._accel, enhance=self._enhance,
            multiple=self._multiple, max_images=self._max_images, can_inpaint=self._inpaint is not None,
        )

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
                settle(job.future, error=error(steps_run=job.steps_run))
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
                settle(job.future, error=failed.source.exception())

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
        slots = self._enhance_prompts(slots)
        if not slots:
            return
        try:
            self._execute(slots)
        except Exception as exc:
            if len(slots) == 1 or isinstance(exc, LoraError) or self._closed:
                # LoRAs are shared by the whole call (they are part of the batch key): alone, each
                # job would fail the same way.
                self._fail(slots, exc)
                return
            log.warning(
                "a batched call of %d jobs failed (%s); running them one by one", len(slots), summary(exc)
            )
            if is_oom(exc):
                empty_cuda_cache()
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
                job.tier, job.cache)

    def _active_loras(self, job: Job) -> list[LoraRef]:
        return self._base_loras + self._tiers.loras(job.tier) + job.loras

    def _execute(self, slots: list[tuple[Job, int]], base=None) -> None:
        """One pipeline call for these slots. `base`: the pipeline, while it loads (the warm-up calls)."""
        import torch

        base = self._pipe if base is None else base
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
        self._loras.activate(base, self._active_loras(first))

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
            pipe, kwargs, work_size = call_arguments(
                first, prompts, negatives, generators, pipe=base, inpaint=self._inpaint,
                max_images=self._max_images, multiple=self._multiple,
            )
            started = time.monotonic()
            scheduler = self._tiers.scheduler(first.tier)
            saved = pipe.scheduler
            if scheduler is not None:  # the tier's scheduler for this call only
                pipe.scheduler = scheduler
            try:
                with self._accel.call(first.cache, first.steps, first.negative is not None):
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
            job.images[index] = final_image(job, image)
        for job, count in slots:  # only now: a failed call is run again from the same images
            job.next_index += count
        for job in jobs:
            job.steps_run = steps_done if job.steps_run == 0 else min(job.steps_run, steps_done)
            job.batch_size = max(job.batch_size, len(prompts))
            self._finish(job)

    def _make_previews(self, pipeline, latents, previous, steps_done: int, owners: list, work_size):
        return hand_out_previews(self._previewer, pipeline, latents, previous, steps_done, owners, work_size)

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
            settle(job.future, error=error)
            return
        result = GenerationResult(
            images=list(job.images),
            seeds=list(job.seeds),
            steps_run=job.steps_run,
            batch_size=job.batch_size,
            seconds=time.monotonic() - (job.started_at or time.monotonic()),
            revised_prompt=job.revised_prompt,
        )
        settle(job.future, result)

    def _enhance_prompts(self, slots: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """Rewrite the prompts of the jobs that asked for it (local_backend.enhance), once each, before
        their first call: here, on the worker thread, the text encoder is not in use. Returns the slots
        still to run (a job stopped meanwhile is settled with its reason)."""
        if not any(job.enhance for job, _ in slots):
            return slots
        for job, _ in slots:
            if not job.enhance:
                continue
            job.enhance = False  # once, even when n > max_batch brings the job back
            timeout = self._enhance.timeout
            if job.params.deadline is not None:
                timeout = min(timeout, job.params.deadline - time.monotonic())
            done = enhance.rewrite(
                self._pipe, job.params.prompt, instruction=enhance.instruction_for(self.config.task, self._enhance),
                max_new_tokens=self._enhance.max_new_tokens, timeout=timeout,
                should_stop=lambda job=job: self._closed or job.cancelled or job.deadline_hit,
            )
            if done.text is not None:
                job.params = replace(job.params, prompt=done.text)
                job.revised_prompt = done.text
                log.info("prompt rewritten in %.2f s (%d tokens, %s)", done.seconds, done.tokens, done.reason)
            elif done.reason != "cancelled":
                log.warning("prompt not rewritten (%s, %.2f s): using the prompt as given", done.reason, done.seconds)
        kept = []
        for job, count in slots:
            with self._cond:
                stopped = self._closed or job.cancelled or job.deadline_hit
            if stopped:
                self._finish(job)  # settles it with its reason
            else:
                kept.append((job, count))
        return kept

    def _fail(self, slots: list[tuple[Job, int]], exc: BaseException, log_it: bool = True) -> None:
        """Settle the jobs of a call that raised. A job alone in its call gets its own diagnosis."""
        error = self._diagnose(slots[0][0], exc) if len(slots) == 1 else wrap_error(exc)
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
            settle(job.future, error=EngineError("the engine was closed") if closed else error)
        if is_oom(exc):
            empty_cuda_cache()

    def _diagnose(self, job: Job, exc: BaseException) -> EngineError:
        """What made a call of this job alone fail: its own text (a client error) or the engine."""
        if not isinstance(exc, Exception) or isinstance(exc, EngineError) or is_oom(exc):
            return wrap_error(exc)
        # Runs on the worker thread between calls: the tokenizer is not in use.
        tokenizer = getattr(self._pipe, "tokenizer", None)
        texts = [("prompt", job.params.prompt), ("negative_prompt", job.negative)]  # as the call used them
        for name, text in texts:
            if tokenizer is None or text is None:
                continue
            try:
                tokenizer(text)
            except Exception as e:
                return InvalidParamsError(f"the model's tokenizer cannot read the {name}: {summary(e)}", name)
        return wrap_error(exc)


def _cancel_submitted(submitting: asyncio.Future) -> None:
    """The caller gave up while its job was being submitted: cancel the job once it exists."""
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()
