"""What an image answer says about its images (background, quality, output_format, size) is what they are:
the openai package against a running proxy (placeholder and a fake OpenAI-compatible upstream), every
image decoded with Pillow."""

from __future__ import annotations

import base64
import io

import aiohttp
import pytest
from openai import BadRequestError, InternalServerError
from PIL import Image

from .conftest import base_config
from .fake_openai_upstream import FakeOpenAIUpstream, make_image
from .test_generations_e2e import download, openai_provider, upstream_config

PH, PH_EDIT = "qwen-image-placeholder", "edit-placeholder"


@pytest.fixture
def fake_upstream(aiohttp_server):
    async def make(**kwargs) -> FakeOpenAIUpstream:
        return await FakeOpenAIUpstream(**kwargs).start(aiohttp_server)

    return make


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def transparent(im: Image.Image) -> bool:
    return im.convert("RGBA").getchannel("A").getextrema()[0] < 255


def png(mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 64), (200, 30, 30, 0) if mode == "RGBA" else (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


def placeholder_config(tmp_path) -> dict:
    cfg = upstream_config(tmp_path, {}, ["placeholder"])  # the small size table
    cfg["models"][PH] = {"sizes": "small", "routes": ["placeholder"]}
    cfg["models"][PH_EDIT] = {"sizes": "small", "routes": ["placeholder"], "max_input_images": 3}
    return cfg


async def test_transparent_background_from_a_model_that_cannot_make_it_is_a_400(start_proxy, tmp_path):
    # The placeholder draws RGB images: the answer said background "transparent" on every one of them.
    server, client = await start_proxy(placeholder_config(tmp_path))
    calls = {
        "generate": lambda: client.images.generate(model=PH, prompt="a sticker", background="transparent",
                                                   response_format="b64_json"),
        "stream": lambda: client.images.generate(model=PH, prompt="a sticker", background="transparent",
                                                 stream=True, partial_images=1),
        "edit": lambda: client.images.edit(model=PH_EDIT, prompt="cut it out", background="transparent",
                                           image=("in.png", png("RGBA"), "image/png")),
    }
    for name, call in calls.items():
        with pytest.raises(BadRequestError) as e:
            await call()
        error = e.value.body
        assert (error["param"], error["code"]) == ("background", "invalid_value"), name
        assert "Transparent background is not supported for the model" in error["message"]
    # A background job is refused before it is queued, not failed later.
    async with aiohttp.ClientSession() as s, s.post(
            server.make_url("/v1/images/generations"), headers={"Prefer": "respond-async"},
            json={"model": PH, "prompt": "x", "background": "transparent"}) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "background"
    # What it can make is still made, and said as it is.
    for asked in ("opaque", "auto"):
        r = await client.images.generate(model=PH, prompt="p", background=asked, response_format="b64_json")
        im = decode(r.data[0].b64_json)
        assert im.mode == "RGB" and not transparent(im)
        assert r.background == "opaque"  # "auto" resolved to what was made, as OpenAI answers


async def test_background_says_what_the_upstream_made(start_proxy, tmp_path, fake_upstream):
    honours, ignores = await fake_upstream(makes_transparency=True, can_stream=True), await fake_upstream()
    cfg = upstream_config(tmp_path, {"honours": openai_provider(honours, honours.api_key, stream=True),
                                     "ignores": openai_provider(ignores, ignores.api_key)},
                          [{"provider": "honours", "model": "qwen-image"}],
                          ignoring=[{"provider": "ignores", "model": "qwen-image"}])
    _, client = await start_proxy(cfg)
    for fmt in ("png", "webp"):
        r = await client.images.generate(model="qwen-image", prompt="p", background="transparent", output_format=fmt,
                                         response_format="b64_json")
        im = decode(r.data[0].b64_json)
        assert im.mode == "RGBA" and transparent(im) and r.background == "transparent", fmt
        assert (im.format.lower(), f"{im.width}x{im.height}") == (r.output_format, r.size)
    assert honours.image_bodies[0]["background"] == "transparent"  # handed on to the upstream
    # An upstream that ignores it: an opaque image, and the answer says so.
    r = await client.images.generate(model="ignoring", prompt="p", background="transparent", response_format="b64_json")
    assert ignores.image_bodies[0]["background"] == "transparent"
    im = decode(r.data[0].b64_json)
    assert not transparent(im) and r.background == "opaque"

    # Streamed: every partial and completed event says what its own image is.
    stream = await client.images.generate(model="qwen-image", prompt="p", background="transparent", stream=True,
                                          partial_images=2)
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for event in events:
        assert transparent(decode(event.b64_json)) and event.background == "transparent"
    stream = await client.images.generate(model="ignoring", prompt="p", background="transparent", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "image_generation.completed"
    assert not transparent(decode(events[-1].b64_json)) and events[-1].background == "opaque"


async def test_transparent_requests_skip_routes_that_cannot_make_it(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream(makes_transparency=True)
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key)},
                          ["placeholder", {"provider": "lumen", "model": "qwen-image"}],
                          upstream_first=[{"provider": "lumen", "model": "qwen-image"}, "placeholder"])
    _, client = await start_proxy(cfg)
    # The placeholder comes first, but cannot make it: the upstream serves.
    raw = await client.images.with_raw_response.generate(model="qwen-image", prompt="p", background="transparent",
                                                         response_format="b64_json")
    assert raw.headers["x-qip-route"] == "lumen"
    r = raw.parse()
    assert transparent(decode(r.data[0].b64_json)) and r.background == "transparent"
    # The upstream down: no opaque image from the placeholder in its place.
    up.fail(500, "SERVER_ERROR")
    with pytest.raises(InternalServerError):
        await client.images.generate(model="upstream_first", prompt="p", background="transparent")
    r = await client.images.generate(model="upstream_first", prompt="p", background="opaque", response_format="b64_json")
    assert r.background == "opaque"  # (the placeholder: anything else falls back as before)


async def test_transparent_with_jpeg_is_a_400(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream(makes_transparency=True)
    _, client = await start_proxy(upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key)}, ["lumen"]))
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="qwen-image", prompt="p", background="transparent", output_format="jpeg")
    assert e.value.body["param"] == "background" and "jpeg" in e.value.body["message"]
    assert up.image_calls == []


async def test_values_openai_does_not_know_are_a_400(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream()
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key)}, ["lumen"])
    cfg["models"][PH] = {"sizes": "small", "routes": ["placeholder"]}
    _, client = await start_proxy(cfg)
    for model in ("qwen-image", PH):
        for field, value in (("quality", "ultra"), ("background", "bogus"), ("background", "Transparent")):
            if (model, field) == ("qwen-image", "quality"):
                continue  # an OpenAI-compatible route hands quality on as sent: below
            with pytest.raises(BadRequestError) as e:
                await client.images.generate(model=model, prompt="p", extra_body={field: value})
            assert (e.value.body["param"], e.value.body["code"]) == (field, "invalid_value")
            assert value in e.value.body["message"]
    assert up.image_calls == []
    # The vendor page passes quality through to its providers: a value only they know reaches them.
    r = await client.images.generate(model="qwen-image", prompt="p", extra_body={"quality": "ultra"})
    assert r.quality == "ultra" and up.image_bodies[-1]["quality"] == "ultra"
    # Every value OpenAI documents goes on to the upstream, and is said back.
    for quality in ("low", "medium", "high", "xhigh", "max", "auto", "hd", "standard"):
        r = await client.images.generate(model="qwen-image", prompt="p", quality=quality)
        assert r.quality == quality and up.image_bodies[-1]["quality"] == quality


async def test_a_local_routes_own_quality_is_accepted(start_proxy, tmp_path):
    # quality_tiers may name a quality OpenAI does not have: the operator's own, accepted for that model.
    cfg = base_config(tmp_path)
    cfg["providers"]["gpu"] = {"kind": "diffusers", "model": str(tmp_path / "no-model-here"), "device": "cpu",
                               "quality_tiers": {"studio": "base"}, "load_in_background": True}
    cfg["models"]["local-first"] = {"sizes": "qwen-image", "routes": ["gpu", "placeholder"]}
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="local-first", prompt="p", size="64x64", extra_body={"quality": "studio"})
    assert r.quality == "studio"
    with pytest.raises(BadRequestError):
        await client.images.generate(model=PH, prompt="p", size="64x64", extra_body={"quality": "studio"})


async def test_urls_handed_on_unseen_claim_no_format_or_size(start_proxy, tmp_path, fake_upstream):
    # The upstream answers JPEG links; handed on unseen, the answer said output_format "png".
    up = await fake_upstream(image_format="jpeg")
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key, response_format="url")}, ["lumen"])
    cfg["store"]["rehost_upstream_urls"] = False
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image", prompt="p", background="auto")
    assert r.data[0].url.startswith(up.url)
    status, ctype, _ = await download(r.data[0].url)
    assert (status, ctype) == (200, "image/jpeg")
    assert (r.output_format, r.size, r.background) == (None, None, None)
    # Seen (b64_json needs the bytes): said as it is.
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json", background="auto")
    im = decode(r.data[0].b64_json)
    assert (r.output_format, r.size, r.background) == ("jpeg", f"{im.width}x{im.height}", "opaque")


async def test_a_cached_answer_says_what_its_images_are(start_proxy, tmp_path, fake_upstream):
    up = await fake_upstream(makes_transparency=True)
    cfg = upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key)}, ["lumen"])
    cfg["models"]["qwen-image"]["cache"] = {"ttl_seconds": 600, "scope": "shared"}
    _, client = await start_proxy(cfg)
    for expected in ("miss", "hit"):
        raw = await client.images.with_raw_response.generate(
            model="qwen-image", prompt="p", background="transparent", response_format="b64_json", extra_body={"seed": 4})
        assert raw.headers["x-qip-cache"] == expected
        r = raw.parse()
        assert transparent(decode(r.data[0].b64_json)) and r.background == "transparent", expected
    assert len(up.image_calls) == 1


async def test_opaque_asked_is_made_opaque(start_proxy, tmp_path, fake_upstream):
    # An upstream whose images carry transparent pixels whatever background asks: "opaque" was answered with
    # the transparent image (and background "transparent"), under a request that asked for none.
    up = await fake_upstream(always_transparent=True, can_stream=True)
    _, client = await start_proxy(upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key, stream=True)},
                                                  ["lumen"]))
    for fmt in ("png", "webp"):
        r = await client.images.generate(model="qwen-image", prompt="p", background="opaque", output_format=fmt,
                                         response_format="b64_json")
        im = decode(r.data[0].b64_json)
        assert not transparent(im) and r.background == "opaque", fmt
        assert (im.format.lower(), f"{im.width}x{im.height}") == (r.output_format, r.size) == (fmt, "64x64")
        corner = im.convert("RGB").getpixel((0, 0))  # the upstream's transparent border: on white
        assert min(corner) >= 250, (fmt, corner)
    r = await client.images.generate(model="qwen-image", prompt="p", background="opaque", response_format="url")
    _, ctype, body = await download(r.data[0].url)
    assert ctype == "image/png" and not transparent(Image.open(io.BytesIO(body))) and r.background == "opaque"
    # "auto" and no background at all keep the upstream's image as it is (nothing decoded to flatten it).
    r = await client.images.generate(model="qwen-image", prompt="p", background="auto", response_format="b64_json")
    assert transparent(decode(r.data[0].b64_json)) and r.background == "transparent"
    r = await client.images.generate(model="qwen-image", prompt="p", response_format="b64_json")
    assert transparent(decode(r.data[0].b64_json)) and r.background is None
    # Streamed: the previews and the image are flattened too.
    stream = await client.images.generate(model="qwen-image", prompt="p", background="opaque", stream=True,
                                          partial_images=2)
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for event in events:
        assert not transparent(decode(event.b64_json)) and event.background == "opaque", event.type


async def test_opaque_leaves_opaque_images_untouched(start_proxy, tmp_path, fake_upstream):
    # An image without alpha is handed on byte for byte: the header says it has nothing to flatten.
    up = await fake_upstream()
    _, client = await start_proxy(upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key)}, ["lumen"]))
    raw = await client.images.with_raw_response.generate(model="qwen-image", prompt="p", background="opaque",
                                                         response_format="b64_json", extra_body={"seed": 3})
    r = raw.parse()
    assert r.background == "opaque"
    assert base64.b64decode(r.data[0].b64_json) == make_image(64, 64, 3)


async def test_stream_previews_have_the_size_their_events_say(start_proxy, tmp_path, fake_upstream):
    # The upstream's previews are 16x16: the events said size "80x64" (the requested image's, as OpenAI's
    # partial events do) over a 16x16 picture. They are fitted to the requested size, as the final image is.
    up = await fake_upstream(can_stream=True)
    _, client = await start_proxy(upstream_config(tmp_path, {"lumen": openai_provider(up, up.api_key, stream=True)},
                                                  ["lumen"]))
    stream = await client.images.generate(model="qwen-image", prompt="p", stream=True, partial_images=2,
                                          size="80x64")
    events = [e async for e in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    for event in events:
        im = decode(event.b64_json)
        assert (f"{im.width}x{im.height}", im.format.lower()) == (event.size, event.output_format), event.type
        assert event.size == "80x64"


async def test_stream_completed_events_say_what_their_image_is(start_proxy, tmp_path, fake_upstream):
    # Without background, completed events said "auto"; OpenAI's say transparent or opaque, what was made.
    clear, cut_out = await fake_upstream(), await fake_upstream(always_transparent=True, can_stream=True)
    cfg = upstream_config(tmp_path, {"clear": openai_provider(clear, clear.api_key),
                                     "cut": openai_provider(cut_out, cut_out.api_key, stream=True)},
                          [{"provider": "clear", "model": "qwen-image"}],
                          cut=[{"provider": "cut", "model": "qwen-image"}])
    _, client = await start_proxy(cfg)
    for model, expected in (("qwen-image", "opaque"), ("cut", "transparent")):
        stream = await client.images.generate(model=model, prompt="p", stream=True, partial_images=1)
        events = [e async for e in stream]
        completed = events[-1]
        assert completed.type == "image_generation.completed"
        assert completed.background == expected and transparent(decode(completed.b64_json)) == (expected == "transparent")
        for event in events[:-1]:  # a partial event: the request's setting, as OpenAI's partial events say
            assert event.background == "auto"
