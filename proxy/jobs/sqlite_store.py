"""Jobs in one SQLite file (WAL): durable across a crash of the process, shared by the processes of one
machine (`serve --workers N`), each statement run in one thread of its own, never on the event loop."""

from __future__ import annotations

import asyncio
import builtins
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .model import ACTIVE, IN_PROGRESS, QUEUED, TERMINAL, Job
from .store import JobStoreUnavailable

log = logging.getLogger("proxy.jobs")

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  status TEXT NOT NULL,
  created_at REAL NOT NULL,
  seq INTEGER NOT NULL,
  lease_owner TEXT,
  lease_until REAL,
  next_delivery REAL,
  delivery_hold REAL,
  doc TEXT NOT NULL,
  request BLOB,
  result BLOB
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq);
CREATE INDEX IF NOT EXISTS jobs_delivery ON jobs(next_delivery);
"""


class SqliteJobStore:
    kind = "sqlite"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        # One thread: the connection is used by one thread at a time, statements in order.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qip-jobs-sqlite")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        except (sqlite3.Error, OSError) as e:  # OSError: the folder cannot be made
            log.warning("jobs: the SQLite store at %s failed: %s", self.path, e)
            raise JobStoreUnavailable(f"The job store failed ({type(e).__name__}); retry shortly.") from None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives the process being killed (not a power cut, which needs FULL).
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except BaseException:
            db.close()
            raise
        self._db = db

    async def start(self) -> None:
        if self._db is None:
            await self._run(self._open)

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._thread.shutdown(wait=False)

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the SQLite job store is not started (call start() first)")
        return self._db

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """fn(db) inside BEGIN IMMEDIATE ... COMMIT: a write lock across the processes sharing the file."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return out

    # ---- the interface ------------------------------------------------------------------------------

    async def create(self, job: Job, request: bytes, max_active: int) -> bool:
        def insert(db: sqlite3.Connection) -> bool:
            active = db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)",
                                (job.owner, *ACTIVE)).fetchone()[0]
            if active >= max_active:
                return False
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute("INSERT INTO jobs (id, owner, status, created_at, seq, doc, request) VALUES (?,?,?,?,?,?,?)",
                       (job.id, job.owner, job.status, job.created_at, seq, job.to_doc(), request))
            return True

        return await self._run(self._tx, insert)

    async def get(self, job_id: str) -> Job | None:
        row = await self._run(self._one, "SELECT doc FROM jobs WHERE id = ?", (job_id,))
        return Job.from_doc(row[0]) if row else None

    def _one(self, sql: str, args: tuple[Any, ...]) -> Any:
        return self._conn().execute(sql, args).fetchone()

    async def request(self, job_id: str) -> bytes | None:
        row = await self._run(self._one, "SELECT request FROM jobs WHERE id = ?", (job_id,))
        return row[0] if row else None

    async def result(self, job_id: str) -> bytes | None:
        row = await self._run(self._one, "SELECT result FROM jobs WHERE id = ?", (job_id,))
        return row[0] if row else None

    async def list(self, owner: str, *, limit: int, after: str | None, status: str | None) -> builtins.list[Job]:
        def query() -> builtins.list[Job]:
            sql = "SELECT doc FROM jobs WHERE owner = ?"
            args: builtins.list[Any] = [owner]
            if after is not None:
                sql += " AND seq < COALESCE((SELECT seq FROM jobs WHERE id = ? AND owner = ?), -1)"
                args += [after, owner]
            if status is not None:
                sql += " AND status = ?"
                args.append(status)
            sql += " ORDER BY seq DESC LIMIT ?"
            args.append(limit)
            return [Job.from_doc(r[0]) for r in self._conn().execute(sql, args).fetchall()]

        return await self._run(query)

    async def active_count(self, owner: str) -> int:
        row = await self._run(self._one, "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)",
                              (owner, *ACTIVE))
        return row[0]

    def _take(self, db: sqlite3.Connection, where: str, args: tuple[Any, ...], worker: str, lease: float) -> Job | None:
        row = db.execute(f"SELECT doc FROM jobs WHERE {where} ORDER BY seq LIMIT 1", args).fetchone()
        if row is None:
            return None
        job = Job.from_doc(row[0])
        job.status = IN_PROGRESS
        db.execute("UPDATE jobs SET status = ?, lease_owner = ?, lease_until = ?, doc = ? WHERE id = ?",
                   (IN_PROGRESS, worker, time.time() + lease, job.to_doc(), job.id))
        return job

    async def claim(self, worker: str, lease: float, skip_owners: frozenset[str] = frozenset()) -> Job | None:
        skipped = sorted(skip_owners)
        where = "status = ?" + (f" AND owner NOT IN ({', '.join('?' * len(skipped))})" if skipped else "")
        return await self._run(self._tx, lambda db: self._take(db, where, (QUEUED, *skipped), worker, lease))

    async def claim_expired(self, worker: str, lease: float) -> Job | None:
        return await self._run(self._tx, lambda db: self._take(
            db, "status = ? AND lease_until < ?", (IN_PROGRESS, time.time()), worker, lease))

    async def renew(self, job_id: str, worker: str, lease: float) -> Job | None:
        def renew(db: sqlite3.Connection) -> Job | None:
            row = db.execute("SELECT doc FROM jobs WHERE id = ? AND lease_owner = ? AND status = ?",
                             (job_id, worker, IN_PROGRESS)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET lease_until = ? WHERE id = ?", (time.time() + lease, job_id))
            return Job.from_doc(row[0])

        return await self._run(self._tx, renew)

    async def save(self, job: Job, worker: str, *, result: bytes | None = None, release: bool = False) -> bool:
        def save(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT doc FROM jobs WHERE id = ? AND lease_owner = ?", (job.id, worker)).fetchone()
            if row is None:
                return False
            # A cancel request may have come in meanwhile (from another request): keep it.
            job.cancel_requested = job.cancel_requested or Job.from_doc(row[0]).cancel_requested
            sets = "status = ?, doc = ?, next_delivery = ?"
            args: builtins.list[Any] = [job.status, job.to_doc(), job.next_delivery_at]
            if result is not None:
                sets += ", result = ?"
                args.append(result)
            if release:
                sets += ", lease_owner = NULL, lease_until = NULL"
            if job.status in TERMINAL:
                sets += ", request = NULL"  # not needed any more: the input images go
            db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*args, job.id))
            return True

        return await self._run(self._tx, save)

    async def cancel(self, job_id: str, worker: str, lease: float) -> tuple[Job | None, bool]:
        def cancel(db: sqlite3.Connection) -> tuple[Job | None, bool]:
            row = db.execute("SELECT doc, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None, False
            job = Job.from_doc(row[0])
            if row[1] == QUEUED:  # taken by the caller, who ends it as cancelled
                return self._take(db, "id = ? AND status = ?", (job_id, QUEUED), worker, lease), True
            if job.status == IN_PROGRESS and not job.cancel_requested:
                job.cancel_requested = True
                db.execute("UPDATE jobs SET doc = ? WHERE id = ?", (job.to_doc(), job_id))
            return job, False

        return await self._run(self._tx, cancel)

    async def due_deliveries(self, worker: str, now: float, hold: float, limit: int = 50) -> builtins.list[Job]:
        def due(db: sqlite3.Connection) -> builtins.list[Job]:
            rows = db.execute("SELECT doc FROM jobs WHERE next_delivery <= ? AND "
                              "(delivery_hold IS NULL OR delivery_hold < ?) ORDER BY next_delivery LIMIT ?",
                              (now, now, limit)).fetchall()
            jobs = [Job.from_doc(r[0]) for r in rows]
            for job in jobs:
                db.execute("UPDATE jobs SET delivery_hold = ? WHERE id = ?", (now + hold, job.id))
            return jobs

        return await self._run(self._tx, due)

    async def save_deliveries(self, job: Job, worker: str) -> None:
        def save(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT doc FROM jobs WHERE id = ?", (job.id,)).fetchone()
            if row is None:
                return
            current = Job.from_doc(row[0])
            current.deliveries = job.deliveries
            db.execute("UPDATE jobs SET doc = ?, next_delivery = ?, delivery_hold = NULL WHERE id = ?",
                       (current.to_doc(), current.next_delivery_at, job.id))

        await self._run(self._tx, save)

    async def delete(self, job_id: str) -> None:
        await self._run(self._tx, lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def purge(self, before: float) -> builtins.list[str]:
        def purge(db: sqlite3.Connection) -> builtins.list[str]:
            rows = db.execute("SELECT id, doc FROM jobs WHERE status IN (?, ?, ?) AND next_delivery IS NULL",
                              TERMINAL).fetchall()
            gone = [r[0] for r in rows if (Job.from_doc(r[1]).finished_at or 0) < before]
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in gone])
            return gone

        return await self._run(self._tx, purge)
