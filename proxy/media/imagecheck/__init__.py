"""Structural image checks: is this a whole image, which format, how large -- without decoding pixels.

Images that pass through the proxy untouched still must not reach a client corrupt (the usual fault is a
truncated download). A full decode costs tens of milliseconds for a 3 MB image; these checks read only
the container: headers, chunk / segment / box lengths and the few fields that give the dimensions, so
they cost well under a millisecond (a PNG's CRC-32s over all its data are the biggest part, ~0.15 ms/MB).

    check_image(data, max_pixels=...) -> ImageInfo(format, width, height)   or raises BadImage

What each format's check (a module each: png, jpeg, webp, gif, avif) covers:

- PNG: signature; every chunk's length and CRC-32; IHDR first with a valid size, bit depth and colour
  type; the lengths of the fixed-size ancillary chunks; PLTE / tRNS placement; consecutive IDATs; IEND.
  Bytes after IEND are tolerated (only truncation is an error).
- JPEG: the marker segments up to the first scan, segment by segment (one 8-bit frame header with 1, 3
  or 4 components; Huffman and quantisation tables; the scan header; no reserved or stand-alone
  markers); then the file must end with EOI (FFD9), trailing zero padding allowed. Entropy-coded data
  is not read, so a truncation anywhere is caught but a damaged scan is not.
- WebP: the RIFF size must match the data length (one pad byte allowed); the chunks must tile the RIFF
  payload; the VP8 / VP8L bitstream headers give the size; extended files (VP8X) are checked for the
  chunk layout libwebp's demuxer accepts (alpha before its image, animation frames inside the canvas).
- GIF: header, logical screen, colour tables, every extension and image block's sub-block chain, the
  trailer (bytes after it are tolerated); each frame must lie inside the logical screen, and the
  extensions whose first block has a fixed size must have it.
- AVIF: ftyp with an avif/avis brand; the top-level boxes must add up exactly to the data length;
  the meta box (hdlr 'pict', pitm, iloc, iinf, iprp) gives the primary item and its 'ispe' size; every
  item extent must lie inside the file. Where Pillow has AVIF support, libavif's container parse (no
  pixel decoding, a few microseconds) also runs, which also gives the size of image sequences.

Where the specification and a reader disagree, the check takes the stricter side: what passes here,
Pillow's Image.open reads with the same format and size.

``max_pixels`` refuses an image whose header claims more pixels than the limit, before anything decodes
it (decompression bombs). Any input raises nothing but BadImage, allocates nothing in proportion to the
sizes it claims, and costs time linear in its length (worst cases, millions of tiny chunks or blocks,
run ~0.1-0.2 us a byte: call it off the event loop for large inputs).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from .avif import check_avif
from .base import BadImage, Limit
from .gif import check_gif
from .jpeg import check_jpeg
from .png import PNG_SIGNATURE, check_png
from .webp import check_webp

__all__ = ["BadImage", "ImageInfo", "check_image", "sniff"]


class ImageInfo(NamedTuple):  # a tuple: half the cost of a frozen dataclass, on every image checked
    format: str  # "png" | "jpeg" | "webp" | "gif" | "avif"
    width: int
    height: int


NOT_AN_IMAGE = "not a PNG, JPEG, WebP, GIF or AVIF image"
NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "gif": "GIF", "avif": "AVIF"}

_unpack = struct.unpack_from
_AVIF_BRANDS = {b"avif", b"avis"}
_AVIF_MAJOR_BRANDS = (b"avif", b"avis", b"mif1", b"msf1")  # HEIF's brands may lead, with avif compatible


def sniff(data: bytes | bytearray | memoryview) -> str | None:
    """The image format named by the magic bytes at the start of ``data``, or None if it is none of ours."""
    head = bytes(data[:32])
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in _AVIF_MAJOR_BRANDS and _ftyp_brands(data) & _AVIF_BRANDS:
        return "avif"
    return None


def _ftyp_brands(buf: bytes | bytearray | memoryview) -> set[bytes]:
    """The major and compatible brands of a leading ftyp box (empty if there is none)."""
    if len(buf) < 16 or bytes(buf[4:8]) != b"ftyp":
        return set()
    size = min(_unpack(">I", buf, 0)[0], len(buf), 4096)
    head = bytes(buf[8:size])
    return {head[0:4]} | {head[i : i + 4] for i in range(8, len(head) - 3, 4)}


def check_image(data: bytes | bytearray | memoryview, *, max_pixels: int | None = None) -> ImageInfo:
    """Check that ``data`` is a whole PNG, JPEG, WebP, GIF or AVIF image and read its size from the header.

    Raises BadImage when it is not, or when width * height is over ``max_pixels``. Never decodes pixels.
    """
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    fmt = sniff(buf)
    if fmt is None:
        raise BadImage(NOT_AN_IMAGE)

    def limit(width: int, height: int) -> None:
        if max_pixels is not None and width * height > max_pixels:
            raise BadImage(
                f"image is {width}x{height} ({width * height} pixels), over the limit of {max_pixels} pixels"
            )

    try:
        width, height = _CHECKS[fmt](buf, limit)
    except (IndexError, struct.error) as exc:  # a safety net: the parsers check bounds before they read
        raise BadImage(f"{NAMES[fmt]} image is malformed") from exc
    limit(width, height)
    return ImageInfo(fmt, width, height)


_CHECKS: dict[str, Callable[[memoryview, Limit], tuple[int, int]]] = {
    "png": check_png,
    "jpeg": check_jpeg,
    "webp": check_webp,
    "gif": check_gif,
    "avif": check_avif,
}
