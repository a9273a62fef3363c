"""OpenAI's usage and costs API over the ledger's partial sums (pure): query parameters in, page/bucket/result out."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping

from ..errors import InvalidRequest
from .aggregate import Partial

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# (default, max) buckets per page, as OpenAI documents them.
PAGE_LIMITS = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}
# OpenAI's group_by values, plus route and provider (ours).
IMAGE_GROUPS = ("project_id", "user_id", "api_key_id", "model", "size", "source", "route", "provider")
COST_GROUPS = ("project_id", "line_item", "api_key_id", "model", "route", "provider")
# The Unix times a query may name: 1970 to the end of year 9999 (past them no record can exist, and the
# database's 64-bit integers and Python's dates end).
LATEST = 253402300800
FILTERS = {"sources": "source", "sizes": "size", "project_ids": "project_id", "user_ids": "user_id",
           "api_key_ids": "api_key_id", "models": "model", "routes": "route", "providers": "provider"}


@dataclass
class Query:
    start: int
    end: int
    width: str
    limit: int
    page_start: int
    group_by: list[str]
    filters: dict[str, set[str]] = field(default_factory=dict)


def _values(params: MultiMapping[str], name: str) -> list[str]:
    """A list parameter as clients send it: name[]=a&name[]=b, name=a&name=b, or name=a,b."""
    found = list(params.getall(f"{name}[]", [])) + list(params.getall(name, []))
    return [v for part in found for v in part.split(",") if v]


def _time(params: MultiMapping[str], name: str, default: int | None = None) -> int:
    """A Unix time within 1970..9999: a time past them used to reach the database (a 503 that blamed it)."""
    value = _int(params, name, default)
    if not 0 <= value <= LATEST:
        raise InvalidRequest(f"Invalid '{name}': must be a Unix time in seconds from 0 to {LATEST}.", param=name)
    return value


def _int(params: MultiMapping[str], name: str, default: int | None = None) -> int:
    text = params.get(name)
    if text is None:
        if default is None:
            raise InvalidRequest(f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter")
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidRequest(f"Invalid '{name}': must be an integer.", param=name) from None


def parse_query(params: MultiMapping[str], groups: tuple[str, ...], now: float, widths: tuple[str, ...] = tuple(WIDTHS)) -> Query:
    start = _time(params, "start_time")
    end = _time(params, "end_time", math.ceil(now))
    if end <= start:
        if params.get("end_time") is None:  # the client named no end: its start is what is wrong
            raise InvalidRequest("Invalid 'start_time': it is in the future (end_time defaults to now).",
                                 param="start_time")
        raise InvalidRequest("Invalid 'end_time': must be after start_time.", param="end_time")
    width = params.get("bucket_width", "1d")
    if width not in widths:
        raise InvalidRequest(f"Invalid 'bucket_width': must be one of {', '.join(widths)}.", param="bucket_width")
    default, most = PAGE_LIMITS[width]
    limit = _int(params, "limit", default)
    if not 1 <= limit <= most:
        raise InvalidRequest(f"Invalid 'limit': must be 1 to {most} for bucket_width {width}.", param="limit")
    page = params.get("page")
    try:
        page_start = int(page) if page else start
    except ValueError:
        raise InvalidRequest("Invalid 'page': pass the next_page of an earlier answer.", param="page") from None
    if not start <= page_start < end or (page_start - start) % WIDTHS[width]:
        raise InvalidRequest("Invalid 'page': pass the next_page of an earlier answer.", param="page")
    group_by = _values(params, "group_by")
    for g in group_by:
        if g not in groups:
            raise InvalidRequest(f"Invalid 'group_by': '{g}' is not one of {', '.join(groups)}.", param="group_by")
    filters = {FILTERS[name]: set(v) for name in FILTERS if (v := _values(params, name))}
    return Query(start, end, width, limit, page_start, group_by, filters)


def _field(part: Partial, name: str) -> Any:
    return {"api_key_id": part.key, "size": part.size, "line_item": part.model}.get(name, getattr(part, name, None))


def _matches(part: Partial, q: Query) -> bool:
    return all(_field(part, name) in wanted for name, wanted in q.filters.items())


def page_window(q: Query) -> tuple[int, int]:
    """The time span one page covers: its buckets, the last cut at end_time (what the database reads)."""
    step = WIDTHS[q.width]
    return q.page_start, min(q.page_start + q.limit * step, q.end)


def _page(q: Query, parts: list[Partial], result: Callable[[list[Partial], dict], dict], fields: tuple[str, ...]) -> dict:
    step = WIDTHS[q.width]
    # The range sliced before it becomes a list: start_time=0 with 1m buckets is 30 million of them.
    starts = list(range(q.page_start, q.end, step)[:q.limit])
    groups: dict[int, dict[tuple, list[Partial]]] = defaultdict(lambda: defaultdict(list))
    for p in parts:
        if starts[0] <= p.start <= starts[-1] and _matches(p, q):
            groups[p.start][tuple(_field(p, g) for g in q.group_by)].append(p)
    data = []
    for s in starts:
        results = []
        for values, ps in sorted(groups.get(s, {}).items(), key=lambda kv: [str(v) for v in kv[0]]):
            shown = dict.fromkeys(fields)
            shown.update(zip(q.group_by, values, strict=True))
            results.append(result(ps, shown))
        data.append({"object": "bucket", "start_time": s, "end_time": min(s + step, q.end), "results": results})
    after = starts[-1] + step
    more = after < q.end
    return {"object": "page", "data": data, "has_more": more, "next_page": str(after) if more else None}


def images_page(q: Query, parts: list[Partial]) -> dict:
    """GET /v1/organization/usage/images over the page's partial sums (aggregate.py, by record): successful
    requests, images delivered; gpu_seconds, cache_hits, route and provider are ours."""
    def result(ps: list[Partial], shown: dict) -> dict:
        served = [p for p in ps if p.ok]
        return {"object": "organization.usage.images.result",
                "images": sum(p.images for p in served), "num_model_requests": sum(p.requests for p in served),
                **shown, "gpu_seconds": round(math.fsum(p.gpu_seconds for p in ps), 6),
                "cache_hits": sum(p.requests for p in served if p.cache_hit)}

    return _page(q, parts, result, IMAGE_GROUPS[:6] + ("route", "provider"))


def costs_by_call(q: Query) -> bool:
    """Whether the costs page needs each record split by the routes it called (grouped or filtered by route)."""
    return bool({"route", "provider"} & (set(q.group_by) | set(q.filters)))


def costs_page(q: Query, parts: list[Partial]) -> dict:
    """GET /v1/organization/costs: every request's cost (failed calls a vendor charged included);
    unpriced_requests (ours) counts those whose cost is unknown (a route without a price). Grouped by route
    or provider, `parts` are by call (costs_by_call): a fallback's cost goes to the routes that charged it."""
    def result(ps: list[Partial], shown: dict) -> dict:
        amount = round(math.fsum(p.cost_usd for p in ps), 9)
        return {"object": "organization.costs.result", "amount": {"value": amount, "currency": "usd"},
                **shown, "unpriced_requests": sum(p.unpriced for p in ps)}

    return _page(q, parts, result, ("line_item", "project_id"))


def summary(parts: list[Partial], group_by: list[str]) -> list[dict]:
    """Rows for `qwen-image-proxy usage`: per bucket and group, requests served, images, cost, GPU time,
    cache hits (cost over every request, failed ones included, as in the costs API)."""
    rows: dict[tuple, dict] = {}
    for p in parts:
        key = (p.start, *(str(_field(p, g)) for g in group_by))
        row = rows.setdefault(key, {"start": p.start, **dict(zip(group_by, key[1:], strict=True)),
                                    "requests": 0, "images": 0, "cost_usd": 0.0, "unpriced": 0,
                                    "gpu_seconds": 0.0, "cache_hits": 0})
        if p.ok:
            row["requests"] += p.requests
            row["images"] += p.images
            row["cache_hits"] += p.requests if p.cache_hit else 0
        row["cost_usd"] = round(row["cost_usd"] + p.cost_usd, 9)
        row["unpriced"] += p.unpriced
        row["gpu_seconds"] += p.gpu_seconds
    return [rows[k] for k in sorted(rows)]
