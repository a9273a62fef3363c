"""The WebP check: the RIFF size, the chunk layout, the VP8 / VP8L bitstream headers and VP8X files."""

from __future__ import annotations

from struct import unpack_from as _unpack

from .base import BadImage, Limit

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
            or bytes(buf[p + 3 : p + 6]) != b"\x9d\x01\x2a"
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


def check_webp(buf: memoryview, limit: Limit) -> tuple[int, int]:
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
