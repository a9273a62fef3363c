"""JSON to and from bytes through pydantic_core's codec (Rust), the standard library's json where it refuses.

On the small JSON of every image call (the upstream request, the skeleton of its answer, the response
around the images) pydantic_core takes 0.4 us where json.dumps / json.loads take 2-2.5 us. Its refusals
fall back to json, so what json takes still goes through exactly as before: a lone surrogate (to_json
refuses to write one, json.dumps writes its escape; from_json refuses "\\ud800", json.loads reads it),
a byte order mark, UTF-16 text, nesting over 200 levels.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json, to_json


def dumps(value: Any) -> bytes:
    """The JSON text of value as UTF-8 bytes: compact, non-ASCII as UTF-8, NaN and Infinity as json.dumps
    writes them; json.dumps (ASCII, its escapes) for what to_json refuses."""
    try:
        return to_json(value, inf_nan_mode="constants")
    except ValueError:  # PydanticSerializationError: a lone surrogate, a type json.dumps may refuse too
        return json.dumps(value).encode()


def loads(raw: bytes) -> Any:
    """json.loads(raw): the same values and the same errors (ValueError: not JSON)."""
    try:
        return from_json(raw, cache_strings=False)  # no process-wide cache of strings the upstream sent
    except ValueError:
        return json.loads(raw)
