"""One exception hierarchy for the whole proxy, rendered as OpenAI error JSON."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from aiohttp import web

# The header that stops the openai SDKs' quick retries (two within seconds) of an answer they cannot change:
# a spent budget, a model with no usable route.
NO_RETRY = {"x-should-retry": "false"}


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    # Whether the router may try the next route after this failure.
    retryable = False
    # Whether trying the same route again may help (not after a refused login, say).
    retry_same_route = True
    # Where every route failed: the router's RouteResult (no images) of the routes it tried, so the log
    # line and the request's span say which route failed last and after how many calls.
    routed: Any = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        # An upstream's Retry-After of "nan", "inf" or "-5" means nothing (and round() raises on the first two).
        if retry_after is not None and not 0 <= retry_after < math.inf:
            retry_after = None
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers.setdefault("Retry-After", str(max(1, math.ceil(retry_after))))

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> web.Response:
        return web.Response(
            status=self.status,
            text=json.dumps(self.to_dict()),
            content_type="application/json",
            headers=self.headers,
        )


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class AuthenticationFailed(ProxyError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True


class UpstreamError(ProxyError):
    """A route failed for a reason that is not the client's fault (5xx, auth, connect)."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    retryable = True


class UpstreamRefused(UpstreamError):
    """The upstream refused for a reason another try would not fix (bad key, no credit, unknown model)."""

    retry_same_route = False


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class UpstreamUnavailable(UpstreamError):
    """The upstream said it is overloaded or down for a while (503), usually with a Retry-After."""

    status = 503
    code = "upstream_unavailable"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "no_route_available"


class ModelLoading(ServiceUnavailable):
    """A route's model is still loading and did not finish within the wait allowed."""

    code = "model_loading"
    retryable = True


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


def from_http_exception(e: web.HTTPException) -> ProxyError:
    """The OpenAI-shaped error for an aiohttp HTTP exception (a 413 from its body limit, a 405, ...)."""
    if e.status == 413:
        return PayloadTooLarge(f"The request body is too large: {e.text or e.reason}.")
    if e.status == 405:
        return MethodNotAllowed(e.reason)
    if e.status == 404:
        return NotFound(e.reason)
    if 400 <= e.status < 500:
        error = InvalidRequest(e.text or e.reason)
        error.status = e.status
        return error
    return ProxyError(e.reason)


def retry_after_from_headers(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI's) or `Retry-After` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def clip(text: str, limit: int = 500) -> str:
    """An upstream's text for a message: runs of whitespace as one space, at most `limit` characters (the
    rest of a megabyte error body would cost the scrubber and every log line)."""
    text = " ".join(text[:4 * limit].split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def redact(text: str, secrets: list[str]) -> str:
    """Remove secrets an upstream may have echoed back before the text reaches a client or a log."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text


# Credentials that look like credentials, whoever they belong to: "Bearer <token>", "Key <token>" (fal),
# "api_key": "...", and the usual prefixed key formats (sk-..., r8_..., fal keys are id:secret).
# Each comes with the words it cannot match without (in lower case): most text holds none of them, and
# a pattern that cannot match is not run (a 340-character prompt: 43 us for the three, 2 us to see that).
_TOKEN_RULES: list[tuple[re.Pattern[str], Any, tuple[str, ...]]] = [
    # A token has a digit somewhere: "key provided" stays readable, "Key 4f2a...:9c1e..." does not.
    (re.compile(r"(?i)\b(bearer|key|token|basic)(\s+)(?=[A-Za-z._~+/:=-]*\d)[A-Za-z0-9._~+/:=-]{8,}"),
     lambda m: f"{m.group(1)}{m.group(2)}[redacted]", ("bearer", "key", "token", "basic")),
    # "Authorization: Bearer <token>": the token goes whatever its shape (the rule above wants a digit in
    # it), the scheme stays ("Authorization: Bearer <key>" in a message is an instruction, not a secret).
    (re.compile(r"(?i)((?:api[_-]?key|authorization|x-api-key|access[_-]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?"
                r"(?:(?:bearer|basic|token|key)\s+)?)(?!\[redacted\])(?!(?:bearer|basic|token|key)(?:\s|$))[^\s\"',;}]{6,}"),
     lambda m: f"{m.group(1)}[redacted]", ("key", "authorization", "token", "secret", "password")),
    (re.compile(r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\br8_[A-Za-z0-9]{20,}"), "[redacted]", ("sk-", "pk-", "rk-", "r8_")),
]


def _may_match(low: str | None, words: tuple[str, ...]) -> bool:
    """False only where a pattern needing one of `words` cannot match `low`: ASCII text in lower case (None:
    text that is not ASCII, where IGNORECASE is more than A-Z / a-z: the long s matches s, say)."""
    if low is None:
        return True
    for word in words:  # noqa: SIM110 (any() over a generator: twice the time on every answer's text)
        if word in low:
            return True
    return False


class Scrubber:
    """Removes every configured secret, and anything shaped like a credential, from text that came from
    an upstream (error messages, params, codes, revised prompts, passthrough error bodies)."""

    def __init__(self, secrets: list[str]) -> None:
        # Longest first: a key that contains another is removed whole.
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def text(self, value: str) -> str:
        value = redact(value, self.secrets)
        low = value.lower() if value.isascii() else None
        for pattern, replacement, words in _TOKEN_RULES:
            if _may_match(low, words):
                value = pattern.sub(replacement, value)
                low = value.lower() if value.isascii() else None
        return value

    def value(self, value: Any) -> Any:
        return self.text(value) if isinstance(value, str) else value

    def error(self, error: ProxyError) -> ProxyError:
        error.message = self.text(error.message)
        error.param = self.value(error.param)
        error.code = self.value(error.code)
        return error
