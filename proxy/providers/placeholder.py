"""Instant offline images: the prompt drawn on a background determined by (prompt, seed).

For offline development and for testing apps: same sizes as the real model, no network, no GPU.
The cost is bounded: the picture is drawn at about 1 MP at most and scaled up (nearest neighbour),
and sizes above MAX_PIXELS are refused before anything is drawn.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import math
import random
import textwrap

from PIL import Image, ImageDraw, ImageFont

from ..config import RouteConfig
from ..errors import InvalidRequest
from ..media import pixels
from ..media.output import fit
from ..request import SEED_MAX, ImageRequest
from .base import Capabilities, GeneratedImage, Provider

# The largest image it makes, and the most pixels one call may ask for over its n images. At
# 4096x4096 an image costs ~0.2 s of CPU (the upscale and the PNG encoding) and ~50 MB while it is made.
MAX_PIXELS = 4096 * 4096
MAX_CALL_PIXELS = 4 * MAX_PIXELS
# The picture is drawn at most this large and then scaled up: drawing cost does not grow with the size.
DRAW_PIXELS = 1024 * 1024
# zlib level 1: about half the time of the default level 6 for a somewhat larger file (it is a placeholder).
PNG_COMPRESS_LEVEL = 1


def _palette(prompt: str, seed: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    return (digest[0], digest[1], digest[2]), (digest[3], digest[4], digest[5])


def draw_placeholder(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """A deterministic picture of (prompt, seed): a two-colour gradient, shapes and the prompt text.

    Exactly width x height; above DRAW_PIXELS it is drawn smaller and scaled up with nearest neighbour.
    """
    scale = min(1.0, math.sqrt(DRAW_PIXELS / (width * height)))
    if scale == 1.0:
        return _draw(prompt, seed, width, height, f"{width}x{height}")
    small = _draw(prompt, seed, max(1, round(width * scale)), max(1, round(height * scale)), f"{width}x{height}")
    return small.resize((width, height), Image.Resampling.NEAREST)


def _draw(prompt: str, seed: int, width: int, height: int, label: str) -> Image.Image:
    top, bottom = _palette(prompt, seed)
    # A vertical gradient built from a 1-pixel column, so the cost does not grow with width.
    column = Image.new("RGB", (1, 256))
    for y in range(256):
        t = y / 255
        column.putpixel((0, y), tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)))
    im = column.resize((width, height), Image.Resampling.BILINEAR)

    draw = ImageDraw.Draw(im)
    rng = random.Random(f"{seed}:{prompt}")
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        r = max(1, int(min(width, height) * rng.uniform(0.05, 0.2)))
        colour = tuple(rng.randrange(256) for _ in range(3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), outline=colour, width=max(1, r // 8))

    font_size = max(8, min(width, height) // 16)
    font = ImageFont.load_default(size=font_size)
    chars_per_line = max(4, int(width / (font_size * 0.6)) - 2)
    shown = max(1, height // (font_size * 2))
    # Only the text the shown lines can hold is wrapped: wrapping a whole long prompt took seconds.
    lines = textwrap.wrap(prompt[: chars_per_line * shown * 2], chars_per_line)[:shown]
    lines.append(f"{label} seed {seed}")
    y = font_size
    for line in lines:
        draw.text((font_size // 2 + 1, y + 1), line, fill=(0, 0, 0), font=font)
        draw.text((font_size // 2, y), line, fill=(255, 255, 255), font=font)
        y += int(font_size * 1.3)
    return im


def check_work(width: int, height: int, n: int) -> None:
    """Refuse a call above the placeholder's own limits, before anything is drawn."""
    if width * height > MAX_PIXELS:
        raise InvalidRequest(
            f"Invalid size {width}x{height}: the placeholder makes images of at most {MAX_PIXELS} pixels.",
            param="size",
        )
    if n * width * height > MAX_CALL_PIXELS:
        raise InvalidRequest(
            f"Invalid n {n}: {n} images of {width}x{height} are more than the placeholder's limit of "
            f"{MAX_CALL_PIXELS} pixels per call.",
            param="n",
        )


def prepare_edit(width: int, height: int, image: bytes, mask: bytes | None) -> tuple[Image.Image, Image.Image | None]:
    """The first input fitted to the size, and the mask's edit area (255 = transparent in the mask) at the
    size: decoded once for all n images, a JPEG at the smallest scale that still covers the size."""
    src = pixels.open_scaled(image, (width, height))
    base = fit(src.convert("RGB"), (width, height))
    src.close()
    if mask is None:
        return base, None
    m = pixels.open_scaled(mask, (width, height))
    alpha = m.convert("RGBA").getchannel("A").resize((width, height), Image.Resampling.NEAREST)
    m.close()
    return base, alpha.point(lambda a: 255 if a > 0 else 0)


def draw_edit(prompt: str, seed: int, base: Image.Image, keep: Image.Image | None) -> Image.Image:
    """The prepared input, visibly changed: tinted with the (prompt, seed) colour (only where the mask is
    transparent, when there is one), with the prompt drawn on it."""
    width, height = base.size
    tint = Image.new("RGB", (width, height), _palette(prompt, seed)[0])
    changed = Image.blend(base, tint, 0.45)
    if keep is not None:
        # OpenAI's mask: transparent pixels are the area to edit.
        changed = Image.composite(base, changed, keep)
    label = _draw(prompt, seed, max(1, width), max(1, height), f"edit {width}x{height}")
    text_area = Image.new("L", (width, height), 0)
    ImageDraw.Draw(text_area).rectangle((0, 0, width, max(1, height // 6)), fill=255)
    return Image.composite(label, changed, text_area)


def render_edit_png(prompt: str, seed: int, base: Image.Image, keep: Image.Image | None) -> bytes:
    out = io.BytesIO()
    draw_edit(prompt, seed, base, keep).save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


def render_png(prompt: str, seed: int, width: int, height: int) -> bytes:
    out = io.BytesIO()
    draw_placeholder(prompt, seed, width, height).save(out, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return out.getvalue()


class PlaceholderProvider(Provider):
    kind = "placeholder"
    # The options this kind reads in models.yaml; any other key is a config error (proxy.config.kinds.options_model).
    options_schema = {"timeout": (float, {"gt": 0})}
    capabilities = Capabilities(max_images_per_call=10, edits=True, masks=True)

    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        check_work(req.width, req.height, req.n)
        seeds = [
            seed if (seed := req.with_chunk(1, i).seed) is not None else random.randint(0, SEED_MAX)
            for i in range(req.n)
        ]
        if req.is_edit:
            # Decoded once for the n images (each thread only reads the prepared pixels).
            mask = req.mask.data if req.mask is not None else None
            base, keep = await asyncio.to_thread(prepare_edit, req.width, req.height, req.images[0].data, mask)
            jobs = [asyncio.to_thread(render_edit_png, req.prompt, s, base, keep) for s in seeds]
        else:
            jobs = [asyncio.to_thread(render_png, req.prompt, s, req.width, req.height) for s in seeds]
        datas = await asyncio.gather(*jobs)
        return [
            GeneratedImage(data=d, mime="image/png", width=req.width, height=req.height, seed=s)
            for d, s in zip(datas, seeds, strict=True)
        ]
