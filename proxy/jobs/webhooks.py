"""Standard Webhooks for jobs: signing (pure), when to retry (pure), and one delivery attempt (thin I/O).

A message has an id that every attempt repeats; each attempt signs `{id}.{timestamp}.{body}` with
HMAC-SHA256 under the `whsec_` secret and sends `webhook-id`, `webhook-timestamp` and
`webhook-signature: v1,<base64>`. 2xx: delivered. 410: gone, never again. Timeouts, connection errors,
429 and 5xx: again after an exponential, jittered wait, until the retry window closes. Anything else
(another 4xx, a 3xx, an address the rules refuse): failed, not retried.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import time

import pybase64 as base64

from ..media.fetch import FetchFailed, FetchPolicy, FetchRefused, GuardedFetcher
from .model import Delivery


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The webhook-signature value: `v1,` + base64(HMAC-SHA256(secret bytes, "{id}.{timestamp}.{body}"))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def headers(secret: str, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body),
            "Content-Type": "application/json", "User-Agent": "qwen-image-proxy-webhooks"}


def backoff(attempt: int, base: float, cap: float, rand: float | None = None) -> float:
    """The wait before attempt `attempt + 1`: base * 2**(attempt-1), capped, jittered to [half, all] of it."""
    delay = min(cap, base * 2 ** max(0, attempt - 1))
    r = random.random() if rand is None else rand
    return delay / 2 + r * delay / 2


def outcome(status: int | None) -> str:
    """What an answer means for the message: delivered | gone | retry | failed (None: no answer)."""
    if status is None or status == 429 or status >= 500:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    if status == 410:
        return "gone"
    return "failed"


class Deliverer:
    """Sends one attempt of a message and records it on the Delivery."""

    def __init__(self, fetcher: GuardedFetcher, policy: FetchPolicy, *, backoff_base: float, backoff_max: float,
                 window: float):
        self.fetcher, self.policy = fetcher, policy
        self.backoff_base, self.backoff_max, self.window = backoff_base, backoff_max, window

    async def attempt(self, delivery: Delivery, secret: str) -> None:
        now = time.time()
        status, error = None, None
        try:
            status = await self.fetcher.post(delivery.url, self.policy, delivery.body.encode(),
                                             headers(secret, delivery.id, int(now), delivery.body))
        except FetchRefused as e:
            error, status = f"refused: {e}", -1
        except FetchFailed as e:
            error = str(e)
        result = "failed" if status == -1 else outcome(status)
        delivery.attempts.append({"at": int(now), "status": status if status != -1 else None, "error": error})
        if result == "retry":
            wait = backoff(len(delivery.attempts), self.backoff_base, self.backoff_max)
            if now + wait <= delivery.created_at + self.window:
                delivery.next_attempt_at = now + wait
                return
            result = "failed"
        delivery.state = result
        delivery.next_attempt_at = None
