"""The ledger in PostgreSQL (usage.database_url), shared by several proxies; psycopg 3, async.

One connection, opened again after it breaks: a database that went away is reached again on the next
write once it is back (the writer keeps the records meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from . import aggregate
from .aggregate import Partial
from .record import UsageRecord
from .schema import COLUMNS_NOW, CREATE, SELECT, TABLE, add_columns, from_row, insert

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("proxy.usage")
# Taken while a proxy creates or upgrades the table: a transaction-level advisory lock, named by the table.
SETUP_LOCK = f"SELECT pg_advisory_xact_lock(hashtext('{TABLE}'))"


class PostgresLedger:
    def __init__(self, url: str, *, connect_timeout: float = 3):
        self.url = url
        self.connect_timeout = connect_timeout
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self._connection(), 2 * self.connect_timeout)
        except Exception as e:  # noqa: BLE001 - down at start-up: the writer keeps trying, serving goes on
            self._conn = None
            log.warning("usage ledger: PostgreSQL is not reachable at start-up (%s); records queue in memory "
                        "until it is", type(e).__name__)

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        import psycopg  # optional dependency: pip install qwen-image-proxy[postgres]

        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = await psycopg.AsyncConnection.connect(self.url, connect_timeout=max(1, int(self.connect_timeout)),
                                                         autocommit=False)
            try:
                async with conn.transaction():
                    # One proxy at a time, to the end of this transaction: two upgrading an older ledger at
                    # once each held the table (CREATE INDEX) while waiting for the other's to ALTER it, a
                    # deadlock that failed one of them.
                    await conn.execute(SETUP_LOCK)
                    for statement in CREATE:
                        await conn.execute(statement)
                    # A ledger made by an older version gains its missing columns (only then an ALTER: it
                    # locks the table, and every proxy connects with this).
                    cur = await conn.execute(COLUMNS_NOW)
                    for statement in add_columns({d.name.lower() for d in cur.description or ()},
                                                 if_not_exists=True):
                        await conn.execute(statement)
            except BaseException:
                await conn.close()  # not left open for the garbage collector, one per failed try
                raise
            self._conn = conn
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def write(self, records: list[UsageRecord]) -> None:
        async with self._lock:
            try:
                conn = await self._connection()
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(insert("%s"), [r.row() for r in records])
            except BaseException:
                await self._drop()
                raise

    async def query(self, start: float, end: float) -> list[UsageRecord]:
        async with self._lock:
            try:
                conn = await self._connection()
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.execute(SELECT.format(p="%s"), (start, end))
                    rows = await cur.fetchall()
            except BaseException:
                await self._drop()
                raise
        return [from_row(row) for row in rows]

    async def aggregate(self, lo: float, hi: float, origin: float, width: int, by_call: bool = False) -> list[Partial]:
        async with self._lock:
            try:
                conn = await self._connection()
                async with conn.transaction(), conn.cursor() as cur:
                    await cur.execute(aggregate.sql(aggregate.POSTGRES, by_call),
                                      aggregate.params(lo, hi, origin, width, by_call))
                    rows = await cur.fetchall()
            except BaseException:
                await self._drop()
                raise
        return aggregate.partials(rows, origin, width)

    async def _drop(self) -> None:
        """Forget a connection that failed (a timeout may have left it mid-statement)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # closing a broken connection may fail too
                await asyncio.wait_for(conn.close(), 1)
