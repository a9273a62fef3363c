"""The request log line of passthrough calls: one per call, in the image line's format, once its answer has
ended (streams included), with how it ended, and never a key, a query or a field the client wrote."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import openai
import pytest
from aiohttp import web
from openai import AsyncOpenAI
from yarl import URL

from .conftest import base_config
from .fake_openai_upstream import FakeOpenAIUpstream, free_port
from .otlp_receiver import OtlpReceiver
from .test_lifecycle import serve, wait_exit, wait_listening
from .test_passthrough_hostile import raw_upstream

PT_KEY = "sk-pt-log-key-61d0c3"
PROXY_KEY = "sk-proxy-log-key-2b77e9"
MESSAGES = [{"role": "user", "content": "hi"}]


def pt_config(tmp_path, base_url: str, **server) -> dict:
    cfg = base_config(tmp_path)
    cfg["passthrough"] = {"base_url": base_url, "api_key": PT_KEY, "timeout": 5}
    cfg["server"] = {"api_keys": [{"name": "team-a", "key": PROXY_KEY}], **server}
    return cfg


def fields(line: str) -> dict[str, str]:
    """A text log line's key=value fields (a value never holds a space)."""
    return dict(part.split("=", 1) for part in line.split(" "))


async def lines(caplog, count: int) -> list[dict[str, str]]:
    """The proxy.requests lines, once `count` are there."""
    for _ in range(100):
        found = [r.getMessage() for r in caplog.records if r.name == "proxy.requests"]
        if len(found) >= count:
            return [fields(line) for line in found]
        await asyncio.sleep(0.02)
    raise AssertionError(f"wanted {count} request lines, got {found}")


async def test_chat_embeddings_and_streams_get_one_line_each(start_proxy, tmp_path, aiohttp_server, caplog):
    caplog.set_level("INFO", logger="proxy.requests")
    up = await FakeOpenAIUpstream(api_key=PT_KEY).start(aiohttp_server)
    up.stream_delay = 0.05
    server, client = await start_proxy(pt_config(tmp_path, f"{up.url}/v1"), api_key=PROXY_KEY)
    chat = await client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert len([c async for c in stream]) == 4
    await client.embeddings.create(model="text-embedding-3-small", input="x")
    await client.images.generate(model="dall-e-3", prompt="p", size="1024x1024")  # a model served elsewhere
    await client.models.retrieve("gpt-4o-mini")  # (likewise)
    got = await lines(caplog, 5)
    assert len(got) == 5  # one each: the calls passed on are logged once, as passthrough
    for line, path in zip(got, ["/v1/chat/completions", "/v1/chat/completions", "/v1/embeddings",
                                "/v1/images/generations", "/v1/models/gpt-4o-mini"], strict=True):
        assert line["endpoint"] == path and line["route"] == "passthrough" and line["attempts"] == "1"
        assert line["status"] == "200" and line["outcome"] == "ok"
        assert line["method"] == ("GET" if "models" in path else "POST")
        assert line["key"] == "team-a" and line["trace_id"] == "-"
    assert all(line["model"] == "-" for line in got)  # (the body is forwarded unread)
    # The line's id is the one the client got back (the upstream sent none of its own).
    assert chat.headers["X-Request-Id"] == got[0]["request_id"]
    # Logged when the stream ended: its duration covers the four chunks 50 ms apart.
    assert int(got[1]["duration_ms"]) >= 150
    assert PT_KEY not in caplog.text and PROXY_KEY not in caplog.text


async def test_refusals_and_upstream_errors_are_logged(start_proxy, tmp_path, aiohttp_server, caplog):
    caplog.set_level("INFO", logger="proxy.requests")
    up = await FakeOpenAIUpstream(api_key=PT_KEY).start(aiohttp_server)
    server, client = await start_proxy(pt_config(tmp_path, f"{up.url}/v1"), api_key=PROXY_KEY)
    up.respond_with = (429, {"error": {"message": f"slow down {PT_KEY}", "type": "rate_limit_error"}}, {})
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="not-a-key", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    async with aiohttp.ClientSession() as s, s.request("TRACE", server.make_url("/v1/chat/completions"),
                                                       headers={"Authorization": f"Bearer {PROXY_KEY}"}) as r:
        assert r.status == 405
    limited, refused, traced = await lines(caplog, 3)
    assert traced["status"] == "405" and traced["route"] == "-" and traced["method"] == "TRACE"
    assert limited["status"] == "429" and limited["outcome"] == "rate_limited" and limited["route"] == "passthrough"
    assert refused["status"] == "401" and refused["outcome"] == "client_error" and refused["key"] == "-"
    assert refused["route"] == "-" and refused["attempts"] == "0"  # the upstream was never called
    assert PT_KEY not in caplog.text and "not-a-key" not in caplog.text


async def test_an_unreachable_upstream_is_logged_as_the_502_the_client_got(start_proxy, tmp_path, caplog):
    caplog.set_level("INFO", logger="proxy.requests")
    _, client = await start_proxy(pt_config(tmp_path, f"http://127.0.0.1:{free_port()}/v1"), api_key=PROXY_KEY)
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert e.value.status_code == 502 and e.value.body["code"] == "upstream_error"
    assert set(e.value.body) == {"message", "type", "param", "code"}
    (line,) = await lines(caplog, 1)
    assert line["status"] == "502" and line["outcome"] == "failed" and line["route"] == "passthrough"


async def test_a_stream_the_upstream_broke_off_is_logged_as_failed(start_proxy, tmp_path, caplog):
    caplog.set_level("INFO", logger="proxy.requests")
    event = b'data: {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}\n\n'

    async def dies(head, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + f"{len(event):x}\r\n".encode() + event + b"\r\n")  # then closes, with no final chunk

    url, upstream = await raw_upstream(dies)
    async with upstream:
        server, _ = await start_proxy(pt_config(tmp_path, url))
        async with aiohttp.ClientSession() as s, s.post(
                server.make_url("/v1/chat/completions"), headers={"Authorization": f"Bearer {PROXY_KEY}"},
                json={"model": "m", "messages": MESSAGES, "stream": True}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    (line,) = await lines(caplog, 1)
    assert line["status"] == "200" and line["outcome"] == "failed" and line["route"] == "passthrough"


async def test_a_client_that_leaves_a_stream_is_logged_as_cancelled(start_proxy, tmp_path, aiohttp_server, caplog):
    caplog.set_level("INFO", logger="proxy.requests")
    up = await FakeOpenAIUpstream(api_key=PT_KEY).start(aiohttp_server)
    up.stream_gate = asyncio.Event()  # the stream holds after its first chunk
    server, _ = await start_proxy(pt_config(tmp_path, f"{up.url}/v1"))
    async with aiohttp.ClientSession() as s, s.post(
            server.make_url("/v1/chat/completions"), headers={"Authorization": f"Bearer {PROXY_KEY}"},
            json={"model": "m", "messages": MESSAGES, "stream": True}) as r:
        assert r.status == 200
        await r.content.readuntil(b"\n\n")
    # (the session closed with the stream half read: the client is gone)
    (line,) = await lines(caplog, 1)
    assert line["status"] == "499" and line["outcome"] == "cancelled" and line["route"] == "passthrough"
    up.stream_gate.set()


async def test_the_logged_path_has_no_query_no_secret_and_no_field_of_the_clients(start_proxy, tmp_path,
                                                                                  aiohttp_server, caplog):
    caplog.set_level("INFO", logger="proxy.requests")
    up = await FakeOpenAIUpstream(api_key=PT_KEY).start(aiohttp_server)
    server, _ = await start_proxy(pt_config(tmp_path, f"{up.url}/v1"))
    path = f"/v1/echo%20key=admin%20status=200/{PT_KEY}/{'x' * 500}?api-key=sk-query-secret-77aa"
    async with aiohttp.ClientSession() as s, s.get(URL(str(server.make_url("/")).rstrip("/") + path, encoded=True),
                                                   headers={"Authorization": f"Bearer {PROXY_KEY}"}) as r:
        assert r.status == 404  # the fake upstream's own answer: it was forwarded
    (line,) = await lines(caplog, 1)
    assert line["key"] == "team-a" and line["status"] == "404"  # the client's "key=admin" wrote no field
    assert line["endpoint"].startswith("/v1/echo%20key%3Dadmin%20status%3D200/")
    assert line["endpoint"].endswith("...") and len(line["endpoint"]) == 203
    assert PT_KEY not in caplog.text and "sk-query-secret" not in caplog.text and "api-key" not in caplog.text


async def test_serve_writes_passthrough_lines_as_json(tmp_path, aiohttp_server):
    """`serve` with log_format: json and traces, as an operator runs it: the passthrough calls are lines with
    the image line's keys and their trace ids, and no key anywhere in the output."""
    up = await FakeOpenAIUpstream(api_key=PT_KEY).start(aiohttp_server)
    receiver = await OtlpReceiver().start(aiohttp_server)
    port = free_port()
    cfg = pt_config(tmp_path, f"{up.url}/v1", port=port, log_format="json")
    cfg["telemetry"] = {"otlp_endpoint": receiver.url}
    proc, _ = serve(cfg, tmp_path)
    try:
        await wait_listening(port, proc)
        async with AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=PROXY_KEY, max_retries=0) as client:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                 extra_headers={"X-Request-Id": "req-chat-1"})
            stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                          extra_headers={"X-Request-Id": "req-chat-2"})
            assert len([c async for c in stream]) == 4
        await asyncio.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        await wait_exit(proc, 30)
    output = proc.stdout.read().decode()
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]
    requests = [e for e in entries if e["logger"] == "proxy.requests"]
    assert [e["request_id"] for e in requests] == ["req-chat-1", "req-chat-2"]
    for e in requests:
        assert e["endpoint"] == "/v1/chat/completions" and e["route"] == "passthrough" and e["attempts"] == 1
        assert e["status"] == 200 and e["outcome"] == "ok" and e["key"] == "team-a" and e["method"] == "POST"
        assert isinstance(e["duration_ms"], int) and e["level"] == "info" and len(e["trace_id"]) == 32
    assert PT_KEY not in output and PROXY_KEY not in output


async def test_a_body_over_the_limit_is_logged_as_the_413_with_or_without_a_length(start_proxy, tmp_path,
                                                                                   aiohttp_server, caplog):
    """A sized body over server.max_body_mb is refused before the upstream is called (route=- attempts=0); a
    chunked one cannot be judged before it is read, so it was streamed upstream and cut at the limit: the
    client gets the same 413, the upstream a request that never ended, and the line says it was called."""
    caplog.set_level("INFO", logger="proxy.requests")
    got: list[tuple[int, bool]] = []  # (bytes the upstream read, whether the body ended)

    async def reader(request: web.Request) -> web.Response:
        read, ended = 0, False
        try:
            async for chunk in request.content.iter_any():
                read += len(chunk)
            ended = True
        finally:
            got.append((read, ended))
        return web.json_response({"read": read})

    upstream = web.Application()
    upstream.router.add_route("*", "/{tail:.*}", reader)
    up = await aiohttp_server(upstream)
    server, _ = await start_proxy(pt_config(tmp_path, str(up.make_url("/v1")), max_body_mb=0.01), api_key=PROXY_KEY)
    limit = int(0.01 * 1024 * 1024)

    async def chunked():
        for _ in range(40):  # 40,000 bytes in 1,000-byte chunks, no Content-Length
            yield b"x" * 1000
            await asyncio.sleep(0.002)

    url, auth = server.make_url("/v1/chat/completions"), {"Authorization": f"Bearer {PROXY_KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=b"x" * 40000, headers=auth) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
        async with s.post(url, data=chunked(), headers=auth) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "payload_too_large"
    sized, streamed = await lines(caplog, 2)
    assert (sized["route"], sized["attempts"], sized["status"]) == ("-", "0", "413")
    assert (streamed["route"], streamed["attempts"], streamed["status"]) == ("passthrough", "1", "413")
    assert streamed["outcome"] == sized["outcome"] == "client_error"
    for _ in range(100):  # the upstream's handler ends once the cut connection reaches it
        if got:
            break
        await asyncio.sleep(0.02)
    assert len(got) == 1 and got[0][0] <= limit and not got[0][1]  # the chunked one only, cut at the limit
