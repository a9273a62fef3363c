"""The configured providers, built: one object per entry under `providers:` in models.yaml.

The kinds by name and the options each accepts live in proxy/config/kinds.py (the config checks them);
a kind's module is imported only when a config uses it.
"""

from __future__ import annotations

from ..config import Config, ConfigError
from ..config.kinds import KINDS, options_model, provider_class
from .base import Capabilities, GeneratedImage, Provider, ProviderContext


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
    sizes: set[tuple[int, int]] = set()
    for model, mc in config.models.items():
        if any(route.provider == provider for route in mc.routes):
            for ratios in config.size_table(model).tiers.values():
                sizes.update((w, h) for w, h in ratios.values())
    return sorted(sizes, key=lambda wh: (-wh[0] * wh[1], wh))


__all__ = ["KINDS", "Capabilities", "GeneratedImage", "Provider", "ProviderContext", "build_providers",
           "options_model", "provider_class"]
