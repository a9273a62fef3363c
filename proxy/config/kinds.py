"""Provider kinds by name, and the options each kind accepts in models.yaml.

A kind's module (proxy/providers/) is imported only when a config uses it; importing the local kind does
not import torch (loading does).
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from .errors import ConfigError

if TYPE_CHECKING:
    from ..providers.base import Provider

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
