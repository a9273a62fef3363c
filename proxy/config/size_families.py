"""The Qwen-Image family's built-in size tables, and which one a model gets when its config names none."""

from __future__ import annotations

import re
from collections.abc import Iterable

# The same shape as a models.yaml `size_tables` entry; a config's own table of the same name wins.
BUILTIN_TABLES: dict[str, dict] = {
    # Qwen-Image's 1K aspect-ratio table from the vendor page (Lumenfall). 4 MP per image at most:
    # the native sizes are about 1.8 MP (1328x1328, 1664x928); far above them quality drops while GPU
    # time grows faster than the pixels (attention is quadratic).
    "qwen-image": {
        "default": "1024x1024",
        "max_pixels": 4194304,
        "tiers": {"1K": {"1:1": "1024x1024", "4:3": "1183x887", "3:4": "887x1182", "2:3": "836x1254",
                         "3:2": "1254x836", "9:16": "768x1365", "16:9": "1365x768"}},
    },
    # The sizes Alibaba's Qwen-Image-Plus/Max make (DashScope's W*H list: nothing to crop); other sizes
    # are made from these by the proxy, within qwen-image's 4 MP.
    "qwen-image-dashscope": {
        "default": "1328x1328",
        "max_pixels": 4194304,
        "tiers": {"1.6": {"16:9": "1664x928", "4:3": "1472x1104", "1:1": "1328x1328", "3:4": "1104x1472",
                          "9:16": "928x1664"}},
    },
    # The tiny random-weight pipelines: 256x256 takes about 1 s per image on a CPU; noise at any size.
    "tiny": {
        "default": "64x64",
        "max_side": 512,
        "max_pixels": 65536,
        "tiers": {"0.004": {"1:1": "64x64", "4:3": "80x64", "3:4": "64x80", "16:9": "112x64", "9:16": "64x112"}},
    },
}

# (pattern, table, what it matches), first match wins. Qwen-Image-2.1, 2512 and the edit models make
# Qwen-Image's sizes, so they share its table.
FAMILY_RULES: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"(^|[-_/.])tiny([-_/.]|$)", re.I), "tiny", "a tiny random-weight model"),
    (re.compile(r"(^|/)qwen-image-(plus|max)\b", re.I), "qwen-image-dashscope", "Qwen-Image-Plus / -Max"),
    (re.compile(r"qwen-image", re.I), "qwen-image", "Qwen-Image (2512, 2.1, edit models included)"),
]
DEFAULT_TABLE = "qwen-image"


def family_table(names: Iterable[str]) -> tuple[str, str | None]:
    """(table, the name that decided it): the first name a rule matches decides; none: the default table."""
    for name in names:
        for pattern, table, _ in FAMILY_RULES:
            if pattern.search(name):
                return table, name
    return DEFAULT_TABLE, None
