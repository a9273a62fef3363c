"""The ledger's record: one per image request, and how a finished request's meter becomes one (pure)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields

from .meter import Call, Meter
from .pricing import total


@dataclass
class UsageRecord:
    """One image request. `id` is the record's own (not the client's request id): writing a record twice
    (a batch retried after a lost commit) keeps one."""

    id: str
    ts: float  # Unix seconds when the request ended
    request_id: str
    key: str | None  # the key's NAME, never its value
    model: str
    source: str  # image.generation | image.edit (OpenAI's `source`)
    route: str | None  # the route that served (or, for a failure, the last one called)
    provider: str | None  # that route's provider kind
    outcome: str  # ok | client_error | rate_limited | failed | timeout | cancelled | shutdown | ...
    status: int
    images_asked: int
    images_delivered: int
    width: int | None
    height: int | None
    megapixels: float | None  # per image
    steps: int | None
    tier: str | None
    latency_ms: float
    gpu_seconds: float | None
    cost_usd: float | None
    cache_hit: bool
    stream: bool
    attempts: str  # JSON: [{route, provider, images, gpu_seconds, cost}] for every call, retries included
    # The key's project and user (server.api_keys[].project / .user), OpenAI's project_id and user_id in the
    # usage API. Last, with defaults: ledgers made before them gain them as their last columns (schema.py).
    project_id: str | None = None
    user_id: str | None = None

    @property
    def size(self) -> str | None:
        return f"{self.width}x{self.height}" if self.width and self.height else None

    def row(self) -> tuple:
        # Not dataclasses.astuple: it deep-copies field by field (every value here is a plain scalar).
        return tuple([getattr(self, name) for name in COLUMNS])


COLUMNS = tuple(f.name for f in fields(UsageRecord))
# json.dumps with separators builds an encoder per call: one, built once.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def build_record(meter: Meter, *, calls: Sequence[Call] | None = None, ts: float, request_id: str, key: str | None, model: str, path: str,
                 status: int, outcome: str, seconds: float, project: str | None = None,
                 user: str | None = None) -> UsageRecord:
    req = meter.req
    delivered = (req.n if req is not None else 0) if status == 200 and outcome == "ok" else 0
    calls = meter.calls if calls is None else calls
    gpu_parts = [c.gpu_seconds for c in calls if c.gpu_seconds is not None]
    cost: float | None
    if meter.cache_hit:
        cost, (route, provider) = 0.0, meter.cache_route or (None, None)
    else:
        cost = total([c.cost for c in calls])
        route, provider = (calls[-1].route, calls[-1].provider) if calls else (None, None)
    width, height = (req.width, req.height) if req is not None else (None, None)
    return UsageRecord(
        id=uuid.uuid4().hex, ts=ts, request_id=request_id, key=key, model=model or "",
        source="image.edit" if path.endswith("/edits") else "image.generation",
        route=route, provider=provider, outcome=outcome, status=status,
        images_asked=req.n if req is not None else 0, images_delivered=delivered,
        width=width, height=height, megapixels=width * height / 1_000_000 if width and height else None,
        steps=getattr(req, "num_inference_steps", None), tier=getattr(req, "resolution", None),
        latency_ms=round(seconds * 1000, 3), gpu_seconds=sum(gpu_parts) if gpu_parts else None,
        cost_usd=cost, cache_hit=meter.cache_hit, stream=bool(getattr(req, "stream", False)),
        attempts=_COMPACT.encode([c.__dict__ for c in calls]), project_id=project, user_id=user,
    )
