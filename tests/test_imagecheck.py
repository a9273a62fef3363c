"""proxy.media.imagecheck: structural checks of PNG, JPEG, WebP, GIF and AVIF bytes, against images Pillow writes."""

from __future__ import annotations

import io
import random
import struct
import tracemalloc
import warnings
import zlib
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from proxy.media.imagecheck import BadImage, ImageInfo, check_image, sniff

FUZZ = settings(max_examples=300, deadline=None)

PILLOW_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "avif": "AVIF"}


def noise(mode: str, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Random pixels (reproducible), converted to ``mode``."""
    rng = random.Random(f"{mode}{size}{seed}")
    rgba = Image.frombytes("RGBA", size, rng.randbytes(size[0] * size[1] * 4))
    return rgba if mode == "RGBA" else rgba.convert(mode)


def encode(image: Image.Image, pil_format: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=pil_format, **options)
    return out.getvalue()


@cache
def corpus() -> dict[str, tuple[str, int, int, bytes]]:
    """name -> (format, width, height, bytes): images Pillow writes, in every format and several shapes."""
    images: dict[str, tuple[str, int, int, bytes]] = {}

    def add(name: str, fmt: str, size: tuple[int, int], data: bytes) -> None:
        images[f"{name}-{size[0]}x{size[1]}"] = (fmt, size[0], size[1], data)

    for size in [(1, 1), (17, 9), (64, 48)]:
        for mode in ["RGB", "RGBA", "P", "L", "LA", "1", "I;16"]:
            add(f"png-{mode}", "png", size, encode(noise(mode, size), "PNG"))
        for mode in ["RGB", "L", "CMYK"]:
            add(f"jpeg-{mode}", "jpeg", size, encode(noise(mode, size), "JPEG", quality=85))
        add("jpeg-progressive", "jpeg", size, encode(noise("RGB", size), "JPEG", progressive=True))
        for mode in ["RGB", "RGBA"]:
            add(f"webp-lossy-{mode}", "webp", size, encode(noise(mode, size), "WEBP", quality=80))
            add(f"webp-lossless-{mode}", "webp", size, encode(noise(mode, size), "WEBP", lossless=True))
        for mode in ["P", "L", "RGB"]:
            add(f"gif-{mode}", "gif", size, encode(noise(mode, size), "GIF"))
        for mode in ["RGB", "RGBA"]:
            add(f"avif-{mode}", "avif", size, encode(noise(mode, size), "AVIF", speed=10))

    frames = [noise("RGB", (40, 30), seed) for seed in range(3)]
    animated = {"save_all": True, "append_images": frames[1:], "duration": 40, "loop": 0}
    add("png-animated", "png", (40, 30), encode(frames[0], "PNG", **animated))
    add("gif-animated", "gif", (40, 30), encode(frames[0], "GIF", **animated))
    add("webp-animated", "webp", (40, 30), encode(frames[0], "WEBP", **animated))
    add("avif-animated", "avif", (40, 30), encode(frames[0], "AVIF", speed=10, **animated))

    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "qwen-image-proxy")
    text.add_text("Comment", "compressed " * 20, zip=True)
    add("png-text", "png", (33, 20), encode(noise("RGB", (33, 20)), "PNG", pnginfo=text))
    add("png-palette-alpha", "png", (20, 20), encode(noise("RGBA", (20, 20)).quantize(16), "PNG"))
    add(
        "jpeg-optimized-444",
        "jpeg",
        (50, 35),
        encode(noise("RGB", (50, 35)), "JPEG", optimize=True, subsampling=0),
    )
    add("jpeg-comment", "jpeg", (20, 10), encode(noise("RGB", (20, 10)), "JPEG", comment=b"made by a test"))
    add("jpeg-icc", "jpeg", (20, 10), encode(noise("RGB", (20, 10)), "JPEG", icc_profile=b"\0" * 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation
    exif[0x010F] = "a camera"
    restarts = {"exif": exif.tobytes(), "restart_marker_blocks": 4}
    add("jpeg-exif-restarts", "jpeg", (64, 48), encode(noise("RGB", (64, 48)), "JPEG", **restarts))
    add("webp-icc", "webp", (20, 10), encode(noise("RGB", (20, 10)), "WEBP", icc_profile=b"\0" * 100))
    add("gif-comment", "gif", (20, 10), encode(noise("P", (20, 10)), "GIF", comment=b"hello", transparency=0))
    add("png-large", "png", (300, 200), encode(noise("RGB", (300, 200)), "PNG"))
    add("jpeg-large", "jpeg", (300, 200), encode(noise("RGB", (300, 200)), "JPEG"))
    add("webp-large", "webp", (300, 200), encode(noise("RGB", (300, 200)), "WEBP"))
    add("gif-large", "gif", (300, 200), encode(noise("RGB", (300, 200)), "GIF"))
    add("avif-large", "avif", (300, 200), encode(noise("RGB", (300, 200)), "AVIF", speed=10))
    return images


NAMES = sorted(corpus())


def pillow_view(data: bytes) -> tuple[str, tuple[int, int]]:
    """What Pillow's Image.open (header parse, no decode) makes of ``data``: format and size."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # sizes from mutated headers may be huge; compare them anyway
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.format or "", image.size
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_agrees_with_pillow(data: bytes) -> None:
    """check_image either refuses ``data`` with BadImage, or Pillow opens it with the same format and size."""
    try:
        info = check_image(data)
    except BadImage as exc:
        assert exc.__cause__ is None, (
            f"a parser read out of bounds and the safety net caught it: {exc.__cause__!r}"
        )
        return
    pillow_format, size = pillow_view(data)  # raises (failing the test) if Pillow cannot open what passed
    assert pillow_format in (PILLOW_FORMAT[info.format], "MPO")
    assert (info.width, info.height) == size


def cut_points(length: int) -> list[int]:
    """Every length for small images; ~200 evenly spaced ones and the last 64 for larger ones."""
    if length <= 2048:
        return list(range(length))
    return sorted(set(range(0, length, length // 200)) | set(range(length - 64, length)))


# ------------------------------------------------------------------------------------ valid images


@pytest.mark.parametrize("name", NAMES)
def test_real_images_pass_with_their_format_and_size(name: str) -> None:
    fmt, width, height, data = corpus()[name]
    info = check_image(data)
    assert info == ImageInfo(fmt, width, height)
    assert pillow_view(data) == (PILLOW_FORMAT[fmt], (width, height))
    assert sniff(data) == fmt
    assert check_image(memoryview(data)) == info
    assert check_image(bytearray(data)) == info


def test_corpus_covers_the_structures_the_checks_walk() -> None:
    images = corpus()
    webp_chunks = {name: images[name][3][12:16] for name in images if name.startswith("webp")}
    assert webp_chunks["webp-lossy-RGB-17x9"] == b"VP8 "
    assert webp_chunks["webp-lossless-RGB-17x9"] == b"VP8L"
    assert webp_chunks["webp-lossy-RGBA-17x9"] == b"VP8X" and b"ALPH" in images["webp-lossy-RGBA-17x9"][3]
    assert b"ANMF" in images["webp-animated-40x30"][3]
    assert b"acTL" in images["png-animated-40x30"][3]
    assert images["jpeg-progressive-64x48"][3].find(b"\xff\xc2") > 0  # SOF2
    assert b"\xff\xdd" in images["jpeg-exif-restarts-64x48"][3]  # DRI, and RSTn markers in the scan
    assert b"\xff\xd0" in images["jpeg-exif-restarts-64x48"][3]
    assert images["gif-animated-40x30"][3].count(b"\x21\xf9\x04") == 3  # one graphic control block a frame
    assert b"avis" in images["avif-animated-40x30"][3][:64] and b"moov" in images["avif-animated-40x30"][3]
    assert b"auxl" in images["avif-RGBA-64x48"][3]  # an alpha item


@given(
    fmt=st.sampled_from(["png", "jpeg", "webp", "gif", "avif"]),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P"]),
    width=st.integers(1, 70),
    height=st.integers(1, 70),
    seed=st.integers(0, 1000),
)
@settings(max_examples=60, deadline=None)
def test_generated_images_match_pillow(fmt: str, mode: str, width: int, height: int, seed: int) -> None:
    image = noise(mode, (width, height), seed)
    if fmt in ("jpeg", "avif") and mode in ("RGBA", "P"):
        image = image.convert("RGB")
    options = {"speed": 10} if fmt == "avif" else {}
    data = encode(image, PILLOW_FORMAT[fmt], **options)
    assert check_image(data) == ImageInfo(fmt, width, height)


def test_bytes_after_the_end_are_tolerated_where_formats_allow() -> None:
    images = corpus()
    png, jpeg, webp, gif = (images[f"{f}-RGB-17x9"][3] for f in ("png", "jpeg", "webp-lossy", "gif"))
    assert check_image(png + b"trailing garbage").width == 17
    assert check_image(jpeg + b"\0" * 1000).width == 17  # zero padding after EOI
    assert check_image(gif + b"\0\0\0").width == 17
    assert check_image(webp + b"\0").width == 17  # one pad byte beyond the RIFF size
    with pytest.raises(BadImage, match="longer than its RIFF size"):
        check_image(webp + b"\0\0")
    with pytest.raises(BadImage, match="EOI"):
        check_image(jpeg + b"junk")


# ------------------------------------------------------------------------------------ broken images


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_is_rejected(name: str) -> None:
    data = corpus()[name][3]
    accepted = []
    for cut in cut_points(len(data)):
        try:
            check_image(data[:cut])
        except BadImage as exc:
            assert exc.__cause__ is None, f"cut at {cut}: the safety net caught {exc.__cause__!r}"
            continue
        accepted.append(cut)
    assert not accepted, f"truncated copies of {len(data)} bytes passed: {accepted[:10]}"


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, data start, data end) of each chunk of a well-formed PNG."""
    chunks, pos = [], 8
    while pos < len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        chunks.append((ctype, pos + 8, pos + 8 + length))
        pos += 12 + length
    return chunks


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def build_png(width: int, height: int, depth: int = 8, colour: int = 0, extra: bytes = b"") -> bytes:
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr
        + extra
        + png_chunk(b"IDAT", zlib.compress(b"\0"))
        + png_chunk(b"IEND", b"")
    )


def test_a_flipped_byte_in_png_image_data_fails_the_crc() -> None:
    data = corpus()["png-RGB-64x48"][3]
    (start, end) = next((s, e) for t, s, e in png_chunks(data) if t == b"IDAT")
    for pos in (start, (start + end) // 2, end - 1):
        broken = bytearray(data)
        broken[pos] ^= 0x01
        with pytest.raises(BadImage, match="IDAT chunk fails its CRC check"):
            check_image(bytes(broken))


def test_every_single_byte_change_in_a_png_is_rejected() -> None:
    data = corpus()["png-P-17x9"][3]
    passed = []
    for pos in range(len(data)):
        broken = bytearray(data)
        broken[pos] ^= 0xA5
        try:
            check_image(bytes(broken))
        except BadImage as exc:
            assert exc.__cause__ is None
            continue
        passed.append(pos)
    assert not passed


NOT_AN_IMAGE = "not a PNG, JPEG, WebP, GIF or AVIF image"
GIF_HEADER = b"GIF89a\x04\x00\x04\x00\x00\x00\x00"  # a 4x4 logical screen, no colour table


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", NOT_AN_IMAGE, id="empty"),
        pytest.param(b"hello world, certainly not an image", NOT_AN_IMAGE, id="text"),
        pytest.param(b"BM\x00\x00" + bytes(60), NOT_AN_IMAGE, id="bmp"),
        pytest.param(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", NOT_AN_IMAGE, id="heic"),
        pytest.param(build_png(4, 4)[:-12], "PNG truncated before IEND", id="png-no-iend"),
        pytest.param(build_png(0, 4), "invalid width or height", id="png-zero-width"),
        pytest.param(build_png(4, 4, depth=3), "invalid bit depth or colour type", id="png-depth"),
        pytest.param(build_png(4, 4, colour=3), "no PLTE chunk", id="png-palette-without-plte"),
        pytest.param(
            build_png(4, 4, extra=png_chunk(b"gAMA", b"\0\0")), "gAMA chunk has the wrong", id="png-gama"
        ),
        pytest.param(
            build_png(4, 4, extra=png_chunk(b"ABCD", b"")), "unknown critical chunk ABCD", id="png-critical"
        ),
        pytest.param(
            build_png(4, 4)[:8] + png_chunk(b"tEXt", b"a\0b") + build_png(4, 4)[8:],
            "does not start with an IHDR",
            id="png-ihdr-not-first",
        ),
        pytest.param(
            build_png(4, 4, extra=png_chunk(b"IDAT", b"x") + png_chunk(b"tEXt", b"a\0b")),
            "IDAT chunks are not consecutive",
            id="png-idat-split",
        ),
        pytest.param(b"\xff\xd8\xff\xd9", "ends before its image data", id="jpeg-empty"),
        pytest.param(
            b"\xff\xd8\xff\xc0\x00\x0b\x0c\x00\x10\x00\x10\x01\x01\x11\x00\xff\xd9",
            "precision 12",
            id="jpeg-12bit",
        ),
        pytest.param(
            b"\xff\xd8\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00\x00\xff\xd9",
            "before its frame header",
            id="jpeg-sos-first",
        ),
        pytest.param(b"\xff\xd8\xff\xfe\x00\x04abjunk\xff\xd9", "stray bytes", id="jpeg-junk"),
        pytest.param(
            GIF_HEADER + b"\x2c\0\0\0\0\x05\0\x04\0\0\x02\0\x3b",
            "outside the logical",
            id="gif-frame-outside",
        ),
        pytest.param(GIF_HEADER + b"\x3b", "GIF has no image", id="gif-no-frame"),
        pytest.param(
            GIF_HEADER + b"\x2c\0\0\0\0\x04\0\x04\0\0\x02\x05\x01", "truncated", id="gif-cut-in-data"
        ),
        pytest.param(b"RIFF\x04\x00\x00\x00WEBP", "truncated in its header", id="webp-header"),
        pytest.param(
            b"RIFF\x10\x00\x00\x00WEBPVP8X\x04\x00\x00\x00\x00\x00\x00\x00",
            "VP8X chunk is too",
            id="webp-vp8x",
        ),
        pytest.param(
            b"RIFF\x0c\x00\x00\x00WEBPJUNK\x00\x00\x00\x00", "does not start with a VP8", id="webp-junk"
        ),
        pytest.param(
            b"RIFF\x40\x00\x00\x00WEBPVP8L\x05\x00\x00\x00", "shorter than its RIFF size", id="webp-riff"
        ),
    ],
)
def test_broken_images_are_rejected_with_a_reason(data: bytes, message: str) -> None:
    with pytest.raises(BadImage, match=message):
        check_image(data)


def doctored(name: str, old: bytes, new: bytes) -> bytes:
    """A corpus image with the first ``old`` replaced by ``new``."""
    data = corpus()[name][3]
    assert old in data
    return data.replace(old, new, 1)


def set_bytes(name: str, anchor: bytes, offset: int, value: bytes) -> bytes:
    """A corpus image with ``value`` written ``offset`` bytes after the first ``anchor``."""
    data = corpus()[name][3]
    at = data.index(anchor) + offset
    return data[:at] + value + data[at + len(value) :]


def png_with_ihdr_then_iend() -> bytes:
    signature_and_ihdr = build_png(4, 4)[:33]
    return signature_and_ihdr + png_chunk(b"IEND", b"")


# Faults in the header. The first group Pillow's Image.open also refuses; the second it opens (reading
# headers only), though a decoder would fail on them or show something else.
PILLOW_REFUSES = [
    # a reserved marker (FF9B) where a segment should start
    pytest.param(
        lambda: doctored("jpeg-RGB-17x9", b"\xff\xdb", b"\xff\x9b"), "unexpected marker FF9B", id="jpeg-res"
    ),
    pytest.param(
        lambda: doctored("jpeg-RGB-17x9", b"\xff\xdb\x00\x43\x00", b"\xff\xdb\x00\x43\x10"),
        "quantisation table",
        id="jpeg-dqt",
    ),
    pytest.param(
        lambda: doctored(
            "webp-lossy-RGBA-17x9", b"VP8X\n\0\0\0\x10\0\0\0\x10", b"VP8X\n\0\0\0\x10\0\0\0\x11"
        ),
        "does not match its canvas",
        id="webp-canvas",
    ),
    pytest.param(
        lambda: doctored("webp-lossy-RGBA-17x9", b"ALPH", b"ANIM"),
        "no animation flag",
        id="webp-anim-in-still",
    ),
    pytest.param(
        lambda: doctored("webp-lossy-RGB-17x9", b"\x9d\x01\x2a", b"\x9d\x01\x2b"), "VP8 header", id="webp-vp8"
    ),
    pytest.param(
        lambda: doctored("webp-lossless-RGB-17x9", b"VP8L", b"VP8X"), "VP8X chunk", id="webp-vp8x-short"
    ),
    # a HEIF brand leads: not taken for AVIF
    pytest.param(lambda: doctored("avif-RGB-17x9", b"ftypavif", b"ftypheic"), NOT_AN_IMAGE, id="avif-major"),
    pytest.param(lambda: doctored("avif-RGB-17x9", b"pict", b"vide"), "not for a picture", id="avif-hdlr"),
    pytest.param(lambda: doctored("avif-RGB-17x9", b"av01", b"hvc1"), "not an AV1 image", id="avif-item"),
    # beyond the box structure: libavif's container parse (run through Pillow) finds no codec configuration
    pytest.param(lambda: doctored("avif-RGB-17x9", b"av1C", b"av1D"), "not readable", id="avif-av1c"),
    pytest.param(
        lambda: doctored(
            "jpeg-RGB-17x9",
            b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",
            b"\xff\xe0\x00\x06JFIF",
        ),
        "application segment is too short",
        id="jpeg-jfif-short",
    ),
]
PILLOW_OPENS = [
    pytest.param(png_with_ihdr_then_iend, "no IDAT", id="png-no-idat"),
    pytest.param(
        lambda: build_png(4, 4, extra=png_chunk(b"tRNS", b"\0\0\0\0\0\0")),
        "tRNS chunk does not fit",
        id="png-trns",
    ),
    pytest.param(
        lambda: doctored("jpeg-RGB-17x9", b"\xff\xc4\x00\x1f\x00", b"\xff\xc4\x00\x1f\x20"),
        "Huffman table",
        id="jpeg-dht",
    ),
    pytest.param(
        lambda: doctored(
            "jpeg-L-17x9", b"\xff\xda", b"\xff\xc1\x00\x0b\x08\x00\x09\x00\x11\x01\x01\x11\x00\xff\xda"
        ),
        "more than one frame header",
        id="jpeg-two-sof",
    ),
    pytest.param(
        lambda: build_png(4, 4, depth=8, colour=3, extra=png_chunk(b"PLTE", b"\0" * 4)),
        "PLTE chunk has the wrong length",
        id="png-plte",
    ),
    # an animation frame whose header disagrees with its bitstream about its size
    pytest.param(
        lambda: set_bytes("webp-animated-40x30", b"ANMF", 14, (37).to_bytes(3, "little")),
        "frame is invalid",
        id="webp-anmf",
    ),
    # an application extension whose first block is not 11 bytes: Pillow misreads the blocks after it
    pytest.param(
        lambda: doctored("gif-animated-40x30", b"\x21\xff\x0bNETSCAPE", b"\x21\xff\x0fNETSCAPE"),
        "extension block has the wrong size",
        id="gif-app-extension",
    ),
]


@pytest.mark.parametrize(("make", "message"), PILLOW_REFUSES)
def test_header_faults_pillow_refuses_are_refused(make, message: str) -> None:
    data = make()
    with pytest.raises(BadImage, match=message):
        check_image(data)
    with pytest.raises(Exception):  # noqa: B017  # any error: Pillow cannot open it either
        pillow_view(data)


@pytest.mark.parametrize(("make", "message"), PILLOW_OPENS)
def test_header_faults_that_only_a_decoder_would_meet_are_refused(make, message: str) -> None:
    data = make()
    pillow_view(data)  # Pillow's header parse lets it through
    with pytest.raises(BadImage, match=message):
        check_image(data)


def test_a_webp_animation_frame_outside_the_canvas_is_rejected() -> None:
    data = bytearray(corpus()["webp-animated-40x30"][3])
    anmf = data.index(b"ANMF") + 8
    data[anmf : anmf + 3] = (10).to_bytes(3, "little")  # x offset 20 pixels: the 40-wide frame sticks out
    with pytest.raises(BadImage, match="outside the canvas"):
        check_image(bytes(data))


def test_an_avif_sequence_reports_the_size_of_its_track() -> None:
    # libavif shows an avis file's track, whatever its primary item's ispe says
    data = set_bytes("avif-animated-40x30", b"ispe", 8, (41).to_bytes(4, "big"))
    assert check_image(data) == ImageInfo("avif", 40, 30) == ImageInfo("avif", *pillow_view(data)[1])


def test_avif_boxes_must_add_up_to_the_length() -> None:
    data = corpus()["avif-RGB-17x9"][3]
    with pytest.raises(BadImage, match="AVIF"):
        check_image(data + b"\0\0\0\x08free"[:-1])  # a box cut short
    with pytest.raises(BadImage, match="past the end"):
        mdat = data.rindex(b"mdat") - 4
        check_image(data[:mdat] + struct.pack(">I", len(data) - mdat + 1) + data[mdat + 4 :])


# --------------------------------------------------------------------------------- max_pixels


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "gif", "avif"])
def test_max_pixels_refuses_an_image_over_the_limit(fmt: str) -> None:
    data = encode(noise("RGB", (100, 100)), PILLOW_FORMAT[fmt], **({"speed": 10} if fmt == "avif" else {}))
    with pytest.raises(BadImage, match=r"100x100 .*over the limit of 5000 pixels"):
        check_image(data, max_pixels=5000)
    assert check_image(data, max_pixels=10_000) == ImageInfo(fmt, 100, 100)


def test_a_png_claiming_100000_by_100000_is_refused_without_allocating() -> None:
    bomb = build_png(100_000, 100_000)
    assert len(bomb) < 100
    assert check_image(bomb) == ImageInfo("png", 100_000, 100_000)  # structurally whole
    tracemalloc.start()
    try:
        with pytest.raises(BadImage, match=r"100000x100000 \(10000000000 pixels\), over the limit"):
            check_image(bomb, max_pixels=50_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


def test_bomb_headers_in_other_formats_are_refused() -> None:
    images = corpus()
    jpeg = bytearray(images["jpeg-RGB-17x9"][3])
    sof = jpeg.index(b"\xff\xc0") + 5
    jpeg[sof : sof + 4] = struct.pack(">HH", 60_000, 60_000)
    gif = bytearray(images["gif-P-17x9"][3])
    gif[6:10] = struct.pack("<HH", 60_000, 60_000)
    webp = bytearray(images["webp-lossless-RGB-17x9"][3])
    webp[21:25] = struct.pack("<I", 0x3FFF | 0x3FFF << 14)  # VP8L header: 16384 x 16384
    for data, side in ((jpeg, 60_000), (gif, 60_000), (webp, 16_384)):
        assert check_image(bytes(data)).width == side
        with pytest.raises(BadImage, match="over the limit"):
            check_image(bytes(data), max_pixels=100_000_000)


# ----------------------------------------------------------------------------- property tests

MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    b"GIF87a",
    b"GIF89a",
    b"RIFF\x00\x01\x00\x00WEBPVP8X",
    b"RIFF\x00\x01\x00\x00WEBPVP8 ",
    b"RIFF\x00\x01\x00\x00WEBPVP8L",
    b"\x00\x00\x00\x14ftypavif\x00\x00\x00\x00avif",
]


@given(prefix=st.sampled_from(MAGIC), rest=st.binary(max_size=600))
@FUZZ
def test_random_bytes_raise_nothing_but_bad_image(prefix: bytes, rest: bytes) -> None:
    check_agrees_with_pillow(prefix + rest)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(corpus()[draw(st.sampled_from(NAMES))][3])
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite", "append"]))
        pos = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif kind == "overwrite":  # a length or size field set to a boundary value
            value = draw(st.sampled_from([0, 1, 2, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
            data[pos : pos + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))
        else:
            data += draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@given(data=mutated_images())
@FUZZ
def test_mutated_images_are_refused_or_agree_with_pillow(data: bytes) -> None:
    check_agrees_with_pillow(data)
