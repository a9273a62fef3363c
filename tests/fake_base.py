"""What the native vendors' fakes share: the record of a request, and serving one aiohttp app."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass
class Received:
    """One request as a fake saw it."""

    method: str
    path: str
    headers: CIMultiDict
    json: Any = None
    at: float = field(default_factory=time.monotonic)


class ServedFake:
    """A fake whose `dispatch` answers every path; `start` serves it and sets `url`."""

    url: str

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.dispatch)
        return app

    async def start(self, aiohttp_server):
        server = await aiohttp_server(self.app())
        self.url = str(server.make_url("")).rstrip("/")
        return self
