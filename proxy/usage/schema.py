"""The ledger's table, the same for SQLite and PostgreSQL (plain SQL types both understand)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .record import COLUMNS, UsageRecord

_TYPES = {
    "id": "TEXT PRIMARY KEY", "ts": "DOUBLE PRECISION NOT NULL", "request_id": "TEXT", "key": "TEXT",
    "model": "TEXT NOT NULL", "source": "TEXT NOT NULL", "route": "TEXT", "provider": "TEXT",
    "outcome": "TEXT NOT NULL", "status": "INTEGER NOT NULL", "images_asked": "INTEGER NOT NULL",
    "images_delivered": "INTEGER NOT NULL", "width": "INTEGER", "height": "INTEGER",
    "megapixels": "DOUBLE PRECISION", "steps": "INTEGER", "tier": "TEXT", "latency_ms": "DOUBLE PRECISION",
    "gpu_seconds": "DOUBLE PRECISION", "cost_usd": "DOUBLE PRECISION", "cache_hit": "BOOLEAN NOT NULL",
    "stream": "BOOLEAN NOT NULL", "attempts": "TEXT NOT NULL", "project_id": "TEXT", "user_id": "TEXT",
}
assert set(_TYPES) == set(COLUMNS)
# Columns added after the first release, in order: a ledger made before them gains them at start-up
# (nullable, so its old records read null). A new column goes at the end of UsageRecord and here.
ADDED = ("project_id", "user_id")

TABLE = "qip_usage"
CREATE = [
    f"CREATE TABLE IF NOT EXISTS {TABLE} ({', '.join(f'{c} {_TYPES[c]}' for c in COLUMNS)})",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_ts ON {TABLE} (ts)",
]


# The table's columns as the queries below see it (cursor.description names them), in either database.
COLUMNS_NOW = f"SELECT * FROM {TABLE} LIMIT 0"


def add_columns(present: set[str], if_not_exists: bool = False) -> list[str]:
    """ALTER TABLE statements adding the columns an older ledger lacks (`present`: the columns it has).
    `if_not_exists` (PostgreSQL): another proxy adding the same column meanwhile is no error."""
    guard = " IF NOT EXISTS" if if_not_exists else ""
    return [f"ALTER TABLE {TABLE} ADD COLUMN{guard} {c} {_TYPES[c]}" for c in ADDED if c not in present]


SELECT = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE ts >= {{p}} AND ts < {{p}} ORDER BY ts"


def insert(placeholder: str) -> str:
    """INSERT of one record that skips an id already written (a retried batch counts once)."""
    marks = ", ".join([placeholder] * len(COLUMNS))
    return f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING"


def from_row(row: Sequence[Any]) -> UsageRecord:
    record = UsageRecord(*row)
    record.cache_hit, record.stream = bool(record.cache_hit), bool(record.stream)
    return record
