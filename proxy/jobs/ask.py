"""Whether an image call asks to run in the background: `"background": true` (JSON or a form field) or
`Prefer: respond-async` (RFC 7240), and its `webhook_url`. Both fields are taken out of the request's fields
(`background` as a string other than true/false stays: it is OpenAI's transparency option)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import InvalidRequest


@dataclass(frozen=True)
class BackgroundAsk:
    webhook_url: str | None = None
    prefer_header: bool = False  # asked with Prefer: respond-async (answered with Preference-Applied)


BACKGROUND = web.RequestKey("qip_background", BackgroundAsk)
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def prefers_async(prefer: str | None) -> bool:
    """Whether a Prefer header holds the respond-async preference (case-insensitive, any position)."""
    if not prefer:  # most calls have none
        return False
    for part in prefer.split(","):
        token = part.split(";", 1)[0].split("=", 1)[0].strip().lower()
        if token == "respond-async":
            return True
    return False


def take_background(fields: dict[str, Any], prefer: str | None) -> BackgroundAsk | None:
    """The ask (None: answer synchronously); removes `background` (a boolean) and `webhook_url` from fields."""
    flag = fields.get("background")
    wanted = False
    if isinstance(flag, bool) or (isinstance(flag, str) and flag.strip().lower() in _TRUE + _FALSE):
        fields.pop("background")
        wanted = flag if isinstance(flag, bool) else flag.strip().lower() in _TRUE
    header = prefers_async(prefer)
    webhook = fields.pop("webhook_url", None)
    if webhook is not None and not isinstance(webhook, str):
        raise InvalidRequest("Invalid 'webhook_url': must be a string (an https:// URL).", param="webhook_url")
    if not (wanted or header):
        if webhook:
            raise InvalidRequest("'webhook_url' is only used by background requests: add \"background\": true "
                                 "(or the header Prefer: respond-async).", param="webhook_url")
        return None
    return BackgroundAsk(webhook_url=webhook or None, prefer_header=header and not wanted)


def mark_background(request: web.Request, fields: dict[str, Any]) -> None:
    """take_background on an image call's fields; the ask kept on the request for its handler."""
    ask = take_background(fields, request.headers.get("Prefer"))
    if ask is not None:
        request[BACKGROUND] = ask
