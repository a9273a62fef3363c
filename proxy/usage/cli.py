"""`qwen-image-proxy usage`: the ledger as a table, read straight from its database (no server needed)."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
from pathlib import Path

from ..config import Config
from .aggregate import Partial
from .report import COST_GROUPS, IMAGE_GROUPS, WIDTHS, summary
from .service import make_backend

_SPAN = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# The API's groups but line_item (the model, by another name).
GROUPS = tuple(g for g in dict.fromkeys(IMAGE_GROUPS + COST_GROUPS) if g != "line_item")


def since_time(text: str, now: float) -> float:
    """'7d', '24h', '30m', '2w' ago, or a Unix time, or an ISO date or time (UTC unless it names an offset)."""
    bad = f"--since {text!r}: give 7d, 24h, 30m, 2w, a Unix time or a date like 2026-01-31"
    try:
        if m := _SPAN.fullmatch(text):
            return now - int(m.group(1)) * _UNITS[m.group(2)]
        if text.isdigit():
            return float(text)
        when = dt.datetime.fromisoformat(text)
    except (ValueError, OverflowError):  # OverflowError: a span of more seconds than a float holds
        raise ValueError(bad) from None
    # A date or time without an offset is UTC; one with an offset (2026-01-31T10:00+05:00) keeps it.
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def table(rows: list[dict], group_by: list[str], width: str) -> str:
    fmt = "%Y-%m-%d" if width == "1d" else "%Y-%m-%d %H:%M"
    head = ["start", *group_by, "requests", "images", "cost_usd", "unpriced", "gpu_s", "cache_hits"]
    lines = [[dt.datetime.fromtimestamp(r["start"], dt.UTC).strftime(fmt), *(r[g] for g in group_by),
              str(r["requests"]), str(r["images"]), f"{r['cost_usd']:.6f}", str(r["unpriced"]),
              f"{r['gpu_seconds']:.2f}", str(r["cache_hits"])] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
           for line in [head, *lines]]
    return "\n".join(out)


async def _read(config: Config, start: float, end: float, width: int) -> list[Partial]:
    path = Path(config.usage.path)
    if not config.usage.database_url and not path.is_file():
        # Opening it would create an empty ledger there and print "no usage": the wrong folder looked empty.
        raise ValueError(f"no usage ledger at {path.resolve()} (usage.path; a relative path is read from the "
                         "current directory): run this where the proxy runs, or set usage.path to the ledger's file")
    backend = make_backend(config)
    await backend.start()
    try:
        return await backend.aggregate(start, end, start, width)
    finally:
        await backend.close()


def run_usage(config: Config, since: str, group_by: str, bucket: str) -> str:
    now = time.time()
    groups = [g for g in group_by.split(",") if g]
    bad = [g for g in groups if g not in GROUPS]
    if bad:
        raise ValueError(f"--group-by {bad[0]!r}: choose from {', '.join(GROUPS)}")
    if bucket not in WIDTHS:
        raise ValueError(f"--bucket {bucket!r}: choose from {', '.join(WIDTHS)}")
    start = since_time(since, now)
    # Whole days, hours or minutes (UTC): a bucket's printed start is its real one (a 1m bucket that began
    # at 13:41:52 was printed 13:41 and held a request of 13:42:26).
    start = start - start % WIDTHS[bucket]
    rows = summary(asyncio.run(_read(config, start, now + 1, WIDTHS[bucket])), groups)
    return table(rows, groups, bucket) if rows else "no usage recorded in that time"
