"""The work every image call does once parsed, streamed or not: route it (the images checked and converted
inside each route attempt), then render the OpenAI payload."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import AuthenticationFailed
from ..media.output import FinalImage, background_of, finish_images, render_images
from ..providers.base import GeneratedImage, Provider
from ..request import ImageRequest
from ..routing.policy import API_KEY
from ..routing.router import RouteResult
from .context import ROUTE

if TYPE_CHECKING:
    from ..config.server import ApiKey
    from ..jobs.model import Job
    from ..usage.service import CachedResult
    from .gateway import Gateway


async def generate(gw: Gateway, request: web.Request | None, req: ImageRequest,
                   job: Job | None = None) -> tuple[RouteResult | CachedResult, dict]:
    """Route the request (images checked and converted inside each route attempt), then render it.
    Without `request`: a background `job`, run in its own task (its meter opened there), links under its
    base URL. Both go the same way: the seeded cache, the key's budget, the router, the cache entry."""
    deadline = time.monotonic() + gw.config.server.request_timeout

    def finish(images: list[GeneratedImage], route_req: ImageRequest, provider: Provider) -> Awaitable[list[FinalImage]]:
        # finish_images' own coroutine, which the router awaits: no coroutine frame of this step's own
        return finish_images(images, route_req, fetcher=gw.fetcher, settings=gw.output,
                             trusted_origin=provider.trusted_origin)

    if request is not None:
        key, cache_control, held = request.get(API_KEY), request.headers.get("Cache-Control"), None
        # Only url answers point at it (render_images); a b64_json answer need not look up the host.
        base_url = public_base_url(gw, request) if req.response_format != "b64_json" else ""
    elif job is not None:
        key, cache_control = job_key(gw, job), "no-cache" if job.no_cache else None
        # The hold taken at submit is this run's now: its meter settles it, however the run ends.
        held, job.budget_hold = gw.usage.held(job.budget_hold), None
        base_url = job.base_url
    else:
        raise TypeError("generate: a background job (no request) needs its job")
    # A seeded repeat from the cache, else the key's budget is checked (429) before any route is called.
    cached = await gw.usage.before(req, key, cache_control, held=held) if gw.usage.note(req, key, held) else None
    result: RouteResult | CachedResult
    if cached is None:
        work = gw.router.generate(req, deadline, finish)
        routed: RouteResult = await (gw.run_work(request, work) if request is not None else work)
        if req.model in gw.usage.cached_models:  # its images kept for seeded repeats
            await gw.usage.after(req, routed)
        result = routed
    else:
        result = cached
    if request is not None:
        request[ROUTE] = result
    items = await render_images(result.images, req, store=gw.store, base_url=base_url)
    for item in items:  # an upstream's text: it may echo what it was sent, keys included
        item["revised_prompt"] = gw.scrubber.text(item["revised_prompt"])
    gw.metrics.child(gw.metrics.images, req.model, result.route.name).inc(len(items))
    payload: dict = {"created": int(time.time()), "data": items}
    # The format and size the images have (each was checked, and fitted to the resolved size); none for an
    # upstream URL handed on unseen (store.rehost_upstream_urls: false): the proxy cannot say what it holds.
    if all(img.format for img in result.images):
        payload["output_format"], payload["size"] = result.images[0].format, req.size_text
    if req.quality is not None:
        payload["quality"] = req.quality
    # What the images are, not what was asked (an upstream may ignore it; "auto" is resolved, as OpenAI does).
    if req.background is not None and (background := await background_of(result.images)) is not None:
        payload["background"] = background
    seeds = [img.seed for img in result.images]
    if None not in seeds:
        payload["seeds"] = seeds
    return result, payload


def job_key(gw: Gateway, job: Job) -> ApiKey | None:
    """The key a job was submitted with, by its name (None: the proxy has no keys)."""
    key = gw.policy.named(job.key_name)
    if key is None and job.key_name is not None:
        raise AuthenticationFailed(f"The API key this job was submitted with ('{job.key_name}') is no longer "
                                   "configured on this server.")
    return key


def public_base_url(gw: Gateway, request: web.Request) -> str:
    """Where url answers point: server.public_base_url, else the host the client called."""
    return gw.config.server.public_base_url or f"{request.scheme}://{request.host}"


def route_headers(result: RouteResult | CachedResult) -> dict[str, str]:
    """Which route served and how many calls it took (retries and fallbacks included)."""
    return {"x-qip-route": result.route.name, "x-qip-attempts": str(result.calls)}
