"""parse_json_bytes' fast path (pydantic_core's parser) gives what the full path (json with the checks) gives,
and hands every odd body (NaN, huge numbers, lone surrogates, deep nesting, bad UTF-8...) to the full path."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.wire_json import (
    MAX_INT_DIGITS,
    MAX_JSON_DEPTH,
    _fast_json_object,
    _parse_json_text,
    parse_json_bytes,
)


def outcome(parse, raw: bytes) -> tuple:
    """What a parser makes of raw: the value (repr tells 1 from 1.0 and -0.0 from 0.0, and keeps key order)
    or the error as the client would see it."""
    try:
        return ("ok", repr(parse(raw)))
    except InvalidRequest as e:
        return ("error", e.status, e.message, e.param, e.code)


def assert_same_as_full_path(raw: bytes) -> None:
    fast = _fast_json_object(raw)
    if fast is not None:
        assert repr(fast) == repr(json.loads(raw.decode("utf-8"))), raw
    assert outcome(parse_json_bytes, raw) == outcome(_parse_json_text, raw), raw


scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text())
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=12), values, max_size=8), st.booleans(), st.sampled_from([None, 0, 2]),
       st.sampled_from([(", ", ": "), (",", ":"), (" ,\n", " :\t")]), st.integers(0, MAX_JSON_DEPTH + 8))
def test_the_fast_path_reads_json_as_the_full_path_does(obj, ascii_only, indent, separators, nesting):
    for _ in range(nesting):  # around the depth limit too
        obj = {"n": [obj]} if nesting % 2 else [obj]
    obj = obj if isinstance(obj, dict) else {"prompt": obj}
    raw = json.dumps(obj, ensure_ascii=ascii_only, indent=indent, separators=separators).encode("utf-8")
    fast = _fast_json_object(raw)
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH and b"\\u" not in raw:
        assert fast is not None  # plain JSON takes the fast path
    assert_same_as_full_path(raw)


# Pieces of JSON text, ordinary and odd, put together at random: most results are not JSON at all.
ODD = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1.5e99999", b"1" + b"0" * 400 + b".0", b"1e-400", b"-0",
       b"-0.0", b"9" * MAX_INT_DIGITS, b"9" * (MAX_INT_DIGITS + 1), b"-" + b"9" * (MAX_INT_DIGITS + 1),
       b'"\\ud800"', b'"\\udc00"', b'"\\ud83d\\ude00"', b'"\\ud800A"', b'"\\uD800\\uD800"', b'"\\u00e9"', b'"\\\\ud800"',
       b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82"', b'"caf\xc3\xa9"',
       b'"\x01"', b'"\\u0000"', b'"\x7f"', b"\xef\xbb\xbf", b"[" * (MAX_JSON_DEPTH - 1), b"]" * (MAX_JSON_DEPTH - 1),
       b"{" * MAX_JSON_DEPTH, b"[" * 300, b"]" * 300, b"01", b".5", b"1.", b"+1", b"\x0c", b"\xa0", b"true", b"null",
       b"1.7976931348623157e308", b"4.9e-324", b"123456789012345678901234567890", b" ", b"\n", b"\r\t"]
JSON_TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"a"', b'"prompt"', b'"b"', b"1", b"2.5", b'"x"', b'{"a": 1}']
pieces = st.lists(st.sampled_from(ODD + JSON_TOKENS), max_size=12).map(b"".join)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces, st.sampled_from(ODD + JSON_TOKENS))
@example(b"", b"NaN")
def test_odd_text_gets_what_the_full_path_gives(rest, odd):
    for raw in (b'{"a": ' + odd + b"}", b'{"a": [' + odd + b', "b"], "a": ' + odd + b"}", b"{" + rest + b"}", rest,
                b'{"prompt": "p", "x": ' + rest + b"}"):
        assert_same_as_full_path(raw)


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_any_bytes_get_what_the_full_path_gives(raw):
    assert_same_as_full_path(raw)
    assert_same_as_full_path(b'{"prompt": "' + raw + b'"}')


def deep(depth: int) -> bytes:
    return b'{"prompt": "x", "a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "n": NaN}',
    b'{"prompt": "x", "cfg_scale": Infinity}',
    b'{"prompt": "x", "cfg_scale": 1e400}',
    b'{"prompt": "x", "extra": [{"y": -1.5e99999}]}',
    b'{"prompt": "x", "seed": ' + b"9" * (MAX_INT_DIGITS + 1) + b"}",
    b'{"prompt": "x", "extra": [' + b"9" * (MAX_INT_DIGITS + 1) + b"]}",
    b'{"prompt": "a\\ud800"}',
    b'{"prompt": "a", "x": {"\\uDC00": 1}}',
    b'{"prompt": "\\ud83d\\ude00"}',  # a pair is fine, but read by the full path too
    deep(MAX_JSON_DEPTH + 1),
    b'\xef\xbb\xbf{"prompt": "x"}',
    b'{"prompt": "caf\xe9"}',
    b'{"prompt": "\xed\xa0\x80"}',
    b'{"prompt": "x"} trailing',
    b"",
    b"[1]",
])
def test_odd_bodies_take_the_full_path(raw):
    assert _fast_json_object(raw) is None
    assert outcome(parse_json_bytes, raw) == outcome(_parse_json_text, raw)


def test_what_the_full_path_makes_of_odd_bodies():
    assert parse_json_bytes(b'\xef\xbb\xbf{"prompt": "x", "prompt": "y"}') == {"prompt": "y"}
    assert parse_json_bytes(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}
    with pytest.raises(InvalidRequest, match="the number -1.5e99999 is too large"):
        parse_json_bytes(b'{"prompt": "x", "extra": [{"y": -1.5e99999}]}')
    with pytest.raises(InvalidRequest, match=f"a number has more than {MAX_INT_DIGITS} digits"):
        parse_json_bytes(b'{"prompt": "x", "extra": [' + b"9" * (MAX_INT_DIGITS + 1) + b"]}")


def test_ordinary_bodies_take_the_fast_path():
    raw = (b'{"model": "qwen-image", "prompt": "\xe4\xb8\x80\xe5\x8f\xaa\xe7\x8c\xab \\u00e9", "n": 2, "seed": -0, '
           b'"cfg_scale": 4.0, "loras": [{"path": "a", "scale": -0.0}], "x": {"y": [1, 1.5e300, null, true]}, '
           b'"big": ' + b"9" * MAX_INT_DIGITS + b"}")
    fast = _fast_json_object(raw)
    assert fast == json.loads(raw) and repr(fast) == repr(json.loads(raw))
    assert math.copysign(1, fast["loras"][0]["scale"]) == -1
    assert parse_json_bytes(raw) == fast
    assert _fast_json_object(deep(MAX_JSON_DEPTH)) == json.loads(deep(MAX_JSON_DEPTH))  # the limit is inclusive
