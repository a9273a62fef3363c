"""Input images as pixels, decoded at the smallest scale a route needs (CPU work: off the event loop).

A 4096x4096 JPEG costs 64-200 MB to decode at full size (a progressive one keeps every coefficient);
a route that makes 1024x1024 images needs a quarter of each side. libjpeg decodes at 1/2, 1/4 or 1/8
scale directly (Pillow's draft), so a JPEG is never expanded beyond what is asked for. Other formats
decode whole, once. Callers decode an input once per call and share the result across its n images.
"""

from __future__ import annotations

import io
import math

from PIL import Image


def open_scaled(data: bytes, at_least: tuple[int, int] | None = None) -> Image.Image:
    """The image in `data`, loaded; a JPEG at the largest reduction whose sides stay >= `at_least`
    (None: full size). Raises what Pillow raises for bytes that do not decode."""
    im = Image.open(io.BytesIO(data))
    if at_least is not None and im.format == "JPEG":
        im.draft(None, (max(1, at_least[0]), max(1, at_least[1])))
    im.load()
    return im


def cover_size(width: int, height: int, target: tuple[int, int], min_pixels: int = 0) -> tuple[int, int]:
    """The smallest size of the same shape as width x height that still covers `target` on both sides
    (fitted to it, it is cropped and scaled down, never up) and has at least `min_pixels`; never larger
    than width x height."""
    scale = max(target[0] / width, target[1] / height, math.sqrt(min_pixels / (width * height)))
    scale = min(1.0, scale)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))
