"""Idempotency-Key on image calls: a repeat of a request gets the first answer instead of new images.

A request with an `Idempotency-Key` header is identified by (the client's key, the Idempotency-Key) and
fingerprinted by its normalized fields and the bytes of its input images. Within `state.idempotency_ttl`:

- the same key and fingerprint again: the first answer, byte for byte (the same links for url answers),
  marked `Idempotent-Replayed: true`; nothing is generated;
- the same key while the first attempt still runs: waits for it (up to the request timeout), then the same;
- the same key with another body: 422 `idempotency_key_mismatch`;
- a first attempt that ended in an error (4xx, 5xx, a cancelled request) is not kept: a retry runs again.

Answers larger than `state.idempotency_max_mb` are not kept either (a retry generates again), and url
answers only as long as their links live (`store.ttl_seconds`; a presigned S3 link 7 days at most).
Streamed requests (`stream: true`) are answered as usual, without idempotency.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import fields
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import InvalidRequest, ProxyError
from .shared import Answer, Records

if TYPE_CHECKING:
    from ..config import Config
    from ..request import ImageRequest
    from .factory import State

log = logging.getLogger("proxy.idempotency")  # its name before proxy/ had packages: logging configs keep working

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
# Visible ASCII, as Stripe and the IETF draft allow; long enough for a UUID and a prefix or two.
_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# A claim outlives its attempt by this much (a process that dies mid-attempt frees the key after it).
CLAIM_MARGIN_SECONDS = 60


class IdempotencyKeyMismatch(ProxyError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_mismatch"


class IdempotencyInProgress(ProxyError):
    """The first attempt with this key is still running after this request waited as long as it may."""

    status = 409
    type = "invalid_request_error"
    code = "idempotency_request_in_progress"


def fingerprint(req: ImageRequest) -> str:
    """A hash of the normalized request: every field, input images and mask by the hash of their bytes."""
    parts = {}
    for f in fields(req):
        value = getattr(req, f.name)
        if f.name in ("images", "mask"):
            items = value if f.name == "images" else ([value] if value is not None else [])
            value = [hashlib.sha256(img.data).hexdigest() for img in items]
        elif f.name == "loras":
            value = [lora.model_dump(mode="json") for lora in value]
        parts[f.name] = value
    text = json.dumps(parts, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def client_scope(request: web.Request) -> str:
    """Whose keys these are: the hash of the bearer key the client sent (so two clients never see each
    other's answers), or '-' for a client that sent none."""
    auth = request.headers.get("Authorization", "")
    if not auth:
        return "-"
    return hashlib.sha256(auth.strip().encode("utf-8", "surrogateescape")).hexdigest()[:32]


Work = Callable[[], Awaitable[Answer]]


class Idempotency:
    def __init__(self, records: Records, *, ttl: float = 86400, max_bytes: int = 64 * 1024 * 1024,
                 wait_timeout: float = 600, url_ttl: float | None = None) -> None:
        self.records = records
        self.ttl = ttl
        # A url answer is kept no longer than its links live (store.ttl_seconds, 7 days at most for presigned
        # S3 links): a replay must not be links that answer 404 or 403; past that, a repeat generates again.
        self.url_ttl = min(ttl, url_ttl) if url_ttl else ttl
        self.max_bytes = max_bytes
        self.wait_timeout = wait_timeout
        self.claim_ttl = wait_timeout + CLAIM_MARGIN_SECONDS

    @classmethod
    def from_config(cls, state: State, config: Config) -> Idempotency:
        return cls(state.records, ttl=config.state.idempotency_ttl,
                   max_bytes=int(config.state.idempotency_max_mb * 1024 * 1024),
                   wait_timeout=config.server.request_timeout, url_ttl=config.store.link_ttl)

    async def respond(self, request: web.Request, req: ImageRequest, work: Work, *,
                      scope: str | None = None) -> web.Response:
        """The answer to an image call: `work()` run once per Idempotency-Key (or every time without one)."""
        answer, replayed = await self.run(request, req, work, scope=scope)
        answer = answer.whole()
        response = web.Response(body=answer.body, status=answer.status, content_type=answer.content_type,
                                headers=answer.headers)
        if replayed:
            response.headers[REPLAYED] = "true"
        return response

    async def run(self, request: web.Request, req: ImageRequest, work: Work, *,
                  scope: str | None = None) -> tuple[Answer, bool]:
        """(the answer, whether it is a replay of an earlier one)."""
        key = request.headers.get(HEADER)
        if key is None:
            return await work(), False
        if not _KEY.match(key):
            raise InvalidRequest(f"Invalid '{HEADER}' header: 1 to 255 visible ASCII characters, no spaces.",
                                 code="invalid_idempotency_key")
        fp = fingerprint(req)
        record_key = f"{scope or client_scope(request)}:{hashlib.sha256(key.encode()).hexdigest()}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            owner = secrets.token_hex(12)
            record = await self.records.claim(record_key, fp, owner, self.claim_ttl)
            if record is None:
                break  # ours: run it
            if record.fingerprint == fp and not record.done:
                record = await self.records.wait(record_key, deadline)
                if record is None:
                    continue  # the first attempt failed (or expired): this one may run
            if record.fingerprint != fp:
                raise IdempotencyKeyMismatch(
                    f"This {HEADER} was already used with a different request body; use a new key for a "
                    "new request.")
            if record.answer is not None:  # done
                return record.answer, True
            raise IdempotencyInProgress(
                f"A request with this {HEADER} is still being processed; retry it later.", retry_after=5)

        try:
            answer = (await work()).whole()
        except BaseException:
            await _quietly(self.records.release(record_key, fp, owner))
            raise
        if answer.status >= 400 or len(answer.body) > self.max_bytes:
            if answer.status < 400:
                log.info("idempotency: an answer of %d bytes is over the %d kept; a repeat generates again",
                         len(answer.body), self.max_bytes)
            await _quietly(self.records.release(record_key, fp, owner))
        else:
            # The client gets its images even if the record cannot be written now (Redis full or gone);
            # then the claim goes, so that a retry runs again instead of waiting on a claim nobody ends.
            ttl = self.url_ttl if req.response_format == "url" else self.ttl
            if not await _quietly(self.records.finish(record_key, fp, owner, answer, ttl)):
                await _quietly(self.records.release(record_key, fp, owner))
        return answer, False


async def _quietly(awaitable: Awaitable) -> bool:
    """Bookkeeping that must neither hide the request's own outcome nor be cut short by a cancellation;
    False when it failed (still running, after a cancellation here, is not a failure)."""
    task = asyncio.ensure_future(awaitable)
    with contextlib.suppress(BaseException):
        await asyncio.shield(task)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("idempotency: could not update a record: %s", type(task.exception()).__name__)
    return not (task.done() and (task.cancelled() or task.exception() is not None))
