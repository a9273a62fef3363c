"""OpenAI's usage and costs API over ledger records (pure): query parameters in, page/bucket/result out."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from multidict import MultiMapping

from ..errors import InvalidRequest
from .record import UsageRecord

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# (default, max) buckets per page, as OpenAI documents them.
PAGE_LIMITS = {"1d": (7, 31), "1h": (24, 168), "1m": (60, 1440)}
# OpenAI's group_by values, plus route and provider (ours).
IMAGE_GROUPS = ("project_id", "user_id", "api_key_id", "model", "size", "source", "route", "provider")
COST_GROUPS = ("project_id", "line_item", "api_key_id", "model", "route", "provider")
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
    start = _int(params, "start_time")
    end = _int(params, "end_time", math.ceil(now))
    if end <= start:
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


def _field(record: UsageRecord, name: str) -> Any:
    return {"api_key_id": record.key, "size": record.size, "project_id": None, "user_id": None,
            "line_item": record.model}.get(name, getattr(record, name, None))


def _matches(record: UsageRecord, q: Query) -> bool:
    return all(_field(record, name) in wanted for name, wanted in q.filters.items())


def _page(q: Query, records: list[UsageRecord], result: Callable[[list[UsageRecord], dict], dict], fields: tuple[str, ...]) -> dict:
    step = WIDTHS[q.width]
    starts = list(range(q.page_start, q.end, step))[:q.limit]
    groups: dict[int, dict[tuple, list[UsageRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if starts[0] <= r.ts < min(starts[-1] + step, q.end) and _matches(r, q):
            bucket = q.page_start + int((r.ts - q.page_start) // step) * step
            groups[bucket][tuple(_field(r, g) for g in q.group_by)].append(r)
    data = []
    for s in starts:
        results = []
        for values, rs in sorted(groups.get(s, {}).items(), key=lambda kv: [str(v) for v in kv[0]]):
            shown = dict.fromkeys(fields)
            shown.update(zip(q.group_by, values, strict=True))
            results.append(result(rs, shown))
        data.append({"object": "bucket", "start_time": s, "end_time": min(s + step, q.end), "results": results})
    after = starts[-1] + step
    more = after < q.end
    return {"object": "page", "data": data, "has_more": more, "next_page": str(after) if more else None}


def images_page(q: Query, records: list[UsageRecord]) -> dict:
    """GET /v1/organization/usage/images: successful requests, images delivered; gpu_seconds, cache_hits,
    route and provider are ours."""
    def result(rs: list[UsageRecord], shown: dict) -> dict:
        served = [r for r in rs if r.outcome == "ok"]
        return {"object": "organization.usage.images.result",
                "images": sum(r.images_delivered for r in served), "num_model_requests": len(served),
                **shown, "gpu_seconds": round(math.fsum(r.gpu_seconds or 0.0 for r in rs), 6),
                "cache_hits": sum(1 for r in served if r.cache_hit)}

    return _page(q, records, result, IMAGE_GROUPS[:6] + ("route", "provider"))


def costs_page(q: Query, records: list[UsageRecord]) -> dict:
    """GET /v1/organization/costs: every request's cost (failed calls a vendor charged included);
    unpriced_requests (ours) counts those whose cost is unknown (a route without a price)."""
    def result(rs: list[UsageRecord], shown: dict) -> dict:
        amount = round(math.fsum(r.cost_usd or 0.0 for r in rs), 9)
        return {"object": "organization.costs.result", "amount": {"value": amount, "currency": "usd"},
                **shown, "unpriced_requests": sum(1 for r in rs if r.cost_usd is None and r.attempts != "[]")}

    if "route" in q.group_by or "provider" in q.group_by or {"route", "provider"} & set(q.filters):
        records = [part for r in records for part in _by_call(r)]
    return _page(q, records, result, ("line_item", "project_id"))


def _by_call(record: UsageRecord) -> list[UsageRecord]:
    """A record split into one per route it called, with that route's share of the cost (grouped by route,
    a fallback's cost goes to the routes that charged it, not all to the one that served)."""
    calls = json.loads(record.attempts)
    if not calls:
        return [record]
    shares: dict[tuple, float | None] = {}
    for c in calls:
        where = (c["route"], c["provider"])
        before = shares.get(where, 0.0)
        shares[where] = None if before is None or c["cost"] is None else before + c["cost"]
    return [replace(record, route=route, provider=provider, cost_usd=cost) for (route, provider), cost in shares.items()]


def summary(records: list[UsageRecord], start: float, width: str, group_by: list[str]) -> list[dict]:
    """Rows for `qwen-image-proxy usage`: per bucket and group, requests served, images, cost, GPU time,
    cache hits (cost over every request, failed ones included, as in the costs API)."""
    step = WIDTHS[width]
    rows: dict[tuple, dict] = {}
    for r in records:
        bucket = int(start + ((r.ts - start) // step) * step)
        key = (bucket, *(str(_field(r, g)) for g in group_by))
        row = rows.setdefault(key, {"start": bucket, **dict(zip(group_by, key[1:], strict=True)),
                                    "requests": 0, "images": 0, "cost_usd": 0.0, "unpriced": 0,
                                    "gpu_seconds": 0.0, "cache_hits": 0})
        if r.outcome == "ok":
            row["requests"] += 1
            row["images"] += r.images_delivered
            row["cache_hits"] += int(r.cache_hit)
        row["cost_usd"] = round(row["cost_usd"] + (r.cost_usd or 0.0), 9)
        row["unpriced"] += int(r.cost_usd is None and r.attempts != "[]")
        row["gpu_seconds"] += r.gpu_seconds or 0.0
    return [rows[k] for k in sorted(rows)]
