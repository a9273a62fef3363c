"""The local engine under hostile use, end to end where a user would notice: the openai package against
the running proxy on the tiny random pipeline (CPU), images decoded with Pillow.

Covered here: one request for many images on a small queue, and seeds at the top of their range. The
queue, disconnects, batching and isolation of failing jobs are covered in test_local_e2e.py and
test_local_robustness*.py.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from local_backend import EngineError, GenerationParams, InvalidParamsError  # noqa: E402

from .test_local_e2e import Gate, decode, generate, local_config, max_diff, pixels, provider_of, wait_until  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOP_SEED = 2**32 - 1  # the API's largest seed (proxy.request.SEED_MAX)


async def test_n_above_the_queue_is_one_job_not_a_429(start_proxy, tmp_path, tiny_dir):
    """n=10 at max_batch 1 and max_queue 2 on an idle server. It was split into 10 parts of one image,
    each taking a queue slot: 3 fit and the request failed with 429 (measured with the default 2 retries
    and 0.3 s steps: 429 after 5.7 s, 21 jobs submitted, 9 images made for nothing). No retries here, so
    the refusal does not depend on how fast the worker drains the queue."""
    cfg = local_config(tmp_path, tiny_dir, max_batch=1, max_queue=2)
    cfg["routing"] = {"retries": 0}
    server, client = await start_proxy(cfg)
    provider = provider_of(server)
    engine = provider.engine
    asked, lock = [], threading.Lock()  # images asked of the engine, refused submits included
    submit = engine.submit

    def counting_submit(params):
        try:
            return submit(params)
        finally:
            with lock:
                asked.append(params.n)

    engine.submit = counting_submit  # an instance attribute: generate() calls self.submit
    gate = Gate(provider)  # the worker stays in its first step until every part was submitted
    try:
        task = asyncio.ensure_future(generate(client, "ten foxes", n=10, seed=40))

        async def all_asked() -> bool:  # every part of the request has been answered by the engine
            with lock:
                return sum(asked) == 10 or task.done()

        await wait_until(all_asked)
    finally:
        gate.open()
    r = await task
    assert r.to_dict()["seeds"] == list(range(40, 50))
    images = [decode(item) for item in r.data]
    assert [im.size for im in images] == [(64, 64)] * 10
    assert len({im.tobytes() for im in images}) == 10  # ten different images, one per seed
    assert asked == [10] and engine.queue_depth == 0


async def test_seeds_wrap_at_the_top_of_the_range(start_proxy, tmp_path, tiny_dir):
    """seed 2**32-1 with n=3: the seeds reported were 2**32 and 2**32+1, which the API refuses as input
    (400), and other routes (and this one with max_batch 1) report 0 and 1 for the same images."""
    server, client = await start_proxy(local_config(tmp_path, tiny_dir))
    r = await generate(client, "a fox at the edge", n=3, seed=TOP_SEED, num_inference_steps=1)
    assert r.to_dict()["seeds"] == [TOP_SEED, 0, 1]
    # The reported seed is accepted back and makes the same image (batched: within one level).
    again = await generate(client, "a fox at the edge", seed=r.to_dict()["seeds"][1], num_inference_steps=1)
    assert decode(again.data[0]).size == (64, 64)
    assert max_diff(pixels(again.data[0]), pixels(r.data[1])) <= 1
    assert max_diff(pixels(again.data[0]), pixels(r.data[0])) > 1  # and not the image of the first seed


def test_engine_seeds_are_32_bit(tiny_dir):
    """Standalone engine: seeds above 2**32-1 were accepted up to 2**63-1, yet torch's CPU generator uses
    only their low 32 bits, so seed 2**32 silently made seed 0's image. Now they are a clear error, and
    seed + i wraps as the images really do."""
    from local_backend import Engine, EngineConfig

    with Engine(EngineConfig(model=str(tiny_dir), default_steps=1, device="cpu")) as engine:
        with pytest.raises(InvalidParamsError) as e:
            engine.submit(GenerationParams("x", width=32, height=32, seed=2**32))
        assert e.value.param == "seed" and str(2**32 - 1) in str(e.value)
        result = engine.generate_sync(GenerationParams("x", width=32, height=32, seed=TOP_SEED, n=2))
        assert result.seeds == [TOP_SEED, 0]
        alone = engine.generate_sync(GenerationParams("x", width=32, height=32, seed=0))
        assert max_diff(_rgb(alone.images[0]), _rgb(result.images[1])) <= 1
        assert isinstance(e.value, EngineError)


def _rgb(image):
    import numpy as np

    return np.asarray(image.convert("RGB")).astype(np.int16)


async def test_a_configured_lora_whose_file_is_gone_names_the_lora_not_the_servers_path(
        start_proxy, tmp_path, tiny_dir, caplog):
    """A named LoRA (`loras: {house-style: {path: ...}}`) whose file was moved: the client asking for
    "house-style" was told "LoRA '/srv/.../house.safetensors' not found: not a configured name, ...",
    the server's own path, and a denial of the name it had asked for."""
    import openai

    gone = tmp_path / "private-loras" / "house.safetensors"
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, loras={"house-style": str(gone)}))
    with pytest.raises(openai.BadRequestError) as err:
        await generate(client, loras=[{"path": "house-style"}], num_inference_steps=1)
    body = err.value.response.json()["error"]
    assert body["param"] == "loras"
    assert "'house-style' is configured on this server but cannot be loaded" in body["message"]
    assert "private-loras" not in body["message"] and "not a configured name" not in body["message"]
    assert str(gone) in caplog.text  # the operator finds the path in the log
