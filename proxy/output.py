"""The emulation layer: n by parallel calls, url vs b64_json, format conversion and compression."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from PIL import Image

from .errors import InvalidRequest, UpstreamError
from .providers.base import GeneratedImage
from .request import ImageRequest

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "gif": "image/gif", "avif": "image/avif"}
LOSSY = {"jpeg", "webp", "avif"}
# Used when the client asks for a lossy format without output_compression.
DEFAULT_QUALITY = {"jpeg": 90, "webp": 90, "avif": 80}


async def gather_or_cancel(aws: list[Awaitable]) -> list:
    """asyncio.gather that cancels the siblings as soon as one fails."""
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
    chunks = [req.with_chunk(min(per_call, req.n - off), off) for off in range(0, req.n, per_call)]
    results = await gather_or_cancel([call(chunk) for chunk in chunks])
    images = [img for chunk, got in zip(chunks, results, strict=True) for img in _fill_seeds(chunk, got)]
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
        # JPEG has no alpha: flatten on white rather than on black.
        background = Image.new("RGB", im.size, (255, 255, 255))
        rgba = im.convert("RGBA")
        background.paste(rgba, mask=rgba.getchannel("A"))
        im = background
    elif fmt in ("webp", "avif") and im.mode not in ("RGB", "RGBA"):
        im = im.convert("RGBA" if "A" in im.getbands() or im.mode == "P" else "RGB")
    kwargs: dict = {}
    if fmt in LOSSY:
        kwargs["quality"] = DEFAULT_QUALITY[fmt] if compression is None else compression
    if fmt == "png":
        kwargs["optimize"] = False
    im.save(out, format=fmt.upper(), **kwargs)
    return out.getvalue()


def _normal_format(im: Image.Image) -> str:
    fmt = (im.format or "").lower()
    return {"jpg": "jpeg"}.get(fmt, fmt)


def _unchanged(im: Image.Image, target: str | None, compression: int | None, size: tuple[int, int],
               compression_applied: bool) -> bool:
    fmt = _normal_format(im)
    recompress = (target or fmt) in LOSSY and compression is not None and not compression_applied
    return im.size == tuple(size) and (target or fmt) == fmt and fmt in MIME and not recompress


def decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text)
    except (binascii.Error, ValueError):
        raise UpstreamError("the route returned invalid base64") from None


def unchanged_b64_format(text: str, target: str | None, compression: int | None, size: tuple[int, int],
                         compression_applied: bool) -> str | None:
    """The format of base64 image text when it needs no change, judged from its header alone; else None.

    Spares decoding and re-encoding megabytes when an upstream's b64_json goes to a b64_json client.
    """
    im = _open_b64_head(text)
    if im is None:
        return None
    with im:
        return _normal_format(im) if _unchanged(im, target, compression, size, compression_applied) else None


def _open_b64_head(text: str) -> Image.Image | None:
    """Pillow's view of an image's header, from the first 48 KiB of its base64 text."""
    head = text[:65536]
    try:
        return Image.open(io.BytesIO(base64.b64decode(head[: len(head) - len(head) % 4])))
    except Exception:
        return None


def b64_is_image(text: str) -> bool:
    """A cheap check that base64 text starts like an image, so a route that sends garbage falls back."""
    im = _open_b64_head(text)
    if im is None:
        return False
    im.close()
    return True


def convert(
    data: bytes,
    target: str | None,
    compression: int | None,
    size: tuple[int, int],
    compression_applied: bool = False,
) -> Encoded:
    """Bring image bytes to the target format and size; untouched when nothing needs changing.

    target None keeps the produced format. CPU-bound: call it off the event loop.
    """
    try:
        im = Image.open(io.BytesIO(data))
    except Exception:
        raise UpstreamError("the route returned data that is not an image") from None
    with im:
        fmt = _normal_format(im)
        if _unchanged(im, target, compression, size, compression_applied):
            return Encoded(data, fmt, *im.size)
        target = target or (fmt if fmt in MIME else "png")
        im.load()
        if im.size != tuple(size):
            im = im.resize(tuple(size), Image.Resampling.LANCZOS)
        return Encoded(encode_image(im, target, compression), target, *im.size)


async def fetch_image(http: aiohttp.ClientSession, url: str, max_bytes: int, timeout: float = 120) -> bytes:
    """Download an upstream image (URL or data URI) with a size cap."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        try:
            return base64.b64decode(payload) if ";base64" in header else payload.encode()
        except ValueError:
            raise UpstreamError("the route returned a malformed data URI") from None
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                raise UpstreamError(f"downloading the image failed with HTTP {resp.status}")
            chunks, total = [], 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                total += len(chunk)
                if total > max_bytes:
                    raise UpstreamError(f"the image is larger than the {max_bytes} byte download limit")
                chunks.append(chunk)
            return b"".join(chunks)
    except (TimeoutError, aiohttp.ClientError) as e:
        raise UpstreamError(f"downloading the image failed: {type(e).__name__}") from None


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
    max_download_bytes: int = 64 * 1024 * 1024


async def render_images(
    images: list[GeneratedImage],
    req: ImageRequest,
    *,
    store,
    http: aiohttp.ClientSession,
    base_url: str,
    settings: OutputSettings,
) -> tuple[list[dict], list[str | None]]:
    """Turn provider images into OpenAI data items (url or b64_json) of the requested format and size.

    Returns the items and each one's format (None for an upstream URL handed on as it is).
    """

    async def one(img: GeneratedImage) -> tuple[dict, str | None]:
        revised = img.revised_prompt or req.prompt
        hand_on = (
            img.data is None
            and not settings.rehost_upstream_urls
            and req.response_format == "url"
            and req.output_format is None
            and req.output_compression is None
        )
        if hand_on:
            return {"url": img.url, "revised_prompt": revised}, None
        wanted = (req.output_format, req.output_compression, (req.width, req.height), img.compression_applied)
        data = img.data
        if data is None and img.b64 is not None:
            if req.response_format == "b64_json" and (fmt := await asyncio.to_thread(
                    unchanged_b64_format, img.b64, *wanted)):
                return {"b64_json": img.b64, "revised_prompt": revised}, fmt
            data = await asyncio.to_thread(decode_b64, img.b64)
        if data is None:
            data = await fetch_image(http, img.url, settings.max_download_bytes)
        enc = await asyncio.to_thread(convert, data, *wanted)
        if req.response_format == "b64_json":
            b64 = await asyncio.to_thread(lambda: base64.b64encode(enc.data).decode("ascii"))
            return {"b64_json": b64, "revised_prompt": revised}, enc.format
        name = await store.put(enc.data, enc.mime)
        return {"url": f"{base_url.rstrip('/')}/images/{name}", "revised_prompt": revised}, enc.format

    results = await gather_or_cancel([one(img) for img in images])
    return [item for item, _ in results], [fmt for _, fmt in results]
