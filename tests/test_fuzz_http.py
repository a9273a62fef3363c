"""Fuzzing the running proxy over HTTP with hypothesis.

Whatever bytes arrive at /v1/images/generations, the answer is an OpenAI success (images that decode)
or an OpenAI error object with a 4xx status: never a 5xx, and nothing logged at ERROR. Bodies are
sent with a raw aiohttp session, so the bytes are exactly the ones drawn: JSON mixing real fields with
junk, random bytes under assorted Content-Types, and multipart forms assembled by hand.

Out of reach of the proxy and so not fuzzed: what aiohttp's HTTP parser refuses before any handler
runs (bad request lines and headers, a compressed body that breaks at its very end, "br" without
Brotli) gets aiohttp's own plain-text 400, logged by aiohttp.server at ERROR.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import string

import aiohttp
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from .conftest import base_config
from .fake_openai_upstream import SMALL_SIZES

MODEL = "qwen-image-placeholder"
# aiohttp warns about each malformed Content-Disposition it meets: expected here, by the hundred.
pytestmark = [pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionHeader"),
              pytest.mark.filterwarnings("ignore::aiohttp.multipart.BadContentDispositionParam")]
FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no example database in the checkout; a failure prints its reproduction blob
    print_blob=True,
    # One server per test, shared by its examples; drawing big bodies is expected.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.large_base_example],
)
KNOWN_FIELDS = [
    "prompt", "model", "negative_prompt", "seed", "n", "size", "aspect_ratio", "resolution", "response_format",
    "output_format", "output_compression", "quality", "background", "style", "moderation", "user", "cfg_scale",
    "num_inference_steps", "prompt_enhancement", "loras", "stream", "partial_images",
]


# ---- the server and what a good answer is ---------------------------------------------------------


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, url: str):
        self.session = session
        self.url = url

    async def post(self, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
        async with self.session.post(self.url, data=body, headers=headers,
                                     skip_auto_headers=["Content-Type"]) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.read()


@pytest.fixture
async def proxy(start_proxy, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"max_body_mb": 0.25}
    # Tiny images (at most 128x128) keep every success fast, whatever size was drawn.
    cfg["size_tables"]["small"] = {**copy.deepcopy(SMALL_SIZES), "max_pixels": 128 * 128}
    cfg["models"] = {MODEL: {"sizes": "small", "routes": ["placeholder"]}}
    server, client = await start_proxy(cfg)
    await client.close()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield Proxy(session, str(server.make_url("/v1/images/generations")))


def decode_image(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    im.load()
    assert im.width * im.height <= 128 * 128
    return im


async def check_answer(proxy: Proxy, status: int, ctype: str, body: bytes) -> None:
    """A 200 with images, or an OpenAI error object with a 4xx status."""
    assert status < 500, f"{status}: {body[:1000]!r}"
    event(f"status {status}")  # shown by --hypothesis-show-statistics
    if status == 200 and ctype.startswith("text/event-stream"):
        check_events(body)
    elif status == 200:
        payload = json.loads(body)
        assert isinstance(payload["data"], list) and payload["data"]
        for item in payload["data"]:
            if "b64_json" in item:
                decode_image(item["b64_json"])
            else:
                async with proxy.session.get(item["url"]) as r:
                    assert r.status == 200
                    im = Image.open(io.BytesIO(await r.read()))
                    im.load()
    else:
        assert 400 <= status < 500, f"{status}: {body[:1000]!r}"
        assert ctype.startswith("application/json"), f"{status} {ctype}: {body[:1000]!r}"
        err = assert_openai_error(json.loads(body))
        event(f"code {err['code']}")


def assert_openai_error(payload: dict) -> dict:
    assert set(payload) == {"error"}, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    assert "Traceback" not in err["message"]
    return err


def check_events(body: bytes) -> None:
    """OpenAI image streaming: completed (or partial) image events; an error event only for the client's fault."""
    events = [e for e in body.decode().split("\n\n") if e.strip() and not e.startswith(":")]
    assert events
    for sse in events:
        data = json.loads(next(line[6:] for line in sse.splitlines() if line.startswith("data: ")))
        if sse.startswith("event: error"):
            assert_openai_error(data)
            assert data["error"]["type"] == "invalid_request_error", data
        else:
            assert data["type"].startswith("image_generation."), data
            decode_image(data["b64_json"])


def no_errors_logged(caplog) -> None:
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    assert not errors, errors


# ---- strategies ------------------------------------------------------------------------------------

SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\ud83d", "x\ude00"])
ODD_TEXT = st.sampled_from(["", " ", "\x00", "a\x00b", "\ufeff", "\U0001f600", "\u202e", "\\", '"', "\r\n"])
TEXT = st.text(max_size=30) | SURROGATES | ODD_TEXT
HUGE = st.sampled_from([10**20, -(10**20), 2**64, 10**300, 10**4000, 1e308, -1e308, 5e-324])
LEAF = st.none() | st.booleans() | st.integers() | st.floats() | TEXT | HUGE
# Junk of any JSON shape (st.floats() includes NaN and infinities: json.dumps writes NaN, Infinity).
JUNK = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                    max_leaves=12)

PLAUSIBLE = {
    "prompt": st.text(min_size=1, max_size=40) | st.just("a red fox"),
    "model": st.sampled_from([MODEL, MODEL, "dall-e-3", "", "qwen-image"]),
    "negative_prompt": TEXT,
    "seed": st.integers(-5, 2**32 + 5) | st.sampled_from([0, 2**32 - 1]),
    "n": st.integers(-1, 12),
    "size": st.sampled_from(["64x64", "80x64", "64x80", "16:9", "9:16", "auto", "", "0x0", "1x1", "128x128",
                             "129x128", "99999x99999", "1:0", "0:1", "1:" + "9" * 400, "x", " 64 X 64 ",
                             "64x64x64", "9" * 400 + "x1"]),
    "aspect_ratio": st.sampled_from(["16:9", "1:1", "7:1", "0:0", "1:" + "9" * 400, "abc", "1.5:1"]),
    "resolution": st.sampled_from(["1K", "0.5K", "0.004", "0", "-1", "9" * 400 + "K", "4K", "x", "0.0000001"]),
    "response_format": st.sampled_from(["b64_json", "b64_json", "b64_json", "url", "URL", "file"]),
    "output_format": st.sampled_from(["png", "jpeg", "jpg", "webp", "gif", "avif", "bmp", "PNG"]),
    "output_compression": st.integers(-1, 101),
    "cfg_scale": st.floats(-1, 60),
    "num_inference_steps": st.integers(0, 600),
    "prompt_enhancement": st.sampled_from(["on", "off", True, "maybe"]),
    "loras": st.lists(st.fixed_dictionaries({"path": TEXT}, optional={"scale": st.floats()}), max_size=4) | TEXT,
    "stream": st.booleans() | st.sampled_from(["true", "yes", "maybe"]),
    "partial_images": st.integers(-1, 4),
}


def field_value(name: str):
    # Mostly plausible values, so that many requests succeed; sometimes junk of any shape.
    plausible = PLAUSIBLE.get(name, TEXT)
    return st.one_of(plausible, plausible, JUNK)


PROMPTS = st.just("a red fox") | st.text(min_size=1, max_size=40).filter(str.strip)
# Requests that could well succeed: a few plausible fields (some out of range), b64_json mostly.
CLEAN_OBJECTS = st.fixed_dictionaries(
    {"prompt": PROMPTS, "response_format": st.sampled_from(["b64_json", "b64_json", "url"])},
    optional={f: PLAUSIBLE[f] for f in ("model", "seed", "n", "size", "output_format", "negative_prompt", "stream",
                                        "cfg_scale", "num_inference_steps", "loras")},
)
# Anything goes: every field may be junk, unknown fields hold junk of any shape.
MIXED_OBJECTS = st.builds(
    lambda known, extra: {**extra, **known},
    st.fixed_dictionaries({"prompt": field_value("prompt"), "response_format": field_value("response_format")},
                          optional={f: field_value(f) for f in KNOWN_FIELDS if f not in ("prompt", "response_format")}),
    st.dictionaries(TEXT, JUNK, max_size=3),
)


def deep(depth: int, opener: str = "[", closer: str = "]") -> str:
    return '{"prompt": "x", "response_format": "b64_json", "a": ' + opener * depth + closer * depth + "}"


# JSON text that json.dumps would never write: deep nesting, giant numbers, lone surrogate escapes.
RAW_JSON = st.one_of(
    st.integers(1, 3000).map(deep),
    st.integers(1, 3000).map(lambda d: deep(d, '{"k": ', "}")),
    st.builds(lambda f, k: f'{{"prompt": "x", "{f}": {"9" * k}}}', st.sampled_from(["n", "seed", "cfg_scale", "x"]),
              st.sampled_from([1, 20, 309, 4300, 4301, 10_000])),
    st.builds(lambda f, esc: f'{{"prompt": "x", "response_format": "b64_json", "{f}": "a\\{esc}"}}',
              st.sampled_from(["prompt", "negative_prompt", "user", "size", "model", "extra"]),
              st.sampled_from(["ud800", "uDFFF", "udc00", "ud83d\\ude00", "u0000", "u001f"])),
    st.sampled_from(["NaN", "[]", "null", '"x"', "1e999", '{"prompt": "x", "n": 1e999}', '{"prompt": "x"} x',
                     '{"prompt": "x", "seed": -Infinity}', "{" * 100_000, '{"prompt": "x"' + ', "k": 1' * 5000 + "}"]),
)


def encode_json(value) -> bytes:
    text = json.dumps(value, ensure_ascii=False)
    # Lone surrogates are written as the bytes UTF-8 refuses (CESU-8 style): invalid UTF-8 on the wire.
    return text.encode("utf-8", "surrogatepass")


JSON_BODIES = st.one_of(
    CLEAN_OBJECTS.map(lambda o: json.dumps(o).encode()),
    CLEAN_OBJECTS.map(encode_json),
    MIXED_OBJECTS.map(lambda o: json.dumps(o).encode()),
    MIXED_OBJECTS.map(encode_json),
    JUNK.map(lambda v: json.dumps(v).encode()),
    RAW_JSON.map(str.encode),
)
JSON_TYPES = st.sampled_from(["application/json", "application/json", "application/json; charset=utf-8",
                              "text/plain", "application/x-www-form-urlencoded", None])

# A Content-Encoding header on the request: aiohttp decompresses before the proxy sees the body. Compressed
# bodies are only sent as the explicit examples below (broken from their first bytes): a body that
# breaks at its end (a truncated gzip stream) or "br" without the Brotli package is refused by aiohttp's
# HTTP parser itself, in plain text and logged at ERROR, before any handler or middleware runs.
ENCODINGS = st.sampled_from([None] * 6 + ["identity", "x"])
CONTENT_TYPES = st.one_of(
    st.sampled_from([
        None, "application/json", "application/json; charset=utf-16", "text/plain", "image/png",
        "application/octet-stream", "multipart/form-data", "multipart/form-data; boundary=x",
        'multipart/form-data; boundary="a b"', "multipart/form-data; boundary=" + "b" * 80,
        "multipart/mixed; boundary=x", "application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=bogus", "application/x-www-form-urlencoded; charset=utf-16",
        "application/x-www-form-urlencoded; charset=latin-1", "application/json; charset=", ";", "/", "a/b; c",
    ]),
    st.text(string.ascii_letters + string.digits + " /;=-\"'*%@<>?", max_size=40),
)
FRAGMENTS = st.sampled_from([b"{", b"}", b"[", b'"', b"\\", b":", b",", b"prompt", b'"prompt"', b"=", b"&", b"%",
                             b"%ff", b"--x\r\n", b"\r\n", b"\x00", b"\xff", b"\xed\xa0\x80", b"\xef\xbb\xbf", b"1e999",
                             b"NaN", b"-", b"9" * 5000])
RAW_BODIES = st.one_of(
    st.binary(max_size=300),
    st.lists(FRAGMENTS | st.binary(max_size=8), max_size=30).map(b"".join),
    JSON_BODIES,
)

# Multipart forms, assembled by hand: boundaries, part headers, encodings, truncation.
BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "
PART_HEADERS = st.sampled_from([
    "Content-Type: text/plain", "Content-Type: text/plain; charset=utf-8", "Content-Type: text/plain; charset=bogus",
    "Content-Type: text/plain; charset=utf-16", "Content-Type: text/plain; charset=latin-1",
    "Content-Type: application/json", "Content-Type: application/octet-stream", "Content-Type: image/png",
    "Content-Type: multipart/mixed; boundary=zz", "Content-Type: multipart/mixed",
    "Content-Transfer-Encoding: base64", "Content-Transfer-Encoding: quoted-printable",
    "Content-Transfer-Encoding: 8bit", "Content-Transfer-Encoding: rot13", "Content-Encoding: gzip",
    "Content-Length: 5", "no colon", ": empty name", "X-Long: " + "y" * 9000, "\x00: nul", "Content-Disposition: form-data",
])
FORM_NAMES = st.sampled_from(KNOWN_FIELDS + ["image", "mask", "_charset_", "", "n", "n"]) | st.text(max_size=8)
FORM_VALUES = st.one_of(
    st.sampled_from(["a red fox", "b64_json", "b64_json", "64x64", "16:9", "2", "0", "abc", "true", "yes", "png",
                     "webp", "-1", "9" * 5000, "", '[{"path": "a"}]', "[" * 3000, "\ud800", MODEL]).map(
        lambda s: s.encode("utf-8", "surrogatepass")),
    st.text(max_size=20).map(str.encode),
    st.binary(max_size=20),
)


@st.composite
def form_parts(draw) -> tuple[str, bytes, bytes]:
    name = draw(FORM_NAMES)
    raw_name = draw(st.one_of(st.just(name.encode("utf-8", "surrogatepass")), st.binary(max_size=6)))
    disposition = b'Content-Disposition: form-data; name="' + raw_name + b'"'
    if draw(st.integers(0, 5)) == 0:
        disposition += b'; filename="' + draw(st.sampled_from([b"a.png", b"", b"\xff.png", b"x"])) + b'"'
    headers = [disposition] if draw(st.integers(0, 9)) else []
    headers += [h.encode() for h in draw(st.lists(PART_HEADERS, max_size=2))]
    if draw(st.integers(0, 30)) == 0:
        headers *= 100  # too many headers
    return name, b"\r\n".join(headers), draw(FORM_VALUES)


def form_text(value) -> bytes:
    """How a form carries a value: text as it is, anything else as JSON text (true, 3, [...])."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.encode("utf-8", "surrogatepass")


def field_part(name: str, value: bytes) -> tuple[str, bytes, bytes]:
    return name, f'Content-Disposition: form-data; name="{name}"'.encode(), value


FORM_FIELDS = st.sampled_from(KNOWN_FIELDS).flatmap(
    lambda f: st.tuples(st.just(f), field_value(f).map(form_text)))


@st.composite
def multipart_requests(draw) -> tuple[bytes, str]:
    boundary = draw(st.text(BCHARS, min_size=1, max_size=70).filter(lambda b: not b.endswith(" ")))
    parts = []
    if draw(st.integers(0, 3)):
        parts += [field_part("prompt", form_text(draw(PROMPTS))), field_part("response_format", b"b64_json")]
    parts += [field_part(name, value) for name, value in draw(st.lists(FORM_FIELDS, max_size=4))]
    if draw(st.integers(0, 3)) == 0:
        parts += draw(st.lists(form_parts(), min_size=1, max_size=4))  # odd parts: headers, names, encodings
    parts = draw(st.permutations(parts))
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n" for _, head, value in parts)
    if draw(st.integers(0, 7)):
        body += b"--" + b + b"--\r\n"
    if draw(st.integers(0, 7)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # cut short
    if body and draw(st.integers(0, 7)) == 0:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([draw(st.integers(0, 255))]) + body[at + 1:]  # one byte changed
    declared = draw(st.sampled_from([boundary] * 12 + [f'"{boundary}"', "other", ""]))
    ctype = "multipart/form-data" if draw(st.integers(0, 30)) == 0 else f"multipart/form-data; boundary={declared}"
    return body, ctype


FORM_X = "multipart/form-data; boundary=x"


def headers_for(content_type: str | None) -> dict[str, str]:
    return {} if content_type is None else {"Content-Type": content_type}


# ---- the properties --------------------------------------------------------------------------------


@FUZZ
@given(body=JSON_BODIES, content_type=JSON_TYPES)
@example(body=b'{"prompt": "\\ud800", "response_format": "b64_json"}', content_type="application/json")
@example(body=b'{"prompt": "x", "negative_prompt": "\\udfff"}', content_type="application/json")
@example(body=b'{"prompt": "x", "loras": [{"path": "\\ud800"}]}', content_type="application/json")
@example(body=deep(1_000).encode(), content_type="application/json")
@example(body=b'{"prompt": "x", "n": 1e308}', content_type="application/json")
@example(body=b'{"prompt": "x", "seed": NaN}', content_type="application/json")
@example(body=b'{"prompt": "x", "seed": true}', content_type="application/json")
@example(body=b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", content_type="application/json")
@example(body=b'{"prompt": "x", "size": 64}', content_type="application/json")
@example(body=b'{"prompt": "x", "stream": "yes", "size": "64x64"}', content_type="application/json")
@example(body=b'{"prompt": "a\\u0000b", "response_format": "b64_json"}', content_type="application/json")
async def test_fuzz_json_bodies(proxy, caplog, body, content_type):
    await check_answer(proxy, *await proxy.post(body, headers_for(content_type)))
    no_errors_logged(caplog)


@FUZZ
@given(body=RAW_BODIES, content_type=CONTENT_TYPES, encoding=ENCODINGS)
@example(body=b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi", content_type=FORM_X, encoding=None)
@example(body=b"", content_type="multipart/form-data", encoding=None)
@example(body=b"\xff\xfe{}", content_type="application/json", encoding=None)
@example(body=b"prompt=%ff", content_type="application/x-www-form-urlencoded", encoding=None)
@example(body=b"prompt=x", content_type="application/x-www-form-urlencoded; charset=bogus", encoding=None)
@example(body=b"\x1f\x8b junk", content_type="application/json", encoding="gzip")
@example(body=b"--x\r\n\x1f\x8b junk", content_type=FORM_X, encoding="gzip")
@example(body=b"\xff" * 8, content_type="application/json", encoding="deflate")
@example(body=b"\xff" * 8, content_type=FORM_X, encoding="deflate")
@example(body=b"x" * 300_000, content_type="application/json", encoding=None)
@example(body=b'{"prompt": "x"}', content_type=";1FKf5ybrb12*", encoding=None)
async def test_fuzz_raw_bytes(proxy, caplog, body, content_type, encoding):
    headers = headers_for(content_type)
    if encoding is not None:
        headers["Content-Encoding"] = encoding
    await check_answer(proxy, *await proxy.post(body, headers))
    no_errors_logged(caplog)


@FUZZ
@given(form=multipart_requests())
@example(form=(b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi\r\n--x--\r\n", FORM_X))
@example(form=(b"--x\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nhi", FORM_X))
@example(form=(b"--x\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\nabc\r\n--x--\r\n", FORM_X))
@example(form=(b"--x\r\nContent-Disposition: form-data; name=\"pr\xffompt\"\r\n\r\nhi\r\n--x--\r\n", FORM_X))
@example(form=(b"--x\r\nbad header\r\n\r\nhi\r\n--x--\r\n", FORM_X))
async def test_fuzz_multipart_forms(proxy, caplog, form):
    body, content_type = form
    await check_answer(proxy, *await proxy.post(body, {"Content-Type": content_type}))
    no_errors_logged(caplog)
