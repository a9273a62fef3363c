"""GGUF transformers (`transformer: <file>.gguf`): the tiny model's transformer written as GGUF files by the
gguf package (Q8_0, Q5_0, Q4_0; Q4_K by bench/gguf_files.py), loaded with diffusers' single-file loader, compared with the fp32 model at
the same seed, served through a models.yaml route (with a LoRA), and the one-line check-config refusals."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import yaml

pytest.importorskip("diffusers")
gguf = pytest.importorskip("gguf")

from PIL import Image  # noqa: E402

from local_backend import Engine, EngineConfig, EngineError, GenerationParams  # noqa: E402
from local_backend.loading import gguf_problem, validate_config  # noqa: E402

from .conftest import base_config  # noqa: E402
from .local_helpers import (  # noqa: E402
    make_lora_file,
    tiny21_pipeline_dir,
    wide_tiny_pipeline_dir,
    write_gguf,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return wide_tiny_pipeline_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


@pytest.fixture(scope="module")
def state(wide_dir):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(wide_dir, subfolder="transformer").state_dict()


@pytest.fixture(scope="module")
def files(tmp_path_factory, state):
    folder = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(state, folder / f"tiny-{q}.gguf", q) for q in ("Q8_0", "Q5_0", "Q4_K", "Q4_0")}


def image(model, **options) -> np.ndarray:
    with Engine(EngineConfig(model=str(model), device="cpu", default_steps=4, **options)) as engine:
        result = engine.generate_sync(GenerationParams("a red fox", 64, 64, seed=3))
        pipe = engine.pipe
        quantized = {type(p.data).__name__ for p in pipe.transformer.parameters()}
    return np.asarray(result.images[0]).astype(np.int16), quantized


def test_gguf_images_are_close_to_the_fp32_model(wide_dir, files, capsys):
    reference, kinds = image(wide_dir)
    assert kinds == {"Tensor"}
    diffs = {}
    for q, path in files.items():
        packed = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
        assert q in packed and "F32" in packed  # quantized where rows fit the block size, the rest F32
        pixels, kinds = image(wide_dir, transformer=str(path))
        assert "GGUFParameter" in kinds  # the weights stay packed and are dequantized per layer
        diffs[q] = float(np.abs(pixels - reference).mean())
        assert pixels.shape == reference.shape
    with capsys.disabled():
        print("\nmean |GGUF - fp32| per pixel channel, same seed (0-255):",
              ", ".join(f"{q} {d:.3f}" for q, d in diffs.items()))
    assert all(0 < d < 8 for d in diffs.values())  # close, not equal
    assert diffs["Q8_0"] < diffs["Q4_0"]  # more bits, closer


async def test_gguf_route_with_a_lora(start_proxy, tmp_path, wide_dir, files):
    lora = make_lora_file(wide_dir, tmp_path / "loras" / "style.safetensors", seed=1)
    cfg = base_config(tmp_path)
    cfg["providers"]["q8"] = {"kind": "diffusers", "model": str(wide_dir), "transformer": str(files["Q8_0"]),
                              "device": "cpu", "default_steps": 4, "load_in_background": False,
                              "lora_dirs": [str(lora.parent)]}
    cfg["providers"]["q4"] = {**cfg["providers"]["q8"], "transformer": str(files["Q4_0"])}
    cfg["size_tables"]["tiny"] = {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64"}}}
    cfg["models"]["tiny-q8"] = {"sizes": "tiny", "routes": ["q8"]}
    cfg["models"]["tiny-q4"] = {"sizes": "tiny", "routes": ["q4"]}
    _, client = await start_proxy(cfg)

    async def make(model, **extra):
        r = await client.images.generate(model=model, prompt="a red fox", response_format="b64_json",
                                         extra_body={"seed": 3, **extra})
        im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        assert im.size == (64, 64)
        return np.asarray(im).astype(np.int16)

    q8, q4 = await make("tiny-q8"), await make("tiny-q4")
    assert not np.array_equal(q8, q4)
    styled = await make("tiny-q8", loras=[{"path": "style.safetensors", "scale": 1.0}])
    assert np.abs(styled - q8).mean() > 0.5  # a LoRA on a GGUF transformer works
    assert np.array_equal(await make("tiny-q8"), q8)


def test_config_refusals(tmp_path, wide_dir, files, state):
    # not a GGUF file
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, renamed")
    assert "is not a GGUF file" in gguf_problem(EngineConfig(model=str(wide_dir), transformer=str(fake)))
    # tensors of another model: the 2.1 tiny transformer's file against the Qwen-Image model
    from diffusers import QwenImage21Transformer2DModel

    other = tiny21_pipeline_dir(tmp_path)
    state21 = QwenImage21Transformer2DModel.from_pretrained(other, subfolder="transformer").state_dict()
    wrong = write_gguf(state21, tmp_path / "other.gguf", "Q8_0")
    problem = gguf_problem(EngineConfig(model=str(wide_dir), transformer=str(wrong)))
    assert "does not match the model's QwenImageTransformer2DModel" in problem and "missing" in problem
    # the right names, one shape off
    bad_shape = dict(state)
    name = "proj_out.weight"
    bad_shape[name] = state[name][:, :-1]
    problem = gguf_problem(EngineConfig(model=str(wide_dir), transformer=str(write_gguf(bad_shape, tmp_path / "s.gguf"))))
    assert "1 of another shape (e.g. proj_out.weight" in problem
    # a quantization type diffusers cannot dequantize (IQ2_XXS: 66 bytes per 256 values)
    name = "transformer_blocks.0.attn.to_q.weight"
    rows, cols = state[name].shape
    raw = np.zeros((rows, cols // 256 * 66), dtype=np.uint8)
    iq = write_gguf(state, tmp_path / "iq.gguf", plain_types={name: (gguf.GGMLQuantizationType.IQ2_XXS, raw)})
    problem = gguf_problem(EngineConfig(model=str(wide_dir), transformer=str(iq)))
    assert "uses IQ2_XXS, which this diffusers cannot dequantize" in problem
    # a good file: no problem; and the load itself refuses what the check refuses
    assert gguf_problem(EngineConfig(model=str(wide_dir), transformer=str(files["Q4_0"]))) is None
    with pytest.raises(EngineError, match="not a GGUF file"):
        Engine(EngineConfig(model=str(wide_dir), device="cpu", transformer=str(fake))).load()
    with pytest.raises(EngineError, match="must be a .gguf file"):
        validate_config(EngineConfig(transformer="model.safetensors"))
    with pytest.raises(EngineError, match="cannot both apply"):
        validate_config(EngineConfig(transformer="x.gguf", quantization="int8wo"))


def test_check_config_says_it_in_one_line(tmp_path, wide_dir, capsys):
    from proxy.cli import main

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not gguf at all")
    cfg = base_config(tmp_path)
    cfg["providers"]["q"] = {"kind": "diffusers", "model": str(wide_dir), "transformer": str(fake), "device": "cpu"}
    cfg["models"]["tiny-q"] = {"sizes": "qwen-image", "routes": ["q"]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as done:
        main(["check-config", "--strict", "--config", str(path)])
    out = capsys.readouterr().out
    assert done.value.code == 1
    lines = [line for line in out.splitlines() if "tiny-q" in line]
    assert len(lines) == 1 and f"transformer: {fake} is not a GGUF file" in lines[0]
