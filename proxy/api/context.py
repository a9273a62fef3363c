"""What a request carries between the middleware and the handlers, and the exception that hands it on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import ProxyError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MODEL = web.RequestKey("qip_model", str)
# The raw body once read, so a request for a model served elsewhere can still be passed on.
BODY = web.RequestKey("qip_body", bytes)
# The RouteResult of a served image request (route name and attempts for headers and the log).
ROUTE = web.RequestKey("qip_route", object)
# Set when an image call was passed on (passthrough) rather than served here.
PASSED_ON = web.RequestKey("qip_passed_on", bool)
# The error a stream ended with (its HTTP status was 200 before it was known).
STREAM_ERROR = web.RequestKey("qip_stream_error", ProxyError)
# Set once a passthrough call goes to the upstream: "", or when its answer ended before its end, how, in the
# log line's `outcome` words: "failed" or "timeout" (the upstream broke off or went silent), "cancelled" (the
# client left, or was dropped).
FORWARDED = web.RequestKey("qip_forwarded", str)
# The usage meter of an image request (proxy/usage/): its calls and costs, recorded when it ends.
METER = web.RequestKey("qip_usage_meter", object)


class NotServedHere(Exception):
    """An image call for a model this proxy does not serve: the next handler (or passthrough) gets it."""
