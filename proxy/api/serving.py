"""The work every image call does once parsed, streamed or not: route it (the images checked and converted
inside each route attempt), then render the OpenAI payload."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from ..media.output import FinalImage, finish_images, render_images
from ..providers.base import GeneratedImage, Provider
from ..request import ImageRequest
from ..routing.policy import API_KEY
from ..routing.router import RouteResult
from .context import ROUTE

if TYPE_CHECKING:
    from ..usage.service import CachedResult
    from .gateway import Gateway


async def generate(gw: Gateway, request: web.Request | None, req: ImageRequest,
                   base_url: str | None = None) -> tuple[RouteResult | CachedResult, dict]:
    """Route the request (images checked and converted inside each route attempt), then render it.
    Without `request` (a background job), in the caller's task, links under `base_url`."""
    deadline = time.monotonic() + gw.config.server.request_timeout

    async def finish(images: list[GeneratedImage], route_req: ImageRequest, provider: Provider) -> list[FinalImage]:
        return await finish_images(images, route_req, fetcher=gw.fetcher, settings=gw.output,
                                   trusted_origin=provider.trusted_origin)

    result: RouteResult | CachedResult
    if request is None:  # a background job: not metered by the usage ledger, budgets or cache yet
        if base_url is None:
            raise TypeError("generate: a background job (no request) needs base_url")
        result = await gw.router.generate(req, deadline, finish)
    else:
        # A seeded repeat from the cache, else the key's budget is checked (429) before any route is called.
        cached = await gw.usage.before(req, request.get(API_KEY), request.headers.get("Cache-Control"))
        if cached is None:
            routed = await gw.run_work(request, gw.router.generate(req, deadline, finish))
            await gw.usage.after(req, routed)
            result = routed
        else:
            result = cached
        request[ROUTE] = result
        base_url = public_base_url(gw, request)
    items = await render_images(result.images, req, store=gw.store, base_url=base_url)
    for item in items:  # an upstream's text: it may echo what it was sent, keys included
        item["revised_prompt"] = gw.scrubber.text(item["revised_prompt"])
    gw.metrics.child(gw.metrics.images, req.model, result.route.name).inc(len(items))
    out_format = next((img.format for img in result.images if img.format), req.output_format or "png")
    payload = {"created": int(time.time()), "data": items, "output_format": out_format, "size": req.size_text}
    for key in ("quality", "background"):
        if getattr(req, key) is not None:
            payload[key] = getattr(req, key)
    seeds = [img.seed for img in result.images]
    if all(s is not None for s in seeds):
        payload["seeds"] = seeds
    return result, payload


def public_base_url(gw: Gateway, request: web.Request) -> str:
    """Where url answers point: server.public_base_url, else the host the client called."""
    return gw.config.server.public_base_url or f"{request.scheme}://{request.host}"


def route_headers(result: RouteResult | CachedResult) -> dict[str, str]:
    """Which route served and how many calls it took (retries and fallbacks included)."""
    return {"x-qip-route": result.route.name, "x-qip-attempts": str(result.calls)}
