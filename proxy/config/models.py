"""What serves each model: providers, routes, size tables and the models section that ties them together."""

from __future__ import annotations

import json
from datetime import date, time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..media.sizing import MAX_SIDE, SizeTable, parse_pixels
from .strict import Strict
from .usage import CacheConfig, PriceConfig


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


class RouteConfig(Strict):
    provider: str
    # The model name the upstream knows; default: the proxy's model name.
    model: str | None = None
    # Defaults merged into every request on this route (request fields win).
    params: dict[str, Any] = Field(default_factory=dict)
    timeout: float | None = Field(default=None, gt=0)
    max_images_per_call: int | None = Field(default=None, ge=1)
    # Overrides routing.retries for this route.
    retries: int | None = Field(default=None, ge=0, le=10)
    # Fields never sent on this route (the client's or the route's params): e.g. [negative_prompt, go_fast].
    drop: list[str] = Field(default_factory=list)
    # What a call on this route costs (proxy/usage/pricing.py); none: its cost is recorded as null.
    price: PriceConfig | None = None

    @field_validator("params")
    @classmethod
    def _json_values(cls, params: dict[str, Any]) -> dict[str, Any]:
        # Sent to the upstream as JSON: a YAML date or timestamp, a set or .nan would be sent as something
        # else (a date as text), or fail every call; said here, with its name, instead.
        for name, value in params.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError, RecursionError):
                hint = " (YAML reads an unquoted date or time as one: quote it)" if _has(value, (date, time)) else ""
                raise ValueError(f"'{name}' must be a JSON value: text, a finite number, true/false, null, "
                                 f"or a list or mapping of them{hint}") from None
        return params

    @field_validator("drop")
    @classmethod
    def _droppable(cls, names: list[str]) -> list[str]:
        core = {"prompt", "model", "size", "n", "response_format", "stream"}
        if bad := sorted(set(names) & core):
            raise ValueError(f"{', '.join(bad)} cannot be dropped: every route needs them")
        return names


def _has(value: Any, types: tuple[type, ...], depth: int = 0) -> bool:
    """Whether value, or anything in it (a few levels down: YAML can make a list that holds itself), is one
    of types."""
    if isinstance(value, types):
        return True
    if depth > 20:
        return False
    if isinstance(value, dict):
        return any(_has(v, types, depth + 1) for v in value.values())
    return isinstance(value, (list, tuple, set)) and any(_has(v, types, depth + 1) for v in value)


class SizeTableConfig(Strict):
    default: str = "1024x1024"
    tiers: dict[str, dict[str, str]]
    max_side: int = Field(default=MAX_SIDE, ge=1, le=MAX_SIDE)
    max_pixels: int | None = Field(default=None, ge=1)
    # n x width x height per request; default 4 x max_pixels.
    max_total_pixels: int | None = Field(default=None, ge=1)

    @field_validator("tiers", mode="before")
    @classmethod
    def _tier_labels_as_text(cls, tiers: Any) -> Any:
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
            max_total_pixels=self.max_total_pixels,
        )


class ModelConfig(Strict):
    routes: list[RouteConfig] = Field(min_length=1)
    # A table's name (size_tables' or a built-in one), a table of its own, or none: the family's built-in
    # table, picked by name (proxy.config.size_families).
    sizes: str | SizeTableConfig | None = None
    description: str | None = None
    owned_by: str = "qwen-image-proxy"
    # An edit model (/v1/images/edits) takes 1 to this many input images; 0: it does not edit.
    max_input_images: int = Field(default=0, ge=0, le=16)
    # Repeated requests with an explicit seed answered from stored images (proxy/usage/cache.py).
    cache: CacheConfig | None = None

    @field_validator("routes", mode="before")
    @classmethod
    def _route_shorthand(cls, routes: Any) -> Any:
        # "- lumenfall" is short for "- provider: lumenfall".
        if isinstance(routes, list):
            return [{"provider": r} if isinstance(r, str) else r for r in routes]
        return routes
