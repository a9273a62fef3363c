"""The response body of an image call: dumps_with_b64 against plain json.dumps (property-tested)."""

from __future__ import annotations

import copy
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.api.generations import dumps_with_b64

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
