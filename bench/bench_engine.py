"""Local engine benchmarks (numbers, not tests).

Default (CPU): what the engine costs on top of calling the same pipeline directly, on the tiny
model: queue hand-off, worker thread, step callback, PIL output. Runs are interleaved and the
median is compared; the target is < 5 %.

    python bench/bench_engine.py [--size 256 --steps 8 --reps 9]

--partials (CPU): what partial images cost. On the tiny model, in the same run, interleaved:
calls without previews, with 3 previews by the latent map and with 3 by the half-size VAE decode
(the time the denoising loop loses); then, at the real model's latent size (16 channels, 128x128
for 1024x1024), the per-preview cost of the latent map, its resize and a PNG encode.

    python bench/bench_engine.py --partials [--size 256 --steps 8 --reps 9]

--gpu (needs CUDA): seconds per image of the real-size Qwen-Image transformer (20B, default
config) and VAE in bf16 with random weights (speed does not depend on weight values). The text
encoder is skipped: random prompt embeddings shaped like Qwen2.5-VL's (3584 wide) are passed in.

    python bench/bench_engine.py --gpu [--sizes 1024 1328 --batches 1 4]

Then the offload rows: the same pipeline placed by the engine's own loading code
(local_backend.offload.place) with offload none, model, sequential and group, one 1024x1024 image at
50 steps with CFG 4 each: seconds per image, peak GPU memory, and what stays on the GPU between calls.
`sequential` streams every layer's weights per step: a few minutes for its row.

    python bench/bench_engine.py --gpu [--offload-modes none model sequential group] [--offload-size 1024]

--gpu --options (needs CUDA): the speed options of local_backend.accel at 1024x1024, one image: for
each tier (base: 50 steps, CFG 4; lightning: 8 steps, no CFG; the Lightning LoRA itself is left out:
random weights) x option (plain, compile, cache regular / high, fp8, together = compile + cache high
+ fp8): seconds per image (median of --reps, default 3, after a warm-up call), peak GPU memory, and how
far the image is from plain bf16's at the same seed (mean and max absolute pixel difference). The
options are applied by the engine's own code (local_backend.accel.Accel, quant_skip), so what is
measured is what is served.

    python bench/bench_engine.py --gpu --options [--size 1024 --reps 3]

--models (bench/bench_models.py): rows for Qwen-Image-2.1 (bf16), the 20B transformer from GGUF Q8_0 and
Q4_K files this script quantizes, and offload: auto at --gpu-memory (default 24GiB). With --gpu at real
size; without, the same rows on the tiny models on the CPU (the code path).

    python bench/bench_engine.py --models --gpu [--gpu-memory 24GiB] [--gguf-dir /big/disk] [--offload-size 1024]
    python bench/bench_engine.py --models

--cpu-smoke: the offload rows, then the same options table, on the tiny model on the CPU (64x64, few
steps): the code path, not speed. The engine ignores offload on the CPU (there is no GPU memory to
save), so the offload rows run its placing code and say "ignored".

    python bench/bench_engine.py --cpu-smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, uninstalled

# Qwen/Qwen-Image's scheduler_config.json (the timing barely depends on it).
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "use_dynamic_shifting": True,
}


# ----- CPU: engine overhead -----


def bench_overhead(args) -> None:
    import torch

    from local_backend import Engine, EngineConfig, GenerationParams

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(EngineConfig(model="tiny", device="cpu", max_batch=4, max_queue=64))
    engine.load(lambda stage: print(f"  [load] {stage}"))
    engine.start()
    pipe = engine.pipe  # the very same pipeline object the engine drives
    size, steps = args.size, args.steps
    kwargs = dict(width=size, height=size, num_inference_steps=steps, true_cfg_scale=4.0)

    def direct(seed: int):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt="a red fox in the snow", negative_prompt=" ", generator=generator, **kwargs).images

    def through_engine(seed: int):
        params = GenerationParams(
            "a red fox in the snow",
            width=size,
            height=size,
            num_inference_steps=steps,
            cfg_scale=4.0,
            seed=seed,
        )
        return engine.generate_sync(params).images

    def timed(fn, seed: int) -> float:
        started = time.perf_counter()
        fn(seed)
        return time.perf_counter() - started

    print(f"tiny model, CPU ({torch.get_num_threads()} threads), {size}x{size}, {steps} steps, true CFG 4")
    for seed in range(2):  # warm-up: allocator, oneDNN kernels
        direct(seed)
        through_engine(seed)
    direct_times, engine_times = [], []
    for rep in range(args.reps):  # interleaved, so load drift hits both alike
        direct_times.append(timed(direct, rep))
        engine_times.append(timed(through_engine, rep))
    d, e = statistics.median(direct_times), statistics.median(engine_times)
    print(f"  direct pipeline call  median {d * 1000:8.1f} ms   (min {min(direct_times) * 1000:.1f})")
    print(f"  engine.generate_sync  median {e * 1000:8.1f} ms   (min {min(engine_times) * 1000:.1f})")
    print(
        f"  engine overhead       {(e - d) * 1000:+8.1f} ms = {(e - d) / d * 100:+.2f} % of the median (target < 5 %)"
    )

    # Runs differ by more than the overhead on a shared machine, so also time, within each engine
    # run, the part spent outside the pipeline call: queue, thread hand-off, result, PIL resize.
    inside = _TimedPipe(pipe)
    engine._pipe = inside  # a bench-only peek; the engine reads the pipeline through this attribute
    outside = []
    for rep in range(args.reps):
        total = timed(through_engine, rep)
        outside.append(total - inside.last)
    engine._pipe = pipe
    o = statistics.median(outside)
    print(f"  outside the pipe call median {o * 1000:8.2f} ms per job = {o / d * 100:.3f} % of a direct call")

    # Batching: four compatible jobs queued at once share pipeline calls.
    gate = threading.Event()
    blocker = engine.submit(
        GenerationParams(
            "hold", width=size, height=size, num_inference_steps=2, on_step=lambda s, t: gate.wait(30)
        )
    )
    jobs = [
        engine.submit(
            GenerationParams(
                f"prompt {i}", width=size, height=size, num_inference_steps=steps, cfg_scale=4.0, seed=i
            )
        )
        for i in range(4)
    ]
    started = time.perf_counter()
    gate.set()
    blocker.future.result()
    batch_start = time.perf_counter()
    results = [job.future.result() for job in jobs]
    batched = time.perf_counter() - batch_start
    print(
        f"  4 queued jobs         {batched * 1000:8.1f} ms in batches of {results[0].batch_size} "
        f"= {batched / 4 * 1000:.1f} ms/image vs {d * 1000:.1f} solo (gate released after "
        f"{(batch_start - started) * 1000:.0f} ms)"
    )
    engine.close()


class _TimedPipe:
    """Forwards everything to the pipeline and times its __call__."""

    def __init__(self, pipe):
        self._pipe, self.last = pipe, 0.0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self._pipe(*args, **kwargs)
        finally:
            self.last = time.perf_counter() - started


# ----- CPU: partial images -----


def bench_partials(args) -> None:
    import io

    import torch

    from local_backend import Engine, EngineConfig, GenerationParams

    if args.threads:
        torch.set_num_threads(args.threads)
    size, steps, count = args.size, args.steps, 3
    engines = {}
    for method in ("latent", "vae"):
        engine = Engine(EngineConfig(model="tiny", device="cpu", preview=method))
        started = time.perf_counter()
        engine.start()
        engines[method] = engine
        print(f"  [{method}] loaded in {time.perf_counter() - started:.2f} s")
    pipe = engines["latent"].pipe
    started = time.perf_counter()
    engines["latent"]._previewer.matrix()  # fitted on the first preview: done here, timed apart
    print(f"  fitting the latent map (once per engine): {(time.perf_counter() - started) * 1000:.1f} ms")

    # Load on a shared machine moves whole runs by more than the previews cost, so also time the
    # preview work itself, inside each call (the step callback's _make_previews).
    inside = {method: [0.0] for method in engines}
    for method, engine in engines.items():
        real = engine._make_previews

        def timed_previews(*a, _real=real, _acc=inside[method]):
            started = time.perf_counter()
            try:
                return _real(*a)
            finally:
                _acc[0] += time.perf_counter() - started

        engine._make_previews = timed_previews  # a bench-only peek
    received: list = []

    def run(method: str | None, seed: int) -> float:
        engine = engines[method or "latent"]
        params = GenerationParams(
            "a red fox in the snow", width=size, height=size, num_inference_steps=steps, cfg_scale=4.0,
            seed=seed, partial_images=count if method else 0,
            on_partial=(lambda i, k, im: received.append(im)) if method else None,
        )
        started = time.perf_counter()
        engine.generate_sync(params)
        return time.perf_counter() - started

    print(f"tiny model, CPU ({torch.get_num_threads()} threads), {size}x{size}, {steps} steps, true CFG 4, "
          f"{count} partial images")
    modes = [None, "latent", "vae"]
    for seed in range(2):
        for mode in modes:
            run(mode, seed)
    times: dict = {mode: [] for mode in modes}
    for method in engines:
        inside[method][0] = 0.0
    for rep in range(args.reps):  # interleaved, so load drift hits all alike
        for mode in modes:
            times[mode].append(run(mode, rep))
    base = statistics.median(times[None])
    print(f"  no previews           median {base * 1000:8.1f} ms   (min {min(times[None]) * 1000:.1f})")
    for mode in ("latent", "vae"):
        t = statistics.median(times[mode])
        own = inside[mode][0] / args.reps
        print(f"  {count} previews ({mode:6}) median {t * 1000:8.1f} ms   (min {min(times[mode]) * 1000:.1f})"
              f"   {(t - base) * 1000:+.1f} ms = {(t - base) / base * 100:+.2f} %;"
              f" inside the loop {own * 1000:.2f} ms per call = {own / base * 100:.2f} %")
    assert len(received) == count * 2 * (args.reps + 2)
    for engine in engines.values():
        engine.close()

    # The same work at the real model's latent size, measured apart (no 20B transformer here).
    from local_backend.previews import Previewer

    class RealShaped:  # what Previewer reads from a pipeline
        vae_scale_factor = 8
        _unpack_latents = staticmethod(pipe._unpack_latents)

    previewer = Previewer(RealShaped())
    previewer._matrix = torch.randn(17, 3) * 0.1  # a 16-channel map (its values do not change the cost)
    packed = torch.randn(1, 64 * 64, 64)  # 1024x1024: 128x128 latents of 16 channels, packed 2x2
    previous = packed + 0.01 * torch.randn_like(packed)

    class Sched:
        sigmas, step_index = torch.tensor([1.0, 0.6, 0.3, 0.0]), 2

    def one(encode: bool) -> float:
        started = time.perf_counter()
        estimate = previewer.estimate(packed, previous, Sched())
        image = previewer.render(estimate, (1024, 1024), [(1024, 1024)])[0]
        if encode:
            image.save(io.BytesIO(), format="PNG")
        return time.perf_counter() - started

    for encode in (False, True):
        one(encode)
        t = statistics.median(one(encode) for _ in range(args.reps))
        what = "estimate + map + resize + PNG encode" if encode else "estimate + map + resize to 1024x1024"
        print(f"  real-size latents: {what}: {t * 1000:.1f} ms per preview")


# ----- GPU: real-size speed -----


def build_real_size_pipeline(
    device: str, dtype, transformer_kwargs: dict | None = None, vae_kwargs: dict | None = None
):
    """QwenImagePipeline with random real-size transformer and VAE, no text encoder."""
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    previous = torch.get_default_dtype()
    # Create parameters directly in bf16 on the GPU: 20B parameters in fp32 would need 80 GB.
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            transformer = QwenImageTransformer2DModel(**(transformer_kwargs or {})).eval()
            vae = AutoencoderKLQwenImage(**(vae_kwargs or {})).eval()
    finally:
        torch.set_default_dtype(previous)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_real_size(
    pipe, size: int, batch: int, steps: int, cfg: float, text_tokens: int, device: str
) -> float:
    """One timed pipeline call with random prompt embeddings; returns seconds."""
    import torch

    width = pipe.transformer.config.joint_attention_dim  # 3584 = Qwen2.5-VL-7B's hidden size
    dtype = pipe.transformer.dtype

    def embeds():
        values = torch.randn(batch, text_tokens, width, device=device, dtype=dtype)
        return values, torch.ones(batch, text_tokens, device=device, dtype=torch.long)

    prompt_embeds, prompt_mask = embeds()
    extra = {}
    if cfg > 1:
        negative, negative_mask = embeds()
        extra = {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask}
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    pipe(
        prompt_embeds=prompt_embeds,
        prompt_embeds_mask=prompt_mask,
        true_cfg_scale=cfg,
        width=size,
        height=size,
        num_inference_steps=steps,
        generator=generators,
        output_type="pil",
        **extra,
    )
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def bench_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_engine.py --gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine")
    device, dtype = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights")
    started = time.perf_counter()
    pipe = build_real_size_pipeline(device, dtype)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(
        f"built transformer ({params / 1e9:.1f} B params) + VAE in {time.perf_counter() - started:.0f} s; "
        f"weights use {torch.cuda.memory_allocated() / 2**30:.1f} GiB"
    )
    modes = [(50, 4.0), (8, 1.0)]  # the official recipe; Lightning-style 8 steps without CFG
    print(f"{'size':>9} {'steps':>5} {'cfg':>4} {'batch':>5} {'s/call':>8} {'s/image':>8} {'peak GiB':>9}")
    for size in args.sizes:
        for steps, cfg in modes:
            for batch in args.batches:
                try:
                    run_real_size(
                        pipe, size, batch, 2, cfg, args.text_tokens, device
                    )  # warm-up: kernels, allocator
                    torch.cuda.reset_peak_memory_stats()
                    times = [
                        run_real_size(pipe, size, batch, steps, cfg, args.text_tokens, device)
                        for _ in range(args.reps)
                    ]
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{size:>4}x{size:<4} {steps:>5} {cfg:>4} {batch:>5}   out of memory")
                    continue
                seconds = statistics.median(times)
                peak = torch.cuda.max_memory_allocated() / 2**30
                print(
                    f"{size:>4}x{size:<4} {steps:>5} {cfg:>4} {batch:>5} {seconds:8.2f} {seconds / batch:8.2f} "
                    f"{peak:9.1f}",
                    flush=True,
                )
    if args.offload_modes:
        bench_offload(pipe, device, args.offload_size, 50, 4.0, args.reps, args.text_tokens, args.offload_modes)


# ----- offload modes (local_backend.offload.place): GPU rows, CPU smoke -----

# In this order: each mode's hooks are removed before the next, and group offload (last) cannot be
# undone by diffusers' remove_all_hooks.
OFFLOAD_ORDER = ("none", "model", "sequential", "group")


def bench_offload(pipe, device: str, size: int, steps: int, cfg: float, reps: int, text_tokens: int,
                  modes=OFFLOAD_ORDER) -> None:
    """Seconds per image and peak GPU memory for each offload mode, placed by the engine's own loading
    code (local_backend.offload.place) on the same pipeline. On the CPU the engine ignores offload (there
    is no GPU memory to save): the rows then run the same code and say so."""
    import torch

    from local_backend.offload import place

    cuda = torch.device(device).type == "cuda"
    print(f"offload modes at {size}x{size}, {steps} steps, true CFG {cfg:g}, 1 image, median of {reps}; "
          "transformer + VAE only: the text encoder (about 16 GB in bf16, off the GPU while the "
          "transformer runs under model, sequential and group offload) is not in these numbers")
    print(f"{'offload':<11} {'s/image':>8} {'peak GiB':>9} {'resident GiB':>13}  notes")
    for mode in (m for m in OFFLOAD_ORDER if m in modes):
        try:
            _unplace(pipe)
            place(pipe, mode, None, device, lambda stage: None)  # logs "ignored" on the CPU
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                resident = torch.cuda.memory_allocated() / 2**30  # weights left on the GPU between calls
            run_real_size(pipe, size, 1, 2, cfg, text_tokens, device)  # warm-up: kernels, allocator, hooks
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            seconds = statistics.median(
                run_real_size(pipe, size, 1, steps, cfg, text_tokens, device) for _ in range(reps))
        except Exception as e:  # out of memory, an offload mode this install cannot run: the row says so
            if cuda:
                torch.cuda.empty_cache()
            print(f"{mode:<11} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
            continue
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:9.1f}" if cuda else f"{'-':>9}"
        held = f"{resident:13.1f}" if cuda else f"{'-':>13}"
        notes = "ignored on the CPU: served as none, as the engine does" if not cuda and mode != "none" else ""
        print(f"{mode:<11} {seconds:8.2f} {peak} {held}  {notes}", flush=True)


def _unplace(pipe) -> None:
    """Remove the previous mode's model or sequential offload hooks (accelerate puts the weights back on
    the CPU); the next place() moves them where its mode wants them."""
    pipe.remove_all_hooks()


# ----- the speed options (local_backend.accel): GPU table, CPU smoke -----

OPTION_TIERS = [("base", 50, 4.0), ("lightning-8", 8, 1.0)]  # (tier, steps, true CFG)
OPTIONS = ["plain", "compile", "cache-regular", "cache-high", "fp8", "together"]


def _options_call(pipe, size: int, steps: int, cfg: float, text_tokens: int, device: str, accel, level: str):
    """One pipeline call with fixed random prompt embeddings and seed: (seconds, image as an array)."""
    import numpy as np
    import torch

    width = pipe.transformer.config.joint_attention_dim
    dtype = pipe.transformer.dtype
    noise = torch.Generator("cpu").manual_seed(1234)

    def embeds():
        values = torch.randn(1, text_tokens, width, generator=noise).to(device=device, dtype=dtype)
        return values, torch.ones(1, text_tokens, device=device, dtype=torch.long)

    prompt_embeds, prompt_mask = embeds()
    negative, negative_mask = embeds()
    extra = {"negative_prompt_embeds": negative, "negative_prompt_embeds_mask": negative_mask} if cfg > 1 else {}
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    with accel.call(level, steps, cfg > 1):
        image = pipe(prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_mask, true_cfg_scale=cfg,
                     width=size, height=size, num_inference_steps=steps,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="pil", **extra).images[0]
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, np.asarray(image).astype(np.int16)


def _quantize_fp8(transformer, layers: int) -> list[str]:
    """float8 weight-only on the transformer in place, with the engine's skip list (accel_options.quant_skip)."""
    import torch
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    from local_backend import EngineConfig
    from local_backend.accel_options import quant_skip, skipped

    skip = quant_skip(EngineConfig(quantization="float8wo"), layers)
    quantize_(transformer, Float8WeightOnlyConfig(),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and not skipped(name, skip))
    return skip


def bench_options(pipe, device: str, size: int, reps: int, text_tokens: int, levels: dict | None = None) -> None:
    """The table: tier x option -> s/image, peak GPU memory, difference from plain bf16 at the same seed."""
    import statistics

    import torch

    from local_backend import EngineConfig
    from local_backend.accel import Accel

    cuda = device.startswith("cuda")
    cache = levels if levels is not None else True
    layers = len(pipe.transformer.transformer_blocks)
    print(f"{'tier':<12} {'option':<14} {'s/image':>8} {'peak GiB':>9} {'diff mean':>10} {'diff max':>9}  notes")
    reference: dict[str, object] = {}
    quantized = False
    for option in OPTIONS:
        if option in ("fp8", "together") and not quantized:
            skip = _quantize_fp8(pipe.transformer, layers)
            quantized = True
            print(f"  (fp8: float8 weight-only, kept in bf16: {', '.join(skip)})")
        compile_on = option in ("compile", "together")
        config = EngineConfig(compile=compile_on, cache=cache if option.startswith("cache") or option == "together"
                              else None)
        accel = Accel(config)
        torch._dynamo.reset()
        accel.prepare(pipe, device, lambda stage: None)
        level = {"cache-regular": "regular", "cache-high": "high", "together": "high"}.get(option, "none")
        notes = "; ".join(accel.warnings)
        for tier, steps, cfg in OPTION_TIERS:
            try:
                _options_call(pipe, size, 2, cfg, text_tokens, device, accel, level)  # warm-up (compiles)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                runs = [_options_call(pipe, size, steps, cfg, text_tokens, device, accel, level) for _ in range(reps)]
            except Exception as e:  # out of memory, a failing option: the row says so
                if cuda:
                    torch.cuda.empty_cache()
                print(f"{tier:<12} {option:<14} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            seconds = statistics.median(t for t, _ in runs)
            image = runs[-1][1]
            if option == "plain":
                reference[tier] = image
            ref = reference.get(tier)
            delta = "" if ref is None else f"{abs(image - ref).mean():10.2f} {int(abs(image - ref).max()):9d}"
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:9.1f}" if cuda else f"{'-':>9}"
            print(f"{tier:<12} {option:<14} {seconds:8.2f} {peak} {delta or f'{0:10.2f} {0:9d}'}  {notes}",
                  flush=True)
        _release(pipe, accel)


def _release(pipe, accel) -> None:
    """Undo an option set's compile and cache before the next one (the same weights are reused)."""
    if accel.compiled:
        accel._uncompile()
    if accel.levels:
        import cache_dit

        accel._restore_forward()
        cache_dit.disable_cache(pipe.transformer)


def bench_options_gpu(args) -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_engine.py --gpu --options needs a CUDA GPU: torch.cuda.is_available() is False here "
                 "(try --cpu-smoke for the code path on the tiny model)")
    device, dtype = "cuda", torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights, "
          f"{args.size}x{args.size}, 1 image, median of {args.reps}")
    pipe = build_real_size_pipeline(device, dtype)
    bench_options(pipe, device, args.size, args.reps, args.text_tokens)


def bench_cpu_smoke(args) -> None:
    """The options table on the tiny model, on the CPU: exercises the code path (numbers mean little)."""
    import torch

    from local_backend.tiny import tiny_pipeline_dir

    torch.set_num_threads(max(1, args.threads or 1))
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(tiny_pipeline_dir()), dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    global OPTION_TIERS
    OPTION_TIERS = [("base", 8, 4.0), ("lightning-8", 4, 1.0)]  # few steps: a smoke run
    levels = {"regular": {"Fn_compute_blocks": 1, "residual_diff_threshold": 0.45, "max_warmup_steps": 2},
              "high": {"Fn_compute_blocks": 1, "residual_diff_threshold": 1.0, "max_warmup_steps": 1}}
    print(f"tiny model, CPU, bf16, {args.size}x{args.size}, 1 image, median of {args.reps} (code path only)")
    if args.offload_modes:  # first: the options table below quantizes the pipeline in place
        bench_offload(pipe, "cpu", args.size, 8, 4.0, args.reps, 8, args.offload_modes)
    bench_options(pipe, "cpu", args.size, args.reps, 8, levels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="real-size speed on a CUDA GPU")
    parser.add_argument("--partials", action="store_true", help="CPU: the cost of partial images")
    parser.add_argument("--size", type=int, default=256, help="CPU mode: image side")
    parser.add_argument("--steps", type=int, default=8, help="CPU mode: denoising steps")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (CPU 9, GPU 1)")
    parser.add_argument("--threads", type=int, default=0, help="CPU mode: torch threads (0 = torch default)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 1328], help="GPU mode: image sides")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="GPU mode: images per call")
    parser.add_argument("--text-tokens", type=int, default=128, help="GPU mode: prompt length in tokens")
    parser.add_argument("--options", action="store_true", help="with --gpu: the speed options table")
    parser.add_argument("--cpu-smoke", action="store_true", help="the speed options table on the tiny model (CPU)")
    parser.add_argument("--offload-modes", nargs="*", default=list(OFFLOAD_ORDER), choices=OFFLOAD_ORDER,
                        metavar="MODE",
                        help="--gpu and --cpu-smoke: the offload rows to run (none model sequential group; "
                             "none given: no offload rows)")
    parser.add_argument("--offload-size", type=int, default=1024, help="--gpu: the offload rows' image side")
    parser.add_argument("--models", action="store_true",
                        help="2.1, GGUF Q8_0/Q4_K and offload: auto rows (with --gpu: real size; else tiny, CPU)")
    parser.add_argument("--gpu-memory", default="24GiB", help="--models: what offload: auto may plan with")
    parser.add_argument("--gguf-dir", help="--models: where the GGUF files go (default: a temp folder; 20B: ~34 GB)")
    args = parser.parse_args(argv)
    if args.models:
        from bench.bench_models import bench_models

        args.reps = args.reps or (1 if args.gpu else 3)
        bench_models(args, gpu=args.gpu)
    elif args.cpu_smoke:
        args.reps = args.reps or 3
        args.size = 64 if args.size == 256 else args.size
        bench_cpu_smoke(args)
    elif args.gpu and args.options:
        args.reps = args.reps or 3
        args.size = 1024 if args.size == 256 else args.size
        bench_options_gpu(args)
    elif args.gpu:
        args.reps = args.reps or 1
        bench_gpu(args)
    elif args.partials:
        args.reps = args.reps or 9
        bench_partials(args)
    else:
        args.reps = args.reps or 9
        bench_overhead(args)


if __name__ == "__main__":
    main()
