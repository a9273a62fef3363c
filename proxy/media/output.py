"""The emulation layer: n by parallel calls, image checks, format conversion and compression, url vs b64_json."""

from __future__ import annotations

import asyncio
import binascii
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import pybase64 as base64  # the same API as the standard library's, 20-40x faster on megabytes
from PIL import Image
from yarl import URL

from ..errors import InvalidRequest, UpstreamError
from ..http.cpu import run_cpu
from ..request import ImageRequest
from ..telemetry import tracing

if TYPE_CHECKING:
    from ..providers.base import GeneratedImage
    from ..state.store import ImageStore
from .fetch import FetchError, FetchPolicy, GuardedFetcher
from .imagecheck import BadImage, ImageInfo, check_image

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif", "avif": "image/avif"}
LOSSY = {"jpeg", "webp", "avif"}
# Used when the client asks for a lossy format without output_compression.
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90, "avif": 80}


async def gather_or_cancel(aws: list[Awaitable]) -> list:
    """asyncio.gather that cancels the siblings as soon as one fails. One awaitable is awaited as it is:
    no task and no gather (the common n=1: three of them per request)."""
    if len(aws) == 1:
        return [await aws[0]]
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def generate_n(
    call: Callable[[ImageRequest], Awaitable[list[GeneratedImage]]],
    req: ImageRequest,
    per_call: int,
) -> list[GeneratedImage]:
    """Make req.n images with calls of at most per_call images; image i gets seed + i."""
    per_call = max(1, per_call)
    if req.n <= per_call:  # one call (the common case): no chunks to split off and gather
        return all_images(req, await call(req))
    chunks = [req.with_chunk(min(per_call, req.n - off), off) for off in range(0, req.n, per_call)]
    results = await gather_or_cancel([call(chunk) for chunk in chunks])
    return _first_n(req, [img for chunk, got in zip(chunks, results, strict=True) for img in _fill_seeds(chunk, got)])


def all_images(req: ImageRequest, images: list[GeneratedImage]) -> list[GeneratedImage]:
    """The req.n images of one call that was to make them all (seeded as generate_n seeds them)."""
    return _first_n(req, _fill_seeds(req, images))


def _first_n(req: ImageRequest, images: list[GeneratedImage]) -> list[GeneratedImage]:
    if len(images) < req.n:
        raise UpstreamError(f"the route returned {len(images)} of {req.n} images")
    return images[: req.n]


def _fill_seeds(chunk: ImageRequest, images: list[GeneratedImage]) -> list[GeneratedImage]:
    for i, img in enumerate(images):
        if img.seed is None and chunk.seed is not None:
            img.seed = chunk.with_chunk(1, i).seed
    return images


@dataclass
class Encoded:
    data: bytes
    format: str
    width: int
    height: int

    @property
    def mime(self) -> str:
        return MIME[self.format]


def encode_image(im: Image.Image, fmt: str, compression: int | None) -> bytes:
    """Encode a Pillow image in fmt; compression is OpenAI's output_compression (100 = best quality)."""
    out = io.BytesIO()
    if fmt == "jpeg" and im.mode != "RGB":
        im = flatten(im)  # JPEG has no alpha: on white rather than on black
    elif fmt in ("webp", "avif") and im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() or im.mode == "P" else "RGB")
    kwargs: dict = {}
    if fmt in LOSSY:
        kwargs["quality"] = DEFAULT_QUALITY[fmt] if compression is None else compression
    if fmt == "png":
        kwargs["optimize"] = False
    # Measured at 1024x1024 on a photo-like image: WebP method 2 is 65 ms for 301 KB (the default
    # method 4: 108 ms, 313 KB); AVIF speed 8 is 97 ms for 278 KB (the default: 296 ms, 281 KB).
    elif fmt == "webp":
        kwargs["method"] = 2
    elif fmt == "avif":
        kwargs["speed"] = 8
    im.save(out, format=fmt.upper(), **kwargs)
    return out.getvalue()


def flatten(im: Image.Image) -> Image.Image:
    """The image on white, without alpha: what an image with transparent pixels becomes where the client
    asked for an opaque one (or a format without alpha). White, as JPEG conversions have always been here."""
    background = Image.new("RGB", im.size, (255, 255, 255))
    rgba = im.convert("RGBA")
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def fit(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Exactly `size`: centre-cropped to its aspect ratio, then resized; never stretched.

    Routes with fixed ratio tables answer with a nearby shape; every route of a model must still give
    the resolved size.
    """
    width, height = im.size
    target = size[0] / size[1]
    if width / height > target:  # too wide: trim the sides
        keep = max(1, round(height * target))
        box = ((width - keep) // 2, 0, (width - keep) // 2 + keep, height)
    else:  # too tall: trim top and bottom
        keep = max(1, round(width / target))
        box = (0, (height - keep) // 2, width, (height - keep) // 2 + keep)
    return im.resize(size, Image.Resampling.LANCZOS, box=box)


def _b64(data: bytes) -> bytes:
    """Base64 text as ASCII bytes: it goes into the response body as it is."""
    return base64.b64encode(data)


def decode_b64(text: str | bytes | memoryview) -> bytes:
    """Lenient: line breaks and other junk between the base64 characters are skipped; not ASCII is an error."""
    if not isinstance(text, str) and not bytes(text).isascii():
        raise UpstreamError("the route returned invalid base64")
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError):
        raise UpstreamError("the route returned invalid base64") from None


def _strict_b64(text: str | bytes | memoryview) -> bytes | None:
    """The bytes of text that is pure base64 (safe to hand on inside JSON as it is); else None."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _needs_change(info: ImageInfo, target: str | None, compression: int | None, size: tuple[int, int],
                  compression_applied: bool) -> bool:
    fmt = target or info.format
    recompress = fmt in LOSSY and compression is not None and not compression_applied
    return (info.width, info.height) != tuple(size) or fmt != info.format or recompress


def inspect(data: bytes, max_pixels: int | None = None) -> ImageInfo:
    """The structural check every image passes before it can reach a client (CPU: off the event loop)."""
    try:
        return check_image(data, max_pixels=max_pixels)
    except BadImage as e:
        raise UpstreamError(f"the route returned a bad image: {e}") from None


def convert(
    data: bytes,
    target: str | None,
    compression: int | None,
    size: tuple[int, int],
    compression_applied: bool = False,
    max_pixels: int | None = None,
) -> Encoded:
    """Bring image bytes to the target format and size; untouched (checked structurally) when nothing
    needs changing, else fully decoded and re-encoded. target None keeps the produced format.

    CPU-bound: call it off the event loop. Any flaw in the bytes is an UpstreamError (the route failed).
    """
    info = inspect(data, max_pixels)
    if not _needs_change(info, target, compression, size, compression_applied):
        return Encoded(data, info.format, info.width, info.height)
    return reencode(data, info, target, compression, size)


def reencode(data: bytes, info: ImageInfo, target: str | None, compression: int | None,
             size: tuple[int, int], opaque: bool = False) -> Encoded:
    """Decode checked image bytes in full and encode them in the target format at exactly `size`
    (`opaque`: flattened on white)."""
    target = target or info.format
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            im = opened if opened.size == tuple(size) else fit(opened, size)
            if opaque:
                im = flatten(im)
            return Encoded(encode_image(im, target, compression), target, *im.size)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UpstreamError(f"the route returned an image that does not decode ({type(e).__name__})") from None


async def fetch_image(fetcher: GuardedFetcher, url: str, policy: FetchPolicy) -> bytes:
    """An upstream image by URL (through the guarded fetcher) or data URI."""
    if url[:5].lower() == "data:":  # any case: the fetcher refuses data: URLs, they are decoded here
        header, _, payload = url.partition(",")
        if ";base64" not in header.lower():
            raise UpstreamError("the route returned a data URI that is not base64")
        if len(payload) > policy.max_bytes * 4 // 3 + 4:
            raise UpstreamError(f"the image is larger than the {policy.max_bytes} byte download limit")
        return await asyncio.to_thread(decode_b64, payload)
    try:
        return await fetcher.fetch(url, policy)
    except FetchError as e:
        raise UpstreamError(f"downloading the image failed: {e}") from None


def url_policy(url: str, general: FetchPolicy, trusted_origin: str | None) -> FetchPolicy:
    """The rules for an image URL a provider answered with: its own origin (the operator configured
    it, be it on the loopback or the office network) is trusted; any other URL gets the general rules."""
    if trusted_origin:
        try:
            parsed = URL(url)
            if parsed.is_absolute() and str(parsed.origin()) == trusted_origin:
                return replace(general, allow_private=True, allow_http=True,
                               allowed_hosts=frozenset({parsed.host or ""}))
        except ValueError:
            pass
    return general


def check_output_request(req: ImageRequest) -> None:
    # Same rule as OpenAI: compression only means something for lossy formats.
    if req.output_compression is not None and req.output_format is not None and req.output_format not in LOSSY:
        raise InvalidRequest(
            f"output_compression applies to jpeg, webp and avif, not {req.output_format}.",
            param="output_compression",
        )


@dataclass
class OutputSettings:
    rehost_upstream_urls: bool = True
    # Rules for the image URLs upstreams answer with (SSRF guard); max_bytes caps each download.
    fetch_policy: FetchPolicy = field(default_factory=FetchPolicy)
    # Images the proxy checks or decodes may have at most this many pixels (or 4x the requested size,
    # whichever is more): a tiny file that claims 100000x100000 is refused before anything decodes.
    max_image_pixels: int = 4096 * 4096


@dataclass
class FinalImage:
    """An image as the client will get it: checked, in the requested format and size."""

    data: bytes | None
    format: str | None
    seed: int | None = None
    revised_prompt: str | None = None
    # Base64 text of exactly `data` (the upstream's own, or encoded here: str or ASCII bytes), handed on
    # into the response as it is.
    b64: str | bytes | memoryview | None = None
    # An upstream URL handed on untouched (store.rehost_upstream_urls: false and nothing to convert).
    url: str | None = None
    # Whether a pixel is not fully opaque (has_transparency); None: not looked at (a request without stream
    # that asked no background, or the image is a URL handed on unseen).
    transparent: bool | None = None

    @property
    def mime(self) -> str:
        return MIME[self.format] if self.format else "application/octet-stream"  # a URL handed on


def _checked_bytes(img: GeneratedImage, data: bytes | None, req: ImageRequest,
                   max_pixels: int) -> tuple[bytes, ImageInfo, FinalImage | None]:
    """The image's bytes (decoded from base64 when needed), what its header says, and the final image
    when it passes through untouched (None: it needs converting)."""
    keep_b64 = False
    if data is None:
        text = img.b64 or b""  # the caller downloaded the bytes of an image without base64
        data = _strict_b64(text)
        keep_b64 = data is not None
        if data is None:  # line breaks or junk: decode leniently, re-encode on the way out
            data = decode_b64(text)
    info = inspect(data, max_pixels)
    if _needs_change(info, req.output_format, req.output_compression, (req.width, req.height),
                     img.compression_applied):
        return data, info, None
    b64 = img.b64 if keep_b64 else None
    # Handed on as the upstream's base64 text: the decoded bytes were needed for the check only.
    kept = None if b64 is not None and req.response_format == "b64_json" else data
    return data, info, FinalImage(kept, info.format, img.seed, img.revised_prompt, b64=b64)


def _converted(img: GeneratedImage, data: bytes, info: ImageInfo, req: ImageRequest) -> FinalImage:
    enc = reencode(data, info, req.output_format, req.output_compression, (req.width, req.height))
    return FinalImage(enc.data, enc.format, img.seed, img.revised_prompt)


async def finish_images(images: list[GeneratedImage], req: ImageRequest, *, fetcher: GuardedFetcher,
                        settings: OutputSettings, trusted_origin: str | None = None) -> list[FinalImage]:
    """Download, check and convert a route's images: part of the route attempt, so a failure falls back.

    `trusted_origin` is the answering provider's own origin (scheme://host:port) whose URLs it may serve.
    """
    max_pixels = max(settings.max_image_pixels, 4 * req.width * req.height)

    async def one(img: GeneratedImage) -> FinalImage:
        hand_on = (
            img.data is None and img.b64 is None
            and not settings.rehost_upstream_urls
            and req.response_format == "url"
            and req.output_format is None
            and req.output_compression is None
        )
        if hand_on:
            return FinalImage(None, None, img.seed, img.revised_prompt, url=img.url)
        data = img.data
        if data is None and img.b64 is None:
            if img.url is None:  # a provider's bug: nothing to check, and the route fails like any other
                raise UpstreamError("the upstream answered an image without data or a URL")
            data = await fetch_image(fetcher, img.url, url_policy(img.url, settings.fetch_policy, trusted_origin))
        size = len(data) if data is not None else len(img.b64 or b"")
        traced = tracing.current() is not None
        with tracing.span("image.check", {"qip.bytes": size} if traced else None) as span:
            checked, info, final = await run_cpu(size, _checked_bytes, img, data, req, max_pixels)
            if traced:
                span.set_attributes({"qip.format": info.format, "qip.width": info.width, "qip.height": info.height,
                                     "qip.converted": final is None})
        if final is None:
            # A conversion decodes pixels: a small file can still be a large picture, so always a thread.
            with tracing.span("image.convert", {"qip.to_format": req.output_format,
                                                "qip.compression": req.output_compression}):
                final = await asyncio.to_thread(_converted, img, checked, info, req)
        # The answer's `background` (and a stream's completed events, which always carry one) says what the
        # image is, not what was asked. Nothing is decoded for an image without alpha (its header says so).
        if req.background is not None or req.stream:
            data = final.data if final.data is not None else checked
            final.transparent = await is_transparent(data)
            if final.transparent and req.background == "opaque":
                # The client asked for an opaque image and the route made transparent pixels: flattened
                # here, in its format and size (what a route lacks, the proxy emulates).
                enc = await asyncio.to_thread(reencode, data, info, final.format, req.output_compression,
                                              (req.width, req.height), True)
                final = FinalImage(enc.data, enc.format, img.seed, img.revised_prompt, transparent=False)
        return final

    return await gather_or_cancel([one(img) for img in images])


def has_transparency(data: bytes, header_only: bool = False) -> bool:
    """Whether a checked image has a pixel that is not fully opaque. One without alpha (or a transparent
    colour) is known from its header; only one with it is decoded (CPU: off the event loop).
    `header_only`: True for one with alpha, without decoding it (whether it may have such a pixel)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if "A" not in im.getbands() and "transparency" not in im.info:
                return False
            if header_only:
                return True
            low, _ = im.convert("RGBA").getchannel("A").getextrema()  # one band: two numbers
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UpstreamError(f"the route returned an image that does not decode ({type(e).__name__})") from None
    return bool(low < 255)  # type: ignore[operator]  # (typed for several bands)


async def is_transparent(data: bytes) -> bool:
    """has_transparency from the event loop: the header is read there (most images have no alpha: done), the
    pixels in a thread. Not by file size: a 6 KB PNG can be a 1024x1024 picture, ~20 ms of decoding."""
    if not has_transparency(data, header_only=True):
        return False
    return await asyncio.to_thread(has_transparency, data)


async def background_of(images: list[FinalImage]) -> str | None:
    """The answer's `background`: "transparent" when every image has transparent pixels, else "opaque";
    None when one was not seen (an upstream URL handed on)."""
    for img in images:
        if img.transparent is None and img.data is not None:  # from the seeded-request cache: not yet looked at
            img.transparent = await is_transparent(img.data)
    if any(img.transparent is None for img in images):
        return None
    return "transparent" if all(img.transparent for img in images) else "opaque"


def _ready_item(img: FinalImage, req: ImageRequest) -> dict | None:
    """The data item of an image that needs nothing awaited (a URL handed on, or base64 at hand); else None."""
    revised = img.revised_prompt or req.prompt
    if img.url is not None:
        return {"url": img.url, "revised_prompt": revised}
    if req.response_format == "b64_json" and img.b64:
        return {"b64_json": img.b64, "revised_prompt": revised}
    return None


async def render_images(finals: list[FinalImage], req: ImageRequest, *, store: ImageStore,
                        base_url: str) -> list[dict]:
    """FinalImages -> OpenAI data items (url from the store, or b64_json)."""
    ready = [_ready_item(img, req) for img in finals]
    if None not in ready:  # the usual answer: no coroutine per image
        return ready  # type: ignore[return-value]  # None is not in it

    async def one(img: FinalImage, item: dict | None) -> dict:
        if item is not None:
            return item
        revised = img.revised_prompt or req.prompt
        data = img.data
        assert data is not None  # a final image without a URL has its bytes, or base64 handed on
        if req.response_format == "b64_json":
            return {"b64_json": await run_cpu(len(data), _b64, data), "revised_prompt": revised}
        with tracing.span("store.upload", {"qip.store": type(store).__name__, "qip.bytes": len(data)}
                          if tracing.current() is not None else None):
            name = await store.put(data, img.mime)
        return {"url": await store.url_for(name, base_url), "revised_prompt": revised}

    return await gather_or_cancel([one(img, item) for img, item in zip(finals, ready, strict=True)])
