"""The images a client sends to edit: read from multipart parts or the JSON variant's image_url
(data URLs, or http(s) URLs through the guarded fetcher), each checked before anything decodes it.

Whatever a part's Content-Type says (the SDK sends application/octet-stream), the bytes must be a
PNG, JPEG, WebP or GIF whose header is within the pixel limit, and must decode. Bytes that would read
wrong downstream are re-encoded once here: an EXIF-rotated photo upright, 16-bit greyscale as 8-bit.
"""

from __future__ import annotations

import asyncio
import binascii
import io
from collections.abc import Callable
from typing import Any

import pybase64 as base64  # the same API as the standard library's, 20-40x faster on megabytes
from PIL import Image, ImageOps

from ..errors import InvalidRequest
from ..http.body import Upload
from ..request import InputImage
from .fetch import FetchError, FetchPolicy, GuardedFetcher
from .imagecheck import NAMES, NOT_AN_IMAGE, BadImage, check_image

EDIT_FORMATS = ("png", "jpeg", "webp", "gif")


def check_input(data: bytes, param: str, max_pixels: int) -> InputImage:
    """Structure and header first (cheap, bounded), then a full decode. CPU: call off the event loop."""
    if not data:
        raise InvalidRequest(f"Invalid '{param}': the image is empty.", param=param, code="invalid_image")
    try:
        info = check_image(data, max_pixels=max_pixels)
    except BadImage as e:
        if str(e) == NOT_AN_IMAGE:  # (the checker knows AVIF too, which no edit takes)
            raise InvalidRequest(f"Invalid '{param}': not a PNG, JPEG, WebP or GIF image.", param=param,
                                 code="invalid_image") from None
        raise InvalidRequest(f"Invalid '{param}': {e}.", param=param, code="invalid_image") from None
    if info.format not in EDIT_FORMATS:
        raise InvalidRequest(f"Invalid '{param}': an {NAMES[info.format]} image; send a PNG, JPEG, WebP or GIF.",
                             param=param, code="invalid_image_format")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if _needs_rewrite(im):
                im.load()
                upright = _upright(im, param)
            else:
                # Only whether it decodes: a JPEG at 1/8 scale (libjpeg still reads every byte of it),
                # not megabytes of pixels nobody keeps.
                if im.format == "JPEG":
                    im.draft(None, (1, 1))
                im.load()
                upright = None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise InvalidRequest(f"Invalid '{param}': the image does not decode.", param=param,
                             code="invalid_image") from None
    if upright is not None:
        return upright
    return InputImage(data, info.format, info.width, info.height, param)


# 16-bit greyscale (and 32-bit) modes: Pillow's convert() to RGB, L or RGBA clips them at 255, so every
# reader of these bytes downstream (the local engine, the placeholder) would see a white image.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
_ORIENTATION = 0x0112


def _orientation(im: Image.Image) -> int:
    try:
        return im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block (Pillow raises many kinds) is no reason to refuse the picture
        return 1


def _needs_rewrite(im: Image.Image) -> bool:
    """Whether the bytes read otherwise than the picture is displayed (known from the header)."""
    return _orientation(im) in range(2, 9) or im.mode in _WIDE_MODES


def _upright(im: Image.Image, param: str) -> InputImage | None:
    """The image as it is displayed, re-encoded, when its bytes read otherwise: an EXIF orientation
    (a phone photo is stored sideways; the output's shape and what the model sees must follow the
    picture), or pixels wider than 8 bits. None when the bytes are fine as they are."""
    rotated = _orientation(im) in range(2, 9)
    wide = im.mode in _WIDE_MODES
    if not rotated and not wide:
        return None
    # A photo stays a JPEG (high quality, not megabytes of PNG); anything else becomes a lossless PNG.
    fmt = "jpeg" if im.format == "JPEG" and not wide else "png"
    icc = im.info.get("icc_profile")
    if rotated:
        im = ImageOps.exif_transpose(im)
    if wide:
        # The full range onto 0..255: 16-bit data spans 0..65535 (I and F are read as 16-bit too).
        im = im.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    out = io.BytesIO()
    im.save(out, format=fmt.upper(), icc_profile=icc, **({"quality": 95} if fmt == "jpeg" else {}))
    return InputImage(out.getvalue(), fmt, im.width, im.height, param)


def _data_url(url: str, param: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if ";base64" not in header.lower():
        raise InvalidRequest(f"Invalid '{param}': a data URL must be base64.", param=param, code="invalid_image")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise InvalidRequest(f"Invalid '{param}': the image is larger than {max_bytes} bytes.", param=param,
                             code="invalid_image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Invalid '{param}': the data URL is not valid base64.", param=param,
                             code="invalid_image") from None


def json_image_refs(fields: dict[str, Any]) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """The JSON variant: `images: [{image_url}]`, `mask: {image_url}` -> [(param, url)], mask (param, url)."""
    images = fields.pop("images", None)
    mask = fields.pop("mask", None)
    refs = []
    if images is not None:
        if not isinstance(images, list) or not images:
            raise InvalidRequest("Invalid 'images': must be a non-empty array of {image_url}.", param="images")
        for i, item in enumerate(images):
            url = item.get("image_url") if isinstance(item, dict) else None
            if not isinstance(url, str) or not url:
                raise InvalidRequest(f"Invalid 'images[{i}]': needs an image_url (file_id is not supported).",
                                     param="images")
            refs.append((f"images[{i}]", url))
    mask_ref = None
    if mask is not None:
        url = mask.get("image_url") if isinstance(mask, dict) else None
        if not isinstance(url, str) or not url:
            raise InvalidRequest("Invalid 'mask': needs an image_url.", param="mask")
        mask_ref = ("mask", url)
    return refs, mask_ref


class InputReader:
    """Turns uploads and image URLs into checked InputImages."""

    def __init__(self, fetcher: GuardedFetcher, policy: FetchPolicy | None, max_pixels: int, max_bytes: int) -> None:
        self.fetcher = fetcher
        self.policy = policy  # None: image URLs other than data: are refused
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        # One request's inputs are decoded one after another (their fetches still overlap): its peak is
        # the largest input's decode, not the sum of all of them (a progressive 4096x4096 JPEG: ~130 MB).
        self._decoding = asyncio.Lock()

    async def _check(self, fn: Callable[..., InputImage], *args: Any) -> InputImage:
        async with self._decoding:
            return await asyncio.to_thread(fn, *args)

    async def from_url(self, param: str, url: str) -> InputImage:
        if url[:5].lower() == "data:":  # a scheme is case-insensitive: DATA:image/png;base64,... is one too
            # Decoding tens of megabytes of base64 is CPU work: in the thread, with the check.
            return await self._check(self._check_data_url, param, url)
        if self.policy is None:
            raise InvalidRequest(f"Invalid '{param}': image URLs are not fetched by this server; send the image "
                                 "itself (a data: URL or a file upload).", param=param, code="invalid_image_url")
        try:
            data = await self.fetcher.fetch(url, self.policy)
        except FetchError as e:
            raise InvalidRequest(f"Invalid '{param}': the image could not be fetched: {e}.", param=param,
                                 code="invalid_image_url") from None
        return await self._check(check_input, data, param, self.max_pixels)

    def _check_data_url(self, param: str, url: str) -> InputImage:
        return check_input(_data_url(url, param, self.max_bytes), param, self.max_pixels)

    async def from_upload(self, param: str, upload: Upload) -> InputImage:
        return await self._check(check_input, upload.data, param, self.max_pixels)
