"""models.yaml -> typed config, with ${VAR} and ${VAR:-default} expansion and clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .sizing import MAX_SIDE, SizeTable, parse_pixels

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """models.yaml cannot be used; the message says where and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer keys clients must send; empty = no auth (fine on loopback, not on a network).
    api_keys: list[str] = Field(default_factory=list)
    max_body_mb: float = 50
    request_timeout: float = 600
    # Base of the URLs handed out for response_format=url; default: the request's own host.
    public_base_url: str | None = None
    log_level: str = "info"
    # Model used when a request names none; default: the first model listed.
    default_model: str | None = None

    @field_validator("api_keys")
    @classmethod
    def _drop_empty(cls, keys: list[str]) -> list[str]:
        return [k for k in keys if k]

    @field_validator("public_base_url", "default_model")
    @classmethod
    def _empty_is_unset(cls, value: str | None) -> str | None:
        return value or None


class StoreConfig(_Strict):
    kind: Literal["filesystem"] = "filesystem"
    path: str = "var/images"
    ttl_seconds: float = Field(default=3600, gt=0)
    # Upstream URLs expire and reveal the provider: download and serve them ourselves by default.
    rehost_upstream_urls: bool = True
    max_download_mb: float = 64


class PassthroughConfig(_Strict):
    base_url: str | None = None
    api_key: str | None = None
    timeout: float = 600

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)


class ProviderConfig(BaseModel):
    """kind plus options that belong to that kind; each provider reads its own."""

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
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    size_tables: dict[str, SizeTableConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    # Variables that ${VAR} named but the environment lacks, per provider (filled by load_config).
    missing_vars: dict[str, list[str]] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="after")
    def _check_references(self):
        for name, model in self.models.items():
            for i, route in enumerate(model.routes):
                if route.provider not in self.providers:
                    raise ValueError(
                        f"models.{name}.routes.{i}: provider '{route.provider}' is not defined under providers"
                    )
            if isinstance(model.sizes, str) and model.sizes not in self.size_tables:
                raise ValueError(f"models.{name}.sizes: size table '{model.sizes}' is not defined under size_tables")
        return self

    def size_table(self, model: str) -> SizeTable:
        sizes = self.models[model].sizes
        return (self.size_tables[sizes] if isinstance(sizes, str) else sizes).build()


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


def _format_validation(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, env: dict[str, str] | None = None, source: str = "config") -> Config:
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
        for name in config.models:
            config.size_table(name)
    except ValidationError as e:
        raise ConfigError(f"{source} is not valid:\n{_format_validation(e)}") from None
    except ValueError as e:
        raise ConfigError(f"{source} is not valid: {e}") from None
    config.missing_vars = missing_vars
    return config


def load_config(path: str | os.PathLike, env: dict[str, str] | None = None) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_config(data, env, source=str(path))
