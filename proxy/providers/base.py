"""What every provider is: a name, its capabilities, and one async method that makes images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp

from ..config import RouteConfig
from ..errors import UpstreamError, UpstreamRefused
from ..http import jsonbytes
from ..media.sizing import DEFAULT_MAX_PIXELS
from ..request import ImageRequest


@dataclass(frozen=True)
class Capabilities:
    # More images per call than this are made by parallel calls (output.py).
    max_images_per_call: int = 1
    # Formats the provider produces when asked; anything else is converted by the proxy.
    output_formats: frozenset[str] = frozenset({"png"})
    # Whether it applies output_compression itself.
    output_compression: bool = False
    # Whether it takes edit requests (ImageRequest.images, and a mask).
    edits: bool = False
    # Whether it takes a mask with an edit.
    masks: bool = False
    # Whether it makes images from text alone (an edit-only model does not).
    generates: bool = True
    # Whether the request's other fields (background, quality, style, vendor options...) go to its upstream
    # as sent: that upstream, not the proxy, then judges a value the proxy does not know, and may make a
    # transparent background. Routes without it make opaque images (never asked for a transparent one).
    hands_on_fields: bool = False


@dataclass
class GeneratedImage:
    """One image from a provider: bytes, or a URL the proxy downloads (or hands on)."""

    data: bytes | None = None
    url: str | None = None
    # Base64 text as an upstream sent it (str, or its bytes: a memoryview of the upstream's answer): handed
    # on untouched when nothing needs converting.
    b64: str | bytes | memoryview | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    revised_prompt: str | None = None
    # The provider already encoded with the requested output_compression.
    compression_applied: bool = False
    # Accelerator seconds spent making this image (local engines and Ray replicas measure it); None: unknown.
    gpu_seconds: float | None = None


@dataclass
class ProviderContext:
    """Shared resources handed to providers at start-up."""

    http: aiohttp.ClientSession
    extras: dict[str, Any] = field(default_factory=dict)


class Provider(ABC):
    kind: ClassVar[str]
    capabilities: Capabilities = Capabilities()

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None) -> None:
        self.name = name
        self.options = options
        self.missing_vars = list(missing_vars or [])

    @property
    def unavailable_reason(self) -> str | None:
        """Why this provider cannot serve now (missing key, model not loaded...); None when it can."""
        return None

    @property
    def loading_stage(self) -> str | None:
        """While the provider is getting ready (a model loading): what it is doing now; else None.

        A loading provider is also unavailable (unavailable_reason is set), but the router waits for it
        (wait_ready) instead of treating it as missing.
        """
        return None

    @property
    def state(self) -> str:
        """ready | loading | missing_key | no_gpu | unavailable: for /health, /ready and /metrics."""
        if self.unavailable_reason is None:
            return "ready"
        if self.loading_stage:
            return "loading"
        return "missing_key" if self.missing_vars else "unavailable"

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a loading provider to become usable; True once it is."""
        return self.unavailable_reason is None

    def preflight(self) -> str | None:
        """For `models` / `check-config`: what would stop this provider serving, without starting it."""
        return self.unavailable_reason

    @property
    def config_problem(self) -> str | None:
        """A mistake in this provider's own options that makes it unusable (None: none). check-config
        reports it even where the model falls back to another, usable route."""
        return None

    def lora_file(self, path: str) -> str | None:
        """The file on this machine that a request's LoRA `path` loads (for the seeded-request cache's
        content hash); None where the proxy cannot see it (an upstream's LoRAs, a URL not yet downloaded).
        Blocking (file system): call it off the event loop."""
        return None

    @property
    def qualities(self) -> frozenset[str]:
        """Values of `quality` this provider documents beyond OpenAI's (a local engine's quality_tiers keys)."""
        return frozenset()

    @property
    def trusted_origin(self) -> str | None:
        """scheme://host:port whose image URLs this provider's answers may point at even when it is not a
        public address (the operator chose it); other URLs are fetched under the general SSRF rules."""
        return None

    @property
    def default_timeout(self) -> float:
        return float(self.options.get("timeout", 300))

    async def start(self, ctx: ProviderContext) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def warnings(self) -> list[str]:
        """Options this provider serves without (e.g. a speed option that failed at load), with the reason;
        it still serves. For /health, /ready and `check-config`."""
        return []

    def describe(self) -> dict[str, Any]:
        info = {"name": self.name, "kind": self.kind, "state": self.state, "ready": self.unavailable_reason is None,
                "reason": self.unavailable_reason}
        if warnings := self.warnings:
            info["warnings"] = list(warnings)
        return info

    @abstractmethod
    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        """Make req.n images (n <= capabilities.max_images_per_call) of req.width x req.height."""


# ---- reading an upstream's answer ----------------------------------------------------------------------
# Every call to an upstream is made with allow_redirects=False and read through read_answer (or
# answer_lines for a stream): a broken or hostile upstream gets neither the request a second time
# elsewhere nor the proxy's memory.

# Pixels an answer's image may have, at least (output.py accepts the larger of this and 4x the asked size).
MIN_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
# The JSON around the images (seeds, prompts, timings...).
ANSWER_SLACK = 1 << 20
# A small answer: an acknowledgement, a status, a cancel, a pool's stats.
SMALL_ANSWER = 1 << 20


def started(http: aiohttp.ClientSession | None) -> aiohttp.ClientSession:
    """The shared HTTP session a provider keeps from start(): a call before start() is an upstream error,
    not an AttributeError on None."""
    if http is None:
        raise UpstreamError("the provider was not started")
    return http


def json_or_none(raw: bytes) -> Any:
    """An answer's JSON (as json.loads reads it), or None for a body that is not JSON."""
    try:
        return jsonbytes.loads(raw)
    except ValueError:
        return None


def answer_limit(req: ImageRequest) -> int:
    """The most bytes a legitimate answer to `req` can take: per image, a PNG of the largest size output.py
    accepts (the larger of 16 MP and 4x the asked pixels) stored without compression as RGBA, in base64
    (16/3 bytes a pixel: 85 MiB for each image up to 4 MP), plus ANSWER_SLACK."""
    pixels = max(MIN_IMAGE_PIXELS, 4 * req.width * req.height)
    return req.n * pixels * 16 // 3 + ANSWER_SLACK


def _too_large(upstream: str, limit: int) -> UpstreamError:
    return UpstreamError(f"the answer from {upstream} is larger than the {limit} byte limit for it")


async def read_answer(resp: aiohttp.ClientResponse, limit: int, upstream: str = "the upstream") -> bytes:
    """The body of an answer (decompressed), at most `limit` bytes; UpstreamError for a larger one.

    A redirect (3xx) is refused (UpstreamRefused: the next route is tried): an API endpoint that redirects
    is misconfigured or hostile, and following it would send the request, and on 307/308 its body (the
    prompt, the input images), wherever it points."""
    if 300 <= resp.status < 400:
        raise UpstreamRefused(f"{upstream} answered HTTP {resp.status}, a redirect: API calls follow no "
                              "redirects (check the provider's base_url)")
    if (length := resp.content_length) is not None and length > limit:
        raise _too_large(upstream, limit)
    chunks, size = [], 0
    stream = resp.content
    read = stream.readany  # what iter_any() awaits, without its iterator: b"" at the end
    while chunk := await read():  # after decompression: a gzip bomb stops at the limit
        size += len(chunk)
        if size > limit:
            raise _too_large(upstream, limit)
        chunks.append(chunk)
        if stream.at_eof():  # all of it read (a small answer: at once): no await for the b"" that says so
            break
    return b"".join(chunks)


async def answer_lines(stream: aiohttp.StreamReader, limit: int,
                       upstream: str = "the upstream") -> AsyncIterator[bytes]:
    """The lines of a streamed answer (SSE, NDJSON) without their line ends, then b"", each at most `limit`
    bytes (UpstreamError past it). aiohttp's own line reader refuses lines over 512 KiB: not one image."""
    buf = bytearray()
    async for chunk in stream.iter_any():
        start, search = 0, len(buf)  # only the new bytes can hold a new line end
        buf += chunk
        while (end := buf.find(b"\n", search)) != -1:
            if end - start > limit:
                raise _too_large(upstream, limit)
            yield bytes(buf[start:end]).rstrip(b"\r")
            start = search = end + 1
        del buf[:start]
        if len(buf) > limit:
            raise _too_large(upstream, limit)
    if buf:
        yield bytes(buf).rstrip(b"\r")
    yield b""
