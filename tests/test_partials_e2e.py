"""Streaming partial images through the official openai client, on the tiny local models: generate
and edit, partial_images 0 and 2, n > 1; and a disconnect that cancels the local job."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from .conftest import base_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64", "16:9": "112x64"}}}
PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def tiny_config(tmp_path, tiny_dir, tiny_edit_dir) -> dict:
    cfg = base_config(tmp_path)
    common = {"kind": "diffusers", "device": "cpu", "default_steps": 6, "load_in_background": False}
    cfg["providers"]["gen"] = {**common, "model": str(tiny_dir)}
    cfg["providers"]["edit"] = {**common, "model": str(tiny_edit_dir), "task": "edit"}
    cfg["size_tables"]["tiny"] = TINY
    cfg["models"]["tiny"] = {"sizes": "tiny", "routes": ["gen"]}
    cfg["models"]["tiny-edit"] = {"sizes": "tiny", "routes": ["edit"], "max_input_images": 3}
    return cfg


def decoded(b64: str, fmt: str, size=(64, 64)) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    assert im.format == PIL_FORMAT[fmt] and im.size == size
    return im


def png_bytes(size=(64, 64), colour=(10, 200, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("partials", [0, 2])
@pytest.mark.parametrize("fmt", ["png", "webp"])
async def test_stream_generate_with_partials(start_proxy, tmp_path, tiny_dir, tiny_edit_dir, partials, fmt):
    _, client = await start_proxy(tiny_config(tmp_path, tiny_dir, tiny_edit_dir))
    stream = await client.images.generate(model="tiny", prompt="a fox", stream=True, partial_images=partials,
                                          extra_body={"seed": 4, "output_format": fmt})
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * partials + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(partials))
    for e in events:
        decoded(e.b64_json, fmt)


async def test_stream_n2_keeps_each_images_events_in_order(start_proxy, tmp_path, tiny_dir, tiny_edit_dir):
    _, client = await start_proxy(tiny_config(tmp_path, tiny_dir, tiny_edit_dir))
    stream = await client.images.generate(model="tiny", prompt="a fox", n=2, stream=True, partial_images=2,
                                          extra_body={"seed": 4})
    events = [e async for e in stream]
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    completed = [e for e in events if e.type == "image_generation.completed"]
    assert len(completed) == 2 and events[-2:] == completed
    for index in (0, 1):
        mine = [e.partial_image_index for e in partial if e.model_extra["image_index"] == index]
        assert mine == [0, 1]


@pytest.mark.parametrize("partials", [0, 2])
async def test_stream_edit_with_partials(start_proxy, tmp_path, tiny_dir, tiny_edit_dir, partials):
    _, client = await start_proxy(tiny_config(tmp_path, tiny_dir, tiny_edit_dir))
    stream = await client.images.edit(model="tiny-edit", image=[png_bytes(), png_bytes(colour=(200, 0, 0))],
                                      prompt="make it red", stream=True, partial_images=partials,
                                      extra_body={"seed": 1})
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_edit.partial_image"] * partials + ["image_edit.completed"]
    for e in events:
        decoded(e.b64_json, "png")


async def test_a_disconnected_stream_cancels_the_local_job(start_proxy, tmp_path, tiny_dir, tiny_edit_dir):
    cfg = tiny_config(tmp_path, tiny_dir, tiny_edit_dir)
    cfg["providers"]["gen"]["default_steps"] = 400  # long enough to leave in the middle
    server, client = await start_proxy(cfg)
    from proxy.app import GATEWAY

    engine = server.app[GATEWAY].providers["gen"].engine
    stream = await client.images.generate(model="tiny", prompt="a fox", stream=True, partial_images=3)
    first = await asyncio.wait_for(stream.__anext__(), 60)  # the first preview: the job is running
    assert first.type == "image_generation.partial_image"
    await stream.response.aclose()
    for _ in range(100):
        if not engine._running and engine.queue_depth == 0:
            break
        await asyncio.sleep(0.1)
    assert not engine._running and engine.queue_depth == 0  # stopped at the next step, not 400 steps later


async def test_partials_from_an_upstream_that_streams(start_proxy, aiohttp_server, tmp_path):
    from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream

    streaming = await FakeOpenAIUpstream(can_stream=True).start(aiohttp_server)
    plain = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["streams"] = {"kind": "openai", "base_url": f"{streaming.url}/v1", "api_key": streaming.api_key,
                                   "stream": True}
    cfg["providers"]["plain"] = {"kind": "openai", "base_url": f"{plain.url}/v1", "api_key": plain.api_key}
    cfg["models"]["up"] = {"sizes": "small", "routes": ["streams"]}
    cfg["models"]["up-plain"] = {"sizes": "small", "routes": ["plain"]}
    _, client = await start_proxy(cfg)

    stream = await client.images.generate(model="up", prompt="p", size="64x64", stream=True, partial_images=2,
                                          extra_body={"seed": 3})
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert streaming.stream_calls == 1 and streaming.image_bodies[0]["stream"] is True
    decoded(events[-1].b64_json, "png")
    # The upstream's 16x16 preview, fitted to the size its event names (OpenAI's: the requested image's).
    assert Image.open(io.BytesIO(base64.b64decode(events[0].b64_json))).size == (64, 64) and events[0].size == "64x64"
    assert events[-1].revised_prompt == "p, revised by the fake"

    # An upstream that cannot stream: the completed event only, and it was asked without stream.
    stream = await client.images.generate(model="up-plain", prompt="p", size="64x64", stream=True, partial_images=2)
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.completed"]
    assert "stream" not in plain.image_bodies[0]
