"""Provider kinds by name. The local kind is imported only when a config uses it (it pulls in torch)."""

from __future__ import annotations

import importlib

from ..config import Config, ConfigError
from .base import Capabilities, GeneratedImage, Provider, ProviderContext

KINDS = {
    "openai": "proxy.providers.openai_compat:OpenAICompatProvider",
    "placeholder": "proxy.providers.placeholder:PlaceholderProvider",
    "diffusers": "proxy.providers.local:LocalProvider",
}


def provider_class(kind: str) -> type[Provider]:
    if kind not in KINDS:
        raise ConfigError(f"unknown provider kind '{kind}'; known kinds: {', '.join(sorted(KINDS))}")
    module, _, attr = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_providers(config: Config) -> dict[str, Provider]:
    providers = {}
    for name, pc in config.providers.items():
        cls = provider_class(pc.kind)
        providers[name] = cls(name, pc.options, config.missing_vars.get(name))
    return providers


__all__ = ["Capabilities", "GeneratedImage", "Provider", "ProviderContext", "build_providers", "provider_class"]
