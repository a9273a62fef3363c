"""local_backend edits: the tiny random QwenImageEditPlusPipeline (real from_pretrained, its processor
built without torchvision), 1 to 3 input images, masks (inpainting), validation, and LocalProvider."""

from __future__ import annotations

import base64
import io
import threading

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import numpy as np  # noqa: E402
from openai import BadRequestError  # noqa: E402
from PIL import Image  # noqa: E402

from local_backend import Engine, EngineConfig, EngineError, GenerationParams, InvalidParamsError  # noqa: E402
from tests.conftest import base_config  # noqa: E402
from tests.local_helpers import image_bytes, noise_image, tiny_edit_pipeline_dir  # noqa: E402

STEPS = 2
W, H = 40, 24  # not multiples of the model's 8: generated at 40x24... and resized where needed
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_edit_dir(tmp_path_factory):
    """The tiny edit pipeline, built once per session (shared with test_local_partials.py)."""
    return tiny_edit_pipeline_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


def make_engine(folder, **overrides) -> Engine:
    engine = Engine(EngineConfig(model=str(folder), task="edit", device="cpu", default_steps=STEPS, **overrides))
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engine(tiny_edit_dir):
    eng = make_engine(tiny_edit_dir)
    yield eng
    eng.close()


INPUTS = [noise_image(48, 32, seed=1), noise_image(32, 32, seed=2), noise_image(40, 56, seed=3)]


def edit(prompt="make it red", **kw) -> GenerationParams:
    kw.setdefault("width", W)
    kw.setdefault("height", H)
    kw.setdefault("seed", 5)
    kw.setdefault("images", INPUTS[:1])
    return GenerationParams(prompt, **kw)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def rect_mask(size, box, alpha=True) -> Image.Image:
    """A mask marking `box` for editing: transparent in an RGBA mask, white in an L one."""
    if alpha:
        mask = Image.new("RGBA", size, (0, 0, 0, 255))
        mask.paste((0, 0, 0, 0), box)
    else:
        mask = Image.new("L", size, 0)
        mask.paste(255, box)
    return mask


# ----- loading -----


def test_loads_the_edit_pipeline_with_a_processor_and_shrunk_sizes(engine):
    from transformers import Qwen2VLProcessor

    assert type(engine.pipe).__name__ == "QwenImageEditPlusPipeline"
    assert isinstance(engine.pipe.processor, Qwen2VLProcessor)
    assert engine.pipe.working_area_scale == pytest.approx(1 / 256)  # from the tiny model's own folder


def test_tiny_edit_by_name_builds_its_cache_once(tmp_path, monkeypatch):
    from local_backend import tiny

    monkeypatch.setenv("QWEN_IMAGE_PROXY_CACHE", str(tmp_path))
    engine = Engine(EngineConfig(model="tiny-edit", task="edit", device="cpu", default_steps=1))
    engine.start()
    try:
        result = engine.generate_sync(edit())
        assert result.images[0].size == (W, H)
    finally:
        engine.close()
    assert [p.name for p in tmp_path.iterdir()] == [tiny.TINY_EDIT_VERSION]
    assert tiny.tiny_pipeline_dir(edit=True) == tmp_path / tiny.TINY_EDIT_VERSION


def test_task_and_model_must_agree(tiny_dir, tiny_edit_dir):
    with pytest.raises(EngineError, match="task"):
        Engine(EngineConfig(task="paint"))
    with pytest.raises(EngineError, match="preview"):
        Engine(EngineConfig(preview="jpeg"))
    with pytest.raises(EngineError, match="'tiny-edit' is for task 'edit'"):
        Engine(EngineConfig(model="tiny-edit"))
    with pytest.raises(EngineError, match="'tiny' is for task 'generate'"):
        Engine(EngineConfig(model="tiny", task="edit"))
    with pytest.raises(EngineError, match="not an edit pipeline"):
        Engine(EngineConfig(model=str(tiny_dir), task="edit", device="cpu")).load()
    with pytest.raises(EngineError, match="set task: edit"):
        Engine(EngineConfig(model=str(tiny_edit_dir), device="cpu")).load()


def test_working_sizes_are_scaled_on_this_thread_only():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from local_backend.edit import working_area_scale

    seen = {}
    with working_area_scale(1 / 256):
        inside = plus.calculate_dimensions(1024 * 1024, 1.0)
        other = threading.Thread(target=lambda: seen.update(size=plus.calculate_dimensions(1024 * 1024, 1.0)))
        other.start()
        other.join()
    assert inside == (64, 64)
    assert seen["size"] == (1024, 1024)  # another engine's thread keeps the real sizes
    assert plus.calculate_dimensions(1024 * 1024, 1.0) == (1024, 1024)  # and so does this one, after


# ----- edits -----


@pytest.mark.parametrize("count", [1, 2, 3])
def test_edit_with_1_to_3_images_is_exact_size_and_deterministic(engine, count):
    result = engine.generate_sync(edit(images=INPUTS[:count]))
    again = engine.generate_sync(edit(images=INPUTS[:count]))
    other_seed = engine.generate_sync(edit(images=INPUTS[:count], seed=6))
    assert [im.size for im in result.images] == [(W, H)]
    assert result.seeds == [5] and result.steps_run == STEPS
    assert (pixels(result.images[0]) == pixels(again.images[0])).all()
    assert (pixels(result.images[0]) != pixels(other_seed.images[0])).any()


def test_more_images_change_the_edit(engine):
    one = engine.generate_sync(edit(images=INPUTS[:1]))
    two = engine.generate_sync(edit(images=INPUTS[:2]))
    assert (pixels(one.images[0]) != pixels(two.images[0])).any()


def test_n_images_of_an_edit_share_a_call_and_match_their_seeds(engine):
    result = engine.generate_sync(edit(n=3))
    assert result.batch_size == 3 and result.seeds == [5, 6, 7]
    alone = engine.generate_sync(edit(seed=6))
    assert np.abs(pixels(result.images[1]) - pixels(alone.images[0])).max() <= 1


def test_edit_jobs_never_share_a_call(engine):
    gate_open, started = threading.Event(), threading.Event()

    def hold(step, total):
        started.set()
        gate_open.wait(30)

    gate = engine.submit(edit(on_step=hold))
    assert started.wait(30)
    jobs = [engine.submit(edit(f"prompt {i}", n=2, seed=10 + i)) for i in range(3)]
    gate_open.set()
    gate.future.result(30)
    for job in jobs:
        result = job.future.result(30)
        assert result.batch_size == 2 and len(result.images) == 2


def test_n_beyond_max_batch_takes_several_calls(tiny_edit_dir):
    eng = make_engine(tiny_edit_dir, max_batch=2)
    try:
        result = eng.generate_sync(edit(n=3))
        assert len(result.images) == 3 and result.batch_size == 2
    finally:
        eng.close()


def test_input_alpha_is_flattened_on_white(engine):
    rgba = noise_image(48, 32, seed=1, mode="RGBA")
    flat = Image.new("RGB", rgba.size, (255, 255, 255))
    flat.paste(rgba, mask=rgba.getchannel("A"))
    a = engine.generate_sync(edit(images=[rgba]))
    b = engine.generate_sync(edit(images=[flat]))
    assert (pixels(a.images[0]) == pixels(b.images[0])).all()


# ----- masks -----


def test_mask_repaints_its_area_and_keeps_the_rest_exactly(engine):
    source = INPUTS[0]
    box = (8, 8, 32, 24)
    result = engine.generate_sync(edit(width=48, height=32, mask=rect_mask(source.size, box)))
    out, src = pixels(result.images[0]), pixels(source)
    assert result.images[0].size == source.size
    inside = np.zeros(out.shape[:2], bool)
    inside[box[1]:box[3], box[0]:box[2]] = True
    assert (out[~inside] == src[~inside]).all()  # kept exactly
    assert np.abs(out[inside] - src[inside]).mean() > 10  # repainted
    again = engine.generate_sync(edit(width=48, height=32, mask=rect_mask(source.size, box)))
    assert (pixels(again.images[0]) == out).all()


def test_a_mask_without_alpha_marks_white_for_editing(engine):
    box = (8, 8, 32, 24)
    with_alpha = engine.generate_sync(edit(width=48, height=32, mask=rect_mask(INPUTS[0].size, box)))
    grey = engine.generate_sync(edit(width=48, height=32, mask=rect_mask(INPUTS[0].size, box, alpha=False)))
    assert (pixels(with_alpha.images[0]) == pixels(grey.images[0])).all()


def test_masked_edit_at_another_size(engine):
    result = engine.generate_sync(edit(width=W, height=H, n=2, mask=rect_mask(INPUTS[0].size, (0, 0, 24, 32))))
    assert [im.size for im in result.images] == [(W, H), (W, H)]
    assert result.batch_size == 2


# ----- validation -----


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"images": []}, "images", "give 1 to 3 input images"),
        ({"images": INPUTS + [INPUTS[0]]}, "images", "at most 3 input images, not 4"),
        ({"images": ["not an image"]}, "images", "not an image"),
        ({"images": [noise_image(90, 10)]}, "images", "too narrow"),
        ({"images": [noise_image(4, 4).crop((0, 0, 0, 0))]}, "images", "empty"),
        ({"mask": rect_mask((32, 32), (0, 0, 8, 8))}, "mask", "size of the first image (48x32), not 32x32"),
        ({"images": INPUTS[:2], "mask": rect_mask((48, 32), (0, 0, 8, 8))}, "mask", "one input image"),
        ({"mask": b"png bytes"}, "mask", "not an image"),
        ({"partial_images": 4}, "partial_images", "0 to 3"),
    ],
)
def test_bad_edits_are_refused_at_submit(engine, change, param, words):
    with pytest.raises(InvalidParamsError) as e:
        engine.submit(edit(**change))
    assert e.value.param == param
    assert words in str(e.value)


def test_a_text_to_image_engine_refuses_images_and_masks(tiny_dir):
    eng = Engine(EngineConfig(model=str(tiny_dir), device="cpu", default_steps=1))
    eng.start()
    try:
        with pytest.raises(InvalidParamsError) as e:
            eng.submit(edit())
        assert e.value.param == "images" and "takes no input images" in str(e.value)
        with pytest.raises(InvalidParamsError) as e:
            eng.submit(edit(images=[], mask=rect_mask((8, 8), (0, 0, 4, 4))))
        assert e.value.param == "mask"
    finally:
        eng.close()


# ----- through LocalProvider -----


def input_image(image: Image.Image, fmt: str = "png"):
    from proxy.request import InputImage

    return InputImage(data=image_bytes(image, fmt.upper()), format=fmt, width=image.width, height=image.height)


@pytest.fixture
async def provider(tiny_edit_dir):
    from proxy.providers.base import ProviderContext
    from proxy.providers.local import LocalProvider

    prov = LocalProvider("local-edit", {
        "model": str(tiny_edit_dir), "task": "edit", "device": "cpu", "default_steps": STEPS,
        "load_in_background": False,
    })
    await prov.start(ProviderContext(http=None))
    assert prov.unavailable_reason is None, prov.unavailable_reason
    yield prov
    await prov.close()


def test_provider_options_accept_task_and_preview():
    from pydantic import ValidationError

    from proxy.providers import options_model
    from proxy.providers.local import LocalProvider

    model = options_model(LocalProvider)
    assert model(task="edit", preview="vae", model="tiny-edit").task == "edit"
    with pytest.raises(ValidationError):
        model(task="inpaint")
    edit_provider = LocalProvider("e", {"model": "tiny-edit", "task": "edit"})
    assert edit_provider.capabilities.edits and edit_provider.capabilities.masks
    assert edit_provider.preflight() is None
    plain = LocalProvider("g", {"model": "tiny"})
    assert not plain.capabilities.edits and not plain.capabilities.masks


async def test_provider_edits_input_images(provider):
    from proxy.config import RouteConfig
    from proxy.request import ImageRequest

    req = ImageRequest(prompt="make it red", model="m", width=W, height=H, seed=5, n=2, output_format="webp",
                       images=(input_image(INPUTS[0]), input_image(INPUTS[1], "jpeg")))
    images = await provider.generate(req, RouteConfig(provider="local-edit"))
    assert [(im.width, im.height, im.seed, im.mime) for im in images] == [(W, H, 5, "image/webp"), (W, H, 6, "image/webp")]
    decoded = Image.open(io.BytesIO(images[0].data))
    assert decoded.format == "WEBP" and decoded.size == (W, H)


async def test_provider_edit_with_a_mask_keeps_the_rest(provider):
    from proxy.config import RouteConfig
    from proxy.request import ImageRequest

    source, box = INPUTS[0], (8, 8, 32, 24)
    req = ImageRequest(prompt="make it red", model="m", width=48, height=32, seed=5,
                       images=(input_image(source),), mask=input_image(rect_mask(source.size, box)))
    (image,) = await provider.generate(req, RouteConfig(provider="local-edit"))
    out = pixels(Image.open(io.BytesIO(image.data)).convert("RGB"))
    keep = np.ones(out.shape[:2], bool)
    keep[box[1]:box[3], box[0]:box[2]] = False
    assert (out[keep] == pixels(source)[keep]).all()


async def test_provider_maps_edit_errors_to_invalid_request(provider):
    from proxy.config import RouteConfig
    from proxy.errors import InvalidRequest
    from proxy.request import ImageRequest

    route = RouteConfig(provider="local-edit")
    with pytest.raises(InvalidRequest) as e:  # text to image on an edit model
        await provider.generate(ImageRequest(prompt="a fox", model="m", width=W, height=H), route)
    assert e.value.param == "images"
    bad_mask = input_image(rect_mask((16, 16), (0, 0, 8, 8)))
    with pytest.raises(InvalidRequest) as e:
        await provider.generate(ImageRequest(prompt="a fox", model="m", width=W, height=H,
                                             images=(input_image(INPUTS[0]),), mask=bad_mask), route)
    assert e.value.param == "mask"


async def test_a_too_narrow_input_names_the_param_the_client_sent(start_proxy, tmp_path, tiny_edit_dir):
    """multipart sends `image`, the JSON variant `images`: the engine's "too narrow" names that one."""
    import base64

    from openai import BadRequestError

    from tests.conftest import base_config
    from tests.test_local_e2e import TINY_SIZES, local_options

    cfg = base_config(tmp_path)
    cfg["providers"]["local-edit"] = local_options(tiny_edit_dir, task="edit")
    cfg["size_tables"]["tiny"] = TINY_SIZES
    cfg["models"] = {"tiny-edit": {"sizes": "tiny", "max_input_images": 3, "routes": ["local-edit"]}}
    _, client = await start_proxy(cfg)
    narrow = image_bytes(noise_image(90, 10), "PNG")
    with pytest.raises(BadRequestError) as e:
        await client.images.edit(model="tiny-edit", prompt="make it red", size="64x64",
                                 image=("narrow.png", narrow, "image/png"))
    assert e.value.status_code == 400 and "too narrow" in e.value.body["message"]
    assert e.value.body["param"] == "image"
    url = "data:image/png;base64," + base64.b64encode(narrow).decode()
    square = "data:image/png;base64," + base64.b64encode(image_bytes(noise_image(32, 32), "PNG")).decode()
    with pytest.raises(BadRequestError) as e:
        await client.post("/images/edits", cast_to=object, body={
            "model": "tiny-edit", "prompt": "make it red", "size": "64x64",
            "images": [{"image_url": square}, {"image_url": url}]})
    assert "too narrow" in e.value.body["message"] and e.value.body["param"] == "images"


async def test_a_generation_for_an_edit_model_points_to_edits_or_goes_to_a_route_that_generates(
        start_proxy, tmp_path, tiny_edit_dir):
    # It was a 400 "this model edits images: give 1 to 3 input images" (param images), and on a model with a
    # route that generates after the edit route, that 400 came back without trying it.
    cfg = base_config(tmp_path)
    cfg["providers"]["local-edit"] = {"kind": "diffusers", "model": str(tiny_edit_dir), "task": "edit",
                                      "device": "cpu", "default_steps": STEPS}
    cfg["models"]["edit-only"] = {"sizes": "qwen-image", "routes": ["local-edit"], "max_input_images": 3}
    cfg["models"]["edit-or-text"] = {"sizes": "qwen-image", "routes": ["local-edit", "placeholder"],
                                     "max_input_images": 3}
    _, client = await start_proxy(cfg)
    with pytest.raises(BadRequestError) as e:
        await client.images.generate(model="edit-only", prompt="a fox", size="64x64")
    assert e.value.body["param"] == "model" and "/v1/images/edits" in e.value.body["message"]
    r = await client.images.with_raw_response.generate(model="edit-or-text", prompt="a fox", size="64x64",
                                                       response_format="b64_json")
    assert r.headers["x-qip-route"] == "placeholder"
    assert Image.open(io.BytesIO(base64.b64decode(r.parse().data[0].b64_json))).size == (64, 64)
