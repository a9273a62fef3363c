"""DashScope's pure converters: ImageRequest -> the JSON body of the async (image-synthesis) and sync
(multimodal) endpoints, answers and tasks -> images, DashScope's error codes -> ours, sizes and seeds.
No network here: DashScopeProvider (dashscope.py) is the thin I/O around them.

Edits (a request with input images; the route's model an edit model: qwen-image-edit,
qwen-image-edit-plus, qwen-image-edit-max and their dated versions) always use the sync endpoint, with
content [{"image": <data URI>}, ..., {"text": <prompt>}]. qwen-image-edit takes one image, the -plus and
-max series 1 to 3 (more refuse the route, so the next one is tried) and n up to 6 (set the route's
max_images_per_call: 6). `size` is sent for the -plus / -max series only (their documented custom
resolution, 512 to 2048 px a side) when the resolved size is within it; otherwise DashScope follows the
input (the last image's aspect ratio, about 1024*1024) and the proxy crops. No masks.

Field handling: seed -> parameters.seed, taken modulo 2**31 (DashScope accepts 0..2147483647, the proxy
0..2**32-1; the client still sees its own seed); negative_prompt -> parameters.negative_prompt;
prompt_enhancement on/off -> parameters.prompt_extend true/false; the `watermark` extra ->
parameters.watermark. cfg_scale, num_inference_steps and loras have no DashScope equivalent and are not
sent; other vendors' extras and unknown fields are not sent either. A prompt over 800 characters or a
negative_prompt over 500 is refused (400) before any call.
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
from ..media.sizing import parse_pixels
from ..request import ImageRequest
from .base import GeneratedImage
from .extras import VENDOR_FIELDS, extras_for

KIND = "dashscope"

# qwen-image's sizes: 16:9, 1:1, 9:16, 4:3, 3:4. Newer models also take 1472*1104 / 1104*1472 for 4:3 / 3:4:
# set the provider's `sizes` option for those.
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((1664, 928), (1328, 1328), (928, 1664), (1472, 1140), (1140, 1472))
# Models DashScope documents the async (task) API for; `mode: auto` uses sync for any other.
ASYNC_MODELS = frozenset({"qwen-image", "qwen-image-plus"})

MAX_PROMPT_CHARS = 800
MAX_NEGATIVE_PROMPT_CHARS = 500
SEED_MODULUS = 2**31  # DashScope's seed is 0..2147483647

EDIT_PREFIX = "qwen-image-edit"
# Edit models with a documented custom output size (parameters.size, each side in EDIT_SIDE) and 1..3 images.
EDIT_PLUS_PREFIXES = ("qwen-image-edit-plus", "qwen-image-edit-max")
EDIT_SIDE = (512, 2048)
EDIT_PLUS_MAX_IMAGES = 3

PENDING_STATES = frozenset({"PENDING", "RUNNING"})
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELED", "UNKNOWN"})


def parse_sizes(values: list[str] | tuple[str, ...] | None) -> tuple[tuple[int, int], ...]:
    """The `sizes` option ("W*H" or "WxH" strings) -> pixel pairs; ValueError on a bad entry."""
    if values is None:
        return DEFAULT_SIZES
    sizes = []
    for text in values:
        wh = parse_pixels(str(text))
        if wh is None or min(wh) < 1:
            raise ValueError(f"sizes: '{text}' is not a size like '1328*1328'")
        sizes.append(wh)
    if not sizes:
        raise ValueError("sizes: list at least one size")
    return tuple(sizes)


def native_size(width: int, height: int, sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES) -> tuple[int, int]:
    """The allowed size nearest to width x height: closest aspect ratio (log scale), then pixel count."""
    ratio, pixels = math.log(width / height), math.log(width * height)
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - ratio), 9),
                                     abs(math.log(s[0] * s[1]) - pixels)))


def native_seed(seed: int | None) -> int | None:
    """DashScope's seed for the proxy's: seeds from 2**31 up wrap around (seed % 2**31)."""
    return None if seed is None else seed % SEED_MODULUS


def resolve_mode(mode: str, model: str) -> str:
    if mode in ("sync", "async"):
        return mode
    return "async" if model in ASYNC_MODELS else "sync"


def _bool_extra(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):  # multipart forms send text
        return value.lower() == "true"
    raise InvalidRequest(f"Invalid '{name}': must be a boolean (true or false).", param=name)


def check_limits(req: ImageRequest) -> None:
    """DashScope's input limits, checked before any call so the client learns which field is too long."""
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            f"Invalid 'prompt': DashScope accepts at most {MAX_PROMPT_CHARS} characters; this one has "
            f"{len(req.prompt)}.", param="prompt", code="string_above_max_length")
    if req.negative_prompt is not None and len(req.negative_prompt) > MAX_NEGATIVE_PROMPT_CHARS:
        raise InvalidRequest(
            f"Invalid 'negative_prompt': DashScope accepts at most {MAX_NEGATIVE_PROMPT_CHARS} characters; "
            f"this one has {len(req.negative_prompt)}.", param="negative_prompt", code="string_above_max_length")


def native_parameters(req: ImageRequest, sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES) -> dict[str, Any]:
    """The `parameters` object both endpoints take."""
    width, height = native_size(req.width, req.height, sizes)
    return {"size": f"{width}*{height}", **_parameters(req)}


def _parameters(req: ImageRequest) -> dict[str, Any]:
    """`parameters` without the size: n, negative_prompt, prompt_extend, seed and the watermark extra."""
    params: dict[str, Any] = {"n": req.n}
    if req.negative_prompt is not None:
        params["negative_prompt"] = req.negative_prompt
    if req.prompt_enhancement is not None:
        params["prompt_extend"] = req.prompt_enhancement == "on"
    if req.seed is not None:
        params["seed"] = native_seed(req.seed)
    # Only Alibaba's own extras; other vendors' fields and unknown ones are not sent.
    for name, value in extras_for(KIND, req.extra).items():
        if name in VENDOR_FIELDS[KIND]:
            params[name] = _bool_extra(name, value)
    return params


def to_native(req: ImageRequest, model: str, *, mode: str = "async",
              sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES) -> dict[str, Any]:
    """ImageRequest -> the JSON body for the async (image-synthesis) or sync (multimodal) endpoint."""
    check_limits(req)
    params = native_parameters(req, sizes)
    if mode == "sync":
        content = [{"text": req.prompt}]
        return {"model": model, "input": {"messages": [{"role": "user", "content": content}]}, "parameters": params}
    return {"model": model, "input": {"prompt": req.prompt}, "parameters": params}


def is_edit_plus(model: str) -> bool:
    return model.startswith(EDIT_PLUS_PREFIXES)


def edit_max_images(model: str) -> int | None:
    """How many input images an edit model takes (None: not known here; DashScope decides)."""
    if is_edit_plus(model):
        return EDIT_PLUS_MAX_IMAGES
    if model == EDIT_PREFIX or re.fullmatch(r"qwen-image-edit-\d{4}-\d{2}-\d{2}", model):
        return 1
    return None


def edit_size(req: ImageRequest, model: str) -> str | None:
    """parameters.size for an edit: the resolved size, for the models documented to take one, when it
    is within their range; else None (the output follows the input images)."""
    low, high = EDIT_SIDE
    if is_edit_plus(model) and low <= req.width <= high and low <= req.height <= high:
        return f"{req.width}*{req.height}"
    return None


def to_native_edit(req: ImageRequest, model: str) -> dict[str, Any]:
    """An edit ImageRequest -> the sync (multimodal) body: the images as data URIs, then the prompt.

    CPU: base64 of the images (call off the event loop). Too many images for the model: UpstreamRefused.
    """
    check_limits(req)
    limit = edit_max_images(model)
    if limit is not None and len(req.images) > limit:
        raise UpstreamRefused(f"the DashScope model '{model}' takes at most {limit} input image(s); this edit "
                              f"has {len(req.images)}")
    params = _parameters(req)
    size = edit_size(req, model)
    if size is not None:
        params = {"size": size, **params}
    content: list[dict[str, str]] = [{"image": image.data_uri()} for image in req.images]
    content.append({"text": req.prompt})
    return {"model": model, "input": {"messages": [{"role": "user", "content": content}]}, "parameters": params}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def from_native(payload: Any) -> list[GeneratedImage]:
    """A sync answer (output.choices) or a SUCCEEDED task (output.results) -> images (result URLs)."""
    output = payload.get("output") if isinstance(payload, dict) else None
    if not isinstance(output, dict):
        raise UpstreamError("DashScope answered without an output object")
    if "results" in output:
        return _task_results(output["results"])
    choices = output.get("choices")
    if not isinstance(choices, list) or not choices:
        raise UpstreamError("DashScope answered without images")
    usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else {}
    width, height = _int_or_none(usage.get("width")), _int_or_none(usage.get("height"))
    images = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            raise UpstreamError("DashScope answered with a malformed choice")
        # A text part beside the image, where there is one, is the rewritten prompt.
        texts = [c["text"] for c in content if isinstance(c, dict) and isinstance(c.get("text"), str) and c["text"]]
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("image"), str) and part["image"]:
                images.append(GeneratedImage(url=part["image"], width=width, height=height,
                                             revised_prompt=texts[0] if texts else None))
    if not images:
        raise UpstreamError("DashScope answered without images")
    return images


def _task_results(results: Any) -> list[GeneratedImage]:
    if not isinstance(results, list) or not results:
        raise UpstreamError("the DashScope task succeeded without results")
    images = []
    for item in results:
        if not isinstance(item, dict):
            raise UpstreamError("the DashScope task answered with a malformed result")
        if isinstance(item.get("url"), str) and item["url"]:
            revised = item.get("actual_prompt")
            images.append(GeneratedImage(url=item["url"],
                                         revised_prompt=revised if isinstance(revised, str) and revised else None))
        elif item.get("code"):
            # One image of the task failed (its own code and message): the same rules as a failed task.
            raise task_error({"task_status": "FAILED", **item})
        else:
            raise UpstreamError("the DashScope task answered with a result that has no url")
    return images


_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def task_id_of(payload: Any) -> str:
    output = payload.get("output") if isinstance(payload, dict) else None
    task_id = output.get("task_id") if isinstance(output, dict) else None
    # It goes into the poll and cancel paths, with the key: "../" or "?" there would call another endpoint.
    if not isinstance(task_id, str) or not _TASK_ID.fullmatch(task_id):
        raise UpstreamError("DashScope accepted the task without a usable task_id")
    return task_id


def task_status_of(payload: Any) -> str:
    output = payload.get("output") if isinstance(payload, dict) else None
    status = output.get("task_status") if isinstance(output, dict) else None
    if not isinstance(status, str) or not status:
        raise UpstreamError("DashScope answered a task poll without a task_status")
    return status.upper()


def _norm(code: str) -> str:
    return code.replace("_", "").lower()


# Codes (or dotted parts of codes, as in "InternalError.Algo.InvalidParameter") that are the client's fault.
_CLIENT_CODES = frozenset({"invalidparameter", "datainspectionfailed", "ipinfringementsuspect"})
_POLICY_CODES = frozenset({"datainspectionfailed", "ipinfringementsuspect"})
# Codes that another try on the same route would not fix: the key, the account, the model's access.
_REFUSED_CODES = frozenset({"invalidapikey", "accessdenied", "arrearage", "unauthorized", "modelnotfound",
                            "modelaccessdenied", "unsupportedoperation"})
# DashScope's parameter names as they appear in its messages -> the client's field names.
_PARAMS = (("negative_prompt", "negative_prompt"), ("prompt_extend", "prompt_enhancement"),
           ("watermark", "watermark"), ("seed", "seed"), ("size", "size"), ("prompt", "prompt"))


def _code_parts(code: str) -> set[str]:
    return {_norm(code), *(_norm(part) for part in code.split("."))}


def _param_named(message: str) -> str | None:
    for native, ours in _PARAMS:
        if re.search(rf"(?<![A-Za-z0-9_]){native}(?![A-Za-z0-9_])", message, re.IGNORECASE):
            return ours
    return None


def _classify(code: str, message: str, status: int | None, retry_after: float | None, detail: str,
              failed_task: bool = False) -> ProxyError:
    parts = _code_parts(code) if code else set()
    if parts & _CLIENT_CODES:
        policy = bool(parts & _POLICY_CODES)
        what = "The DashScope task failed" if failed_task else "DashScope rejected the request"
        return InvalidRequest(f"{what} ({detail})", param=None if policy else _param_named(message),
                              code="content_policy_violation" if policy else "invalid_value")
    if any(p.startswith("throttling") for p in parts) or status == 429:
        return RateLimited(f"rate limited by DashScope ({detail})", retry_after=retry_after)
    if "invalidapikey" in parts or status == 401:
        return UpstreamRefused(f"upstream authentication failed ({detail}); check the provider's api_key "
                               "(DashScope keys work only in their own region's base_url)")
    if parts & _REFUSED_CODES or status in (403, 404):
        return UpstreamRefused(f"DashScope refused the request ({detail}); check the provider's api_key, "
                               "base_url region and the route's model")
    if failed_task:
        return UpstreamError(f"the DashScope task failed ({detail})")
    if status == 400:
        return InvalidRequest(f"DashScope rejected the request ({detail})", param=_param_named(message))
    if status == 503:
        return UpstreamUnavailable(f"DashScope unavailable ({detail})", retry_after=retry_after)
    if status in (408, 504) or "requesttimeout" in parts:
        return UpstreamTimeout(f"DashScope timed out ({detail})")
    return UpstreamError(f"DashScope error ({detail})", retry_after=retry_after)


def error_from_payload(status: int, payload: Any, retry_after: float | None = None) -> ProxyError | None:
    """The error in a DashScope answer, None when there is none.

    An error is an HTTP status >= 400, or an HTTP 200 whose body carries a top-level `code`.
    """
    code = payload.get("code") if isinstance(payload, dict) else None
    message = payload.get("message") if isinstance(payload, dict) else None
    code = clip(str(code), 100) if code else ""
    message = clip(str(message)) if message else ""
    if status < 400 and not code:
        return None
    detail = f"HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    return _classify(code, message, status if status >= 400 else None, retry_after, detail)


def task_error(output: dict) -> ProxyError:
    """A task that ended without images (FAILED, CANCELED, UNKNOWN): the client's fault or retryable."""
    status = str(output.get("task_status") or "FAILED").upper()
    code, message = clip(str(output.get("code") or ""), 100), clip(str(output.get("message") or ""))
    if status == "UNKNOWN":
        return UpstreamError("the DashScope task is unknown (expired or lost)")
    if status == "CANCELED":
        return UpstreamError("the DashScope task was canceled")
    detail = (code or status) + (f": {message}" if message else "")
    return _classify(code, message, None, None, detail, failed_task=True)


def edit_json(req: ImageRequest, model: str) -> bytes:
    return json.dumps(to_native_edit(req, model)).encode()
