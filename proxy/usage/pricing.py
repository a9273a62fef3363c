"""Prices -> costs: pure functions over a route's price and what a call made (no I/O, no clock)."""

from __future__ import annotations

from ..config.usage import PriceConfig

# Routes whose engine measures its own accelerator time (local diffusers, a Ray pool).
GPU_KINDS = frozenset({"diffusers", "ray"})
_GPU_PRICES: dict[float, PriceConfig] = {}  # $/GPU-hour -> its price (built once: this runs per call)


def route_price(price: PriceConfig | None, provider_kind: str, gpu_usd_per_hour: float | None) -> PriceConfig | None:
    """The route's own price, else for a local engine the configured GPU hour; else None (unknown)."""
    if price is not None:
        return price
    if provider_kind in GPU_KINDS and gpu_usd_per_hour is not None:
        found = _GPU_PRICES.get(gpu_usd_per_hour)
        if found is None:
            found = _GPU_PRICES[gpu_usd_per_hour] = PriceConfig(per_gpu_second=gpu_usd_per_hour / 3600)
        return found
    return None


def call_cost(price: PriceConfig | None, images: int, width: int, height: int,
              gpu_seconds: float | None) -> float | None:
    """What one upstream call cost in USD: None when unknown (no price, or a GPU-second price and no
    measured time). A call that made no images is taken as not charged."""
    if price is None:
        return None
    if images <= 0:
        return 0.0
    cost = 0.0
    if price.per_call is not None:
        cost += price.per_call
    if price.per_image is not None:
        cost += price.per_image * images
    if price.per_megapixel is not None:
        cost += price.per_megapixel * images * width * height / 1_000_000
    if price.per_gpu_second is not None:
        if gpu_seconds is None:
            return None
        cost += price.per_gpu_second * gpu_seconds
    return cost


def estimate(price: PriceConfig | None, images: int, width: int, height: int, per_call: int) -> float:
    """What a request will likely cost on a route, before it runs (for budgets): GPU time is not known
    beforehand and counts 0; no price counts 0."""
    if price is None or images <= 0:
        return 0.0
    calls = -(-images // max(per_call, 1))
    cost = (price.per_call or 0.0) * calls + (price.per_image or 0.0) * images
    return cost + (price.per_megapixel or 0.0) * images * width * height / 1_000_000


def total(costs: list[float | None]) -> float | None:
    """A request's cost from its calls': None if any is unknown; 0 when it made no calls."""
    known = [c for c in costs if c is not None]
    if len(known) != len(costs):
        return None
    return float(sum(known))


def micro(usd: float) -> int:
    """USD as whole micro-dollars: budgets add integers (0.01 three times is exactly 0.03)."""
    return round(usd * 1_000_000)
