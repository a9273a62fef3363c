"""local_backend: the engine on the tiny random pipeline, loaded with the real from_pretrained."""

from __future__ import annotations

import asyncio
import io
import os
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
    JobCancelledError,
    LoraError,
    LoraSpec,
    QueueFullError,
)
from local_backend.errors import DeadlineExceededError  # noqa: E402
from tests.local_helpers import lora_state_dict, make_lora_file  # noqa: E402

SIZE = 32
STEPS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("loras")
    for seed in range(1, 5):
        make_lora_file(tiny_dir, folder / f"l{seed}.safetensors", seed=seed)
    return folder


def make_engine(tiny_dir, lora_dir=None, **overrides) -> Engine:
    config = EngineConfig(
        model=str(tiny_dir),
        default_steps=STEPS,
        lora_dirs=[str(lora_dir)] if lora_dir else [],
        **overrides,
    )
    engine = Engine(config)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_dir, lora_dir):
    eng = make_engine(tiny_dir, lora_dir)
    yield eng
    eng.close()


def params(prompt="a red fox", **kw) -> GenerationParams:
    kw.setdefault("width", SIZE)
    kw.setdefault("height", SIZE)
    kw.setdefault("seed", 1)
    return GenerationParams(prompt, **kw)


def pixels(result, i=0) -> np.ndarray:
    return np.asarray(result.images[i]).astype(np.int16)


def max_diff(a, b) -> int:
    return int(np.abs(a - b).max())


class Gate:
    """Keeps the worker busy inside a job until released, so others queue up behind it."""

    def __init__(self, engine: Engine, steps: int = 2):
        self.started, self.release = threading.Event(), threading.Event()

        def hold(step, total):
            self.started.set()
            self.release.wait(30)

        self.job = engine.submit(params("gate", num_inference_steps=steps, on_step=hold, seed=99))
        assert self.started.wait(30)

    def open(self):
        self.release.set()
        return self.job.future.result(30)


# ----- loading and basics -----


def test_tiny_cache_is_built_once(tmp_path, monkeypatch):
    from local_backend import tiny

    monkeypatch.setenv("QWEN_IMAGE_PROXY_CACHE", str(tmp_path))
    first = tiny.tiny_pipeline_dir()
    assert (first / "model_index.json").exists()
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert tiny.tiny_pipeline_dir() == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_VERSION]  # no temp folder left behind


def test_load_reports_progress_and_is_idempotent(tiny_dir):
    stages = []
    engine = Engine(EngineConfig(model=str(tiny_dir)))
    seconds = engine.load(stages.append)
    assert engine.loaded and seconds > 0
    assert any("loading" in s for s in stages)
    assert engine.load() == 0.0
    engine.close()
    assert not engine.loaded


def test_bad_config_and_not_started(tiny_dir):
    with pytest.raises(EngineError, match="offload"):
        Engine(EngineConfig(offload="disk"))
    with pytest.raises(EngineError, match="quantization"):
        Engine(EngineConfig(quantization="int3"))
    engine = Engine(EngineConfig(model=str(tiny_dir)))
    with pytest.raises(EngineError, match="start"):
        engine.submit(params())
    with pytest.raises(EngineError, match="could not load"):
        Engine(EngineConfig(model="nobody/no-such-model", local_files_only=True)).load()


def test_quantization_without_its_library_fails_clearly(tiny_dir):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(EngineError, match="needs the bitsandbytes package"):
        Engine(EngineConfig(model=str(tiny_dir), quantization="nf4")).load()


def test_offload_is_ignored_on_cpu(tiny_dir):
    engine = make_engine(tiny_dir, device="cpu", offload="group")
    try:
        assert engine.generate_sync(params()).steps_run == STEPS
    finally:
        engine.close()


def test_scheduler_overrides_reach_the_scheduler(tiny_dir):
    engine = Engine(EngineConfig(model=str(tiny_dir), scheduler={"shift": 1.0, "time_shift_type": "linear"}))
    engine.load()
    assert engine.pipe.scheduler.config.time_shift_type == "linear"
    engine.close()


# ----- sizes, seeds, steps, cfg -----


@pytest.mark.parametrize("size", [(72, 40), (70, 38), (SIZE, SIZE), (33, 90)])
def test_size_is_exact(engine, size):
    result = engine.generate_sync(params(width=size[0], height=size[1], n=2))
    assert [im.size for im in result.images] == [size, size]


def test_size_limit(engine):
    with pytest.raises(InvalidParamsError) as err:
        engine.submit(params(width=4000, height=4000))
    assert err.value.param == "size"
    with pytest.raises(InvalidParamsError) as err:
        engine.submit(params(width=1, height=7_000_000))
    assert err.value.param == "size"


@pytest.mark.parametrize(
    "bad,param",
    [
        ({"n": 0}, "n"),
        ({"num_inference_steps": 0}, "steps"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"seed": -1}, "seed"),
        ({"width": 0}, "size"),
    ],
)
def test_invalid_params(engine, bad, param):
    with pytest.raises(InvalidParamsError) as err:
        engine.submit(params(**bad))
    assert err.value.param == param


def test_seeds(engine):
    a = engine.generate_sync(params(seed=5, n=2))
    b = engine.generate_sync(params(seed=5, n=2))
    assert a.seeds == [5, 6]
    assert max_diff(pixels(a), pixels(b)) == 0 and max_diff(pixels(a, 1), pixels(b, 1)) == 0
    assert max_diff(pixels(a), pixels(a, 1)) > 0  # image i has seed + i
    alone = engine.generate_sync(params(seed=6))
    assert max_diff(pixels(alone), pixels(a, 1)) <= 1  # see the batching note in engine.py
    random_seed = engine.generate_sync(params(seed=None))
    again = engine.generate_sync(params(seed=random_seed.seeds[0]))
    assert max_diff(pixels(random_seed), pixels(again)) == 0


def test_steps_and_cfg_reach_the_pipeline(engine):
    calls = []
    hook = engine.pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        seen = []
        with_cfg = engine.generate_sync(
            params(num_inference_steps=5, cfg_scale=4.0, on_step=lambda s, t: seen.append((s, t)))
        )
        assert seen == [(i, 5) for i in range(1, 6)] and with_cfg.steps_run == 5
        assert len(calls) == 10  # true CFG: a conditional and an unconditional pass per step
        calls.clear()
        without = engine.generate_sync(params(num_inference_steps=5, cfg_scale=1.0))
        assert len(calls) == 5
        assert max_diff(pixels(with_cfg), pixels(without)) > 0
    finally:
        hook.remove()
    default = engine.generate_sync(params())
    assert default.steps_run == STEPS


def test_on_step_exception_does_not_fail_the_job(engine):
    def boom(step, total):
        raise RuntimeError("callback bug")

    assert engine.generate_sync(params(on_step=boom)).steps_run == STEPS


# ----- LoRAs -----


def test_lora_changes_output_and_scale_zero_is_base(engine):
    base = pixels(engine.generate_sync(params()))
    styled = pixels(engine.generate_sync(params(loras=[LoraSpec("l1.safetensors")])))
    half = pixels(engine.generate_sync(params(loras=[LoraSpec("l1.safetensors", 0.5)])))
    zero = pixels(engine.generate_sync(params(loras=[LoraSpec("l1.safetensors", 0.0)])))
    after = pixels(engine.generate_sync(params()))
    assert max_diff(base, styled) > 5
    assert max_diff(base, half) > 0 and max_diff(styled, half) > 0
    assert max_diff(base, zero) == 0
    assert max_diff(base, after) == 0  # a request without LoRAs gets the plain base model


def test_three_loras_at_once_and_a_fourth_is_refused(engine, lora_dir):
    three = [LoraSpec(f"l{i}.safetensors", 0.7) for i in (1, 2, 3)]
    base = pixels(engine.generate_sync(params()))
    mixed = engine.generate_sync(params(loras=three))
    assert max_diff(base, pixels(mixed)) > 0
    with pytest.raises(LoraError) as err:
        engine.submit(params(loras=three + [LoraSpec("l4.safetensors")]))
    assert err.value.param == "loras" and "at most 3" in str(err.value)
    absolute = engine.generate_sync(
        params(loras=[LoraSpec(str(lora_dir / "l1.safetensors"), 0.7)] + three[1:])
    )
    assert max_diff(pixels(mixed), pixels(absolute)) == 0


def test_lora_cache_evicts(tiny_dir, lora_dir):
    engine = make_engine(tiny_dir, lora_dir, lora_cache_size=2)
    try:
        first = pixels(engine.generate_sync(params(loras=[LoraSpec("l1.safetensors")])))
        for i in (2, 3, 4):
            engine.generate_sync(params(loras=[LoraSpec(f"l{i}.safetensors")]))
        assert len(engine.pipe.get_list_adapters()["transformer"]) == 2
        again = pixels(engine.generate_sync(params(loras=[LoraSpec("l1.safetensors")])))
        assert max_diff(first, again) == 0
    finally:
        engine.close()


def test_bad_lora_files(engine, lora_dir, tiny_dir):
    from safetensors.torch import save_file

    (lora_dir / "pickle.bin").write_bytes(b"\x80\x04not really")
    (lora_dir / "empty.safetensors").write_bytes(b"")
    (lora_dir / "renamed.safetensors").write_bytes(b"\x80\x04pickle bytes")
    save_file({}, str(lora_dir / "keyless.safetensors"))
    cases = {
        "pickle.bin": "not a safetensors file",
        "empty.safetensors": "not a safetensors file",
        "renamed.safetensors": "not a safetensors file",
        "keyless.safetensors": "no tensors",
        "missing.safetensors": "not found",
    }
    for name, message in cases.items():
        with pytest.raises(LoraError, match=message):
            engine.submit(params(loras=[LoraSpec(name)]))
    # Keys without the "transformer." prefix are skipped by diffusers with only a warning.
    unprefixed = {k.removeprefix("transformer."): v for k, v in lora_state_dict(tiny_dir, 7).items()}
    save_file(unprefixed, str(lora_dir / "unprefixed.safetensors"))
    with pytest.raises(LoraError, match="loaded no weights"):
        engine.generate_sync(params(loras=[LoraSpec("unprefixed.safetensors")]))
    save_file(
        {"transformer.foo.weight": next(iter(unprefixed.values()))}, str(lora_dir / "notlora.safetensors")
    )
    with pytest.raises(LoraError, match="does not fit"):
        engine.generate_sync(params(loras=[LoraSpec("notlora.safetensors")]))
    adapters = engine.pipe.get_list_adapters().get("transformer", [])
    assert all(engine._loras._loaded.get(name) for name in adapters)  # nothing half-loaded left
    assert engine.generate_sync(params()).steps_run == STEPS  # the worker survived


def test_lora_paths_outside_the_allowed_folders(engine, lora_dir, tmp_path, tiny_dir):
    outside = make_lora_file(tiny_dir, tmp_path / "outside.safetensors")
    link = lora_dir / "link.safetensors"
    if not link.exists():
        link.symlink_to(outside)
    for path in (str(outside), "../outside.safetensors", "link.safetensors", "/etc/passwd"):
        with pytest.raises(LoraError, match="outside the allowed"):
            engine.submit(params(loras=[LoraSpec(path)]))
    with pytest.raises(LoraError, match="not found"):
        engine.submit(params(loras=[LoraSpec("no-such-name")]))


def test_named_and_base_loras(tiny_dir, lora_dir, tmp_path):
    private = make_lora_file(tiny_dir, tmp_path / "private" / "named.safetensors", seed=1)
    config = {"loras": {"fox-style": LoraSpec(str(private), 0.5)}}
    named = make_engine(tiny_dir, lora_dir, **config)
    based = make_engine(tiny_dir, lora_dir, base_loras=[LoraSpec(str(lora_dir / "l1.safetensors"), 0.5)])
    try:
        by_name = pixels(named.generate_sync(params(loras=[LoraSpec("fox-style")])))
        by_file = pixels(named.generate_sync(params(loras=[LoraSpec("l1.safetensors", 0.5)])))
        doubled = pixels(named.generate_sync(params(loras=[LoraSpec("fox-style", 2.0)])))
        full = pixels(named.generate_sync(params(loras=[LoraSpec("l1.safetensors")])))
        assert max_diff(by_name, by_file) == 0  # configured paths need not be in lora_dirs
        assert max_diff(doubled, full) == 0  # the request's scale multiplies the configured one
        assert max_diff(pixels(based.generate_sync(params())), by_file) == 0  # base LoRAs always apply
    finally:
        named.close()
        based.close()


def test_lora_from_hf_cache(engine, tiny_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    snapshot = tmp_path / "models--someone--fox-lora" / "snapshots" / ("a" * 40)
    make_lora_file(tiny_dir, snapshot / "fox.safetensors", seed=1)
    (tmp_path / "models--someone--fox-lora" / "refs").mkdir()
    (tmp_path / "models--someone--fox-lora" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    by_repo = engine.generate_sync(params(loras=[LoraSpec("someone/fox-lora")]))
    by_file = engine.generate_sync(params(loras=[LoraSpec("someone/fox-lora/fox.safetensors")]))
    by_dir = engine.generate_sync(params(loras=[LoraSpec("l1.safetensors")]))
    assert max_diff(pixels(by_repo), pixels(by_dir)) == 0 and max_diff(pixels(by_file), pixels(by_dir)) == 0
    with pytest.raises(LoraError, match="not in the local Hugging Face cache"):
        engine.submit(params(loras=[LoraSpec("someone/other-lora")]))
    from local_backend.loras import LoraManager

    no_dirs = LoraManager(EngineConfig())  # no lora_dirs: the path reaches the repo-id branch
    with pytest.raises(LoraError, match="'..' is not allowed"):
        no_dirs.resolve(LoraSpec("someone/fox-lora/../../../outside.safetensors"), trusted=False)
    with pytest.raises(LoraError, match="not allowed"):
        no_dirs.resolve(LoraSpec(str(snapshot / "fox.safetensors")), trusted=False)


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def test_lora_from_url(tiny_dir, lora_dir, tmp_path, monkeypatch):
    from local_backend import loras

    data = (lora_dir / "l2.safetensors").read_bytes()
    opened = []

    class Opener:
        def open(self, url, timeout):
            opened.append(url)
            return FakeResponse(data)

    monkeypatch.setattr(loras.urllib.request, "build_opener", lambda *handlers: Opener())
    engine = make_engine(tiny_dir, lora_dir, lora_url_hosts=["loras.example"], lora_cache_dir=str(tmp_path))
    try:
        url = "https://loras.example/fox.safetensors?token=secret"
        by_url = engine.generate_sync(params(loras=[LoraSpec(url)]))
        again = engine.generate_sync(params(loras=[LoraSpec(url)]))
        by_file = engine.generate_sync(params(loras=[LoraSpec("l2.safetensors")]))
        assert opened == [url]  # downloaded once, then served from the cache
        assert (
            max_diff(pixels(by_url), pixels(by_file)) == 0 and max_diff(pixels(again), pixels(by_file)) == 0
        )
        with pytest.raises(LoraError, match="not allowed") as err:
            engine.submit(params(loras=[LoraSpec("https://evil.example/x.safetensors?token=secret")]))
        assert "secret" not in str(err.value)
        with pytest.raises(LoraError, match="only https"):
            engine.submit(params(loras=[LoraSpec("http://loras.example/x.safetensors")]))
    finally:
        engine.close()
    small = make_engine(
        tiny_dir,
        lora_dir,
        lora_url_hosts=["loras.example"],
        lora_cache_dir=str(tmp_path / "b"),
        lora_max_bytes=1000,
    )
    try:
        with pytest.raises(LoraError, match="larger than"):
            small.generate_sync(params(loras=[LoraSpec("https://loras.example/big.safetensors")]))
    finally:
        small.close()


# ----- queue, cancellation, deadlines -----


def test_queue_full(tiny_dir):
    engine = make_engine(tiny_dir, max_queue=1)
    try:
        gate = Gate(engine)
        waiting = engine.submit(params())
        assert engine.queue_depth == 1
        with pytest.raises(QueueFullError) as err:
            engine.submit(params())
        assert err.value.retry_after > 0
        gate.open()
        assert waiting.future.result(30).steps_run == STEPS
    finally:
        engine.close()


def test_cancel_running_job_stops_early(engine):
    at_step_one = threading.Event()
    resume = threading.Event()

    def slow(step, total):
        if step == 1:
            at_step_one.set()
            resume.wait(30)

    job = engine.submit(params(num_inference_steps=40, on_step=slow))
    assert at_step_one.wait(30)
    job.cancel()
    resume.set()
    with pytest.raises(JobCancelledError) as err:
        job.future.result(30)
    assert err.value.steps_run < 40
    assert engine.generate_sync(params()).steps_run == STEPS


def test_cancel_waiting_job_and_future_cancel(engine):
    gate = Gate(engine)
    job = engine.submit(params())
    other = engine.submit(params(seed=2))
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.future.result(10)
    assert other.future.cancel()  # cancelling the future itself also drops the job
    assert engine.queue_depth == 0
    gate.open()


def test_deadline(engine):
    gate = Gate(engine)
    job = engine.submit(params(deadline=time.monotonic() + 0.2))
    with pytest.raises(DeadlineExceededError):
        job.future.result(10)  # dropped while the worker is still busy
    assert engine.queue_depth == 0
    gate.open()

    def slow(step, total):
        time.sleep(0.05)

    running = engine.submit(params(num_inference_steps=100, deadline=time.monotonic() + 0.3, on_step=slow))
    with pytest.raises(DeadlineExceededError) as err:
        running.future.result(30)
    assert err.value.steps_run < 100
    with pytest.raises(DeadlineExceededError):
        engine.submit(params(deadline=time.monotonic() - 1)).future.result(10)


def test_async_generate_and_task_cancellation(engine):
    async def main():
        result = await engine.generate(params())
        assert result.steps_run == STEPS
        started = asyncio.Event()
        loop = asyncio.get_running_loop()
        steps = []

        def on_step(step, total):
            steps.append(step)
            loop.call_soon_threadsafe(started.set)
            time.sleep(0.02)

        task = asyncio.create_task(engine.generate(params(num_inference_steps=200, on_step=on_step)))
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return steps

    steps = asyncio.run(main())
    time.sleep(0.2)
    assert engine.generate_sync(params()).steps_run == STEPS  # the worker moved on
    assert len(steps) < 200


# ----- batching -----


def test_batched_equals_unbatched(engine):
    jobs_params = [
        params("a cat", seed=11),
        params("a dog on a very long sofa in the afternoon sun", seed=12, n=2),
        params("a cat", seed=13, negative_prompt="blurry"),
        params("different steps do not batch", seed=14, num_inference_steps=STEPS + 1),
    ]
    gate = Gate(engine)
    jobs = [engine.submit(p) for p in jobs_params]
    gate.open()
    results = [job.future.result(30) for job in jobs]
    assert [r.batch_size for r in results] == [4, 4, 4, 1]
    for p, batched in zip(jobs_params, results, strict=True):
        for i, seed in enumerate(batched.seeds):
            solo_params = GenerationParams(**{**p.__dict__, "seed": seed, "n": 1})
            solo = engine.generate_sync(solo_params)
            assert solo.batch_size == 1
            # Equal up to float rounding of batch-size-dependent kernels: at most 1 level.
            assert max_diff(pixels(batched, i), pixels(solo)) <= 1


def test_n_above_max_batch_is_split(tiny_dir):
    engine = make_engine(tiny_dir, max_batch=2)
    try:
        result = engine.generate_sync(params(seed=20, n=5))
        assert result.seeds == [20, 21, 22, 23, 24] and len(result.images) == 5
        assert result.batch_size == 2
        solo = engine.generate_sync(params(seed=24))
        assert max_diff(pixels(result, 4), pixels(solo)) <= 1
    finally:
        engine.close()


# ----- failures and shutdown -----


def test_worker_survives_a_pipeline_error(engine, monkeypatch):
    real = engine._pipe

    class Broken:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kwargs):
            raise RuntimeError("boom\nTraceback (most recent call last): secret detail")

    monkeypatch.setattr(engine, "_pipe", Broken())
    with pytest.raises(EngineError) as err:
        engine.generate_sync(params())
    assert str(err.value) == "generation failed: RuntimeError: boom"
    monkeypatch.setattr(engine, "_pipe", real)
    assert engine.generate_sync(params()).steps_run == STEPS


def test_close_fails_waiting_jobs(tiny_dir):
    engine = make_engine(tiny_dir)
    gate = Gate(engine)
    waiting = engine.submit(params())
    closer = threading.Thread(target=engine.close)
    closer.start()
    with pytest.raises(EngineError, match="closed"):
        waiting.future.result(10)
    gate.release.set()
    closer.join(30)
    with pytest.raises(EngineError, match="closed"):
        gate.job.future.result(10)
    with pytest.raises(EngineError, match="closed"):
        engine.submit(params())


def test_context_manager(tiny_dir):
    with Engine(EngineConfig(model=str(tiny_dir), default_steps=2)) as engine:
        assert engine.generate_sync(params()).steps_run == 2
    assert not engine.loaded


def test_package_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, local_backend; sys.exit(any(m in sys.modules for m in ('torch', 'diffusers', 'aiohttp')))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
