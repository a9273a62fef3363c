"""POST /v1/images/edits through the official openai package: multipart as the SDK sends it, the JSON
variant, every bad input, and the OpenAI-compatible route that forwards the multipart form."""

from __future__ import annotations

import base64
import io
import json

import aiohttp
import pytest
from openai import BadRequestError, NotFoundError
from PIL import Image

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream

MODEL = "qwen-image-edit"


def png(size=(64, 48), colour=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, colour).save(out, format=fmt)
    return out.getvalue()


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


@pytest.fixture
async def edit_proxy(aiohttp_server, start_proxy, tmp_path):
    """A proxy whose `qwen-image-edit` model (up to 3 images) is served by a fake OpenAI-compatible upstream."""

    async def start(max_input_images: int = 3, **server):
        up = await FakeOpenAIUpstream().start(aiohttp_server)
        cfg = base_config(tmp_path)
        cfg["size_tables"]["small"] = SMALL_SIZES
        cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": up.api_key}
        cfg["models"][MODEL] = {"sizes": "small", "routes": ["up"], "max_input_images": max_input_images}
        if server:
            cfg["server"] = server
        proxy, client = await start_proxy(cfg)
        return up, proxy, client

    return start


async def test_edit_with_one_image(edit_proxy):
    up, _, client = await edit_proxy()
    r = await client.images.edit(model=MODEL, image=("in.png", png((64, 48)), "image/png"), prompt="make it blue",
                                 response_format="b64_json", extra_body={"seed": 5})
    # No size: the output follows the input's 4:3 shape, from the model's size table.
    assert decode(r.data[0].b64_json).size == (80, 64)
    fields, files = up.edit_forms[0]
    assert fields["prompt"] == "make it blue" and fields["size"] == "80x64" and fields["seed"] == "5"
    assert [(name, data) for name, _, data in files] == [("image", png((64, 48)))]


async def test_input_fidelity_reaches_the_upstream(edit_proxy):
    up, _, client = await edit_proxy()
    await client.images.edit(model=MODEL, image=("in.png", png((64, 48)), "image/png"), prompt="keep the face",
                             input_fidelity="high", response_format="b64_json")
    fields, _ = up.edit_forms[0]
    assert fields["input_fidelity"] == "high"


@pytest.mark.parametrize("count", [2, 3])
async def test_edit_with_several_images(edit_proxy, count):
    up, _, client = await edit_proxy()
    images = [(f"in{i}.png", png((64, 64), (i * 60, 0, 0)), "image/png") for i in range(count)]
    r = await client.images.edit(model=MODEL, image=images, prompt="combine", size="112x64",
                                 response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (112, 64)
    _, files = up.edit_forms[0]
    assert [name for name, _, _ in files] == ["image[]"] * count
    assert [data for _, _, data in files] == [data for _, data, _ in images]


async def test_edit_with_a_mask(edit_proxy):
    up, _, client = await edit_proxy()
    mask = png((64, 48), (0, 0, 0, 0), mode="RGBA")
    r = await client.images.edit(model=MODEL, image=png((64, 48)), mask=mask, prompt="fill", response_format="b64_json")
    assert decode(r.data[0].b64_json).size == (80, 64)
    _, files = up.edit_forms[0]
    assert [name for name, _, _ in files] == ["image", "mask"]


async def test_edit_json_variant_with_data_urls(edit_proxy):
    up, proxy, _ = await edit_proxy()
    data_url = "data:image/png;base64," + base64.b64encode(png((48, 64))).decode()
    body = {"model": MODEL, "prompt": "x", "images": [{"image_url": data_url}], "response_format": "b64_json"}
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), json=body) as r:
        assert r.status == 200, await r.text()
        answer = await r.json()
    assert decode(answer["data"][0]["b64_json"]).size == (64, 80)  # 3:4 follows the input
    assert up.edit_forms[0][1][0][2] == png((48, 64))


async def test_image_urls_are_refused_unless_allowed(edit_proxy):
    _, proxy, _ = await edit_proxy()
    body = {"model": MODEL, "prompt": "x", "images": [{"image_url": "https://example.com/cat.png"}]}
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), json=body) as r:
        error = (await r.json())["error"]
        assert r.status == 400 and error["param"] == "image" and "data: URL" in error["message"]


@pytest.mark.parametrize(("kwargs", "param", "needle"), [
    ({"image": b"not an image at all"}, "image", "not a PNG"),
    ({"image": png()[:-30]}, "image", "truncated"),
    ({"image": png(fmt="BMP")}, "image", "not a PNG"),
    ({"image": png(fmt="TIFF")}, "image", "not a PNG"),
    ({"image": [png(), png(), png(), png()]}, "image", "at most 3"),
    ({"image": png((64, 48)), "mask": png((32, 32))}, "mask", "same size"),
    ({"image": b""}, "image", "empty"),
])
async def test_bad_inputs_are_400s_naming_the_param(edit_proxy, kwargs, param, needle):
    up, _, client = await edit_proxy()
    with pytest.raises(BadRequestError) as e:
        await client.images.edit(model=MODEL, prompt="x", **kwargs)
    assert e.value.body["param"] == param, e.value.body
    assert needle in e.value.body["message"]
    assert up.edit_forms == []  # refused before any route


async def test_an_oversized_image_is_refused_by_its_header(edit_proxy):
    # 5000x5000 black: a small file, 25 MP decoded; refused from the header, before decoding.
    _, _, client = await edit_proxy()
    with pytest.raises(BadRequestError) as e:
        await client.images.edit(model=MODEL, prompt="x", image=png((5000, 5000), (0, 0, 0)))
    assert e.value.body["param"] == "image" and "5000x5000" in e.value.body["message"]


async def test_a_model_that_does_not_edit(edit_proxy):
    _, _, client = await edit_proxy()
    with pytest.raises(BadRequestError) as e:
        await client.images.edit(model="qwen-image-placeholder", prompt="x", image=png())
    assert e.value.body["param"] == "model" and MODEL in e.value.body["message"]
    with pytest.raises(NotFoundError):
        await client.images.edit(model="no-such-model", prompt="x", image=png())


@pytest.mark.parametrize("size", ["auto", "AUTO", " Auto ", ""])
async def test_size_auto_follows_the_first_image_however_written(edit_proxy, size):
    # "AUTO" or an empty size used to give the table's default (64x64) instead of the input's 3:4 shape.
    _, _, client = await edit_proxy()
    r = await client.images.edit(model=MODEL, image=("in.png", png((48, 64)), "image/png"), prompt="x",
                                 size=size, response_format="b64_json")  # type: ignore[arg-type]
    assert decode(r.data[0].b64_json).size == (64, 80) and r.size == "64x80"


async def test_lists_and_objects_in_extra_body_arrive_whole(edit_proxy):
    # The openai SDK writes extra_body's lists and objects into the form in bracket notation
    # (loras[][path], loras[][scale], tags[]). Read as names of their own, the LoRAs were lost: never
    # checked, never applied, and the upstream got fields called "loras[][path]".
    up, _, client = await edit_proxy()
    await client.images.edit(model=MODEL, image=png(), prompt="x", response_format="b64_json", extra_body={
        "loras": [{"path": "ink", "scale": 0.5}, {"path": "paper", "scale": 1}], "tags": ["a", "b"],
        "options": {"grain": {"level": 2}}})
    fields, _ = up.edit_forms[0]
    assert json.loads(fields["loras"]) == [{"path": "ink", "scale": 0.5}, {"path": "paper", "scale": 1.0}]
    assert json.loads(fields["tags"]) == ["a", "b"] and json.loads(fields["options"]) == {"grain": {"level": "2"}}
    assert not [name for name in fields if "[" in name]

    with pytest.raises(BadRequestError) as e:  # and checked as in JSON: at most 3 LoRAs
        await client.images.edit(model=MODEL, image=png(), prompt="x",
                                 extra_body={"loras": [{"path": f"l{i}", "scale": 1} for i in range(4)]})
    assert e.value.status_code == 400 and e.value.body["param"] == "loras"


async def test_indexed_lists_in_a_form_arrive_as_lists(edit_proxy):
    # qs, PHP and Rails write a list's items with their index (loras[0][path]), in any order.
    up, proxy, _ = await edit_proxy()
    form = aiohttp.FormData({"model": MODEL, "prompt": "x", "response_format": "b64_json"})
    for name, value in [("loras[1][path]", "paper"), ("loras[0][path]", "ink"), ("loras[0][scale]", "0.5"),
                        ("loras[1][scale]", "1"), ("options[size][0]", "s")]:
        form.add_field(name, value)
    form.add_field("image", png(), filename="in.png", content_type="image/png")
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), data=form) as r:
        assert r.status == 200, await r.text()
    fields, _ = up.edit_forms[0]
    assert json.loads(fields["loras"]) == [{"path": "ink", "scale": 0.5}, {"path": "paper", "scale": 1.0}]
    assert json.loads(fields["options"]) == {"size": ["s"]}


async def test_a_form_field_sent_both_as_text_and_as_a_list_is_a_400(edit_proxy):
    _, proxy, _ = await edit_proxy()
    form = aiohttp.FormData({"model": MODEL, "prompt": "x", "tags": "a"})
    form.add_field("tags[]", "b")
    form.add_field("image", png(), filename="in.png", content_type="image/png")
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), data=form) as r:
        error = json.loads(await r.text())["error"]
        assert r.status == 400 and error["param"] == "tags" and error["code"] == "invalid_multipart"


async def test_missing_image(edit_proxy):
    _, proxy, _ = await edit_proxy()
    form = aiohttp.FormData({"model": MODEL, "prompt": "x"})
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), data=form) as r:
        assert r.status == 400 and json.loads(await r.text())["error"]["param"] == "image"


async def test_an_image_sent_as_text_is_named_not_missing(edit_proxy):
    # JSON with "image": "data:..." was answered "Missing required parameter: 'image'", though it was sent.
    _, proxy, _ = await edit_proxy()
    body = {"model": MODEL, "prompt": "x", "image": "data:image/png;base64," + base64.b64encode(png()).decode()}
    async with aiohttp.ClientSession() as s, s.post(proxy.make_url("/v1/images/edits"), json=body) as r:
        error = json.loads(await r.text())["error"]
    assert r.status == 400 and error["param"] == "image" and "Missing" not in error["message"]
    assert "images: [{" in error["message"]


async def test_an_input_that_no_edit_takes_names_the_formats_an_edit_takes(edit_proxy):
    # The structural checker knows AVIF too; an edit input was told "not a PNG, JPEG, WebP, GIF or AVIF
    # image", then refused as AVIF ("a AVIF image").
    _, _, client = await edit_proxy()
    avif = png(fmt="AVIF")
    for data, code, says in ((b"plain text, no image", "invalid_image", "not a PNG, JPEG, WebP or GIF image."),
                             (avif, "invalid_image_format", "an AVIF image; send a PNG, JPEG, WebP or GIF")):
        with pytest.raises(BadRequestError) as e:
            await client.images.edit(model=MODEL, image=("in.bin", data, "application/octet-stream"), prompt="x")
        assert e.value.body["param"] == "image" and e.value.body["code"] == code
        assert says in e.value.body["message"]


async def test_edit_stream_uses_image_edit_events(edit_proxy):
    _, _, client = await edit_proxy()
    stream = await client.images.edit(model=MODEL, image=png(), prompt="x", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.completed"]
    assert decode(events[0].b64_json).size == (80, 64)


async def test_placeholder_edits_offline(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["models"]["edit-placeholder"] = {"sizes": "small", "routes": ["placeholder"], "max_input_images": 3}
    _, client = await start_proxy(cfg)
    source = Image.new("RGB", (64, 64), (0, 0, 255))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    # The mask keeps the left half (opaque) and edits the right half (transparent).
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))
    mbuf = io.BytesIO()
    mask.save(mbuf, format="PNG")
    r = await client.images.edit(model="edit-placeholder", image=buf.getvalue(), mask=mbuf.getvalue(),
                                 prompt="paint it", response_format="b64_json", extra_body={"seed": 3})
    out = decode(r.data[0].b64_json).convert("RGB")
    assert out.size == (64, 64)
    assert out.getpixel((5, 60)) == (0, 0, 255)  # kept: the mask is opaque there
    assert out.getpixel((60, 60)) != (0, 0, 255)  # edited: tinted
    again = await client.images.edit(model="edit-placeholder", image=buf.getvalue(), mask=mbuf.getvalue(),
                                     prompt="paint it", response_format="b64_json", extra_body={"seed": 3})
    assert again.data[0].b64_json == r.data[0].b64_json  # same input, prompt and seed: same image
