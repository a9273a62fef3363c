"""Putting a loaded pipeline on its device: the offload mode (or the one `offload: auto` picks from the
memory plan, local_backend.placement), and the text encoder's own device (`text_encoder: {device: cpu}`).

A text encoder on the CPU is kept out of the pipeline's offloading altogether (it is detached while the
offload hooks are installed, so it never passes through the GPU) and wrapped in an accelerate hook that
runs it on the CPU and hands its outputs back on the device its inputs came from: the pipeline's own
code (and prompt enhancement, local_backend.enhance) needs no change.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from .config import EngineConfig
from .errors import EngineError
from .memory import estimate
from .placement import GIB, gib, no_fit_message, parse_bytes, plan
from .single_file import gguf_file

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
TEXT_ENCODER_DEVICES = ("cpu", "cuda")
TEXT_ENCODER_QUANTIZATIONS = ("int8", "nf4", "int8wo")
BNB = ("int8", "nf4", "fp4")


def check_options(config: EngineConfig) -> None:
    """text_encoder, gpu_memory and offload: auto, checked without loading (EngineError names the field)."""
    spec = config.text_encoder
    if spec is not None:
        if not isinstance(spec, dict):
            raise EngineError("text_encoder must be a mapping: {device: cpu | cuda, quantization: ...}")
        unknown = set(spec) - {"device", "quantization"}
        if unknown:
            raise EngineError(f"text_encoder: unknown key(s) {', '.join(sorted(map(str, unknown)))}; known: device, quantization")
        device = spec.get("device")
        if device is not None and device not in TEXT_ENCODER_DEVICES:
            raise EngineError(f"text_encoder.device must be cpu or cuda, not {device!r}")
        quant = spec.get("quantization")
        if quant is not None and quant not in TEXT_ENCODER_QUANTIZATIONS:
            raise EngineError(f"text_encoder.quantization must be one of {', '.join(TEXT_ENCODER_QUANTIZATIONS)}, "
                              f"not {quant!r}")
        if device == "cuda" and (config.device or "").startswith("cpu"):
            # It ran on the CPU with the rest, while /ready said "text_encoder": "cuda".
            raise EngineError("text_encoder.device cuda and device: cpu cannot both apply: this route runs on "
                              "the CPU (drop text_encoder.device, or use device: cuda)")
        if quant in BNB and (device == "cpu" or (config.device or "").startswith("cpu")):
            raise EngineError(f"text_encoder.quantization {quant} (bitsandbytes) runs on a GPU only: on the CPU use int8wo")
        if quant and config.quantization in BNB:
            raise EngineError(f"quantization {config.quantization} already quantizes the text encoder: "
                              "drop text_encoder.quantization, or quantize the transformer another way")
    if config.gpu_memory is not None:
        try:
            parse_bytes(config.gpu_memory)
        except ValueError as e:
            raise EngineError(f"gpu_memory: {e}") from None
    if config.offload == "auto" and (config.device or "").startswith("cpu"):
        raise EngineError("offload: auto plans GPU memory, and this route runs on the CPU: use offload: none "
                          "(or device: cuda)")


def text_encoder_device(config: EngineConfig) -> str | None:
    return (config.text_encoder or {}).get("device")


def choose(config: EngineConfig, source: str, device: str, progress: Progress) -> tuple[str, str | None, dict]:
    """(offload mode, text encoder device, what /ready shows) for the config: its own settings, or the
    fastest placement that fits the GPU's free memory (offload: auto). Raises EngineError when nothing fits."""
    if config.offload != "auto":
        return config.offload, text_encoder_device(config), {"offload": config.offload,
                                                              "text_encoder": text_encoder_device(config) or device}
    import torch

    if not torch.device(device).type == "cuda" or not torch.cuda.is_available():
        raise EngineError("offload: auto needs a CUDA GPU (this route would run on the CPU: use offload: none)")
    progress("planning GPU memory (offload: auto)")
    free, total = torch.cuda.mem_get_info(torch.device(device))
    budget = free if config.gpu_memory is None else min(free, parse_bytes(config.gpu_memory))
    gguf_path = None
    if config.transformer:
        gguf_path = gguf_file(config.transformer, True if config.local_files_only is None else config.local_files_only)
    e = estimate(config, gguf_path=gguf_path, source=source)
    result = plan(e, budget, text_encoder_device(config))
    if result.pick is None:
        raise EngineError(no_fit_message(e, result))
    pick = result.pick
    report = {"offload": pick.offload, "text_encoder": pick.text_encoder, "auto": True,
              "estimated_peak_gib": round(pick.gpu_peak / GIB, 2), "gpu_memory_gib": round(budget / GIB, 2),
              "gpu_total_gib": round(total / GIB, 2)}
    progress(f"offload: auto picked {pick.placement} (estimated peak {gib(pick.gpu_peak)} of {gib(budget)})")
    return pick.offload, pick.text_encoder, report


@contextlib.contextmanager
def _detached(pipe: Any, name: str) -> Iterator[Any]:
    """The pipeline without component `name` for the duration (so offload hooks and .to() skip it)."""
    module = getattr(pipe, name, None)
    setattr(pipe, name, None)
    try:
        yield module
    finally:
        setattr(pipe, name, module)


def place(pipe: Any, offload: str, te_device: str | None, device: str, progress: Progress) -> None:
    """Put the pipeline on `device` with this offload mode; the text encoder on te_device if set."""
    import torch

    if offload != "none" and device == "cpu":
        log.warning("offload=%s has no effect on the CPU; ignored", offload)
        offload = "none"
    if te_device == "cpu" and torch.device(device).type != "cpu" and getattr(pipe, "text_encoder", None) is not None:
        place_with_cpu_encoder(pipe, offload, device, progress)
    else:
        _offload(pipe, offload, device, progress)
    vae = getattr(pipe, "vae", None)
    if torch.device(device).type == "cuda" and vae is not None and hasattr(vae, "enable_slicing"):
        # The VAE decodes a batch one image at a time: its peak (GiBs at 2048x2048) stops growing with
        # the batch, for a negligible cost (local_backend.memory counts one image).
        vae.enable_slicing()


def place_with_cpu_encoder(pipe: Any, offload: str, device: str, progress: Progress) -> None:
    """The offload mode for everything but the text encoder, which stays on the CPU and runs there."""
    with _detached(pipe, "text_encoder") as encoder:
        _offload(pipe, offload, device, progress)
    if offload == "model":
        # diffusers installs model offload's hooks again after every call (maybe_free_model_hooks): keep
        # the text encoder out of them then too, or its next call would move it onto the GPU.
        install = pipe.enable_model_cpu_offload

        def without_text_encoder(*args: Any, **kwargs: Any) -> Any:
            with _detached(pipe, "text_encoder"):
                return install(*args, **kwargs)

        pipe.enable_model_cpu_offload = without_text_encoder
    progress("keeping the text encoder on the CPU")
    run_on_cpu(pipe, encoder)


def run_on_cpu(pipe: Any, encoder: Any) -> None:
    """Run the text encoder on the CPU, its outputs handed back where its inputs came from."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    encoder.to("cpu")
    add_hook_to_module(encoder, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    # The pipeline's execution device must not be read off this hook.
    pipe._exclude_from_cpu_offload = [*pipe._exclude_from_cpu_offload, "text_encoder"]
    encoder.qip_device = "cpu"  # where prompt enhancement puts its inputs (local_backend.enhance)


def _offload(pipe: Any, offload: str, device: str, progress: Progress) -> None:
    import torch

    if offload == "none":
        progress(f"moving the pipeline to {device}")
        pipe.to(device)
    elif offload == "model":
        progress("enabling model CPU offload")
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        progress("enabling sequential CPU offload")
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        progress("enabling group offload")
        # leaf_level + a CUDA stream prefetches the next layer while this one runs: close to
        # no-offload speed at a fraction of the memory (diffusers' own recommendation).
        is_cuda = torch.device(device).type == "cuda"
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=is_cuda,
        )
