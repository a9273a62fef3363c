"""Replicate's pure converters: ImageRequest -> a prediction's `input` for qwen/qwen-image and the Qwen
edit models, a finished prediction -> images, Replicate's errors -> ours, model names and prediction
URLs. No network here: ReplicateProvider (replicate.py) is the thin I/O around them.

Replicate picks the pixel size from an aspect ratio; the proxy crops / resizes its image to the resolved
size afterwards (output.py).

Edits (a request with input images) go to the route's model, an edit model such as
qwen/qwen-image-edit-plus, with the images as data URIs in `image` (a list; qwen/qwen-image-edit takes a
single one) and `aspect_ratio: match_input_image`, or the ratio nearest the resolved size when the client
asked for a size. Replicate takes data URIs for file inputs; very large images would be better uploaded
through its Files API first (not done here). No mask: Replicate's Qwen edit models take none.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from ..errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    clip,
)
from ..request import SEED_MAX, ImageRequest
from .base import GeneratedImage
from .extras import VENDOR_FIELDS, extras_for
from .vendor import origin_of

# The ratios qwen/qwen-image takes; the vendor chooses the pixels for each.
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")

# The proxy's output formats by Replicate's names. gif and avif are made by the proxy from a lossless png.
_FORMATS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_LOSSY = {"jpg", "webp"}

# Extras a client may send by their Replicate names: the Replicate-only fields, plus documented inputs of
# qwen/qwen-image (img2img) and qwen/qwen-image-edit-plus that have no proxy field. Anything else is
# not sent: Replicate validates inputs against the model's schema.
NATIVE_EXTRAS = VENDOR_FIELDS["replicate"] | {"guidance", "enhance_prompt", "image", "strength"}

# What an edit model (qwen/qwen-image-edit-plus, qwen/qwen-image-edit) takes besides prompt, image,
# aspect_ratio, seed and output_format: the extras a client may send by their Replicate names.
EDIT_EXTRAS = frozenset({"go_fast", "disable_safety_checker", "output_quality"})
# Edit models that take one image as a string; the others take a list.
SINGLE_IMAGE_MODELS = frozenset({"qwen/qwen-image-edit"})
MATCH_INPUT = "match_input_image"
# Extras' types: multipart forms (how edits usually arrive) carry every value as text.
_BOOL_EXTRAS = frozenset({"go_fast", "disable_safety_checker", "enhance_prompt"})
_INT_EXTRAS = frozenset({"output_quality"})
_FLOAT_EXTRAS = frozenset({"guidance", "lora_scale", "strength"})

# Replicate's input name -> the proxy field it came from (for `param` in error messages).
_PROXY_FIELD = {
    "guidance": "cfg_scale",
    "enhance_prompt": "prompt_enhancement",
    "output_quality": "output_compression",
    "lora_weights": "loras",
    "lora_scale": "loras",
    "extra_lora_weights": "loras",
    "extra_lora_scale": "loras",
    "image": "image",
}

PENDING = frozenset({"starting", "processing"})
TERMINAL = frozenset({"succeeded", "failed", "canceled", "aborted"})

_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_SEED_LOG = re.compile(r"Using seed:\s*(\d{1,20})")
# A tqdm progress bar as cog models print it while denoising: " 40%|####      | 20/50 [00:04<00:06, ...]".
_STEPS_LOG = re.compile(r"\d{1,3}%\|[^|\n\r]{0,200}\|\s*(\d{1,6})/(\d{1,6})")
# The end of the logs that is searched for the latest bar (logs grow with every poll).
_STEPS_TAIL = 4096
_THROTTLE_WAIT = re.compile(r"available in (\d+(?:\.\d+)?) seconds?")
_INPUT_FIELD = re.compile(r"\binput\.([A-Za-z_][A-Za-z0-9_]*)")


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The allowed ratio closest to width:height on a log scale (so 2:1 and 1:2 are equally far from 1:1)."""
    target = math.log(width / height)

    def distance(ratio: str) -> float:
        w, h = ratio.split(":")
        return abs(math.log(int(w) / int(h)) - target)

    return min(ASPECT_RATIOS, key=distance)


def native_format(output_format: str | None) -> str | None:
    """Replicate's output_format for the client's (None: the vendor's default, webp)."""
    if output_format is None:
        return None
    return _FORMATS.get(output_format, "png")


def _coerce(name: str, value: Any) -> Any:
    """A Replicate extra as its input type where it came as text from a form; else as it is."""
    if not isinstance(value, str):
        return value
    if name in _BOOL_EXTRAS and value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        if name in _INT_EXTRAS:
            return int(value)
        if name in _FLOAT_EXTRAS:
            return float(value)
    except ValueError:
        pass  # Replicate names the field in its 422
    return value


def _extras(req: ImageRequest, allowed: frozenset[str]) -> dict[str, Any]:
    return {k: _coerce(k, v) for k, v in extras_for("replicate", req.extra).items() if k in allowed}


def _output(req: ImageRequest, body: dict[str, Any]) -> None:
    fmt = native_format(req.output_format)
    if fmt is not None:
        body["output_format"] = fmt
    # Without output_format Replicate makes webp, which is lossy too.
    if req.output_compression is not None and (fmt is None or fmt in _LOSSY):
        body["output_quality"] = req.output_compression


def client_sized(req: ImageRequest) -> bool:
    """Whether the client asked for a size (else an edit's size follows its first image)."""
    return (req.size is not None and req.size.strip().lower() not in ("", "auto")) \
        or req.aspect_ratio is not None or req.resolution is not None


def to_native_edit(req: ImageRequest, model: str) -> dict[str, Any]:
    """An edit ImageRequest -> the `input` of a Replicate Qwen edit model (CPU: base64 of the images).

    Edit models take prompt, image, aspect_ratio, seed, output_format, output_quality, go_fast and
    disable_safety_checker only: negative_prompt, cfg_scale, num_inference_steps, prompt_enhancement and
    loras are not sent. A single-image model given several images: UpstreamRefused (the next route).
    """
    single = model.partition(":")[0] in SINGLE_IMAGE_MODELS
    if single and len(req.images) > 1:
        raise UpstreamRefused(f"the Replicate model '{model}' takes one input image; this edit has "
                              f"{len(req.images)}")
    body = _extras(req, EDIT_EXTRAS)
    uris = [image.data_uri() for image in req.images]
    body.update(prompt=req.prompt, image=uris[0] if single else uris,
                aspect_ratio=nearest_aspect_ratio(req.width, req.height) if client_sized(req) else MATCH_INPUT)
    if req.seed is not None:
        body["seed"] = req.seed
    _output(req, body)
    return body


def to_native(req: ImageRequest) -> dict[str, Any]:
    """ImageRequest -> the prediction's `input` object for qwen/qwen-image."""
    body = _extras(req, NATIVE_EXTRAS)
    body["prompt"] = req.prompt
    body["aspect_ratio"] = nearest_aspect_ratio(req.width, req.height)
    if req.negative_prompt is not None:
        body["negative_prompt"] = req.negative_prompt
    if req.seed is not None:
        body["seed"] = req.seed
    if req.num_inference_steps is not None:
        body["num_inference_steps"] = req.num_inference_steps
    if req.cfg_scale is not None:
        body["guidance"] = req.cfg_scale
    if req.prompt_enhancement is not None:
        body["enhance_prompt"] = req.prompt_enhancement == "on"
    _output(req, body)
    if req.loras:
        first, *rest = req.loras
        body["lora_weights"] = first.path  # Replicate wants URLs: the path goes as the client gave it
        body["lora_scale"] = first.scale
        for key in ("extra_lora_weights", "extra_lora_scale"):
            body.pop(key, None)
        if rest:
            body["extra_lora_weights"] = [lora.path for lora in rest]
            body["extra_lora_scale"] = [lora.scale for lora in rest]
    return body


def compression_applied(req: ImageRequest, native_input: dict[str, Any]) -> bool:
    """Whether Replicate encodes with the client's output_compression itself."""
    return req.output_compression is not None and native_input.get("output_quality") == req.output_compression


def seed_from_logs(logs: Any) -> int | None:
    """The seed a prediction's logs name ("Using seed: 1234"); the last one if several."""
    if not isinstance(logs, str):
        return None
    found = _SEED_LOG.findall(logs)
    if not found:
        return None
    seed = int(found[-1])
    return seed if 0 <= seed <= SEED_MAX else None


def steps_from_logs(logs: Any) -> tuple[int, int] | None:
    """(steps done, steps in all) from the latest progress bar in a prediction's logs; None without one."""
    if not isinstance(logs, str):
        return None
    found = _STEPS_LOG.findall(logs[-_STEPS_TAIL:])
    if not found:
        return None
    done, total = int(found[-1][0]), int(found[-1][1])
    return (done, total) if 0 <= done <= total and total > 0 else None


def short_text(value: Any) -> str:
    return clip(value if isinstance(value, str) else json.dumps(value, default=str))


def failure_error(prediction: dict[str, Any]) -> ProxyError:
    """The error for a prediction that ended without output (all retryable: they may fall back)."""
    status = prediction.get("status")
    reason = short_text(prediction["error"]) if prediction.get("error") else ""
    if status == "failed":
        return UpstreamError(f"the prediction failed: {reason or 'no reason given'}")
    if status == "canceled":
        return UpstreamError("the prediction was canceled upstream" + (f": {reason}" if reason else ""))
    if status == "aborted":
        return UpstreamTimeout("the prediction was aborted upstream before it started (its deadline passed)")
    return UpstreamError(f"the prediction ended with status {short_text(status)}")


def from_native(prediction: Any, req: ImageRequest, compression_sent: bool = False) -> list[GeneratedImage]:
    """A finished prediction -> its images (URLs the proxy downloads), with the seed the logs name."""
    if not isinstance(prediction, dict):
        raise UpstreamError("the upstream answered with something that is not a prediction")
    if prediction.get("status") != "succeeded":
        raise failure_error(prediction)
    output = prediction.get("output")
    items = [output] if isinstance(output, str) else output if isinstance(output, list) else []
    urls = [u for u in items if isinstance(u, str) and u]
    if not urls:
        raise UpstreamError("the prediction succeeded without an image URL in its output")
    seed = seed_from_logs(prediction.get("logs"))
    if seed is None:
        seed = req.seed
    # One call makes req.n images (1): more outputs than asked would be mistaken for the next seeds.
    return [GeneratedImage(url=url, seed=seed if i == 0 else None, compression_applied=compression_sent)
            for i, url in enumerate(urls[: req.n])]


def _problem(payload: Any) -> tuple[str, str | None]:
    """An RFC 7807 problem's words and the input field it names (Replicate's name), if any."""
    if not isinstance(payload, dict):
        return "", None
    detail, title = payload.get("detail"), payload.get("title")
    words = short_text(detail) if detail else (short_text(title) if title else "")
    field = None
    invalid = payload.get("invalid_fields")
    if isinstance(invalid, list) and invalid and isinstance(invalid[0], dict):
        name = invalid[0].get("field")
        if isinstance(name, str) and name:
            field = name.removeprefix("input.")
        if not detail and invalid[0].get("description"):
            words = short_text(invalid[0]["description"])
    if field is None and isinstance(detail, str):
        m = _INPUT_FIELD.search(detail)
        field = m.group(1) if m else None
    return words, field


def error_from_status(status: int, payload: Any, retry_after: float | None,
                      req: ImageRequest | None = None) -> ProxyError:
    """Map a Replicate HTTP error (RFC 7807 problem JSON) to ours."""
    words, field = _problem(payload)
    detail = f"HTTP {status}" + (f": {words}" if words else "")
    if status in (400, 422):
        param = field
        if field in _PROXY_FIELD and (req is None or field not in req.extra):
            param = _PROXY_FIELD[field]
        return InvalidRequest(f"The upstream rejected the request ({detail})", param=param)
    if status == 429:
        if retry_after is None and words:
            m = _THROTTLE_WAIT.search(words)
            retry_after = float(m.group(1)) if m else None
        return RateLimited(f"rate limited by the upstream ({detail})", retry_after=retry_after)
    if status in (401, 403):
        return UpstreamRefused(f"upstream authentication failed ({detail}); check the provider's api_key")
    if status in (402, 404, 409):
        return UpstreamRefused(f"upstream error ({detail})")
    if status == 503:
        return UpstreamUnavailable(f"upstream unavailable ({detail})", retry_after=retry_after)
    if status in (408, 504):
        return UpstreamTimeout(f"upstream timeout ({detail})")
    return UpstreamError(f"upstream error ({detail})", retry_after=retry_after)


def prediction_url(prediction: dict[str, Any], kind: str, base_url: str) -> str:
    """Where to GET (kind "get") or cancel (kind "cancel") a prediction: its own `urls` entry when that is
    on base_url's origin (the API token goes with it), else built from its id."""
    urls = prediction.get("urls")
    given = urls.get(kind) if isinstance(urls, dict) else None
    if isinstance(given, str) and given and origin_of(given) is not None and origin_of(given) == origin_of(base_url):
        return given
    pid = prediction.get("id")
    if not isinstance(pid, str) or not _ID.fullmatch(pid):
        raise UpstreamError("the upstream answered without a usable prediction id")
    return f"{base_url}/predictions/{pid}" + ("/cancel" if kind == "cancel" else "")


def split_model(model: str) -> tuple[str, str, str | None]:
    """`owner/name` or `owner/name:version` -> (owner, name, version)."""
    ref, colon, version = model.partition(":")
    owner, _, name = ref.partition("/")
    if not (_ID.fullmatch(owner) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name)
            and (not colon or re.fullmatch(r"[A-Za-z0-9]+", version))):
        raise UpstreamRefused(
            f"the route's model '{model}' is not a Replicate model name: set it to owner/name "
            f"(e.g. qwen/qwen-image) or owner/name:version")
    return owner, name, version or None
