"""A tiny random-weight Qwen-Image pipeline, built offline.

It is the dev default (model="tiny") and the test fixture. Shapes come from diffusers' own
pipeline tests. Every component is built after seeding torch, so the weights (and thus the
pixels for a given seed) are the same on every machine. It is saved with save_pretrained and
always loaded back with from_pretrained, so the real loading code is what runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = "tiny-qwen-image-v1"
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


def _tokenizer():
    # The diffusers tests download a tokenizer; offline we build a byte-level one from the 256
    # GPT-2 byte symbols plus Qwen's special tokens (every string encodes, one token per byte).
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {sym: i for i, sym in enumerate(bytes_to_unicode().values())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], additional_special_tokens=SPECIAL_TOKENS[1:])


def build_tiny_pipeline(path: str | os.PathLike):
    """Build the tiny pipeline and save_pretrained it into `path`. Returns the pipeline."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
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
        vocab_size=len(tokenizer),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )
    pipe.save_pretrained(str(path))
    return pipe


def tiny_pipeline_dir() -> Path:
    """The tiny pipeline's cache folder, built once (atomically) on first use."""
    root = os.environ.get("QWEN_IMAGE_PROXY_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "qwen-image-proxy"
    target = base / TINY_VERSION
    if (target / "model_index.json").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent or interrupted build never leaves a
    # half-written folder where loaders look.
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_VERSION}-", dir=base))
    try:
        build_tiny_pipeline(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
