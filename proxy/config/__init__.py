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
from urllib.parse import unquote, urlsplit

from pydantic import Field, PrivateAttr, ValidationError

from ..media.sizing import SizeTable
from .envvars import Expansion, expand_env
from .errors import ConfigError
from .jobs import JobsConfig
from .kinds import KINDS, options_model, provider_class
from .models import ModelConfig, ProviderConfig, RouteConfig, SizeTableConfig
from .sections import (
    CREDENTIALS_IN_URL,
    FetchConfig,
    PassthroughConfig,
    RoutingConfig,
    StateConfig,
    StoreConfig,
    TelemetryConfig,
    has_credentials,
)
from .server import ServerConfig
from .size_families import BUILTIN_TABLES, family_table
from .strict import Strict, suggest, validation_problems
from .usage import UsageConfig
from .yamlload import YamlProblem, load_yaml, read_text

__all__ = [
    "Config",
    "ConfigError",
    "FetchConfig",
    "JobsConfig",
    "ModelConfig",
    "PassthroughConfig",
    "ProviderConfig",
    "RouteConfig",
    "RoutingConfig",
    "ServerConfig",
    "SizeTableConfig",
    "StateConfig",
    "StoreConfig",
    "TelemetryConfig",
    "expand_env",
    "load_config",
    "parse_config",
]

# Collector headers that carry a credential (Authorization, api-key, x-honeycomb-team, dd-api-key,
# lightstep-access-token...); any value of 20 characters or more is taken for one too.
_SECRET_HEADER = re.compile(r"auth|key|token|secret|pass|cookie|team|credential|signature", re.IGNORECASE)

class Config(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    passthrough: PassthroughConfig = Field(default_factory=PassthroughConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    usage: UsageConfig = Field(default_factory=UsageConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    size_tables: dict[str, SizeTableConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    _missing_vars: dict[str, list[str]] = PrivateAttr(default_factory=dict)
    # Outside providers: path -> unset variables (no default) its value names; they read as "".
    _unset_vars: dict[str, list[str]] = PrivateAttr(default_factory=dict)

    @property
    def missing_vars(self) -> dict[str, list[str]]:
        """Variables that ${VAR} named but the environment lacks, per provider (filled by parse_config)."""
        return self._missing_vars

    @missing_vars.setter
    def missing_vars(self, value: dict[str, list[str]]) -> None:
        self._missing_vars = value

    @property
    def unset_vars(self) -> dict[str, list[str]]:
        """Outside providers, each value's path -> the ${VAR}s it names that are not set (read as empty)."""
        return self._unset_vars

    def size_table(self, model: str) -> SizeTable:
        sizes = self.models[model].sizes
        if isinstance(sizes, SizeTableConfig):
            return sizes.build()
        name = self.size_table_choice(model)["name"]
        assert name is not None, "only an inline table (handled above) has no name"
        table = self.size_tables.get(name) or SizeTableConfig.model_validate(BUILTIN_TABLES[name])
        return table.build()

    def size_table_choice(self, model: str) -> dict[str, str | None]:
        """Which size table a model uses: name (None for its own inline table), source (size_tables,
        built-in or inline) and picked_by (sizes, or family when the config names none)."""
        m = self.models[model]
        if isinstance(m.sizes, SizeTableConfig):
            return {"name": None, "source": "inline", "picked_by": "sizes"}
        picked_by = "sizes"
        name = m.sizes
        if name is None:
            # The model's own name first, then the names its upstreams and local engines know it by.
            names = [model] + [r.model for r in m.routes if r.model]
            for route in m.routes:
                provider = self.providers.get(route.provider)
                if provider is not None and isinstance(provider.options.get("model"), str):
                    names.append(provider.options["model"])  # a local engine's weights: tiny, Qwen/Qwen-Image
            name, picked_by = family_table(names)[0], "family"
        source = "size_tables" if name in self.size_tables else "built-in"
        return {"name": name, "source": source, "picked_by": picked_by}

    def secrets(self) -> list[str]:
        """Every secret this config holds: proxy keys, the metrics key, the passthrough key, the Redis password,
        the bucket's credentials (AWS_* variables included), providers' keys and tokens (what the scrubber
        keeps out of answers and logs)."""
        found = [key.value for key in self.server.keys] + self.store.secrets()
        if self.server.metrics_key:
            found.append(self.server.metrics_key)
        if self.passthrough.api_key:
            found.append(self.passthrough.api_key)
        for url in (self.state.redis_url, self.usage.database_url):
            if url and (password := urlsplit(url).password):
                found.append(password)
        # The exporter's headers (a collector's token): the variable the config names, and the standard ones
        # the exporter reads in any case; values as written, URL-decoded (as sent), and a token after its
        # scheme ("Bearer%20tok": "Bearer tok", "tok"). Not a plain tenant or dataset name: every secret is
        # cut from every log line and revised prompt ("x-tenant=prod" would cut "a product photo").
        for name in (self.telemetry.headers_env, "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"):
            for item in os.environ.get(name, "").split(",") if name else ():
                header, _, value = (part.strip() for part in item.partition("="))
                if _SECRET_HEADER.search(header) or len(value) >= 20:
                    found += [value, unquote(value), *unquote(value).split()[-1:]]
        found += [s for s in (self.jobs.webhook_secret, *(w.secret for w in self.jobs.key_webhooks.values())) if s]
        for provider in self.providers.values():
            for name, value in provider.options.items():
                if isinstance(value, str) and _SECRET_OPTION.search(name):
                    found.append(value)
                elif isinstance(value, dict):  # a nested key, e.g. prompt_enhancement's api_key
                    found += [v for k, v in value.items() if isinstance(v, str) and _SECRET_OPTION.search(str(k))]
        return found


_SECRET_OPTION = re.compile(r"(?i)key|token|secret|password")


# ---- checks across sections -------------------------------------------------------------------------


def _check_providers(config: Config, hidden: set[str]) -> list[str]:
    """Each provider's kind is known, and its options are the ones that kind reads, with their types."""
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
            problems += validation_problems(model, e, ("providers", name), extra_known=("kind",), hidden=hidden)
            continue
        # The typed values: "300" from a ${VAR} becomes 300.0 where the option is a number.
        config.providers[name] = ProviderConfig(kind=pc.kind, **options.model_dump(exclude_unset=True))
        problems += _url_credentials(f"providers.{name}", pc.options)
    return problems


def _url_credentials(where: str, options: dict[str, Any]) -> list[str]:
    """A line for each URL option (base_url, http_url; nested ones too) that carries user:password@."""
    problems = []
    for key, value in options.items():
        if isinstance(value, dict):
            problems += _url_credentials(f"{where}.{key}", value)
        elif isinstance(value, str) and str(key).endswith("url") and has_credentials(value):
            problems.append(f"{where}.{key}: {CREDENTIALS_IN_URL}")
    return problems


def _check_references(config: Config, broken: set) -> list[str]:
    """Names one section gives another; `broken` sections (already reported) are left out, so a section
    that failed to load does not also make every name in it "not defined"."""
    problems = []
    for name, model in config.models.items() if "models" not in broken else ():
        for i, route in enumerate(model.routes):
            if route.provider not in config.providers and "providers" not in broken:
                problems.append(f"models.{name}.routes.{i}: provider '{route.provider}' is not defined under "
                                f"providers{suggest(route.provider, config.providers)}")
        named = {**BUILTIN_TABLES, **config.size_tables}
        if isinstance(model.sizes, str) and model.sizes not in named and "size_tables" not in broken:
            problems.append(f"models.{name}.sizes: size table '{model.sizes}' is not defined under size_tables "
                            f"nor built in ({', '.join(BUILTIN_TABLES)}){suggest(model.sizes, named)}")
    default = config.server.default_model
    if default is not None and default not in config.models and "models" not in broken:
        known = ", ".join(config.models) or "none"
        problems.append(f"server.default_model: '{default}' is not a configured model"
                        f"{suggest(default, config.models) or f' (models: {known})'}")
    if "jobs" not in broken and "server" not in broken:
        names = [key.name for key in config.server.keys]
        for name in config.jobs.key_webhooks:
            if name not in names:
                problems.append(f"jobs.key_webhooks.{name}: no key is named '{name}' under server.api_keys"
                                f"{suggest(name, names)}")
    tables = [(f"size_tables.{name}", table) for name, table in config.size_tables.items()]
    tables += [(f"models.{name}.sizes", m.sizes) for name, m in config.models.items()
               if isinstance(m.sizes, SizeTableConfig)]
    for where, table in tables:
        try:
            table.build()
        except ValueError as e:
            problems.append(f"{where}: {e}")
    return problems


def _validate(expanded: dict[str, Any], env: dict[str, str], hidden: set[str]) -> tuple[Config | None, list[str]]:
    """Config from the expanded tree, and every problem in it: the sections that fail are reported, and
    the others still checked (providers' options, references), so one run names all there is to fix."""
    context = {"env": env}  # key_env and metrics_key_env read it
    try:
        config, broken, problems = Config.model_validate(expanded, context=context), set(), []
    except ValidationError as e:
        problems = validation_problems(Config, e, hidden=hidden)
        broken = {err["loc"][0] for err in e.errors() if err["loc"]}
        try:
            config = Config.model_validate({k: v for k, v in expanded.items() if k not in broken}, context=context)
        except ValidationError:  # nothing more to learn
            return None, problems
    if "providers" not in broken:
        problems += _check_providers(config, hidden)
    return config, problems + _check_references(config, broken)


def parse_config(data: Any, env: dict[str, str] | None = None, source: str = "config") -> Config:
    """A parsed YAML tree -> Config; ConfigError lists every problem, one `source: path: message` line each."""
    env = dict(os.environ) if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, not a {type(data).__name__}")
    missing_vars: dict[str, list[str]] = {}
    problems: list[str] = []
    hidden: set[str] = set()  # values of secret-named variables: never in a message, wherever used
    cut: set[str] = set()  # paths of malformed ${...}: already reported
    unset: dict[str, list[str]] = {}

    def expand(part: dict, path: tuple[str, ...]) -> tuple[dict, set[str]]:
        expansion = Expansion(env)
        tree = expansion.tree(part, path)
        problems.extend(expansion.problems)
        cut.update(expansion.problem_paths)
        hidden.update(expansion.secrets)
        if not path:
            unset.update(expansion.missing_at)
        return tree, expansion.missing

    expanded: dict[str, Any] = {}
    for key, value in data.items():
        if key == "providers" and isinstance(value, dict):
            # One by one: each provider records the variables it lacks (it is skipped without them).
            expanded[key] = {}
            for pname, pvalue in value.items():
                tree, missing = expand({pname: pvalue}, ("providers",))
                expanded[key].update(tree)
                if missing:
                    missing_vars[pname] = sorted(missing)
        else:
            expanded.update(expand({key: value}, ())[0])
    config, found = _validate(expanded, env, hidden)
    problems += [line for line in found if line.split(": ", 1)[0] not in cut]
    if problems or config is None:
        raise ConfigError("\n".join(f"{source}: {_redact(line, hidden)}" for line in problems))
    config.missing_vars = missing_vars
    config._unset_vars = unset
    return config


def _redact(line: str, hidden: set[str]) -> str:
    for secret in sorted(hidden, key=len, reverse=True):
        if len(secret) >= 4:  # a one-letter "secret" would blot out the message
            line = line.replace(secret, "[redacted]")
    return line


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        data = load_yaml(read_text(path), str(path))
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid YAML: it is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except YamlProblem as e:
        raise ConfigError(str(e)) from None
    return parse_config(data, env, source=str(path))
