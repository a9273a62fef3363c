"""The ledger summed in the database: partial sums per time bucket and per value of every dimension the
usage API groups or filters by, so a month of records is read as a few hundred rows, not millions.

The same SQL for SQLite and PostgreSQL except for the few spellings in `Dialect`. With `by_call`, each
record is split into one row per route it called, with that route's share of the cost (a fallback's cost
goes to the routes that charged it): the costs API grouped by route or provider needs that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .schema import TABLE


@dataclass
class Partial:
    """Sums over the records of one bucket that share every dimension below."""

    start: int  # the bucket's start (Unix seconds)
    key: str | None
    model: str
    source: str
    route: str | None
    provider: str | None
    width: int | None
    height: int | None
    ok: bool  # outcome "ok"
    cache_hit: bool
    requests: int
    images: int  # images delivered
    gpu_seconds: float
    cost_usd: float  # unknown costs count 0 here; `unpriced` counts them
    unpriced: int  # requests (or, by call, route shares) that called a route without a price
    project_id: str | None = None  # the key's project and user when the request was made
    user_id: str | None = None

    @property
    def size(self) -> str | None:
        return f"{self.width}x{self.height}" if self.width and self.height else None


@dataclass(frozen=True)
class Dialect:
    mark: str  # the parameter placeholder
    bucket: str  # SQL for the bucket number of u.ts, given origin and width as parameters
    calls: str  # FROM clause: the table joined to one row per element of its attempts JSON (alias j)
    call_field: str  # SQL for one text field of that element, {name} filled in
    call_cost: str  # SQL for the element's cost (NULL when unknown)
    is_true: str  # SQL turning a boolean column into 0/1


SQLITE = Dialect(
    mark="?", bucket="CAST((u.ts - ?) / ? AS INTEGER)",
    calls=f"{TABLE} u, json_each(u.attempts) j", call_field="json_extract(j.value, '$.{name}')",
    call_cost="json_extract(j.value, '$.cost')", is_true="CAST({col} AS INTEGER)")
POSTGRES = Dialect(
    mark="%s", bucket="CAST(floor((u.ts - %s) / %s) AS BIGINT)",
    calls=f"{TABLE} u CROSS JOIN LATERAL jsonb_array_elements(u.attempts::jsonb) AS j(value)",
    call_field="(j.value ->> '{name}')", call_cost="CAST(j.value ->> 'cost' AS DOUBLE PRECISION)",
    is_true="CAST({col} AS INTEGER)")

_DIMENSIONS = "b, key, model, source, route, provider, width, height, ok, cache_hit, project_id, user_id"
_SUMS = "COUNT(*), SUM(images_delivered), SUM(gpu_seconds), SUM(cost_usd), SUM(unpriced)"


def _per_record(d: Dialect) -> str:
    """One row per record with the columns the sums need."""
    ok = d.is_true.format(col="(u.outcome = 'ok')")
    return (f"SELECT {d.bucket} AS b, u.key, u.model, u.source, u.route, u.provider, u.width, u.height, "
            f"{ok} AS ok, {d.is_true.format(col='u.cache_hit')} AS cache_hit, u.project_id, u.user_id, "
            f"u.images_delivered, u.gpu_seconds, u.cost_usd, CASE WHEN u.cost_usd IS NULL AND u.attempts <> '[]' THEN 1 ELSE 0 END AS unpriced "
            f"FROM {TABLE} u WHERE u.ts >= {d.mark} AND u.ts < {d.mark}")


def _per_call(d: Dialect) -> str:
    """One row per (record, route it called): that route's share of the record's cost, unknown if any of
    its calls had no price; records that called nothing (a cache hit, a refusal) stay whole."""
    ok = d.is_true.format(col="(u.outcome = 'ok')")
    route, provider = d.call_field.format(name="route"), d.call_field.format(name="provider")
    share = (f"CASE WHEN SUM(CASE WHEN {d.call_cost} IS NULL THEN 1 ELSE 0 END) > 0 THEN NULL "
             f"ELSE SUM({d.call_cost}) END")
    split = (f"SELECT {d.bucket} AS b, u.key, u.model, u.source, {route} AS route, {provider} AS provider, "
             f"u.width, u.height, {ok} AS ok, {d.is_true.format(col='u.cache_hit')} AS cache_hit, "
             f"u.project_id, u.user_id, u.images_delivered, u.gpu_seconds, {share} AS cost_usd, "
             f"CASE WHEN {share} IS NULL THEN 1 ELSE 0 END AS unpriced "
             f"FROM {d.calls} WHERE u.ts >= {d.mark} AND u.ts < {d.mark} "
             f"GROUP BY u.id, {route}, {provider}")
    whole = _per_record(d) + " AND u.attempts = '[]'"
    return f"{split} UNION ALL {whole}"


def sql(d: Dialect, by_call: bool) -> str:
    inner = _per_call(d) if by_call else _per_record(d)
    return f"SELECT {_DIMENSIONS}, {_SUMS} FROM ({inner}) AS r GROUP BY {_DIMENSIONS}"


def params(lo: float, hi: float, origin: float, width: int, by_call: bool) -> tuple:
    """The parameters in the order `sql` places its marks (the split query reads the table twice)."""
    one = (origin, width, lo, hi)
    return one + one if by_call else one


def partials(rows: Sequence[Sequence[Any]], origin: float, width: int) -> list[Partial]:
    out = []
    for b, key, model, source, route, provider, w, h, ok, hit, project, user, n, images, gpu, cost, unpriced in rows:
        out.append(Partial(int(origin + int(b) * width), key, model, source, route, provider, w, h, bool(ok),
                           bool(hit), int(n), int(images or 0), float(gpu or 0.0), float(cost or 0.0),
                           int(unpriced or 0), project, user))
    return out
