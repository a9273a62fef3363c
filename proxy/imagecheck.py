"""Structural image checks: is this a whole image, which format, how large -- without decoding pixels.

Images that pass through the proxy untouched still must not reach a client corrupt (the usual fault is a
truncated download). A full decode costs tens of milliseconds for a 3 MB image; these checks read only
the container: headers, chunk / segment / box lengths and the few fields that give the dimensions, so
they cost well under a millisecond (a PNG's CRC-32s over all its data are the biggest part, ~0.15 ms/MB).

    check_image(data, max_pixels=...) -> ImageInfo(format, width, height)   or raises BadImage

What each format's check covers:

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

import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BadImage", "ImageInfo", "check_image", "sniff"]


class BadImage(ValueError):
    """The bytes are not a whole, well-formed image. The message is short and safe to show a client."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "png" | "jpeg" | "webp" | "gif" | "avif"
    width: int
    height: int


_NOT_AN_IMAGE = "not a PNG, JPEG, WebP, GIF or AVIF image"
_NAMES = {"png": "PNG", "jpeg": "JPEG", "webp": "WebP", "gif": "GIF", "avif": "AVIF"}

_unpack = struct.unpack_from
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_AVIF_BRANDS = {b"avif", b"avis"}
_AVIF_MAJOR_BRANDS = (b"avif", b"avis", b"mif1", b"msf1")  # HEIF's brands may lead, with avif compatible


def sniff(data: bytes | bytearray | memoryview) -> str | None:
    """The image format named by the magic bytes at the start of ``data``, or None if it is none of ours."""
    head = bytes(data[:32])
    if head.startswith(_PNG_SIGNATURE):
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


def check_image(data: bytes | bytearray | memoryview, *, max_pixels: int | None = None) -> ImageInfo:
    """Check that ``data`` is a whole PNG, JPEG, WebP, GIF or AVIF image and read its size from the header.

    Raises BadImage when it is not, or when width * height is over ``max_pixels``. Never decodes pixels.
    """
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    fmt = sniff(buf)
    if fmt is None:
        raise BadImage(_NOT_AN_IMAGE)

    def limit(width: int, height: int) -> None:
        if max_pixels is not None and width * height > max_pixels:
            raise BadImage(
                f"image is {width}x{height} ({width * height} pixels), over the limit of {max_pixels} pixels"
            )

    try:
        width, height = _CHECKS[fmt](buf, limit)
    except (IndexError, struct.error) as exc:  # a safety net: the parsers check bounds before they read
        raise BadImage(f"{_NAMES[fmt]} image is malformed") from exc
    limit(width, height)
    return ImageInfo(fmt, width, height)


_Limit = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------- PNG

# bit depths allowed for each colour type
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# chunks whose length the specification fixes
_PNG_FIXED_LENGTHS = {
    b"IHDR": 13,
    b"IEND": 0,
    b"gAMA": 4,
    b"cHRM": 32,
    b"sRGB": 1,
    b"pHYs": 9,
    b"tIME": 7,
    b"acTL": 8,
    b"fcTL": 26,
}
_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
_PNG_TRUNCATED = "PNG truncated before IEND"


def _check_png(buf: memoryview, limit: _Limit) -> tuple[int, int]:
    n = len(buf)
    crc32 = zlib.crc32
    pos = len(_PNG_SIGNATURE)
    width = height = colour = depth = -1
    palette_entries = 0
    idat_seen = idat_done = False
    while True:
        if pos + 12 > n:
            raise BadImage(_PNG_TRUNCATED)
        length, ctype = _unpack(">I4s", buf, pos)
        if length > 0x7FFFFFFF:
            raise BadImage("PNG chunk length is out of range")
        end = pos + 12 + length
        if end > n:
            raise BadImage(_PNG_TRUNCATED)
        if not ctype.isalpha():
            raise BadImage("PNG chunk type is not four letters")
        name = ctype.decode("ascii")
        if crc32(buf[pos + 4 : end - 4]) != _unpack(">I", buf, end - 4)[0]:
            raise BadImage(f"PNG {name} chunk fails its CRC check")
        fixed = _PNG_FIXED_LENGTHS.get(ctype)
        if fixed is not None and length != fixed:
            raise BadImage(f"PNG {name} chunk has the wrong length")
        data = pos + 8

        if width < 0:
            if ctype != b"IHDR":
                raise BadImage("PNG does not start with an IHDR chunk")
            width, height, depth, colour, compression, filtering, interlace = _unpack(">IIBBBBB", buf, data)
            if not (0 < width <= 0x7FFFFFFF and 0 < height <= 0x7FFFFFFF):
                raise BadImage("PNG has an invalid width or height")
            if depth not in _PNG_DEPTHS.get(colour, ()):
                raise BadImage("PNG has an invalid bit depth or colour type")
            if compression != 0 or filtering != 0 or interlace > 1:
                raise BadImage("PNG has an unknown compression, filter or interlace method")
            limit(width, height)
        elif ctype == b"IDAT":
            if idat_done:
                raise BadImage("PNG IDAT chunks are not consecutive")
            if colour == 3 and not palette_entries:
                raise BadImage("PNG palette image has no PLTE chunk before its data")
            idat_seen = True
        elif ctype == b"IEND":
            if not idat_seen:
                raise BadImage("PNG has no IDAT chunk")
            return width, height  # bytes after IEND are tolerated
        else:
            idat_done = idat_seen
            if ctype == b"IHDR":
                raise BadImage("PNG has more than one IHDR chunk")
            if ctype == b"PLTE":
                if idat_seen or palette_entries:
                    raise BadImage("PNG PLTE chunk is misplaced")
                if colour in (0, 4):
                    raise BadImage("PNG greyscale image has a PLTE chunk")
                palette_entries, rest = divmod(length, 3)
                most = (1 << depth) if colour == 3 else 256
                if rest or not 0 < palette_entries <= most:
                    raise BadImage("PNG PLTE chunk has the wrong length")
            elif ctype == b"tRNS":
                if idat_seen:
                    raise BadImage("PNG tRNS chunk is misplaced")
                if colour == 0:
                    good = length == 2
                elif colour == 2:
                    good = length == 6
                elif colour == 3:
                    good = palette_entries > 0 and length <= palette_entries
                else:
                    good = False
                if not good:
                    raise BadImage("PNG tRNS chunk does not fit the colour type")
            elif ctype[0] < 0x61 and ctype not in _PNG_CRITICAL:  # uppercase first letter: critical
                raise BadImage(f"PNG has an unknown critical chunk {name}")
        pos = end


# ---------------------------------------------------------------------------------------------- JPEG

# frame headers: SOF0..SOF15 less DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# markers a header may not hold: 00 (a stuffed byte), TEM and the reserved 02..BF, JPG and JPGn
# extensions, stand-alone RSTn and SOI, hierarchical-mode DNL / DHP / EXP
_JPEG_UNEXPECTED = frozenset(
    {*range(0x00, 0xC0), 0xC8, *range(0xD0, 0xD9), 0xDC, 0xDE, 0xDF, *range(0xF0, 0xFE)}
)
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_MAX_PADDING = 64 * 1024  # zero bytes tolerated after EOI
_JPEG_TRUNCATED = "JPEG truncated in its header"


def _check_jpeg(buf: memoryview, limit: _Limit) -> tuple[int, int]:
    n = len(buf)
    pos = 2  # after SOI
    size: tuple[int, int] | None = None
    while True:
        if pos >= n:
            raise BadImage(_JPEG_TRUNCATED)
        if buf[pos] != 0xFF:
            raise BadImage("JPEG has stray bytes between header segments")
        pos = _JPEG_FILL.match(buf, pos).end()  # matches: buf[pos] is 0xFF
        if pos >= n:
            raise BadImage(_JPEG_TRUNCATED)
        marker = buf[pos]
        if marker == 0xD9:
            raise BadImage("JPEG ends before its image data")
        if marker in _JPEG_UNEXPECTED:
            raise BadImage(f"JPEG has an unexpected marker FF{marker:02X} in its header")
        if pos + 3 > n:
            raise BadImage(_JPEG_TRUNCATED)
        length = (buf[pos + 1] << 8) | buf[pos + 2]
        start, end = pos + 3, pos + 1 + length  # the segment's payload
        if length < 2:
            raise BadImage("JPEG segment has an invalid length")
        if end > n:
            raise BadImage(_JPEG_TRUNCATED)

        if marker in _JPEG_SOF:
            if size is not None:
                raise BadImage("JPEG has more than one frame header")
            if length < 8:
                raise BadImage("JPEG frame header is too short")
            precision, height, width, components = _unpack(">BHHB", buf, start)
            if precision != 8:
                raise BadImage(f"JPEG sample precision {precision} is not supported")
            if components not in (1, 3, 4) or length != 8 + 3 * components:
                raise BadImage("JPEG frame header is invalid")
            if width == 0 or height == 0:
                raise BadImage("JPEG has a zero width or height")
            limit(width, height)
            size = (width, height)
        elif marker == 0xC4:  # DHT: one or more Huffman tables
            p = start
            while p < end:
                if p + 17 > end or buf[p] >> 4 > 1 or buf[p] & 0x0F > 3:
                    raise BadImage("JPEG Huffman table is invalid")
                p += 17 + sum(buf[p + 1 : p + 17])
            if p != end:
                raise BadImage("JPEG Huffman table is invalid")
        elif marker == 0xDB:  # DQT: one or more quantisation tables
            p = start
            while p < end:
                precision = buf[p] >> 4
                if precision > 1 or buf[p] & 0x0F > 3:
                    raise BadImage("JPEG quantisation table is invalid")
                p += 1 + 64 * (precision + 1)
            if p != end:
                raise BadImage("JPEG quantisation table is invalid")
        elif marker == 0xDD:  # DRI
            if length != 4:
                raise BadImage("JPEG restart interval segment is invalid")
        elif 0xE0 <= marker <= 0xEF:
            # the APP segments whose fields image libraries read when they open the file
            payload = bytes(buf[start : min(end, start + 14)])
            if (
                (marker == 0xE0 and payload.startswith(b"JFIF") and length < 2 + 7)
                or (marker == 0xEE and payload.startswith(b"Adobe") and length < 2 + 7)
                or (marker == 0xE2 and payload.startswith(b"ICC_PROFILE\0") and length < 2 + 14)
            ):
                raise BadImage("JPEG application segment is too short")
        elif marker == 0xDA:  # SOS: the entropy-coded data follows
            if size is None:
                raise BadImage("JPEG scan comes before its frame header")
            components = buf[start] if start < end else 0
            if not 1 <= components <= 4 or length != 6 + 2 * components:
                raise BadImage("JPEG scan header is invalid")
            pos = end
            break
        pos = end

    # The scans are not walked (that costs a pass over all the data in Python); the file must end with
    # EOI, which cannot occur inside entropy-coded data, so a file cut anywhere after the header fails.
    stop = n
    if n > pos and buf[n - 1] == 0:
        low = max(pos, n - _JPEG_MAX_PADDING)
        stop = low + len(bytes(buf[low:n]).rstrip(b"\0"))
    if stop - pos < 2 or buf[stop - 2] != 0xFF or buf[stop - 1] != 0xD9:
        raise BadImage("JPEG has no EOI marker (truncated)")
    return size


# ---------------------------------------------------------------------------------------------- WebP

_WEBP_VALID_FLAGS = 0x3E  # ICC, alpha, EXIF, XMP, animation
_WEBP_ANIMATION = 0x02
_WEBP_MAX_AREA = 1 << 32


def _webp_chunks(buf: memoryview, pos: int, end: int) -> list[tuple[bytes, int, int]]:
    """(fourcc, payload start, payload size) for the chunks that exactly tile [pos, end)."""
    chunks = []
    while pos < end:
        if pos + 8 > end:
            raise BadImage("WebP chunk header is truncated")
        fourcc, size = _unpack("<4sI", buf, pos)
        if pos + 8 + size + (size & 1) > end:
            raise BadImage("WebP chunk runs past the end of its RIFF data")
        chunks.append((fourcc, pos + 8, size))
        pos += 8 + size + (size & 1)
    return chunks


def _webp_bitstream(buf: memoryview, fourcc: bytes, p: int, size: int) -> tuple[int, int]:
    """The size in a VP8 (lossy) or VP8L (lossless) bitstream header, checked as libwebp checks it."""
    if fourcc == b"VP8 ":
        if size < 10:
            raise BadImage("WebP VP8 header is truncated")
        bits = buf[p] | (buf[p + 1] << 8) | (buf[p + 2] << 16)
        if (
            bits & 1  # not a key frame
            or (bits >> 1) & 7 > 3  # unknown profile
            or not (bits >> 4) & 1  # not shown
            or bits >> 5 >= size  # first partition longer than the chunk
            or buf[p + 3 : p + 6] != b"\x9d\x01\x2a"
        ):
            raise BadImage("WebP VP8 header is invalid")
        width, height = _unpack("<HH", buf, p + 6)
        width, height = width & 0x3FFF, height & 0x3FFF
        if width == 0 or height == 0:
            raise BadImage("WebP VP8 header has a zero width or height")
        return width, height
    if size < 5:
        raise BadImage("WebP VP8L header is truncated")
    (bits,) = _unpack("<I", buf, p + 1)
    if buf[p] != 0x2F or bits >> 29:
        raise BadImage("WebP VP8L header is invalid")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def _webp_image(buf: memoryview, chunks: list[tuple[bytes, int, int]], i: int) -> tuple[int, int, int]:
    """Checks an [ALPH] + VP8 | VP8L run at chunks[i]; returns width, height and the next chunk's index."""
    fourcc, p, size = chunks[i]
    if fourcc == b"ALPH":
        i += 1
        if i == len(chunks) or chunks[i][0] != b"VP8 ":
            raise BadImage("WebP alpha chunk is not followed by a VP8 image")
        fourcc, p, size = chunks[i]
    if fourcc not in (b"VP8 ", b"VP8L"):
        raise BadImage("WebP has no VP8 or VP8L image")
    width, height = _webp_bitstream(buf, fourcc, p, size)
    return width, height, i + 1


def _check_webp(buf: memoryview, limit: _Limit) -> tuple[int, int]:
    n = len(buf)
    if n < 20:
        raise BadImage("WebP truncated in its header")
    riff_end = _unpack("<I", buf, 4)[0] + 8
    if n < riff_end:
        raise BadImage("WebP truncated (shorter than its RIFF size)")
    if n > riff_end + 1:  # one pad byte beyond the RIFF size is tolerated
        raise BadImage("WebP is longer than its RIFF size")
    chunks = _webp_chunks(buf, 12, riff_end)
    if not chunks:
        raise BadImage("WebP has no chunks")

    first = chunks[0][0]
    if first in (b"VP8 ", b"VP8L"):
        if len(chunks) != 1:
            raise BadImage("WebP simple file has more than one chunk")
        width, height, _ = _webp_image(buf, chunks, 0)
        limit(width, height)
        return width, height
    if first != b"VP8X":
        raise BadImage("WebP does not start with a VP8, VP8L or VP8X chunk")

    _, p, size = chunks[0]
    if size < 10:
        raise BadImage("WebP VP8X chunk is too short")
    flags = buf[p]
    width = 1 + (buf[p + 4] | (buf[p + 5] << 8) | (buf[p + 6] << 16))
    height = 1 + (buf[p + 7] | (buf[p + 8] << 8) | (buf[p + 9] << 16))
    if flags & ~_WEBP_VALID_FLAGS:
        raise BadImage("WebP VP8X chunk has unknown flags")
    if width * height >= _WEBP_MAX_AREA:
        raise BadImage("WebP canvas is too large")
    limit(width, height)

    animated = bool(flags & _WEBP_ANIMATION)
    images = 0
    anim_seen = False
    i = 1
    while i < len(chunks):
        fourcc, p, size = chunks[i]
        if fourcc == b"VP8X":
            raise BadImage("WebP has more than one VP8X chunk")
        if fourcc in (b"ALPH", b"VP8 ", b"VP8L"):
            if animated or images:
                raise BadImage("WebP image chunk is misplaced")
            frame_width, frame_height, i = _webp_image(buf, chunks, i)
            if (frame_width, frame_height) != (width, height):
                raise BadImage("WebP image size does not match its canvas")
            images = 1
            continue
        if fourcc in (b"ANIM", b"ANMF") and not animated:
            raise BadImage("WebP has animation chunks but no animation flag")
        if fourcc == b"ANIM":
            if size < 6:
                raise BadImage("WebP ANIM chunk is too short")
            anim_seen = True
        elif fourcc == b"ANMF":
            if not anim_seen:
                raise BadImage("WebP frame comes before its ANIM chunk")
            if size < 16:
                raise BadImage("WebP ANMF chunk is too short")
            x = 2 * (buf[p] | (buf[p + 1] << 8) | (buf[p + 2] << 16))
            y = 2 * (buf[p + 3] | (buf[p + 4] << 8) | (buf[p + 5] << 16))
            frame_width = 1 + (buf[p + 6] | (buf[p + 7] << 8) | (buf[p + 8] << 16))
            frame_height = 1 + (buf[p + 9] | (buf[p + 10] << 8) | (buf[p + 11] << 16))
            inner = _webp_chunks(buf, p + 16, p + size + (size & 1))
            if not inner:
                raise BadImage("WebP frame has no image")
            bitstream_width, bitstream_height, used = _webp_image(buf, inner, 0)
            if used != len(inner) or (bitstream_width, bitstream_height) != (frame_width, frame_height):
                raise BadImage("WebP frame is invalid")
            if x + frame_width > width or y + frame_height > height:
                raise BadImage("WebP frame lies outside the canvas")
            images += 1
        i += 1
    if not images:
        raise BadImage("WebP has no image")
    return width, height


# ----------------------------------------------------------------------------------------------- GIF

_GIF_TRUNCATED = "GIF truncated before its trailer"
# the size the specification fixes for the first sub-block of an extension: plain text, graphic control,
# application
_GIF_EXTENSION_SIZES = {0x01: 12, 0xF9: 4, 0xFF: 11}


def _gif_sub_blocks(buf: memoryview, pos: int, n: int) -> int:
    """Skips a chain of data sub-blocks (length byte + data, ended by a zero length); returns the end."""
    while pos < n:
        size = buf[pos]
        pos += 1 + size
        if not size:
            return pos
    raise BadImage(_GIF_TRUNCATED)


def _check_gif(buf: memoryview, limit: _Limit) -> tuple[int, int]:
    n = len(buf)
    if n < 13:
        raise BadImage(_GIF_TRUNCATED)
    width, height, flags = _unpack("<HHB", buf, 6)
    if width == 0 or height == 0:
        raise BadImage("GIF has a zero width or height")
    limit(width, height)
    pos = 13
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)
    frames = 0
    while True:
        if pos >= n:
            raise BadImage(_GIF_TRUNCATED)
        introducer = buf[pos]
        if introducer == 0x3B:  # trailer; bytes after it are tolerated
            break
        if introducer == 0x21:  # extension: label, then sub-blocks
            if pos + 2 >= n:
                raise BadImage(_GIF_TRUNCATED)
            if _GIF_EXTENSION_SIZES.get(buf[pos + 1], buf[pos + 2]) != buf[pos + 2]:
                raise BadImage("GIF extension block has the wrong size")
            pos = _gif_sub_blocks(buf, pos + 2, n)
        elif introducer == 0x2C:  # image descriptor, local colour table, LZW code size, sub-blocks
            if pos + 10 > n:
                raise BadImage(_GIF_TRUNCATED)
            left, top, frame_width, frame_height, frame_flags = _unpack("<HHHHB", buf, pos + 1)
            if left + frame_width > width or top + frame_height > height:
                raise BadImage("GIF frame lies outside the logical screen")
            pos += 10
            if frame_flags & 0x80:
                pos += 3 << ((frame_flags & 7) + 1)
            if pos >= n:
                raise BadImage(_GIF_TRUNCATED)
            if not 1 <= buf[pos] <= 8:
                raise BadImage("GIF has an invalid LZW code size")
            pos = _gif_sub_blocks(buf, pos + 1, n)
            frames += 1
        else:
            raise BadImage("GIF has an unknown block")
    if not frames:
        raise BadImage("GIF has no image")
    return width, height


# ---------------------------------------------------------------------------------------------- AVIF


def _ftyp_brands(buf: bytes | bytearray | memoryview) -> set[bytes]:
    """The major and compatible brands of a leading ftyp box (empty if there is none)."""
    if len(buf) < 16 or bytes(buf[4:8]) != b"ftyp":
        return set()
    size = min(_unpack(">I", buf, 0)[0], len(buf), 4096)
    head = bytes(buf[8:size])
    return {head[0:4]} | {head[i : i + 4] for i in range(8, len(head) - 3, 4)}


def _boxes(buf: memoryview, pos: int, end: int) -> list[tuple[bytes, int, int]]:
    """(type, payload start, box end) for the ISO-BMFF boxes that exactly fill [pos, end)."""
    boxes = []
    while pos < end:
        if pos + 8 > end:
            raise BadImage("AVIF truncated (a box header is cut off)")
        size, btype = _unpack(">I4s", buf, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                raise BadImage("AVIF truncated (a box header is cut off)")
            size = _unpack(">Q", buf, pos + 8)[0]
            header = 16
        elif size == 0:
            raise BadImage("AVIF box has no size")
        if size < header:
            raise BadImage("AVIF box has an invalid size")
        if pos + size > end:
            raise BadImage("AVIF truncated (a box runs past the end)")
        boxes.append((btype, pos + header, pos + size))
        pos += size
    return boxes


class _Reader:
    """Big-endian reads within [pos, end) of a box, raising BadImage past the end."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, pos: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, pos, end

    def uint(self, nbytes: int) -> int:
        if self.pos + nbytes > self.end:
            raise BadImage("AVIF box is too short for its contents")
        value = int.from_bytes(self.buf[self.pos : self.pos + nbytes], "big")
        self.pos += nbytes
        return value

    def full_box(self) -> tuple[int, int]:
        """A FullBox's version and flags."""
        value = self.uint(4)
        return value >> 24, value & 0xFFFFFF


_AVIF_UNIQUE = (b"ftyp", b"meta", b"hdlr", b"pitm", b"iloc", b"iinf", b"iprp", b"idat")


def _unique(boxes: list[tuple[bytes, int, int]], where: str) -> dict[bytes, tuple[int, int]]:
    found: dict[bytes, tuple[int, int]] = {}
    for btype, start, end in boxes:
        if btype in found and btype in _AVIF_UNIQUE:
            raise BadImage(f"AVIF {where} has more than one {btype.decode('latin-1')} box")
        found.setdefault(btype, (start, end))
    return found


def _avif_primary_size(buf: memoryview, meta: tuple[int, int], n: int) -> tuple[int, int] | None:
    """Checks the meta box; returns the primary item's ispe size, or None if it has none."""
    reader = _Reader(buf, *meta)
    if reader.full_box()[0] != 0:
        raise BadImage("AVIF meta box has an unknown version")
    children = _boxes(buf, reader.pos, meta[1])
    if not children or children[0][0] != b"hdlr":
        raise BadImage("AVIF meta box does not start with hdlr")
    boxes = _unique(children, "meta")
    hdlr = _Reader(buf, *boxes[b"hdlr"])
    hdlr.uint(8)  # version, flags, pre_defined
    if hdlr.uint(4) != int.from_bytes(b"pict", "big"):
        raise BadImage("AVIF meta box is not for a picture")

    # the item locations: every extent must lie inside the file (or its idat box)
    idat_size = boxes[b"idat"][1] - boxes[b"idat"][0] if b"idat" in boxes else 0
    if b"iloc" in boxes:
        iloc = _Reader(buf, *boxes[b"iloc"])
        version, _ = iloc.full_box()
        if version > 2:
            raise BadImage("AVIF iloc box has an unknown version")
        sizes = iloc.uint(2)
        offset_size, length_size, base_size = sizes >> 12, (sizes >> 8) & 15, (sizes >> 4) & 15
        index_size = sizes & 15 if version else 0
        if any(s not in (0, 4, 8) for s in (offset_size, length_size, base_size, index_size)):
            raise BadImage("AVIF iloc box has invalid field sizes")
        for _ in range(iloc.uint(2 if version < 2 else 4)):
            iloc.uint(2 if version < 2 else 4)  # item_ID
            method = iloc.uint(2) & 15 if version else 0
            if iloc.uint(2) != 0:
                raise BadImage("AVIF item data is in another file")
            base = iloc.uint(base_size)
            extents = iloc.uint(2)
            per_extent = index_size + offset_size + length_size
            if extents * per_extent > iloc.end - iloc.pos or (per_extent == 0 and extents > 1):
                raise BadImage("AVIF iloc box is invalid")
            for _ in range(extents):
                iloc.uint(index_size)
                offset, length = base + iloc.uint(offset_size), iloc.uint(length_size)
                if method == 0 and offset + length > n:
                    raise BadImage("AVIF truncated (an item's data lies past the end)")
                if method == 1 and offset + length > idat_size:
                    raise BadImage("AVIF item data lies outside its idat box")
                if method > 2:
                    raise BadImage("AVIF iloc box has an unknown construction method")

    if b"pitm" not in boxes:
        return None
    pitm = _Reader(buf, *boxes[b"pitm"])
    primary = pitm.uint(2 if pitm.full_box()[0] == 0 else 4)

    if b"iinf" in boxes:
        iinf = _Reader(buf, *boxes[b"iinf"])
        iinf.uint(2 if iinf.full_box()[0] == 0 else 4)  # entry_count
        for btype, start, end in _boxes(buf, iinf.pos, boxes[b"iinf"][1]):
            infe = _Reader(buf, start, end)
            version, _ = infe.full_box()
            if btype != b"infe" or version < 2:
                continue
            if infe.uint(2 if version == 2 else 4) == primary:
                infe.uint(2)  # item_protection_index
                if infe.uint(4).to_bytes(4, "big") not in (b"av01", b"grid"):
                    raise BadImage("AVIF primary item is not an AV1 image")

    if b"iprp" not in boxes:
        return None
    iprp = _boxes(buf, *boxes[b"iprp"])
    ipco = [box for box in iprp if box[0] == b"ipco"]
    if len(ipco) != 1:
        raise BadImage("AVIF iprp box needs exactly one ipco box")
    properties = _boxes(buf, ipco[0][1], ipco[0][2])
    for btype, start, end in iprp:
        if btype != b"ipma":
            continue
        ipma = _Reader(buf, start, end)
        version, flags = ipma.full_box()
        for _ in range(ipma.uint(4)):
            item = ipma.uint(2 if version < 1 else 4)
            indexes = [
                ipma.uint(2 if flags & 1 else 1) & (0x7FFF if flags & 1 else 0x7F)
                for _ in range(ipma.uint(1))
            ]
            if item != primary:
                continue
            for index in indexes:
                if index > len(properties):
                    raise BadImage("AVIF item property index is out of range")
                if index and properties[index - 1][0] == b"ispe":
                    ispe = _Reader(buf, properties[index - 1][1], properties[index - 1][2])
                    ispe.full_box()
                    width, height = ispe.uint(4), ispe.uint(4)
                    if width == 0 or height == 0:
                        raise BadImage("AVIF has a zero width or height")
                    return width, height
    return None


def _avif_parse(buf: memoryview) -> tuple[int, int] | None:
    """libavif's container parse through Pillow (no pixel decoding): the size, or None without AVIF support."""
    try:
        from PIL import AvifImagePlugin
    except ImportError:  # pragma: no cover - Pillow older than 11.3
        return None
    if not AvifImagePlugin.SUPPORTED:  # pragma: no cover - Pillow built without libavif
        return None
    try:
        whole = buf.obj if isinstance(buf.obj, bytes) and len(buf.obj) == len(buf) else bytes(buf)
        with AvifImagePlugin.AvifImageFile(io.BytesIO(whole)) as image:
            return image.size
    except Exception:
        raise BadImage("AVIF container is not readable") from None


def _check_avif(buf: memoryview, limit: _Limit) -> tuple[int, int]:
    n = len(buf)
    top = _boxes(buf, 0, n)  # sizes must add up exactly to the data length
    if top[0][0] != b"ftyp" or top[0][2] - top[0][1] < 8 or (top[0][2] - top[0][1]) % 4:
        raise BadImage("AVIF ftyp box is invalid")
    boxes = _unique(top, "file")
    major = bytes(buf[top[0][1] : top[0][1] + 4])
    size = _avif_primary_size(buf, boxes[b"meta"], n) if b"meta" in boxes else None
    if b"moov" in boxes and b"mdat" not in boxes:
        raise BadImage("AVIF truncated (no mdat box)")
    # Which image a reader shows: libavif takes the first track unless the major brand is avif, where
    # it takes the primary item.
    from_tracks = b"moov" in boxes and major != b"avif"
    if size is not None:
        limit(*size)
    parsed = _avif_parse(buf)
    if from_tracks and parsed is not None:
        size = parsed
    if size is None:
        raise BadImage("AVIF has no readable image size")
    limit(*size)
    if parsed is not None and parsed != size:
        raise BadImage("AVIF image size is inconsistent")
    return size


_CHECKS: dict[str, Callable[[memoryview, _Limit], tuple[int, int]]] = {
    "png": _check_png,
    "jpeg": _check_jpeg,
    "webp": _check_webp,
    "gif": _check_gif,
    "avif": _check_avif,
}
