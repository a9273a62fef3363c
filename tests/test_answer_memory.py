"""Idle keep-alive connections hold no answers: aiohttp keeps a connection's last response until the
next request arrives on it, so an answer not let go of once sent would stay in memory once per open
connection (thousands of them on a busy gateway)."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import json
import tracemalloc

import aiohttp
from PIL import Image

from proxy.http.cpu import INLINE_BYTES

from .conftest import base_config

CONNECTIONS = 24


async def test_answers_are_let_go_once_sent_on_connections_kept_open(start_proxy, tmp_path):
    server, _ = await start_proxy(base_config(tmp_path))
    url = str(server.make_url("/v1/images/generations"))
    body = {"model": "qwen-image-placeholder", "prompt": "a cat", "size": "256x256", "response_format": "b64_json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        async def one() -> bytes:
            async with http.post(url, json=body, headers={"Authorization": "Bearer test"}) as r:
                assert r.status == 200
                return await r.read()

        await one()  # warm-up: what the first call builds once is not an answer
        tracemalloc.start(1)
        try:
            answers = await asyncio.gather(*(one() for _ in range(CONNECTIONS)))  # each on its own connection
            await asyncio.sleep(0.1)
            gc.collect()
            snapshot = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        assert len(http.connector._conns) == 1 and sum(len(c) for c in http.connector._conns.values()) == CONNECTIONS
    size = len(answers[0])
    assert size <= INLINE_BYTES  # a small answer: sent as one piece of bytes
    png = base64.b64decode(json.loads(answers[0])["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(png)).size == (256, 256)
    # What the proxy's answer-building code allocated and still holds, with every connection open.
    held = sum(t.size for t in snapshot.filter_traces([tracemalloc.Filter(True, "*/proxy/api/*")]).traces)
    assert held < 2 * size, f"{held} bytes of answers held by {CONNECTIONS} idle connections (one answer: {size})"
