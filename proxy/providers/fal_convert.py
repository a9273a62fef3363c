"""fal.ai's pure converters: ImageRequest -> the JSON input of fal's qwen-image and Qwen edit endpoints,
fal's output -> images, fal's errors and request statuses -> ours, and the queue URLs of a request.
No network here: FalProvider (fal.py) is the thin I/O around them.

The status, result and cancel URLs of the submit answer are followed only when they lie on the origin of
`base_url` or on fal's own queue host (the key goes with them); otherwise they are built the way
fal_client builds them: {base_url}/[namespace/]{owner}/{alias}/requests/{id}[/status|/cancel].

Edits (a request with input images) go to the route's model, an edit endpoint, with the images as data
URIs: in `image_urls` (a list: fal-ai/qwen-image-edit-2511, -2509, -plus, qwen-image-2/edit and the
newer ones) or in `image_url` (one image: fal-ai/qwen-image-edit and fal-ai/qwen-image-edit-lora),
chosen by the model id or by the provider's `edit_image_field` option. A single-image endpoint given
several images refuses the route (the next route is tried). fal's Qwen edit endpoints take no mask.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
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
    retry_after_from_headers,
)
from ..request import SEED_MAX, ImageRequest
from .base import GeneratedImage
from .extras import VENDOR_FIELDS, extras_for
from .vendor import origin_of

log = logging.getLogger(__name__)

# fal's own queue host: status/result/cancel URLs there are followed even when base_url is a mirror.
KNOWN_QUEUE_ORIGINS = frozenset({"https://queue.fal.run"})
# Formats fal's qwen-image makes itself; the proxy converts to the others.
NATIVE_FORMATS = frozenset({"png", "jpeg"})
# Input fields of fal's qwen-image the proxy does not model: sent when the request (or the route's
# `params`) carries them. Nothing else from the request's unknown fields reaches fal.
PASSTHROUGH_FIELDS = VENDOR_FIELDS["fal"]
# Input fields of fal's Qwen edit endpoints the proxy does not model (use_turbo is qwen-image's only).
EDIT_PASSTHROUGH_FIELDS = frozenset({"acceleration", "enable_safety_checker", "sync_mode"})
# Edit endpoints that take one image in `image_url`; every other edit endpoint takes `image_urls`.
SINGLE_IMAGE_APPS = frozenset({"fal-ai/qwen-image-edit", "fal-ai/qwen-image-edit-lora"})
EDIT_IMAGE_FIELDS = ("image_url", "image_urls")
# The types of the fal extras: multipart forms (how edits usually arrive) carry every value as text.
_BOOL_EXTRAS = frozenset({"enable_safety_checker", "sync_mode", "use_turbo"})
# fal's field names -> the proxy's, for the `param` of a 422.
PARAM_NAMES = {"guidance_scale": "cfg_scale", "image_size": "size", "num_images": "n", "image_url": "image",
               "image_urls": "image"}
# Namespaces whose app ids have three parts (namespace/owner/alias), as in fal_client.
APP_NAMESPACES = ("workflows", "comfy")
STATES = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
TIMEOUT_ERROR_TYPES = frozenset({"request_timeout", "startup_timeout"})

_MODEL_ID = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+")
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,200}")


def app_id(model: str) -> str:
    """The fal endpoint id of a route's model: 'fal-ai/qwen-image'; a bare name gets fal's 'fal-ai/'."""
    model = model.strip().strip("/")
    if "/" not in model:
        model = f"fal-ai/{model}"
    if not _MODEL_ID.fullmatch(model) or any(part in (".", "..") for part in model.split("/")):
        raise UpstreamRefused(f"'{model[:100]}' is not a fal model id like 'fal-ai/qwen-image'; "
                              "check the route's model")
    return model


def requests_base(base_url: str, model: str) -> str:
    """{base_url}/[namespace/]{owner}/{alias}/requests: where a request's status, result and cancel live
    (an endpoint's sub-path, as in fal-ai/flux/dev, is not part of it)."""
    parts = model.split("/")
    keep = 3 if parts[0] in APP_NAMESPACES and len(parts) >= 3 else 2
    return f"{base_url}/{'/'.join(parts[:keep])}/requests"


def native_format(req: ImageRequest) -> str | None:
    """The output_format to ask fal for: the requested one where fal makes it, else a lossless png the
    proxy converts (also for jpeg with output_compression, which fal does not take: no double loss)."""
    fmt = req.output_format
    if fmt is None:
        return None
    if fmt == "jpeg" and req.output_compression is None:
        return "jpeg"
    return "png"


def _extras(req: ImageRequest, allowed: frozenset[str]) -> dict[str, Any]:
    """The request's fal extras among `allowed`; "true"/"false" text (from a form) read as booleans."""
    out = {}
    for name, value in extras_for("fal", req.extra).items():
        if name not in allowed:
            continue
        if name in _BOOL_EXTRAS and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        out[name] = value
    return out


def _common(req: ImageRequest, body: dict[str, Any]) -> dict[str, Any]:
    body.update(prompt=req.prompt, image_size={"width": req.width, "height": req.height}, num_images=req.n)
    if req.negative_prompt is not None:
        body["negative_prompt"] = req.negative_prompt
    if req.seed is not None:
        body["seed"] = req.seed
    if req.cfg_scale is not None:
        body["guidance_scale"] = req.cfg_scale
    if req.num_inference_steps is not None:
        body["num_inference_steps"] = req.num_inference_steps
    fmt = native_format(req)
    if fmt is not None:
        body["output_format"] = fmt
    return body


def to_native(req: ImageRequest) -> dict[str, Any]:
    """ImageRequest -> the JSON input of fal's qwen-image."""
    body = _common(req, _extras(req, PASSTHROUGH_FIELDS))
    if req.loras:
        body["loras"] = [{"path": lora.path, "scale": lora.scale} for lora in req.loras]
    # prompt_enhancement: fal's qwen-image has no prompt rewriter; quality, style, ...: OpenAI's fields.
    return body


def edit_image_field(model: str, option: str | None = None) -> str:
    """`image_url` or `image_urls`: the provider's `edit_image_field` option, else by the endpoint id
    (fal-ai/qwen-image-edit and its -lora take one image_url; the newer edit endpoints a list)."""
    if option:
        return option
    parts = model.split("/")
    return "image_url" if "/".join(parts[:2]) in SINGLE_IMAGE_APPS else "image_urls"


def takes_loras(model: str) -> bool:
    """Whether an edit endpoint takes `loras`: fal's LoRA variants (fal-ai/qwen-image-edit-2511/lora,
    fal-ai/qwen-image-edit-lora, fal-ai/qwen-image-edit-plus-lora); the plain edit endpoints have none."""
    last = model.rstrip("/").split("/")[-1]
    return last == "lora" or last.endswith("-lora")


def to_native_edit(req: ImageRequest, model: str, image_field: str | None = None) -> dict[str, Any]:
    """An edit ImageRequest -> the JSON input of a fal Qwen edit endpoint: the images as data URIs (CPU:
    base64 of the images; call off the event loop for big ones).

    image_size is the resolved size; prompt_enhancement has no fal equivalent, loras go only to the
    LoRA endpoints (takes_loras). A single-image endpoint given several images: UpstreamRefused.
    """
    field = edit_image_field(model, image_field)
    if field == "image_url" and len(req.images) > 1:
        raise UpstreamRefused(f"the fal endpoint '{model}' takes one input image (image_url); this edit has "
                              f"{len(req.images)}")
    body = _common(req, _extras(req, EDIT_PASSTHROUGH_FIELDS))
    uris = [image.data_uri() for image in req.images]
    body[field] = uris[0] if field == "image_url" else uris
    if req.loras and takes_loras(model):
        body["loras"] = [{"path": lora.path, "scale": lora.scale} for lora in req.loras]
    return body


def from_native(payload: Any, req: ImageRequest) -> list[GeneratedImage]:
    """fal's output -> images. `seed` is the first image's (image i used seed + i); `prompt` becomes the
    revised prompt. An image fal flagged in has_nsfw_concepts is returned as fal made it (black)."""
    items = payload.get("images") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise UpstreamError("fal answered without images")
    seed = payload.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        seed = None
    prompt = payload.get("prompt")
    revised = prompt if isinstance(prompt, str) and prompt else None
    nsfw = payload.get("has_nsfw_concepts")
    if isinstance(nsfw, list) and any(v is True for v in nsfw):
        log.info("fal flagged %d of %d images as NSFW (fal returns them black)",
                 sum(v is True for v in nsfw), len(items))
    images = []
    for i, item in enumerate(items):
        url = item.get("url") if isinstance(item, dict) else None
        if not isinstance(url, str) or not url:
            raise UpstreamError("fal answered with an image that has no url")
        mime = item.get("content_type")
        images.append(GeneratedImage(
            url=url,
            mime=mime if isinstance(mime, str) else None,
            width=_positive_int(item.get("width")),
            height=_positive_int(item.get("height")),
            seed=None if seed is None else (seed + i) % (SEED_MAX + 1),
            revised_prompt=revised,
        ))
    return images


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def describe_detail(payload: Any) -> tuple[str, str | None]:
    """fal's `detail` (a string, or FastAPI's list of {loc, msg, type}) -> (message, the proxy's param)."""
    detail = payload.get("detail") if isinstance(payload, dict) else None
    if detail is None and isinstance(payload, dict):
        detail = payload.get("error") or payload.get("message")
    if isinstance(detail, str):
        return clip(detail), None
    if isinstance(detail, dict):
        detail = [detail]
    if not isinstance(detail, list):
        return "", None
    parts, param = [], None
    for entry in detail[:5]:
        if not isinstance(entry, dict):
            parts.append(str(entry))
            continue
        loc = entry.get("loc")
        loc = [p for p in loc if p != "body"] if isinstance(loc, list) else []
        where = ".".join(str(p) for p in loc)
        msg = str(entry.get("msg") or entry.get("type") or "invalid value")
        parts.append(f"{where}: {msg}" if where else msg)
        if param is None and loc and isinstance(loc[0], str):
            param = PARAM_NAMES.get(loc[0], loc[0])
    return clip("; ".join(parts)), param


def error_from_status(status: int, payload: Any, headers: Any = None) -> ProxyError:
    """Map a fal HTTP error (submit, status, result) to ours: client faults return at once, the rest fall back."""
    headers = headers if headers is not None else {}
    message, param = describe_detail(payload)
    error_type = payload.get("error_type") if isinstance(payload, dict) else None
    error_type = str(error_type or headers.get("X-Fal-Error-Type") or "")
    retryable = str(headers.get("X-Fal-Retryable") or "").strip().lower()
    retry_after = retry_after_from_headers(headers)
    detail = f"HTTP {status}" + (f" {error_type}" if error_type else "") + (f": {message}" if message else "")
    if status in (400, 422):
        return InvalidRequest(f"fal rejected the request ({detail})", param=param)
    if status in (401, 403):
        return UpstreamRefused(f"upstream authentication failed ({detail}); check the fal provider's api_key")
    if status == 402:
        return UpstreamRefused(f"fal refused the request ({detail}); check the account's balance")
    if status == 404:
        return UpstreamRefused(f"fal does not know this endpoint or request ({detail}); check the route's model")
    if status == 429:
        return RateLimited(f"rate limited by fal ({detail})", retry_after=retry_after)
    if status in (408, 504) or error_type in TIMEOUT_ERROR_TYPES:
        return UpstreamTimeout(f"fal timed out ({detail})")
    if retryable == "false":
        return UpstreamRefused(f"fal error, not retryable ({detail})")
    if status == 503:
        return UpstreamUnavailable(f"fal unavailable ({detail})", retry_after=retry_after)
    return UpstreamError(f"fal error ({detail})", retry_after=retry_after)


def failed_request_error(status_payload: Any) -> ProxyError:
    """A COMPLETED status with an `error` whose result did not say more."""
    error = status_payload.get("error") if isinstance(status_payload, dict) else None
    error_type = status_payload.get("error_type") if isinstance(status_payload, dict) else None
    text = clip(str(error)) if error else "no reason given"
    if error_type:
        text = f"{error_type}: {text}"
    if error_type in TIMEOUT_ERROR_TYPES:
        return UpstreamTimeout(f"the fal request timed out ({text})")
    return UpstreamError(f"the fal request failed ({text})")


def poll_state(payload: Any) -> tuple[str, bool]:
    """A status answer -> (IN_QUEUE | IN_PROGRESS | COMPLETED, whether it failed)."""
    state = payload.get("status") if isinstance(payload, dict) else None
    if state not in STATES:
        raise UpstreamError(f"fal answered an unknown request status {str(state)[:40]!r}")
    failed = state == "COMPLETED" and bool(payload.get("error") or payload.get("error_type"))
    return state, failed


@dataclass(frozen=True)
class QueueHandle:
    request_id: str
    status_url: str
    response_url: str
    cancel_url: str


def queue_handle(payload: Any, base_url: str, model: str) -> QueueHandle:
    """The URLs of a submitted request: the answer's where they are on a trusted origin, else built."""
    request_id = payload.get("request_id") if isinstance(payload, dict) else None
    if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
        raise UpstreamError("fal answered the submit without a usable request_id")
    built = f"{requests_base(base_url, model)}/{request_id}"
    trusted = KNOWN_QUEUE_ORIGINS | {origin_of(base_url)}

    def pick(key: str, fallback: str) -> str:
        url = payload.get(key)
        return url if isinstance(url, str) and origin_of(url) in trusted else fallback

    return QueueHandle(request_id, pick("status_url", f"{built}/status"), pick("response_url", built),
                       pick("cancel_url", f"{built}/cancel"))


def edit_json(req: ImageRequest, model: str, image_field: str | None) -> bytes:
    return json.dumps(to_native_edit(req, model, image_field)).encode()
