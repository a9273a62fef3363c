"""ImageRequest: the one normalized request that flows from the handler to every provider."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, replace
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import InvalidRequest
from .wire_json import _loads, _safe, check_values

OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "avif")
# OpenAI's values of `quality` (the openai package's ImageGenerateParams; standard and hd: DALL-E's, still
# accepted there). A model's local routes may name more in their quality_tiers (Provider.qualities).
QUALITIES = frozenset({"auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"})
# OpenAI's values of `background` (`true` / `false` asks for a background job: proxy.jobs.ask takes it out).
BACKGROUNDS = ("transparent", "opaque", "auto")
SEED_MAX = 2**32 - 1
MAX_N = 10
MAX_LORAS = 3
# OpenAI's longest prompt (gpt-image-1). A prompt is echoed in every background job's answers and lists
# and wrapped into the placeholder's image: megabytes of it cost memory and time everywhere.
MAX_PROMPT_CHARS = 32_000
# Unknown fields are passed on to upstreams as JSON: at most this many bytes of them.
MAX_EXTRA_BYTES = 256 * 1024
MAX_FORM_FIELDS = 1000


def _not_bool(v: Any) -> Any:
    # pydantic reads true as 1: a boolean where a number belongs is the client's mistake.
    if isinstance(v, bool):
        raise ValueError("must be a number, not a boolean")
    return v


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=-10, le=10)

    _scale_not_bool = field_validator("scale", mode="before")(_not_bool)


def _not_too_long(text: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters (it has {len(text)})")
    return text


class _GenerationBody(BaseModel):
    """Validation of the wire fields (JSON or multipart strings); unknown fields are kept."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=False)

    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    n: int = Field(default=1, ge=1, le=MAX_N)
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp", "gif", "avif"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    quality: str | None = None
    background: str | None = None  # one of BACKGROUNDS (proxy.api.generations.check_choices)
    style: str | None = None
    moderation: str | None = None
    user: str | None = None
    cfg_scale: float | None = Field(default=None, ge=0, le=50)
    num_inference_steps: int | None = Field(default=None, ge=1, le=500)
    prompt_enhancement: Literal["on", "off"] | None = None
    loras: list[LoraRef] | None = Field(default=None, max_length=MAX_LORAS)
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=3)
    input_fidelity: Literal["high", "low"] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return _not_too_long(v)

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_not_too_long(cls, v: str | None) -> str | None:
        return v if v is None else _not_too_long(v)

    @field_validator("seed", "n", "output_compression", "num_inference_steps", "partial_images", mode="before")
    @classmethod
    def _whole_number(cls, v: Any) -> Any:
        _not_bool(v)
        if isinstance(v, float) and v.is_integer():
            # 1e308 is then "less than or equal to 10", not pydantic's "unable to parse input string".
            return int(v)
        return v

    _cfg_not_bool = field_validator("cfg_scale", mode="before")(_not_bool)

    @field_validator("n", "response_format", "stream", mode="before")
    @classmethod
    def _null_is_the_default(cls, v: Any, info: ValidationInfo) -> Any:
        # OpenAI documents these as "or null" (JSON clients send null for "not set"): null means the default.
        if v is None and info.field_name is not None:
            return cls.model_fields[info.field_name].default
        return v

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, v: Any) -> Any:
        return "jpeg" if isinstance(v, str) and v.lower() in ("jpg", "jpeg") else (v.lower() if isinstance(v, str) else v)

    @field_validator("prompt_enhancement", mode="before")
    @classmethod
    def _bool_to_on_off(cls, v: Any) -> Any:
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, str):
            # Multipart forms send booleans as text.
            return {"true": "on", "false": "off"}.get(v.lower(), v.lower())
        return v

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_text(cls, v: Any) -> Any:
        # Multipart forms can only carry strings: accept the list as JSON text.
        if isinstance(v, str):
            try:
                return _loads(v)
            except ValueError:
                raise ValueError("must be a JSON array of {path, scale}") from None
        return v


@dataclass(frozen=True)
class InputImage:
    """An image the client sent to edit (or a mask): checked bytes in one of the accepted formats."""

    data: bytes
    format: str  # png | jpeg | webp | gif
    width: int
    height: int
    # The name the client sent it under ("image", "image[1]", "images[0]", "mask"): errors name that.
    param: str = "image"
    _uri: list[str] = field(default_factory=list, compare=False, repr=False)

    @property
    def mime(self) -> str:
        return f"image/{self.format}"

    def data_uri(self) -> str:
        """As a data: URL, encoded once however many calls upload it (n split over calls, retries,
        fallbacks): each call would otherwise hold its own copy of megabytes of base64."""
        if not self._uri:
            import pybase64 as base64

            self._uri.append(f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}")
        return self._uri[0]


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    model: str
    width: int = 1024
    height: int = 1024
    n: int = 1
    seed: int | None = None
    negative_prompt: str | None = None
    size: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    response_format: str = "url"
    output_format: str | None = None
    output_compression: int | None = None
    quality: str | None = None
    background: str | None = None
    style: str | None = None
    moderation: str | None = None
    user: str | None = None
    cfg_scale: float | None = None
    num_inference_steps: int | None = None
    prompt_enhancement: str | None = None
    loras: tuple[LoraRef, ...] = ()
    stream: bool = False
    partial_images: int | None = None
    input_fidelity: str | None = None
    # Edits: the input images (1 or more, in order) and the optional mask (the first image's size).
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    # Index of this request's first image in the client's request (a part of n: see with_chunk).
    first_index: int = 0
    # Fields the proxy does not know: passed through to upstreams that accept them.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_edit(self) -> bool:
        return bool(self.images)

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"

    def with_chunk(self, n: int, offset: int) -> ImageRequest:
        """The request for a part of n images starting at image `offset` (seed + offset)."""
        if n == self.n and offset == 0:  # all of it (frozen: the same request serves)
            return self
        seed = None if self.seed is None else (self.seed + offset) % (SEED_MAX + 1)
        return replace(self, n=n, seed=seed, first_index=self.first_index + offset)


def _describe(error: Mapping[str, Any]) -> tuple[str, str | None]:
    loc = list(error.get("loc", ()))
    param = _safe(str(loc[0])) if loc else None
    path = param or "body"
    for part in loc[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{_safe(str(part))}"
    if error["type"] == "missing":
        return f"Missing required parameter: '{path}'.", param
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"Invalid '{path}': {msg}.", param


def parse_body(fields: dict[str, Any], *, checked: bool = False) -> _GenerationBody:
    """Validate a request's fields (from JSON or a form): every mistake is an InvalidRequest naming the field.
    `checked`: the fields come from read_fields / read_body, which ran check_values on them already."""
    if not isinstance(fields, dict):
        raise InvalidRequest("The request body must be a JSON object.", param=None, code="invalid_json")
    if not checked:
        check_values(fields)
    try:
        body = _GenerationBody.model_validate(fields)
    except ValidationError as e:
        message, param = _describe(e.errors()[0])
        raise InvalidRequest(message, param=param) from None
    if extra := body.model_extra:
        _check_extra(extra)
    return body


def parse_fields(fields: dict[str, Any], *, checked: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """parse_body's values (its model's fields, defaults filled in) and unknown fields (extras), for request_from.
    A body of only plain fields is read without pydantic: the same values, a third of the cost (cold, at c=1)."""
    if isinstance(fields, dict):
        if not checked:
            check_values(fields)
        values = _plain_values(fields)
        if values is not None:
            return values, {}
    body = parse_body(fields, checked=True)  # (not a dict: refused before anything is checked)
    return body.__dict__, body.model_extra or {}


def _plain_values(fields: dict[str, Any]) -> dict[str, Any] | None:
    """What parse_body makes of fields when each is plain: a prompt that is not blank, text (or null) for a
    field pydantic takes as it is, prompts within MAX_PROMPT_CHARS, a response_format it names, n a whole
    number in range. None for anything
    else (an unknown field, another type, a value to convert or refuse): parse_body reads that."""
    prompt = fields.get("prompt")
    if type(prompt) is not str or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        return None
    for name, value in fields.items():
        if name in _PLAIN_TEXT:
            if value is not None and type(value) is not str:
                return None
        elif name == "response_format":
            if type(value) is not str or value not in _RESPONSE_FORMATS:
                return None
        elif name == "n":
            if type(value) is not int or not 1 <= value <= MAX_N:
                return None
        elif name == "negative_prompt":
            if value is not None and (type(value) is not str or len(value) > MAX_PROMPT_CHARS):
                return None
        elif name != "prompt":
            return None
    return {**_BODY_DEFAULTS, **fields}


# The fields whose text pydantic keeps as it is: `str | None`, no constraint, no validator of ours.
_CONVERTED = {name for v in _GenerationBody.__pydantic_decorators__.field_validators.values() for name in v.info.fields}
_PLAIN_TEXT = frozenset(name for name, f in _GenerationBody.model_fields.items()
                        if f.annotation == str | None and not f.metadata and name not in _CONVERTED)
_RESPONSE_FORMATS = get_args(_GenerationBody.model_fields["response_format"].annotation)
_BODY_DEFAULTS = {name: f.default for name, f in _GenerationBody.model_fields.items() if not f.is_required()}


def build_request(body: _GenerationBody, model: str, width: int, height: int) -> ImageRequest:
    # The validated values as they are (pydantic keeps the fields in __dict__, the extra="allow" ones apart in
    # model_extra): model_dump would serialize each again, for the same plain values (loras aside).
    return request_from(body.__dict__, body.model_extra or {}, model, width, height)


def request_from(values: dict[str, Any], extra: dict[str, Any], model: str, width: int, height: int) -> ImageRequest:
    """The ImageRequest of parse_fields' values and extras, at the resolved size."""
    fields = {**_REQUEST_DEFAULTS, **values, "model": model, "width": width, "height": height,
              "loras": tuple(values["loras"] or ()), "extra": dict(extra)}
    # Into the instance's dict at once (ImageRequest has no __post_init__ to run): the frozen dataclass's
    # __init__ sets its 31 fields one object.__setattr__ call at a time, 4 of the 5 us this took.
    req = object.__new__(ImageRequest)
    object.__setattr__(req, "__dict__", fields)
    return req


# What build_request fills in for fields the wire does not set (the edit's images, mask, first_index).
_REQUEST_DEFAULTS = {f.name: f.default for f in ImageRequest.__dataclass_fields__.values() if f.default is not MISSING}


def _check_extra(extra: dict[str, Any]) -> None:
    """Unknown fields go to upstreams as JSON: they must be JSON, and not too much of it."""
    sizes = {}
    for key, value in extra.items():
        try:
            sizes[key] = len(key) + len(json.dumps(value, allow_nan=False)) + 4
        except (TypeError, ValueError, RecursionError):
            raise InvalidRequest(f"Invalid '{_safe(key)}': must be a JSON value.", param=_safe(key)) from None
    total = sum(sizes.values())
    if total > MAX_EXTRA_BYTES:
        biggest = max(sizes, key=lambda k: sizes[k])
        raise InvalidRequest(
            f"The unknown parameters ({', '.join(_safe(k) for k in list(sizes)[:5])}"
            f"{', ...' if len(sizes) > 5 else ''}) are {total} bytes of JSON; at most {MAX_EXTRA_BYTES} "
            f"are passed on to upstreams.", param=_safe(biggest))


_FIELDS = set(ImageRequest.__dataclass_fields__) - {"extra", "model", "prompt", "width", "height", "images",
                                                    "mask", "first_index"}


def with_route_defaults(req: ImageRequest, params: dict[str, Any], drop: list[str] | tuple = ()) -> ImageRequest:
    """Fill fields the client left unset from a route's `params` (unknown keys become extras), then
    leave out the fields the route drops."""
    if not params and not drop:
        return req
    known = {k: v for k, v in params.items() if k in _FIELDS and getattr(req, k) is None}
    extra = {k: v for k, v in {**{k: v for k, v in params.items() if k not in _FIELDS}, **req.extra}.items()
             if k not in drop}
    cleared = {k: (() if k == "loras" else None) for k in drop if k in _FIELDS and k != "stream"}
    return replace(req, **{**known, **cleared}, extra=extra)
