"""The jobs section: background image requests (where they are kept, how many run) and their webhooks."""

from __future__ import annotations

import base64
import binascii

from pydantic import Field, field_validator

from .sections import http_url
from .strict import Strict


def webhook_secret(value: str | None) -> str | None:
    """A Standard Webhooks secret: `whsec_` + base64 of 24 to 64 random bytes."""
    if not value:
        return None
    if not value.startswith("whsec_"):
        raise ValueError("must start with whsec_ followed by base64 (e.g. whsec_ + 32 random bytes in base64)")
    try:
        raw = base64.b64decode(value[len("whsec_"):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after whsec_ is not valid base64") from None
    if not 24 <= len(raw) <= 64:
        raise ValueError("the secret must be 24 to 64 bytes (base64 after whsec_)")
    return value


class KeyWebhook(Strict):
    """The webhook of one client key: every background job of that key reports to it."""

    url: str
    # Default: jobs.webhook_secret.
    secret: str | None = Field(default=None, repr=False)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return http_url(value, "https://hooks.example.com/images") or ""

    @field_validator("secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return webhook_secret(value)


class JobsConfig(Strict):
    """Background requests (`"background": true` or `Prefer: respond-async`) and their webhooks."""

    enabled: bool = True
    # The SQLite database of jobs and pending webhook deliveries (WAL). Ignored with state.redis_url:
    # then jobs live in Redis and every proxy on it shares the work.
    path: str = "var/jobs.sqlite3"
    # Jobs this process runs at once.
    workers: int = Field(default=4, ge=1, le=256)
    # Jobs of one key queued or running at once; one more is answered 429 with Retry-After.
    max_queued_per_key: int = Field(default=100, ge=1)
    # How long finished jobs (and b64_json results) are kept; url results live as long as store.ttl_seconds.
    ttl_seconds: float = Field(default=7 * 86400, gt=0)
    # A running job's claim: renewed while it runs; a claim not renewed for this long (its process died)
    # is taken over: the job runs again from the start (same seed), or fails where a rerun may be charged.
    lease_seconds: float = Field(default=30, gt=0)
    # A job that has been interrupted this many times fails instead of running again.
    max_runs: int = Field(default=3, ge=1)
    # Standard Webhooks signing secret (whsec_...); needed for webhook_url on requests.
    webhook_secret: str | None = Field(default=None, repr=False)
    # Per client key (its name under server.api_keys): a webhook every job of that key reports to.
    key_webhooks: dict[str, KeyWebhook] = Field(default_factory=dict)
    # One delivery attempt: connect + answer within this many seconds; at most this much of the answer read.
    webhook_timeout: float = Field(default=10, gt=0)
    webhook_max_response_kb: float = Field(default=64, gt=0)
    # Retries on timeouts, connection errors, 429 and 5xx: exponential backoff with full jitter
    # (a random wait in [base * 2**(n-1) / 2, base * 2**(n-1)], capped at backoff_max), for retry_window s.
    webhook_backoff_base: float = Field(default=5, gt=0)
    webhook_backoff_max: float = Field(default=3600, gt=0)
    webhook_retry_window: float = Field(default=86400, gt=0)

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return webhook_secret(value)
