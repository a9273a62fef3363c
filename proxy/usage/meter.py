"""One request's usage as it happens: the calls each route made and their cost, held in a context variable
so the router can note calls without knowing about the ledger."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config.usage import PriceConfig
from .pricing import call_cost, route_price

if TYPE_CHECKING:
    from ..request import ImageRequest
    from ..routing.router import Route


@dataclass
class Call:
    """One call to a route's provider (a part of n, a retry or a fallback)."""

    route: str
    provider: str
    images: int
    gpu_seconds: float | None
    cost: float | None


@dataclass
class Meter:
    """What one image request did; the usage service turns it into a ledger record when the request ends."""

    gpu_usd_per_hour: float | None = None
    req: Any = None  # the ImageRequest, once parsed
    calls: list[Call] = field(default_factory=list)
    cache_hit: bool = False
    cache_route: tuple[str, str] | None = None  # (route, provider) that made the images a hit returns
    reservation: Any = None  # the budget hold (proxy/usage/budgets.py), settled at the end
    cache_key: tuple | None = None  # set when the model caches and the request has a seed

    def note(self, route_name: str, provider_kind: str, price: PriceConfig | None, width: int, height: int,
             images: list | None) -> None:
        """A call ended: with images (a list of GeneratedImage) or without (None: it failed)."""
        made = len(images or ())
        gpu = None
        if images:
            shares = [img.gpu_seconds for img in images if getattr(img, "gpu_seconds", None) is not None]
            gpu = sum(shares) if shares else None
        price = route_price(price, provider_kind, self.gpu_usd_per_hour)
        cost = None if price is None else call_cost(price, made, width, height, gpu)  # None: no price, unknown
        self.calls.append(Call(route_name, provider_kind, made, gpu, cost))


CURRENT: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("qip_usage_meter", default=None)


def note_call(route: Route, chunk: ImageRequest, images: list | None) -> None:
    """The router's hook: a call on `route` (router.Route) for `chunk` (ImageRequest) ended."""
    meter = CURRENT.get()
    if meter is not None:
        meter.note(route.name, route.provider.kind, route.config.price, chunk.width, chunk.height, images)
