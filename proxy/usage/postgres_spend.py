"""Budget counters in PostgreSQL (usage.database_url without state.redis_url): every proxy sharing the
database counts against the same budgets, as with Redis.

One row per (key, period, what): images today, micro-USD today, micro-USD this month. A reservation adds
to the three rows in one INSERT ... ON CONFLICT DO UPDATE ... RETURNING and rolls back when the totals
before it would pass a limit; the upsert's row locks last until the transaction ends, so two proxies
reserving at once take turns and neither sees a total without the other's hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from ..state.shared import StateUnavailable
from .budgets import Hold, over, periods

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("proxy.usage")

TABLE = "qip_budget_spend"
CREATE = (f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT NOT NULL, period TEXT NOT NULL, what TEXT NOT NULL, "
          "amount BIGINT NOT NULL, resets_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (key, period, what))")
# The three counters in one statement, always in the same order (two reservations lock rows alike).
UPSERT = (f"INSERT INTO {TABLE} (key, period, what, amount, resets_at) VALUES "
          "(%s, %s, 'img', %s, %s), (%s, %s, 'usd', %s, %s), (%s, %s, 'usd', %s, %s) "
          f"ON CONFLICT (key, period, what) DO UPDATE SET amount = {TABLE}.amount + EXCLUDED.amount "
          "RETURNING period, what, amount")
# The ledger's sums at start-up: a counter is raised to them, never lowered nor added to twice (a restart,
# or two proxies starting, change nothing that is already counted).
FLOOR = (f"INSERT INTO {TABLE} (key, period, what, amount, resets_at) VALUES (%s, %s, %s, %s, %s) "
         f"ON CONFLICT (key, period, what) DO UPDATE SET amount = GREATEST({TABLE}.amount, EXCLUDED.amount)")
# Periods that ended more than a day ago: nobody asks about them again.
EXPIRE = f"DELETE FROM {TABLE} WHERE resets_at < %s"


def period_end(period: str) -> float:
    """When a day ("2026-12-07") or a month ("2026-12") period ends, UTC."""
    start = dt.datetime.strptime(period, "%Y-%m-%d" if len(period) > 7 else "%Y-%m").replace(tzinfo=dt.UTC)
    if len(period) > 7:
        return (start + dt.timedelta(days=1)).timestamp()
    return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1).timestamp()


def upsert_args(hold: Hold, images: int, micro_usd: int, day_end: float, month_end: float) -> tuple:
    return (hold.key, hold.day, images, day_end, hold.key, hold.day, micro_usd, day_end,
            hold.key, hold.month, micro_usd, month_end)


def spent_before(rows: list[tuple[str, str, int]], hold: Hold) -> tuple[int, int, int]:
    """(images today, micro-USD today, this month) before this hold, from the upsert's RETURNING rows."""
    after = {(period, what): amount for period, what, amount in rows}
    return (after[(hold.day, "img")] - hold.images, after[(hold.day, "usd")] - hold.micro_usd,
            after[(hold.month, "usd")] - hold.micro_usd)


UNAVAILABLE = "The proxy's budget counters (PostgreSQL) are unavailable; retry shortly."


class PostgresSpend:
    """One connection of its own (a slow ledger batch never holds up a budget check), opened again after
    it breaks; a database that cannot be reached refuses the request with a 503 (state_unavailable)
    rather than letting it pass unchecked."""

    def __init__(self, url: str, *, timeout: float = 3, retry_after: float = 1.0) -> None:
        self.url = url
        self.timeout = timeout
        # After a failure, checks answer 503 at once for this long: requests queued behind a database that
        # hangs would otherwise each wait out the timeout in turn (one connection, one check at a time).
        self.retry_after = retry_after
        self._down_until = 0.0
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await self._run(self._expire)
        except StateUnavailable:
            log.warning("budgets: PostgreSQL is not reachable at start-up; budget checks answer 503 until it is")

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        import psycopg  # optional dependency: pip install qwen-image-proxy[postgres]

        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = await psycopg.AsyncConnection.connect(self.url, connect_timeout=max(1, int(self.timeout)),
                                                         autocommit=True)
            await conn.execute(CREATE)
            self._conn = conn
        return self._conn

    async def _run(self, step: Any, *args: Any) -> Any:
        """One step on the connection, under the timeout; any failure is a StateUnavailable (503), and so
        is every step for `retry_after` s after one."""
        self._fail_fast()
        async with self._lock:
            self._fail_fast()  # it failed while this one waited its turn
            try:
                return await asyncio.wait_for(step(await self._connection(), *args), self.timeout * 2)
            except Exception as e:  # noqa: BLE001 - the URL may carry a password: only the error's type
                log.warning("budgets: PostgreSQL call failed: %s", type(e).__name__)
                self._down_until = time.monotonic() + self.retry_after
                conn, self._conn = self._conn, None  # a timeout may have left it mid-statement
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 1)
                raise StateUnavailable(UNAVAILABLE) from None

    def _fail_fast(self) -> None:
        if time.monotonic() < self._down_until:
            raise StateUnavailable(UNAVAILABLE)

    async def _expire(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(EXPIRE, (time.time() - 86400,))

    async def reserve(self, hold: Hold, limits: tuple[int, int, int]) -> str | None:
        return await self._run(self._reserve, hold, limits)

    async def _reserve(self, conn: psycopg.AsyncConnection[Any], hold: Hold,
                       limits: tuple[int, int, int]) -> str | None:
        _, _, day_end, month_end = periods(time.time())
        import psycopg

        async with conn.transaction():
            cur = await conn.execute(UPSERT, upsert_args(hold, hold.images, hold.micro_usd, day_end, month_end))
            which = over(spent_before(await cur.fetchall(), hold), (hold.images, hold.micro_usd), limits)
            if which is not None:
                raise psycopg.Rollback()  # refused: the hold is undone, the block ends quietly
        return which

    async def add(self, hold: Hold, images: int, micro_usd: int) -> None:
        await self._run(self._add, hold, images, micro_usd)

    async def floor(self, totals: dict[tuple[str, str, str], int]) -> None:
        """Raise counters ((key, period, "img" | "usd") -> count) to at least the ledger's sums: spending
        made before a key had a budget, or before this table existed, counts too."""
        if totals:
            await self._run(self._floor, [(*counter, amount, period_end(counter[1]))
                                          for counter, amount in totals.items()])

    async def _floor(self, conn: psycopg.AsyncConnection[Any], rows: list[tuple]) -> None:
        async with conn.cursor() as cur:  # each row its own statement (autocommit): it locks one row at a time
            await cur.executemany(FLOOR, rows)

    async def _add(self, conn: psycopg.AsyncConnection[Any], hold: Hold, images: int, micro_usd: int) -> None:
        _, _, day_end, month_end = periods(time.time())
        await conn.execute(UPSERT, upsert_args(hold, images, micro_usd, day_end, month_end))
