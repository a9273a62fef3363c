"""GGUF transformers (`transformer: <file>.gguf`): finding the file, checking it against the model and this
machine before anything loads, and loading it with diffusers' single-file loader.

diffusers keeps a GGUF transformer's quantized weights packed (uint8 blocks) and dequantizes each layer
in its forward pass (GGUFQuantizationConfig's compute dtype: bfloat16 on a GPU, float32 on the CPU);
tensors stored as F32/F16/BF16 are plain parameters. The rest of the pipeline comes from `model`.

The checks read the file's header only (gguf.GGUFReader maps the file, nothing is copied) and build the
model's transformer on the meta device (no memory), so `check-config` can say in one line what is wrong:
not a GGUF file, a quantization type this diffusers cannot dequantize, or tensors that do not match the
model (names after diffusers' own key conversion for the class, and shapes).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .errors import EngineError

MAGIC = b"GGUF"
PLAIN_TYPES = ("F32", "F16", "BF16")  # stored unquantized: loaded as ordinary parameters


def gguf_file(spec: str, local_only: bool) -> str:
    """The local path of `transformer:` — a file, or "owner/repo/path/in/repo.gguf" from the Hugging Face cache
    (downloaded only when local_files_only is false)."""
    path = Path(os.path.expanduser(spec))
    if path.is_file() or path.is_absolute() or spec.startswith((".", "~")) or spec.count("/") < 2:
        if not path.is_file():
            raise EngineError(f"transformer: {spec} does not exist")
        return str(path)
    from huggingface_hub import hf_hub_download

    owner, name, filename = spec.split("/", 2)
    try:
        return hf_hub_download(f"{owner}/{name}", filename, local_files_only=local_only)
    except Exception as e:
        where = " in the Hugging Face cache" if local_only else ""
        raise EngineError(f"transformer: {spec} is not a file, nor found{where} ({type(e).__name__})") from None


def transformer_config(source: str, local_only: bool) -> dict:
    """The model's transformer/config.json (a pipeline folder, or a repo in the Hugging Face cache)."""
    if Path(source).is_dir():
        path = Path(source) / "transformer" / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(source, "transformer/config.json", local_files_only=local_only))
        except Exception as e:
            raise EngineError(f"cannot read {source}'s transformer/config.json ({type(e).__name__})") from None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read {path}: {e}") from None


def supported_types() -> set[str]:
    """The GGML types diffusers can dequantize here (beyond the plain float types)."""
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return {t.name for t in SUPPORTED_GGUF_QUANT_TYPES} | set(PLAIN_TYPES)


def check_gguf(path: str, label: str, model_config: dict) -> dict[str, int]:
    """Raise EngineError (one line) unless `path` is a GGUF file whose tensors this machine can dequantize
    and that match the transformer `model_config` describes. Returns {GGML type name: tensor count}."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != MAGIC:
        raise EngineError(f"transformer: {label} is not a GGUF file (it starts with {head!r}, not b'GGUF')")
    if importlib.util.find_spec("gguf") is None:
        raise EngineError("transformer: a .gguf file needs the gguf package (pip install gguf)")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:
        raise EngineError(f"transformer: {label} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    counts: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        shapes[tensor.name] = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest first
    unknown = sorted(set(counts) - supported_types())
    if unknown:
        raise EngineError(
            f"transformer: {label} uses {', '.join(unknown)}, which this diffusers cannot dequantize "
            f"(it can: {', '.join(sorted(supported_types() - set(PLAIN_TYPES)))})"
        )
    _check_tensors(shapes, label, model_config)
    return counts


def _check_tensors(found: dict[str, tuple[int, ...]], label: str, model_config: dict) -> None:
    """The file's tensors (after diffusers' key conversion for this class) against the model's, on meta."""
    import diffusers
    import torch
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    class_name = model_config.get("_class_name", "QwenImageTransformer2DModel")
    cls = getattr(diffusers, class_name)
    options = {k: v for k, v in model_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = cls.from_config(options)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mapping = SINGLE_FILE_LOADABLE_CLASSES.get(class_name, {}).get("checkpoint_mapping_fn")
    checkpoint = {name: torch.empty(shape, device="meta") for name, shape in found.items()}
    if mapping is not None:
        try:
            checkpoint = mapping(checkpoint=checkpoint, config=options)
        except Exception as e:  # a file of another family: its keys break the conversion
            raise EngineError(f"transformer: {label} does not match {class_name} ({type(e).__name__}: {e})") from None
    got = {name: tuple(t.shape) for name, t in checkpoint.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    reshaped = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or extra or reshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if reshaped:
            n = reshaped[0]
            parts.append(f"{len(reshaped)} of another shape (e.g. {n}: {got[n]} in the file, {expected[n]} in the model)")
        raise EngineError(f"transformer: {label} does not match the model's {class_name}: {'; '.join(parts)}")


def load_transformer(path: str, source: str, model_config: dict, dtype: torch.dtype,
                     local_only: bool) -> Any:  # a diffusers transformer
    """The GGUF transformer, its config from the model (`source`), computing in `dtype`."""
    import diffusers
    from diffusers import GGUFQuantizationConfig

    cls = getattr(diffusers, model_config.get("_class_name", "QwenImageTransformer2DModel"))
    hub = {} if Path(source).is_dir() else {"local_files_only": local_only}
    return cls.from_single_file(
        path, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), config=source,
        subfolder="transformer", torch_dtype=dtype, **hub,
    )
