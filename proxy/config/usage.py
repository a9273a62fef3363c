"""The usage sections of models.yaml: route prices, the ledger's storage, budgets and the seeded-request cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .strict import Strict

_PRICE_PARTS = ("per_image", "per_megapixel", "per_gpu_second", "per_call")


class PriceConfig(Strict):
    """What one route's calls cost. The parts given are added up: e.g. per_call plus per_megapixel."""

    per_image: float | None = Field(default=None, ge=0)
    per_megapixel: float | None = Field(default=None, ge=0)
    per_gpu_second: float | None = Field(default=None, ge=0)
    per_call: float | None = Field(default=None, ge=0)
    currency: Literal["USD"] = "USD"
    # Where the price comes from and when it was read (shown by `check-config`, kept for people).
    source: str | None = None

    @model_validator(mode="after")
    def _some_part(self) -> PriceConfig:
        if all(getattr(self, part) is None for part in _PRICE_PARTS):
            raise ValueError(f"give at least one of {', '.join(_PRICE_PARTS)} (no price: leave price out)")
        return self


class BudgetConfig(Strict):
    """A key's spending limits (UTC days and months); unset: no limit."""

    usd_per_day: float | None = Field(default=None, ge=0)
    usd_per_month: float | None = Field(default=None, ge=0)
    images_per_day: int | None = Field(default=None, ge=0)


class CacheConfig(Strict):
    """A model's cache of seeded requests: the same request with the same seed gets the stored images."""

    ttl_seconds: float = Field(default=86400, gt=0)
    max_mb: float = Field(default=256, gt=0)
    # key: a hit only for the key that made the images; shared: for every key.
    scope: Literal["key", "shared"] = "key"


class UsageConfig(Strict):
    """The usage ledger: one record per image request, written off the request path."""

    enabled: bool = True
    # postgresql://user:password@host:port/db for several proxies; empty: SQLite at `path`.
    database_url: str | None = None
    path: str = "var/usage.sqlite3"
    # The local GPU's price: routes on a local engine or a Ray pool without a price of their own cost
    # this per hour of the GPU time they measured. Empty: those routes record cost null.
    gpu_usd_per_hour: float | None = Field(default=None, ge=0)
    # Records waiting to be written; past this many (the database down for long) new ones are dropped
    # and counted (qip_usage_records_dropped_total).
    queue_max: int = Field(default=100000, ge=1)
    batch_size: int = Field(default=500, ge=1)
    flush_seconds: float = Field(default=1.0, gt=0)
    # Seconds one write to the database may take before it counts as failed (and is tried again).
    write_timeout: float = Field(default=5, gt=0)
    # Budget counters in PostgreSQL (database_url without state.redis_url): at most this many connections
    # per process check budgets at once (one is kept open; the ledger's writer has one more of its own).
    database_pool_size: int = Field(default=10, ge=1, le=1000)
    # The budget of keys that have none of their own.
    default_budget: BudgetConfig | None = None

    @field_validator("database_url", "gpu_usd_per_hour", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (empty: SQLite at usage.path)")
        return value
