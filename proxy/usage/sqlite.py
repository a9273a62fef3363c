"""The ledger in a SQLite file (WAL: readers never block the writer); no server to run."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path

from . import aggregate
from .aggregate import Partial
from .record import UsageRecord
from .schema import COLUMNS_NOW, CREATE, SELECT, add_columns, from_row, insert

log = logging.getLogger("proxy.usage")


class SqliteLedger:
    def __init__(self, path: str):
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # one connection, used from worker threads one at a time

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._open)
        except (OSError, sqlite3.Error) as e:  # serve anyway: records queue, and opening is tried again
            log.warning("usage ledger: cannot open %s (%s: %s); records queue in memory until it can be",
                        self.path, type(e).__name__, e)

    def _open(self) -> None:
        if self._db is not None:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash
        for statement in CREATE:
            db.execute(statement)
        # A ledger made by an older version: its missing columns, added once (a ledger is never recreated).
        present = {d[0].lower() for d in db.execute(COLUMNS_NOW).description}
        for statement in add_columns(present):
            try:
                db.execute(statement)
            except sqlite3.OperationalError as e:  # another process (a second proxy, the CLI) added it first
                if "duplicate column" not in str(e):
                    raise
        db.commit()
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def write(self, records: list[UsageRecord]) -> None:
        await asyncio.to_thread(self._write, [r.row() for r in records])

    def _connected(self) -> sqlite3.Connection:
        """The open connection (call under self._lock, after _open)."""
        if self._db is None:
            raise RuntimeError(f"usage ledger: {self.path} is not open")
        return self._db

    def _write(self, rows: list[tuple]) -> None:
        with self._lock:
            self._open()
        with self._lock:
            db = self._connected()
            with db:  # one transaction
                db.executemany(insert("?"), rows)

    async def query(self, start: float, end: float) -> list[UsageRecord]:
        return await asyncio.to_thread(self._query, start, end)

    def _query(self, start: float, end: float) -> list[UsageRecord]:
        with self._lock:
            self._open()
            rows = self._connected().execute(SELECT.format(p="?"), (start, end)).fetchall()
        return [from_row(row) for row in rows]

    async def aggregate(self, lo: float, hi: float, origin: float, width: int, by_call: bool = False) -> list[Partial]:
        return await asyncio.to_thread(self._aggregate, lo, hi, origin, width, by_call)

    def _aggregate(self, lo: float, hi: float, origin: float, width: int, by_call: bool) -> list[Partial]:
        with self._lock:
            self._open()
            rows = self._connected().execute(aggregate.sql(aggregate.SQLITE, by_call),
                                             aggregate.params(lo, hi, origin, width, by_call)).fetchall()
        return aggregate.partials(rows, origin, width)
