"""Edits on the native routes, end to end: the official openai package (`client.images.edit`, multipart)
-> the proxy -> a fal, Replicate or DashScope route -> the vendor's fake, which decodes the data URIs
it receives, so the images are checked byte for byte."""

from __future__ import annotations

import base64
import copy
import io

import pytest
from openai import BadRequestError, InternalServerError
from PIL import Image

from .conftest import base_config
from .fake_dashscope import SYNC_PATH, FakeDashScope
from .fake_fal import FakeFal
from .fake_openai_upstream import SMALL_SIZES
from .fake_replicate import FakeReplicate

MODEL = "qwen-image-edit"
CLIENT_KEY = "client-secret-key-123"
FAL_KEY = "fal-id-1234:fal-secret-5678"
DS_KEY = "ds-secret-key-0123456789"
# Sizes DashScope's edit-plus takes as parameters.size (512..2048 a side): still quick to draw.
BIG_SIZES = {"default": "512x512", "tiers": {"0.3": {"1:1": "512x512", "4:3": "640x512", "3:4": "512x640"}}}

# Every vendor's extras (and an unknown field) sent with each edit: only the route's own vendor's arrive.
EXTRAS = {"go_fast": True, "disable_safety_checker": True, "watermark": True, "acceleration": "high",
          "enable_safety_checker": False, "use_turbo": True, "mystery_field": 1}


def picture(size, colour, fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


# Inputs of different sizes, colours and formats; the first (64x48, 4:3) sets the output's shape: 80x64.
INPUTS = [picture((64, 48), (200, 30, 30)), picture((48, 48), (30, 200, 30), "JPEG"),
          picture((40, 56), (30, 30, 200), "WEBP")]
MIMES = ["image/png", "image/jpeg", "image/webp"]


def files(count: int) -> list:
    return [(f"in{i}.{mime.split('/')[1]}", INPUTS[i], mime) for i, mime in enumerate(MIMES[:count])]


def data_uri(i: int) -> str:
    return f"data:{MIMES[i]};base64,{base64.b64encode(INPUTS[i]).decode()}"


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


@pytest.fixture
def fakes(aiohttp_server):
    """fakes(fal={...knobs}, rep={...}, ds={...}) -> {"fal": FakeFal, "rep": FakeReplicate, "ds": FakeDashScope}
    for the vendors named."""

    async def make(**knobs) -> dict:
        made = {}
        if "fal" in knobs:
            made["fal"] = await FakeFal(**knobs["fal"]).start(aiohttp_server)
        if "rep" in knobs:
            made["rep"] = await FakeReplicate(**knobs["rep"]).start(aiohttp_server)
        if "ds" in knobs:
            made["ds"] = await FakeDashScope(**{"api_key": DS_KEY, **knobs["ds"]}).start(aiohttp_server)
        return made

    return make


def edit_config(tmp_path, fakes: dict, routes: list, sizes: dict | None = None, **options) -> dict:
    """Providers `fal`, `rep`, `ds` on the fakes given; the model `qwen-image-edit` (up to 3 images) on
    `routes`. options: {"fal": {...}} and the like, added to a provider's options."""
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = copy.deepcopy(sizes or SMALL_SIZES)
    if "fal" in fakes:
        cfg["providers"]["fal"] = {"kind": "fal", "base_url": fakes["fal"].url, "api_key": FAL_KEY,
                                   "poll_interval": 0.01, "poll_max_interval": 0.05, **options.get("fal", {})}
    if "rep" in fakes:
        cfg["providers"]["rep"] = {"kind": "replicate", "base_url": fakes["rep"].base_url,
                                   "api_key": fakes["rep"].api_key, "wait_seconds": 1, "poll_interval": 0.01,
                                   "poll_max_interval": 0.04, **options.get("rep", {})}
    if "ds" in fakes:
        cfg["providers"]["ds"] = {"kind": "dashscope", "base_url": fakes["ds"].base_url, "api_key": DS_KEY,
                                  "poll_interval": 0.005, "poll_max_interval": 0.02, **options.get("ds", {})}
    cfg["models"][MODEL] = {"sizes": "small", "max_input_images": 3, "routes": routes}
    cfg["routing"] = {"backoff_base": 0.01, "backoff_max": 0.05}
    return cfg


FAL_2511 = {"provider": "fal", "model": "fal-ai/qwen-image-edit-2511"}
FAL_EDIT = {"provider": "fal", "model": "fal-ai/qwen-image-edit"}
REP_PLUS = {"provider": "rep", "model": "qwen/qwen-image-edit-plus"}
DS_PLUS = {"provider": "ds", "model": "qwen-image-edit-plus", "max_images_per_call": 6}


# ---- fal --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
async def test_fal_edit_sends_the_images_as_image_urls(start_proxy, tmp_path, fakes, count):
    made = await fakes(fal={"revise_prompt": "make it blue, as fal read it"})
    _, client = await start_proxy(edit_config(tmp_path, made, [FAL_2511]), api_key=CLIENT_KEY)
    raw = await client.images.with_raw_response.edit(
        model=MODEL, image=files(count), prompt="make it blue", n=2, response_format="b64_json",
        extra_body={"seed": 7, "negative_prompt": "blur", "cfg_scale": 4.5, "num_inference_steps": 20,
                    "prompt_enhancement": "on", "loras": '[{"path": "owner/lora", "scale": 0.5}]', **EXTRAS})
    r = raw.parse()
    assert raw.headers["x-qip-route"] == "fal"

    (submit,) = made["fal"].submits  # n=2 in one call
    assert submit.path == "/fal-ai/qwen-image-edit-2511"
    assert submit.headers["Authorization"] == f"Key {FAL_KEY}"
    assert submit.json == {
        "prompt": "make it blue", "image_urls": [data_uri(i) for i in range(count)],
        "image_size": {"width": 80, "height": 64}, "num_images": 2, "seed": 7, "negative_prompt": "blur",
        "guidance_scale": 4.5, "num_inference_steps": 20,
        # fal's edit extras, as booleans although the form sent text; no loras (not a LoRA endpoint).
        "acceleration": "high", "enable_safety_checker": False,
    }
    assert made["fal"].edit_images == [INPUTS[:count]]

    assert r.to_dict()["seeds"] == [7, 8]
    for item in r.data:
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("PNG", (80, 64))
        assert item.revised_prompt == "make it blue, as fal read it"


async def test_fal_single_image_endpoint_gets_image_url(start_proxy, tmp_path, fakes):
    made = await fakes(fal={})
    _, client = await start_proxy(edit_config(tmp_path, made, [FAL_EDIT]))
    r = await client.images.edit(model=MODEL, image=files(1)[0], prompt="x", output_format="jpeg",
                                 response_format="b64_json", extra_body={"use_turbo": True, "sync_mode": "true"})
    body = made["fal"].inputs[0]
    assert body["image_url"] == data_uri(0) and "image_urls" not in body
    assert body["output_format"] == "jpeg" and body["sync_mode"] is True and "use_turbo" not in body
    assert made["fal"].edit_images == [[INPUTS[0]]]
    im = decode(r.data[0].b64_json)
    assert (im.format, im.size) == ("JPEG", (80, 64))


async def test_fal_single_image_endpoint_with_several_images_goes_to_the_next_route(start_proxy, tmp_path,
                                                                                    fakes):
    made = await fakes(fal={}, rep={})
    _, client = await start_proxy(edit_config(tmp_path, made, [FAL_EDIT, REP_PLUS]))
    raw = await client.images.with_raw_response.edit(model=MODEL, image=files(2), prompt="x",
                                                     response_format="b64_json")
    assert raw.headers["x-qip-route"] == "rep"
    assert made["fal"].submits == []  # refused before any call
    assert made["rep"].edit_images == [INPUTS[:2]]


async def test_fal_edit_image_field_option_and_fals_422(start_proxy, tmp_path, fakes):
    # The option forces image_urls on an endpoint that wants image_url: fal's 422 names the field, and the
    # client gets a 400 naming `image`.
    made = await fakes(fal={"validate_at": "submit"})
    cfg = edit_config(tmp_path, made, [FAL_EDIT], fal={"edit_image_field": "image_urls"})
    _, client = await start_proxy(cfg)
    with pytest.raises(BadRequestError) as e:
        await client.images.edit(model=MODEL, image=files(1), prompt="x")
    assert e.value.body["param"] == "image"
    assert "image_url: Field required" in e.value.body["message"]
    assert "image_urls" in made["fal"].inputs[0]


async def test_fal_lora_endpoint_gets_the_loras(start_proxy, tmp_path, fakes):
    made = await fakes(fal={})
    route = {"provider": "fal", "model": "fal-ai/qwen-image-edit-2511/lora"}
    _, client = await start_proxy(edit_config(tmp_path, made, [route]))
    await client.images.edit(model=MODEL, image=files(1), prompt="x",
                             extra_body={"loras": '[{"path": "owner/lora", "scale": 0.5}]'})
    assert made["fal"].submits[0].path == "/fal-ai/qwen-image-edit-2511/lora"
    assert made["fal"].inputs[0]["loras"] == [{"path": "owner/lora", "scale": 0.5}]
    assert made["fal"].edit_images == [[INPUTS[0]]]


# ---- Replicate --------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
async def test_replicate_edit_sends_the_images_as_a_list(start_proxy, tmp_path, fakes, count):
    made = await fakes(rep={})
    _, client = await start_proxy(edit_config(tmp_path, made, [REP_PLUS]), api_key=CLIENT_KEY)
    r = await client.images.edit(
        model=MODEL, image=files(count), prompt="make it blue", n=2, output_format="jpeg", output_compression=70,
        response_format="b64_json",
        extra_body={"seed": 7, "negative_prompt": "blur", "cfg_scale": 4.5, "num_inference_steps": 20,
                    "prompt_enhancement": "on", **EXTRAS})

    rep = made["rep"]
    assert len(rep.creates) == 2  # n is emulated: seed + i
    for create in rep.creates:
        assert create.path == "/v1/models/qwen/qwen-image-edit-plus/predictions"
        assert create.headers["Authorization"] == f"Bearer {rep.api_key}"
    inputs = sorted(rep.inputs, key=lambda i: i["seed"])
    for i, inp in enumerate(inputs):
        assert inp == {
            "prompt": "make it blue", "image": [data_uri(k) for k in range(count)],
            "aspect_ratio": "match_input_image", "seed": 7 + i, "output_format": "jpg", "output_quality": 70,
            # Replicate's edit extras, as booleans although the form sent text.
            "go_fast": True, "disable_safety_checker": True,
        }
    assert rep.edit_images == [INPUTS[:count]] * 2

    # The fake made the first input's 64x48; the client gets the resolved 80x64.
    assert r.to_dict()["seeds"] == [7, 8]
    for item in r.data:
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("JPEG", (80, 64))


async def test_replicate_edit_with_a_size_asks_the_nearest_ratio(start_proxy, tmp_path, fakes):
    made = await fakes(rep={})
    _, client = await start_proxy(edit_config(tmp_path, made, [REP_PLUS]))
    r = await client.images.edit(model=MODEL, image=files(1), prompt="x", size="112x64", response_format="b64_json")
    assert made["rep"].inputs[0]["aspect_ratio"] == "16:9"
    assert decode(r.data[0].b64_json).size == (112, 64)


async def test_replicate_single_image_model_gets_a_string(start_proxy, tmp_path, fakes):
    made = await fakes(rep={})
    route = {"provider": "rep", "model": "qwen/qwen-image-edit"}
    _, client = await start_proxy(edit_config(tmp_path, made, [route]))
    await client.images.edit(model=MODEL, image=files(1), prompt="x")
    assert made["rep"].inputs[0]["image"] == data_uri(0)
    assert made["rep"].edit_images == [[INPUTS[0]]]


# ---- DashScope --------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3])
async def test_dashscope_edit_sends_the_images_in_the_content(start_proxy, tmp_path, fakes, count):
    made = await fakes(ds={})
    _, client = await start_proxy(edit_config(tmp_path, made, [DS_PLUS]), api_key=CLIENT_KEY)
    r = await client.images.edit(
        model=MODEL, image=files(count), prompt="make it blue", n=2, response_format="b64_json",
        extra_body={"seed": 7, "negative_prompt": "blur", "cfg_scale": 4.5, "prompt_enhancement": "off", **EXTRAS})

    ds = made["ds"]
    (call,) = ds.sync_calls  # n=2 in one call (the route's max_images_per_call: 6)
    assert call.headers["Authorization"] == f"Bearer {DS_KEY}"
    assert "X-DashScope-Async" not in call.headers
    assert call.json == {
        "model": "qwen-image-edit-plus",
        "input": {"messages": [{"role": "user", "content": [
            *({"image": data_uri(k)} for k in range(count)), {"text": "make it blue"}]}]},
        # No size: 80x64 is below the size DashScope takes, so the output follows the input.
        "parameters": {"n": 2, "seed": 7, "negative_prompt": "blur", "prompt_extend": False, "watermark": True},
    }
    assert ds.submits == [] and ds.edit_images == [INPUTS[:count]]
    assert len(r.data) == 2
    for item in r.data:
        im = decode(item.b64_json)
        assert (im.format, im.size) == ("PNG", (80, 64))


async def test_dashscope_edit_plus_gets_a_size_it_takes(start_proxy, tmp_path, fakes):
    made = await fakes(ds={})
    _, client = await start_proxy(edit_config(tmp_path, made, [DS_PLUS], sizes=BIG_SIZES))
    raw = await client.images.with_raw_response.edit(model=MODEL, image=files(1), prompt="x",
                                                     response_format="b64_json")
    assert made["ds"].sync_calls[0].json["parameters"] == {"size": "640*512", "n": 1}
    assert decode(raw.parse().data[0].b64_json).size == (640, 512)


async def test_dashscope_single_image_model_goes_to_the_next_route_with_several(start_proxy, tmp_path, fakes):
    made = await fakes(ds={}, fal={})
    routes = [{"provider": "ds", "model": "qwen-image-edit"}, FAL_2511]
    _, client = await start_proxy(edit_config(tmp_path, made, routes))
    raw = await client.images.with_raw_response.edit(model=MODEL, image=files(2), prompt="x")
    assert raw.headers["x-qip-route"] == "fal"
    assert made["ds"].requests == []
    # One image is fine for it.
    await client.images.edit(model=MODEL, image=files(1), prompt="x")
    assert made["ds"].edit_images == [[INPUTS[0]]]
    assert "size" not in made["ds"].sync_calls[0].json["parameters"]


async def test_dashscope_edit_uses_the_sync_endpoint_whatever_the_mode(start_proxy, tmp_path, fakes):
    made = await fakes(ds={})
    _, client = await start_proxy(edit_config(tmp_path, made, [DS_PLUS], ds={"mode": "async"}))
    await client.images.edit(model=MODEL, image=files(1), prompt="x")
    assert [c.path for c in made["ds"].requests if c.method == "POST"] == [SYNC_PATH]


# ---- every vendor -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("vendor", "route"), [("fal", FAL_2511), ("rep", REP_PLUS), ("ds", DS_PLUS)])
async def test_a_mask_without_a_route_that_takes_one_is_503(start_proxy, tmp_path, fakes, vendor, route):
    made = await fakes(**{vendor: {}})
    _, client = await start_proxy(edit_config(tmp_path, made, [route]))
    mask = picture((64, 48), (0, 0, 0))
    with pytest.raises(InternalServerError) as e:
        await client.images.edit(model=MODEL, image=files(1)[0], mask=mask, prompt="x")
    assert e.value.status_code == 503
    assert e.value.body["message"] == f"No usable route of model '{MODEL}' takes an edit with a mask."
    assert made[vendor].requests == []


@pytest.mark.parametrize("first", ["fal", "rep", "ds"])
async def test_a_failing_vendor_edit_falls_back_to_the_next_route(start_proxy, tmp_path, fakes, first):
    routes = {"fal": FAL_2511, "rep": REP_PLUS, "ds": DS_PLUS}
    second = {"fal": "rep", "rep": "ds", "ds": "fal"}[first]
    made = await fakes(**{first: {}, second: {}})
    if first == "fal":
        made["fal"].fail_request(500, "CUDA out of memory")
    elif first == "rep":
        made["rep"].outcome = "failed"
    else:
        made["ds"].fail_call(500, "InternalError", "Internal server error")
    cfg = edit_config(tmp_path, made, [{**routes[first], "retries": 0}, routes[second]])
    _, client = await start_proxy(cfg)
    raw = await client.images.with_raw_response.edit(model=MODEL, image=files(2), prompt="x",
                                                     response_format="b64_json")
    assert raw.headers["x-qip-route"] == second
    assert decode(raw.parse().data[0].b64_json).size == (80, 64)
    for vendor in (first, second):
        if vendor == "ds":
            sent = made["ds"].sync_calls[0].json["input"]["messages"][0]["content"][:2]
            assert sent == [{"image": data_uri(0)}, {"image": data_uri(1)}]
        else:
            key = "image_urls" if vendor == "fal" else "image"
            assert made[vendor].inputs[0][key] == [data_uri(0), data_uri(1)]
    assert made[second].edit_images == [INPUTS[:2]]


@pytest.mark.parametrize(("vendor", "route", "needle"), [
    ("rep", {"provider": "rep", "model": "qwen/qwen-image"}, "image must be a URI"),
    ("ds", {"provider": "ds", "model": "qwen-image-max"}, "does not support image input"),
])
async def test_a_generation_model_asked_to_edit_gets_the_vendors_400(start_proxy, tmp_path, fakes, vendor, route,
                                                                    needle):
    made = await fakes(**{vendor: {}})
    _, client = await start_proxy(edit_config(tmp_path, made, [route]))
    with pytest.raises(BadRequestError) as e:
        await client.images.edit(model=MODEL, image=files(2), prompt="x")
    assert needle in e.value.body["message"]
