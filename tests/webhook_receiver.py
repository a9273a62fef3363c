"""A real webhook receiver for tests: an aiohttp server on loopback that checks every message's signature
with the `standardwebhooks` package (the reference implementation) and records what arrived.

`answers`: what to do with each arriving message in turn (the last one repeats): an HTTP status,
"hang" (never answer), or "huge" (a 200 with a 10 MB body)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import dataclass, field

from aiohttp import web
from standardwebhooks import Webhook, WebhookVerificationError

SECRET = "whsec_" + base64.b64encode(b"test-webhook-secret-32-bytes-long!").decode()


@dataclass
class Arrival:
    msg_id: str
    event: str
    job_id: str
    verified: bool
    body: dict


@dataclass
class Receiver:
    secret: str = SECRET
    answers: list = field(default_factory=lambda: [200])
    arrivals: list[Arrival] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    huge_bytes_sent: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        return app

    async def start(self, aiohttp_server) -> Receiver:
        server = await aiohttp_server(self.app())
        self.url = str(server.make_url("/hook"))
        return self

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            payload = Webhook(self.secret).verify(raw, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            payload, verified = json.loads(raw), False
        self.arrivals.append(Arrival(request.headers.get("webhook-id", ""), payload.get("type", ""),
                                     payload.get("data", {}).get("id", ""), verified, payload))
        self.changed.set()
        answer = self.answers[min(len(self.arrivals) - 1, len(self.answers) - 1)]
        if answer == "hang":
            await asyncio.sleep(3600)
        if answer == "huge":
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            chunk = os.urandom(1 << 16)
            try:
                for _ in range(160):  # 10 MB
                    await response.write(chunk)
                    self.huge_bytes_sent += len(chunk)
            except (ConnectionError, asyncio.CancelledError):
                pass
            return response
        return web.json_response({"ok": True}, status=answer)

    async def wait_for(self, count: int, timeout: float = 60) -> list[Arrival]:
        """Until at least `count` messages arrived (generous timeout: a busy machine)."""
        async with asyncio.timeout(timeout):
            while len(self.arrivals) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.arrivals
