"""models.yaml -> typed config, with ${VAR} and ${VAR:-default} expansion and clear errors.

Strict: an unknown key anywhere (provider options included, per provider kind) is an error that names
its path and suggests the nearest known key. Every problem is one line: `path: what is wrong`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from .sizing import MAX_SIDE, SizeTable, parse_pixels

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """models.yaml cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Bearer keys clients must send; empty = no auth (fine on loopback, not on a network).
    api_keys: list[str] = Field(default_factory=list)
    max_body_mb: float = Field(default=50, gt=0)
    request_timeout: float = Field(default=600, gt=0)
    # Base of the URLs handed out for response_format=url; default: the request's own host.
    public_base_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # Model used when a request names none; default: the first model listed.
    default_model: str | None = None
    # On SIGTERM: seconds in-flight requests may take to finish before they are cancelled with an error.
    shutdown_grace: float = Field(default=30, ge=0)
    # How long a request waits for a route whose model is still loading before a 503 with Retry-After.
    max_load_wait: float = Field(default=120, ge=0)

    @field_validator("api_keys")
    @classmethod
    def _drop_empty(cls, keys: list[str]) -> list[str]:
        return [k for k in keys if k]

    @field_validator("public_base_url", "default_model")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_any_case(cls, value):
        return value.lower() if isinstance(value, str) else value


class StoreConfig(_Strict):
    kind: Literal["filesystem"] = "filesystem"
    path: str = "var/images"
    ttl_seconds: float = Field(default=3600, gt=0)
    # Upstream URLs expire and reveal the provider: download and serve them ourselves by default.
    rehost_upstream_urls: bool = True
    max_download_mb: float = 64


class FetchConfig(_Strict):
    """Where the proxy may fetch images from on a client's or an upstream's say-so (SSRF rules)."""

    # Hosts (exact, or "*.example.com") that edit requests may name in images[].image_url; empty: none,
    # only data: URLs and uploads.
    input_image_hosts: list[str] = Field(default_factory=list)
    # Hosts upstream image URLs may point at (besides the answering provider's own origin); empty: any
    # public host.
    upstream_image_hosts: list[str] = Field(default_factory=list)
    # CIDRs let through although not public (an on-prem image host), e.g. ["10.1.0.0/16"].
    allowed_networks: list[str] = Field(default_factory=list)
    allow_http: bool = False


class RoutingConfig(_Strict):
    """Retries within a route and the per-route circuit breaker."""

    # Extra attempts on the same route after a retryable failure (connect error, timeout, 429, 5xx,
    # a malformed answer or a bad image), before moving on to the next route.
    retries: int = Field(default=2, ge=0, le=10)
    # Exponential backoff with full jitter: a random wait in [0, min(backoff_max, backoff_base * 2**i)].
    backoff_base: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=8, ge=0)
    # A route that failed this many requests in a row is skipped for breaker_cooldown seconds, then
    # one probe request at a time is let through (half-open) until one succeeds.
    breaker_threshold: int = Field(default=5, ge=1)
    breaker_cooldown: float = Field(default=30, ge=0)


class PassthroughConfig(_Strict):
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = Field(default=600, gt=0)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


class ProviderConfig(BaseModel):
    """kind plus options that belong to that kind; each provider reads its own.

    Which options a kind knows, and their types, is the provider class's `options_schema`; parse_config
    checks them (proxy.providers.check_options) and keeps the typed values.
    """

    model_config = ConfigDict(extra="allow")
    kind: str

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RouteConfig(_Strict):
    provider: str
    # The model name the upstream knows; default: the proxy's model name.
    model: str | None = None
    # Defaults merged into every request on this route (request fields win).
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    max_images_per_call: int | None = Field(default=None, ge=1)
    # Overrides routing.retries for this route.
    retries: int | None = Field(default=None, ge=0, le=10)


class SizeTableConfig(_Strict):
    default: str = "1024x1024"
    tiers: dict[str, dict[str, str]]
    max_side: int = Field(default=MAX_SIDE, ge=1, le=MAX_SIDE)
    max_pixels: int | None = Field(default=None, ge=1)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tier_labels_as_text(cls, tiers):
        # YAML reads an unquoted megapixel tier such as `0.25:` as a number.
        return {str(k): v for k, v in tiers.items()} if isinstance(tiers, dict) else tiers

    def build(self) -> SizeTable:
        def pixels(text: str) -> tuple[int, int]:
            wh = parse_pixels(text)
            if wh is None:
                raise ValueError(f"'{text}' is not a size like '1024x1024'")
            if not all(1 <= side <= self.max_side for side in wh):
                raise ValueError(f"'{text}': each side must be between 1 and {self.max_side} pixels")
            return wh

        return SizeTable(
            tiers={t: {r: pixels(s) for r, s in ratios.items()} for t, ratios in self.tiers.items()},
            default=pixels(self.default),
            max_side=self.max_side,
            max_pixels=self.max_pixels,
        )


class ModelConfig(_Strict):
    routes: list[RouteConfig] = Field(min_length=1)
    sizes: str | SizeTableConfig
    description: str | None = None
    owned_by: str = "qwen-image-proxy"
    # An edit model (/v1/images/edits) takes 1 to this many input images; 0: it does not edit.
    max_input_images: int = Field(default=0, ge=0, le=16)

    @field_validator("routes", mode="before")
    @classmethod
    def _route_shorthand(cls, routes):
        # "- lumenfall" is short for "- provider: lumenfall".
        if isinstance(routes, list):
            return [{"provider": r} if isinstance(r, str) else r for r in routes]
        return routes


class Config(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
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


# ---- error messages -------------------------------------------------------------------------------


def _secret(path: list[str]) -> bool:
    """Whether the value at this path may be a secret: then an error never shows it."""
    return any(part.lower().endswith(("key", "keys", "secret", "token", "password")) for part in path)


def suggest(word: str, known: Iterable[str]) -> str:
    """'; did you mean 'x'?' for the nearest of `known`, else an empty string."""
    match = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


def _unknown_key(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    hint = suggest(key, known)
    return "unknown key" + (hint or (f"; known keys: {', '.join(known)}" if known else ""))


def _type_name(tp: Any) -> str | None:
    return getattr(tp, "__name__", None)


def _without_none(tp: Any) -> Any:
    if get_origin(tp) in (Union, UnionType):
        members = [m for m in get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _walk(root: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None, tuple | None]:
    """Follow a pydantic error location through the model's types.

    Returns the readable path (pydantic's union member tags dropped), the model whose field the last
    key would be (for "did you mean"), and the last union passed: (its path, the member tag, whether
    the error is about the whole value, i.e. nothing follows the tag).
    """
    path: list[str] = []
    holder: type[BaseModel] | None = None
    branch = None
    tp: Any = root
    parts = list(loc)
    while parts:
        tp = _without_none(tp)
        origin = get_origin(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            holder, part = tp, parts.pop(0)
            path.append(str(part))
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = field.annotation if field else None
            continue
        holder = None
        if origin in (Union, UnionType):
            tag = parts.pop(0)
            branch = (tuple(path), tag, not parts)
            tp = next((m for m in get_args(tp) if _type_name(m) == tag), None)
            continue
        path.append(str(parts.pop(0)))
        tp = get_args(tp)[-1] if origin in (dict, list) else None
    return path, holder, branch


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validation_problems(root: type[BaseModel], error: ValidationError, prefix: Iterable[str] = (),
                        extra_known: Iterable[str] = ()) -> list[str]:
    """One 'path: message' line per problem pydantic found, with suggestions for unknown keys."""
    entries = []
    for err in error.errors():
        path, holder, branch = _walk(root, err["loc"])
        path = [*prefix, *path]
        kind = err["type"]
        if kind == "extra_forbidden":
            known = set(holder.model_fields) if holder else set()
            if holder is root:
                known |= set(extra_known)
            msg = _unknown_key(path[-1], known)
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind.endswith("_parsing"):  # "..., unable to parse string as an integer": the input says it
                msg = msg.split(", ")[0]
            value = err.get("input")
            if kind not in ("missing", "value_error") and not _secret(path) and isinstance(value, str | int | float):
                msg += f", got {_show(value)}"
        # (the union's path, whether this complaint is only "not this member's type")
        union = (branch[0], branch[2] and _is_type_error(kind)) if branch else None
        entries.append((".".join(path) or "(top level)", msg, union))
    # A union (`sizes: name | table`) reports each member's complaint. Where one member got further than
    # "wrong type", keep only that one's; where none did, the first complaint is enough.
    deeper = {union[0] for *_, union in entries if union and not union[1]}
    lines, seen = [], set()
    for where, msg, union in entries:
        if union and union[1]:
            if union[0] in deeper or union[0] in seen:
                continue
            seen.add(union[0])
        lines.append(f"{where}: {msg}")
    return lines


def _is_type_error(kind: str) -> bool:
    return kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error"


# ---- checks across sections -------------------------------------------------------------------------


def _check_providers(config: Config) -> list[str]:
    """Each provider's kind is known, and its options are the ones that kind reads, with their types."""
    from .providers import KINDS, options_model, provider_class

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
        config = Config.model_validate(expanded)
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
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    return parse_config(data, env, source=str(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what and where."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem
