"""Health, readiness, metrics, the model list and the image files behind response_format=url."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ..errors import ModelNotFound, NotFound, UpstreamError
from ..http.cpu import run_cpu
from ..providers.base import read_answer
from ..request import MAX_N
from ..state.store import StoreUnavailable
from .context import NotServedHere

if TYPE_CHECKING:
    from .gateway import Gateway

# Route states that mean "this model can get there" (now, or once loaded / cooled down).
_POSSIBLE = {"ready", "loading", "circuit_open", "half_open"}


def model_states(gw: Gateway) -> dict[str, dict]:
    """Each model's routes and their states (never a secret: reasons name variables, not values)."""
    models = {}
    for name in gw.config.models:
        routes = []
        for route in gw.router.routes[name]:
            info = route.provider.describe()
            info.update(state=route.state, circuit=route.breaker.state)
            if route.provider.loading_stage:
                info["reason"] = route.provider.loading_stage
            routes.append(info)
        ready = any(r["ready"] for r in routes)
        possible = any(r["state"] in _POSSIBLE for r in routes)
        state = "ready" if ready else ("loading" if any(r["state"] == "loading" for r in routes)
                                       else "unavailable")
        models[name] = {"ready": ready, "state": state, "possible": possible, "routes": routes}
    return models


async def health(gw: Gateway, request: web.Request) -> web.Response:
    """Liveness: 200 while the process serves, whatever its models are doing."""
    return web.json_response({"status": "draining" if gw.draining else "ok", "pid": os.getpid(),
                              "models": model_states(gw), "shared_state": gw.state.health()})


async def ready(gw: Gateway, request: web.Request) -> web.Response:
    """Readiness: 200 when every model that has a possible route can serve now; 503 while loading or draining.

    A shared state (Redis) that cannot be reached makes it "degraded", still 200: every instance shares that
    Redis, so a load balancer pulling them all would turn an outage of limited keys into one of every key.
    The body, the qip_shared_state_up gauge and its alert say so instead."""
    models = model_states(gw)
    waiting = [name for name, m in models.items() if m["possible"] and not m["ready"]]
    ok = not gw.draining and not waiting
    shared = gw.state.health()
    status = "draining" if gw.draining else ("not_ready" if not ok else "ready" if shared["reachable"]
                                             else "degraded")
    body = {"status": status, "waiting_for": waiting, "shared_state": shared, "models": models}
    return web.json_response(body, status=200 if ok else 503)


async def metrics(gw: Gateway, request: web.Request) -> web.Response:
    gw.metrics.refresh(gw)
    return web.Response(body=gw.metrics.render(), headers={"Content-Type": gw.metrics.content_type})


def _model_card(gw: Gateway, name: str) -> dict:
    """OpenAI's model object, plus what this model can do here (apps and the playground read it)."""
    cfg = gw.config.models[name]
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": cfg.owned_by}
    if cfg.description:
        card["description"] = cfg.description
    table = gw.size_tables[name]
    card["capabilities"] = {
        "sizes": {tier: {ratio: f"{w}x{h}" for ratio, (w, h) in ratios.items()}
                  for tier, ratios in table.tiers.items()},
        "default_size": "{}x{}".format(*table.default),
        # {name, source: size_tables | built-in | inline, picked_by: sizes | family}
        "size_table": gw.config.size_table_choice(name),
        "max_side": table.max_side,
        "max_pixels": table.max_pixels,
        "max_n": MAX_N,
        "edits": cfg.max_input_images > 0,
        "max_input_images": cfg.max_input_images,
        "stream": True,
        "routes": [{"name": r.name, "kind": r.provider.kind, "state": r.state} for r in gw.router.routes[name]],
    }
    tiers = next((t for r in gw.router.routes[name] if (t := getattr(r.provider, "tiers", None))), None)
    if tiers:
        card["capabilities"]["tiers"] = tiers  # [{name, steps, cfg_scale}], base first
    levels = next((a for r in gw.router.routes[name] if (a := getattr(r.provider, "accelerations", None))), None)
    if levels:
        card["capabilities"]["accelerations"] = levels  # fal's acceleration: the block cache's levels
    return card


async def list_models(gw: Gateway, request: web.Request) -> web.Response:
    data = [_model_card(gw, name) for name in gw.config.models]
    if gw.passthrough:
        data += await _upstream_models(gw, request, exclude={m["id"] for m in data})
    return web.json_response({"object": "list", "data": data})


# The passthrough upstream's model list, at most (OpenAI's runs to a few hundred KB).
MODEL_LIST_BYTES = 8 << 20


async def _upstream_models(gw: Gateway, request: web.Request, exclude: set[str]) -> list[dict]:
    """The passthrough upstream's models, so apps see one list; ours win on a name clash."""
    if gw.passthrough is None or gw.http is None:  # no passthrough, or not started
        return []
    headers = {}
    auth = gw.config.passthrough.api_key
    if auth:
        headers["Authorization"] = f"Bearer {auth}"
    elif "Authorization" in request.headers and not gw.has_keys:
        headers["Authorization"] = request.headers["Authorization"]
    try:
        async with gw.http.get(f"{gw.passthrough.base_url}/models", headers=headers, allow_redirects=False,
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            raw = await read_answer(resp, MODEL_LIST_BYTES, "the passthrough upstream")
        payload = await run_cpu(len(raw), json.loads, raw) if resp.status == 200 else {}
    except (TimeoutError, aiohttp.ClientError, ValueError, UpstreamError):
        payload = {}
    items = payload.get("data") if isinstance(payload, dict) else None
    # Only model objects with a string id: `"data": 5` or an id that is an object was a 500 here.
    return [m for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)
            and m["id"] not in exclude] if isinstance(items, list) else []


async def get_model(gw: Gateway, request: web.Request) -> web.StreamResponse:
    name = request.path[len("/v1/models/"):]
    if name in gw.config.models:
        return web.json_response(_model_card(gw, name))
    if gw.passthrough or gw.mounted:
        raise NotServedHere
    raise ModelNotFound(f"The model '{name}' does not exist.", param="model")


async def image_file(gw: Gateway, request: web.Request) -> web.StreamResponse:
    name = request.path.rsplit("/images/", 1)[1]
    found = await gw.store.open(name)
    if found is None:
        raise NotFound("This image does not exist or has expired.", code="image_not_found")
    # Kept by a browser no longer than the store keeps it: after that the link must stop working.
    max_age = 3600 if found.expires_at is None else max(0, int(found.expires_at - time.time()))
    # nosniff: a browser takes the stored type as it is (an image), never guesses HTML or script from bytes.
    headers = {"Content-Type": found.content_type, "Cache-Control": f"private, max-age={max_age}",
               "X-Content-Type-Options": "nosniff"}
    if found.path is not None:
        return web.FileResponse(found.path, headers=headers)
    response = web.StreamResponse(headers=headers)  # an object in a bucket, streamed through
    response.content_length = found.size
    await response.prepare(request)
    if request.method != "HEAD" and found.chunks is not None:
        try:
            async for chunk in found.chunks:
                await response.write(chunk)
        except StoreUnavailable:  # headers are out: cut the connection, the client sees a short body
            if request.transport is not None:
                request.transport.close()
            return response
    await response.write_eof()
    return response
