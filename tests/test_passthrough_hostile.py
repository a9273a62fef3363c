"""Passthrough against hostile clients and upstreams: methods that echo or tunnel, Expect: 100-continue,
a client that stops reading a chat stream, 1xx final answers, a malformed upstream model list, an upstream
that dies mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from aiohttp import web
from openai import InternalServerError

from .conftest import base_config

MODEL = "qwen-image-placeholder"
PT_KEY = "pt-key-hostile-9f3a"
MESSAGES = [{"role": "user", "content": "hi"}]


def pt_config(tmp_path, base_url: str, **server) -> dict:
    cfg = base_config(tmp_path)
    cfg["passthrough"] = {"base_url": base_url, "api_key": PT_KEY, "timeout": 5}
    if server:
        cfg["server"] = server
    return cfg


async def web_upstream(aiohttp_server, handler) -> str:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return str((await aiohttp_server(app)).make_url("/v1"))


async def raw_upstream(answer) -> tuple[str, asyncio.AbstractServer]:
    """An upstream written on bare sockets: answer(head, reader, writer) after the request head."""

    async def serve(reader, writer):
        with contextlib.suppress(Exception):
            head = await reader.readuntil(b"\r\n\r\n")
            await answer(head, reader, writer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", server


@pytest.mark.parametrize("method", ["TRACE", "PROPFIND"])
async def test_trace_and_other_methods_are_not_forwarded(start_proxy, tmp_path, aiohttp_server, method):
    """TRACE's answer is the request the upstream got, the passthrough key included: it never goes out."""
    seen = []

    async def echo(request):
        seen.append(request.method)
        return web.Response(text="".join(f"{k}: {v}\n" for k, v in request.headers.items()),
                            content_type="message/http")

    server, _ = await start_proxy(pt_config(tmp_path, await web_upstream(aiohttp_server, echo)))
    async with aiohttp.ClientSession() as s, s.request(method, server.make_url("/v1/chat/completions")) as r:
        status, allow, text = r.status, r.headers.get("Allow", ""), await r.text()
    assert status == 405 and "POST" in allow and "TRACE" not in allow
    assert json.loads(text)["error"]["code"] == "method_not_allowed"
    assert PT_KEY not in text and seen == []


async def test_expect_100_continue_reaches_an_upstream_that_sends_no_100(start_proxy, tmp_path):
    """curl sends Expect: 100-continue with bodies over 1 KB. The proxy answers it itself; forwarded, an
    upstream that answers no 100 (it need not) never got the body and the call ended in a 504."""
    bodies = []

    async def no_continue(head, reader, writer):
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        bodies.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                     b"Connection: close\r\n\r\n{}")

    url, upstream = await raw_upstream(no_continue)
    async with upstream:
        server, _ = await start_proxy(pt_config(tmp_path, url))
        body = json.dumps({"model": "m", "messages": MESSAGES, "pad": "x" * 4096}).encode()
        async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/chat/completions"), data=body,
                                                        expect100=True) as r:
            assert r.status == 200, await r.text()
        assert bodies == [body]


async def test_a_client_that_stops_reading_a_chat_stream_is_dropped_with_its_upstream_call(
        start_proxy, tmp_path, aiohttp_server):
    """A client that takes none of a chat stream for server.send_timeout is dropped and the upstream call
    closed; it held the upstream's stream (and a connection) for as long as it kept the socket open."""
    upstream_gone = asyncio.Event()

    async def endless_stream(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": "x" * 4000}, "finish_reason": None}]}
        event = f"data: {json.dumps(chunk)}\n\n".encode()
        try:
            while True:
                await response.write(event)
        finally:  # a ConnectionError, or cancelled: the proxy closed the call
            upstream_gone.set()

    server, client = await start_proxy(pt_config(tmp_path, await web_upstream(aiohttp_server, endless_stream),
                                                 send_timeout=1))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    try:
        first = await anext(aiter(stream))  # the stream flows; then this client reads no more
        assert first.choices[0].delta.content.startswith("x")
        await asyncio.wait_for(upstream_gone.wait(), 60)  # a guard against hanging, not a timing
    finally:
        with contextlib.suppress(Exception):
            await stream.close()


async def test_an_upstream_1xx_final_answer_is_a_502(start_proxy, tmp_path):
    """A 101 to a request that asked for no upgrade (the proxy forwards none) is no answer to hand on."""

    async def switching(head, reader, writer):
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW")

    url, upstream = await raw_upstream(switching)
    async with upstream:
        _, client = await start_proxy(pt_config(tmp_path, url))
        with pytest.raises(InternalServerError) as e:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == 502
    assert e.value.body["code"] == "upstream_error" and "101" in e.value.body["message"]


@pytest.mark.parametrize("data", [
    [{"id": {"nested": 1}}, {"id": ["a"]}, {"id": 7}, {"id": "upstream-model", "object": "model"}],
    5,
])
async def test_a_malformed_upstream_model_list_still_lists_ours(start_proxy, tmp_path, aiohttp_server, data):
    """Ids that are not strings, or `data` that is not a list, were a 500 for GET /v1/models."""

    async def models(request):
        return web.json_response({"object": "list", "data": data})

    _, client = await start_proxy(pt_config(tmp_path, await web_upstream(aiohttp_server, models)))
    ids = [m.id for m in (await client.models.list()).data]
    assert ids == ([MODEL, "upstream-model"] if isinstance(data, list) else [MODEL])


async def test_an_exception_inside_passthrough_is_openai_json_not_aiohttps_bare_500(aiohttp_server, tmp_path, caplog):
    """An error nobody foresaw while forwarding (here aiohttp's ValueError for credentials in the URL,
    which check-config now refuses) used to escape the handler: aiohttp's text/plain 500 "Server got
    itself in trouble". The client gets OpenAI's error JSON; the log gets no password."""
    from openai import AsyncOpenAI

    from proxy import build_app, parse_config

    config = parse_config(pt_config(tmp_path, "https://pt.example/v1"), env={})
    object.__setattr__(config.passthrough, "base_url", "https://alice:hunter2-pw@127.0.0.1:9/v1")
    server = await aiohttp_server(build_app(config))
    async with AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="k", max_retries=0) as client:
        with pytest.raises(InternalServerError) as e:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert e.value.status_code == 500
    assert e.value.body["code"] == "internal_error" and e.value.body["type"] == "server_error"
    assert "hunter2" not in e.value.response.text
    assert "hunter2" not in caplog.text


async def test_an_upstream_that_dies_mid_stream_cuts_the_client_without_an_error_traceback(
        start_proxy, tmp_path, caplog):
    """An upstream that drops a chat stream half-way: the client gets the events sent so far and then a
    cut connection (never a clean end), and the log one WARNING, not aiohttp's ERROR with a traceback."""
    event = b'data: {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}\n\n'

    async def dies(head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(event):x}\r\n".encode() + event + b"\r\n")
        # then the connection closes, with no final chunk

    url, upstream = await raw_upstream(dies)
    async with upstream:
        server, _ = await start_proxy(pt_config(tmp_path, url))
        async with aiohttp.ClientSession() as s, s.post(server.make_url("/v1/chat/completions"),
                                                        json={"model": "m", "messages": MESSAGES, "stream": True}) as r:
            assert r.status == 200
            assert await r.content.readuntil(b"\n\n") == event
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    assert "passthrough stream broke off" in caplog.text
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"], caplog.text
