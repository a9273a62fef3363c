"""The GIF check: header, logical screen, colour tables, every block's sub-block chain, the trailer."""

from __future__ import annotations

from struct import unpack_from as _unpack

from .base import BadImage, Limit

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


def check_gif(buf: memoryview, limit: Limit) -> tuple[int, int]:
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
