"""ImageRequest: the one normalized request that flows from the handler to every provider."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest

OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "avif")
SEED_MAX = 2**32 - 1
MAX_N = 10
MAX_LORAS = 3


class LoraRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    scale: float = Field(default=1.0, ge=-10, le=10)


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
    background: str | None = None
    style: str | None = None
    moderation: str | None = None
    user: str | None = None
    cfg_scale: float | None = Field(default=None, ge=0, le=50)
    num_inference_steps: int | None = Field(default=None, ge=1, le=500)
    prompt_enhancement: Literal["on", "off"] | None = None
    loras: list[LoraRef] | None = Field(default=None, max_length=MAX_LORAS)
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=3)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("output_format", mode="before")
    @classmethod
    def _jpg_is_jpeg(cls, v):
        return "jpeg" if isinstance(v, str) and v.lower() in ("jpg", "jpeg") else (v.lower() if isinstance(v, str) else v)

    @field_validator("prompt_enhancement", mode="before")
    @classmethod
    def _bool_to_on_off(cls, v):
        if isinstance(v, bool):
            return "on" if v else "off"
        if isinstance(v, str):
            # Multipart forms send booleans as text.
            return {"true": "on", "false": "off"}.get(v.lower(), v.lower())
        return v

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_from_text(cls, v):
        # Multipart forms can only carry strings: accept the list as JSON text.
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError:
                raise ValueError("must be a JSON array of {path, scale}") from None
        return v


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
    # Fields the proxy does not know: passed through to upstreams that accept them.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size_text(self) -> str:
        return f"{self.width}x{self.height}"

    def with_chunk(self, n: int, offset: int) -> ImageRequest:
        """The request for a part of n images starting at image `offset` (seed + offset)."""
        seed = None if self.seed is None else (self.seed + offset) % (SEED_MAX + 1)
        return replace(self, n=n, seed=seed)


def _describe(error: dict) -> tuple[str, str]:
    loc = [str(p) for p in error.get("loc", ())]
    param = loc[0] if loc else None
    path = param or "body"
    for part in loc[1:]:
        path += f"[{part}]" if part.isdigit() else f".{part}"
    if error["type"] == "missing":
        return f"Missing required parameter: '{path}'.", param
    msg = error["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"Invalid '{path}': {msg}.", param


def parse_body(fields: dict[str, Any]) -> _GenerationBody:
    if not isinstance(fields, dict):
        raise InvalidRequest("The request body must be a JSON object.", param=None, code="invalid_json")
    try:
        return _GenerationBody.model_validate(fields)
    except ValidationError as e:
        message, param = _describe(e.errors()[0])
        raise InvalidRequest(message, param=param) from None


def build_request(body: _GenerationBody, model: str, width: int, height: int) -> ImageRequest:
    # model_dump includes extra="allow" fields too: those go to `extra`, not to the constructor.
    known = body.model_dump(exclude={"loras", *(body.model_extra or {})})
    known.pop("model", None)
    return ImageRequest(
        model=model,
        width=width,
        height=height,
        loras=tuple(body.loras or ()),
        extra=dict(body.model_extra or {}),
        **known,
    )


def parse_json_bytes(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object with a 'prompt'.", code="invalid_json")
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an int literal over 4300 digits
        raise InvalidRequest(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return data


_FIELDS = set(ImageRequest.__dataclass_fields__) - {"extra", "model", "prompt", "width", "height"}


def with_route_defaults(req: ImageRequest, params: dict[str, Any]) -> ImageRequest:
    """Fill fields the client left unset from a route's `params`; unknown keys become extras."""
    if not params:
        return req
    known = {k: v for k, v in params.items() if k in _FIELDS and getattr(req, k) is None}
    extra = {k: v for k, v in params.items() if k not in _FIELDS}
    return replace(req, **known, extra={**extra, **req.extra})
