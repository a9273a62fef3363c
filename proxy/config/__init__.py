"""models.yaml -> typed config, with ${VAR} and ${VAR:-default} expansion and clear errors.

Strict: an unknown key anywhere (provider options included, per provider kind) is an error that names
its path and suggests the nearest known key. Every problem is one line: `path: what is wrong`.

Here: the root Config, parse_config / load_config and the checks across sections. The sections live in
server.py, sections.py (store, state, fetch, routing, passthrough) and models.py (providers, routes, size
tables, models); strict.py holds the error-message machinery they share.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field, PrivateAttr, ValidationError

from ..sizing import SizeTable
from .models import ModelConfig, ProviderConfig, RouteConfig, SizeTableConfig
from .sections import FetchConfig, PassthroughConfig, RoutingConfig, StateConfig, StoreConfig
from .server import ServerConfig
from .strict import Strict, suggest, validation_problems, yaml_problem

__all__ = [
    "Config",
    "ConfigError",
    "FetchConfig",
    "ModelConfig",
    "PassthroughConfig",
    "ProviderConfig",
    "RouteConfig",
    "RoutingConfig",
    "ServerConfig",
    "SizeTableConfig",
    "StateConfig",
    "StoreConfig",
    "expand_env",
    "load_config",
    "parse_config",
]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """models.yaml cannot be used; the message says where and why."""


class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    passthrough: PassthroughConfig = Field(default_factory=PassthroughConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    size_tables: dict[str, SizeTableConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    _missing_vars: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    @property
    def missing_vars(self) -> dict[str, list[str]]:
        """Variables that ${VAR} named but the environment lacks, per provider (filled by parse_config)."""
        return self._missing_vars

    @missing_vars.setter
    def missing_vars(self, value: dict[str, list[str]]) -> None:
        self._missing_vars = value

    def size_table(self, model: str) -> SizeTable:
        sizes = self.models[model].sizes
        return (self.size_tables[sizes] if isinstance(sizes, str) else sizes).build()

    def secrets(self) -> list[str]:
        """Every secret this config holds: proxy keys, the passthrough key, the Redis password, providers'
        keys and tokens (what the scrubber keeps out of answers and logs)."""
        found = list(self.server.api_keys)
        if self.passthrough.api_key:
            found.append(self.passthrough.api_key)
        if self.state.redis_url and urlsplit(self.state.redis_url).password:
            found.append(urlsplit(self.state.redis_url).password)
        for provider in self.providers.values():
            for name, value in provider.options.items():
                if isinstance(value, str) and _SECRET_OPTION.search(name):
                    found.append(value)
                elif isinstance(value, dict):  # a nested key, e.g. prompt_enhancement's api_key
                    found += [v for k, v in value.items() if isinstance(v, str) and _SECRET_OPTION.search(str(k))]
        return found


_SECRET_OPTION = re.compile(r"(?i)key|token|secret|password")


# ---- checks across sections -------------------------------------------------------------------------


def _check_providers(config: Config) -> list[str]:
    """Each provider's kind is known, and its options are the ones that kind reads, with their types."""
    from ..providers import KINDS, options_model, provider_class

    problems = []
    for name, pc in config.providers.items():
        if pc.kind not in KINDS:
            hint = suggest(pc.kind, KINDS) or f"; known kinds: {', '.join(sorted(KINDS))}"
            problems.append(f"providers.{name}.kind: unknown provider kind '{pc.kind}'{hint}")
            continue
        model = options_model(provider_class(pc.kind))
        try:
            options = model.model_validate(pc.options)
        except ValidationError as e:
            problems += validation_problems(model, e, ("providers", name), extra_known=("kind",))
            continue
        # The typed values: "300" from a ${VAR} becomes 300.0 where the option is a number.
        config.providers[name] = ProviderConfig(kind=pc.kind, **options.model_dump(exclude_unset=True))
    return problems


def _check_references(config: Config) -> list[str]:
    problems = []
    for name, model in config.models.items():
        for i, route in enumerate(model.routes):
            if route.provider not in config.providers:
                problems.append(f"models.{name}.routes.{i}: provider '{route.provider}' is not defined under "
                                f"providers{suggest(route.provider, config.providers)}")
        if isinstance(model.sizes, str) and model.sizes not in config.size_tables:
            problems.append(f"models.{name}.sizes: size table '{model.sizes}' is not defined under "
                            f"size_tables{suggest(model.sizes, config.size_tables)}")
    default = config.server.default_model
    if default is not None and default not in config.models:
        known = ", ".join(config.models) or "none"
        problems.append(f"server.default_model: '{default}' is not a configured model"
                        f"{suggest(default, config.models) or f' (models: {known})'}")
    tables = [(f"size_tables.{name}", table) for name, table in config.size_tables.items()]
    tables += [(f"models.{name}.sizes", m.sizes) for name, m in config.models.items()
               if isinstance(m.sizes, SizeTableConfig)]
    for where, table in tables:
        try:
            table.build()
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return problems


def expand_env(value: Any, env: dict[str, str], missing: set[str]) -> Any:
    """Expand ${VAR} / ${VAR:-default} in every string of a parsed YAML tree."""
    if isinstance(value, str):

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if env.get(name):
                return env[name]
            if default is None:
                missing.add(name)
            return default or ""

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [expand_env(v, env, missing) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, env, missing) for k, v in value.items()}
    return value


def parse_config(data: Any, env: dict[str, str] | None = None, source: str = "config") -> Config:
    """A parsed YAML tree -> Config; ConfigError lists every problem, one `source: path: message` line each."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    missing_vars: dict[str, list[str]] = {}
    expanded: dict[str, Any] = {}
    for key, value in data.items():
        if key == "providers" and isinstance(value, dict):
            expanded[key] = {}
            for pname, pvalue in value.items():
                missing: set[str] = set()
                expanded[key][pname] = expand_env(pvalue, env, missing)
                if missing:
                    missing_vars[pname] = sorted(missing)
        else:
            expanded[key] = expand_env(value, env, set())
    try:
        config = Config.model_validate(expanded, context={"env": env})  # key_env and metrics_key_env read env
    except ValidationError as e:
        problems = validation_problems(Config, e)
    else:
        problems = _check_providers(config) + _check_references(config)
    if problems:
        raise ConfigError("\n".join(f"{source}: {line}" for line in problems))
    config.missing_vars = missing_vars
    return config


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid YAML: it is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(e)}") from None
    return parse_config(data, env, source=str(path))
