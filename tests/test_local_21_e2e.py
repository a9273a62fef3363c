"""Qwen-Image-2.1 end to end: the official openai client against the running proxy, whose model routes
to a `diffusers` provider on the tiny random QwenImage21Pipeline (loaded from a folder with the real
from_pretrained; the engine picks the class from its model_index.json). One model answers both
/v1/images/generations and /v1/images/edits."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from openai import BadRequestError, InternalServerError  # noqa: E402
from PIL import Image  # noqa: E402

from proxy.app import GATEWAY  # noqa: E402

from .conftest import base_config  # noqa: E402
from .local_helpers import make_lora_file, noise_image  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
TINY = {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64", "16:9": "112x64"}}}
MODEL = "tiny-2.1"


def config(tmp_path, tiny21_dir, **options) -> dict:
    cfg = base_config(tmp_path)
    cfg["providers"]["q21"] = {"kind": "diffusers", "model": str(tiny21_dir), "device": "cpu", "default_steps": 4,
                               "default_cfg_scale": 1.0, "load_in_background": False, **options}
    cfg["size_tables"]["tiny"] = TINY
    cfg["models"][MODEL] = {"sizes": "tiny", "routes": ["q21"], "max_input_images": 10}
    return cfg


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def pixels(b64: str) -> np.ndarray:
    return np.asarray(decode(b64)).astype(np.int16)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


async def test_generations_n2_two_sizes_and_seeds(start_proxy, tmp_path, tiny21_dir):
    server, client = await start_proxy(config(tmp_path, tiny21_dir))
    assert type(server.app[GATEWAY].providers["q21"].engine.pipe).__name__ == "QwenImage21Pipeline"
    first = await client.images.generate(model=MODEL, prompt="a red fox", n=2, size="64x64",
                                         response_format="b64_json", extra_body={"seed": 11})
    assert [decode(d.b64_json).size for d in first.data] == [(64, 64), (64, 64)]
    again = await client.images.generate(model=MODEL, prompt="a red fox", n=2, size="64x64",
                                         response_format="b64_json", extra_body={"seed": 11})
    for a, b in zip(first.data, again.data, strict=True):
        assert np.array_equal(pixels(a.b64_json), pixels(b.b64_json))  # same seed: same pixels
    assert not np.array_equal(pixels(first.data[0].b64_json), pixels(first.data[1].b64_json))  # seed + 1
    wide = await client.images.generate(model=MODEL, prompt="a red fox", size="112x64",
                                        response_format="b64_json", extra_body={"seed": 11})
    assert decode(wide.data[0].b64_json).size == (112, 64)


async def test_edits_with_two_reference_images_on_the_same_model(start_proxy, tmp_path, tiny21_dir):
    _, client = await start_proxy(config(tmp_path, tiny21_dir))
    images = [("a.png", png(noise_image(64, 48, seed=1)), "image/png"),
              ("b.png", png(noise_image(48, 64, seed=2)), "image/png")]
    r = await client.images.edit(model=MODEL, image=images, prompt="put them together", n=2, size="64x64",
                                 response_format="b64_json", extra_body={"seed": 5})
    assert [decode(d.b64_json).size for d in r.data] == [(64, 64), (64, 64)]
    again = await client.images.edit(model=MODEL, image=images, prompt="put them together", n=2, size="64x64",
                                     response_format="b64_json", extra_body={"seed": 5})
    assert np.array_equal(pixels(r.data[0].b64_json), pixels(again.data[0].b64_json))
    one = await client.images.edit(model=MODEL, image=images[:1], prompt="put them together", size="64x64",
                                   response_format="b64_json", extra_body={"seed": 5})
    assert not np.array_equal(pixels(r.data[0].b64_json), pixels(one.data[0].b64_json))  # the images count
    plain = await client.images.generate(model=MODEL, prompt="put them together", size="64x64",
                                         response_format="b64_json", extra_body={"seed": 5})
    assert not np.array_equal(pixels(plain.data[0].b64_json), pixels(one.data[0].b64_json))
    # 2.1 takes no mask: no route of the model can do it, said before any work is done.
    mask = png(Image.new("RGBA", (64, 48), (0, 0, 0, 0)))
    with pytest.raises((BadRequestError, InternalServerError)) as e:
        await client.images.edit(model=MODEL, image=images[:1], mask=("m.png", mask, "image/png"), prompt="x")
    assert "mask" in str(e.value)


async def test_stream_with_partial_images(start_proxy, tmp_path, tiny21_dir):
    _, client = await start_proxy(config(tmp_path, tiny21_dir))
    stream = await client.images.generate(model=MODEL, prompt="a fox", stream=True, partial_images=2,
                                          extra_body={"seed": 4})
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert all(decode(e.b64_json).size == (64, 64) for e in events)
    stream = await client.images.edit(model=MODEL, image=[png(noise_image(64, 64))], prompt="redder",
                                      stream=True, partial_images=1, extra_body={"seed": 4})
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]


async def test_a_disconnected_stream_cancels_the_job(start_proxy, tmp_path, tiny21_dir):
    server, client = await start_proxy(config(tmp_path, tiny21_dir, default_steps=400))
    engine = server.app[GATEWAY].providers["q21"].engine
    stream = await client.images.generate(model=MODEL, prompt="a fox", stream=True, partial_images=3)
    first = await asyncio.wait_for(stream.__anext__(), 60)
    assert first.type == "image_generation.partial_image"
    await stream.response.aclose()
    for _ in range(300):
        if not engine._running and engine.queue_depth == 0:
            break
        await asyncio.sleep(0.1)
    assert not engine._running and engine.queue_depth == 0  # stopped at the next step, not 400 steps later


async def test_loras_and_revised_prompt(start_proxy, tmp_path, tiny21_dir):
    lora = make_lora_file(tiny21_dir, tmp_path / "loras" / "style.safetensors", seed=1)
    cfg = config(tmp_path, tiny21_dir, lora_dirs=[str(lora.parent)],
                 prompt_enhancement={"with": "text_encoder", "max_new_tokens": 8, "timeout": 30})
    _, client = await start_proxy(cfg)

    async def make(**extra):
        r = await client.images.generate(model=MODEL, prompt="a heron", response_format="b64_json",
                                         extra_body={"seed": 3, **extra})
        return r.data[0]

    base = pixels((await make()).b64_json)
    styled = pixels((await make(loras=[{"path": "style.safetensors", "scale": 1.0}])).b64_json)
    assert np.abs(styled - base).mean() > 0.5  # the LoRA changes the picture
    assert np.array_equal(pixels((await make(loras=[{"path": "style.safetensors", "scale": 0.0}])).b64_json), base)
    assert np.array_equal(pixels((await make()).b64_json), base)  # and is gone again
    revised = await make(prompt_enhancement="on")
    # random weights: gibberish, but the text encoder wrote it (a prompt left alone comes back as given)
    assert revised.revised_prompt and revised.revised_prompt != "a heron"
    assert (await make()).revised_prompt in (None, "a heron")


async def test_shipped_models_yaml_serves_the_tiny_21_model(start_proxy, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_IMAGE_PROXY_CACHE", str(tmp_path / "cache"))
    data = yaml.safe_load((ROOT / "models.yaml").read_text())
    data["store"]["path"] = str(tmp_path / "images")
    data["providers"]["local-tiny-2.1"]["load_in_background"] = False
    server, client = await start_proxy(data, env={})
    r = await client.images.generate(model="qwen-image-2.1-tiny", prompt="a fox", response_format="b64_json",
                                     extra_body={"seed": 1, "num_inference_steps": 2})
    assert decode(r.data[0].b64_json).size == (64, 64)
    r = await client.images.edit(model="qwen-image-2.1-tiny", image=[png(noise_image(64, 64))], prompt="x",
                                 response_format="b64_json", extra_body={"seed": 1, "num_inference_steps": 2})
    assert decode(r.data[0].b64_json).size == (64, 64)
    cards = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert cards["qwen-image-2.1-tiny"]["capabilities"]["max_input_images"] == 10
    assert "non-commercial" in cards["qwen-image-2.1"]["description"]
    for name in ("qwen-image-2512", "qwen-image-edit-2511"):
        assert name in cards


def test_a_checkpoint_schedule_does_not_override_the_steps_asked(tiny21_dir):
    """A 2.1 checkpoint may carry its own sigmas (sample_sigmas), whose length would decide the step count
    whatever num_inference_steps says: a request for another count gets a schedule of that many steps."""
    from local_backend import Engine, EngineConfig, GenerationParams

    with Engine(EngineConfig(model=str(tiny21_dir), device="cpu", default_steps=4, default_cfg_scale=1.0)) as engine:
        engine.pipe.register_to_config(sample_sigmas=[1.0 - i / 12 for i in range(12)])
        seen = []
        result = engine.generate_sync(GenerationParams("a fox", 64, 64, seed=1, num_inference_steps=3,
                                                       on_step=lambda step, total: seen.append(step)))
        assert result.steps_run == 3 and seen == [1, 2, 3]
        seen.clear()
        engine.generate_sync(GenerationParams("a fox", 64, 64, seed=1, num_inference_steps=12,
                                              on_step=lambda step, total: seen.append(step)))
        assert seen == list(range(1, 13))  # the checkpoint's own schedule when the counts agree
