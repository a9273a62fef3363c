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
                                "output_formats": ["${A_VAR}"]}
    cfg = parse_config(data, env={"UP_KEY": "k"})
    assert cfg.missing_vars == {"two": ["A_VAR", "B_KEY", "Z_URL"]}
    assert openai_provider(cfg, "two").unavailable_reason == (
        "no base_url configured (unset in this provider: A_VAR, B_KEY, Z_URL)")


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
    assert cfg.missing_vars == {"lumenfall": ["LUMENFALL_API_KEY"], "fal": ["FAL_KEY"],
                                "replicate": ["REPLICATE_API_TOKEN"], "dashscope": ["DASHSCOPE_API_KEY"],
                                "dashscope-new": ["DASHSCOPE_API_KEY"]}

    assert [r.provider for r in cfg.models["qwen-image"].routes] == [
        "lumenfall", "fal", "replicate", "dashscope", "local-gpu"]
    assert cfg.models["qwen-image-edit"].max_input_images == 3
    assert [r.provider for r in cfg.models["qwen-image-placeholder"].routes] == ["placeholder"]
    assert [r.provider for r in cfg.models["qwen-image-tiny"].routes] == ["local-tiny"]

    # Shipped prices: only ones read on the vendor's own page, each with that page and the date read;
    # the routes whose vendor page showed none stay unpriced (cost null).
    priced = {(name, r.provider, r.model): r.price for name, m in cfg.models.items() for r in m.routes
              if r.price is not None}
    assert set(priced) == {("qwen-image", "lumenfall", "qwen-image")}
    lumenfall_price = priced["qwen-image", "lumenfall", "qwen-image"]
    assert lumenfall_price.per_image == 0.02 and lumenfall_price.currency == "USD"
    assert lumenfall_price.source == "https://lumenfall.ai/models/alibaba/qwen-image/api, read 2026-12-07"

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
                                             "QIP_API_KEY": "proxy-key", "FAL_KEY": "f", "DASHSCOPE_API_KEY": "d",
                                             "REPLICATE_API_TOKEN": "r"})
    assert cfg.missing_vars == {}
    assert cfg.server.port == 9999
    assert cfg.server.api_keys == ["proxy-key"]
    assert OpenAICompatProvider("lumenfall", cfg.providers["lumenfall"].options).unavailable_reason is None


# --- strictness: unknown keys, types, kinds, references (one line per problem) -------------------------


def lines_of(data, env=None) -> list[str]:
    return config_error(data, env).splitlines()


def with_value(path: str, value) -> dict:
    """minimal() with the key at a dotted path set (a local tiny provider 'loc' is there too)."""
    data = minimal()
    data["providers"]["loc"] = {"kind": "diffusers", "model": "tiny", "device": "cpu"}
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[last] = value
    return data


@pytest.mark.parametrize(
    "path, suggestion",
    [
        ("modles", "models"),
        ("server.prot", "port"),
        ("server.shutdown_grce", "shutdown_grace"),
        ("store.pth", "path"),
        ("passthrough.base_ulr", "base_url"),
        ("routing.retires", "retries"),
        ("routing.breaker_treshold", "breaker_threshold"),
        ("size_tables.qwen-image.defualt", "default"),
        ("models.x.descripton", "description"),
        ("models.x.routes.0.timout", "timeout"),
        ("models.x.routes.0.retrys", "retries"),
        ("providers.up.api_kye", "api_key"),
        ("providers.up.timout", "timeout"),
        ("providers.up.max_image_per_call", "max_images_per_call"),
        ("providers.up.knd", "kind"),
        ("providers.placeholder.timout", "timeout"),
        ("providers.loc.modle", "model"),
        ("providers.loc.load_in_backgroud", "load_in_background"),
        ("providers.loc.lora_dir", "lora_dirs"),
    ],
)
def test_unknown_keys_name_the_path_and_suggest_the_nearest(path, suggestion):
    assert lines_of(with_value(path, 1)) == [f"config: {path}: unknown key; did you mean '{suggestion}'?"]


def test_unknown_key_without_a_near_one_lists_the_known_keys():
    assert lines_of(with_value("providers.placeholder.colour", "red")) == [
        "config: providers.placeholder.colour: unknown key; known keys: kind, timeout"]


def test_unknown_key_in_an_inline_size_table_is_one_line():
    data = minimal()
    data["models"]["x"]["sizes"] = {"defualt": "64x64", "tiers": {"1K": {"1:1": "64x64"}}}
    assert lines_of(data) == ["config: models.x.sizes.defualt: unknown key; did you mean 'default'?"]


def test_missing_vars_is_not_a_config_key():
    assert "missing_vars: unknown key" in config_error(minimal(missing_vars={"up": ["X"]}))


@pytest.mark.parametrize(
    "path, value, line",
    [
        ("server.port", "abc", "server.port: Input should be a valid integer, got 'abc'"),
        ("server.port", 70000, "server.port: Input should be less than or equal to 65535, got 70000"),
        ("server.log_level", "loud", "server.log_level: Input should be 'debug', 'info', 'warning', 'error' or "
                                     "'critical', got 'loud'"),
        ("routing.retries", "twice", "routing.retries: Input should be a valid integer, got 'twice'"),
        ("providers.up.max_images_per_call", "many",
         "providers.up.max_images_per_call: Input should be a valid integer, got 'many'"),
        ("providers.up.max_images_per_call", 0,
         "providers.up.max_images_per_call: Input should be greater than or equal to 1, got 0"),
        ("providers.up.output_formats", "png", "providers.up.output_formats: Input should be a valid list, got 'png'"),
        ("providers.up.response_format", "png",
         "providers.up.response_format: Input should be 'b64_json' or 'url', got 'png'"),
        ("providers.up.api_key_required", "perhaps",
         "providers.up.api_key_required: Input should be a valid boolean, got 'perhaps'"),
        ("providers.placeholder.timeout", "soon", "providers.placeholder.timeout: Input should be a valid number, "
                                                  "got 'soon'"),
        ("providers.loc.offload", "disk",
         "providers.loc.offload: Input should be 'none', 'model', 'sequential', 'group' or 'auto', got 'disk'"),
        ("providers.loc.max_batch", "lots", "providers.loc.max_batch: Input should be a valid integer, got 'lots'"),
        ("providers.loc.lora_dirs", "loras", "providers.loc.lora_dirs: Input should be a valid list, got 'loras'"),
    ],
)
def test_wrong_types_are_one_line_each(path, value, line):
    assert lines_of(with_value(path, value)) == [f"config: {line}"]


def test_every_problem_is_reported_one_line_each():
    data = with_value("providers.up.timout", 1)
    data["providers"]["loc"]["max_batch"] = "many"
    assert lines_of(data) == [
        "config: providers.up.timout: unknown key; did you mean 'timeout'?",
        "config: providers.loc.max_batch: Input should be a valid integer, got 'many'",
    ]
    data = minimal(server={"port": "abc", "hots": "x"})
    assert len(lines_of(data)) == 2


def test_values_of_secret_fields_are_never_shown():
    for data in (minimal(server={"api_keys": "sk-topsecret"}),
                 minimal(passthrough={"api_key": 987654321}),
                 with_value("providers.up.api_key", 987654321)):
        msg = config_error(data)
        assert "topsecret" not in msg and "987654321" not in msg
        assert len(msg.splitlines()) == 1


def test_provider_options_keep_their_types_from_variables():
    data = minimal()
    data["providers"]["up"].update(max_images_per_call="${N}", timeout="${T}", api_key_required="${REQ}")
    data["providers"]["loc"] = {"kind": "diffusers", "model": "tiny", "max_batch": "${N}",
                                "load_in_background": "false", "lora_dirs": ["${DIR:-}"]}
    cfg = parse_config(data, env={"N": "3", "T": "45", "REQ": "no", "UP_KEY": "k"})
    assert cfg.providers["up"].options == {"base_url": "https://up.example/v1", "api_key": "k",
                                           "max_images_per_call": 3, "timeout": 45.0, "api_key_required": False}
    assert cfg.providers["loc"].options == {"model": "tiny", "max_batch": 3, "load_in_background": False,
                                            "lora_dirs": [""]}
    assert openai_provider(cfg).capabilities.max_images_per_call == 3


def test_unknown_provider_kind_is_a_load_error():
    data = with_value("providers.up.kind", "opnai")
    assert lines_of(data) == ["config: providers.up.kind: unknown provider kind 'opnai'; did you mean 'openai'?"]
    from proxy.providers import KINDS

    msg = config_error(with_value("providers.up.kind", "dall-e"))
    assert msg == f"config: providers.up.kind: unknown provider kind 'dall-e'; known kinds: {', '.join(sorted(KINDS))}"
    assert "diffusers, " in msg and "openai" in msg


def test_references_suggest_the_nearest_name():
    data = minimal()
    data["models"]["x"]["routes"] = ["placeholdr"]
    assert lines_of(data) == ["config: models.x.routes.0: provider 'placeholdr' is not defined under providers; "
                              "did you mean 'placeholder'?"]
    data["models"]["x"] = {"sizes": "qwen-imag", "routes": ["placeholder"]}
    data["size_tables"] = {"mine": {"tiers": {"1K": {"1:1": "1024x1024"}}}}
    assert lines_of(data) == ["config: models.x.sizes: size table 'qwen-imag' is not defined under size_tables nor "
                              "built in (qwen-image, qwen-image-dashscope, tiny); did you mean 'qwen-image'?"]
    data["models"]["x"]["sizes"] = "mien"
    assert lines_of(data)[0].endswith("did you mean 'mine'?")


def test_default_model_must_be_a_configured_model():
    assert lines_of(minimal(server={"default_model": "y"})) == [
        "config: server.default_model: 'y' is not a configured model (models: x)"]
    assert lines_of(minimal(server={"default_model": "xx"})) == [
        "config: server.default_model: 'xx' is not a configured model; did you mean 'x'?"]
    assert parse_config(minimal(server={"default_model": "x"}), env={}).server.default_model == "x"
    # empty (e.g. an unset ${VAR:-}) means the first model
    assert parse_config(minimal(server={"default_model": ""}), env={}).server.default_model is None


def test_bad_size_table_names_its_path():
    data = minimal()
    data["size_tables"]["qwen-image"]["default"] = "huge"
    assert lines_of(data) == ["config: size_tables.qwen-image: 'huge' is not a size like '1024x1024'"]


def test_yaml_error_is_one_line(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("server:\n  port: 8000\n   host: x\n")
    msg = str(pytest.raises(ConfigError, load_config, path, env={}).value)
    assert len(msg.splitlines()) == 1
    assert msg.startswith(f"{path} is not valid YAML: ") and "line 3" in msg


def test_every_kind_declares_its_options():
    from proxy.providers import KINDS, options_model

    for kind in KINDS:
        cls = provider_class(kind)
        assert isinstance(getattr(cls, "options_schema", None), dict), kind
        assert "timeout" in options_model(cls).model_fields


def test_diffusers_options_are_the_engine_config_and_the_provider_options():
    from dataclasses import fields

    from local_backend.config import DTYPES, OFFLOAD_MODES, EngineConfig
    from local_backend.loading import QUANTIZATIONS
    from proxy.providers.local import LocalProvider
    from proxy.providers.local_convert import _PROVIDER_OPTIONS

    schema = LocalProvider.options_schema
    assert set(schema) == {f.name for f in fields(EngineConfig)} | _PROVIDER_OPTIONS
    assert schema["offload"] == OFFLOAD_MODES
    assert schema["dtype"] == (None, *DTYPES)
    assert schema["quantization"] == (None, *QUANTIZATIONS)
