"""The model rows of bench/bench_engine.py (--models): Qwen-Image-2.1, GGUF transformers, offload: auto.

With --gpu (needs CUDA), real sizes with random weights (speed does not depend on weight values), one
image per call, the text encoder left out (random prompt embeddings of its width are passed in):
- 2.1 bf16: the 7B QwenImage21Transformer2DModel and its VAE, 40 steps without CFG (its default).
- 20B GGUF Q8_0 and Q4_K: the 20B transformer's random weights quantized by this script
  (bench/gguf_files.py) into a GGUF file under --gguf-dir (about 22 and 12 GB), loaded by the engine's
  own single-file loader (local_backend.single_file), 50 steps with CFG 4.
- offload: auto at --gpu-memory (default 24GiB): the planner's pick for the 20B model
  (local_backend.placement), placed by the engine's own code (local_backend.offload), with the
  planner's estimated peak beside torch.cuda.max_memory_allocated (the estimate counts the text encoder,
  which this row leaves out: compare the transformer phase).
Each row: seconds per image, peak GPU memory, and for the GGUF rows the mean absolute pixel difference
from the bf16 transformer's image at the same seed.

Without --gpu: the same rows on the tiny models on the CPU (64x64, few steps): the code path, not speed;
the auto row prints the planner's table for --gpu-memory instead (nothing to place on a CPU).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.gguf_files import write_gguf

GGUF_TYPES = ("Q8_0", "Q4_K")


def _timed(fn, reps: int, cuda: bool) -> tuple[float, object]:
    import torch

    times, out = [], None
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def _embeds(width: int, tokens: int, device: str, dtype):
    import torch

    generator = torch.Generator("cpu").manual_seed(0)
    values = torch.randn(1, tokens, width, generator=generator).to(device, dtype)
    return values, torch.ones(1, tokens, device=device, dtype=torch.long)


def _call(pipe, size: int, steps: int, cfg: float, width: int, tokens: int, device: str):
    import torch

    embeds, mask = _embeds(width, tokens, device, pipe.transformer.dtype)
    extra = {}
    if cfg > 1:
        extra = {"negative_prompt_embeds": embeds.flip(1), "negative_prompt_embeds_mask": mask}
    return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=cfg, width=size, height=size,
                num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(1), output_type="np",
                **extra).images[0]


def _peak(cuda: bool) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:9.1f}" if cuda else f"{'-':>9}"


def _reset(cuda: bool) -> None:
    import torch

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _model_folder(root: Path, family: str, transformer_config: dict) -> Path:
    """A folder with transformer/config.json: what the single-file loader reads the config from."""
    folder = root / family
    (folder / "transformer").mkdir(parents=True, exist_ok=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(transformer_config))
    return folder


def row_21(device: str, size: int, steps: int, reps: int, tokens: int, tiny: bool) -> None:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage21,
        FlowMatchEulerDiscreteScheduler,
        QwenImage21Pipeline,
        QwenImage21Transformer2DModel,
    )

    from local_backend.edit import load_processor
    from local_backend.tiny21 import tiny21_pipeline_dir

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if tiny:
        source = tiny21_pipeline_dir()
        pipe = QwenImage21Pipeline.from_pretrained(str(source), processor=load_processor(str(source), {}, "Qwen3VLProcessor"))
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                torch.manual_seed(0)
                transformer, vae = QwenImage21Transformer2DModel().eval(), AutoencoderKLQwenImage21().eval()
        finally:
            torch.set_default_dtype(previous)
        # The pipeline reads its chat template off a processor: the tiny model's (same template).
        processor = load_processor(str(tiny21_pipeline_dir()), {}, "Qwen3VLProcessor")
        pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                   processor=processor, transformer=transformer)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    width = pipe.transformer.config.context_in_dim
    params = sum(p.numel() for p in pipe.transformer.parameters())
    _call(pipe, size, 2, 1.0, width, tokens, device)  # warm-up
    _reset(cuda)
    seconds, _ = _timed(lambda: _call(pipe, size, steps, 1.0, width, tokens, device), reps, cuda)
    print(f"{'2.1 ' + str(dtype).removeprefix('torch.'):<26} {params / 1e9:6.2f}B {seconds:8.2f} {_peak(cuda)}   -",
          flush=True)


def rows_gguf(device: str, size: int, steps: int, reps: int, tokens: int, tiny: bool, gguf_dir: Path) -> None:
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from local_backend.memory import SHIPPED
    from local_backend.single_file import load_transformer

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if tiny:
        config = {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 16, "out_channels": 4,
                  "num_layers": 2, "attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 16,
                  "guidance_embeds": False, "axes_dims_rope": [32, 48, 48]}
        vae_kwargs = {"base_dim": 24, "z_dim": 4, "dim_mult": [1, 2, 4], "num_res_blocks": 1,
                      "temperal_downsample": [False, True], "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}
    else:
        config = json.loads((SHIPPED / "qwen-image" / "transformer" / "config.json").read_text())
        vae_kwargs = {}
    folder = _model_folder(gguf_dir, "qwen-image-tiny-wide" if tiny else "qwen-image", config)
    options = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):  # the bf16 reference: random weights made on the device in its dtype
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            reference = QwenImageTransformer2DModel(**options).eval()
            vae = AutoencoderKLQwenImage(**vae_kwargs).eval()
        finally:
            torch.set_default_dtype(previous)
    width = options["joint_attention_dim"]
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=reference)
    pipe.set_progress_bar_config(disable=True)
    _call(pipe, size, 2, 4.0, width, tokens, device)
    _reset(cuda)
    seconds, base = _timed(lambda: _call(pipe, size, steps, 4.0, width, tokens, device), reps, cuda)
    params = sum(p.numel() for p in reference.parameters())
    print(f"{'20B bf16' if not tiny else 'tiny-wide fp32':<26} {params / 1e9:6.2f}B {seconds:8.2f} {_peak(cuda)}   -",
          flush=True)
    state = {name: t for name, t in reference.state_dict().items()}
    for qtype in GGUF_TYPES:
        path = gguf_dir / f"{'tiny-wide' if tiny else 'qwen-image-20b'}-{qtype}.gguf"
        started = time.perf_counter()
        write_gguf(state, path, qtype)
        written = time.perf_counter() - started
        pipe.transformer = None
        _reset(cuda)
        transformer = load_transformer(str(path), str(folder), config, dtype, True).to(device)
        pipe.transformer = transformer
        _call(pipe, size, 2, 4.0, width, tokens, device)
        _reset(cuda)
        seconds, image = _timed(lambda: _call(pipe, size, steps, 4.0, width, tokens, device), reps, cuda)
        diff = float(np.abs(np.asarray(image, dtype=np.float32) - np.asarray(base, dtype=np.float32)).mean() * 255)
        label = f"{'20B' if not tiny else 'tiny-wide'} GGUF {qtype}"
        print(f"{label:<26} {path.stat().st_size / 2**30:5.1f}G {seconds:8.2f} {_peak(cuda)}   {diff:.2f}"
              f"   (file written in {written:.0f} s)", flush=True)
        pipe.transformer = reference
        del transformer


def row_auto(device: str, size: int, steps: int, reps: int, tokens: int, tiny: bool, gpu_memory: str) -> None:
    from local_backend import EngineConfig
    from local_backend.memory import estimate
    from local_backend.placement import parse_bytes, plan, table

    config = EngineConfig(model="Qwen/Qwen-Image", device="cuda", offload="auto", gpu_memory=gpu_memory,
                          max_pixels=size * size, max_batch=1)
    e = estimate(config)
    result = plan(e, parse_bytes(gpu_memory))
    if tiny or device != "cuda":
        print(f"offload: auto at {gpu_memory} (no GPU here: the plan only)")
        print(table(e, result))
        return
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from local_backend.offload import place

    if result.pick is None:
        print(f"offload: auto at {gpu_memory}: nothing fits (needs {result.smallest_gpu / 2**30:.1f} GiB)")
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:  # built on the CPU: the placement decides what reaches the GPU
        torch.manual_seed(0)
        transformer, vae = QwenImageTransformer2DModel().eval(), AutoencoderKLQwenImage().eval()
    finally:
        torch.set_default_dtype(previous)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    place(pipe, result.pick.offload, result.pick.text_encoder, "cuda", lambda stage: None)
    width = transformer.config.joint_attention_dim
    _call(pipe, size, 2, 4.0, width, tokens, "cuda")
    _reset(True)
    seconds, _ = _timed(lambda: _call(pipe, size, steps, 4.0, width, tokens, "cuda"), reps, True)
    print(f"{'20B auto@' + gpu_memory + ': ' + result.pick.placement:<26} {seconds:8.2f} {_peak(True)}   "
          f"estimated peak {result.pick.gpu_peak / 2**30:.1f} GiB (with the text encoder's share)", flush=True)


def bench_models(args, gpu: bool) -> None:
    """The model rows: on the GPU at real size, else on the tiny models (code path only)."""
    import torch

    device = "cuda" if gpu else "cpu"
    tiny = not gpu
    size = args.offload_size if gpu else 64
    steps21, steps = (40, 50) if gpu else (4, 4)
    reps = args.reps
    where = torch.cuda.get_device_name() if gpu else "CPU (tiny models: the code path, not speed)"
    print(f"model rows on {where}, {size}x{size}, one image, median of {reps}; no text encoder (random embeddings)")
    print(f"{'row':<26} {'weights':>7} {'s/image':>8} {'peak GiB':>9}   |diff| vs bf16 (0-255)")
    gguf_dir = Path(args.gguf_dir) if args.gguf_dir else Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    gguf_dir.mkdir(parents=True, exist_ok=True)
    row_21(device, size, steps21, reps, args.text_tokens, tiny)
    _reset(gpu)
    rows_gguf(device, size, steps, reps, args.text_tokens, tiny, gguf_dir)
    _reset(gpu)
    row_auto(device, size, steps, reps, args.text_tokens, tiny, args.gpu_memory)
