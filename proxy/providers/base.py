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
    # Whether it takes edit requests (ImageRequest.images, and a mask).
    edits: bool = False
    # Whether it takes a mask with an edit.
    masks: bool = False


@dataclass
class GeneratedImage:
    """One image from a provider: bytes, or a URL the proxy downloads (or hands on)."""

    data: bytes | None = None
    url: str | None = None
    # Base64 text as an upstream sent it (str, or its bytes: a memoryview of the upstream's answer): handed
    # on untouched when nothing needs converting.
    b64: str | bytes | memoryview | None = None
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

    @property
    def loading_stage(self) -> str | None:
        """While the provider is getting ready (a model loading): what it is doing now; else None.

        A loading provider is also unavailable (unavailable_reason is set), but the router waits for it
        (wait_ready) instead of treating it as missing.
        """
        return None

    @property
    def state(self) -> str:
        """ready | loading | missing_key | no_gpu | unavailable: for /health, /ready and /metrics."""
        if self.unavailable_reason is None:
            return "ready"
        if self.loading_stage:
            return "loading"
        return "missing_key" if self.missing_vars else "unavailable"

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a loading provider to become usable; True once it is."""
        return self.unavailable_reason is None

    def preflight(self) -> str | None:
        """For `models` / `check-config`: what would stop this provider serving, without starting it."""
        return self.unavailable_reason

    @property
    def trusted_origin(self) -> str | None:
        """scheme://host:port whose image URLs this provider's answers may point at even when it is not a
        public address (the operator chose it); other URLs are fetched under the general SSRF rules."""
        return None

    @property
    def default_timeout(self) -> float:
        return float(self.options.get("timeout", 300))

    async def start(self, ctx: ProviderContext) -> None:  # noqa: B027 - optional hook
        pass

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def warnings(self) -> list[str]:
        """Options this provider serves without (e.g. a speed option that failed at load), with the reason;
        it still serves. For /health, /ready and `check-config`."""
        return []

    def describe(self) -> dict[str, Any]:
        info = {"name": self.name, "kind": self.kind, "state": self.state, "ready": self.unavailable_reason is None,
                "reason": self.unavailable_reason}
        if warnings := self.warnings:
            info["warnings"] = list(warnings)
        return info

    @abstractmethod
    async def generate(self, req: ImageRequest, route: RouteConfig) -> list[GeneratedImage]:
        """Make req.n images (n <= capabilities.max_images_per_call) of req.width x req.height."""
