"""Helpers for tests that need the tiny local pipeline or LoRA files (shared across test modules)."""

from __future__ import annotations

from pathlib import Path

from bench.gguf_files import write_gguf  # noqa: F401  (the GGUF tests write their files with it)

TINY_SUBDIR = "tiny-qwen-image"


def tiny_pipeline_dir(tmp: str | Path) -> Path:
    """Build the tiny random pipeline under `tmp` once and return its folder.

    Load it with the real QwenImagePipeline.from_pretrained (EngineConfig(model=str(path))).
    """
    from local_backend import build_tiny_pipeline

    path = Path(tmp) / TINY_SUBDIR
    if not (path / "model_index.json").exists():
        build_tiny_pipeline(path)
    return path


TINY_EDIT_SUBDIR = "tiny-qwen-image-edit"


def tiny_edit_pipeline_dir(tmp: str | Path) -> Path:
    """Build the tiny random edit pipeline (QwenImageEditPlusPipeline) under `tmp` once; return its folder.

    Load it with EngineConfig(model=str(path), task="edit"): the real from_pretrained, with the
    processor put together without torchvision (local_backend.edit.load_processor).
    """
    from local_backend.tiny import build_tiny_edit_pipeline

    path = Path(tmp) / TINY_EDIT_SUBDIR
    if not (path / "model_index.json").exists():
        build_tiny_edit_pipeline(path)
    return path


TINY21_SUBDIR = "tiny-qwen-image-21"


def tiny21_pipeline_dir(tmp: str | Path) -> Path:
    """Build the tiny random Qwen-Image-2.1 pipeline under `tmp` once; return its folder (the engine picks
    QwenImage21Pipeline from its model_index.json: generations and edits on one model)."""
    from local_backend.tiny21 import build_tiny21_pipeline

    path = Path(tmp) / TINY21_SUBDIR
    if not (path / "model_index.json").exists():
        build_tiny21_pipeline(path)
    return path


def image_bytes(image, fmt: str = "PNG") -> bytes:
    """A Pillow image encoded (PNG by default)."""
    import io

    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A random image (different for each seed)."""
    import numpy as np
    from PIL import Image

    channels = len(mode)
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels if channels > 1 else pixels[:, :, 0], mode)


def _transformer_config(pipeline_dir_or_pipe) -> dict:
    import json

    if hasattr(pipeline_dir_or_pipe, "transformer"):
        transformer = pipeline_dir_or_pipe.transformer
        return {**transformer.config, "_class_name": type(transformer).__name__}
    return json.loads((Path(pipeline_dir_or_pipe) / "transformer" / "config.json").read_text())


def lora_state_dict(pipeline_dir_or_pipe, seed: int = 0, rank: int = 4, strength: float = 10.0) -> dict:
    """A random PEFT LoRA for the pipeline's transformer, in diffusers' key format.

    `strength` multiplies lora_B: at 1.0 a random LoRA moves the tiny model's pixels by only 1-2
    levels; 10 makes its effect obvious (mean ~6 levels) without saturating.
    """
    import diffusers
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    # A fresh transformer built from the config: only the shapes matter, and the caller's
    # pipeline is never touched. Its class: the one the config names (Qwen-Image or 2.1).
    full = _transformer_config(pipeline_dir_or_pipe)
    cls = getattr(diffusers, full.get("_class_name") or "QwenImageTransformer2DModel")
    config = {k: v for k, v in full.items() if not k.startswith("_")}
    transformer = cls.from_config(config)
    torch.manual_seed(seed)
    transformer.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,  # random A and B: the LoRA really changes the output
        )
    )
    state = get_peft_model_state_dict(transformer)
    return {
        f"transformer.{key}": (value * strength if "lora_B" in key else value).detach().clone().contiguous()
        for key, value in state.items()
    }


def make_lora_file(pipeline_dir_or_pipe, path: str | Path, seed: int = 0, strength: float = 10.0) -> Path:
    """Write a random LoRA (.safetensors) for the tiny pipeline (a folder or a loaded pipeline)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(pipeline_dir_or_pipe, seed, strength=strength), str(path))
    return path


def submit_while_held(engine, make_jobs):
    """Submit jobs while the engine's worker is held inside a gate job, so that they all wait and the
    worker then batches them as it likes; returns the jobs (make_jobs() submits them)."""
    import threading

    from local_backend import GenerationParams

    started, release = threading.Event(), threading.Event()

    def hold(step, total):
        started.set()
        release.wait(30)

    gate = engine.submit(GenerationParams("gate", width=32, height=32, seed=99, num_inference_steps=2,
                                          on_step=hold))
    assert started.wait(30), "the gate job never started"
    try:
        jobs = make_jobs()
    finally:
        release.set()
    gate.future.result(30)
    return jobs


def wide_tiny_pipeline_dir(tmp: str | Path) -> Path:
    """The tiny pipeline with a wider transformer (2 heads x 128: rows of 256, so Q4_K's 256-value blocks
    fit), built once under `tmp`: the model the GGUF tests quantize."""
    import shutil

    import torch
    from diffusers import QwenImageTransformer2DModel

    path = Path(tmp) / "tiny-qwen-image-wide"
    if (path / "model_index.json").exists():
        return path
    base = tiny_pipeline_dir(tmp)
    staging = Path(tmp) / "tiny-qwen-image-wide.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(base, staging)
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=128,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(32, 48, 48),
    )
    shutil.rmtree(staging / "transformer")
    transformer.save_pretrained(str(staging / "transformer"))
    staging.rename(path)
    return path
