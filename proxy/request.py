"""ImageRequest: the one normalized request that flows from the handler to every provider."""

from __future__ import annotations

import asyncio
import email.errors
import json
import math
import re
import zlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidRequest

OUTPUT_FORMATS = ("png", "jpeg", "webp", "gif", "avif")
SEED_MAX = 2**32 - 1
MAX_N = 10
MAX_LORAS = 3
# Client input limits. JSON nested deeper than this is refused (json.loads itself gives up near 1,000).
MAX_JSON_DEPTH = 64
# A JSON integer literal with more digits is refused (Python's own int() limit, with a clearer message).
MAX_INT_DIGITS = 4300
# Unknown fields are passed on to upstreams as JSON: at most this many bytes of them.
MAX_EXTRA_BYTES = 256 * 1024
MAX_FORM_FIELDS = 1000
# JSON bodies above this are parsed off the event loop.
_THREAD_PARSE_BYTES = 1024 * 1024


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
    input_fidelity: Literal["high", "low"] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("seed", "n", "output_compression", "num_inference_steps", "partial_images", mode="before")
    @classmethod
    def _whole_number(cls, v):
        _not_bool(v)
        if isinstance(v, float) and v.is_integer():
            # 1e308 is then "less than or equal to 10", not pydantic's "unable to parse input string".
            return int(v)
        return v

    _cfg_not_bool = field_validator("cfg_scale", mode="before")(_not_bool)

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

    @property
    def mime(self) -> str:
        return f"image/{self.format}"

    def data_uri(self) -> str:
        import pybase64 as base64

        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


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
        seed = None if self.seed is None else (self.seed + offset) % (SEED_MAX + 1)
        return replace(self, n=n, seed=seed, first_index=self.first_index + offset)


def _describe(error: dict) -> tuple[str, str | None]:
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


def parse_body(fields: dict[str, Any]) -> _GenerationBody:
    """Validate a request's fields (from JSON or a form): every mistake is an InvalidRequest naming the field."""
    if not isinstance(fields, dict):
        raise InvalidRequest("The request body must be a JSON object.", param=None, code="invalid_json")
    check_values(fields)
    try:
        body = _GenerationBody.model_validate(fields)
    except ValidationError as e:
        message, param = _describe(e.errors()[0])
        raise InvalidRequest(message, param=param) from None
    _check_extra(body.model_extra or {})
    return body


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


# ---- reading a request body ----------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart form (the images and mask of an edit)."""

    field: str
    filename: str
    content_type: str
    data: bytes


class Body(NamedTuple):
    fields: dict[str, Any]
    # File parts of a multipart form, in order (empty unless asked for).
    files: list[Upload]
    # The body's bytes, for passthrough of a call this proxy does not serve.
    raw: bytes | None


async def read_fields(request: web.Request) -> tuple[dict[str, Any], bytes | None]:
    """The fields of a JSON object body or of a form (file parts ignored), and the raw bytes of a
    body read whole (None for multipart, which is parsed as a stream).

    Every malformed body is an InvalidRequest (400); a body over the app's client_max_size raises
    aiohttp's HTTPRequestEntityTooLarge (413) unchanged.
    """
    body = await read_body(request, files=False)
    return body.fields, body.raw


async def read_body(request: web.Request, *, files: bool = True) -> Body:
    """read_fields plus the file parts of a multipart form, read into memory when `files` is true."""
    try:
        return await _read_body(request, files)
    except InvalidRequest:
        if request.content.exception() is not None:
            _drop_broken_body(request)
        raise


def _drop_broken_body(request: web.Request) -> None:
    """The body broke in transit (bad gzip, chunking): after the answer, aiohttp would read the rest of
    it ("lingering close"), meet the same error and log it at ERROR with a traceback. Mark the body
    finished and close the connection once the 400 is sent: there is nothing more to read from it."""
    if request.protocol is not None:
        request.protocol.close()
    request.content.feed_eof()


async def _read_body(request: web.Request, files: bool) -> Body:
    try:
        ctype, charset = request.content_type, request.charset
    except (ValueError, LookupError, email.errors.MessageError):  # the stdlib's header parser gives up
        header = _printable(request.headers.get("Content-Type", ""))[:200]
        raise InvalidRequest(f"The Content-Type header cannot be parsed: '{header}'.",
                             code="invalid_content_type") from None
    if ctype == "multipart/form-data":
        # Read whole first (within client_max_size), so a call this proxy does not serve can still be
        # passed on as it came; then parse the form from those bytes.
        raw = await _read_raw(request)
        _replay(request, raw)
        fields, uploads = await _read_multipart(request, files)
        check_values(fields)
        return Body(fields, uploads, raw)
    raw = await _read_raw(request)
    # `curl -d '{...}'` sends JSON labelled as a form: read it as what it is.
    if ctype == "application/x-www-form-urlencoded" and not raw.lstrip().startswith(b"{"):
        fields = _parse_urlencoded(raw, charset)
        check_values(fields)
    elif len(raw) > _THREAD_PARSE_BYTES:
        fields = await asyncio.to_thread(parse_json_bytes, raw)
    else:
        fields = parse_json_bytes(raw)
    return Body(fields, [], raw)


def _replay(request: web.Request, raw: bytes) -> None:
    """Make the body readable again by aiohttp's form parser, from bytes already read."""
    stream = StreamReader(request.protocol, 1 << 16, loop=asyncio.get_running_loop())
    stream.feed_data(raw)
    stream.feed_eof()
    request._payload = stream  # noqa: SLF001 - aiohttp parses forms from this stream only


async def _read_raw(request: web.Request) -> bytes:
    try:
        return await request.read()
    except (web.RequestPayloadError, HttpProcessingError) as e:  # a broken chunked or gzip body, one cut short
        raise InvalidRequest(f"The request body could not be read: {_reason(e)}.", code="invalid_body") from None


# What aiohttp's form parser raises for a malformed body: a missing or bad boundary, truncated parts,
# bad part headers, unknown charsets or transfer encodings, bad base64, undecodable text.
# HTTPRequestEntityTooLarge (413) is none of these and goes through.
_FORM_ERRORS = (ValueError, LookupError, RuntimeError, AssertionError, zlib.error, HttpProcessingError,
                web.RequestPayloadError, web.HTTPBadRequest)


async def _read_multipart(request: web.Request, keep_files: bool) -> tuple[dict[str, str], list[Upload]]:
    try:
        form = await request.post()
    except _FORM_ERRORS as e:
        raise InvalidRequest(f"The multipart/form-data body is malformed: {_reason(e)}.",
                             code="invalid_multipart") from None
    fields: dict[str, str] = {}
    uploads: list[Upload] = []
    try:
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if keep_files:
                    data = await asyncio.to_thread(value.file.read)
                    uploads.append(Upload(name, value.filename, value.content_type, data))
                continue
            if not isinstance(value, str):  # a part with a non-text Content-Type and no filename
                try:
                    value = bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest(f"Invalid '{_safe(name)}': the form field is not UTF-8 text.",
                                         param=_safe(name), code="invalid_multipart") from None
            fields[name] = value  # a repeated field: the last one wins, as in JSON
    finally:
        for value in form.values():
            if isinstance(value, web.FileField):
                value.file.close()
    return fields, uploads


def _parse_urlencoded(raw: bytes, charset: str | None) -> dict[str, str]:
    charset = charset or "utf-8"
    try:
        pairs = parse_qsl(raw.rstrip().decode(charset), keep_blank_values=True, encoding=charset,
                          errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except (ValueError, LookupError) as e:  # an unknown charset, undecodable text, too many fields
        raise InvalidRequest(f"The application/x-www-form-urlencoded body is malformed: {_reason(e)}.",
                             code="invalid_form") from None
    return dict(pairs)


def _reason(e: Exception) -> str:
    if isinstance(e, web.RequestPayloadError) and isinstance(e.__cause__, HttpProcessingError):
        e = e.__cause__  # the parser's own words
    text = e.message if isinstance(e, HttpProcessingError) else str(e)
    text = _printable(" ".join(str(text).split())).rstrip(".")
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


# ---- JSON and text checks ------------------------------------------------------------------------


def parse_json_bytes(raw: bytes) -> dict[str, Any]:
    """A JSON object body: strict UTF-8, finite numbers, at most MAX_JSON_DEPTH deep, no lone surrogates."""
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"The request body is not valid JSON: it is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
            f"position {e.start}).", code="invalid_json") from None
    if not text.strip():
        raise InvalidRequest("The request body is empty; send a JSON object with a 'prompt'.", code="invalid_json")
    try:
        data = _loads(text)
    except ValueError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Only a \uD800-\uDFFF escape makes a lone surrogate: strict UTF-8 text cannot hold one.
    if _SURROGATE_ESCAPE.search(text):
        check_values(data)
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _loads(text: str) -> Any:
    """json.loads without NaN, Infinity, numbers that overflow, giant ints or deep nesting (ValueError)."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise ValueError(f"it is nested more than {MAX_JSON_DEPTH} levels deep") from None
    # Each level needs a [ or {: only count when there could be enough of them.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"it is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in value (a scalar is 0), without recursion; stops past the limit."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))
    return deepest


def _printable(text: str) -> str:
    """Text from a client made encodable (lone surrogates as \\udXXX escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe(name: str) -> str:
    """A field name from a client, fit for a message and for `param`."""
    name = _printable(name)
    return name if len(name) <= 64 else name[:61] + "..."


def check_values(fields: dict[str, Any]) -> None:
    """Every name and string in fields is valid Unicode and nothing nests over MAX_JSON_DEPTH.

    A lone surrogate ("\\ud800" in JSON) cannot be encoded as UTF-8: it would break the image drawn,
    the JSON sent upstream or the tokenizer, so it is refused here with the field's name.
    """
    for key, value in fields.items():
        param = _safe(key) if isinstance(key, str) else str(key)
        if isinstance(key, str) and _SURROGATE.search(key):
            raise InvalidRequest(f"Invalid parameter name '{param}': contains invalid Unicode (a lone surrogate).",
                                 param=param)
        stack = [(value, param, 2)]  # the body itself is level 1
        while stack:
            v, path, depth = stack.pop()
            if isinstance(v, str):
                if _SURROGATE.search(v):
                    raise InvalidRequest(f"Invalid '{path}': contains invalid Unicode (a lone surrogate).",
                                         param=param)
                continue
            if isinstance(v, dict):
                items = [(k, c, f"{path}.{_safe(k) if isinstance(k, str) else k}") for k, c in v.items()]
            elif isinstance(v, list | tuple):
                items = [(None, c, f"{path}[{i}]") for i, c in enumerate(v)]
            else:
                continue
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(f"Invalid '{param}': nested more than {MAX_JSON_DEPTH} levels deep.",
                                     param=param)
            for k, c, child_path in items:
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise InvalidRequest(
                        f"Invalid '{child_path}': the name contains invalid Unicode (a lone surrogate).",
                        param=param)
                stack.append((c, child_path, depth + 1))


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
        biggest = max(sizes, key=sizes.get)
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
