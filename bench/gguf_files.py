"""GGUF files from a transformer's state dict, for the GPU bench (the real-size 20B transformer with random
weights) and the tests (the tiny ones): 2-D weights quantized where their rows fit the type's block size,
the rest kept F32, as city96's Qwen-Image GGUF files keep small and odd-shaped tensors.

The gguf package quantizes Q8_0, Q5_0, Q5_1, Q4_0 and Q4_1 itself but not the K-quants; Q4_K is written
here (quantize_q4_k) in llama.cpp's block layout and checked against gguf's own dequantizer. Its scales
come from each 32-value sub-block's min and max (llama.cpp searches for better ones: its files are a
little more accurate than these, and exactly as large).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

QK_K = 256  # values per K-quant super-block
Q4_K_BYTES = 144  # d (f16), dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float rows (n, k), k a multiple of 256 -> Q4_K blocks as uint8 (n, k // 256 * 144)."""
    n, k = rows.shape
    x = rows.astype(np.float32).reshape(-1, 8, 32)  # super-blocks x sub-blocks x values
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = x.max(axis=2)
    scale = (hi - lo) / 15.0
    minimum = -lo
    d = scale.max(axis=1) / 63.0
    dmin = minimum.max(axis=1) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.rint(scale / d[:, None]), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin[:, None] > 0, np.rint(minimum / dmin[:, None]), 0).clip(0, 63).astype(np.uint8)
        step = d[:, None] * sc
        offset = dmin[:, None] * m
        q = np.where(step[:, :, None] > 0, np.rint((x + offset[:, :, None]) / step[:, :, None]), 0)
    q = q.clip(0, 15).astype(np.uint8)
    packed = np.zeros((x.shape[0], 12), dtype=np.uint8)  # llama.cpp's get_scale_min_k4, inverted
    packed[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    # 4 chunks of 64 values: sub-block 2i in the low nibbles, 2i+1 in the high ones
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2), packed, qs],
                            axis=1)
    return blocks.reshape(n, k // QK_K * Q4_K_BYTES)


def quantize(array: np.ndarray, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "Q4_K":
        return quantize_q4_k(array)
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType[qtype])


def write_gguf(state: dict, path: str | Path, qtype: str = "Q8_0", plain_types: dict | None = None) -> Path:
    """Write a state dict as a GGUF file, its 2-D weights quantized to `qtype` where their rows fit the
    type's block size. `plain_types` forces a raw GGML type on named tensors ({name: (type, bytes array)}),
    to make files a machine cannot read."""
    import gguf

    path = Path(path)
    kind = gguf.GGMLQuantizationType[qtype]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    writer = gguf.GGUFWriter(str(path), arch="qwen_image")
    for name, tensor in state.items():
        array = tensor.detach().float().cpu().numpy()
        if plain_types and name in plain_types:
            raw_type, data = plain_types[name]
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=raw_type)
        elif array.ndim == 2 and array.shape[-1] % block == 0:
            packed = quantize(array, qtype)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
