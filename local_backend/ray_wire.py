"""The wire format between a pool's callers and its replicas (local_backend.ray_app): pure functions.

It is plain data, so the caller needs neither torch nor ray:

- a request is a dict of GenerationParams fields (params_to_wire): values left at their defaults are
  left out, callbacks never travel, LoRAs are {path, scale}, images and the mask are encoded image
  files (bytes), and `deadline` is a time.time() instant (each replica turns it into its own
  time.monotonic(); keep the clocks in sync, as NTP does);
- a reply (`generate`, and the last item of `generate_stream`) is {"ok": true, "images": [PNG
  bytes], "seeds", "steps_run", "batch_size", "seconds", "replica", "queue_depth"} or {"ok": false,
  "error": {"type", "message", "param", "retry_after"}, ...}, where type is queue_full,
  invalid_params, cancelled, deadline or engine; nothing raises across the wire on purpose;
- `generate_stream` yields {"progress": {"step", "total"}} for each denoising step and {"partial":
  {"image_index", "partial_index", "data": PNG bytes}} previews
  first (when partial_images > 0);
- over HTTP (Serve's ingress, for callers outside the cluster) the same dicts are JSON with the bytes
  in base64: POST <route_prefix> {"params": {...}, "stream": false} answers the reply (status 200, 400,
  429 with Retry-After, 503 or 500); with "stream": true, one JSON object a line (NDJSON).
  GET <route_prefix>/stats answers every replica's counters: {"replicas": {id: stats}}.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import TYPE_CHECKING, Any

from .config import GenerationParams, LoraSpec
from .errors import (
    DeadlineExceededError,
    EngineError,
    InvalidParamsError,
    JobCancelledError,
    QueueFullError,
)

if TYPE_CHECKING:
    from PIL.Image import Image


def encode_png(image: Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _plain(value: Any) -> Any:
    """A GenerationParams value as plain data: dataclasses -> dicts, Pillow images -> PNG bytes."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if hasattr(value, "save") and hasattr(value, "size"):  # a Pillow image
        return encode_png(value)
    return value


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def params_to_wire(params: GenerationParams) -> dict:
    """GenerationParams -> the plain dict a replica takes (pure; the caller's side).

    Every field travels except callbacks (a replica makes its own) and values left at their default.
    `images` and `mask` may be Pillow images or already-encoded image files (bytes, sent as they are).
    `deadline`, a time.monotonic() instant here, becomes a time.time() one.
    """
    wire: dict[str, Any] = {}
    for f in fields(GenerationParams):
        value = getattr(params, f.name)
        if callable(value) or value == _default(f):
            continue
        if f.name == "deadline":
            value = time.time() + (value - time.monotonic())
        wire[f.name] = _plain(value)
    return wire


# The edit pipelines condition on about 1 MP of each input and paste the kept area back at the output
# size: a JPEG is decoded at the smallest scale libjpeg offers (1/2, 1/4, 1/8) that still covers both.
CONDITION_PIXELS = 1024 * 1024


def _cover(size: tuple[int, int], width: int, height: int) -> tuple[int, int]:
    w, h = size
    scale = min(1.0, max(width / w, height / h, math.sqrt(CONDITION_PIXELS / (w * h))))
    return max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale))


def _decode_image(data: object, name: str, out: tuple[int, int] | None = None,
                  sent: dict | None = None) -> Image:
    """An encoded file -> a loaded Pillow image; a JPEG at the scale `out` (the output's width, height)
    needs. `sent`, when given, maps the image's id to the size it was sent at."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        raise InvalidParamsError(f"{name} must be an encoded image file", name)
    try:
        image = Image.open(io.BytesIO(data))
        sent_size = image.size
        if out is not None and image.format == "JPEG" and min(sent_size) > 0:
            image.draft(None, _cover(sent_size, *out))
        image.load()
    except Exception as e:
        raise InvalidParamsError(f"the {name} could not be decoded: {type(e).__name__}", name) from None
    if sent is not None:
        sent[id(image)] = sent_size
    return image


def _decode_inputs(values: dict[str, Any]) -> None:
    """images and mask in `values`, decoded once each; a mask sent at the first image's size stays at the
    size that image was decoded at (one of them may be a JPEG read at a smaller scale)."""
    from PIL import Image

    width, height = values.get("width"), values.get("height")
    out: tuple[int, int] | None = None
    if (isinstance(width, int) and isinstance(height, int) and not isinstance(width, bool)
            and not isinstance(height, bool) and width > 0 and height > 0):
        out = (width, height)
    sent: dict[int, tuple[int, int]] = {}
    for name in ("images", "mask"):
        value = values.get(name)
        if value is not None:
            values[name] = ([_decode_image(v, name, out, sent) for v in value] if isinstance(value, list)
                            else _decode_image(value, name, out, sent))
    images, mask = values.get("images"), values.get("mask")
    if isinstance(images, list) and images and mask is not None:
        first = images[0]
        if sent[id(mask)] == sent[id(first)] and mask.size != first.size:
            values["mask"] = mask.resize(first.size, Image.Resampling.NEAREST)


def params_from_wire(wire: dict, on_partial: Callable[[int, int, Image], None] | None = None) -> GenerationParams:
    """The plain dict -> GenerationParams (the replica's side; InvalidParamsError for what is wrong).

    A field this engine does not know is refused (a caller newer than the pool): it would be ignored
    otherwise. Fields are converted by their declared type, so new plain fields need no code here.
    """
    if not isinstance(wire, dict):
        raise InvalidParamsError("the request must be a mapping of generation parameters")
    known = {f.name: f for f in fields(GenerationParams)}
    unknown = set(wire) - set(known)
    if unknown:
        raise InvalidParamsError(
            f"this pool's engine does not know the parameter(s) {', '.join(sorted(unknown))}", sorted(unknown)[0]
        )
    values: dict[str, Any] = {}
    for name, value in wire.items():
        kind = str(known[name].type)
        if name == "deadline" and value is not None:
            if not isinstance(value, (int, float)):
                raise InvalidParamsError("deadline must be a time.time() instant", "deadline")
            value = time.monotonic() + (float(value) - time.time())
        elif callable(value):
            raise InvalidParamsError(f"{name} cannot be sent to a pool", name)
        elif "LoraSpec" in kind and value is not None:
            try:
                value = [LoraSpec(**v) if isinstance(v, dict) else LoraSpec(v) for v in value]
            except TypeError as e:
                raise InvalidParamsError(f"loras: {e}", "loras") from None
        values[name] = value
    _decode_inputs(values)  # after the loop: the output size decides the scale
    if "prompt" not in values:
        raise InvalidParamsError("prompt is required", "prompt")
    params = GenerationParams(**values)
    params.on_partial = on_partial if params.partial_images else None
    return params


def error_reply(exc: BaseException) -> dict:
    """An engine exception -> the serializable error of a reply."""
    if isinstance(exc, QueueFullError):
        kind = "queue_full"
    elif isinstance(exc, InvalidParamsError):
        kind = "invalid_params"
    elif isinstance(exc, DeadlineExceededError):
        kind = "deadline"
    elif isinstance(exc, JobCancelledError):
        kind = "cancelled"
    else:
        kind = "engine"
    message = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
    return {
        "type": kind,
        "message": message[:1000],
        "param": getattr(exc, "param", None),
        "retry_after": getattr(exc, "retry_after", None),
    }


# Reply error type -> HTTP status on Serve's HTTP ingress.
HTTP_STATUS = {"queue_full": 429, "invalid_params": 400, "cancelled": 503, "deadline": 504, "engine": 500}


def _b64_in(value: object) -> Any:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


def wire_to_json(data: Any) -> Any:
    """bytes -> base64 text, recursively (for JSON)."""
    if isinstance(data, (bytes, bytearray)):
        return base64.b64encode(data).decode("ascii")
    if isinstance(data, dict):
        return {k: wire_to_json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [wire_to_json(v) for v in data]
    return data


def params_from_json(body: dict) -> dict:
    """The HTTP body's params: the wire dict with images and mask in base64."""
    params = dict(body)
    try:
        if isinstance(params.get("images"), list):
            params["images"] = [_b64_in(v) for v in params["images"]]
        if params.get("mask") is not None:
            params["mask"] = _b64_in(params["mask"])
    except (binascii.Error, ValueError):
        raise InvalidParamsError("images and mask must be base64 text", "images") from None
    return params
