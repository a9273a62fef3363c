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
import select
import time
from typing import TYPE_CHECKING, Any

from ..errors import ShuttingDown
from ..state.shared import StateUnavailable
from .budgets import Hold, over, periods

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import AsyncConnectionPool

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
CLOSED = "The server is shutting down; retry on another instance."


def _gone(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection has something to read: its server's "terminating connection" (a restart,
    pg_terminate_backend) or the socket's end. An idle connection has nothing to read otherwise (a notice
    at most), so this costs no round trip."""
    try:
        if not hasattr(select, "poll"):  # Windows
            return bool(select.select([conn.fileno()], [], [], 0)[0])
        poller = select.poll()  # not select(): it cannot watch descriptors past 1023
        poller.register(conn.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed already
        return True


async def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Whether a connection from the pool can be used: one that looks gone is asked for real (one round
    trip). Not the pool's own `check`: after a failed one it waits a second or more before the next
    connection, and after a restart every idle connection fails it."""
    if not _gone(conn):
        return True
    try:
        await conn.execute("")
        return True
    except Exception:  # noqa: BLE001 - broken: the pool drops it and connects a new one
        return False


class PostgresSpend:
    """A pool of connections of its own (a slow ledger batch never holds up a budget check; concurrent
    checks do not wait for each other), a connection the server closed skipped and replaced; a
    database that cannot be reached refuses the request with a 503 (state_unavailable) rather than letting
    it pass unchecked."""

    def __init__(self, url: str, *, timeout: float = 3, retry_after: float = 1.0, pool_size: int = 10) -> None:
        self.url = url
        self.timeout = timeout
        self.pool_size = pool_size
        # After a timeout, one check at a time tries the database again (at most one every `retry_after` s);
        # the others answer 503 at once: requests behind a database that is away or hangs would otherwise
        # each wait out the timeout.
        self.retry_after = retry_after
        self._down_until = 0.0
        self._down = False
        self._probing = False
        self._created = False
        self._closed = False
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self._opening, self._creating = asyncio.Lock(), asyncio.Lock()
        self._slow: tuple[type[Exception], ...] = (TimeoutError,)  # and the pool's PoolTimeout, once imported

    async def start(self) -> None:
        try:
            await self._run(self._expire)
        except StateUnavailable:
            log.warning("budgets: PostgreSQL is not reachable at start-up; budget checks answer 503 until it is")

    async def close(self) -> None:
        # For good: a check or a settlement that comes after the shutdown (a request answered late in the
        # drain) is refused, not served by a new pool that nothing would close.
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            with contextlib.suppress(Exception):
                await pool.close(timeout=1)

    async def _connections(self) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
        if self._pool is not None:
            return self._pool
        async with self._opening:
            if self._pool is not None:
                return self._pool
            if self._closed:
                raise ShuttingDown(CLOSED, retry_after=1)
            # optional dependency: pip install qwen-image-proxy[postgres]
            from psycopg_pool import AsyncConnectionPool, PoolTimeout

            pool_log = logging.getLogger("psycopg.pool")
            if pool_log.level == logging.NOTSET:  # its INFO lines come with every check: warnings only
                pool_log.setLevel(logging.WARNING)
            pool = AsyncConnectionPool(
                self.url, min_size=1, max_size=self.pool_size, open=False, name="budgets",
                kwargs={"autocommit": True, "connect_timeout": max(1, int(self.timeout))},
                # The longest wait for a connection: a new one takes no longer (connect_timeout), and with all
                # of them busy one is free again in milliseconds. Then PoolTimeout: a slow failure.
                configure=self._configure, timeout=self.timeout,
                # A connection attempt that keeps failing is given up after this long (not the default five
                # minutes of ever longer waits between tries): the next check starts a new one at once, so a
                # database that is back is used again within seconds.
                reconnect_timeout=2 * self.timeout)
            await pool.open()
            if self._closed:  # closed while this one opened: nothing would close it later
                await pool.close(timeout=1)
                raise ShuttingDown(CLOSED, retry_after=1)
            self._slow = (TimeoutError, PoolTimeout)
            self._pool = pool
            return pool

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """The table, once a process (not on each of the pool's connections, which would race: two
        CREATE TABLE IF NOT EXISTS at once can still collide)."""
        import psycopg

        async with self._creating:
            if not self._created:
                with contextlib.suppress(psycopg.errors.UniqueViolation):  # another proxy made it just now
                    await conn.execute(CREATE)
                self._created = True

    async def _run(self, step: Any, *args: Any) -> Any:
        """One step on a pooled connection, under the timeout; any failure is a StateUnavailable (503). After
        a timeout, the steps answer that 503 at once, but one at a time (at most one every `retry_after` s),
        which tries the database, until one succeeds. Closed: ShuttingDown (503 shutting_down), no connection."""
        if self._closed:
            raise ShuttingDown(CLOSED, retry_after=1)
        probe = self._down
        if probe:
            if self._probing or time.monotonic() < self._down_until:
                raise StateUnavailable(UNAVAILABLE)
            self._probing = True
        try:
            async with asyncio.timeout(2 * self.timeout):
                pool = await self._connections()
                while True:  # past the connections that the server closed (killed, restarted): no request fails
                    async with pool.connection() as conn:
                        if await _usable(conn):
                            result = await step(conn, *args)
                            break
            self._down = False
            return result
        except ShuttingDown:  # closed meanwhile: not the database's failure
            raise
        except Exception as e:  # noqa: BLE001 - the URL may carry a password: only the error's type
            log.warning("budgets: PostgreSQL call failed: %s", type(e).__name__ if not isinstance(e, ImportError)
                        else f"{e.name} is not installed (pip install 'qwen-image-proxy[postgres]')")
            # Only a slow failure (no connection or no answer in time) makes the checks behind it fail at
            # once; one that failed fast (a connection killed under its statement) costs only its request.
            if probe or isinstance(e, self._slow):
                self._down, self._down_until = True, time.monotonic() + self.retry_after
            raise StateUnavailable(UNAVAILABLE) from None
        finally:
            if probe:
                self._probing = False

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
