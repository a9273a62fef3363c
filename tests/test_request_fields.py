"""parse_fields reads a body of plain fields without pydantic, to the values and extras parse_body gives, and
hands everything else (unknown fields, other types, values to convert or refuse) to parse_body."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.request import (
    MAX_N,
    MAX_PROMPT_CHARS,
    _GenerationBody,
    _plain_values,
    build_request,
    parse_body,
    parse_fields,
    request_from,
)


def outcome(parse, fields: dict) -> tuple:
    try:
        values, extra = parse(dict(fields))
    except InvalidRequest as e:
        return ("error", e.status, e.message, e.param, e.code)
    return ("ok", {k: (type(v), v) for k, v in values.items()}, extra)


def by_pydantic(fields: dict, checked: bool = False) -> tuple[dict, dict]:
    body = parse_body(fields, checked=checked)
    return body.__dict__, body.model_extra or {}


def assert_same_as_pydantic(fields: dict) -> None:
    assert outcome(parse_fields, fields) == outcome(by_pydantic, fields), fields
    # As read_body hands them on: check_values ran already.
    assert (outcome(lambda f: parse_fields(f, checked=True), fields)
            == outcome(lambda f: by_pydantic(f, checked=True), fields)), fields


texts = st.sampled_from(["", " ", "\n\t", "a cat", " x ", "url", "b64_json", "URL", "64x64", "16:9", "1K", "jpg", "on",
                         "true", "1", "10", "\x00", "é", "\ud800"]) | st.text(max_size=6)
anything = (texts | st.none() | st.booleans() | st.integers(-3, MAX_N + 3) | st.sampled_from([2**70, -(2**70)])
            | st.floats(allow_nan=False) | st.sampled_from([1.0, 2.0, 0.5, float("nan"), float("inf")])
            | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
names = st.sampled_from([*_GenerationBody.model_fields, "extra_one", "Prompt", "", "background", "webhook_url"])


@settings(max_examples=2000, deadline=None)
@given(st.dictionaries(names, anything, max_size=6), texts | anything)
@example({}, "a cat")
@example({"n": True}, "x")
@example({"n": MAX_N + 1}, "x")
@example({"response_format": None}, "x")
@example({"size": 64}, "x")
@example({}, "p" * (MAX_PROMPT_CHARS + 1))
@example({"negative_prompt": "n" * (MAX_PROMPT_CHARS + 1)}, "x")
@example({"negative_prompt": "n" * MAX_PROMPT_CHARS}, "p" * MAX_PROMPT_CHARS)
def test_parse_fields_gives_what_parse_body_gives(fields, prompt):
    assert_same_as_pydantic(fields)
    assert_same_as_pydantic({**fields, "prompt": prompt})


@pytest.mark.parametrize("fields", [
    {"prompt": "a cat"},
    {"model": "qwen-image", "prompt": "a cat", "size": "64x64", "response_format": "b64_json"},
    {"prompt": " x", "n": MAX_N, "model": None, "negative_prompt": "", "aspect_ratio": "16:9", "resolution": "1K",
     "quality": "high", "background": "opaque", "style": "vivid", "moderation": "low", "user": "u",
     "response_format": "url"},
])
def test_plain_bodies_skip_pydantic(fields):
    values = _plain_values(fields)
    assert values is not None
    assert outcome(parse_fields, fields) == outcome(by_pydantic, fields)
    assert request_from(*parse_fields(fields), "m", 64, 32) == build_request(parse_body(fields), "m", 64, 32)


@pytest.mark.parametrize("fields", [
    {"prompt": "  "},
    {"prompt": 5},
    {"size": "64x64"},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "n": 2.0},
    {"prompt": "x", "n": True},
    {"prompt": "x", "n": None},
    {"prompt": "x", "response_format": None},
    {"prompt": "x", "response_format": "URL"},
    {"prompt": "x", "size": 64},
    {"prompt": "x", "seed": 1},
    {"prompt": "x", "output_format": "png"},
    {"prompt": "x", "stream": False},
    {"prompt": "x", "unknown": 1},
])
def test_other_bodies_are_read_by_pydantic(fields):
    assert _plain_values(fields) is None
    assert outcome(parse_fields, fields) == outcome(by_pydantic, fields)


def test_not_an_object_is_refused_as_before():
    for fields in ([], "x", None):
        with pytest.raises(InvalidRequest, match="must be a JSON object"):
            parse_fields(fields)  # type: ignore[arg-type]


def test_the_plain_path_knows_every_rule_of_its_fields():
    """_plain_values hand-codes the rules of prompt, response_format and n, and takes the other text fields
    as they are: a new validator, constraint or model-wide rule on any of them must be taught to it (or the
    field left to pydantic). This fails until it is."""
    decorators = _GenerationBody.__pydantic_decorators__
    assert not decorators.model_validators
    touching = {name: sorted(v.info.fields) for name, v in decorators.field_validators.items()
                if {"prompt", "negative_prompt", "response_format", "n"} & set(v.info.fields)}
    assert touching == {"_prompt_not_blank": ["prompt"], "_negative_prompt_not_too_long": ["negative_prompt"],
                        "_whole_number": ["n", "num_inference_steps", "output_compression", "partial_images", "seed"],
                        "_null_is_the_default": ["n", "response_format", "stream"]}
    fields = _GenerationBody.model_fields
    assert [repr(m) for m in fields["n"].metadata] == ["Ge(ge=1)", f"Le(le={MAX_N})"]
    assert not fields["prompt"].metadata and not fields["response_format"].metadata
    assert not fields["negative_prompt"].metadata
    assert _GenerationBody.model_config.get("str_strip_whitespace") is False
    assert not {"str_max_length", "str_min_length", "str_to_lower", "str_to_upper", "strict"} & set(
        _GenerationBody.model_config)
