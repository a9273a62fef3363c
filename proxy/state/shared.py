"""State shared by requests: idempotency records, and counts for per-key rate and concurrency limits.

The interface and the record format. Two backends: this process's memory by default (shared_memory.py),
or Redis with `state.redis_url` (shared_redis.py), so that every process and machine using the same Redis
sees the same records and counts; factory.py picks one.

Idempotency records (see proxy.state.idempotency for the HTTP side): a key is first *claimed* (a small
"running" record with an owner token and an expiry, SET NX in Redis), then *finished* (the stored answer
replaces it, kept for the idempotency TTL) or *released* (deleted, so a retry runs again). Finishing and
releasing only touch a record the same owner still holds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Protocol

from ..errors import ServiceUnavailable


class StateUnavailable(ServiceUnavailable):
    """The shared state (Redis) cannot be reached or did not answer in time."""

    code = "state_unavailable"

    def __init__(self, message: str = "The proxy's shared state (Redis) is unavailable; retry shortly.", *,
                 retry_after: float = 2) -> None:
        super().__init__(message, retry_after=retry_after)


# ---- idempotency records --------------------------------------------------------------------------


@dataclass
class Answer:
    """A stored HTTP answer: what a repeat of the request gets back."""

    status: int
    # A tuple: a large body in pieces (an image's text can be a view of the upstream's answer), sent one
    # after the other without joining them; joined (`whole`) only to be kept.
    body: bytes | tuple[bytes | memoryview, ...]
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/json"

    def whole(self) -> Answer:
        """This answer with its body as one bytes object."""
        if isinstance(self.body, bytes):
            return self
        return replace(self, body=b"".join(self.body))

    def encode(self, fingerprint: str) -> bytes:
        head = json.dumps({"state": "done", "fp": fingerprint, "status": self.status, "headers": self.headers,
                           "content_type": self.content_type}, separators=(",", ":"))
        body = self.body if isinstance(self.body, bytes) else b"".join(self.body)
        return head.encode() + b"\n" + body


@dataclass
class Record:
    """What a key holds: the fingerprint of the request that claimed it, and its answer once done."""

    fingerprint: str
    answer: Answer | None = None

    @property
    def done(self) -> bool:
        return self.answer is not None


def running_value(fingerprint: str, owner: str) -> bytes:
    """A claim in progress as stored (in Redis); decode_record reads it back."""
    return json.dumps({"state": "running", "fp": fingerprint, "owner": owner}, separators=(",", ":")).encode()


def decode_record(value: bytes) -> Record:
    head, _, body = value.partition(b"\n")
    meta = json.loads(head)
    if meta["state"] != "done":
        return Record(meta["fp"])
    return Record(meta["fp"], Answer(meta["status"], body, meta.get("headers") or {},
                                     meta.get("content_type") or "application/json"))


class Records(Protocol):
    async def claim(self, key: str, fingerprint: str, owner: str, ttl: float) -> Record | None:
        """Take the key for a new attempt (None), or get the record someone else holds."""
        ...

    async def finish(self, key: str, fingerprint: str, owner: str, answer: Answer, ttl: float) -> None: ...

    async def release(self, key: str, fingerprint: str, owner: str) -> None: ...

    async def wait(self, key: str, deadline: float) -> Record | None:
        """Wait until the key's attempt is done (its record), gone (None) or the loop time `deadline`
        passes (the running record)."""
        ...
