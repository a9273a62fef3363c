"""End to end: every other /v1 call goes through unchanged to the passthrough upstream; the mounted middleware."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from openai import AsyncOpenAI, AuthenticationError, InternalServerError, NotFoundError, RateLimitError
from PIL import Image
from yarl import URL

from proxy import Gateway, image_proxy_middleware, parse_config
from proxy.app import GATEWAY

from .conftest import base_config
from .fake_openai_upstream import FakeOpenAIUpstream, free_port

MODEL = "qwen-image-placeholder"
CLIENT_KEY = "client-key-xyz"
PT_KEY = "pt-key-123"


@pytest.fixture
async def upstream(aiohttp_server) -> FakeOpenAIUpstream:
    return await FakeOpenAIUpstream(api_key=PT_KEY).start(aiohttp_server)


def pt_config(tmp_path, base_url: str, **passthrough) -> dict:
    cfg = base_config(tmp_path)
    cfg["passthrough"] = {"base_url": base_url, "api_key": PT_KEY, **passthrough}
    return cfg


async def call(server, method: str, path: str, *, data=None, headers=None):
    # encoded=True: the path and query go out exactly as written (yarl would otherwise normalize them).
    url = URL(str(server.make_url("/")).rstrip("/") + path, encoded=True)
    async with aiohttp.ClientSession() as s, s.request(method, url, data=data, headers=headers or {}) as r:
        return r.status, r.headers, await r.read()


def assert_openai_error(text: str | bytes) -> dict:
    text = text.decode() if isinstance(text, bytes) else text
    assert "Traceback" not in text
    body = json.loads(text)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- forwarding ------------------------------------------------------------------------------------


async def test_chat_completion(start_proxy, tmp_path, upstream):
    _, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"), api_key=CLIENT_KEY)
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}],
                                             temperature=0.25)
    assert r.choices[0].message.content == "echo: hello"
    (got,) = upstream.calls_to("/chat/completions")
    assert got.method == "POST" and got.path == "/v1/chat/completions"
    assert got.json == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}],
                        "temperature": 0.25}
    assert got.headers["Authorization"] == f"Bearer {PT_KEY}"
    assert not any(CLIENT_KEY in v for v in got.headers.values())
    # The SDK's own headers arrive as they were sent.
    assert got.headers["User-Agent"].startswith("AsyncOpenAI/Python")
    assert got.headers["X-Stainless-Lang"] == "python"


async def test_body_bytes_unchanged(start_proxy, tmp_path, upstream):
    server, _ = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    raw = b'{ "model":"gpt-4o-mini",\n  "messages": [{"role":"user","content":"caf\xc3\xa9 \\u00e9"}], "z": 1.50 }'
    status, headers, body = await call(server, "POST", "/v1/chat/completions", data=raw,
                                       headers={"Content-Type": "application/json"})
    assert status == 200 and headers["X-Upstream"] == "fake"
    assert upstream.calls_to("/chat/completions")[0].body == raw
    assert json.loads(body)["choices"][0]["message"]["content"] == "echo: café é"


async def test_chat_stream_is_not_buffered(start_proxy, tmp_path, upstream):
    upstream.stream_gate = asyncio.Event()
    upstream.stream_chunks = 5
    _, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    stream = await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                  messages=[{"role": "user", "content": "count"}])
    chunks = stream.__aiter__()
    # The upstream holds after its first chunk until we have it: a proxy that buffers never delivers it.
    first = await asyncio.wait_for(chunks.__anext__(), timeout=30)
    assert first.choices[0].delta.content == "part0 "
    assert not upstream.stream_finished.is_set()
    upstream.stream_gate.set()
    rest = [c.choices[0].delta.content async for c in chunks]
    assert rest == [f"part{i} " for i in range(1, 5)]
    assert upstream.stream_finished.is_set()
    assert upstream.calls_to("/chat/completions")[0].json["stream"] is True


async def test_many_open_chat_streams_at_once(start_proxy, tmp_path, upstream):
    """Long chat streams through passthrough are not capped in number (an HTTP client's usual 100
    connections would hold the 101st until another stream ends)."""
    upstream.stream_gate = asyncio.Event()
    upstream.stream_chunks = 2
    _, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))

    async def chat(i):
        stream = await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                      messages=[{"role": "user", "content": f"hi {i}"}])
        return [c.choices[0].delta.content async for c in stream]

    chats = [asyncio.ensure_future(chat(i)) for i in range(120)]
    for _ in range(100):  # every stream opens and holds after its first chunk, until the gate opens
        if len(upstream.calls_to("/chat/completions")) == 120:
            break
        await asyncio.sleep(0.05)
    opened = len(upstream.calls_to("/chat/completions"))
    upstream.stream_gate.set()
    results = await asyncio.gather(*chats)
    assert opened == 120
    assert all(r == ["part0 ", "part1 "] for r in results)


async def test_stream_bytes_unchanged(start_proxy, tmp_path, upstream):
    server, _ = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    status, headers, data = await call(server, "POST", "/v1/chat/completions", data=body,
                                       headers={"Content-Type": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in data.decode().split("\n\n") if e]
    assert len(events) == upstream.stream_chunks + 1 and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


async def test_embeddings(start_proxy, tmp_path, upstream):
    _, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    r = await client.embeddings.create(model="text-embedding-3-small", input=["ab", "cde"])
    assert [d.embedding for d in r.data] == [[2.0, 0.0, 0.5], [3.0, 1.0, 0.5]]
    (got,) = upstream.calls_to("/embeddings")
    assert got.path == "/v1/embeddings" and got.json["input"] == ["ab", "cde"]


async def test_query_and_custom_headers(start_proxy, tmp_path, upstream):
    server, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "q"}],
        extra_query={"api-version": "2024-10-01", "tag": "a b"},
        extra_headers={"X-Custom-Thing": "value-1", "OpenAI-Organization": "org-7"},
    )
    got = upstream.calls_to("/chat/completions")[0]
    assert got.query == {"api-version": ["2024-10-01"], "tag": ["a b"]}
    assert got.headers["X-Custom-Thing"] == "value-1" and got.headers["OpenAI-Organization"] == "org-7"

    # The raw query string goes through byte for byte: order, repeats and escapes.
    status, _, body = await call(server, "GET", "/v1/things/echo?b=2&a=1&a=3&sp=a%20b%2Fc&empty=")
    assert status == 200
    got = upstream.calls_to("/echo")[0]
    assert got.path == "/v1/things/echo" and got.method == "GET"
    assert got.raw_query == "b=2&a=1&a=3&sp=a%20b%2Fc&empty="
    assert json.loads(body)["echo"]["query"] == {"b": ["2"], "a": ["1", "3"], "sp": ["a b/c"], "empty": [""]}


async def test_hop_by_hop_headers_dropped(start_proxy, tmp_path, upstream):
    upstream.echo_response_headers = {"Connection": "X-Upstream-Hop", "X-Upstream-Hop": "1",
                                      "Proxy-Authenticate": "Basic realm=x", "X-Upstream-Kept": "yes"}
    server, _ = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    status, headers, _ = await call(server, "POST", "/v1/echo", data=b"{}", headers={
        "Content-Type": "application/json",
        "Authorization": f"Bearer {CLIENT_KEY}",
        "Connection": "keep-alive, X-Hop-Secret",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "X-Hop-Secret": "do-not-forward",
        "X-End-To-End": "kept",
    })
    assert status == 200
    got = upstream.calls_to("/echo")[0].headers
    for name in ("Keep-Alive", "TE", "Proxy-Authorization", "X-Hop-Secret"):
        assert name not in got, name
    assert "X-Hop-Secret" not in got.get("Connection", "")
    assert got["X-End-To-End"] == "kept"
    assert got["Authorization"] == f"Bearer {PT_KEY}"
    assert got["X-Forwarded-Proto"] == "http" and got["X-Forwarded-For"] == "127.0.0.1"
    # And on the way back.
    assert headers["X-Upstream-Kept"] == "yes" and headers["X-Upstream"] == "fake"
    assert "X-Upstream-Hop" not in headers and "Proxy-Authenticate" not in headers


async def test_client_authorization_forwarded_without_passthrough_key(start_proxy, tmp_path, upstream):
    cfg = pt_config(tmp_path, f"{upstream.url}/v1", api_key=None)
    _, client = await start_proxy(cfg, api_key=PT_KEY)  # the client holds the upstream's key itself
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "k"}])
    assert r.choices[0].message.content == "echo: k"
    assert upstream.calls_to("/chat/completions")[0].headers["Authorization"] == f"Bearer {PT_KEY}"


async def test_upstream_errors_passed_back_unchanged(start_proxy, tmp_path, upstream):
    server, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    error = {"error": {"message": "upstream says slow down", "type": "rate_limit_error", "param": None,
                       "code": "rate_limit_exceeded", "extra_field": 1}}
    upstream.respond_with = (429, error, {"Retry-After": "11", "X-Upstream-Marker": "m"})
    with pytest.raises(RateLimitError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 429
    assert e.value.response.json() == error
    assert e.value.response.headers["retry-after"] == "11"
    assert e.value.response.headers["x-upstream-marker"] == "m"
    upstream.respond_with = None

    status, _, body = await call(server, "POST", "/v1/no-such-endpoint", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    assert status == 404
    assert json.loads(body)["error"] == {"message": "Unknown path POST /v1/no-such-endpoint",
                                         "type": "invalid_request_error", "code": "NOT_FOUND"}

    with pytest.raises(NotFoundError) as e:
        await client.models.retrieve("not-upstream-either")
    assert e.value.response.json()["error"]["code"] == "MODEL_NOT_FOUND"
    assert (await client.models.retrieve("gpt-4o-mini")).owned_by == "fake-upstream"


async def test_wrong_passthrough_key_gives_upstream_401(start_proxy, tmp_path, upstream):
    _, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1", api_key="wrong-pt-key"))
    with pytest.raises(AuthenticationError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.response.json()["error"]["code"] == "AUTHENTICATION_FAILED"
    assert "wrong-pt-key" not in e.value.response.text


async def test_other_image_models_forwarded(start_proxy, tmp_path, upstream):
    server, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    raw = (b'{"model": "dall-e-3",  "prompt": "a red fox", "size": "64x32", "response_format": "b64_json",'
           b' "style": "vivid", "weird": [1, {"a": null}]}')
    status, _, body = await call(server, "POST", "/v1/images/generations", data=raw,
                                 headers={"Content-Type": "application/json"})
    assert status == 200
    (got,) = upstream.image_calls
    assert got.body == raw and got.path == "/v1/images/generations"
    assert got.headers["Authorization"] == f"Bearer {PT_KEY}"
    item = json.loads(body)["data"][0]
    assert item["revised_prompt"] == "a red fox, revised by the fake"
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 32)

    r = await client.images.generate(model="dall-e-3", prompt="p", size="1024x1024", response_format="url")
    assert r.data[0].url.startswith(f"{upstream.url}/files/")
    assert upstream.image_bodies[-1] == {"model": "dall-e-3", "prompt": "p", "size": "1024x1024",
                                         "response_format": "url"}
    # The proxy's own model is still served here.
    calls = len(upstream.image_calls)
    r = await client.images.generate(model=MODEL, prompt="p", size="16x16", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (16, 16)
    assert len(upstream.image_calls) == calls


async def test_forwarded_image_calls_hold_the_keys_concurrency_slot(start_proxy, tmp_path, upstream):
    # A key limited to one image call at a time: an image call for a model passed on upstream counts
    # like one served here (it used to let go of its slot before being forwarded: all three ran).
    cfg = pt_config(tmp_path, f"{upstream.url}/v1")
    cfg["server"] = {"api_keys": [{"name": "team", "key": CLIENT_KEY, "concurrency": 1}]}
    _, client = await start_proxy(cfg, api_key=CLIENT_KEY)
    upstream.delay = 0.5
    one = client.with_options(max_retries=0)
    results = await asyncio.gather(*(one.images.generate(model="dall-e-3", prompt="p", size="1024x1024")
                                     for _ in range(3)), return_exceptions=True)
    limited = [r for r in results if isinstance(r, RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert (len(served), len(limited)) == (1, 2), results
    assert limited[0].response.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert len(upstream.image_calls) == 1
    # The slot is free again once the forwarded call has ended.
    upstream.delay = 0
    await one.images.generate(model="dall-e-3", prompt="p", size="1024x1024")


async def test_models_merged(start_proxy, tmp_path, upstream):
    upstream.models = ("gpt-4o-mini", MODEL, "text-embedding-3-small")
    _, client = await start_proxy(pt_config(tmp_path, f"{upstream.url}/v1"))
    page = await client.models.list()
    ids = [m.id for m in page.data]
    assert ids == [MODEL, "gpt-4o-mini", "text-embedding-3-small"]
    ours = next(m for m in page.data if m.id == MODEL)
    assert ours.owned_by == "qwen-image-proxy"
    assert upstream.calls_to("/models")[0].headers["Authorization"] == f"Bearer {PT_KEY}"
    assert (await client.models.retrieve(MODEL)).owned_by == "qwen-image-proxy"


@pytest.mark.parametrize("hostile", ["redirect", "endless"])
async def test_models_from_a_hostile_upstream(start_proxy, tmp_path, aiohttp_server, hostile):
    """The upstream's model list is not followed elsewhere (the passthrough key and the client stay with the
    upstream) nor read past a limit: the client still gets our models."""
    elsewhere, sent = [], [0]

    async def other_origin(request):
        elsewhere.append(dict(request.headers))
        return web.json_response({"object": "list", "data": [{"id": "planted", "object": "model"}]})

    async def models(request):
        if hostile == "redirect":
            return web.HTTPTemporaryRedirect(str(other.make_url("/v1/models")))
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"object": "list", "data": [' + b'{"id": "m", "object": "model"},' * 1000)
        with contextlib.suppress(ConnectionError):
            while True:  # a list that never ends, until the proxy hangs up
                await response.write(b" " * 65536)
                sent[0] += 65536
        return response

    other_app = web.Application()
    other_app.router.add_get("/v1/models", other_origin)
    other = await aiohttp_server(other_app)
    app = web.Application()
    app.router.add_get("/v1/models", models)
    up = await aiohttp_server(app)
    _, client = await start_proxy(pt_config(tmp_path, str(up.make_url("/v1"))))
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    assert elsewhere == []
    assert sent[0] < 64 << 20  # read up to its limit, then dropped (socket buffers hold a few MB more)


async def test_upstream_unreachable(start_proxy, tmp_path):
    server, client = await start_proxy(pt_config(tmp_path, f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(InternalServerError) as e:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    err = assert_openai_error(e.value.response.text)
    assert PT_KEY not in e.value.response.text and err["type"] == "server_error"
    # The model list still has ours; the image models still work.
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    r = await client.images.generate(model=MODEL, prompt="p", size="16x16")
    assert r.data[0].url


async def test_passthrough_auth_and_body_limit(start_proxy, tmp_path, upstream):
    cfg = pt_config(tmp_path, f"{upstream.url}/v1")
    cfg["server"] = {"api_keys": [CLIENT_KEY], "max_body_mb": 0.01}
    server, client = await start_proxy(cfg, api_key=CLIENT_KEY)
    status, _, body = await call(server, "POST", "/v1/chat/completions", data=b'{"model": "m"}',
                                 headers={"Content-Type": "application/json"})
    assert status == 401 and assert_openai_error(body)["type"] == "authentication_error"
    assert upstream.requests == []
    status, _, body = await call(server, "POST", "/v1/chat/completions", data=b"x" * 20000,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 413
    assert_openai_error(body)
    assert upstream.requests == []
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok"}])
    assert r.choices[0].message.content == "echo: ok"
    assert upstream.calls_to("/chat/completions")[0].headers["Authorization"] == f"Bearer {PT_KEY}"


async def test_without_passthrough_other_calls_are_404(start_proxy, tmp_path):
    server, client = await start_proxy(base_config(tmp_path))
    with pytest.raises(NotFoundError) as e:
        await client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = assert_openai_error(e.value.response.text)
    assert error["code"] == "unknown_url" and "passthrough.base_url" in error["message"]  # why, for the operator
    with pytest.raises(NotFoundError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert [m.id for m in (await client.models.list()).data] == [MODEL]


# ---- the mounted middleware --------------------------------------------------------------------------


async def test_mounted_middleware(aiohttp_server, tmp_path):
    seen: list[dict] = []

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": "world"})

    async def own_chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response({
            "id": "own", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "from the app itself"}}],
        })

    async def own_images(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        return web.json_response({"created": 1, "data": [{"url": "https://app.example/own.png"}]})

    config = parse_config(base_config(tmp_path), env={})
    app = web.Application()
    app.router.add_get("/hello", hello)
    app.router.add_post("/v1/chat/completions", own_chat)
    app.router.add_post("/v1/images/generations", own_images)
    app.middlewares.append(image_proxy_middleware(config, app))
    server = await aiohttp_server(app)
    client = AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="any", max_retries=0, timeout=30)
    try:
        r = await client.images.generate(model=MODEL, prompt="mounted", size="40x30", response_format="b64_json")
        im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
        assert (im.format, im.size) == ("PNG", (40, 30))
        r = await client.images.generate(model=MODEL, prompt="mounted", size="40x30")
        status, _, data = await call(server, "GET", r.data[0].url.split(str(server.make_url("")).rstrip("/"), 1)[1])
        assert status == 200 and Image.open(io.BytesIO(data)).size == (40, 30)
        assert seen == []

        # The app's own routes are untouched, image calls for other models included.
        chat = await client.chat.completions.create(model="own-llm", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == "from the app itself"
        r = await client.images.generate(model="dall-e-3", prompt="the app's own")
        assert r.data[0].url == "https://app.example/own.png"
        assert seen[-1] == {"model": "dall-e-3", "prompt": "the app's own"}
        status, _, body = await call(server, "GET", "/hello")
        assert (status, json.loads(body)) == (200, {"hello": "world"})
        status, _, _ = await call(server, "GET", "/nothing-here")
        assert status == 404
        # The gateway's errors are still OpenAI-shaped.
        with pytest.raises(Exception) as e:
            await client.images.generate(model=MODEL, prompt="x", n=11)
        assert e.value.status_code == 400 and e.value.body["param"] == "n"
    finally:
        await client.close()
    assert isinstance(app[GATEWAY], Gateway)  # closed with the app


async def test_mounted_middleware_with_keys(aiohttp_server, tmp_path):
    cfg = base_config(tmp_path)
    cfg["server"] = {"api_keys": ["mount-key"]}
    app = web.Application()
    app.router.add_get("/hello", lambda request: web.Response(text="hi"))
    app.middlewares.append(image_proxy_middleware(parse_config(cfg, env={}), app))
    server = await aiohttp_server(app)
    body = json.dumps({"model": MODEL, "prompt": "x", "size": "16x16"}).encode()
    status, _, text = await call(server, "POST", "/v1/images/generations", data=body,
                                 headers={"Content-Type": "application/json"})
    assert status == 401
    assert_openai_error(text)
    status, _, text = await call(server, "POST", "/v1/images/generations", data=body,
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer mount-key"})
    assert status == 200 and json.loads(text)["data"][0]["url"]
    status, _, text = await call(server, "GET", "/hello")
    assert (status, text) == (200, b"hi")


async def test_proxy_key_never_forwarded_upstream(start_proxy, tmp_path, upstream):
    # No passthrough key and the proxy has its own keys: the client's key is for the proxy only.
    cfg = pt_config(tmp_path, f"{upstream.url}/v1", api_key=None)
    cfg["server"] = {"api_keys": [CLIENT_KEY]}
    server, client = await start_proxy(cfg, api_key=CLIENT_KEY)
    status, _, _ = await call(server, "POST", "/v1/chat/completions", data=b'{"model": "m"}',
                              headers={"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"})
    assert status == 401  # the upstream's own answer to a request without its key
    assert "Authorization" not in upstream.calls_to("/chat/completions")[0].headers
    await client.models.list()
    assert upstream.requests and all(CLIENT_KEY not in str(rec.headers) for rec in upstream.requests)


async def test_a_second_authorization_header_is_not_forwarded_either(start_proxy, tmp_path, upstream):
    # Two Authorization headers: the first admits the client; neither may reach the upstream.
    cfg = pt_config(tmp_path, f"{upstream.url}/v1", api_key=None)
    cfg["server"] = {"api_keys": [CLIENT_KEY]}
    server, _ = await start_proxy(cfg, api_key=CLIENT_KEY)
    headers = CIMultiDict([("Content-Type", "application/json"), ("Authorization", f"Bearer {CLIENT_KEY}"),
                           ("Authorization", "Bearer second-secret")])
    await call(server, "POST", "/v1/chat/completions", data=b'{"model": "m"}', headers=headers)
    assert "Authorization" not in upstream.calls_to("/chat/completions")[0].headers
