"""Edit inputs cost memory by the input, not by n: each is decoded once to check it and once for the
route, a JPEG at the scale the route needs, and encoded for a vendor upload once however many calls."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from proxy.request import ImageRequest, InputImage

from .conftest import base_config

SMALL = {"default": "64x64", "tiers": {"0.004": {"1:1": "64x64"}}}


def jpeg(side: int, mode: str = "CMYK", progressive: bool = True) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (side, side), (30, 60, 90, 10)[:len(mode)]).save(out, format="JPEG", progressive=progressive)
    return out.getvalue()


@pytest.fixture
def opened(monkeypatch):
    """Every Pillow image opened from the given bytes: (the image, for its size after draft)."""
    seen: dict[bytes, list[Image.Image]] = {}
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        im = real_open(fp, *args, **kwargs)
        if isinstance(fp, io.BytesIO):
            seen.setdefault(bytes(fp.getbuffer()), []).append(im)
        return im

    monkeypatch.setattr(Image, "open", counting_open)
    return seen


@pytest.mark.parametrize("n", [1, 10])
async def test_placeholder_decodes_each_input_twice_whatever_n(start_proxy, tmp_path, opened, n):
    cfg = base_config(tmp_path)
    cfg["size_tables"]["small"] = SMALL
    cfg["models"]["edit"] = {"sizes": "small", "routes": ["placeholder"], "max_input_images": 1}
    _, client = await start_proxy(cfg)
    image, mask = jpeg(1024), jpeg(1024, progressive=False)
    r = await client.images.edit(model="edit", image=("in.jpg", image, "image/jpeg"),
                                 mask=("mask.jpg", mask, "image/jpeg"), prompt="paint it", n=n,
                                 size="64x64", response_format="b64_json")
    assert len(r.data) == n
    assert all(Image.open(io.BytesIO(base64.b64decode(d.b64_json))).size == (64, 64) for d in r.data)
    for data in (image, mask):
        # Once to check it decodes, once for the route (it used to be once per output image).
        assert len(opened[data]) == 2, len(opened[data])
        # Both at libjpeg's 1/8 scale: the check needs no pixels, the route 64x64 of them.
        assert [im.size for im in opened[data]] == [(128, 128)] * 2


def test_the_local_route_decodes_a_jpeg_at_the_scale_it_needs(opened):
    from proxy.providers.local_convert import decode_inputs

    big, png = jpeg(2048, "RGB", progressive=False), io.BytesIO()
    Image.new("RGBA", (2048, 2048), (0, 0, 0, 0)).save(png, format="PNG")
    req = ImageRequest(prompt="p", model="m", width=512, height=512,
                       images=(InputImage(big, "jpeg", 2048, 2048),),
                       mask=InputImage(png.getvalue(), "png", 2048, 2048, "mask"))
    images, mask = decode_inputs(req)
    # The edit pipeline conditions on ~1 MP: 2048x2048 is read at half scale, and the PNG mask follows.
    assert images[0].size == (1024, 1024) and mask.size == (1024, 1024)
    assert len(opened[big]) == 1


def test_a_vendor_upload_is_encoded_once_for_all_calls():
    item = InputImage(jpeg(64, "RGB"), "jpeg", 64, 64)
    first = item.data_uri()
    assert first.startswith("data:image/jpeg;base64,")
    assert item.data_uri() is first  # n calls, retries and fallbacks share one copy of the base64
