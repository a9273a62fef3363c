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

What the worker thread does with each batch (the pipeline call, partial images, prompt
enhancement, isolating a failed job) is local_backend.worker; Engine is that worker plus the queue
and the lifecycle here.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any

from . import enhance
from .accel import WARM_STEPS, Accel, Progress
from .calls import inpaint_pipeline
from .config import EngineConfig, GenerationParams, GenerationResult
from .edit import MAX_IMAGES, UNIFIED_PIPELINES, working_area_scale
from .errors import DeadlineExceededError, EngineError, JobCancelledError, QueueFullError
from .exclusive import exclusive
from .jobs import Job, settle
from .loading import load_pipeline, validate_config
from .loras import LoraManager, LoraRef
from .planning import LoadedFacts, generation_size, plan_job
from .previews import Previewer
from .tiers import TierSet
from .worker import EngineWorker


class Engine(EngineWorker):
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        validate_config(self.config)
        try:
            self._tiers = TierSet(self.config)  # checks the tiers config
        except EngineError:
            raise
        except Exception as e:  # a malformed tiers config (e.g. an unhashable name)
            raise EngineError(f"tiers: {type(e).__name__}: {e}") from None
        self._enhance = enhance.parse_spec(self.config.prompt_enhancement)  # None: never rewrite
        self._rewrites = enhance.Rewrites()  # used on the worker thread only
        self._accel = Accel(self.config)  # checks the speed options (compile, cache, attention backend)
        self._pipe = None
        self._device: str | None = None
        self._multiple = 16  # size granularity; read from the pipeline once loaded
        self._max_images = 0  # input images an edit takes (0: a text-to-image pipeline)
        self._images_optional = False  # a model that both generates and edits (Qwen-Image-2.1)
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
    def accel(self) -> Accel:
        """The engine's speed options (local_backend.accel.Accel): what is on, the cache levels."""
        return self._accel

    @property
    def placement(self) -> dict | None:
        """Where the loaded pipeline is (offload mode, text encoder's device; with offload: auto, the
        estimated peak and the GPU memory it was planned for). None until loaded."""
        return getattr(self._pipe, "placement", None) if self._pipe is not None else None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def pipe(self) -> Any:  # a diffusers pipeline
        """The pipeline itself. Only touch it while no job runs (it is not thread-safe)."""
        return self._pipe

    def load(self, progress: Progress | None = None) -> float:
        """Load the pipeline and the base LoRAs (blocking). Returns seconds spent. All of it (LoRAs, speed
        options, warm-up) is one module-building step: alone in the process (local_backend.exclusive)."""
        with self._load_lock, exclusive(progress):
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
            kind = type(pipe).__name__
            if kind in UNIFIED_PIPELINES:  # generations and edits (0 to N references), no mask
                self._max_images, self._images_optional = UNIFIED_PIPELINES[kind], True
                self._area_scale = getattr(pipe, "working_area_scale", None)
            elif self.config.task == "edit":
                self._max_images = MAX_IMAGES.get(kind, 1)
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

    def _warm_call(self, pipe: Any, size: tuple[int, int], batch: int, level: str, tier: str) -> None:
        """One short call at load (local_backend.accel.warm_up) through the path requests take: planned
        as a job, then _execute (the tier's LoRAs and scheduler, the cache level). True CFG, so the
        transformer sees two text lengths (the prompt and the negative " "); a batch of 2 is two
        prompts of different lengths (an edit: one prompt, 2 images)."""
        from PIL import Image

        facts = self._facts()
        width, height = size
        common: dict[str, Any] = dict(width=width, height=height, num_inference_steps=WARM_STEPS, cfg_scale=4.0, seed=0,
                      tier=tier, acceleration=level, prompt_enhancement=False)
        if self.config.task == "edit" and not self._images_optional:
            gray = Image.new("RGB", size, (128, 128, 128))
            params = [GenerationParams("warm up", n=batch, images=[gray], **common)]
        else:
            prompts = ["warm up", "warm up the compiled blocks at this size"][:batch]
            params = [GenerationParams(prompt, **common) for prompt in prompts]
        jobs = [Job(self._cancel, p, plan_job(p, facts), []) for p in params]
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

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- submitting -----

    def submit(self, params: GenerationParams) -> Job:
        """Validate and queue. Raises InvalidParamsError/LoraError/QueueFullError at once."""
        self._check_open()
        plan = plan_job(params, self._facts())
        loras = self._loras.resolve_request(list(params.loras or []))  # may start a download
        job = Job(self._cancel, params, plan, loras)
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
        def cancelled(fut: Future, job: Job = job) -> None:  # the caller cancelled the future: stop the job
            if fut.cancelled():
                self._cancel(job)

        job.future.add_done_callback(cancelled)
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
            images_optional=self._images_optional,
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
                job.picked_up({"dropped": flag})
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

    # ----- the queue, as the worker sees it -----

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
                    job.picked_up({"queue_depth": len(self._waiting) - 1})
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
            queued_seconds=(job.started_at or job.submitted_at) - job.submitted_at,
            gpu_seconds=job.gpu_seconds,
        )
        settle(job.future, result)


def _cancel_submitted(submitting: asyncio.Future) -> None:
    """The caller gave up while its job was being submitted: cancel the job once it exists."""
    if not submitting.cancelled() and submitting.exception() is None:
        submitting.result().cancel()
