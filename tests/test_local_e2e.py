"""End to end with the local diffusers backend: the openai package against the running proxy, whose
model routes to a `diffusers` provider on the tiny random pipeline (loaded with the real
QwenImagePipeline.from_pretrained from a folder, on the CPU)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from openai import BadRequestError, InternalServerError, RateLimitError  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from proxy import parse_config  # noqa: E402
from proxy.app import GATEWAY  # noqa: E402

from .conftest import base_config  # noqa: E402
from .local_helpers import make_lora_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny"
PROVIDER = "local"
DEFAULT_STEPS = 2  # the provider's default_steps: requests without num_inference_steps get this
TINY_SIZES = {
    "default": "64x64",
    "max_side": 256,
    "tiers": {"0.004": {"1:1": "64x64", "4:3": "80x64", "3:4": "64x80"}},
}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


# ---- fixtures and helpers ---------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("e2e-loras")
    for seed in (1, 2, 3, 4):
        make_lora_file(tiny_dir, folder / f"l{seed}.safetensors", seed=seed)
    return folder


def local_options(tiny_dir, **extra) -> dict:
    return {
        "kind": "diffusers",
        "model": str(tiny_dir),
        "device": "cpu",
        "default_steps": DEFAULT_STEPS,
        "load_in_background": False,  # start-up waits for the model: the first request is served
        **extra,
    }


def local_config(tmp_path, tiny_dir, models: dict | None = None, **options) -> dict:
    cfg = base_config(tmp_path)
    cfg["providers"][PROVIDER] = local_options(tiny_dir, **options)
    cfg["size_tables"]["tiny"] = copy.deepcopy(TINY_SIZES)
    cfg["models"] = models or {MODEL: {"sizes": "tiny", "routes": [PROVIDER]}}
    return cfg


def provider_of(server, name: str = PROVIDER):
    return server.app[GATEWAY].providers[name]


async def generate(client, prompt: str = "a red fox", *, model: str = MODEL, size=None, n: int = 1,
                   response_format: str = "b64_json", output_format=None, **extra):
    kwargs = {"model": model, "prompt": prompt, "n": n, "response_format": response_format}
    if size is not None:
        kwargs["size"] = size
    if output_format is not None:
        kwargs["output_format"] = output_format
    return await client.images.generate(**kwargs, extra_body=extra or None)


def decode(item) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    im.load()
    return im


def pixels(item) -> np.ndarray:
    return np.asarray(decode(item).convert("RGB")).astype(np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


async def get(server, path: str) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.get(server.make_url(path)) as r:
        return r.status, dict(r.headers), await r.read()


async def metric(server, name: str, **labels) -> float:
    status, _, body = await get(server, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def steps_total(server, provider: str = PROVIDER) -> float:
    return await metric(server, "qip_local_denoise_steps_total", provider=provider)


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval)


class Gate:
    """Holds the engine's worker inside the first denoising step of the next job until opened.

    It wraps the provider's step callback (the one behind qip_local_denoise_steps_total), so the
    worker is busy for exactly as long as a test needs, whatever the machine's speed.
    """

    def __init__(self, provider):
        self.started, self.release = threading.Event(), threading.Event()
        original = provider._on_step

        def on_step(step: int, total: int) -> None:
            original(step, total)
            if not self.release.is_set():
                self.started.set()
                self.release.wait(60)

        provider._on_step = on_step  # an instance attribute: generate() passes self._on_step

    async def hold(self, coro) -> asyncio.Task:
        """Start `coro` (a request) and return once the worker is held inside it."""
        task = asyncio.ensure_future(coro)
        assert await asyncio.to_thread(self.started.wait, 30), "the gated job never started"
        return task

    def open(self) -> None:
        self.release.set()


@contextlib.contextmanager
def transformer_batches(server):
    """Records the batch size of every transformer forward pass (two per step with true CFG)."""
    seen: list[int] = []
    transformer = provider_of(server).engine.pipe.transformer
    hook = transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        yield seen
    finally:
        hook.remove()


# ---- sizes and formats ------------------------------------------------------------------------------


async def test_sizes_and_formats(start_proxy, tmp_path, tiny_dir):
    server, client = await start_proxy(local_config(tmp_path, tiny_dir))
    cases = [
        (None, (64, 64)),  # the table's default
        ("80x64", (80, 64)),
        ("64x80", (64, 80)),
        ("4:3", (80, 64)),  # a ratio picks the table's size
        ("72x40", (72, 40)),  # not a multiple of 16
        ("70x37", (70, 37)),  # not even a multiple of the tiny model's 8: made at 72x40, resized
    ]
    for size, expected in cases:
        r = await generate(client, size=size, seed=3)
        im = decode(r.data[0])
        assert im.size == expected and im.format == "PNG", size
        assert r.size == f"{expected[0]}x{expected[1]}"
    for fmt in ("png", "jpeg", "webp"):
        r = await generate(client, size="72x40", output_format=fmt, seed=4)
        im = decode(r.data[0])
        assert (im.format, im.size) == (PIL_FORMAT[fmt], (72, 40))
        assert r.output_format == fmt
        r = await generate(client, size="64x80", output_format=fmt, response_format="url", seed=4)
        assert r.data[0].b64_json is None and r.data[0].url
        status, headers, body = await get(server, "/images/" + r.data[0].url.rsplit("/", 1)[1])
        assert status == 200 and headers["Content-Type"] == MIME[fmt]
        im = Image.open(io.BytesIO(body))
        assert (im.format, im.size) == (PIL_FORMAT[fmt], (64, 80))
    # Above the table's max_side (256): refused by the proxy before the engine sees it.
    with pytest.raises(BadRequestError) as e:
        await generate(client, size="512x64")
    assert e.value.body["param"] == "size"


# ---- seeds, batching of n ---------------------------------------------------------------------------


async def test_seeds(start_proxy, tmp_path, tiny_dir):
    server, client = await start_proxy(local_config(tmp_path, tiny_dir))
    a = await generate(client, seed=1234)
    b = await generate(client, seed=1234)
    c = await generate(client, seed=1235)
    assert a.to_dict()["seeds"] == [1234]
    assert max_diff(pixels(a.data[0]), pixels(b.data[0])) == 0  # same seed: the same pixels
    assert max_diff(pixels(a.data[0]), pixels(c.data[0])) > 10  # another seed: another picture

    three = await generate(client, n=3, seed=50)
    assert three.to_dict()["seeds"] == [50, 51, 52]
    assert len(three.data) == 3
    batched = [pixels(item) for item in three.data]
    for i in range(3):
        solo = await generate(client, seed=50 + i)
        # n=3 runs as one pipeline call of batch 3, each image with its own generator seeded
        # with seed + i, so it gets the same noise as alone. The pixels still may differ by one
        # level: batch-size-dependent kernels round floats differently (~1e-6, see the note at the
        # top of local_backend/engine.py), which can flip a quantization step.
        assert max_diff(batched[i], pixels(solo.data[0])) <= 1
    assert max_diff(batched[0], batched[1]) > 10 and max_diff(batched[1], batched[2]) > 10

    # No seed: a random one is returned, and asking for it again gives the same image.
    random_seed = await generate(client)
    seed = random_seed.to_dict()["seeds"][0]
    again = await generate(client, seed=seed)
    assert max_diff(pixels(random_seed.data[0]), pixels(again.data[0])) == 0


# ---- steps and cfg_scale reach the pipeline ---------------------------------------------------------


async def test_steps_and_cfg_scale_reach_the_pipeline(start_proxy, tmp_path, tiny_dir):
    server, client = await start_proxy(local_config(tmp_path, tiny_dir))
    assert await steps_total(server) == 0
    await generate(client, seed=1, num_inference_steps=3)
    assert await steps_total(server) == 3
    await generate(client, seed=1, num_inference_steps=5)
    assert await steps_total(server) == 8
    await generate(client, seed=1)  # the provider's default_steps
    assert await steps_total(server) == 8 + DEFAULT_STEPS

    # True CFG (cfg_scale > 1, negative prompt " " by default) runs the transformer twice per step;
    # cfg_scale 1 once. Different cfg_scale values give different pictures.
    with transformer_batches(server) as calls:
        with_cfg = await generate(client, seed=1, num_inference_steps=3, cfg_scale=4.0)
        assert len(calls) == 6
        calls.clear()
        without = await generate(client, seed=1, num_inference_steps=3, cfg_scale=1.0)
        assert len(calls) == 3
        calls.clear()
        stronger = await generate(client, seed=1, num_inference_steps=3, cfg_scale=7.0)
        assert len(calls) == 6
    assert max_diff(pixels(with_cfg.data[0]), pixels(without.data[0])) > 0
    assert max_diff(pixels(with_cfg.data[0]), pixels(stronger.data[0])) > 0
    # A negative prompt matters only with CFG.
    negative = await generate(client, seed=1, num_inference_steps=3, cfg_scale=4.0, negative_prompt="blurry")
    assert max_diff(pixels(with_cfg.data[0]), pixels(negative.data[0])) > 0


# ---- LoRAs ------------------------------------------------------------------------------------------


async def test_loras(start_proxy, tmp_path, tiny_dir, lora_dir):
    from safetensors.torch import save_file

    private = make_lora_file(tiny_dir, tmp_path / "private" / "named.safetensors", seed=1)  # = l1
    outside = make_lora_file(tiny_dir, tmp_path / "outside" / "outside.safetensors", seed=2)
    bad = tmp_path / "bad-loras"
    bad.mkdir()
    (bad / "pickle.bin").write_bytes(b"\x80\x04not really a pickle")
    (bad / "empty.safetensors").write_bytes(b"")
    save_file({}, str(bad / "keyless.safetensors"))
    config = local_config(
        tmp_path, tiny_dir,
        lora_dirs=[str(lora_dir), str(bad)],
        loras={"fox-style": {"path": str(private), "scale": 0.5}, "plain": str(private)},
    )
    server, client = await start_proxy(config)

    async def with_loras(*loras):
        r = await generate(client, seed=7, loras=[{"path": p, "scale": s} for p, s in loras])
        return pixels(r.data[0])

    base = pixels((await generate(client, seed=7)).data[0])
    styled = await with_loras(("l1.safetensors", 1.0))
    assert max_diff(base, styled) > 5
    assert max_diff(base, await with_loras(("l1.safetensors", 0.0))) == 0  # scale 0: the base model
    assert max_diff(base, pixels((await generate(client, seed=7)).data[0])) == 0  # LoRAs do not stick
    three = await with_loras(("l1.safetensors", 0.7), ("l2.safetensors", 0.7), ("l3.safetensors", 0.7))
    assert max_diff(base, three) > 5 and max_diff(styled, three) > 0
    # Absolute paths inside an allowed folder work as well.
    assert max_diff(styled, await with_loras((str(lora_dir / "l1.safetensors"), 1.0))) == 0

    # Named LoRAs from the provider's `loras:` option: their file need not be in lora_dirs, and
    # the request's scale multiplies the configured one.
    half = await with_loras(("l1.safetensors", 0.5))
    assert max_diff(half, await with_loras(("fox-style", 1.0))) == 0
    assert max_diff(styled, await with_loras(("fox-style", 2.0))) == 0
    assert max_diff(styled, await with_loras(("plain", 1.0))) == 0

    four = [(f"l{i}.safetensors", 0.5) for i in (1, 2, 3, 4)]
    cases = [
        (four, "at most 3"),
        ([("pickle.bin", 1.0)], "not a safetensors file"),
        ([("empty.safetensors", 1.0)], "not a safetensors file"),
        ([("keyless.safetensors", 1.0)], "no tensors"),
        ([(str(outside), 1.0)], "outside the allowed LoRA folders"),
        ([("../outside/outside.safetensors", 1.0)], "outside the allowed LoRA folders"),
        ([("missing.safetensors", 1.0)], "not found"),
    ]
    for loras, message in cases:
        with pytest.raises(BadRequestError) as e:
            await with_loras(*loras)
        assert e.value.status_code == 400
        assert e.value.body["param"] == "loras", loras
        assert e.value.body["type"] == "invalid_request_error"
        assert message in e.value.body["message"], (loras, e.value.body["message"])
        assert "Traceback" not in e.value.response.text
    # The engine survived all of that and still makes the base image.
    assert max_diff(base, pixels((await generate(client, seed=7)).data[0])) == 0


# ---- queue full, client disconnect, batching ---------------------------------------------------------


async def test_queue_full_is_429_with_retry_after(start_proxy, tmp_path, tiny_dir):
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, max_queue=1, max_batch=1))
    provider = provider_of(server)
    gate = Gate(provider)
    try:
        running = await gate.hold(generate(client, "the slow job", seed=1))
        assert provider.engine.queue_depth == 0  # taken by the worker, held in its first step
        others = [asyncio.ensure_future(generate(client, f"job {i}", seed=10 + i)) for i in range(4)]

        async def three_refused() -> bool:
            return sum(t.done() for t in others) == 3

        await wait_until(three_refused)
        assert provider.engine.queue_depth == 1
        refused = [t for t in others if t.done()]
        for task in refused:
            with pytest.raises(RateLimitError) as e:
                task.result()
            assert e.value.status_code == 429
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert "queue is full" in e.value.body["message"]
            assert e.value.body["type"] == "rate_limit_error"
    finally:
        gate.open()
    waiting = next(t for t in others if t not in refused)
    for r in (await running, await waiting):
        assert decode(r.data[0]).size == (64, 64)
    assert await metric(server, "qip_requests_total", endpoint="/v1/images/generations", model=MODEL,
                        status="429") == 3


async def test_client_disconnect_cancels_the_job(start_proxy, tmp_path, tiny_dir):
    server, client = await start_proxy(local_config(tmp_path, tiny_dir))
    provider = provider_of(server)
    asked = 500  # the most a request may ask for: tens of seconds on this CPU

    async def slow_request():
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "a very slow fox", "num_inference_steps": asked, "seed": 1,
                    "response_format": "b64_json"}
            async with s.post(server.make_url("/v1/images/generations"), json=body) as r:
                return r.status, await r.read()

    task = asyncio.ensure_future(slow_request())

    async def denoising() -> bool:
        return await steps_total(server) >= 2

    await wait_until(denoising)
    task.cancel()  # leaving the session closes the connection: the handler is cancelled
    with contextlib.suppress(asyncio.CancelledError):
        await task

    async def stopped() -> bool:
        before = await steps_total(server)
        await asyncio.sleep(0.3)
        return await steps_total(server) == before

    await wait_until(stopped)
    ran = await steps_total(server)
    assert 2 <= ran < asked / 2, ran  # interrupted within a few steps, not run to the end
    assert provider.engine.queue_depth == 0
    # The engine is free: the next request runs at once, with exactly its own steps.
    started = time.monotonic()
    r = await generate(client, seed=2, num_inference_steps=3)
    assert decode(r.data[0]).size == (64, 64)
    assert await steps_total(server) == ran + 3
    assert time.monotonic() - started < 120  # 3 steps, not the cancelled job's 500
    await asyncio.sleep(0.3)
    assert await steps_total(server) == ran + 3  # and the cancelled job did not resume


async def test_concurrent_requests_are_batched(start_proxy, tmp_path, tiny_dir):
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, max_batch=4))
    provider = provider_of(server)
    gate = Gate(provider)
    jobs = [("a cat", 21), ("a dog on a very long sofa in the afternoon sun", 22), ("a cat", 23)]
    with transformer_batches(server) as batches:
        try:
            running = await gate.hold(generate(client, "the job in the way", seed=20, size="72x40"))
            waiting = [asyncio.ensure_future(generate(client, p, seed=s, size="72x40")) for p, s in jobs]

            async def all_queued() -> bool:
                return provider.engine.queue_depth == len(jobs)

            await wait_until(all_queued)
        finally:
            gate.open()
        results = [await running] + [await t for t in waiting]
    # The three waiting requests (same size, steps and cfg) shared one pipeline call.
    assert batches == [1, 1] * DEFAULT_STEPS + [3, 3] * DEFAULT_STEPS
    for (prompt, seed), r in zip(jobs, results[1:], strict=True):
        assert r.to_dict()["seeds"] == [seed]
        solo = await generate(client, prompt, seed=seed, size="72x40")
        assert decode(r.data[0]).size == (72, 40)
        # Within one level: see the batching note in test_seeds.
        assert max_diff(pixels(r.data[0]), pixels(solo.data[0])) <= 1


# ---- fallback and unusable routes --------------------------------------------------------------------


async def test_fallback_to_placeholder_when_the_local_queue_is_full(start_proxy, tmp_path, tiny_dir):
    models = {
        MODEL: {"sizes": "tiny", "routes": [PROVIDER]},
        "tiny-fb": {"sizes": "tiny", "routes": [PROVIDER, "placeholder"]},
    }
    server, client = await start_proxy(local_config(tmp_path, tiny_dir, models, max_queue=1, max_batch=1))
    gate = Gate(provider_of(server))
    try:
        running = await gate.hold(generate(client, "held", seed=1))
        queued = asyncio.ensure_future(generate(client, "queued", seed=2))

        async def one_waiting() -> bool:
            return provider_of(server).engine.queue_depth == 1

        await wait_until(one_waiting)
        # The local queue is full: the only-local model answers 429, the other one falls back.
        with pytest.raises(RateLimitError):
            await generate(client, "refused", seed=3)
        fallback = await generate(client, "falls back", model="tiny-fb", size="80x64", seed=3)
    finally:
        gate.open()
    assert decode(fallback.data[0]).size == (80, 64)
    assert fallback.to_dict()["seeds"] == [3]
    assert await metric(server, "qip_images_total", model="tiny-fb", route="placeholder") == 1
    # The local route was tried (with the router's retries, if any) before the fallback.
    assert await metric(server, "qip_route_attempts_total", model="tiny-fb", route=PROVIDER,
                        outcome="error") >= 1
    await running
    await queued
    # With room in the queue again, the same model is served locally.
    await generate(client, "local again", model="tiny-fb", seed=4)
    assert await metric(server, "qip_images_total", model="tiny-fb", route=PROVIDER) == 1


async def test_model_that_does_not_load_is_unusable(start_proxy, tmp_path, tiny_dir):
    cfg = base_config(tmp_path)
    cfg["providers"]["broken"] = local_options("/nonexistent/dir")
    cfg["size_tables"]["tiny"] = copy.deepcopy(TINY_SIZES)
    cfg["models"] = {
        "broken-only": {"sizes": "tiny", "routes": ["broken"]},
        "broken-fb": {"sizes": "tiny", "routes": ["broken", "placeholder"]},
    }
    server, client = await start_proxy(cfg)
    status, _, body = await get(server, "/health")
    health = yaml.safe_load(body)  # JSON is YAML
    assert status == 200  # alive, though one model cannot be served
    assert health["models"]["broken-only"]["ready"] is False
    assert health["models"]["broken-fb"]["ready"] is True
    route = health["models"]["broken-only"]["routes"][0]
    assert route["name"] == "broken" and route["kind"] == "diffusers" and route["ready"] is False
    # Offline (HF_HUB_OFFLINE, as in CI) the pre-check names it; online the load attempt fails.
    reason = route["reason"]
    assert ("failed to load /nonexistent/dir" in reason
            or "/nonexistent/dir is neither a pipeline folder on this machine nor a Hugging Face repo id" in reason)

    with pytest.raises(InternalServerError) as e:
        await generate(client, model="broken-only")
    assert e.value.status_code == 503
    assert e.value.body["code"] == "no_route_available"
    assert reason in e.value.body["message"]
    assert "Traceback" not in e.value.response.text
    r = await generate(client, model="broken-fb", size="64x80", seed=5)
    assert decode(r.data[0]).size == (64, 80)
    assert await metric(server, "qip_images_total", model="broken-fb", route="placeholder") == 1


# ---- the repo's models.yaml --------------------------------------------------------------------------


async def test_default_models_yaml(start_proxy, tmp_path, monkeypatch):
    import torch

    # model: tiny builds the tiny pipeline into this cache on first use (local_backend/tiny.py).
    monkeypatch.setenv("QWEN_IMAGE_PROXY_CACHE", str(tmp_path / "cache"))
    data = yaml.safe_load((ROOT / "models.yaml").read_text())
    data["store"]["path"] = str(tmp_path / "images")  # not the repo's var/images
    config = parse_config(data, env={})  # no LUMENFALL_API_KEY, no QIP_* overrides
    assert {"qwen-image", "qwen-image-placeholder", "qwen-image-tiny", "qwen-image-edit"} <= set(config.models)
    server, client = await start_proxy(data, env={})  # the raw data: ${LUMENFALL_API_KEY} is reported missing

    # local-tiny loads in the background (the default): wait for it.
    async def tiny_ready() -> bool:
        _, _, body = await get(server, "/health")
        return yaml.safe_load(body)["models"]["qwen-image-tiny"]["ready"]

    await wait_until(tiny_ready, timeout=120, interval=0.1)
    assert (tmp_path / "cache" / "tiny-qwen-image-v1" / "model_index.json").exists()
    r = await client.images.generate(model="qwen-image-tiny", prompt="a red fox", response_format="b64_json",
                                     extra_body={"seed": 1, "num_inference_steps": 2})
    assert r.size == "64x64" and decode(r.data[0]).size == (64, 64)
    assert await steps_total(server, "local-tiny") == 2

    with pytest.raises(InternalServerError) as e:
        await client.images.generate(model="qwen-image", prompt="a red fox")
    assert e.value.status_code == 503
    message = e.value.body["message"]
    assert "LUMENFALL_API_KEY" in message
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in message
