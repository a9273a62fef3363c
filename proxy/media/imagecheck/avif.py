"""The AVIF check: the top-level ISO-BMFF boxes, the meta box's primary item and its size, libavif's parse."""

from __future__ import annotations

import io
from struct import unpack_from as _unpack

from .base import BadImage, Limit


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


def check_avif(buf: memoryview, limit: Limit) -> tuple[int, int]:
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
