"""ImageRequest: parsing and validation of every wire field, chunking and route defaults."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest, ProxyError
from proxy.http.body import Upload, read_body, read_fields
from proxy.request import (
    MAX_EXTRA_BYTES,
    MAX_PROMPT_CHARS,
    SEED_MAX,
    ImageRequest,
    LoraRef,
    build_request,
    parse_body,
    with_route_defaults,
)
from proxy.wire_json import MAX_JSON_DEPTH, parse_json_bytes


def invalid(fields: dict) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        parse_body(fields)
    assert e.value.status == 400
    assert e.value.type == "invalid_request_error"
    return e.value


def req_from(fields: dict, model: str = "qwen-image", width: int = 1024, height: int = 1024) -> ImageRequest:
    return build_request(parse_body(fields), model, width, height)


# --- prompt ------------------------------------------------------------------------------------------


def test_prompt_is_required():
    e = invalid({"n": 1})
    assert e.param == "prompt"
    assert e.message == "Missing required parameter: 'prompt'."


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_prompt_must_not_be_blank(prompt):
    e = invalid({"prompt": prompt})
    assert e.param == "prompt"
    assert "must not be empty" in e.message


@pytest.mark.parametrize("prompt", [5, None, ["a"], {"text": "a"}])
def test_prompt_must_be_a_string(prompt):
    assert invalid({"prompt": prompt}).param == "prompt"


def test_prompt_is_kept_verbatim():
    assert req_from({"prompt": "  a cat\n"}).prompt == "  a cat\n"


# --- n -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 5, 10, "3"])
def test_n_in_range(n):
    assert req_from({"prompt": "x", "n": n}).n == int(n)


def test_n_defaults_to_one():
    assert req_from({"prompt": "x"}).n == 1


@pytest.mark.parametrize("n", [0, 11, -1, 2.5, "many"])
def test_n_out_of_range(n):
    e = invalid({"prompt": "x", "n": n})
    assert e.param == "n"
    assert e.message.startswith("Invalid 'n'")


# --- seed ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 42, 2**31, SEED_MAX, "7"])
def test_seed_in_range(seed):
    assert req_from({"prompt": "x", "seed": seed}).seed == int(seed)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "x"])
def test_seed_out_of_range(seed):
    e = invalid({"prompt": "x", "seed": seed})
    assert e.param == "seed"
    assert e.message.startswith("Invalid 'seed'")


def test_seed_max_is_2_to_32_minus_one():
    assert SEED_MAX == 4294967295
    assert "4294967295" in invalid({"prompt": "x", "seed": 2**32}).message


# --- output fields -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["url", "b64_json"])
def test_response_format(fmt):
    assert req_from({"prompt": "x", "response_format": fmt}).response_format == fmt


def test_response_format_defaults_to_url():
    assert req_from({"prompt": "x"}).response_format == "url"


@pytest.mark.parametrize("fmt", ["file", "b64", "URL ", 1])
def test_bad_response_format(fmt):
    assert invalid({"prompt": "x", "response_format": fmt}).param == "response_format"


@pytest.mark.parametrize(
    "given, expected",
    [("png", "png"), ("jpeg", "jpeg"), ("jpg", "jpeg"), ("JPG", "jpeg"), ("WEBP", "webp"), ("gif", "gif"),
     ("avif", "avif"), (None, None)],
)
def test_output_format(given, expected):
    assert req_from({"prompt": "x", "output_format": given}).output_format == expected


@pytest.mark.parametrize("fmt", ["bmp", "tiff", "svg", 3])
def test_bad_output_format(fmt):
    e = invalid({"prompt": "x", "output_format": fmt})
    assert e.param == "output_format"


@pytest.mark.parametrize("value", [0, 50, 100, "80"])
def test_output_compression_in_range(value):
    assert req_from({"prompt": "x", "output_compression": value}).output_compression == int(value)


@pytest.mark.parametrize("value", [-1, 101, 50.5, "high"])
def test_output_compression_out_of_range(value):
    assert invalid({"prompt": "x", "output_compression": value}).param == "output_compression"


# --- seed page fields ------------------------------------------------------------------------------


def test_seed_page_fields_are_kept():
    req = req_from(
        {
            "prompt": "x",
            "negative_prompt": "blurry",
            "size": "16:9",
            "aspect_ratio": "4:3",
            "resolution": "1K",
            "cfg_scale": 4.5,
            "num_inference_steps": 30,
            "quality": "high",
            "background": "opaque",
            "style": "vivid",
            "moderation": "low",
            "user": "u-1",
            "stream": True,
            "partial_images": 2,
        },
        width=1365,
        height=768,
    )
    assert req.negative_prompt == "blurry"
    assert (req.size, req.aspect_ratio, req.resolution) == ("16:9", "4:3", "1K")
    assert (req.width, req.height, req.size_text) == (1365, 768, "1365x768")
    assert req.cfg_scale == 4.5
    assert req.num_inference_steps == 30
    assert (req.quality, req.background, req.style, req.moderation, req.user) == (
        "high", "opaque", "vivid", "low", "u-1")
    assert req.stream is True
    assert req.partial_images == 2
    assert req.extra == {}


@pytest.mark.parametrize("fields", [
    {"prompt": "x"},
    {"prompt": "a cat", "model": "other", "size": "64x64", "response_format": "b64_json", "n": 3, "seed": 7},
    {"prompt": "x", "negative_prompt": "blurry", "output_format": "jpg", "output_compression": 80, "quality": "high",
     "background": "opaque", "style": "vivid", "moderation": "low", "user": "u", "cfg_scale": 4, "stream": True,
     "num_inference_steps": 30, "prompt_enhancement": True, "loras": [{"path": "a.safetensors", "scale": 0.5}],
     "partial_images": 2, "input_fidelity": "high", "aspect_ratio": "16:9", "resolution": "1K", "extra_one": [1]},
])
def test_build_request_is_the_dataclass_built_from_the_fields(fields):
    body = parse_body(dict(fields))
    req = build_request(body, "qwen-image", 640, 480)
    names = [f.name for f in dataclasses.fields(ImageRequest)]
    assert sorted(vars(req)) == sorted(names)
    known = {**body.__dict__, "loras": tuple(body.loras or ())}
    del known["model"]
    expected = ImageRequest(**known, model="qwen-image", width=640, height=480, extra=dict(body.model_extra or {}))
    assert req == expected and repr(req) == repr(expected)
    assert req.images == () and req.mask is None and req.first_index == 0
    assert req.extra is not body.model_extra  # its own dict: route defaults and drops make new ones
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.prompt = "y"  # type: ignore[misc]
    assert dataclasses.replace(req, n=2) == dataclasses.replace(expected, n=2)


@pytest.mark.parametrize(
    "field, value",
    [("cfg_scale", -0.1), ("cfg_scale", 51), ("cfg_scale", "strong"), ("num_inference_steps", 0),
     ("num_inference_steps", 501), ("num_inference_steps", 2.5), ("partial_images", 4), ("partial_images", -1)],
)
def test_numeric_field_bounds(field, value):
    e = invalid({"prompt": "x", field: value})
    assert e.param == field
    assert e.message.startswith(f"Invalid '{field}'")


@pytest.mark.parametrize(
    "given, expected",
    [("on", "on"), ("off", "off"), ("ON", "on"), ("Off", "off"), (True, "on"), (False, "off"), (None, None)],
)
def test_prompt_enhancement(given, expected):
    assert req_from({"prompt": "x", "prompt_enhancement": given}).prompt_enhancement == expected


@pytest.mark.parametrize("value", ["maybe", "yes please", 2])
def test_bad_prompt_enhancement(value):
    assert invalid({"prompt": "x", "prompt_enhancement": value}).param == "prompt_enhancement"


# --- loras -------------------------------------------------------------------------------------------


def test_loras_as_a_list():
    req = req_from({"prompt": "x", "loras": [{"path": "a.safetensors", "scale": 0.5}, {"path": "b"}]})
    assert req.loras == (LoraRef(path="a.safetensors", scale=0.5), LoraRef(path="b", scale=1.0))
    assert isinstance(req.loras, tuple)


def test_loras_as_json_text_for_multipart():
    req = req_from({"prompt": "x", "loras": '[{"path": "https://h/x.safetensors", "scale": 0.8}]'})
    assert req.loras == (LoraRef(path="https://h/x.safetensors", scale=0.8),)


def test_three_loras_at_most():
    three = [{"path": f"l{i}"} for i in range(3)]
    assert len(req_from({"prompt": "x", "loras": three}).loras) == 3
    e = invalid({"prompt": "x", "loras": three + [{"path": "l3"}]})
    assert e.param == "loras"
    assert "at most 3" in e.message


def test_no_loras_is_an_empty_tuple():
    assert req_from({"prompt": "x"}).loras == ()


@pytest.mark.parametrize(
    "loras, in_message",
    [
        ("[{", "JSON array"),
        ("not json", "JSON array"),
        ([{"path": ""}], "loras[0].path"),
        ([{"scale": 1}], "loras[0].path"),
        ([{"path": "a", "weight": 1}], "loras[0].weight"),
        ([{"path": "a"}, {"path": "b", "scale": 11}], "loras[1].scale"),
        ({"path": "a"}, "'loras'"),
    ],
)
def test_bad_loras(loras, in_message):
    e = invalid({"prompt": "x", "loras": loras})
    assert e.param == "loras"
    assert in_message in e.message


# --- unknown fields -----------------------------------------------------------------------------


def test_unknown_fields_are_kept_in_extra():
    req = req_from({"prompt": "x", "watermark": True, "acceleration": "high", "go_fast": False,
                    "image_size": {"width": 3, "height": 4}})
    assert req.extra == {"watermark": True, "acceleration": "high", "go_fast": False,
                         "image_size": {"width": 3, "height": 4}}


def test_unknown_fields_that_shadow_internal_names_stay_extras():
    # width/height/extra are ImageRequest attributes, not wire fields: they must not set them.
    req = req_from({"prompt": "x", "width": 5, "height": 6, "extra": 1}, width=1024, height=768)
    assert (req.width, req.height) == (1024, 768)
    assert req.extra == {"width": 5, "height": 6, "extra": 1}


def test_model_argument_wins_over_the_body():
    req = req_from({"prompt": "x", "model": "dall-e-3"}, model="qwen-image")
    assert req.model == "qwen-image"
    assert "model" not in req.extra


def test_parse_body_rejects_a_non_object():
    for body in (["prompt"], "prompt", None):
        with pytest.raises(InvalidRequest) as e:
            parse_body(body)
        assert e.value.code == "invalid_json"


def test_error_renders_as_openai_json():
    e = invalid({"prompt": "x", "n": 0})
    assert e.to_dict() == {"error": {"message": e.message, "type": "invalid_request_error", "param": "n",
                                     "code": "invalid_value"}}


# --- parse_json_bytes --------------------------------------------------------------------------------


def test_parse_json_bytes():
    assert parse_json_bytes(b'{"prompt": "a cat", "n": 2}') == {"prompt": "a cat", "n": 2}


@pytest.mark.parametrize("raw, in_message", [
    (b"", "empty"),
    (b"   \n", "empty"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'"prompt"', "JSON object"),
])
def test_parse_json_bytes_errors(raw, in_message):
    with pytest.raises(InvalidRequest) as e:
        parse_json_bytes(raw)
    assert e.value.code == "invalid_json"
    assert e.value.status == 400
    assert in_message in e.value.message


# --- with_chunk ------------------------------------------------------------------------------------


def test_with_chunk_offsets_the_seed():
    req = req_from({"prompt": "x", "n": 7, "seed": 100})
    part = req.with_chunk(3, 4)
    assert (part.n, part.seed, part.first_index) == (3, 104, 4)
    assert (req.n, req.seed) == (7, 100)  # the original is untouched
    assert dataclasses.replace(part, n=7, seed=100, first_index=0) == req
    assert part.with_chunk(1, 2).first_index == 6  # a part of a part counts from the request's start


def test_with_chunk_wraps_at_2_to_32():
    req = req_from({"prompt": "x", "n": 4, "seed": SEED_MAX - 1})
    assert [req.with_chunk(1, i).seed for i in range(4)] == [SEED_MAX - 1, SEED_MAX, 0, 1]


def test_with_chunk_without_seed_keeps_none():
    req = req_from({"prompt": "x", "n": 4})
    assert req.with_chunk(2, 2).seed is None
    assert req.with_chunk(2, 2).n == 2


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10), st.integers(0, 9), st.one_of(st.none(), st.integers(0, SEED_MAX)), st.integers(0, 5))
def test_with_chunk_is_replace_with_the_offset_seed(n, offset, seed, first_index):
    """The whole request as its own chunk (no copy) is the same as the general rule."""
    req = dataclasses.replace(req_from({"prompt": "x", "n": 10, "seed": seed}), first_index=first_index)
    req = dataclasses.replace(req, n=n)
    expected = dataclasses.replace(req, n=n, seed=None if seed is None else (seed + offset) % (SEED_MAX + 1),
                                   first_index=first_index + offset)
    assert req.with_chunk(n, offset) == expected


# --- with_route_defaults ---------------------------------------------------------------------------


def test_route_defaults_fill_unset_fields_only():
    req = req_from({"prompt": "x", "negative_prompt": "mine", "seed": 3})
    out = with_route_defaults(req, {"negative_prompt": "route", "num_inference_steps": 20, "cfg_scale": 2.5,
                                    "seed": 9, "output_format": "webp"})
    assert out.negative_prompt == "mine"
    assert out.seed == 3
    assert out.num_inference_steps == 20
    assert out.cfg_scale == 2.5
    assert out.output_format == "webp"
    assert req.num_inference_steps is None  # the original is untouched


def test_route_defaults_do_not_override_set_defaults():
    # n and response_format always have a value: a route cannot change what the client gets.
    req = req_from({"prompt": "x"})
    out = with_route_defaults(req, {"n": 4, "response_format": "b64_json"})
    assert (out.n, out.response_format) == (1, "url")


def test_route_default_unknown_keys_become_extras_and_client_extras_win():
    req = req_from({"prompt": "x", "acceleration": "high"})
    out = with_route_defaults(req, {"acceleration": "none", "watermark": False})
    assert out.extra == {"acceleration": "high", "watermark": False}


def test_no_route_defaults_returns_the_request():
    req = req_from({"prompt": "x"})
    assert with_route_defaults(req, {}) is req


# --- numbers, booleans and odd types: always a 400 naming the field --------------------------------


@pytest.mark.parametrize("field", ["seed", "n", "output_compression", "num_inference_steps", "partial_images",
                                   "cfg_scale"])
@pytest.mark.parametrize("value", [True, False])
def test_a_boolean_is_not_a_number(field, value):
    e = invalid({"prompt": "x", field: value})
    assert e.param == field
    assert "not a boolean" in e.message


def test_a_boolean_lora_scale_is_refused():
    e = invalid({"prompt": "x", "loras": [{"path": "a", "scale": True}]})
    assert e.param == "loras"
    assert "loras[0].scale" in e.message


@pytest.mark.parametrize("field, value", [
    ("n", 1e308), ("n", -1e308), ("seed", 1e300), ("output_compression", 1e300), ("num_inference_steps", 1e20),
    ("n", 10**4000), ("seed", 10**400), ("cfg_scale", 10**4000), ("cfg_scale", 1e308),
    ("n", "9" * 5000), ("seed", "9" * 5000), ("cfg_scale", "9" * 5000), ("output_compression", "1" * 100),
    ("seed", math.nan), ("seed", math.inf), ("n", -math.inf), ("cfg_scale", math.nan), ("cfg_scale", math.inf),
    ("num_inference_steps", math.nan), ("partial_images", 1e10),
])
def test_huge_and_non_finite_numbers(field, value):
    e = invalid({"prompt": "x", field: value})
    assert e.param == field
    assert e.message.startswith(f"Invalid '{field}'")


def test_a_huge_whole_float_reads_as_out_of_range():
    assert "less than or equal to 10" in invalid({"prompt": "x", "n": 1e308}).message


def test_whole_floats_are_integers():
    req = req_from({"prompt": "x", "n": 2.0, "seed": 7.0, "num_inference_steps": 20.0})
    assert (req.n, req.seed, req.num_inference_steps) == (2, 7, 20)
    assert isinstance(req.n, int)


@pytest.mark.parametrize("field", ["size", "aspect_ratio", "resolution", "model", "negative_prompt", "user",
                                   "quality", "background", "style", "moderation"])
@pytest.mark.parametrize("value", [5, 1.5, True, [], ["64x64"], {"w": 1}])
def test_text_fields_must_be_strings(field, value):
    e = invalid({"prompt": "x", field: value})
    assert e.param == field
    assert "valid string" in e.message


@pytest.mark.parametrize("loras", [
    5, True, "x", "{}", '"a"', "[1]", "[[]]", '[{"path": 1}]', '[{"path": "a", "scale": NaN}]',
    '[{"path": "a", "scale": 1e999}]', "[" * 5000 + "]" * 5000, [[]], [None], [{"path": 1}], [{"path": None}],
    [{"path": ["a"]}], [{"path": "a", "scale": "big"}], [{"path": "a", "scale": math.nan}], {"0": {"path": "a"}},
])
def test_loras_of_the_wrong_shape(loras):
    e = invalid({"prompt": "x", "loras": loras})
    assert e.param == "loras"
    assert e.message.startswith("Invalid 'loras")


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("true", True), ("false", False),
                                             ("yes", True), ("0", False), (1, True)])
def test_stream_accepts_booleans_and_form_text(value, expected):
    assert req_from({"prompt": "x", "stream": value}).stream is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, 0.5, [], {}])
def test_bad_stream(value):
    assert invalid({"prompt": "x", "stream": value}).param == "stream"


def test_null_is_the_default_where_openai_allows_null():
    # OpenAI's reference: n, response_format and stream are "... or null"; null means not set.
    req = req_from({"prompt": "x", "n": None, "response_format": None, "stream": None})
    assert (req.n, req.response_format, req.stream) == (1, "url", False)


@pytest.mark.parametrize("field, value", [("n", "abc"), ("n", ""), ("n", "1.5"), ("seed", "-1"), ("seed", "0x10"),
                                          ("cfg_scale", "nan"), ("cfg_scale", "inf"), ("output_compression", " "),
                                          ("loras", "")])
def test_form_text_that_is_not_a_number(field, value):
    # Multipart forms carry every field as text.
    assert invalid({"prompt": "x", field: value}).param == field


def test_form_text_numbers():
    req = req_from({"prompt": "x", "n": "3", "seed": "42", "cfg_scale": "4.5", "stream": "true",
                    "num_inference_steps": "20"})
    assert (req.n, req.seed, req.cfg_scale, req.stream, req.num_inference_steps) == (3, 42, 4.5, True, 20)


def test_error_paths_name_list_positions_and_keys():
    e = invalid({"prompt": "x", "loras": [{"path": "a"}, {"path": "b", "0": 1}]})
    assert e.param == "loras"
    assert "'loras[1].0'" in e.message


# --- invalid Unicode and control characters ------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "model", "size", "aspect_ratio", "resolution",
                                   "user", "quality", "watermark"])
@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc80", "ok \ud83d"])
def test_lone_surrogates_are_refused(field, text):
    fields = {"prompt": "x", field: text}
    e = invalid(fields)
    assert e.param == field
    assert e.message == f"Invalid '{field}': contains invalid Unicode (a lone surrogate)."
    assert e.code == "invalid_value"
    json.dumps(e.to_dict(), ensure_ascii=False).encode()  # the message itself is valid UTF-8


@pytest.mark.parametrize("fields, param, in_message", [
    ({"prompt": "x", "loras": [{"path": "a\ud800"}]}, "loras", "'loras[0].path'"),
    ({"prompt": "x", "loras": [{"path": "a", "\ud800": 1}]}, "loras", "name contains invalid Unicode"),
    ({"prompt": "x", "image_size": {"a": [1, {"b": "\udc00"}]}}, "image_size", "'image_size.a[1].b'"),
    ({"prompt": "x", "tags": ["ok", "\ud800"]}, "tags", "'tags[1]'"),
    ({"prompt": "x", "\ud800": 1}, "\\ud800", "parameter name '\\ud800'"),
    ({"prompt": "x", "opts": {"k\udfff": 1}}, "opts", "'opts.k\\udfff'"),
])
def test_lone_surrogates_anywhere_are_refused(fields, param, in_message):
    e = invalid(fields)
    assert e.param == param
    assert in_message in e.message
    e.message.encode("utf-8")  # printable: the surrogate is shown as an escape


def test_surrogate_pairs_and_other_unicode_are_fine():
    prompt = "emoji \U0001f600, accents é, CJK 猫, RTL \u05d0, zero-width \u200b, BOM \ufeff, max \U0010ffff"
    assert req_from({"prompt": prompt}).prompt == prompt
    # json.loads joins an escaped pair into one character.
    assert parse_json_bytes(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


@pytest.mark.parametrize("prompt", ["a\x00b", "\x00", "tab\tnew\nline\rret", "\x1b[31mred\x7f", "\x0b\x0c\x1fa"])
def test_control_characters_are_kept(prompt):
    # JSON escapes them for upstreams, tokenizers and the placeholder's drawing cope: nothing to refuse.
    req = req_from({"prompt": prompt, "negative_prompt": prompt})
    assert (req.prompt, req.negative_prompt) == (prompt, prompt)


# --- unknown fields: they go upstream, so they are bounded -----------------------------------------------


def nested(depth: int):
    value: object = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


def test_extras_may_nest_up_to_the_limit():
    # The body is level 1, so an extra may hold MAX_JSON_DEPTH - 1 levels of containers.
    req = req_from({"prompt": "x", "deep": nested(MAX_JSON_DEPTH - 1)})
    assert req.extra["deep"] == nested(MAX_JSON_DEPTH - 1)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 200, 5000])
def test_extras_nested_too_deep_are_refused(depth):
    e = invalid({"prompt": "x", "deep": nested(depth)})
    assert e.param == "deep"
    assert f"nested more than {MAX_JSON_DEPTH} levels deep" in e.message


def test_extras_over_the_size_limit_are_refused():
    assert req_from({"prompt": "x", "blob": "a" * (MAX_EXTRA_BYTES - 100)}).extra["blob"]
    e = invalid({"prompt": "x", "small": 1, "blob": "a" * MAX_EXTRA_BYTES})
    assert e.param == "blob"
    assert str(MAX_EXTRA_BYTES) in e.message
    # Many small fields count together.
    e = invalid({"prompt": "x", **{f"f{i}": "v" * 100 for i in range(3000)}})
    assert "are passed on to upstreams" in e.message


def test_the_prompt_is_not_an_extra():
    # Unknown fields are capped together; the prompt has its own cap (OpenAI's), and is kept up to it.
    assert len(req_from({"prompt": "p" * MAX_PROMPT_CHARS}).prompt) == MAX_PROMPT_CHARS
    with pytest.raises(InvalidRequest, match=f"at most {MAX_PROMPT_CHARS} characters") as e:
        req_from({"prompt": "p" * (MAX_PROMPT_CHARS + 1)})
    assert e.value.param == "prompt"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, object(), {1, 2}, b"bytes", {"k": math.nan},
                                   [{(1, 2): "tuple key"}]])
def test_extras_must_be_json(value):
    # Possible from Python callers only: JSON bodies and forms cannot carry these.
    e = invalid({"prompt": "x", "odd": value})
    assert e.param == "odd"
    assert "must be a JSON value" in e.message


# --- parse_json_bytes: strict JSON ------------------------------------------------------------------


def deep_json(depth: int) -> bytes:
    return b'{"prompt": "x", "a": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("raw, in_message", [
    (b'{"prompt": "x", "n": NaN}', "NaN is not a JSON number"),
    (b'{"prompt": "x", "cfg_scale": Infinity}', "Infinity is not a JSON number"),
    (b'{"prompt": "x", "cfg_scale": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"prompt": "x", "cfg_scale": 1e400}', "too large"),
    (b'{"prompt": "x", "extra": [-1.5e99999]}', "too large"),
    (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
    (b'{"prompt": "x", "seed": -' + b"9" * 5000 + b"}", "more than 4300 digits"),
    (deep_json(MAX_JSON_DEPTH + 1), f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (deep_json(990), f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (deep_json(1_000), f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (deep_json(100_000), f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (b"[" * 100_000, f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (b'{"a": ' * 5_000, f"nested more than {MAX_JSON_DEPTH} levels deep"),
    (b'{"prompt": "caf\xe9"}', "not UTF-8 text (byte 0xe9 at position 15)"),
    (b'\xef\xbb\xbf\xef\xbb\xbf{"prompt": "x"}', "not valid JSON"),
    (b'{"prompt": "x"} trailing', "not valid JSON"),
    (b'{"prompt": "x",}', "not valid JSON"),
    (b"{'prompt': 'x'}", "not valid JSON"),
    (b"\x00", "not valid JSON"),
    (b"null", "JSON object"),
    (b"1e999", "too large"),
    (b'"\\ud800"', "JSON object"),
])
def test_parse_json_bytes_is_strict(raw, in_message):
    with pytest.raises(InvalidRequest) as e:
        parse_json_bytes(raw)
    assert e.value.code == "invalid_json"
    assert e.value.status == 400
    assert e.value.param is None
    assert in_message in e.value.message


def test_parse_json_bytes_limits_are_inclusive():
    assert parse_json_bytes(deep_json(MAX_JSON_DEPTH))["prompt"] == "x"
    assert parse_json_bytes(b'{"seed": ' + b"9" * 4300 + b"}")["seed"] == int("9" * 4300)
    assert parse_json_bytes(b'{"x": 1.7976931348623157e308}')["x"] == 1.7976931348623157e308


def test_parse_json_bytes_accepts_a_utf8_bom_and_duplicate_keys():
    assert parse_json_bytes(b'\xef\xbb\xbf{"prompt": "a", "prompt": "b"}') == {"prompt": "b"}


def test_parse_json_bytes_refuses_lone_surrogates_with_the_field():
    with pytest.raises(InvalidRequest) as e:
        parse_json_bytes(b'{"prompt": "a\\ud800", "n": 1}')
    assert e.value.param == "prompt"
    assert e.value.message == "Invalid 'prompt': contains invalid Unicode (a lone surrogate)."
    with pytest.raises(InvalidRequest) as e:
        parse_json_bytes(b'{"prompt": "a", "x": {"\\uDC00": 1}}')
    assert e.value.param == "x"


# --- read_fields over HTTP ---------------------------------------------------------------------------


def echo_app(client_max_size: int = 8 * 1024 * 1024) -> web.Application:
    """A tiny app answering what read_fields / read_body made of the body, or the error."""

    async def fields(request: web.Request) -> web.Response:
        try:
            got, raw = await read_fields(request)
        except ProxyError as e:
            return e.to_response()
        return web.json_response({"fields": got, "raw": None if raw is None else raw.decode("utf-8", "replace")})

    async def files(request: web.Request) -> web.Response:
        try:
            body = await read_body(request)
        except ProxyError as e:
            return e.to_response()
        assert all(isinstance(f, Upload) for f in body.files)
        return web.json_response({"fields": body.fields, "files": [
            [f.field, f.filename, f.content_type, f.data.decode("latin-1")] for f in body.files]})

    app = web.Application(client_max_size=client_max_size)
    app.router.add_post("/fields", fields)
    app.router.add_post("/files", files)
    return app


@pytest.fixture
async def echo(aiohttp_client):
    """echo(data, content_type=..., path="/fields", headers=None) -> (status, JSON answer)."""
    client = await aiohttp_client(echo_app())

    async def send(data: bytes, content_type: str | None = "application/json", path: str = "/fields",
                   headers: dict | None = None):
        hdrs = dict(headers or {})
        skip = ()
        if content_type is None:
            skip = ("Content-Type",)
        else:
            hdrs["Content-Type"] = content_type
        async with client.post(path, data=data, headers=hdrs, skip_auto_headers=skip) as r:
            return r.status, await r.json(content_type=None)

    return send


def assert_error(status: int, answer: dict, code: str, param=None) -> dict:
    assert status == 400
    err = answer["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error"
    assert err["code"] == code
    assert err["param"] == param
    return err


BOUNDARY = "qip-b0undary"


def part(name: str | bytes, value: bytes, *headers: str, filename: str | None = None) -> bytes:
    name = name if isinstance(name, bytes) else name.encode()
    disposition = b'Content-Disposition: form-data; name="' + name + b'"'
    if filename is not None:
        disposition += f'; filename="{filename}"'.encode()
    return b"\r\n".join([disposition, *(h.encode() for h in headers)]) + b"\r\n\r\n" + value


def multipart(*parts: bytes, boundary: str = BOUNDARY, end: bool = True) -> bytes:
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts)
    return body + (b"--" + b + b"--\r\n" if end else b"")


FORM = f"multipart/form-data; boundary={BOUNDARY}"


async def test_read_fields_json_keeps_the_raw_body(echo):
    raw = b'{"prompt": "a cat", "n": 2, "extra": {"k": [1, 2.5, null, true]}}'
    status, answer = await echo(raw)
    assert status == 200
    assert answer["fields"] == json.loads(raw)
    assert answer["raw"] == raw.decode()


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "text/plain", None,
                                          "application/octet-stream", "APPLICATION/JSON"])
async def test_read_fields_reads_json_whatever_the_label(echo, content_type):
    status, answer = await echo(b'{"prompt": "x"}', content_type)
    assert (status, answer["fields"]) == (200, {"prompt": "x"})


async def test_read_fields_reads_json_sent_as_a_form_by_curl(echo):
    status, answer = await echo(b'{"prompt": "x", "n": 2}', "application/x-www-form-urlencoded")
    assert (status, answer["fields"]) == (200, {"prompt": "x", "n": 2})


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe{}", b"[1]", b'{"n": NaN}', deep_json(100),
                                 deep_json(50_000), b'{"seed": ' + b"1" * 5000 + b"}"])
async def test_read_fields_bad_json_is_a_400(echo, raw):
    assert_error(*await echo(raw), code="invalid_json")


async def test_read_fields_lone_surrogate_is_a_400_naming_the_field(echo):
    err = assert_error(*await echo(b'{"prompt": "x", "negative_prompt": "\\udead"}'), code="invalid_value",
                       param="negative_prompt")
    assert err["message"] == "Invalid 'negative_prompt': contains invalid Unicode (a lone surrogate)."


async def test_read_fields_parses_a_big_json_body_off_the_loop(echo):
    raw = json.dumps({"prompt": "x", "pad": "p" * 1_100_000}).encode()
    status, answer = await echo(raw)
    assert status == 200 and len(answer["fields"]["pad"]) == 1_100_000
    assert_error(*await echo(raw[:-2]), code="invalid_json")


async def test_read_fields_urlencoded(echo):
    raw = b"prompt=a+red+fox&n=2&size=16%3A9&stream=true&empty=&prompt2=caf%C3%A9"
    status, answer = await echo(raw, "application/x-www-form-urlencoded")
    assert status == 200
    assert answer["fields"] == {"prompt": "a red fox", "n": "2", "size": "16:9", "stream": "true", "empty": "",
                                "prompt2": "café"}
    assert answer["raw"] == raw.decode()


@pytest.mark.parametrize("raw, content_type, code", [
    (b"prompt=caf%E9", "application/x-www-form-urlencoded", "invalid_form"),
    (b"prompt=\xff", "application/x-www-form-urlencoded", "invalid_form"),
    (b"prompt=x", "application/x-www-form-urlencoded; charset=bogus", "invalid_form"),
    (b"&".join(b"f%d=1" % i for i in range(1001)), "application/x-www-form-urlencoded", "too_many_fields"),
])
async def test_read_fields_bad_urlencoded_is_a_400(echo, raw, content_type, code):
    assert_error(*await echo(raw, content_type), code=code)


async def test_read_fields_multipart(echo):
    raw = multipart(part("prompt", "a café".encode()), part("n", b"3"),
                    part("loras", b'[{"path": "a"}]', "Content-Type: application/json"),
                    part("latin", "é".encode("latin-1"), "Content-Type: text/plain; charset=latin-1"),
                    part("image", b"\x89PNG\xff", "Content-Type: image/png", filename="a.png"),
                    part("n", b"4"))
    status, answer = await echo(raw, FORM)
    assert status == 200
    # The file part is ignored; a repeated field: the last wins; a JSON part is text.
    assert answer["fields"] == {"prompt": "a café", "n": "4", "loras": '[{"path": "a"}]', "latin": "é"}
    # The bytes as they came, for passthrough of a call for another model.
    assert answer["raw"] == raw.decode("utf-8", "replace")


async def test_read_body_keeps_the_file_parts(echo):
    raw = multipart(part("prompt", b"x"), part("image", b"\x89PNG\xff", "Content-Type: image/png", filename="a.png"),
                    part("image", b"GIF89a", filename="b.gif"))
    status, answer = await echo(raw, FORM, path="/files")
    assert status == 200
    assert answer == {"fields": {"prompt": "x"}, "files": [["image", "a.png", "image/png", "\x89PNG\xff"],
                                                           ["image", "b.gif", "application/octet-stream", "GIF89a"]]}


async def test_read_fields_the_openai_package_form(echo):
    # What aiohttp's FormData (and the openai package) send: no Content-Type on text fields.
    form = aiohttp.FormData()
    form.add_field("prompt", "a lighthouse")
    form.add_field("size", "64x64")
    form.add_field("image", b"\x89PNG", filename="in.png", content_type="image/png")
    writer = form()
    chunks = []

    class Sink:
        async def write(self, data):
            chunks.append(bytes(data))

    await writer.write(Sink())
    status, answer = await echo(b"".join(chunks), writer.content_type)
    assert (status, answer["fields"]) == (200, {"prompt": "a lighthouse", "size": "64x64"})


MALFORMED_MULTIPART = {
    "no boundary": (FORM.split(";")[0], multipart(part("prompt", b"x"))),
    "empty boundary": ("multipart/form-data; boundary=", multipart(part("prompt", b"x"))),
    "boundary too long": ("multipart/form-data; boundary=" + "b" * 71, multipart(part("prompt", b"x"), boundary="b" * 71)),
    "wrong boundary": (FORM, multipart(part("prompt", b"x"), boundary="other")),
    "empty body": (FORM, b""),
    "cut in the headers": (FORM, multipart(part("prompt", b"x"))[:30]),
    "cut in a value": (FORM, multipart(part("prompt", b"x" * 100))[:-40]),
    "no closing boundary": (FORM, multipart(part("prompt", b"x"), end=False)),
    "junk after a boundary": (FORM, b"--" + BOUNDARY.encode() + b"\r\n" + part("a", b"1") + b"\r\n--" +
                              BOUNDARY.encode() + b"junk\r\n"),
    "bad header line": (FORM, multipart(part("prompt", b"x", "no colon here"))),
    "header line too long": (FORM, multipart(part("prompt", b"x", "X-Long: " + "y" * 9000))),
    "too many headers": (FORM, multipart(part("prompt", b"x", *["X-H: 1"] * 200))),
    "unknown charset": (FORM, multipart(part("prompt", b"x", "Content-Type: text/plain; charset=bogus"))),
    "undecodable text": (FORM, multipart(part("prompt", b"caf\xe9", "Content-Type: text/plain; charset=utf-8"))),
    "bad utf-16": (FORM, multipart(part("prompt", b"\x00\xd8x", "Content-Type: text/plain; charset=utf-16-le"))),
    "bad base64": (FORM, multipart(part("prompt", b"abc", "Content-Transfer-Encoding: base64"))),
    "unknown transfer encoding": (FORM, multipart(part("prompt", b"x", "Content-Transfer-Encoding: rot13"))),
    "nested multipart": (FORM, multipart(part("prompt", b"x", "Content-Type: multipart/mixed; boundary=zz"))),
    "part without a name": (FORM, multipart(b"Content-Disposition: form-data\r\n\r\nx")),
    "part without headers": (FORM, multipart(b"\r\nx")),
    "bad _charset_": (FORM, multipart(part("_charset_", b"c" * 40), part("prompt", b"x"))),
    "undecodable _charset_": (FORM, multipart(part("_charset_", b"\xff"), part("prompt", b"x"))),
}


@pytest.mark.parametrize("content_type, raw", MALFORMED_MULTIPART.values(), ids=MALFORMED_MULTIPART.keys())
async def test_read_fields_malformed_multipart_is_a_400(echo, content_type, raw):
    err = assert_error(*await echo(raw, content_type), code="invalid_multipart")
    assert err["message"].startswith("The multipart/form-data body is malformed: ")


async def test_read_fields_binary_form_field_must_be_utf8(echo):
    raw = multipart(part("prompt", b"\xff\xfe", "Content-Type: application/octet-stream"))
    err = assert_error(*await echo(raw, FORM), code="invalid_multipart", param="prompt")
    assert "not UTF-8" in err["message"]
    raw = multipart(part("prompt", "ok é".encode(), "Content-Type: application/octet-stream"))
    assert (await echo(raw, FORM))[1]["fields"] == {"prompt": "ok é"}


async def test_read_fields_form_name_that_is_not_utf8_is_a_400(echo):
    # aiohttp reads header bytes that are not UTF-8 as lone surrogates.
    raw = multipart(part(b"pr\xffompt", b"x"))
    err = assert_error(*await echo(raw, FORM), code="invalid_value", param="pr\\udcffompt")
    assert "invalid Unicode" in err["message"]


@pytest.mark.parametrize("content_type, raw", [
    ("application/json", json.dumps({"prompt": "x" * 5000}).encode()),
    ("application/x-www-form-urlencoded", b"prompt=" + b"x" * 5000),
    (FORM, multipart(part("prompt", b"x" * 5000))),
    (FORM, multipart(part("image", b"x" * 5000, filename="a.png"))),
])
async def test_read_fields_over_the_size_limit_is_a_413(aiohttp_client, content_type, raw):
    client = await aiohttp_client(echo_app(client_max_size=1000))
    async with client.post("/fields", data=raw, headers={"Content-Type": content_type}) as r:
        assert r.status == 413


@pytest.mark.parametrize("content_type, raw, code", [
    ("application/json", b"\x1f\x8b not gzip", "invalid_body"),
    (FORM, b"--" + BOUNDARY.encode() + b"\r\n\x1f\x8b not gzip", "invalid_body"),  # read whole first: the gzip breaks there
])
async def test_read_fields_broken_compressed_body_is_a_400_and_logs_nothing(aiohttp_client, caplog, content_type,
                                                                           raw, code):
    client = await aiohttp_client(echo_app())
    headers = {"Content-Type": content_type, "Content-Encoding": "gzip"}
    async with client.post("/fields", data=raw, headers=headers) as r:
        err = assert_error(r.status, await r.json(), code=code)
    assert "Can not decode content-encoding: gzip" in err["message"]
    # After the answer aiohttp would read the rest of the body ("lingering") and log the error again.
    await asyncio.sleep(0.1)
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


@pytest.mark.parametrize("content_type", [";1FKf5ybrb12*", "utf-8''>?*0*@ ;1*0*", "multipart/form-data; ;a*"])
async def test_read_fields_unparseable_content_type_is_a_400(echo, content_type):
    # Python's email header parser, which aiohttp uses, raises IndexError on these.
    err = assert_error(*await echo(b'{"prompt": "x"}', content_type), code="invalid_content_type")
    assert "Content-Type header cannot be parsed" in err["message"]
