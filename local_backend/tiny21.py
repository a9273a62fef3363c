"""A tiny random-weight Qwen-Image-2.1 pipeline (QwenImage21Pipeline), built offline: one model for
generations and edits (0 to 10 reference images).

Shapes follow diffusers' own QwenImage21Pipeline tests: a 2-block single-stream transformer on 8 latent
channels, a VAE with five dim_mult stages (the 16x compression the pipeline hardcodes) that reads and
writes RGBA, and a 2-layer Qwen3-VL text encoder whose vision patch (16) x merge (2) covers the 32-pixel
tile one latent group spans. The tokenizer is local_backend.tiny's byte-level one plus a ChatML chat
template (the pipeline counts the system turn's tokens with it).

Like the other tiny models it is seeded per component, saved with save_pretrained and loaded back with
from_pretrained. transformers cannot save a processor without a video processor (which needs
torchvision), so the processor's parts are saved into `processor/` by hand, as the real repo lays them
out, and the loader puts them back together (local_backend.edit.load_processor). The pipeline works
on condition images at `output_resolution` (1024 px a side by default); the extras file shrinks that
to 64 px for this model, as for the tiny edit model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .edit import processor_class
from .tiny import EXTRAS_FILE, TINY_EDIT_AREA_SCALE, _tokenizer, cached_build

TINY21_VERSION = "tiny-qwen-image-21-v1"
Z_DIM = 8  # not 4: the pipeline takes a 4-channel (RGBA) condition tensor for latents when z_dim is 4
# ChatML, as Qwen's tokenizers carry it: the pipeline tokenizes its system turn with this template and
# must get the prefix it writes out by hand.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _components() -> dict:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(
        patch_size=1, in_channels=Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, context_in_dim=16, mlp_ratio=2, axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage21(
        base_dim=4, decoder_base_dim=4, z_dim=Z_DIM, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
        attn_scales=[], temperal_downsample=[False, True, True, True],
        latents_mean=[0.0] * Z_DIM, latents_std=[1.0] * Z_DIM,
    )
    tokenizer = _tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 2, "head_dim": 8, "vocab_size": len(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    text_encoder = Qwen3VLForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    return {"transformer": transformer, "vae": vae, "scheduler": FlowMatchEulerDiscreteScheduler(),
            "text_encoder": text_encoder, "tokenizer": tokenizer}


def build_tiny21_pipeline(path: str | os.PathLike) -> Path:
    """Build the tiny Qwen-Image-2.1 pipeline into `path` (save_pretrained). Returns the folder.

    Load it with local_backend's loader (Engine(EngineConfig(model=path))): the processor is saved in
    parts (see the module's docstring).
    """
    from diffusers import QwenImage21Pipeline
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    parts = _components()
    tokenizer = parts.pop("tokenizer")
    # 32 px per merged vision token; 32x32 to 64x64 px: 1 to 4 vision tokens per condition image.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=64 * 64
    )
    processor = processor_class("Qwen3VLProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=CHAT_TEMPLATE
    )
    pipe = QwenImage21Pipeline(processor=processor, **parts)
    pipe.register_modules(processor=None)  # saved by hand below
    pipe.save_pretrained(str(path))
    image_processor.save_pretrained(str(path / "processor"))
    tokenizer.save_pretrained(str(path / "processor"))
    (path / "processor" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen3VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (path / EXTRAS_FILE).write_text(json.dumps({"edit_area_scale": TINY_EDIT_AREA_SCALE}) + "\n")
    return path


def tiny21_pipeline_dir() -> Path:
    """The tiny 2.1 pipeline's cache folder, built once (atomically) on first use."""
    return cached_build(TINY21_VERSION, build_tiny21_pipeline)
