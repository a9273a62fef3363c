"""Reading a request body into fields (and the file parts of a form), whatever arrives.

JSON objects, urlencoded and multipart forms; every malformed body is an InvalidRequest (400) with a
code saying which kind (invalid_json, invalid_multipart, invalid_form, invalid_body,
invalid_content_type), and too_many_fields for a form of more than MAX_FORM_FIELDS fields; a body over
the app's client_max_size stays aiohttp's 413.
"""

from __future__ import annotations

import asyncio
import email.errors
import re
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from ..errors import InvalidRequest
from ..request import MAX_FORM_FIELDS
from ..wire_json import _THREAD_PARSE_BYTES, MAX_JSON_DEPTH, _printable, _safe, check_values, parse_json_bytes
from .wire_errors import describe


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart form (the images and mask of an edit)."""

    field: str
    filename: str
    content_type: str
    data: bytes


class Body(NamedTuple):
    fields: dict[str, Any]
    # File parts of a multipart form, in order (empty unless asked for).
    files: list[Upload]
    # The body's bytes, for passthrough of a call this proxy does not serve.
    raw: bytes | None


async def read_fields(request: web.Request) -> tuple[dict[str, Any], bytes | None]:
    """The fields of a JSON object body or of a form (file parts ignored), and the raw bytes of a
    body read whole (None for multipart, which is parsed as a stream).

    Every malformed body is an InvalidRequest (400); a body over the app's client_max_size raises
    aiohttp's HTTPRequestEntityTooLarge (413) unchanged.
    """
    body = await read_body(request, files=False)
    return body.fields, body.raw


async def read_body(request: web.Request, *, files: bool = True) -> Body:
    """read_fields plus the file parts of a multipart form, read into memory when `files` is true."""
    try:
        return await _read_body(request, files)
    except InvalidRequest:
        if request.content.exception() is not None:
            _drop_broken_body(request)
        raise


def _drop_broken_body(request: web.Request) -> None:
    """The body broke in transit (bad gzip, chunking): after the answer, aiohttp would read the rest of
    it ("lingering close"), meet the same error and log it at ERROR with a traceback. Mark the body
    finished and close the connection once the 400 is sent: there is nothing more to read from it."""
    if request.protocol is not None:
        request.protocol.close()
    request.content.feed_eof()


async def _read_body(request: web.Request, files: bool) -> Body:
    if request.headers.get("Content-Type") == "application/json":
        # What nearly every client sends, and nothing to parse: aiohttp's content_type and charset look the
        # header up twice and go through its parser's cache and a copy of the parameters.
        ctype, charset = "application/json", None
    else:
        try:
            ctype, charset = request.content_type, request.charset
        except (ValueError, LookupError, email.errors.MessageError):  # the stdlib's header parser gives up
            header = _printable(request.headers.get("Content-Type", ""))[:200]
            raise InvalidRequest(f"The Content-Type header cannot be parsed: '{header}'.",
                                 code="invalid_content_type") from None
    try:
        # A form too is read whole first (within client_max_size), so a call this proxy does not serve can
        # still be passed on as it came; then parsed from those bytes.
        raw = await request.read()
    except (web.RequestPayloadError, HttpProcessingError) as e:  # a broken chunked or gzip body, one cut short
        raise InvalidRequest(f"The request body could not be read: {_reason(e)}.", code="invalid_body") from None
    if ctype == "multipart/form-data":
        _replay(request, raw)
        fields, uploads = await _read_multipart(request, files)
        check_values(fields)
        return Body(fields, uploads, raw)
    # `curl -d '{...}'` sends JSON labelled as a form: read it as what it is.
    if ctype == "application/x-www-form-urlencoded" and not raw.lstrip().startswith(b"{"):
        fields = _parse_urlencoded(raw, charset)
        check_values(fields)
    elif len(raw) > _THREAD_PARSE_BYTES:
        fields = await asyncio.to_thread(parse_json_bytes, raw)
    else:
        fields = parse_json_bytes(raw)
    return Body(fields, [], raw)


class _InMemory:
    """The protocol behind a replayed body. The connection's own must not be used: the stream would
    pause and resume it for flow control past 128 KiB, and with the request already read aiohttp's
    parser asserts (a 500 for any form over 128 KiB) or the connection stops reading."""

    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def _replay(request: web.Request, raw: bytes) -> None:
    """Make the body readable again by aiohttp's form parser, from bytes already read."""
    stream = StreamReader(_InMemory(), 1 << 16, loop=asyncio.get_running_loop())  # type: ignore[arg-type]
    stream.feed_data(raw)
    stream.feed_eof()
    request._payload = stream  # noqa: SLF001 - aiohttp parses forms from this stream only


# What aiohttp's form parser raises for a malformed body: a missing or bad boundary, truncated parts,
# bad part headers, unknown charsets or transfer encodings, bad base64, undecodable text.
# HTTPRequestEntityTooLarge (413) is none of these and goes through.
_FORM_ERRORS = (ValueError, LookupError, RuntimeError, AssertionError, zlib.error, HttpProcessingError,
                web.RequestPayloadError, web.HTTPBadRequest)


async def _read_multipart(request: web.Request, keep_files: bool) -> tuple[dict[str, Any], list[Upload]]:
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge as e:
        # The body is within client_max_size (read whole already): aiohttp's 413 here means too many
        # parts. That is the client's malformed request, not an oversized one: a 400 naming the limit.
        limit = getattr(request, "_client_max_fields", MAX_FORM_FIELDS)
        if "form fields" not in (e.text or ""):
            raise
        raise InvalidRequest(f"The multipart/form-data body has more than {limit} fields (parts); at most "
                             f"{limit} are accepted.", code="too_many_fields") from None
    except _FORM_ERRORS as e:
        raise InvalidRequest(f"The multipart/form-data body is malformed: {_reason(e)}.",
                             code="invalid_multipart") from None
    fields: dict[str, Any] = {}
    uploads: list[Upload] = []
    try:
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if keep_files:
                    data = await asyncio.to_thread(value.file.read)
                    uploads.append(Upload(name, value.filename, value.content_type, data))
                continue
            if not isinstance(value, str):  # a part with a non-text Content-Type and no filename
                raw = bytes(value)
                try:
                    value = raw.decode("utf-8")
                except UnicodeDecodeError:
                    if keep_files:  # binary data with no filename (requests: files={name: (None, data, type)}): a file
                        uploads.append(Upload(name, "", "application/octet-stream", raw))
                        continue
                    raise InvalidRequest(f"Invalid '{_safe(name)}': the form field is not UTF-8 text.",
                                         param=_safe(name), code="invalid_multipart") from None
            if not _put_nested(fields, name, value):
                fields[name] = value  # a repeated field: the last one wins, as in JSON
    finally:
        for value in form.values():
            if isinstance(value, web.FileField):
                value.file.close()
    return {name: _indexed_lists(value) for name, value in fields.items()}, uploads


_SUBSCRIPT = re.compile(r"\[([^\[\]]*)\]")


def _put_nested(fields: dict[str, Any], name: str, value: str) -> bool:
    """A form field named in bracket notation, put where it belongs: the openai SDK writes a list or object
    of extra_body into a form so (`loras=[{"path": "a", "scale": 0.5}]` arrives as the fields `loras[][path]`
    and `loras[][scale]`), and read as names of their own they were lost (the LoRA silently not applied).
    `x[]` appends to the list x, `x[k]` sets key k of the object x, `x[][k]` sets k in the first object of
    the list x that has no k yet (a new one if all have). False for a name that is not bracket notation."""
    base, bracket, rest = name.partition("[")
    keys = _SUBSCRIPT.findall(bracket + rest)
    if (not base or "".join(f"[{k}]" for k in keys) != bracket + rest or not keys or len(keys) >= MAX_JSON_DEPTH
            or any(a == b == "" for a, b in zip(keys, keys[1:], strict=False))):  # (lists of lists: no)
        return False
    _put(fields, base, keys, value, name)
    return True


def _put(target: dict[str, Any], key: str, keys: list[str], value: str, name: str) -> None:
    if not keys:
        if isinstance(target.get(key), list | dict):
            raise _mixed(name)
        target[key] = value
        return
    sub, later = keys[0], keys[1:]
    held = target.setdefault(key, [] if sub == "" else {})
    if sub != "":
        if not isinstance(held, dict):
            raise _mixed(name)
        _put(held, sub, later, value, name)
    elif not isinstance(held, list):
        raise _mixed(name)
    elif not later:
        held.append(value)
    else:
        # The first object without this key takes it: the SDK sends a list's objects key by key (every
        # path, then every scale), other clients object by object; either way the i-th path is object i's.
        item = next((o for o in held if isinstance(o, dict) and not _has(o, later)), None)
        if item is None:
            item = {}
            held.append(item)
        _put(item, later[0], later[1:], value, name)


def _indexed_lists(value: Any) -> Any:
    """Objects keyed 0, 1, ... n-1 as the lists they stand for: other clients (qs, PHP, Rails) write a
    list's items as `loras[0][path]`, `loras[1][path]`, in any order."""
    if isinstance(value, list):
        return [_indexed_lists(item) for item in value]
    if not isinstance(value, dict):
        return value
    items = {k: _indexed_lists(v) for k, v in value.items()}
    if items and all(k.isdigit() and k.isascii() for k in items) and {int(k) for k in items} == set(range(len(items))):
        return [items[str(i)] for i in range(len(items))]
    return items


def _has(obj: Any, keys: list[str]) -> bool:
    """Whether obj already holds the value keys lead to."""
    for k in keys:
        if k == "" or not isinstance(obj, dict) or k not in obj:
            return False
        obj = obj[k]
    return True


def _mixed(name: str) -> InvalidRequest:
    base = _safe(name.partition("[")[0])
    return InvalidRequest(f"Invalid '{base}': the form sends it both as text and as a list or object "
                          f"('{_safe(name)}').", param=base, code="invalid_multipart")


def _parse_urlencoded(raw: bytes, charset: str | None) -> dict[str, str]:
    charset = charset or "utf-8"
    try:
        pairs = parse_qsl(raw.rstrip().decode(charset), keep_blank_values=True, encoding=charset,
                          errors="strict", max_num_fields=MAX_FORM_FIELDS)
    except ValueError as e:
        if "Max number of fields" in str(e):
            raise InvalidRequest(f"The application/x-www-form-urlencoded body has more than {MAX_FORM_FIELDS} "
                                 f"fields; at most {MAX_FORM_FIELDS} are accepted.", code="too_many_fields") from None
        raise InvalidRequest(f"The application/x-www-form-urlencoded body is malformed: {_reason(e)}.",
                             code="invalid_form") from None
    except LookupError as e:  # an unknown charset
        raise InvalidRequest(f"The application/x-www-form-urlencoded body is malformed: {_reason(e)}.",
                             code="invalid_form") from None
    return dict(pairs)


def _reason(e: Exception) -> str:
    if isinstance(e, web.RequestPayloadError) and isinstance(e.__cause__, HttpProcessingError):
        e = e.__cause__  # the parser's own words
    text = e.message if isinstance(e, HttpProcessingError) else str(e)
    if isinstance(e, HttpProcessingError) and ("'" in text or '"' in text):
        text = describe(e)  # the parser quotes the client's bytes: name the problem, not them
    text = _printable(" ".join(str(text).split())).rstrip(".")
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)
