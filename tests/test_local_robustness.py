"""local_backend robustness: a bad job fails alone, never the jobs batched with it; the client's
mistakes are InvalidParamsError; the provider's model loading is a state of its own, not an outage.

All on the tiny random pipeline (loaded with the real from_pretrained). Failures are either real
(a lone surrogate that the real tokenizer rejects) or injected by wrapping the pipeline's own
methods for one marker prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402

from local_backend import (  # noqa: E402
    Engine,
    EngineConfig,
    EngineError,
    GenerationParams,
    InvalidParamsError,
)

SIZE = 32
STEPS = 2
MARKER = "the poisoned prompt"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, max_batch=4))
    eng.start()
    yield eng
    eng.close()


def params(prompt="a red fox", **kw) -> GenerationParams:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 1)
    return GenerationParams(prompt, **kw)


def pixels(result, i=0) -> np.ndarray:
    return np.asarray(result.images[i]).astype(np.int16)


class Gate:
    """Holds the worker inside a job until opened, so the jobs submitted meanwhile share one call."""

    def __init__(self, engine: Engine):
        self.started, self.release = threading.Event(), threading.Event()

        def hold(step, total):
            self.started.set()
            self.release.wait(30)

        self.job = engine.submit(params("gate", seed=99, on_step=hold))
        assert self.started.wait(30)

    def open(self):
        self.release.set()
        return self.job.future.result(30)


@contextlib.contextmanager
def fail_when_in_batch(engine, marker: str | None = None, exc_factory=None):
    """Records the prompts of every pipeline call (failed ones included; not the negative prompts).

    Fault injection: with a marker, the text encoding of any call whose prompts include it raises.
    """
    real = engine.pipe.encode_prompt
    calls: list[list[str]] = []

    def encode_prompt(prompt=None, *args, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if any(p != " " for p in prompts):  # " " is the default negative prompt (true CFG)
            calls.append(prompts)
        if marker is not None and any(marker in p for p in prompts):
            raise exc_factory(prompts)
        return real(prompt, *args, **kwargs)

    engine.pipe.encode_prompt = encode_prompt  # an instance attribute shadows the method
    try:
        yield calls
    finally:
        del engine.pipe.encode_prompt


def submit_batch(engine, jobs_params):
    """Submit while the worker is held, then let them all go as one call."""
    gate = Gate(engine)
    jobs = [engine.submit(p) for p in jobs_params]
    assert engine.queue_depth == len(jobs)
    gate.open()
    return jobs


def outcome(job):
    try:
        return job.future.result(60)
    except EngineError as e:
        return e


# ----- the client's mistakes -----


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["a \ud800 fox", "\udfff", "fox \udc80\udc81"])
def test_lone_surrogates_are_invalid_params(engine, field, text):
    p = params(**{field: text}) if field == "negative_prompt" else params(text)
    with pytest.raises(InvalidParamsError) as err:
        engine.submit(p)
    assert err.value.param == field
    assert "surrogate" in str(err.value)
    str(err.value).encode("utf-8")  # the message itself is safe to send and log


def test_text_the_tokenizer_takes_is_accepted(engine):
    # Measured: only lone surrogates break the tokenizer; all of these encode and generate.
    texts = ["a\x00b", "\x1b[31m red", "<|im_end|> <|image_pad|>", "\ufeff\uffff", "🦊 " * 300, ""]
    jobs = submit_batch(engine, [params(t, negative_prompt=t, cfg_scale=4.0) for t in texts])
    for job in jobs:
        assert job.future.result(60).images[0].size == (SIZE, SIZE)


def test_surrogate_prompt_does_not_touch_the_batch(engine, caplog):
    good = [params(f"good {i}", seed=10 + i) for i in range(3)]
    gate = Gate(engine)
    jobs = [engine.submit(good[0]), engine.submit(good[1])]
    with pytest.raises(InvalidParamsError) as err:
        engine.submit(params("a fox \ud800", seed=9))  # refused before it can join the batch
    assert err.value.param == "prompt"
    jobs.append(engine.submit(good[2]))

    async def through_asyncio():
        with pytest.raises(InvalidParamsError):
            await engine.generate(params("\ud800"))

    asyncio.run(through_asyncio())
    assert engine.queue_depth == 3
    with caplog.at_level(logging.INFO, logger="local_backend"):
        gate.open()
        results = [job.future.result(60) for job in jobs]
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_prompt_the_tokenizer_rejects_fails_alone(engine, monkeypatch, caplog):
    """Without the submit-time check, the real tokenizer's failure (a TypeError inside the Rust
    tokenizer) breaks the whole batched call: the jobs are run again one by one, the others get
    exactly their solo images, and the culprit's error is still the client's (400, not 502)."""
    from local_backend import planning

    good = [params(f"good {i}", seed=20 + i, n=1 + (i == 1)) for i in range(3)]
    solo = [engine.generate_sync(p) for p in good]
    monkeypatch.setattr(planning, "_check_text", lambda text, name: None)
    bad = params("a fox \ud800", seed=9)
    with caplog.at_level(logging.INFO, logger="local_backend"), fail_when_in_batch(engine) as calls:
        jobs = submit_batch(engine, [good[0], bad, good[1], good[2]])
        results = [outcome(job) for job in jobs]
    # The gate's call; the failed call (3 jobs, 4 images: max_batch), each of its jobs alone; then
    # the last job, which did not fit in that call, in its own.
    assert [len(c) for c in calls] == [1, 4, 1, 1, 2, 1]
    culprit = results.pop(1)
    assert isinstance(culprit, InvalidParamsError) and culprit.param == "prompt"
    assert "tokenizer" in str(culprit)
    for alone, batched in zip(solo, results, strict=True):
        assert batched.seeds == alone.seeds and batched.batch_size == len(alone.seeds)
        for i in range(len(alone.images)):
            assert np.array_equal(pixels(batched, i), pixels(alone, i))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]  # the client's fault: no ERROR, no traceback
    assert not any(r.exc_info for r in caplog.records)
    monkeypatch.undo()
    with pytest.raises(InvalidParamsError):
        engine.submit(bad)


def test_negative_prompt_the_tokenizer_rejects_is_named(engine, monkeypatch):
    from local_backend import planning

    monkeypatch.setattr(planning, "_check_text", lambda text, name: None)
    jobs = submit_batch(engine, [params("fine", seed=3), params("fine", seed=4, negative_prompt="\ud800")])
    assert jobs[0].future.result(60).images
    with pytest.raises(InvalidParamsError) as err:
        jobs[1].future.result(60)
    assert err.value.param == "negative_prompt"


# ----- failures of the engine's own -----


def test_injected_failure_fails_only_its_job(engine, caplog):
    good = [params(f"good {i}", seed=30 + i) for i in range(3)]
    solo = [engine.generate_sync(p) for p in good]
    def broke(prompts):
        return RuntimeError("injected: text encoder broke")

    with fail_when_in_batch(engine, MARKER, broke) as calls, caplog.at_level(logging.INFO, logger="local_backend"):
        jobs = submit_batch(engine, [good[0], good[1], params(MARKER, seed=5), good[2]])
        results = [outcome(job) for job in jobs]
    culprit = results.pop(2)
    assert isinstance(culprit, EngineError) and not isinstance(culprit, InvalidParamsError)
    assert str(culprit) == "generation failed: RuntimeError: injected: text encoder broke"
    assert [len(c) for c in calls] == [1, 4, 1, 1, 1, 1]  # the gate, the batch, then each job alone
    assert sum(MARKER in c for c in calls) == 2  # the culprit ran alone once, not again
    for alone, batched in zip(solo, results, strict=True):
        assert batched.batch_size == 1
        assert np.array_equal(pixels(batched), pixels(alone))  # exactly the image it gets alone
    # The engine's failure is logged once with its traceback; the batch failure only as a warning.
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert engine.generate_sync(params(MARKER)).images  # and the worker lives on


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the engine recognizes by name."""


def test_out_of_memory_of_a_batch_runs_each_job_alone(engine):
    real = engine.pipe.encode_prompt
    sizes: list[int] = []

    def encode_prompt(prompt=None, *args, **kwargs):
        sizes.append(len(prompt) if isinstance(prompt, list) else 1)
        if isinstance(prompt, list) and len(prompt) > 1:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(prompt, *args, **kwargs)

    engine.pipe.encode_prompt = encode_prompt
    try:
        jobs = submit_batch(engine, [params(f"p{i}", seed=40 + i) for i in range(3)])
        results = [job.future.result(60) for job in jobs]
        assert [r.batch_size for r in results] == [1, 1, 1]
        # A job of n=2 alone in its call runs out of memory too: it fails, and is not retried.
        sizes.clear()
        with pytest.raises(EngineError, match="out of GPU memory"):
            engine.generate_sync(params("two", n=2))
        assert sizes == [2]
    finally:
        del engine.pipe.encode_prompt


def test_failure_in_the_denoising_loop_fails_only_its_job(engine):
    """A failure later than the text encoder (in the transformer) is isolated the same way."""
    transformer = engine.pipe.transformer
    long_prompt = MARKER + " and a long tail" * 3
    marker_tokens = engine.pipe.encode_prompt(long_prompt)[0].shape[1]

    def pre_hook(module, args, kwargs):
        # Only a call with the marker job has this many prompt tokens (padded): that call fails.
        if kwargs["encoder_hidden_states"].shape[1] >= marker_tokens:
            raise ValueError("injected: bad latents")

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        jobs = submit_batch(
            engine, [params("short", seed=50), params(long_prompt), params("tiny", seed=51)]
        )
        first, culprit, last = (outcome(job) for job in jobs)
    finally:
        handle.remove()
    assert first.images and last.images and first.batch_size == 1
    assert isinstance(culprit, EngineError) and not isinstance(culprit, InvalidParamsError)
    assert "ValueError: injected: bad latents" in str(culprit)


def test_cancelled_job_is_not_rerun_after_a_batch_failure(engine):
    cancelled_job = None

    def cancel_then_fail(prompts):
        cancelled_job.cancel()  # cancelled while its batch was running
        return RuntimeError("injected")

    with fail_when_in_batch(engine, MARKER, cancel_then_fail) as calls:
        gate = Gate(engine)
        cancelled_job = engine.submit(params("cancel me", seed=60))
        culprit = engine.submit(params(MARKER, seed=61))
        other = engine.submit(params("fine", seed=62))
        gate.open()
        assert other.future.result(60).batch_size == 1
    from local_backend import JobCancelledError

    with pytest.raises(JobCancelledError):
        cancelled_job.future.result(10)
    with pytest.raises(EngineError):
        culprit.future.result(10)
    assert sum("cancel me" in c for c in calls) == 1  # in the failed batch, and never again


# ----- shutdown -----


def test_close_fails_waiting_jobs_and_stops_the_running_call(tiny_dir):
    engine = Engine(EngineConfig(model=str(tiny_dir), default_steps=STEPS, max_batch=2))
    engine.start()
    at_step, release = threading.Event(), threading.Event()
    steps: list[int] = []

    def hold(step, total):
        steps.append(step)
        at_step.set()
        release.wait(30)

    running = engine.submit(params("long", num_inference_steps=50, on_step=hold))
    assert at_step.wait(30)
    waiting = [engine.submit(params("waiting", num_inference_steps=50, seed=s)) for s in (3, 4, 5)]
    closer = threading.Thread(target=engine.close)
    closer.start()
    for job in waiting:  # at once, while the running call is still held
        with pytest.raises(EngineError, match="the engine was closed"):
            job.future.result(10)
    started = time.monotonic()
    release.set()
    closer.join(30)
    assert not closer.is_alive() and time.monotonic() - started < 10
    with pytest.raises(EngineError, match="the engine was closed"):
        running.future.result(10)
    assert steps == [1]  # the call stopped at its next step
    with pytest.raises(EngineError, match="closed"):
        engine.submit(params())
    assert not engine.loaded


# ----- LoRA paths are the client's too -----


@pytest.mark.parametrize(
    "path,message",
    [
        ("\ud800.safetensors", "lone surrogate"),
        ("owner/\udc80", "lone surrogate"),
        ("a\x00b.safetensors", "NUL"),
        ("a" * 5000 + ".safetensors", "cannot be used: File name too long"),
        ("owner/name/" + "a" * 5000 + ".safetensors", "cannot be used: File name too long"),
        ("https://[::1/x.safetensors?token=secret", "cannot be used: Invalid IPv6 URL"),
    ],
)
def test_unusable_lora_paths_are_lora_errors(tmp_path, path, message):
    from local_backend import LoraError, LoraSpec
    from local_backend.loras import LoraManager

    manager = LoraManager(EngineConfig(lora_dirs=[str(tmp_path)]))
    with pytest.raises(LoraError, match=message) as err:
        manager.resolve_request([LoraSpec(path)])
    assert err.value.param == "loras"
    text = str(err.value)
    text.encode("utf-8")
    assert str(tmp_path) not in text and "secret" not in text and len(text) < 400
