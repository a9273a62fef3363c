"""The engine's worker thread: what it does with each batch the queue hands it (local_backend.engine).

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

import logging
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import enhance
from .calls import call_arguments, final_image, hand_out_previews
from .edit import working_area_scale
from .errors import EngineError, InvalidParamsError, LoraError
from .jobs import Job, empty_cuda_cache, is_oom, settle, summary, wrap_error
from .stages import CallStages

if TYPE_CHECKING:
    from torch import Tensor

    from .accel import Accel
    from .config import EngineConfig, PromptEnhancement
    from .loras import LoraManager, LoraRef
    from .previews import Previewer
    from .tiers import TierSet

log = logging.getLogger("local_backend.engine")  # the engine's logger: this is the engine at work


class EngineWorker:
    """The half of Engine (local_backend.engine) that runs on its worker thread: the loop, and one
    pipeline call per batch with its step callback, prompt rewriting before it and isolating a failure
    after it. Engine holds the state and the queue; these methods take batches from it (_take_batch),
    hand jobs back to it (_finish) and ask it for a job's LoRAs (_active_loras)."""

    # Engine.__init__ sets these (and the lock guards the queue and the flags).
    config: EngineConfig
    _pipe: Any
    _inpaint: Any
    _previewer: Previewer | None
    _loras: LoraManager
    _tiers: TierSet
    _accel: Accel
    _enhance: PromptEnhancement | None
    _multiple: int
    _max_images: int
    _area_scale: float | None
    _cond: threading.Condition
    _waiting: list[Job]
    _running: list[Job]
    _closed: bool
    _call_seconds: float | None
    _call_started: float | None
    _rewrites: enhance.Rewrites
    # Engine's own methods, called from here.
    _take_batch: Callable[[], list[tuple[Job, int]] | None]
    _finish: Callable[[Job], None]
    _active_loras: Callable[[Job], list[LoraRef]]

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

    def _execute(self, slots: list[tuple[Job, int]], base: Any = None) -> None:
        """One pipeline call for these slots. `base`: the pipeline, while it loads (the warm-up calls)."""
        import torch

        base = self._pipe if base is None else base
        first = slots[0][0]
        jobs = [job for job, _ in slots]
        prompts: list[str] = []
        negatives: list[str | None] = []
        generators: list[torch.Generator] = []
        owners: list[tuple[Job, int]] = []
        for job, count in slots:
            for index in range(job.next_index, job.next_index + count):
                prompts.append(job.params.prompt)
                negatives.append(job.negative)
                # CPU generators: the same seed gives the same noise on every device.
                generators.append(torch.Generator("cpu").manual_seed(job.seeds[index]))
                owners.append((job, index))
        self._loras.activate(base, self._active_loras(first))

        # Stage hooks (tracing) of the jobs in this call: spans for the call, its encoding, steps and decoding.
        hooks = [job.params.trace for job in jobs if job.params.trace is not None]
        traced = CallStages(hooks)
        steps_done = 0
        previous = None  # the last step's latents, kept only when a preview is due after this step
        previews = any(job.preview_at for job in jobs)

        def on_step_end(pipeline: Any, step: int, timestep: Tensor, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
            nonlocal steps_done, previous
            steps_done = step + 1
            for job in jobs:
                if job.params.on_step is not None and not job.cancelled:
                    try:
                        job.params.on_step(steps_done, first.steps)
                    except Exception:  # a caller's callback must not kill the batch
                        log.exception("on_step callback failed")
            if hooks:
                traced.step(steps_done)
            if previews:
                traced.previewing = True
                try:
                    previous = self._make_previews(pipeline, tensors["latents"], previous, steps_done, owners,
                                                   work_size)
                finally:
                    traced.previewing = False
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
            facts = {"batch_size": len(prompts), "steps": first.steps, "tier": first.tier, "cache": first.cache,
                     "width": work_size[0], "height": work_size[1], "cfg": first.negative is not None}
            traced.facts = facts
            try:
                with traced.stage("call", facts), traced.watch(pipe) if hooks else nullcontext(), \
                        self._accel.call(first.cache, first.steps, first.negative is not None):
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
            job.gpu_seconds += seconds * count / len(prompts)
        for job in jobs:
            job.steps_run = steps_done if job.steps_run == 0 else min(job.steps_run, steps_done)
            job.batch_size = max(job.batch_size, len(prompts))
            self._finish(job)

    def _make_previews(self, pipeline: Any, latents: Tensor, previous: Tensor | None, steps_done: int,
                       owners: list[tuple[Job, int]], work_size: tuple[int, int]) -> Tensor | None:
        if self._previewer is None:  # no job gets previews from an engine without a previewer (plan_job)
            return None
        return hand_out_previews(self._previewer, pipeline, latents, previous, steps_done, owners, work_size)

    def _enhance_prompts(self, slots: list[tuple[Job, int]]) -> list[tuple[Job, int]]:
        """Rewrite the prompts of the jobs that asked for it (local_backend.enhance), once each, before
        their first call: here, on the worker thread, the text encoder is not in use. Returns the slots
        still to run (a job stopped meanwhile is settled with its reason)."""
        if not any(job.enhance for job, _ in slots):
            return slots
        spec = self._enhance
        assert spec is not None  # a job asks for a rewrite only from an engine that has one (Engine.submit)
        instruction = enhance.instruction_for(self.config.task, spec)
        for job, _ in slots:
            if not job.enhance:
                continue
            job.enhance = False  # once, even when n > max_batch brings the job back
            key = (job.params.prompt, instruction, spec.max_new_tokens)
            text = self._rewrites.get(key)
            if text is None:
                text = self._rewrite(job, instruction)
                if text is not None:
                    self._rewrites.put(key, text)
            else:
                log.info("prompt rewrite reused (the same prompt was rewritten lately)")
            if text is not None:
                job.params = replace(job.params, prompt=text)
                job.revised_prompt = text
        kept = []
        for job, count in slots:
            with self._cond:
                # The deadline's timer thread may not have run yet on a busy machine: a rewrite cut
                # by the deadline must not go on to denoise.
                if job.params.deadline is not None and time.monotonic() >= job.params.deadline:
                    job.deadline_hit = True
                stopped = self._closed or job.cancelled or job.deadline_hit
            if stopped:
                self._finish(job)  # settles it with its reason
            else:
                kept.append((job, count))
        return kept

    def _rewrite(self, job: Job, instruction: str) -> str | None:
        """The text encoder's rewrite of the job's prompt, or None to keep it (the reason is logged)."""
        spec = self._enhance
        assert spec is not None  # as in _rewrite_prompts
        timeout = spec.timeout
        if job.params.deadline is not None:
            timeout = min(timeout, job.params.deadline - time.monotonic())
        done = enhance.rewrite(
            self._pipe, job.params.prompt, instruction=instruction, max_new_tokens=spec.max_new_tokens,
            timeout=timeout, should_stop=lambda: self._closed or job.cancelled or job.deadline_hit,
        )
        if done.text is not None:
            log.info("prompt rewritten in %.2f s (%d tokens, %s)", done.seconds, done.tokens, done.reason)
        elif done.reason != "cancelled":
            log.warning("prompt not rewritten (%s, %.2f s): using the prompt as given", done.reason, done.seconds)
        return done.text

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
