"""The gateway's usage service: a meter per image request, the cache and budget checks before routing,
and the ledger record, metrics and budget settlement when the request ends. The hooks in app.py and
api/generations.py call only this."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

from ..config import Config
from ..media.output import FinalImage
from .budgets import (
    Hold,
    MemorySpend,
    RedisSpend,
    beyond_budget,
    limits_of,
    month_start,
    over,
    periods,
    refusal,
)
from .cache import SeededCache, cache_key, routes_signature
from .cache_index import MemoryIndex, RedisIndex
from .ledger import LedgerWriter
from .lora_digest import LoraDigests
from .meter import CURRENT, Meter
from .postgres import PostgresLedger
from .postgres_spend import PostgresSpend
from .pricing import estimate, micro, route_price, total
from .record import build_record
from .sqlite import SqliteLedger

if TYPE_CHECKING:
    from ..config.server import ApiKey
    from ..request import ImageRequest
    from ..routing.router import Router, RouteResult
    from ..state.factory import State
    from ..state.shared_redis import RedisState
    from ..state.store import ImageStore
    from ..telemetry.metrics import Metrics

log = logging.getLogger("proxy.usage")


@dataclass
class CachedResult:
    """A cache hit in the router result's shape (route name and calls for headers and the log line)."""

    images: list[FinalImage]
    route: Any
    attempts: list = field(default_factory=list)
    calls: int = 0


def make_backend(config: Config) -> PostgresLedger | SqliteLedger:
    usage = config.usage
    return PostgresLedger(usage.database_url) if usage.database_url else SqliteLedger(usage.path)


class Usage:
    def __init__(self, config: Config, metrics: Metrics, state: State, store: ImageStore, router: Router,
                 scrub: Callable[[str], str] = str) -> None:
        self.config = config
        self.usage = config.usage
        self.metrics = metrics
        self.router = router
        self.writer = (LedgerWriter(make_backend(config), queue_max=self.usage.queue_max,
                                    batch_size=self.usage.batch_size, flush_seconds=self.usage.flush_seconds,
                                    write_timeout=self.usage.write_timeout,
                                    on_drop=lambda n: metrics.usage_dropped.inc(n), scrub=scrub)
                       if self.usage.enabled else None)
        # state.redis_url: budgets and the cache index there (kind "redis" is RedisState's)
        redis = cast("RedisState", state) if getattr(state, "kind", "") == "redis" else None
        # Shared running totals: in Redis, else in the ledger's PostgreSQL, else in this process.
        self.spend: RedisSpend | PostgresSpend | MemorySpend = (
            RedisSpend(redis) if redis is not None else
            PostgresSpend(self.usage.database_url, pool_size=self.usage.database_pool_size)
            if self.usage.database_url else MemorySpend())
        self.cache = SeededCache(store, RedisIndex(redis) if redis is not None else MemoryIndex())
        self._signatures = {name: routes_signature(m.routes) for name, m in config.models.items() if m.cache}
        # Models whose answers the seeded cache keeps: only their requests have a lookup before routing
        # and an entry to write after it.
        self.cached_models = frozenset(name for name, m in config.models.items() if m.cache is not None)
        self.lora_digests = LoraDigests()
        self._limits: dict[int, tuple[int, int, int]] = {}  # id(budget) -> its limits in whole units
        self._tasks: set[asyncio.Task] = set()
        self._epoch = secrets.token_hex(8)  # these counters' life (see hold_doc)

    async def start(self) -> None:
        if isinstance(self.spend, PostgresSpend):
            await self.spend.start()
        if self.writer is not None:
            await self.writer.start()
            await self._seed_spend()

    async def _seed_spend(self) -> None:
        """This month's spending from the ledger, so budgets survive a restart (in-memory counters) and
        count what was spent before a key had a budget (Redis' and PostgreSQL's counters count budgeted
        requests only). Counters are raised to these sums, never added to: every proxy may do it."""
        if self.writer is None:  # only called with a ledger (start)
            return
        now = time.time()
        start = month_start(now)
        try:  # summed per key and UTC day in the database: a month of records is a few hundred rows
            parts = await asyncio.wait_for(self.writer.backend.aggregate(start, now + 1, start, 86400),
                                           2 * self.usage.write_timeout)
        except Exception as e:  # noqa: BLE001 - a ledger that cannot be read: budgets count from now
            log.warning("usage ledger: could not read this month's spending (%s); budgets count from now",
                        type(e).__name__)
            return
        totals: dict[tuple[str, str, str], int] = {}  # (key, period, "img" | "usd") -> this month's sums
        today = periods(now)[0]
        for p in parts:
            if p.key is not None:
                day, month, _, _ = periods(p.start)
                images, usd = 0 if p.cache_hit else p.images, micro(p.cost_usd)
                counters = [((p.key, month, "usd"), usd)]
                if day == today:  # earlier days' counters: nobody asks about them
                    counters += [((p.key, day, "img"), images), ((p.key, day, "usd"), usd)]
                for counter, amount in counters:
                    totals[counter] = totals.get(counter, 0) + amount
        try:
            await self.spend.floor(totals)
        except Exception as e:  # noqa: BLE001 - the counters' database away: they count from what they hold
            log.warning("budgets: could not count this month's spending (%s)", type(e).__name__)

    async def close(self) -> None:
        if self._tasks:  # budget settlements under way: a moment to end (each is bounded by Redis' timeout)
            await asyncio.wait(set(self._tasks), timeout=5)
        if self.writer is not None:
            await self.writer.close()
        if isinstance(self.spend, PostgresSpend):
            await self.spend.close()

    # ---- the hooks -----------------------------------------------------------------------------------

    def open(self) -> Meter:
        """A new meter for the image request starting in this task (the router's calls note into it)."""
        meter = Meter(gpu_usd_per_hour=self.usage.gpu_usd_per_hour)
        CURRENT.set(meter)
        return meter

    def note(self, req: ImageRequest, key: ApiKey | None, held: Hold | None = None) -> bool:
        """Note the request (and a background job's hold) in its meter; whether before() has more to do:
        a cache to look in, or a key's budget to hold. Most requests have neither, and skip its await."""
        meter = CURRENT.get() or self.open()
        meter.req = req
        if held is not None:
            meter.reservation = held
            return req.model in self.cached_models
        return req.model in self.cached_models or (
            key is not None and (key.budget or self.usage.default_budget) is not None)

    async def before(self, req: ImageRequest, key: ApiKey | None, cache_control: str | None, *,
                     held: Hold | None = None) -> CachedResult | None:
        """Before routing, where note() said there is more to do: a cache hit (returned), or a budget
        check (429 insufficient_quota) and hold. `held`: a background job's hold, taken when it was
        submitted (settled at its end like any other)."""
        meter = CURRENT.get()
        assert meter is not None  # note() opened it
        if self.config.models[req.model].cache is not None:
            meter.cache_key = await self._cache_key(req, key)
            if meter.cache_key is not None and "no-cache" not in (cache_control or "").lower():
                try:
                    found = await self.cache.get(req.model, meter.cache_key)
                except Exception as e:  # noqa: BLE001 - the index (Redis) away: a miss, not a failure
                    log.warning("cache: lookup failed (%s); serving without it", type(e).__name__)
                    found = None
                if found is not None:
                    images, entry = found
                    meter.cache_hit, meter.cache_route = True, (entry.route, entry.provider)
                    self.metrics.child(self.metrics.cache_hits, req.model).inc()
                    return CachedResult(images, SimpleNamespace(name=entry.route))
        if held is None:  # without a key no budget applies (reserve would say so, one await later)
            meter.reservation = await self.reserve(req, key) if key is not None else None
        return None

    async def _cache_key(self, req: ImageRequest, key: ApiKey | None) -> tuple | None:
        """The request's key in the seeded cache (None: not cacheable, or its model has no cache)."""
        settings = self.config.models[req.model].cache
        if settings is None:
            return None
        loras: tuple = ()
        if req.loras and req.seed is not None:  # their files' content hashes (file system: off the loop)
            resolvers = [route.provider.lora_file for route in self.router.routes[req.model]]
            loras = await asyncio.to_thread(self.lora_digests.keys, req.loras, resolvers)
        args = (req, self._signatures[req.model], key.name if key is not None else None, settings, loras)
        big = sum(len(img.data) for img in req.images) > 65536  # hashing megabytes: not on the loop
        return await asyncio.to_thread(cache_key, *args) if big else cache_key(*args)

    async def cached(self, req: ImageRequest, key: ApiKey | None, cache_control: str | None) -> bool:
        """Whether the cache holds this request now (a background job's submit: a hit needs no budget, as
        a synchronous repeat needs none). Only the index is read; a failing index is a miss."""
        if self.config.models[req.model].cache is None or "no-cache" in (cache_control or "").lower():
            return False
        found = await self._cache_key(req, key)
        if found is None:
            return False
        try:
            return await self.cache.index.get(req.model, found) is not None
        except Exception:  # noqa: BLE001 - the index (Redis) away: a miss; the run looks again
            return False

    async def reserve(self, req: ImageRequest, key: ApiKey | None) -> Hold | None:
        """Hold the request's images and estimated cost in the key's budget (None: no budget applies);
        429 insufficient_quota where it would pass one."""
        budget = (key.budget if key is not None else None) or self.usage.default_budget
        if key is None or budget is None:
            return None
        now = time.time()
        day, month, day_end, month_end = periods(now)
        hold = Hold(key.name, day, month, req.n, micro(self._estimate(req)))
        limits = self._limits.get(id(budget))
        if limits is None:
            limits = self._limits[id(budget)] = limits_of(budget)
        alone = over((0, 0, 0), (hold.images, hold.micro_usd), limits)
        which = alone or await self.spend.reserve(hold, limits)
        if which is not None:
            self.metrics.key_rejections.labels(key=key.name, reason="insufficient_quota").inc()
            if alone is not None:
                raise beyond_budget(alone, budget, hold.images, hold.micro_usd)
            raise refusal(which, budget, month_end if which == "usd_per_month" else day_end, now)
        return hold

    def release(self, hold: Hold | None) -> None:
        """Give a hold back whole (a job that ended without running)."""
        if hold is not None:
            self._spawn(self._settle(hold, -hold.images, -hold.micro_usd))

    # A background job keeps its hold in the job store while it waits. Counters in this process's memory
    # die with it, so a hold stored by another process (one before a restart) no longer counts: the job
    # reserves again when it runs. Counters in Redis or PostgreSQL outlive processes: a stored hold stays good.

    def hold_doc(self, hold: Hold | None) -> dict | None:
        return None if hold is None else {**asdict(hold), "epoch": self._epoch}

    def held(self, doc: dict | None) -> Hold | None:
        """The hold a job stored (None: none, or one these counters no longer hold)."""
        if not doc or (isinstance(self.spend, MemorySpend) and doc.get("epoch") != self._epoch):
            return None
        return Hold(**{k: v for k, v in doc.items() if k != "epoch"})

    def _estimate(self, req: ImageRequest) -> float:
        routes = self.router.usable(req.model) or self.router.routes[req.model]
        route = routes[0]
        price = route_price(route.config.price, route.provider.kind, self.usage.gpu_usd_per_hour)
        return estimate(price, req.n, req.width, req.height, route.per_call)

    async def after(self, req: ImageRequest, result: RouteResult) -> None:
        """A routed request succeeded: keep its images for later seeded repeats. Before the answer goes
        out, so a client that repeats at once gets its hit; a store that fails costs only the entry."""
        meter = CURRENT.get()
        config = self.config.models[req.model].cache
        if meter is None or meter.cache_key is None or config is None:
            return
        route = result.route
        try:
            await self.cache.put(req.model, meter.cache_key, list(result.images), route.name, route.provider.kind,
                                 config)
        except Exception as e:  # noqa: BLE001 - the answer matters more than its cache entry
            log.warning("cache: could not keep the images of model %s (%s)", req.model, type(e).__name__)

    def headers(self) -> dict[str, str]:
        """x-qip-cost-usd (absent when unknown: a route without a price) and x-qip-cache."""
        meter = CURRENT.get()
        if meter is None:
            return {}
        out = {}
        cost = 0.0 if meter.cache_hit else total([c.cost for c in meter.calls])
        if cost is not None:
            out["x-qip-cost-usd"] = f"{cost:.6f}"
        if meter.cache_key is not None:
            out["x-qip-cache"] = "hit" if meter.cache_hit else "miss"
        return out

    def stream_fields(self) -> dict[str, Any]:
        """The same for a stream's last completed event, whose head went out before the cost was known:
        x_qip_cost_usd (null when unknown) and x_qip_cache (when the model has a cache)."""
        meter = CURRENT.get()
        if meter is None:
            return {}
        cost = 0.0 if meter.cache_hit else total([c.cost for c in meter.calls])
        out: dict[str, Any] = {"x_qip_cost_usd": None if cost is None else round(cost, 6)}
        if meter.cache_key is not None:
            out["x_qip_cache"] = "hit" if meter.cache_hit else "miss"
        return out

    def finish(self, meter: Meter, *, request_id: str, key: ApiKey | None, model: str, path: str, status: int, outcome: str,
               seconds: float) -> None:
        """The request ended (answered, failed or cancelled): its record (built later, by the writer, off the
        request's path), metrics and budget settlement."""
        key_name = key.name if key else None
        if self.writer is not None:  # its calls until now: a later note (a task it left behind) is not its own
            self.writer.add(partial(build_record, meter, calls=tuple(meter.calls), ts=time.time(), request_id=request_id, key=key_name,
                                    model=model, path=path, status=status, outcome=outcome, seconds=seconds,
                                    project=key.project if key else None, user=key.user if key else None))
        ok = status == 200 and outcome == "ok"
        cost = 0.0 if meter.cache_hit else total([c.cost for c in meter.calls])
        m = self.metrics
        route = meter.cache_route[0] if meter.cache_hit and meter.cache_route else (
            meter.calls[-1].route if meter.calls else "-")
        if cost:
            m.child(m.cost, key_name or "-", model, route).inc(cost)
        gpu = [c.gpu_seconds for c in meter.calls if c.gpu_seconds]
        if gpu:
            m.child(m.gpu_seconds, model, route).inc(sum(gpu))
        hold = meter.reservation
        if hold is not None:
            images = hold.images if ok and not meter.cache_hit else 0
            actual = micro(cost or 0.0)
            if images != hold.images or actual != hold.micro_usd:
                self._spawn(self._settle(hold, images - hold.images, actual - hold.micro_usd))

    async def _settle(self, hold: Hold, images: int, micro_usd: int) -> None:
        try:
            await self.spend.add(hold, images, micro_usd)
        except Exception as e:  # noqa: BLE001 - Redis away: the hold stays as it was (errs on the safe side)
            log.warning("budgets: could not settle a request's spending (%s)", type(e).__name__)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("usage: a background step failed: %s", task.exception())
