"""Partial images from the local engine: how many, when, what size, whose; a failing callback; and
through LocalProvider into proxy.media.partials' sink."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from local_backend import Engine, EngineConfig, GenerationParams  # noqa: E402
from local_backend.previews import preview_steps  # noqa: E402
from tests.local_helpers import noise_image, tiny_edit_pipeline_dir  # noqa: E402

STEPS = 6
W, H = 40, 24
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_edit_dir(tmp_path_factory):
    """The tiny edit pipeline, built once per session (shared with test_local_edit.py)."""
    return tiny_edit_pipeline_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


def start(folder, **overrides) -> Engine:
    engine = Engine(EngineConfig(model=str(folder), device="cpu", default_steps=STEPS, **overrides))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = start(tiny_dir)
    yield eng
    eng.close()


class Recorder:
    """on_step + on_partial: which previews came, after which step, in which order."""

    def __init__(self):
        self.step = 0
        self.partials: list[tuple[int, int, int, Image.Image]] = []  # (image, partial, step, preview)
        self.lock = threading.Lock()

    def on_step(self, step, total):
        self.step = step

    def on_partial(self, index, partial_index, image):
        with self.lock:
            self.partials.append((index, partial_index, self.step, image))

    def of(self, index) -> list[tuple[int, int]]:
        return [(k, step) for i, k, step, _ in self.partials if i == index]


def params(rec: Recorder | None = None, prompt="a red fox", **kw) -> GenerationParams:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("seed", 1)
    if rec is not None:
        kw.setdefault("on_step", rec.on_step)
        kw.setdefault("on_partial", rec.on_partial)
    return GenerationParams(prompt, **kw)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


# ----- when -----


@pytest.mark.parametrize(
    ("total", "count", "steps"),
    [
        (6, 0, []),
        (6, 1, [3]),
        (6, 3, [2, 3, 4]),  # round(1.5) = 2, round(3.0) = 3, round(4.5) = 4
        (8, 3, [2, 4, 6]),
        (50, 3, [12, 25, 38]),
        (3, 3, [1, 2, 3]),  # just enough steps: one preview after each
        (2, 3, [1, 1, 2]),  # fewer steps than previews: still exactly `count`, in order
        (1, 2, [1, 1]),
    ],
)
def test_preview_steps_are_evenly_spread(total, count, steps):
    assert preview_steps(total, count) == steps


def test_the_estimate_recovers_the_clean_latents_of_an_euler_step():
    import torch

    from local_backend.previews import Previewer

    clean, noise = torch.randn(2, 16, 12), torch.randn(2, 16, 12)

    class Scheduler:  # after the step from sigma 0.8 to sigma 0.5
        sigmas, step_index = torch.tensor([1.0, 0.8, 0.5, 0.0]), 2

    before = 0.2 * clean + 0.8 * noise
    after = 0.5 * clean + 0.5 * noise  # x + (0.5 - 0.8) * v with v = noise - clean
    estimate = Previewer(pipe=None).estimate(after, before, Scheduler())
    assert torch.allclose(estimate, clean, atol=1e-5)
    assert Previewer(pipe=None).estimate(after, None, Scheduler()) is after  # step 1: as they are


# ----- how many, when, what size -----


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_each_image_gets_exactly_its_previews_in_order(engine, count):
    rec = Recorder()
    result = engine.generate_sync(params(rec, partial_images=count, n=2))
    expected = list(zip(range(count), preview_steps(STEPS, count), strict=True))
    assert rec.of(0) == expected and rec.of(1) == expected
    assert all(im.size == (W, H) and im.mode == "RGB" for *_, im in rec.partials)
    assert len(result.images) == 2


def test_previews_do_not_change_the_images(engine):
    plain = engine.generate_sync(params(seed=4))
    rec = Recorder()
    with_previews = engine.generate_sync(params(rec, seed=4, partial_images=3))
    assert len(rec.partials) == 3
    assert (pixels(plain.images[0]) == pixels(with_previews.images[0])).all()


def test_no_previews_without_a_callback(engine):
    result = engine.generate_sync(params(seed=4, partial_images=3))  # nothing to send them to: none made
    assert len(result.images) == 1


def test_previews_are_images_of_the_run(engine):
    """The last preview (the denoised estimate through the fitted latent map) is closer to the final image
    than an unrelated image of the same model is."""
    rec = Recorder()
    final = engine.generate_sync(params(rec, seed=2, partial_images=3, width=64, height=64)).images[0]
    other = engine.generate_sync(params(prompt="something else entirely", seed=9, width=64, height=64)).images[0]
    last = rec.partials[-1][3]
    assert last.size == (64, 64)
    assert np.abs(pixels(last) - pixels(final)).mean() < np.abs(pixels(last) - pixels(other)).mean()


def test_vae_previews(tiny_dir):
    eng = start(tiny_dir, preview="vae")
    try:
        rec = Recorder()
        eng.generate_sync(params(rec, partial_images=2))
        assert [(k, s) for _, k, s, _ in rec.partials] == [(0, 2), (1, 4)]
        assert all(im.size == (W, H) for *_, im in rec.partials)
    finally:
        eng.close()


# ----- whose -----


def test_batched_jobs_each_get_their_own_previews(engine):
    gate_open, started = threading.Event(), threading.Event()

    def hold(step, total):
        started.set()
        gate_open.wait(30)

    gate = engine.submit(params(on_step=hold, num_inference_steps=1, seed=99))
    assert started.wait(30)
    recorders = [Recorder() for _ in range(3)]
    jobs = [
        engine.submit(params(rec, f"prompt {i}", partial_images=i + 1, n=2 if i == 1 else 1, seed=10 + i))
        for i, rec in enumerate(recorders)
    ]
    gate_open.set()
    gate.future.result(30)
    results = [job.future.result(30) for job in jobs]
    assert results[0].batch_size == 4  # all three shared one call
    for i, rec in enumerate(recorders):
        expected = list(zip(range(i + 1), preview_steps(STEPS, i + 1), strict=True))
        assert rec.of(0) == expected
        assert rec.of(1) == (expected if i == 1 else [])
        assert {index for index, *_ in rec.partials} == ({0, 1} if i == 1 else {0})


def test_n_beyond_max_batch_numbers_images_across_calls(tiny_dir):
    eng = start(tiny_dir, max_batch=2)
    try:
        rec = Recorder()
        result = eng.generate_sync(params(rec, n=3, partial_images=1))
        assert result.batch_size == 2
        assert sorted(i for i, *_ in rec.partials) == [0, 1, 2]
    finally:
        eng.close()


def test_a_raising_callback_does_not_fail_the_job(engine, caplog):
    calls = []

    def broken(index, partial_index, image):
        calls.append(partial_index)
        raise RuntimeError("the client's preview handler broke")

    plain = engine.generate_sync(params(seed=7))
    result = engine.generate_sync(params(seed=7, partial_images=3, on_partial=broken))
    assert calls == [0, 1, 2]  # every preview was still offered
    assert (pixels(result.images[0]) == pixels(plain.images[0])).all()
    assert "on_partial callback failed" in caplog.text


def test_edit_and_inpaint_previews(tiny_edit_dir):
    eng = Engine(EngineConfig(model=str(tiny_edit_dir), task="edit", device="cpu", default_steps=4))
    eng.start()
    try:
        source = noise_image(48, 32, seed=1)
        rec = Recorder()
        eng.generate_sync(params(rec, images=[source], partial_images=2, n=2))
        assert rec.of(0) == rec.of(1) == [(0, 1), (1, 3)]  # round(4/3) = 1, round(8/3) = 3
        mask = Image.new("L", source.size, 0)
        mask.paste(255, (8, 8, 32, 24))
        rec = Recorder()
        eng.generate_sync(params(rec, images=[source], mask=mask, partial_images=3, width=48, height=32))
        assert rec.of(0) == [(0, 1), (1, 2), (2, 3)]
        assert all(im.size == (48, 32) for *_, im in rec.partials)
    finally:
        eng.close()


# ----- through LocalProvider into the stream's sink -----


@pytest.fixture
async def provider(tiny_dir):
    from proxy.providers.base import ProviderContext
    from proxy.providers.local import LocalProvider

    prov = LocalProvider("local", {"model": str(tiny_dir), "device": "cpu", "default_steps": STEPS,
                                   "load_in_background": False})
    await prov.start(ProviderContext(http=None))
    assert prov.unavailable_reason is None, prov.unavailable_reason
    yield prov
    await prov.close()


def drain(sink) -> list:
    items = []
    while not sink.queue.empty():
        items.append(sink.queue.get_nowait())
    return items


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_provider_sends_previews_to_the_sink(provider, fmt):
    from proxy.config import RouteConfig
    from proxy.media.partials import open_sink
    from proxy.request import ImageRequest

    sink = open_sink()
    req = ImageRequest(prompt="a fox", model="m", width=W, height=H, seed=3, n=4, partial_images=2,
                       output_format=fmt).with_chunk(2, 2)  # images 2 and 3 of the client's 4
    images = await provider.generate(req, RouteConfig(provider="local"))
    assert len(images) == 2
    partials = drain(sink)  # all in before generate() returned
    assert sorted((p.image_index, p.partial_index) for p in partials) == [(2, 0), (2, 1), (3, 0), (3, 1)]
    for index in (2, 3):
        assert [p.partial_index for p in partials if p.image_index == index] == [0, 1]  # in order
    for p in partials:
        assert p.format == fmt
        decoded = Image.open(io.BytesIO(p.data))
        assert decoded.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[fmt]
        assert decoded.size == (W, H)


async def test_provider_makes_no_previews_without_a_sink_or_partial_images(provider):
    from proxy.config import RouteConfig
    from proxy.media.partials import open_sink
    from proxy.request import ImageRequest

    route = RouteConfig(provider="local")
    # No sink (not a stream): nothing to emit into, and nothing breaks.
    await provider.generate(ImageRequest(prompt="a fox", model="m", width=W, height=H, partial_images=2), route)
    sink = open_sink()
    await provider.generate(ImageRequest(prompt="a fox", model="m", width=W, height=H, partial_images=0), route)
    await asyncio.sleep(0)
    assert sink.queue.empty()
