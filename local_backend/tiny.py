"""Tiny random-weight Qwen-Image pipelines, built offline: text-to-image and edit.

They are the dev defaults (model="tiny", model="tiny-edit") and the test fixtures. Shapes come
from diffusers' own pipeline tests. Every component is built after seeding torch, so the weights
(and thus the pixels for a given seed) are the same on every machine. They are saved with
save_pretrained and always loaded back with from_pretrained, so the real loading code is what runs.

The edit pipeline (QwenImageEditPlusPipeline) adds a Qwen2VLProcessor, saved as the real
Qwen-Image-Edit repos lay it out (a `processor/` folder). Its working sizes are shrunk: diffusers
resizes every input to about 1 megapixel for the VAE and 384x384 for the vision encoder, which on
a tiny model would make an edit take 20-70 s on a CPU. A `qwen-image-proxy.json` file in the folder
carries the factor (`edit_area_scale`) the loader applies to those areas (local_backend.edit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_VERSION = "tiny-qwen-image-v1"
TINY_EDIT_VERSION = "tiny-qwen-image-edit-v1"
# The file beside model_index.json that tells the loader how much to shrink the edit working sizes.
EXTRAS_FILE = "qwen-image-proxy.json"
# 1/256 of the areas: the VAE's 1024x1024 becomes 64x64, the vision encoder's 384x384 becomes 24x24.
TINY_EDIT_AREA_SCALE = 1 / 256
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _tokenizer() -> Any:  # a transformers Qwen2Tokenizer
    # The diffusers tests download a tokenizer; offline we build a byte-level one from the 256
    # GPT-2 byte symbols plus Qwen's special tokens (every string encodes, one token per byte).
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {sym: i for i, sym in enumerate(bytes_to_unicode().values())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIAL_TOKENS[1:])


def _components() -> dict:
    """The tiny model's components (the same weights for both pipelines)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=3,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    tokenizer = _tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": len(tokenizer),
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        # Also kept at the top level (as extra attributes; the text config is what the model reads), as the
        # saved tiny model has always had them; the config's typed signature leaves them out.
        vocab_size=len(tokenizer),  # type: ignore[call-arg]
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }


def build_tiny_pipeline(path: str | os.PathLike) -> Any:  # a diffusers QwenImagePipeline
    """Build the tiny text-to-image pipeline and save_pretrained it into `path`. Returns the pipeline."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**_components())
    pipe.save_pretrained(str(path))
    return pipe


def build_tiny_edit_pipeline(path: str | os.PathLike) -> Any:  # a QwenImageEditPlusPipeline
    """Build the tiny edit pipeline (QwenImageEditPlusPipeline) into `path`. Returns the folder.

    Load it with local_backend's loader (Engine, EngineConfig(model=path, task="edit")): without
    torchvision, transformers cannot build a Qwen2VLProcessor by itself (local_backend.edit).
    """
    from diffusers import QwenImageEditPlusPipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    components = _components()
    # A processor without a video processor cannot be saved by transformers, so the pipeline is saved
    # without one and the processor's parts go where the real repos keep them (processor/).
    pipe = QwenImageEditPlusPipeline(processor=None, **components)
    pipe.save_pretrained(str(path))
    # 28 = the vision tower's patch (14) x merge (2): condition images become 1-4 vision tokens.
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56)
    image_processor.save_pretrained(str(path / "processor"))
    components["tokenizer"].save_pretrained(str(path / "processor"))
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (path / EXTRAS_FILE).write_text(json.dumps({"edit_area_scale": TINY_EDIT_AREA_SCALE}) + "\n")
    return path


def tiny_pipeline_dir(edit: bool = False) -> Path:
    """The tiny pipeline's cache folder (the edit one with edit=True), built once (atomically) on first use."""
    if edit:
        return cached_build(TINY_EDIT_VERSION, build_tiny_edit_pipeline)
    return cached_build(TINY_VERSION, build_tiny_pipeline)


def cached_build(version: str, build: Callable[[Path], object]) -> Path:
    """The cache folder `version`, made by build(folder) once (atomically) on first use."""
    root = os.environ.get("QWEN_IMAGE_PROXY_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "qwen-image-proxy"
    target = base / version
    if (target / "model_index.json").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build never leaves a
    # half-written folder where loaders look.
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=base))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
