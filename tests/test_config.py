"""models.yaml -> Config: variable expansion, missing credentials, clear errors, the repo's own file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from proxy.config import ConfigError, expand_env, load_config, parse_config
from proxy.providers import provider_class
from proxy.providers.openai_compat import OpenAICompatProvider
from proxy.providers.placeholder import PlaceholderProvider

from .conftest import QWEN_1K

REPO_MODELS_YAML = Path(__file__).resolve().parent.parent / "models.yaml"


def minimal(**overrides) -> dict:
    cfg = {
        "providers": {
            "up": {"kind": "openai", "base_url": "https://up.example/v1", "api_key": "${UP_KEY}"},
            "placeholder": {"kind": "placeholder"},
        },
        "size_tables": {"qwen-image": copy.deepcopy(QWEN_1K)},
        "models": {"x": {"sizes": "qwen-image", "routes": [{"provider": "up", "model": "qwen-image"}, "placeholder"]}},
    }
    cfg.update(overrides)
    return cfg


def config_error(data, env=None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, env=env or {})
    return str(e.value)


def openai_provider(config, name="up") -> OpenAICompatProvider:
    return OpenAICompatProvider(name, config.providers[name].options, config.missing_vars.get(name))


# --- ${VAR} expansion ------------------------------------------------------------------------------


def test_expand_env_forms():
    missing: set[str] = set()
    env = {"A": "alpha", "EMPTY": ""}
    tree = {"a": "${A}", "b": "x-${A}-${A:-no}-y", "c": "${B:-bee}", "d": ["${A}", {"e": "${NOPE}"}],
            "f": "${EMPTY:-fallback}", "g": "${B:-}", "n": 5, "t": True, "no": "$A and {A}"}
    out = expand_env(tree, env, missing)
    assert out == {"a": "alpha", "b": "x-alpha-alpha-y", "c": "bee", "d": ["alpha", {"e": ""}],
                   "f": "fallback", "g": "", "n": 5, "t": True, "no": "$A and {A}"}
    # only a variable without a default is missing; a default (even empty) is a deliberate choice
    assert missing == {"NOPE"}


def test_expansion_feeds_typed_fields():
    cfg = parse_config(
        {"server": {"port": "${PORT:-9001}", "host": "${HOST}", "api_keys": ["${KEY1}", "${KEY2:-}"],
                    "public_base_url": "${PUBLIC:-}"}},
        env={"HOST": "0.0.0.0", "KEY1": "sk-1"},
    )
    assert cfg.server.port == 9001
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.api_keys == ["sk-1"]  # the empty key is dropped, not accepted as a key
    assert cfg.server.public_base_url is None


def test_env_defaults_to_os_environ(monkeypatch):
    monkeypatch.setenv("QIP_TEST_PORT", "8123")
    assert parse_config({"server": {"port": "${QIP_TEST_PORT}"}}).server.port == 8123


def test_provider_key_from_the_environment():
    cfg = parse_config(minimal(), env={"UP_KEY": "sk-secret"})
    assert cfg.providers["up"].options["api_key"] == "sk-secret"
    assert cfg.missing_vars == {}
    assert openai_provider(cfg).unavailable_reason is None


def test_missing_provider_variable_is_recorded_not_fatal():
    cfg = parse_config(minimal(), env={})
    assert cfg.missing_vars == {"up": ["UP_KEY"]}
    provider = openai_provider(cfg)
    reason = provider.unavailable_reason
    assert reason is not None
    assert "UP_KEY" in reason
    assert provider.describe()["ready"] is False
    # the other provider is untouched
    assert PlaceholderProvider("placeholder", cfg.providers["placeholder"].options).unavailable_reason is None


def test_missing_vars_are_per_provider_and_sorted():
    data = minimal()
    data["providers"]["two"] = {"kind": "openai", "base_url": "${Z_URL}", "api_key": "${B_KEY}",
                                "extra": ["${A_VAR}"]}
    cfg = parse_config(data, env={"UP_KEY": "k"})
    assert cfg.missing_vars == {"two": ["A_VAR", "B_KEY", "Z_URL"]}
    assert openai_provider(cfg, "two").unavailable_reason == "no base_url configured"


def test_missing_variable_outside_providers_is_not_a_provider_problem():
    cfg = parse_config(minimal(store={"path": "${STORE_DIR}/img"}), env={"UP_KEY": "k"})
    assert cfg.store.path == "/img"
    assert cfg.missing_vars == {}


def test_key_not_required():
    data = minimal()
    data["providers"]["up"]["api_key_required"] = False
    cfg = parse_config(data, env={})
    assert openai_provider(cfg).unavailable_reason is None


def test_key_missing_without_a_variable_names_the_setting():
    data = minimal()
    del data["providers"]["up"]["api_key"]
    reason = openai_provider(parse_config(data, env={})).unavailable_reason
    assert reason is not None and "api_key" in reason


# --- errors ----------------------------------------------------------------------------------------


def test_bad_yaml(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: [unclosed\n  - : :\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert "not valid YAML" in str(e.value)
    assert str(path) in str(e.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml", env={})
    assert "cannot read" in str(e.value)


def test_empty_file_is_an_empty_config(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("")
    cfg = load_config(path, env={})
    assert cfg.models == {} and cfg.server.port == 8000


def test_top_level_must_be_a_mapping():
    assert "mapping" in config_error(["a", "b"])


def test_unknown_provider_in_a_route():
    data = minimal()
    data["models"]["x"]["routes"] = ["placeholder", "ghost"]
    msg = config_error(data)
    assert "models.x.routes.1" in msg
    assert "'ghost'" in msg


def test_unknown_size_table():
    data = minimal()
    data["models"]["x"]["sizes"] = "nope"
    msg = config_error(data)
    assert "models.x.sizes" in msg
    assert "'nope'" in msg


@pytest.mark.parametrize(
    "table, in_message",
    [
        ({"default": "1024x1024", "tiers": {"1K": {"1:1": "big"}}}, "'big'"),
        ({"default": "huge", "tiers": {"1K": {"1:1": "1024x1024"}}}, "'huge'"),
        ({"default": "0x0", "tiers": {"1K": {"1:1": "1024x1024"}}}, "'0x0'"),
        ({"default": "0x100", "tiers": {"1K": {"1:1": "0x100"}}}, "'0x100'"),
        ({"default": "64x64", "tiers": {"1K": {"1:1": "64x64", "16:9": "20000x100"}}}, "'20000x100'"),
        ({"default": "64x64", "max_side": 100, "tiers": {"1K": {"1:1": "64x64", "16:9": "128x72"}}}, "'128x72'"),
        ({"default": "64x64", "tiers": {"1K": {"wide": "64x64"}}}, "'wide'"),
        ({"default": "64x64", "tiers": {"big": {"1:1": "64x64"}}}, "'big'"),
        ({"default": "64x64", "tiers": {}}, "at least one tier"),
    ],
)
def test_bad_size_tables(table, in_message):
    msg = config_error(minimal(size_tables={"qwen-image": table}), env={"UP_KEY": "k"})
    assert in_message in msg


def test_inline_size_table():
    data = minimal()
    data["models"]["x"]["sizes"] = {"default": "64x64", "tiers": {"1K": {"1:1": "64x64", "16:9": "112x64"}}}
    cfg = parse_config(data, env={})
    assert cfg.size_table("x").tiers == {"1K": {"1:1": (64, 64), "16:9": (112, 64)}}


def test_numeric_tier_labels_from_yaml(tmp_path):
    # An unquoted megapixel tier (`0.25:`) arrives from YAML as a number.
    path = tmp_path / "models.yaml"
    path.write_text(
        "providers: {p: {kind: placeholder}}\n"
        "size_tables:\n  t:\n    default: 64x64\n    tiers:\n      0.004: {'1:1': 64x64}\n      1: {'1:1': 1024x1024}\n"
        "models: {m: {sizes: t, routes: [p]}}\n"
    )
    table = load_config(path, env={}).size_table("m")
    assert set(table.tiers) == {"0.004", "1"}


@pytest.mark.parametrize(
    "route, where",
    [
        (5, "models.x.routes.0"),
        ({"provider": 5}, "models.x.routes.0.provider"),
        ({"provider": "placeholder", "timeout": "soon"}, "models.x.routes.0.timeout"),
        ({"provider": "placeholder", "timeout": 0}, "models.x.routes.0.timeout"),
        ({"provider": "placeholder", "max_images_per_call": 0}, "models.x.routes.0.max_images_per_call"),
        ({"provider": "placeholder", "typo": 1}, "models.x.routes.0.typo"),
    ],
)
def test_wrong_route_types_name_the_path(route, where):
    data = minimal()
    data["models"]["x"]["routes"] = [route]
    assert where in config_error(data)


@pytest.mark.parametrize(
    "overrides, where",
    [
        ({"server": {"port": "eighty"}}, "server.port"),
        ({"server": {"api_keys": "sk-1"}}, "server.api_keys"),
        ({"store": {"ttl_seconds": 0}}, "store.ttl_seconds"),
        ({"store": {"kind": "ftp"}}, "store.kind"),
        ({"bogus": 1}, "bogus"),
        ({"providers": {"p": {"base_url": "x"}}}, "providers.p.kind"),
    ],
)
def test_wrong_types_elsewhere_name_the_path(overrides, where):
    data = minimal(**overrides)
    if "providers" in overrides:
        data["models"] = {}
    assert where in config_error(data)


def test_model_needs_a_route():
    data = minimal()
    data["models"]["x"]["routes"] = []
    assert "models.x.routes" in config_error(data)


def test_route_shorthand():
    cfg = parse_config(minimal(), env={"UP_KEY": "k"})
    routes = cfg.models["x"].routes
    assert [r.provider for r in routes] == ["up", "placeholder"]
    assert routes[0].model == "qwen-image"
    assert routes[1].model is None and routes[1].params == {} and routes[1].timeout is None


# --- provider kinds ----------------------------------------------------------------------------------


def test_provider_class_known_and_unknown():
    assert provider_class("openai") is OpenAICompatProvider
    assert provider_class("placeholder") is PlaceholderProvider
    with pytest.raises(ConfigError) as e:
        provider_class("dall-e")
    assert "'dall-e'" in str(e.value)
    assert "openai" in str(e.value)


# --- the repo's own models.yaml ------------------------------------------------------------------------


def test_repo_models_yaml_loads_with_an_empty_environment():
    cfg = load_config(REPO_MODELS_YAML, env={})
    assert {"qwen-image", "qwen-image-placeholder", "qwen-image-tiny"} <= set(cfg.models)
    assert cfg.server.port == 8000
    assert cfg.server.host == "127.0.0.1"
    assert cfg.server.api_keys == []
    assert cfg.passthrough.enabled is False
    assert cfg.missing_vars == {"lumenfall": ["LUMENFALL_API_KEY"]}

    assert [r.provider for r in cfg.models["qwen-image"].routes] == ["lumenfall", "local-gpu"]
    assert [r.provider for r in cfg.models["qwen-image-placeholder"].routes] == ["placeholder"]
    assert [r.provider for r in cfg.models["qwen-image-tiny"].routes] == ["local-tiny"]

    table = cfg.size_table("qwen-image")
    assert table.tiers["1K"] == {
        "1:1": (1024, 1024), "4:3": (1183, 887), "3:4": (887, 1182), "2:3": (836, 1254),
        "3:2": (1254, 836), "9:16": (768, 1365), "16:9": (1365, 768),
    }
    assert table.default == (1024, 1024)
    assert cfg.size_table("qwen-image-tiny").default == (64, 64)

    # the lumenfall provider is reported unusable, naming the variable (the local provider is not built)
    lumenfall = OpenAICompatProvider("lumenfall", cfg.providers["lumenfall"].options,
                                     cfg.missing_vars.get("lumenfall"))
    assert "LUMENFALL_API_KEY" in lumenfall.unavailable_reason


def test_repo_models_yaml_with_a_key_and_overrides():
    cfg = load_config(REPO_MODELS_YAML, env={"LUMENFALL_API_KEY": "lf-123", "QIP_PORT": "9999",
                                             "QIP_API_KEY": "proxy-key"})
    assert cfg.missing_vars == {}
    assert cfg.server.port == 9999
    assert cfg.server.api_keys == ["proxy-key"]
    assert OpenAICompatProvider("lumenfall", cfg.providers["lumenfall"].options).unavailable_reason is None
