"""Any OpenAI-compatible image upstream (Lumenfall and the like): POST {base_url}/images/generations."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import pybase64
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from ..config import RouteConfig
from ..errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
    clip,
    redact,
    retry_after_from_headers,
)
from ..http import jsonbytes
from ..http.cpu import INLINE_BYTES, run_cpu
from ..media.partials import PartialImage, emit, partials_wanted
from ..request import ImageRequest
from .base import (
    Capabilities,
    GeneratedImage,
    Provider,
    ProviderContext,
    answer_limit,
    answer_lines,
    read_answer,
    started,
)
from .base import json_or_none as _json_or_none  # a module name of its own: bench/ patches it
from .extras import extras_for

# Request fields sent when set; everything the proxy does not know rides along in req.extra.
_OPTIONAL_FIELDS = ("negative_prompt", "seed", "quality", "background", "style", "moderation", "user",
                    "input_fidelity", "cfg_scale", "num_inference_steps", "prompt_enhancement")


def to_native(req: ImageRequest, model: str, *, output_formats: frozenset[str],
              response_format: str = "b64_json") -> dict[str, Any]:
    body: dict[str, Any] = extras_for("openai", req.extra)
    body.update(model=model, prompt=req.prompt, n=req.n, size=req.size_text, response_format=response_format)
    for name in _OPTIONAL_FIELDS:
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.loras:
        body["loras"] = [lora.model_dump() for lora in req.loras]
    # Ask for the format only where the upstream makes it; otherwise the proxy converts.
    if req.output_format in output_formats:
        body["output_format"] = req.output_format
        if req.output_compression is not None:
            body["output_compression"] = req.output_compression
    return body


def from_native(payload: Any, req: ImageRequest, compression_sent: bool) -> list[GeneratedImage]:
    items = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(items, list) or not items:
        raise UpstreamError("the upstream answered without images")
    images = []
    for item in items:
        if not isinstance(item, dict):
            raise UpstreamError("the upstream answered with a malformed data item")
        revised = item.get("revised_prompt")
        if isinstance(item.get("b64_json"), (str, memoryview)) and item["b64_json"]:
            # Checked with the rest of the route's images (output.finish_images): a bad one falls back.
            images.append(GeneratedImage(b64=item["b64_json"], revised_prompt=revised,
                                         compression_applied=compression_sent))
        elif isinstance(item.get("url"), str) and item["url"]:
            images.append(GeneratedImage(url=item["url"], revised_prompt=revised,
                                         compression_applied=compression_sent))
        else:
            raise UpstreamError("the upstream answered with a data item that has neither url nor b64_json")
    return images


def edit_form(body: dict[str, Any], req: ImageRequest) -> aiohttp.FormData:
    """The edit as OpenAI's multipart form: the fields as text, then image (or image[] for several) and mask."""
    form = aiohttp.FormData()
    for name, value in body.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        form.add_field(name, "true" if value is True else "false" if value is False else text)
    field = "image" if len(req.images) == 1 else "image[]"
    for i, image in enumerate(req.images):
        form.add_field(field, image.data, filename=f"image-{i}.{image.format}", content_type=image.mime)
    if req.mask is not None:
        form.add_field("mask", req.mask.data, filename=f"mask.{req.mask.format}", content_type=req.mask.mime)
    return form


async def read_event_stream(resp: aiohttp.ClientResponse, req: ImageRequest,
                            redacted: Callable[[ProxyError], ProxyError]) -> list[GeneratedImage]:
    """An upstream's OpenAI image stream: partial images go on to the client's stream as they come,
    completed events become the route's images, an error event is the route's failure."""
    images: list[GeneratedImage] = []
    partials = 0  # handed on: at most partial_images for each image, however many the upstream sends
    async for event in _sse_events(resp.content, answer_limit(req)):
        kind = str(event.get("type") or "")
        if kind == "error" or ("error" in event and not kind.endswith((".partial_image", ".completed"))):
            # {"error": {...}} (the openai package's shape), or the Responses API's flat {"type": "error",
            # "code", "message"}: either way the upstream's reason, not "ended without a completed image".
            err = event.get("error", event)
            err = err if isinstance(err, dict) else {"message": str(err)}
            message = clip(str(err.get("message") or err))
            raise redacted(UpstreamError(f"the upstream's stream failed: {message}"))
        b64 = event.get("b64_json")
        if not isinstance(b64, str) or not b64:
            continue
        if kind.endswith(".partial_image"):
            if partials >= req.n * (req.partial_images or 0):
                continue
            partials += 1
            data = await run_cpu(len(b64), _b64decode, b64)
            if data is not None:
                # Indexes that are not numbers are not trusted (nor raised on): the stream numbers previews itself.
                given, order = event.get("image_index"), event.get("partial_image_index")
                index = given if isinstance(given, int) else len(images)
                emit(PartialImage(req.first_index + index, order if isinstance(order, int) else 0, data,
                                  str(event.get("output_format") or req.output_format or "png")))
        elif kind.endswith(".completed"):
            if len(images) == req.n:  # not collected past what was asked: they would pile up in memory
                raise UpstreamError(f"the upstream's stream sent more images than the {req.n} asked for")
            images.append(GeneratedImage(b64=b64, revised_prompt=event.get("revised_prompt")))
    if not images:
        raise UpstreamError("the upstream's stream ended without a completed image")
    return images


async def _sse_events(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[dict[str, Any]]:
    """The JSON data of each server-sent event (comments and keep-alives skipped), each of `limit` bytes
    at most."""
    data: list[bytes] = []
    size = 0
    async for line in answer_lines(stream, limit):
        if not line:
            if data:
                payload = _json_or_none(b"\n".join(data))
                data, size = [], 0
                if isinstance(payload, dict):
                    yield payload
            continue
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip())
            size += len(line)
            if size > limit:
                raise UpstreamError(f"an event of the upstream's stream is over the {limit} byte limit")


def _b64decode(text: str) -> bytes | None:
    try:
        return pybase64.b64decode(text, validate=True)
    except ValueError:
        return None


def error_from_status(status: int, payload: Any, retry_after: float | None) -> ProxyError:
    """Map an upstream HTTP error to ours: client faults return at once, the rest fall back."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(err, dict):
        message, param = clip(str(err.get("message") or err.get("code") or "")), err.get("param")
        param = clip(param, 100) if isinstance(param, str) else None
    else:
        message, param = (clip(str(err)) if err else ""), None
    detail = f"HTTP {status}" + (f": {message}" if message else "")
    if status in (400, 422):
        return InvalidRequest(f"The upstream rejected the request ({detail})", param=param)
    if status == 429:
        return RateLimited(f"rate limited ({detail})", retry_after=retry_after)
    if status == 503:
        return UpstreamUnavailable(f"upstream unavailable ({detail})", retry_after=retry_after)
    if status == 408:
        return UpstreamTimeout(f"upstream timeout ({detail})")
    if status in (401, 403):
        return UpstreamRefused(f"authentication with the upstream failed ({detail}); check the provider's api_key")
    if status in (402, 404, 409):
        return UpstreamRefused(f"upstream error ({detail})")
    return UpstreamError(f"upstream error ({detail})", retry_after=retry_after)


def split_answer(raw: bytes) -> Any:
    """An image answer's JSON with each "b64_json" value left where it arrived: a memoryview of `raw`
    (the string's UTF-8 bytes; base64 is ASCII), never copied; None when the body needs a full parse.

    Each value is cut out with bytes.find (memchr), the small rest is parsed and the views are put back.
    Anything unexpected (an escape inside a value, a stray key, a count that does not match, a large
    rest) gives None. Memory scans only: cheap enough for the event loop even on a 4 MB answer.
    """
    view = memoryview(raw)
    cuts: list[memoryview] = []
    parts: list[memoryview] = []
    pos = 0
    while len(cuts) < 64:
        key = raw.find(b'"b64_json"', pos)
        if key < 0:
            break
        opening = raw.find(b'"', key + 10)
        closing = raw.find(b'"', opening + 1) if opening >= 0 else -1
        if closing < 0 or raw[key + 10:opening].strip() != b":" or raw[key - 1:key] == b"\\":
            return None
        value = view[opening + 1:closing]
        if raw.find(b"\\", opening + 1, closing) >= 0:
            return None
        parts.append(view[pos:opening + 1])
        cuts.append(value)
        pos = closing
    if not cuts:
        return None
    parts.append(view[pos:])
    skeleton = b"".join(parts)  # "" where each image was
    if len(skeleton) > INLINE_BYTES:
        return None
    doc = _json_or_none(skeleton)
    items = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return None
    put = 0  # each item's "b64_json" gets its cut, in order; a doc that does not match is dropped
    for item in items:
        if isinstance(item, dict) and "b64_json" in item:
            if put == len(cuts) or item["b64_json"] != "":
                return None
            item["b64_json"] = cuts[put]
            put += 1
    return doc if put == len(cuts) else None


def parse_answer(raw: bytes) -> Any:
    """An image answer's JSON, as json.loads gives it (None for a body that is not JSON); through
    split_answer when it applies (0.3 ms against 1.6-22 ms for json.loads of a 4.2 MB answer)."""
    doc = split_answer(raw)
    if doc is None:
        return _json_or_none(raw)
    try:
        for item in doc["data"]:
            if isinstance(item, dict) and isinstance(item.get("b64_json"), memoryview):
                item["b64_json"] = str(item["b64_json"], "utf-8")
    except UnicodeDecodeError:
        return _json_or_none(raw)
    return doc


class OpenAICompatProvider(Provider):
    kind = "openai"
    # The options this kind reads in models.yaml; any other key is a config error (proxy.config.kinds.options_model).
    options_schema = {
        "base_url": str | None,
        "api_key": str | None,
        "api_key_required": bool,
        "max_images_per_call": (int, {"ge": 1}),
        "output_formats": list[str],
        "response_format": ("b64_json", "url"),
        "timeout": (float, {"gt": 0}),
        "retries": (int, {"ge": 0, "le": 10}),
        # The upstream streams partial images (OpenAI's image streaming): streamed requests asking for
        # partial_images are streamed through; otherwise they get the completed images only.
        "stream": bool,
    }

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        super().__init__(name, options, missing_vars)
        self.base_url = str(options.get("base_url") or "").rstrip("/")
        self.api_key = str(options.get("api_key") or "")
        self.response_format = options.get("response_format", "b64_json")
        self.capabilities = Capabilities(
            max_images_per_call=int(options.get("max_images_per_call", 1)),
            output_formats=frozenset(options.get("output_formats", ["png", "jpeg", "webp"])),
            output_compression=True,
            edits=True,
            masks=True,
            hands_on_fields=True,  # `background` and `quality` included: the upstream's model judges them
        )
        self.http: aiohttp.ClientSession | None = None
        # Fixed by the options: built once rather than on every call, as multidicts (aiohttp converts a
        # dict into one on every call).
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._headers = CIMultiDictProxy(CIMultiDict(headers))
        self._json_headers = CIMultiDictProxy(CIMultiDict({**headers, "Content-Type": "application/json"}))
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}  # one per route timeout in models.yaml
        try:
            self._origin = str(URL(self.base_url).origin()) if self.base_url else None
        except ValueError:
            self._origin = None

    @property
    def unavailable_reason(self) -> str | None:
        if not self.base_url:  # (a ${VAR} left unset reads as empty: name the provider's unset ones)
            unset = f" (unset in this provider: {', '.join(self.missing_vars)})" if self.missing_vars else ""
            return "no base_url configured" + unset
        if not self.api_key and self.options.get("api_key_required", True):
            hint = ", ".join(self.missing_vars) or "api_key in models.yaml"
            return f"no API key (set {hint})"
        return None

    @property
    def trusted_origin(self) -> str | None:
        return self._origin

    async def start(self, ctx: ProviderContext) -> None:
        self.http = ctx.http

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        body = to_native(req, route.model or req.model, output_formats=self.capabilities.output_formats,
                         response_format=self.response_format)
        edit = req.is_edit
        # aiohttp copies the headers (into the request's own CIMultiDict)
        headers: Mapping[str, str] = self._headers if edit else self._json_headers
        total = route.timeout or self.default_timeout
        timeout = self._timeouts.get(total)
        if timeout is None:
            timeout = self._timeouts[total] = aiohttp.ClientTimeout(total=total)
        if req.stream and req.partial_images and self.options.get("stream") and partials_wanted():
            body.update(stream=True, partial_images=req.partial_images)
            headers = {**headers, "Accept": "text/event-stream, application/json"}
        data: aiohttp.FormData | bytes
        if edit:
            url, data = f"{self.base_url}/images/edits", edit_form(body, req)
        else:
            # The JSON as bytes (Content-Type in the headers): json= would encode it with json.dumps.
            url, data = f"{self.base_url}/images/generations", jsonbytes.dumps(body)
        try:
            async with started(self.http).post(url, data=data, headers=headers, timeout=timeout,
                                               allow_redirects=False) as resp:
                status = resp.status
                # Only an error reads Retry-After; the Content-Type is parsed only where it may be a stream.
                retry_after = retry_after_from_headers(resp.headers) if status >= 400 else None
                if (status < 300 and "event-stream" in resp.headers.get("Content-Type", "").lower()
                        and resp.content_type == "text/event-stream"):
                    return await read_event_stream(resp, req, self._redacted)
                raw = await read_answer(resp, answer_limit(req))
        except TimeoutError:
            raise UpstreamTimeout(f"no answer within {timeout.total:.0f} s") from None
        except aiohttp.ClientError as e:
            raise UpstreamError(f"cannot reach the upstream ({type(e).__name__})") from None
        if len(raw) <= INLINE_BYTES:  # parsed whole, on the loop: one C call, cheaper than cutting it up
            payload = _json_or_none(raw)
        else:  # the images stay in `raw` (views); only a body that needs a full parse goes to a thread
            payload = split_answer(raw)
            if payload is None:
                payload = await run_cpu(len(raw), _json_or_none, raw)
        if status >= 400:
            raise self._redacted(error_from_status(status, payload, retry_after))
        if payload is None:
            raise UpstreamError(f"the upstream answered HTTP {status} with a body that is not JSON")
        return from_native(payload, req, "output_compression" in body)  # a walk over a few dicts

    def _redacted(self, error: ProxyError) -> ProxyError:
        error.message = redact(error.message, [self.api_key])
        return error
