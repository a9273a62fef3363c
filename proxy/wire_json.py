"""Client JSON and text read strictly: JSON object bodies, and every field's names and strings (check_values)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from pydantic_core import from_json

from .errors import InvalidRequest

# Client input limits. JSON nested deeper than this is refused (json.loads itself gives up near 1,000).
MAX_JSON_DEPTH = 64
# A JSON integer literal with more digits is refused (Python's own int() limit, with a clearer message).
MAX_INT_DIGITS = 4300
# JSON bodies above this are parsed off the event loop.
_THREAD_PARSE_BYTES = 1024 * 1024


def parse_json_bytes(raw: bytes) -> dict[str, Any]:
    """A JSON object body: strict UTF-8, finite numbers, at most MAX_JSON_DEPTH deep, no lone surrogates."""
    data = _fast_json_object(raw)
    return data if data is not None else _parse_json_text(raw)


def _fast_json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object in raw read by pydantic_core's parser (~5x json.loads on a small body), where it surely
    gives what _parse_json_text would; None for anything else (an error, a lone surrogate escape, deep
    nesting, a number _loads refuses), which then takes the full path with its exact messages."""
    if b"\\u" in raw and _SURROGATE_ESCAPE_BYTES.search(raw):
        return None
    try:
        # It refuses invalid UTF-8, a BOM, NaN and Infinity: those take the full path. cache_strings=False:
        # its cache would keep clients' strings after their request.
        data = from_json(raw, allow_inf_nan=False, cache_strings=False)
    except ValueError:
        return None
    return data if type(data) is dict and _within_limits(data) else None


def _within_limits(data: dict[str, Any]) -> bool:
    """Nothing in data nested over MAX_JSON_DEPTH deep, no float that overflowed to infinity (1e400) and no
    int of more than MAX_INT_DIGITS digits: what _loads refuses."""
    stack: list[tuple[Any, int]] = [(data.values(), 1)]  # the object itself is level 1
    while stack:
        values, depth = stack.pop()
        for v in values:
            if type(v) is str:
                continue
            if type(v) is float:
                if not math.isfinite(v):
                    return False
            elif type(v) is int:
                if not -_INT_LIMIT < v < _INT_LIMIT:
                    return False
            elif type(v) is dict or type(v) is list:
                if depth == MAX_JSON_DEPTH:
                    return False
                stack.append((v.values() if type(v) is dict else v, depth + 1))
    return True


def _parse_json_text(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise InvalidRequest(
            f"The request body is not valid JSON: it is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
            f"position {e.start}).", code="invalid_json") from None
    if not text or text.isspace():  # (not text.strip(): a copy of the whole body)
        raise InvalidRequest("The request body is empty; send a JSON object with a 'prompt'.", code="invalid_json")
    try:
        data = _loads(text)
    except ValueError as e:
        raise InvalidRequest(f"The request body is not valid JSON: {e}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Only a \uD800-\uDFFF escape makes a lone surrogate: strict UTF-8 text cannot hold one.
    if _SURROGATE_ESCAPE.search(text):
        check_values(data)
    return data


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89abcdefABCDEF]")
# A JSON int literal (no leading zeros) of more than MAX_INT_DIGITS digits is at least this large.
_INT_LIMIT = 10**MAX_INT_DIGITS
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number has more than {MAX_INT_DIGITS} digits")
    return int(text)


# One decoder with the hooks, built once: json.loads with them builds a new one (and its scanner) per call.
_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)


def _loads(text: str) -> Any:
    """json.loads without NaN, Infinity, numbers that overflow, giant ints or deep nesting (ValueError)."""
    if text.startswith("\ufeff"):  # as json.loads says it
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(f"it is nested more than {MAX_JSON_DEPTH} levels deep") from None
    # Each level needs a [ or {: only count when there could be enough of them.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"it is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in value (a scalar is 0), without recursion; stops past the limit."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list | tuple) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list | tuple))
    return deepest


def _printable(text: str) -> str:
    """Text from a client made encodable (lone surrogates as \\ud800-style escapes)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe(name: str) -> str:
    """A field name from a client, fit for a message and for `param`."""
    name = _printable(name)
    return name if len(name) <= 64 else name[:61] + "..."


def check_values(fields: dict[str, Any]) -> None:
    """Every name and string in fields is valid Unicode and nothing nests over MAX_JSON_DEPTH.

    A lone surrogate ("\\ud800" in JSON) cannot be encoded as UTF-8: it would break the image drawn,
    the JSON sent upstream or the tokenizer, so it is refused here with the field's name.
    """
    for key, value in fields.items():
        param = _safe(key) if isinstance(key, str) else str(key)
        if isinstance(key, str) and _SURROGATE.search(key):
            raise InvalidRequest(f"Invalid parameter name '{param}': contains invalid Unicode (a lone surrogate).",
                                 param=param)
        stack = [(value, param, 2)]  # the body itself is level 1
        while stack:
            v, path, depth = stack.pop()
            if isinstance(v, str):
                if _SURROGATE.search(v):
                    raise InvalidRequest(f"Invalid '{path}': contains invalid Unicode (a lone surrogate).",
                                         param=param)
                continue
            if isinstance(v, dict):
                items = [(k, c, f"{path}.{_safe(k) if isinstance(k, str) else k}") for k, c in v.items()]
            elif isinstance(v, list | tuple):
                items = [(None, c, f"{path}[{i}]") for i, c in enumerate(v)]
            else:
                continue
            if depth > MAX_JSON_DEPTH:
                raise InvalidRequest(f"Invalid '{param}': nested more than {MAX_JSON_DEPTH} levels deep.",
                                     param=param)
            for k, c, child_path in items:
                if isinstance(k, str) and _SURROGATE.search(k):
                    raise InvalidRequest(
                        f"Invalid '{child_path}': the name contains invalid Unicode (a lone surrogate).",
                        param=param)
                stack.append((c, child_path, depth + 1))
