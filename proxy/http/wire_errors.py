"""Malformed client traffic, and logs that never carry what a client sent.

aiohttp refuses a request its parser cannot read (a control character in a header, a bad request line,
bad chunked encoding, a line over 8190 bytes, TLS bytes on the HTTP port) with a 400 whose text repeats
the offending bytes, and logs it at ERROR with a traceback that repeats them again: an `Authorization:
Bearer <key>\\x01` header put the whole key into the log. Here:

- `describe(exc)` names the problem in aiohttp's own words, never the client's bytes;
- `error_response(...)` is the OpenAI-shaped answer the server sends instead (see server.py);
- `LogScrubber`, a logging.Filter on aiohttp's loggers, asyncio's and the proxy's own, turns a parser
  error's record into one DEBUG line without the bytes (a malformed request is the client's problem, not
  an ERROR) and removes configured secrets and anything shaped like a credential from every other
  record's message and traceback. `install_log_scrubbing(secrets)` puts it in place (build_app does).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from aiohttp import http_exceptions as hx
from aiohttp.http_exceptions import HttpProcessingError

from ..errors import InvalidRequest, ProxyError, Scrubber

# aiohttp's words come first in its messages ("Invalid header value char:\n\n  b'...'"); the client's
# bytes follow a colon, always quoted (a repr). A head with a quote, a dot or a colon is not shown.
_OWN_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9 ,-]{2,79}")
_BY_CLASS: list[tuple[type[BaseException], str]] = [
    (hx.InvalidURLError, "Invalid request target"),
    (hx.LineTooLong, "A request line or header is longer than the server accepts (8190 bytes)"),
    (hx.BadHttpMethod, "Invalid request method"),
    (hx.BadStatusLine, "Bad request line"),
    (hx.InvalidHeader, "Invalid header"),
    (hx.ContentLengthError, "The body does not match its Content-Length"),
    (hx.TransferEncodingError, "Bad chunked transfer encoding"),
    (hx.ContentEncodingError, "Bad content encoding"),
]
# Named by class whatever the message says: an InvalidURLError's message can be the bare target ("*").
_ALWAYS_BY_CLASS = (hx.InvalidURLError, hx.LineTooLong)


def describe(exc: BaseException | None) -> str:
    """What is wrong with a request aiohttp could not parse, without a byte of it."""
    message = getattr(exc, "message", None)
    if isinstance(message, str) and not isinstance(exc, _ALWAYS_BY_CLASS):
        head = message.split(":", 1)[0].strip()
        if _OWN_WORDS.fullmatch(head):
            return head
    for cls, words in _BY_CLASS:
        if isinstance(exc, cls):
            return words
    return "Malformed HTTP request"


def client_error(exc: BaseException | None) -> bool:
    """Whether an error aiohttp hands its error handler is the client's malformed request."""
    return isinstance(exc, HttpProcessingError)


def error_response(status: int, exc: BaseException | None = None) -> ProxyError:
    """The OpenAI-shaped error for what aiohttp's own handler would answer with plain text."""
    if status == 400 or client_error(exc):
        error: ProxyError = InvalidRequest(f"{describe(exc)}; the request could not be read.",
                                           code="malformed_request")
        error.status = 400
        return error
    if status == 504:
        error = ProxyError("The request took too long.", code="timeout")
    else:
        error = ProxyError("The proxy failed to handle the request.", code="internal_error")
    error.status = status
    return error


class LogScrubber(logging.Filter):
    """Keeps client bytes of parser errors, configured secrets and credential-shaped text out of logs."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._scrubber = Scrubber([])

    def add_secrets(self, secrets: list[str]) -> None:
        fresh = {s for s in secrets if s} - self._secrets
        if fresh:
            self._secrets |= fresh
            self._scrubber = Scrubber(sorted(self._secrets))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name in _UNSCRUBBED:
            return True
        try:
            return self._scrub(record)
        except Exception:  # a record whose message cannot be formatted: logging would print its args
            record.msg, record.args = "(a log record that could not be formatted)", None
            record.exc_info, record.exc_text = None, None
            return True

    def _scrub(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if client_error(exc) and record.name.startswith("aiohttp"):
            # "Error handling request from <ip>" with a traceback quoting the bytes: one DEBUG line instead.
            record.msg, record.args = "malformed request from %s: %s", (_remote(record), describe(exc))
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        message = record.getMessage()
        clean = self._text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            clean = self._text(text)
            if clean != text:  # the traceback as text, scrubbed; the exception object itself is dropped
                record.exc_info, record.exc_text = None, clean
        elif record.exc_text:
            record.exc_text = self._text(record.exc_text)
        if record.name == "aiohttp.access":  # the access log's fields also ride along as attributes
            for key, value in list(vars(record).items()):
                if key not in _RECORD_FIELDS and isinstance(value, str | dict):
                    setattr(record, key, self._scrub_value(value))
        return True

    def _scrub_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self._text(v) if isinstance(v, str) else v for k, v in value.items()}
        return self._text(value)

    def _text(self, text: str) -> str:
        return _URL_PASSWORD.sub(r"\1[redacted]@", self._scrubber.text(text))


# scheme://user:password@host: the password.
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*:)[^/\s@]+@")
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _remote(record: logging.LogRecord) -> str:
    args = record.args if isinstance(record.args, tuple) else ()
    return str(args[0]) if args else "a client"


SCRUBBER = LogScrubber()
# aiohttp logs client bytes on these (the server's parser errors and tracebacks, the access log's request
# line and headers); asyncio's and the proxy's own can carry an exception that quotes them.
AIOHTTP_LOGGERS = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal", "aiohttp.websocket",
                   "aiohttp.client", "asyncio",
                   # psycopg's pool logs each failed connection with libpq's message, which can quote the
                   # database URL's password ("invalid percent-encoded token: ...")
                   "psycopg", "psycopg.pool")
# The per-request line holds only known fields: scrubbing it would cost every request for nothing.
_UNSCRUBBED = ("proxy.requests",)


def install_log_scrubbing(secrets: list[str]) -> LogScrubber:
    """Put SCRUBBER on aiohttp's loggers and the proxy's (a filter on a logger sees only its own records,
    not its children's: each one gets it); `secrets` join the ones it removes."""
    SCRUBBER.add_secrets(secrets)
    names = list(AIOHTTP_LOGGERS) + [name for name in list(logging.Logger.manager.loggerDict)
                                     if (name == "proxy" or name.startswith("proxy.")) and name not in _UNSCRUBBED]
    for name in names:
        logger = logging.getLogger(name)
        if SCRUBBER not in logger.filters:
            logger.addFilter(SCRUBBER)
    return SCRUBBER
