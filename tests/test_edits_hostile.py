"""POST /v1/images/edits fed what real clients and a hostile world send: forms past aiohttp's 128 KiB
stream buffer and right at the body limit, phone photos stored sideways (EXIF orientation), 16-bit
greyscale PNGs, image parts without a filename, big data: URLs. Every answer is checked as a client
sees it, and what reached the upstream is decoded with Pillow."""

from __future__ import annotations

import base64
import io
import json
import os
import threading

import aiohttp
import pytest
from openai import AsyncOpenAI
from PIL import Image

import proxy.media.inputs

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES, FakeOpenAIUpstream

MODEL = "qwen-image-edit"  # served by the fake OpenAI-compatible upstream
LOCAL = "edit-placeholder"  # served in-process (the placeholder draws on the first input image)
LIMIT_MB = 1
BOUNDARY = "hostile-boundary"


def encode(im: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def noise_png(side: int) -> bytes:
    """Random pixels: a PNG that does not compress (about 3 bytes a pixel)."""
    return encode(Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)))


def multipart(fields: dict[str, str], files: list[tuple[str, str | None, str, bytes]]) -> bytes:
    """A form built by hand, byte for byte: (name, filename or None for none, content type, data)."""
    out = b""
    for name, value in fields.items():
        out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n').encode()
    for name, filename, ctype, data in files:
        named = f'; filename="{filename}"' if filename is not None else ""
        out += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"{named}\r\n'
                f"Content-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@pytest.fixture
async def gateway(aiohttp_server, start_proxy, tmp_path):
    """(fake upstream, proxy server, openai client); bodies are limited to LIMIT_MB."""
    up = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL_SIZES
    cfg["providers"]["up"] = {"kind": "openai", "base_url": f"{up.url}/v1", "api_key": up.api_key}
    cfg["models"][MODEL] = {"sizes": "small", "routes": ["up"], "max_input_images": 3}
    cfg["models"][LOCAL] = {"sizes": "small", "routes": ["placeholder"], "max_input_images": 3}
    cfg["server"] = {"max_body_mb": LIMIT_MB}
    server, client = await start_proxy(cfg)
    return up, server, client


async def post_form(server, body: bytes) -> tuple[int, dict]:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/edits"), data=body,
                                                    headers=headers) as r:
        return r.status, json.loads(await r.text())


# Bodies past 128 KiB ----------------------------------------------------------------------------------

async def test_a_real_photo_sized_upload_is_edited(gateway):
    # 750 KB of PNG: any multipart body over 128 KiB used to be a 500 (the form was replayed through the
    # connection's own protocol, whose parser asserted when the buffer asked it to pause).
    _, _, client = gateway
    r = await client.images.edit(model=LOCAL, image=("photo.png", noise_png(500), "image/png"), prompt="x",
                                 response_format="b64_json")
    assert decode(base64.b64decode(r.data[0].b64_json)).size == (64, 64)


async def test_a_photo_sized_upload_reaches_an_openai_compatible_upstream_whole(gateway):
    # The same 750 KB, forwarded as a form to an OpenAI-compatible upstream: every byte arrives.
    up, _, client = gateway
    photo = noise_png(500)
    r = await client.images.edit(model=MODEL, image=("photo.png", photo, "image/png"), prompt="x",
                                 response_format="b64_json")
    assert decode(base64.b64decode(r.data[0].b64_json)).format == "PNG"
    (_fields, files), = up.edit_forms
    assert [(name, data) for name, _, data in files] == [("image", photo)]


async def test_a_body_exactly_at_the_limit_is_served_and_one_byte_more_is_a_413(gateway):
    _, server, _ = gateway
    limit = LIMIT_MB * 1024 * 1024
    fields = {"model": LOCAL, "prompt": "x", "response_format": "b64_json"}
    image = noise_png(100)
    # Bytes after IEND are allowed: pad the PNG so that the whole body is exactly the limit.
    pad = limit - len(multipart(fields, [("image", "in.png", "image/png", image)]))
    body = multipart(fields, [("image", "in.png", "image/png", image + b"\0" * pad)])
    assert len(body) == limit
    status, answer = await post_form(server, body)
    assert status == 200, answer
    assert decode(base64.b64decode(answer["data"][0]["b64_json"])).size == (64, 64)

    body = multipart(fields, [("image", "in.png", "image/png", image + b"\0" * (pad + 1))])
    status, answer = await post_form(server, body)
    assert status == 413 and answer["error"]["code"] == "payload_too_large"


# What the upstream is given --------------------------------------------------------------------------

def sideways_photo() -> tuple[bytes, Image.Image]:
    """A 64x48 JPEG stored sideways with EXIF orientation 6 (as phones do): it displays as 48x64, its
    stored left half (blue) on top. Returns the bytes and the picture as a viewer shows it."""
    stored = Image.new("RGB", (64, 48), (220, 0, 0))
    stored.paste((0, 0, 220), (0, 0, 32, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    return encode(stored, "JPEG", exif=exif.tobytes()), stored.transpose(Image.Transpose.ROTATE_270)


async def test_a_sideways_phone_photo_is_edited_upright(gateway):
    up, _, client = gateway
    data, shown = sideways_photo()
    assert shown.size == (48, 64)
    r = await client.images.edit(model=MODEL, image=("photo.jpg", data, "image/jpeg"), prompt="x",
                                 response_format="b64_json")
    # The output follows the picture's 3:4 shape, not the stored 4:3.
    assert decode(base64.b64decode(r.data[0].b64_json)).size == (64, 80)
    fields, files = up.edit_forms[0]
    assert fields["size"] == "64x80"
    sent = decode(files[0][2])
    assert sent.format == "JPEG" and sent.size == (48, 64)
    assert sent.getexif().get(0x0112, 1) == 1  # upright pixels, no rotation left for anyone to apply
    top, bottom = sent.convert("RGB").getpixel((24, 8)), sent.convert("RGB").getpixel((24, 56))
    assert top[2] > 150 > top[0] and bottom[0] > 150 > bottom[2]  # blue on top, as shown


async def test_a_mask_drawn_on_the_upright_photo_fits_it(gateway):
    up, _, client = gateway
    data, _ = sideways_photo()
    mask = encode(Image.new("RGBA", (48, 64), (0, 0, 0, 0)))  # the size the user sees
    r = await client.images.edit(model=MODEL, image=("photo.jpg", data, "image/jpeg"), mask=mask, prompt="x",
                                 response_format="b64_json")
    assert decode(base64.b64decode(r.data[0].b64_json)).size == (64, 80)
    _, files = up.edit_forms[0]
    assert [(name, decode(blob).size) for name, _, blob in files] == [("image", (48, 64)), ("mask", (48, 64))]


async def test_a_16_bit_greyscale_png_reaches_the_upstream_as_its_grey(gateway):
    # Pillow reads 16-bit greyscale as I;16 and its convert() clips to 255: every reader downstream
    # (the local engine, the placeholder) saw a white picture.
    up, _, client = gateway
    grey = encode(Image.new("I;16", (64, 48), 30000))  # 30000/65535: a mid grey, 116 of 255
    assert decode(grey).mode == "I;16"
    r = await client.images.edit(model=MODEL, image=("scan.png", grey, "image/png"), prompt="x",
                                 response_format="b64_json")
    assert decode(base64.b64decode(r.data[0].b64_json)).size == (80, 64)
    sent = decode(up.edit_forms[0][1][0][2])
    assert sent.format == "PNG" and sent.size == (64, 48) and sent.mode == "L"
    assert sent.getpixel((10, 10)) == 30000 // 257


async def test_an_image_part_without_a_filename_is_the_image(gateway):
    # requests / httpx with files={"image": (None, data, "image/png")} send no filename; the part was
    # read as a text field and refused as "not UTF-8 text".
    up, server, _ = gateway
    image = encode(Image.new("RGB", (64, 48), (0, 90, 0)))
    body = multipart({"model": MODEL, "prompt": "x", "response_format": "b64_json"},
                     [("image", None, "image/png", image)])
    status, answer = await post_form(server, body)
    assert status == 200, answer
    assert decode(base64.b64decode(answer["data"][0]["b64_json"])).size == (80, 64)
    assert [(name, blob) for name, _, blob in up.edit_forms[0][1]] == [("image", image)]


async def test_a_data_url_is_decoded_off_the_event_loop(gateway, monkeypatch):
    up, server, _ = gateway
    image = encode(Image.new("RGB", (48, 64), (0, 0, 90)))
    payload = base64.b64encode(image).decode()
    url = "data:image/png;base64," + payload
    threads = []
    real = proxy.media.inputs.base64.b64decode

    def spy(data, *args, **kwargs):
        if data == payload:  # the same module decodes other things (the upstream's answer)
            threads.append(threading.current_thread())
        return real(data, *args, **kwargs)

    monkeypatch.setattr(proxy.media.inputs.base64, "b64decode", spy)
    body = {"model": MODEL, "prompt": "x", "images": [{"image_url": url}], "response_format": "b64_json"}
    async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/images/edits"), json=body) as r:
        assert r.status == 200, await r.text()
    assert threads and threading.main_thread() not in threads
    assert up.edit_forms[0][1][0][2] == image


async def test_the_openai_client_sends_a_sideways_photo_from_a_file(gateway, tmp_path):
    # The SDK as users call it: an open file; the JSON of the answer decodes to the upright shape.
    _, server, _ = gateway
    data, _ = sideways_photo()
    path = tmp_path / "IMG_0001.jpg"
    path.write_bytes(data)
    async with AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="test", max_retries=0) as client:
        with path.open("rb") as f:
            r = await client.images.edit(model=LOCAL, image=f, prompt="x", response_format="b64_json")
    assert decode(base64.b64decode(r.data[0].b64_json)).size == (64, 80)
