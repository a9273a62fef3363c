"""ImageRequest: parsing and validation of every wire field, chunking and route defaults."""

from __future__ import annotations

import dataclasses

import pytest

from proxy.errors import InvalidRequest
from proxy.request import (
    SEED_MAX,
    ImageRequest,
    LoraRef,
    build_request,
    parse_body,
    parse_json_bytes,
    with_route_defaults,
)


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
    assert (part.n, part.seed) == (3, 104)
    assert (req.n, req.seed) == (7, 100)  # the original is untouched
    assert dataclasses.replace(part, n=7, seed=100) == req


def test_with_chunk_wraps_at_2_to_32():
    req = req_from({"prompt": "x", "n": 4, "seed": SEED_MAX - 1})
    assert [req.with_chunk(1, i).seed for i in range(4)] == [SEED_MAX - 1, SEED_MAX, 0, 1]


def test_with_chunk_without_seed_keeps_none():
    req = req_from({"prompt": "x", "n": 4})
    assert req.with_chunk(2, 2).seed is None
    assert req.with_chunk(2, 2).n == 2


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
