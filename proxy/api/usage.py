"""GET /v1/organization/usage/images and /v1/organization/costs: OpenAI's usage API over the ledger
(admin keys only)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import ProxyError, ServiceUnavailable
from ..routing.policy import API_KEY
from ..usage.aggregate import Partial
from ..usage.report import (
    COST_GROUPS,
    IMAGE_GROUPS,
    WIDTHS,
    Query,
    costs_by_call,
    costs_page,
    images_page,
    page_window,
    parse_query,
)

if TYPE_CHECKING:
    from .gateway import Gateway


# Seconds a usage query may take before the answer is a 503 (a database that hangs must not hold clients).
QUERY_TIMEOUT = 30.0


class NotAdmin(ProxyError):
    status = 403
    type = "invalid_request_error"
    code = "insufficient_permissions"


async def _partials(gw: Gateway, request: web.Request, groups: tuple[str, ...],
                    widths: tuple[str, ...] | None = None, by_call: bool = False) -> tuple[Query, list[Partial]]:
    """The page's records summed in the database (a month of records is a few hundred rows here)."""
    key = request.get(API_KEY)
    if gw.policy.enabled and (key is None or not key.admin):
        raise NotAdmin("The usage API needs an admin key (admin: true under server.api_keys).")
    writer = gw.usage.writer
    if writer is None:
        raise ServiceUnavailable("The usage ledger is off (usage.enabled: false).", code="usage_disabled")
    q = parse_query(request.query, groups, time.time(), **({"widths": widths} if widths else {}))
    # What this proxy has not written yet counts too (one try: a failing database answers 503 below).
    await writer.flush(timeout=gw.config.usage.write_timeout, failures=1)
    try:
        lo, hi = page_window(q)
        parts = await asyncio.wait_for(writer.backend.aggregate(lo, hi, q.page_start, WIDTHS[q.width],
                                                                by_call and costs_by_call(q)), QUERY_TIMEOUT)
    except Exception:  # noqa: BLE001 - the database is down: a clear 503, not a traceback
        raise ServiceUnavailable("The usage database is unavailable; retry shortly.", retry_after=5,
                                 code="usage_unavailable") from None
    return q, parts


def _json(page: dict) -> web.Response:
    return web.Response(text=json.dumps(page), content_type="application/json")


async def usage_images(gw: Gateway, request: web.Request) -> web.Response:
    q, parts = await _partials(gw, request, IMAGE_GROUPS)
    return _json(images_page(q, parts))


async def costs(gw: Gateway, request: web.Request) -> web.Response:
    q, parts = await _partials(gw, request, COST_GROUPS, by_call=True)
    return _json(costs_page(q, parts))


PATHS = {"/v1/organization/usage/images": usage_images, "/v1/organization/costs": costs}
