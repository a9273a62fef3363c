"""The response body of an image call: dumps_with_b64 / body_parts against plain json.dumps (property-tested)."""

from __future__ import annotations

import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.api.generations import SentAsIs, body_parts, dumps_with_b64
from proxy.state.shared import Answer

_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
# Text that could trip a splice: quotes, escapes, non-ASCII, and markers that look like the nonce.
_text = st.text(alphabet=st.sampled_from(list('ab "\\{}:,-0123456789\n\u00e9\u2603')), max_size=40)
_b64_text = st.text(alphabet=_B64, max_size=120)
# Each image's text as a provider hands it on: str, bytes, or a view of a larger body.
_image = _b64_text.flatmap(lambda t: st.sampled_from([t, t.encode(), memoryview(b"xx" + t.encode() + b"yy")[2:-2]]))
_item = st.fixed_dictionaries({"revised_prompt": _text}, optional={"b64_json": _image, "url": _text})


def _plain(value):
    return str(value, "ascii") if isinstance(value, (bytes, memoryview)) else value


@settings(max_examples=300, deadline=None)
@given(st.lists(_item, max_size=4), _text, st.integers())
def test_dumps_with_b64_is_json_dumps(items, size, created):
    payload = {"created": created, "data": items, "size": size}
    expected = {"created": created, "size": size,
                "data": [{k: _plain(v) for k, v in item.items()} for item in items]}
    body = dumps_with_b64(copy.copy(payload) | {"data": [dict(i) for i in items]})
    assert isinstance(body, bytes)
    assert json.loads(body) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(_item, max_size=4), _text)
def test_body_parts_are_the_json_with_each_image_as_it_came(items, size):
    payload = {"created": 1, "data": [dict(i) for i in items], "size": size}
    images = [item["b64_json"] for item in items if "b64_json" in item]
    parts = body_parts(payload)
    expected = {"created": 1, "size": size, "data": [{k: _plain(v) for k, v in item.items()} for item in items]}
    assert json.loads(b"".join(parts)) == expected
    # Bytes and views are handed on as the very objects (never copied); text is encoded once.
    for image in images:
        if not isinstance(image, str):
            assert any(part is image for part in parts)
    answer = Answer(200, parts)
    assert answer.whole().body == b"".join(parts)
    assert SentAsIs(parts).size == len(b"".join(parts))


class _Writer:
    def __init__(self):
        self.sent, self.headers_sent = [], False

    def send_headers(self):
        self.headers_sent = True

    async def write(self, chunk):
        self.sent.append(bytes(chunk))


async def test_sent_as_is_writes_the_pieces_in_order():
    image = memoryview(b"xx" + b"A" * 100_000 + b"yy")[2:-2]
    parts = body_parts({"created": 1, "data": [{"b64_json": image, "revised_prompt": "p"}]})
    writer = _Writer()
    await SentAsIs(parts).write(writer)
    assert b"".join(writer.sent) == b"".join(parts)
    assert writer.headers_sent  # a megabyte piece is never joined with the headers
    assert json.loads(b"".join(writer.sent))["data"][0]["b64_json"] == "A" * 100_000
