"""The emulation layer: convert(), generate_n() and render_images()."""

from __future__ import annotations

import asyncio
import base64
import io
import random

import pytest
from aiohttp import web
from PIL import Image

from proxy.errors import InvalidRequest, RateLimited, UpstreamError
from proxy.media.fetch import FetchPolicy, GuardedFetcher
from proxy.media.output import (
    OutputSettings,
    check_output_request,
    convert,
    finish_images,
    generate_n,
    render_images,
)
from proxy.providers.base import GeneratedImage
from proxy.request import SEED_MAX, ImageRequest


def noisy(size=(96, 64), mode="RGB", seed=0) -> Image.Image:
    """A picture with detail, so that lossy quality settings make a difference."""
    rng = random.Random(seed)
    bands = len(mode)
    data = rng.randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, data)


def encoded(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **kwargs)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


PNG_96x64 = encoded(noisy())


def request(**kwargs) -> ImageRequest:
    kwargs.setdefault("prompt", "a cat")
    kwargs.setdefault("model", "qwen-image")
    kwargs.setdefault("width", 96)
    kwargs.setdefault("height", 64)
    return ImageRequest(**kwargs)


# --- convert ---------------------------------------------------------------------------------------


def test_untouched_when_format_and_size_match():
    data = encoded(noisy())
    out = convert(data, "png", None, (96, 64))
    assert out.data is data
    assert (out.format, out.width, out.height, out.mime) == ("png", 96, 64, "image/png")


def test_untouched_when_no_format_is_asked():
    data = encoded(noisy(), "JPEG", quality=70)
    out = convert(data, None, None, (96, 64))
    assert out.data is data
    assert out.format == "jpeg"
    assert out.mime == "image/jpeg"


def test_untouched_when_the_provider_applied_the_compression():
    data = encoded(noisy(), "WEBP", quality=30)
    out = convert(data, "webp", 30, (96, 64), compression_applied=True)
    assert out.data is data


@pytest.mark.parametrize("target, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP"),
                                                ("gif", "GIF"), ("avif", "AVIF")])
@pytest.mark.parametrize("source", ["PNG", "JPEG", "WEBP"])
def test_conversion_to_each_format(source, target, pil_format):
    data = encoded(noisy(), source)
    out = convert(data, target, None, (96, 64))
    im = decode(out.data)
    assert im.format == pil_format
    assert im.size == (96, 64)
    assert out.format == target
    assert (out.width, out.height) == (96, 64)
    if source.lower() != target:
        assert out.data != data


def test_formats_outside_the_five_are_refused():
    # BMP, TIFF...: no route of ours makes them; treat them as a broken answer (the route falls back).
    with pytest.raises(UpstreamError):
        convert(encoded(noisy(), "BMP"), None, None, (96, 64))


@pytest.mark.parametrize("target", ["jpeg", "webp", "avif"])
def test_output_compression_changes_the_size(target):
    data = encoded(noisy(size=(128, 128)))
    low = convert(data, target, 10, (128, 128))
    high = convert(data, target, 95, (128, 128))
    assert len(low.data) < len(high.data)
    assert decode(low.data).size == (128, 128)


def test_output_compression_recompresses_a_jpeg_of_the_same_size():
    data = encoded(noisy(size=(128, 128)), "JPEG", quality=95)
    out = convert(data, "jpeg", 10, (128, 128))
    assert out.data != data
    assert len(out.data) < len(data)
    assert decode(out.data).format == "JPEG"


def test_rgba_to_jpeg_flattens_on_white():
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 255))
    for x in range(8):
        for y in range(16):
            im.putpixel((x, y), (0, 0, 0, 0))  # left half fully transparent
    out = convert(encoded(im), "jpeg", 95, (16, 16))
    got = decode(out.data)
    assert got.format == "JPEG" and got.mode == "RGB"
    assert all(c > 240 for c in got.getpixel((2, 8)))  # transparent -> white, not black
    r, g, b = got.getpixel((13, 8))
    assert r > 200 and g < 60 and b < 60  # the opaque part keeps its colour


@pytest.mark.parametrize("mode", ["LA", "P", "L", "I;16"])
def test_other_modes_convert(mode):
    im = noisy(mode="L").convert(mode) if mode != "LA" else noisy(mode="LA")
    for target in ("jpeg", "webp", "avif", "png"):
        out = convert(encoded(im), target, None, (96, 64))
        assert decode(out.data).size == (96, 64)


def test_keeps_alpha_in_webp():
    im = Image.new("RGBA", (20, 20), (0, 255, 0, 0))
    got = decode(convert(encoded(im), "webp", None, (20, 20)).data)
    assert got.mode == "RGBA"
    assert got.getpixel((5, 5))[3] == 0


@pytest.mark.parametrize("target", [None, "png", "jpeg"])
def test_resize_to_the_requested_size(target):
    data = encoded(noisy(size=(200, 100)))
    out = convert(data, target, None, (96, 64))
    im = decode(out.data)
    assert im.size == (96, 64)
    assert (out.width, out.height) == (96, 64)
    assert out.format == (target or "png")


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n truncated", b"{}",
                                  PNG_96x64[:-20], PNG_96x64[: len(PNG_96x64) // 2]])
@pytest.mark.parametrize("target", [None, "png", "jpeg"])
def test_non_image_data_is_an_upstream_error(data, target):
    # Truncated images included, whether they would pass through untouched (None, png) or be converted.
    with pytest.raises(UpstreamError):
        convert(data, target, None, (96, 64))


def test_a_jpeg_cut_short_is_an_upstream_error():
    data = encoded(noisy(), "JPEG", quality=90)
    for cut in (len(data) - 2, len(data) // 2, 200):
        with pytest.raises(UpstreamError):
            convert(data[:cut], None, None, (96, 64))
        with pytest.raises(UpstreamError):
            convert(data[:cut], "png", None, (96, 64))


def test_a_decompression_bomb_is_refused_before_decoding():
    # A 6000x6000 black PNG is ~35 KB on disk and 108 MB decoded.
    bomb = encoded(Image.new("RGB", (6000, 6000)))
    assert len(bomb) < 200_000
    with pytest.raises(UpstreamError) as e:
        convert(bomb, "jpeg", None, (96, 64), max_pixels=4096 * 4096)
    assert "6000x6000" in e.value.message


def test_check_output_request():
    check_output_request(request(output_format="jpeg", output_compression=50))
    check_output_request(request(output_compression=50))  # format chosen later
    with pytest.raises(InvalidRequest) as e:
        check_output_request(request(output_format="png", output_compression=50))
    assert e.value.param == "output_compression"


# --- generate_n -----------------------------------------------------------------------------------


class Recorder:
    """A provider call that records what it was asked and returns as many images as asked."""

    def __init__(self, shortfall: int = 0, with_seeds: bool = False):
        self.calls: list[ImageRequest] = []
        self.shortfall = shortfall
        self.with_seeds = with_seeds

    async def __call__(self, chunk: ImageRequest) -> list[GeneratedImage]:
        self.calls.append(chunk)
        await asyncio.sleep(0)
        count = max(0, chunk.n - self.shortfall)
        return [GeneratedImage(data=f"{chunk.seed}/{i}".encode(), seed=(1000 + i) if self.with_seeds else None)
                for i in range(count)]


async def test_n_split_into_calls_with_seed_offsets():
    call = Recorder()
    images = await generate_n(call, request(n=5, seed=100), per_call=2)
    assert sorted((c.n, c.seed) for c in call.calls) == [(1, 104), (2, 100), (2, 102)]
    assert [img.seed for img in images] == [100, 101, 102, 103, 104]
    # images come back in order of the chunks
    assert [img.data for img in images] == [b"100/0", b"100/1", b"102/0", b"102/1", b"104/0"]


async def test_one_image_per_call():
    call = Recorder()
    images = await generate_n(call, request(n=3, seed=SEED_MAX), per_call=1)
    assert sorted(c.seed for c in call.calls) == [0, 1, SEED_MAX]
    assert all(c.n == 1 for c in call.calls)
    assert [img.seed for img in images] == [SEED_MAX, 0, 1]


async def test_one_call_when_the_provider_makes_enough():
    call = Recorder()
    images = await generate_n(call, request(n=4, seed=7), per_call=10)
    assert [(c.n, c.seed) for c in call.calls] == [(4, 7)]
    assert len(images) == 4


async def test_calls_run_in_parallel():
    running, peak = 0, 0

    async def call(chunk):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return [GeneratedImage(data=b"x")]

    await generate_n(call, request(n=4), per_call=1)
    assert peak == 4


async def test_without_seed_no_seed_is_invented():
    call = Recorder()
    images = await generate_n(call, request(n=3), per_call=1)
    assert all(c.seed is None for c in call.calls)
    assert all(img.seed is None for img in images)


async def test_provider_seeds_are_kept():
    images = await generate_n(Recorder(with_seeds=True), request(n=2, seed=5), per_call=2)
    assert [img.seed for img in images] == [1000, 1001]


async def test_exact_count_when_the_provider_returns_more():
    async def call(chunk):
        return [GeneratedImage(data=b"x") for _ in range(chunk.n + 2)]

    assert len(await generate_n(call, request(n=3), per_call=3)) == 3


async def test_fewer_images_than_asked_is_an_upstream_error():
    with pytest.raises(UpstreamError) as e:
        await generate_n(Recorder(shortfall=1), request(n=4), per_call=2)
    assert "2 of 4" in e.value.message


async def test_a_failing_chunk_cancels_its_siblings():
    cancelled, started = [], []

    async def call(chunk):
        started.append(chunk.seed)
        if chunk.seed == 1:
            await asyncio.sleep(0.01)
            raise RateLimited("slow down", retry_after=2)
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(chunk.seed)
            raise
        return [GeneratedImage(data=b"x")]

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(RateLimited):
        await generate_n(call, request(n=3, seed=0), per_call=1)
    assert loop.time() - t0 < 8  # the other calls sleep 10 s: they were cancelled, not awaited
    assert sorted(started) == [0, 1, 2]
    assert sorted(cancelled) == [0, 2]


# --- render_images ---------------------------------------------------------------------------------


@pytest.fixture
async def http():
    """The guarded fetcher the proxy downloads upstream image URLs with."""
    fetcher = GuardedFetcher()
    yield fetcher
    await fetcher.close()


@pytest.fixture
async def upstream(aiohttp_server):
    """A small image host: /img.png, /big.png (200 KB), /missing (404); counts downloads."""
    hits: list[str] = []
    big = encoded(noisy(size=(300, 300)))
    assert len(big) > 200_000

    async def img(request):
        hits.append(request.path)
        return web.Response(body=PNG_96x64, content_type="image/png")

    async def big_img(request):
        hits.append(request.path)
        return web.Response(body=big, content_type="image/png")

    async def missing(request):
        hits.append(request.path)
        return web.Response(status=404, text="gone")

    app = web.Application()
    app.router.add_get("/img.png", img)
    app.router.add_get("/big.png", big_img)
    app.router.add_get("/missing", missing)
    server = await aiohttp_server(app)
    server.hits = hits
    # The provider whose answers carry these URLs is configured with this origin: trusted.
    server.origin = str(server.make_url("").origin())
    return server


async def render(images, req, store, http, trusted_origin=None, max_download_bytes=None, **settings):
    """The route attempt's finish step, then rendering: (items, each image's format)."""
    if max_download_bytes is not None:
        settings["fetch_policy"] = FetchPolicy(max_bytes=max_download_bytes)
    finals = await finish_images(images, req, fetcher=http, settings=OutputSettings(**settings),
                                 trusted_origin=trusted_origin)
    items = await render_images(finals, req, store=store, base_url="http://proxy.test/")
    return items, [img.format for img in finals]


async def test_b64_json(store, http):
    req = request(response_format="b64_json")
    items, formats = await render([GeneratedImage(data=PNG_96x64, revised_prompt="a fluffy cat")], req, store, http)
    assert list(items[0]) == ["b64_json", "revised_prompt"]
    assert base64.b64decode(items[0]["b64_json"]) == PNG_96x64  # passed through untouched
    assert items[0]["revised_prompt"] == "a fluffy cat"
    assert formats == ["png"]
    assert list(store.root.iterdir()) == []  # nothing stored for b64_json


async def test_revised_prompt_defaults_to_the_prompt(store, http):
    items, _ = await render([GeneratedImage(data=PNG_96x64)], request(response_format="b64_json"), store, http)
    assert items[0]["revised_prompt"] == "a cat"


@pytest.mark.parametrize("fmt, ext, pil", [(None, "png", "PNG"), ("jpeg", "jpeg", "JPEG"), ("webp", "webp", "WEBP"),
                                           ("gif", "gif", "GIF"), ("avif", "avif", "AVIF")])
async def test_url_served_from_the_store(store, http, fmt, ext, pil):
    req = request(response_format="url", output_format=fmt)
    items, formats = await render([GeneratedImage(data=PNG_96x64)], req, store, http)
    assert formats == [ext]
    url = items[0]["url"]
    assert url.startswith("http://proxy.test/images/")  # no double slash
    name = url.rsplit("/", 1)[1]
    assert name.endswith("." + ext)
    found = store.lookup(name)
    assert found is not None
    path, mime = found
    assert path.is_file()
    assert mime == f"image/{ext}"
    im = decode(path.read_bytes())
    assert (im.format, im.size) == (pil, (96, 64))


async def test_several_images_in_order(store, http):
    imgs = [GeneratedImage(data=encoded(Image.new("RGB", (96, 64), colour))) for colour in ("red", "blue")]
    items, _ = await render(imgs, request(response_format="b64_json", n=2), store, http)
    colours = [decode(base64.b64decode(item["b64_json"])).getpixel((5, 5)) for item in items]
    assert colours == [(255, 0, 0), (0, 0, 255)]


async def test_data_uri_is_decoded(store, http):
    uri = "data:image/png;base64," + base64.b64encode(PNG_96x64).decode()
    items, _ = await render([GeneratedImage(url=uri)], request(response_format="b64_json"), store, http)
    assert base64.b64decode(items[0]["b64_json"]) == PNG_96x64


async def test_malformed_data_uri(store, http):
    with pytest.raises(UpstreamError):
        await render([GeneratedImage(url="data:image/png;base64,@@@notbase64")], request(response_format="b64_json"),
                     store, http)


async def test_http_url_is_downloaded_and_converted(store, http, upstream):
    req = request(response_format="b64_json", output_format="jpeg")
    items, _ = await render([GeneratedImage(url=str(upstream.make_url("/img.png")))], req, store, http,
                            trusted_origin=upstream.origin)
    im = decode(base64.b64decode(items[0]["b64_json"]))
    assert (im.format, im.size) == ("JPEG", (96, 64))
    assert upstream.hits == ["/img.png"]


async def test_http_url_rehosted_for_url_responses(store, http, upstream):
    upstream_url = str(upstream.make_url("/img.png"))
    items, _ = await render([GeneratedImage(url=upstream_url)], request(response_format="url"), store, http,
                            trusted_origin=upstream.origin)
    assert items[0]["url"] != upstream_url
    path, _ = store.lookup(items[0]["url"].rsplit("/", 1)[1])
    assert path.read_bytes() == PNG_96x64
    assert upstream.hits == ["/img.png"]


async def test_http_url_handed_on_when_rehosting_is_off(store, http, upstream):
    upstream_url = str(upstream.make_url("/img.png"))
    items, formats = await render([GeneratedImage(url=upstream_url)], request(response_format="url"), store, http,
                                  rehost_upstream_urls=False)
    assert items[0]["url"] == upstream_url
    assert formats == [None]
    assert upstream.hits == []  # not downloaded at all


async def test_download_is_needed_for_conversion_even_when_rehosting_is_off(store, http, upstream):
    upstream_url = str(upstream.make_url("/img.png"))
    items, _ = await render([GeneratedImage(url=upstream_url)], request(response_format="url", output_format="webp"),
                            store, http, rehost_upstream_urls=False, trusted_origin=upstream.origin)
    assert items[0]["url"].endswith(".webp")
    assert upstream.hits == ["/img.png"]


async def test_download_size_cap(store, http, upstream):
    with pytest.raises(UpstreamError) as e:
        await render([GeneratedImage(url=str(upstream.make_url("/big.png")))], request(response_format="b64_json"),
                     store, http, max_download_bytes=100_000, trusted_origin=upstream.origin)
    assert "100000" in e.value.message


async def test_download_http_error(store, http, upstream):
    with pytest.raises(UpstreamError) as e:
        await render([GeneratedImage(url=str(upstream.make_url("/missing")))], request(response_format="b64_json"),
                     store, http, trusted_origin=upstream.origin)
    assert "404" in e.value.message


async def test_download_connection_error(store, http, unused_tcp_port):
    with pytest.raises(UpstreamError):
        await render([GeneratedImage(url=f"http://127.0.0.1:{unused_tcp_port}/x.png")],
                     request(response_format="b64_json"), store, http,
                     trusted_origin=f"http://127.0.0.1:{unused_tcp_port}")


@pytest.mark.parametrize("path", ["/img.png", "/secret"])
async def test_urls_off_the_provider_origin_get_the_ssrf_rules(store, http, upstream, path):
    # An upstream answering with a URL on another origin (here the loopback, as an attacker would
    # point it at a metadata service or an internal admin page) is refused, and nothing is fetched.
    with pytest.raises(UpstreamError) as e:
        await render([GeneratedImage(url=str(upstream.make_url(path)))], request(response_format="b64_json"),
                     store, http, trusted_origin="https://api.upstream.example")
    assert "scheme http is not allowed" in e.value.message or "loopback" in e.value.message
    assert upstream.hits == []


async def test_a_trusted_origin_covers_that_origin_only(store, http, upstream):
    other_port = upstream.make_url("/img.png").with_port(upstream.port + 1 if upstream.port < 65535 else 1)
    with pytest.raises(UpstreamError):
        await render([GeneratedImage(url=str(other_port))], request(response_format="b64_json"), store, http,
                     trusted_origin=upstream.origin)


async def test_upstream_image_of_another_size_is_resized(store, http):
    data = encoded(noisy(size=(300, 200)))
    items, formats = await render([GeneratedImage(data=data)], request(response_format="b64_json"), store, http)
    assert decode(base64.b64decode(items[0]["b64_json"])).size == (96, 64)
    assert formats == ["png"]


# --- base64 from an upstream ------------------------------------------------------------------------


async def test_upstream_b64_is_handed_on_untouched(store, http):
    b64 = base64.b64encode(PNG_96x64).decode()
    items, formats = await render([GeneratedImage(b64=b64)], request(response_format="b64_json"), store, http)
    assert items[0]["b64_json"] is b64
    assert formats == ["png"]


@pytest.mark.parametrize("kwargs", [{"output_format": "webp"}, {"width": 48, "height": 32},
                                    {"output_format": "png", "width": 50}])
async def test_upstream_b64_is_converted_when_needed(store, http, kwargs):
    b64 = base64.b64encode(PNG_96x64).decode()
    req = request(response_format="b64_json", **kwargs)
    items, formats = await render([GeneratedImage(b64=b64)], req, store, http)
    im = decode(base64.b64decode(items[0]["b64_json"]))
    assert im.size == (req.width, req.height)
    assert im.format == (req.output_format or "png").upper()
    assert formats == [req.output_format or "png"]


async def test_upstream_jpeg_b64_is_recompressed_unless_the_upstream_applied_it(store, http):
    jpeg = encoded(noisy(), "JPEG", quality=95)
    b64 = base64.b64encode(jpeg).decode()
    req = request(response_format="b64_json", output_format="jpeg", output_compression=10)
    items, _ = await render([GeneratedImage(b64=b64, compression_applied=True)], req, store, http)
    assert items[0]["b64_json"] == b64
    items, _ = await render([GeneratedImage(b64=b64)], req, store, http)
    assert len(base64.b64decode(items[0]["b64_json"])) < len(jpeg)


async def test_upstream_b64_stored_for_url_responses(store, http):
    b64 = base64.b64encode(PNG_96x64).decode()
    items, _ = await render([GeneratedImage(b64=b64)], request(response_format="url"), store, http)
    path, mime = store.lookup(items[0]["url"].rsplit("/", 1)[1])
    assert mime == "image/png"
    assert path.read_bytes() == PNG_96x64


@pytest.mark.parametrize("b64", ["@@@ not base64 @@@", base64.b64encode(b"plain text, not an image").decode()])
async def test_bad_upstream_b64_is_an_upstream_error(store, http, b64):
    with pytest.raises(UpstreamError):
        await render([GeneratedImage(b64=b64)], request(response_format="b64_json"), store, http)


def test_another_shape_is_centre_cropped_not_stretched():
    # A 200x100 image: left half red, right half blue, with a green band in the middle 100 px.
    im = Image.new("RGB", (200, 100), (255, 0, 0))
    im.paste((0, 0, 255), (100, 0, 200, 100))
    im.paste((0, 255, 0), (50, 0, 150, 100))
    out = decode(convert(encoded(im), "png", None, (50, 50)).data)
    assert out.size == (50, 50)
    # A square crop keeps the centre (green) only; stretching would have kept the red and blue sides.
    assert all(greenish(out.getpixel((x, 25))) for x in (2, 47))


def test_a_tall_image_is_cropped_top_and_bottom():
    im = Image.new("RGB", (100, 300), (255, 0, 0))
    im.paste((0, 255, 0), (0, 100, 100, 200))
    out = decode(convert(encoded(im), "png", None, (100, 100)).data)
    assert all(greenish(out.getpixel((50, y))) for y in (1, 98))


def greenish(pixel) -> bool:
    r, g, b = pixel[:3]
    return g > 240 and r < 15 and b < 15
