"""One exception hierarchy for the whole proxy, rendered as OpenAI error JSON."""

from __future__ import annotations

import json

from aiohttp import web


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    # Whether the router may try the next route after this failure.
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

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

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        # An upstream's Retry-After of "nan", "inf" or "-5" means nothing (and round() raises on the first two).
        if retry_after is not None and not 0 <= retry_after < float("inf"):
            retry_after = None
        self.retry_after = retry_after
        if retry_after is not None:
            self.headers.setdefault("Retry-After", str(max(1, round(retry_after))))


class UpstreamError(ProxyError):
    """A route failed for a reason that is not the client's fault (5xx, auth, connect)."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    retryable = True


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "no_route_available"


def redact(text: str, secrets: list[str]) -> str:
    """Remove secrets an upstream may have echoed back before the text reaches a client or a log."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return text
