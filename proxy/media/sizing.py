"""size / aspect_ratio / resolution -> exact (width, height), following the seed page's rules.

- size "WxH" is exact pixels and wins; size "W:H" means aspect_ratio; "auto" or nothing = default.
- aspect_ratio maps to the nearest supported ratio, compared on a log scale (7:1 with 4:1 and 8:1 -> 8:1).
- resolution ("0.5K", "1K", "2K", "4K" or megapixels "0.25", "1") maps to the nearest tier, also on a
  log scale; the shape is kept.

Work limits, checked before any work starts: each image may have at most the table's `max_pixels`
(DEFAULT_MAX_PIXELS when the table sets none: nothing is unbounded), and one request at most
`max_total_pixels` over its n images (default WORK_FACTOR x max_pixels).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property

from ..errors import InvalidRequest

MAX_SIDE = 14142  # the seed page's "1-14142px per side"
# Per image, for a table without max_pixels: 16 MP (4096x4096, the "4K" tier). 14142x14142 is 200 MP,
# about 600 MB of RGB for one image before any encoding: "1-14142 px a side" needs a pixel cap too.
DEFAULT_MAX_PIXELS = 4096 * 4096
# Per request, for a table without max_total_pixels: n x width x height up to this many images' worth.
WORK_FACTOR = 4

_PIXELS = re.compile(r"^\s*(\d+)\s*[xX×*]\s*(\d+)\s*$")
_RATIO = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*:\s*(\d+(?:\.\d+)?)\s*$")
_K_TIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[kK]\s*$")
_MP_TIER = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:mp|MP|Mp)?\s*$")


@dataclass(frozen=True)
class SizeTable:
    """A model's supported sizes: tier label -> ratio label -> (width, height)."""

    tiers: dict[str, dict[str, tuple[int, int]]]
    default: tuple[int, int]
    max_side: int = MAX_SIDE
    min_side: int = 1
    max_pixels: int | None = None
    # n x width x height per request; None = WORK_FACTOR x pixel_limit.
    max_total_pixels: int | None = None
    default_ratio: str = field(init=False)
    default_tier: str = field(init=False)

    def __post_init__(self) -> None:
        if not self.tiers or not all(self.tiers.values()):
            raise ValueError("a size table needs at least one tier with one ratio")
        if self.max_total_pixels is not None and self.max_total_pixels < self.pixel_limit:
            # Else one image at the largest allowed size would be refused as too much work.
            raise ValueError(f"max_total_pixels ({self.max_total_pixels}) must be at least max_pixels "
                             f"({self.pixel_limit})")
        for tier, ratios in self.tiers.items():
            tier_megapixels(tier)
            for ratio in ratios:
                parse_ratio(ratio)
        # The default size names the default tier and shape when it is in the table.
        for tier, ratios in self.tiers.items():
            for ratio, wh in ratios.items():
                if tuple(wh) == tuple(self.default):
                    object.__setattr__(self, "default_tier", tier)
                    object.__setattr__(self, "default_ratio", ratio)
                    return
        w, h = self.default
        object.__setattr__(self, "default_tier", _nearest_tier(self.tiers, w * h / 1e6))
        object.__setattr__(self, "default_ratio", _nearest_ratio(self.tiers[self.default_tier], w / h))

    # Cached (the table is immutable): every request's check_work reads them.
    @cached_property
    def pixel_limit(self) -> int:
        """The most pixels one image may have."""
        return self.max_pixels or DEFAULT_MAX_PIXELS

    @cached_property
    def total_pixel_limit(self) -> int:
        """The most pixels one request may ask for over all its images."""
        return self.max_total_pixels or WORK_FACTOR * self.pixel_limit


def parse_pixels(text: str) -> tuple[int, int] | None:
    width, x, height = text.partition("x")
    # "1024x1024" as nearly every client writes it, without the regex (isdecimal: what \d matches).
    if x and width.isdecimal() and height.isdecimal() and len(width) <= 9 and len(height) <= 9:
        return int(width), int(height)
    m = _PIXELS.match(text)
    # More digits than any real side (int() refuses past 4300 of them): not a size.
    if not m or max(len(m.group(1)), len(m.group(2))) > 9:
        return None
    return int(m.group(1)), int(m.group(2))


def parse_ratio(text: str) -> float:
    m = _RATIO.match(text)
    if not m or float(m.group(1)) <= 0 or float(m.group(2)) <= 0:
        raise ValueError(f"'{text}' is not an aspect ratio like '16:9'")
    ratio = float(m.group(1)) / float(m.group(2))
    if not 0 < ratio < math.inf:
        raise ValueError(f"'{text}' is not a usable aspect ratio")
    return ratio


def tier_megapixels(text: str) -> float:
    """'1K' means about 1024x1024 pixels; a bare number is megapixels."""
    if m := _K_TIER.match(text):
        k = float(m.group(1))
        value = k * k * 1024 * 1024 / 1e6  # not k ** 2: that raises OverflowError instead of giving inf
    elif m := _MP_TIER.match(text):
        value = float(m.group(1))
    else:
        raise ValueError(f"'{text}' is not a resolution tier like '1K' or a megapixel count like '0.25'")
    if value <= 0:
        raise ValueError(f"'{text}' must be greater than zero")
    if math.isinf(value):
        raise ValueError(f"'{text}' is too large")
    return value


def _nearest_tier(tiers: dict[str, dict], megapixels: float) -> str:
    return min(tiers, key=lambda t: abs(math.log(tier_megapixels(t)) - math.log(megapixels)))


def _nearest_ratio(ratios: dict[str, tuple[int, int]], ratio: float) -> str:
    return min(ratios, key=lambda r: abs(math.log(parse_ratio(r)) - math.log(ratio)))


def check_bounds(width: int, height: int, table: SizeTable, param: str = "size") -> None:
    if not (table.min_side <= width <= table.max_side and table.min_side <= height <= table.max_side):
        raise InvalidRequest(
            f"Invalid size {width}x{height}: each side must be between {table.min_side} "
            f"and {table.max_side} pixels for this model.",
            param=param,
        )
    if width * height > table.pixel_limit:
        raise InvalidRequest(
            f"Invalid size {width}x{height}: {width * height} pixels is more than this model's "
            f"limit of {table.pixel_limit} pixels per image.",
            param=param,
        )


def check_work(table: SizeTable, width: int, height: int, n: int) -> None:
    """Refuse a request whose images are too large, alone or together, before any work starts.

    Call it once the size is resolved and n is known: a size from the table (aspect_ratio,
    resolution) is checked here too, so a table entry above max_pixels cannot slip through.
    """
    check_bounds(width, height, table)
    total = n * width * height
    if total > table.total_pixel_limit:
        most = table.total_pixel_limit // (width * height)
        raise InvalidRequest(
            f"Invalid n {n}: {n} images of {width}x{height} are {total} pixels, more than this model's "
            f"limit of {table.total_pixel_limit} pixels per request; ask for at most {most} at this size.",
            param="n",
        )


def resolve_size(
    table: SizeTable,
    size: str | None = None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
) -> tuple[int, int]:
    ratio_param = "aspect_ratio"
    if size is not None and (pixels := parse_pixels(size)):
        check_bounds(*pixels, table)
        return pixels
    if size is not None and size.strip().lower() not in ("", "auto"):
        if not _RATIO.match(size):
            raise InvalidRequest(
                f"Invalid size '{size}': use 'WxH' pixels (e.g. '1024x1024'), 'W:H' (e.g. '16:9') or 'auto'.",
                param="size",
            )
        aspect_ratio, ratio_param = size, "size"

    if aspect_ratio is None and resolution is None:
        width, height = table.default  # a copy: the table may hold lists from YAML
        return width, height

    if resolution is None:
        tier = table.default_tier
    else:
        try:
            tier = _nearest_tier(table.tiers, tier_megapixels(resolution))
        except ValueError as e:
            raise InvalidRequest(f"Invalid resolution: {e}.", param="resolution") from None

    ratios = table.tiers[tier]
    if aspect_ratio is None:
        ratio = table.default_ratio if table.default_ratio in ratios else None
        ratio = ratio or _nearest_ratio(ratios, parse_ratio(table.default_ratio))
    else:
        try:
            ratio = _nearest_ratio(ratios, parse_ratio(aspect_ratio))
        except ValueError as e:
            raise InvalidRequest(f"Invalid {ratio_param}: {e}.", param=ratio_param) from None
    width, height = ratios[ratio]
    return width, height
