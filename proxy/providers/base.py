"""What every provider is: a name, its capabilities, and one async method that makes images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp

from ..config import RouteConfig
from ..request import ImageRequest


@dataclass(frozen=True)
class Capabilities:
    # More images per call than this are made by parallel calls (output.py).
    max_images_per_call: int = 1
    # Formats the provider produces when asked; anything else is converted by the proxy.
    output_formats: frozenset[str] = frozenset({"png"})
    # Whether it applies output_compression itself.
    output_compression: bool = False


@dataclass
class GeneratedImage:
    """One image from a provider: bytes, or a URL the proxy downloads (or hands on)."""

    data: bytes | None = None
    url: str | None = None
    # Base64 text as an upstream sent it: handed on untouched when nothing needs converting.
    b64: str | None = None
    mime: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    revised_prompt: str | None = None
    # The provider already encoded with the requested output_compression.
    compression_applied: bool = False


@dataclass
class ProviderContext:
    """Shared resources handed to providers at start-up."""

    http: aiohttp.ClientSession
    extras: dict[str, Any] = field(default_factory=dict)


class Provider(ABC):
    kind: ClassVar[str]
    capabilities: Capabilities = Capabilities()

    def __init__(self, name: str, options: dict[str, Any], missing_vars: list[str] | None = None):
        self.name = name
        self.options = options
        self.missing_vars = list(missing_vars or [])

    @property
    def unavailable_reason(self) -> str | None:
        """Why this provider cannot serve now (missing key, model not loaded...); None when it can."""
        return None

    def preflight(self) -> str | None:
        """For `models` / `check-config`: what would stop this provider serving, without starting it."""
        return self.unavailable_reason

    @property
    def default_timeout(self) -> float:
        return float(self.options.get("timeout", 300))

    async def start(self, ctx: ProviderContext) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "ready": self.unavailable_reason is None,
                "reason": self.unavailable_reason}

    @abstractmethod
    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        """Make req.n images (n <= capabilities.max_images_per_call) of req.width x req.height."""
