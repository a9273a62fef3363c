"""The JPEG check: the marker segments up to the first scan, then the EOI marker at the end."""

from __future__ import annotations

import re
from struct import unpack_from as _unpack

from .base import BadImage, Limit

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


def check_jpeg(buf: memoryview, limit: Limit) -> tuple[int, int]:
    n = len(buf)
    pos = 2  # after SOI
    size: tuple[int, int] | None = None
    while True:
        if pos >= n:
            raise BadImage(_JPEG_TRUNCATED)
        if buf[pos] != 0xFF:
            raise BadImage("JPEG has stray bytes between header segments")
        fill = _JPEG_FILL.match(buf, pos)
        assert fill is not None  # buf[pos] is 0xFF
        pos = fill.end()
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
