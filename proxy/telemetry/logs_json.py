"""The log formats of `serve`: text lines (time, level, logger: message), and for log_format: json one JSON
object per log record (time, level, logger, message, request_id, trace_id, and the request line's fields as
keys), with every configured secret scrubbed as in the text format."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

# The id of the request being handled (set by the gateway's middleware when logs are JSON).
REQUEST_ID_VAR: ContextVar[str] = ContextVar("qip_request_id", default="")


def _current_trace_id() -> str:
    """The trace of the span current where the record was made (OpenTelemetry only if already loaded)."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return ""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TextFormatter(logging.Formatter):
    """logging's Formatter for TEXT_FORMAT, with the date and time text made once a second rather than for
    every line (time.localtime and strftime were a tenth of the cost of a request's log line)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._second: tuple[int, str] = (-1, "")  # one tuple: replaced whole, never half by another thread

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second, text = self._second
        if second != int(record.created):
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (int(record.created), text)
        return self.default_msec_format % (text, record.msecs) if self.default_msec_format else text


def lean_records() -> None:
    """Log records without the process and thread they came from: neither format writes them, and
    LogRecord would look them up for every line (os.getpid() is a system call each time; the logging
    documentation's "Optimization" section). A quarter of what making the request log line costs."""
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


def use_text_logs(level: str) -> None:
    """logging.basicConfig with TEXT_FORMAT (what `serve` does with log_format: text)."""
    lean_records()
    handler = logging.StreamHandler()
    handler.setFormatter(TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler])


# json.dumps with options builds an encoder per call: one, built once.
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON. `scrub` removes secrets from the message and the traceback."""

    def __init__(self, scrub: Callable[[str], str] = str):
        super().__init__()
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "qip_fields", None) or {}
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.scrub(record.getMessage()),
            "request_id": fields.get("request_id") or REQUEST_ID_VAR.get() or None,
            "trace_id": fields.get("trace_id") if fields.get("trace_id", "-") != "-" else (_current_trace_id() or None),
        }
        entry.update((k, v) for k, v in fields.items() if k not in entry)
        if record.exc_info:
            entry["exception"] = self.scrub(self.formatException(record.exc_info))
        elif record.exc_text:  # a traceback the log scrubber already cleaned (it drops exc_info then)
            entry["exception"] = self.scrub(record.exc_text)
        return _ENCODER.encode(entry)


def use_json_logs(level: str, scrub: Callable[[str], str] = str) -> None:
    """Make the root logger write JSON lines to stderr (what `serve` does with log_format: json)."""
    lean_records()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(scrub))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
