"""Provider kinds by name, and the options each kind accepts in models.yaml.

The local kind is imported only when a config uses it; importing it does not import torch (loading does).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..config import Config, ConfigError
from .base import Capabilities, GeneratedImage, Provider, ProviderContext

KINDS = {
    "openai": "proxy.providers.openai_compat:OpenAICompatProvider",
    "placeholder": "proxy.providers.placeholder:PlaceholderProvider",
    "diffusers": "proxy.providers.local:LocalProvider",
    "ray": "proxy.providers.ray:RayProvider",
    "fal": "proxy.providers.fal:FalProvider",
    "replicate": "proxy.providers.replicate:ReplicateProvider",
    "dashscope": "proxy.providers.dashscope:DashScopeProvider",
}


def provider_class(kind: str) -> type[Provider]:
    if kind not in KINDS:
        raise ConfigError(f"unknown provider kind '{kind}'; known kinds: {', '.join(sorted(KINDS))}")
    module, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


@functools.cache
def options_model(cls: type[Provider]) -> type[BaseModel]:
    """The pydantic model of a provider class's `options_schema` (every option optional, no others).

    `options_schema` maps each option the provider reads to one of:
    - a type: `float`, `str | None`, `list[str]`, `dict` (checked in pydantic's lax mode, so the text a
      ${VAR} expands to still becomes a number: "8000" -> 8000);
    - a tuple of the allowed values: `("b64_json", "url")`;
    - `(type, {"ge": 1})`: a type with pydantic Field limits (ge, gt, le, lt, min_length...).
    A class without `options_schema` accepts no options besides `kind`.
    """
    fields: dict[str, Any] = {}
    for name, spec in (getattr(cls, "options_schema", None) or {}).items():
        if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
            fields[name] = (spec[0], Field(default=None, **spec[1]))
        elif isinstance(spec, tuple):
            fields[name] = (Literal[spec], None)
        else:
            fields[name] = (spec, None)
    # No inf or nan: a timeout of .inf is no timeout, and nan compares false with every limit.
    return create_model(f"{cls.kind} options", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


def build_providers(config: Config) -> dict[str, Provider]:
    """One provider object per configured provider, not started (nothing connects or loads yet)."""
    providers = {}
    for name, pc in config.providers.items():
        cls = provider_class(pc.kind)
        try:
            providers[name] = cls(name, pc.options, config.missing_vars.get(name))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"providers.{name}: {e}") from None
    for name, provider in providers.items():  # the sizes each local route serves (compile warm-up)
        if hasattr(provider, "serve_sizes"):
            provider.serve_sizes(_served_sizes(config, name))
    return providers


def _served_sizes(config: Config, provider: str) -> list[tuple[int, int]]:
    """Every size in the size tables of the models with a route to `provider`, largest first."""
    sizes = set()
    for model, mc in config.models.items():
        if any(route.provider == provider for route in mc.routes):
            for ratios in config.size_table(model).tiers.values():
                sizes.update(tuple(wh) for wh in ratios.values())
    return sorted(sizes, key=lambda wh: (-wh[0] * wh[1], wh))


__all__ = ["KINDS", "Capabilities", "GeneratedImage", "Provider", "ProviderContext", "build_providers",
           "options_model", "provider_class"]
