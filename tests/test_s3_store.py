"""The S3 image store against a bucket: moto's S3 server for uploads, presigned links (downloadable, correctly
signed, expiring with the TTL), expiry by the sweeper and streaming through the proxy; a stand-in that denies
access, a closed port and a missing bucket for clear 503s. Its settings, and its keys as secrets, are in
test_s3_config.py (no bucket needed there)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import os
import time
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from openai import APIStatusError
from PIL import Image

from proxy.state.shared_redis import RedisState
from proxy.state.store import StoreUnavailable
from proxy.state.store_s3 import S3Store

from .conftest import base_config
from .services import S3_KEY_ID, S3_SECRET, free_port, moto_server, redis_server, s3_bucket  # noqa: F401

PREFIX = "images/"


@pytest.fixture
async def s3_store(moto_server, s3_bucket):  # noqa: F811
    store = S3Store(s3_bucket, ttl_seconds=600, endpoint_url=moto_server.endpoint, prefix=PREFIX,
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)
    await store.start()
    yield store
    await store.close()


def png_bytes(size=(64, 64), noise=False) -> bytes:
    if noise:  # incompressible: a realistic multi-megabyte PNG
        im = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
    else:
        im = Image.new("RGB", size, (10, 120, 200))
    out = io.BytesIO()
    im.save(out, format="PNG", compress_level=1)
    return out.getvalue()


async def fetch(url: str) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, dict(r.headers), await r.read()


def sigv4_query_signature(url: str, secret: str) -> tuple[str, str]:
    """(the signature in a presigned S3 GET URL, the one SigV4 gives for it): moto does not check them."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = dict(query)["X-Amz-Signature"]
    enc = lambda v: quote(v, safe="-_.~")  # noqa: E731 - RFC 3986, as SigV4 wants
    canonical_query = "&".join(f"{enc(k)}={enc(v)}" for k, v in sorted(query) if k != "X-Amz-Signature")
    canonical = "\n".join(["GET", parts.path, canonical_query, f"host:{parts.netloc}\n",
                           "host", "UNSIGNED-PAYLOAD"])
    q = dict(query)
    amz_date = q["X-Amz-Date"]
    scope = q["X-Amz-Credential"].split("/", 1)[1]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return given, hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


# ---- the store on its own -------------------------------------------------------------------------------


async def test_put_then_the_presigned_link_downloads_the_image(s3_store, moto_server):  # noqa: F811
    data = png_bytes((1024, 1024), noise=True)
    assert len(data) > 3_000_000
    name = await s3_store.put(data, "image/png")
    assert name.endswith(".png") and len(name) == 36
    url = await s3_store.url_for(name, "http://proxy.example")
    assert url.startswith(f"{moto_server.endpoint}/{s3_store.bucket}/{PREFIX}{name}?")
    status, headers, body = await fetch(url)
    assert status == 200 and body == data and headers["Content-Type"] == "image/png"
    # The object sits under the prefix, typed, and nothing else was written.
    listed = moto_server.client().list_objects_v2(Bucket=s3_store.bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"{PREFIX}{name}"]


async def test_presigned_links_are_signed_and_expire_with_the_ttl(s3_store):
    name = await s3_store.put(b"\x89PNG fake", "image/png")
    url = await s3_store.url_for(name, "http://proxy.example")
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["X-Amz-Expires"] == "600"
    assert query["X-Amz-Credential"].startswith(f"{S3_KEY_ID}/")
    given, expected = sigv4_query_signature(url, S3_SECRET)
    assert given == expected
    assert S3_SECRET not in url


async def test_expired_objects_are_deleted_and_their_links_stop_working(moto_server, s3_bucket):  # noqa: F811
    store = S3Store(s3_bucket, ttl_seconds=1, endpoint_url=moto_server.endpoint, prefix=PREFIX,
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)
    # Something else in the same bucket, outside the prefix: never the sweeper's business.
    moto_server.client().put_object(Bucket=s3_bucket, Key="other/keep.txt", Body=b"mine")
    await store.start()  # the sweeper wakes every max(ttl / 4, 1) s
    try:
        name = await store.put(b"\x89PNG fake", "image/png")
        url = await store.url_for(name, "http://proxy.example")
        assert dict(parse_qsl(urlsplit(url).query))["X-Amz-Expires"] == "1"
        assert (await fetch(url))[0] == 200
        deadline = time.monotonic() + 30
        while (await fetch(url))[0] == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert (await fetch(url))[0] == 404
        keys = [o["Key"] for o in moto_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert keys == ["other/keep.txt"]
    finally:
        await store.close()


async def test_sweep_removes_only_expired_objects(moto_server, s3_bucket):  # noqa: F811
    store = S3Store(s3_bucket, ttl_seconds=1.5, endpoint_url=moto_server.endpoint, prefix=PREFIX,
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)  # not started: no background sweeper
    try:
        old = [await store.put(b"old", "image/png") for _ in range(3)]
        await asyncio.sleep(2.6)  # Last-Modified has whole seconds
        new = await store.put(b"new", "image/webp")
        assert await store.open(old[0]) is None  # expired: never served, and deleted on the way
        assert await store.sweep() == 2 and await store.sweep() == 0
        assert await store.open(new) is not None
        keys = [o["Key"] for o in moto_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert keys == [f"{PREFIX}{new}"]
    finally:
        await store.close()


async def test_open_streams_the_object_for_serve_via_proxy(moto_server, s3_bucket):  # noqa: F811
    store = S3Store(s3_bucket, ttl_seconds=600, endpoint_url=moto_server.endpoint, prefix=PREFIX,
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET, serve_via_proxy=True)
    await store.start()
    try:
        data = os.urandom(700_000)
        name = await store.put(data, "image/webp")
        assert await store.url_for(name, "http://proxy.example/") == f"http://proxy.example/images/{name}"
        found = await store.open(name)
        assert found.content_type == "image/webp" and found.size == len(data) and found.path is None
        chunks = [c async for c in found.chunks]
        assert b"".join(chunks) == data and len(chunks) >= 2  # streamed, not read whole
        assert await store.open("A" * 32 + ".png") is None
        for bad in ("../x.png", name.replace(".webp", ".png"), name + "/..", ""):
            assert await store.open(bad) is None
    finally:
        await store.close()


async def test_public_links_without_presigning(moto_server, s3_bucket):  # noqa: F811
    store = S3Store(s3_bucket, ttl_seconds=60, endpoint_url=moto_server.endpoint, prefix=PREFIX, presign=False,
                    public_url="https://cdn.example/")
    assert await store.url_for("x.png", "http://proxy") == "https://cdn.example/images/x.png"
    store.public_url = None
    assert await store.url_for("x.png", "http://proxy") == f"{moto_server.endpoint}/{s3_bucket}/images/x.png"


async def test_public_links_name_the_stored_object_whatever_the_prefix_looks_like(moto_server, s3_bucket):  # noqa: F811
    # obstore stores prefix "qip" as "qip/<name>": a public link to "qipNAME" would answer 404.
    for prefix in ("qip", "qip/", "/two/levels", "my images/", ""):
        store = S3Store(s3_bucket, ttl_seconds=60, endpoint_url=moto_server.endpoint, prefix=prefix,
                        access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET, presign=False)
        await store.start()
        try:
            name = await store.put(png_bytes(), "image/png")
            url = await store.url_for(name, "http://proxy")
        finally:
            await store.close()
        assert " " not in url
        key = unquote(urlsplit(url).path).split("/", 2)[2]  # /<bucket>/<key>
        listed = moto_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
        assert key in [obj["Key"] for obj in listed], (prefix, url)


# ---- a bucket that refuses or is down ------------------------------------------------------------------


ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code><Message>Access Denied'
                 b'</Message><RequestId>R1</RequestId></Error>')


async def test_a_bucket_that_denies_access_is_a_503_and_the_log_says_why(aiohttp_server, caplog):
    async def deny(request: web.Request) -> web.Response:  # what S3 answers a key without the rights
        return web.Response(status=403, body=ACCESS_DENIED, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", deny)
    server = await aiohttp_server(app)
    store = S3Store("qip-denied", ttl_seconds=60, endpoint_url=str(server.make_url("/")), prefix=PREFIX,
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET, timeout=2)
    await store.start()
    try:
        for call in (lambda: store.put(b"x", "image/png"), lambda: store.open("A" * 32 + ".png")):
            caplog.clear()
            with pytest.raises(StoreUnavailable) as info:
                await call()
            assert info.value.status == 503 and info.value.code == "store_unavailable"
            assert "AccessDenied" in caplog.text  # not only "403 Forbidden: <?xml version=...>"
            for text in (info.value.message, caplog.text):
                assert S3_SECRET not in text
    finally:
        await store.close()


async def test_a_bucket_that_is_down_is_a_clear_503(caplog):
    store = S3Store("qip-down", ttl_seconds=60, endpoint_url=f"http://127.0.0.1:{free_port()}",
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET, timeout=2)
    await store.start()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.put(b"x", "image/png")
        assert time.monotonic() - started < 20
        error = info.value
        assert error.status == 503 and error.code == "store_unavailable" and error.headers["Retry-After"]
        assert "qip-down" in error.message
        with pytest.raises(StoreUnavailable):
            await store.open("A" * 32 + ".png")
        for text in [error.message, caplog.text]:
            assert S3_SECRET not in text
    finally:
        await store.close()


# ---- end to end, through build_app and the openai package -------------------------------------------


def s3_config(tmp_path, moto_server, bucket, monkeypatch, **store) -> dict:  # noqa: F811
    monkeypatch.setenv("QIP_TEST_S3_KEY", S3_KEY_ID)
    monkeypatch.setenv("QIP_TEST_S3_SECRET", S3_SECRET)
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": bucket, "endpoint_url": moto_server.endpoint, "prefix": PREFIX,
                    "access_key_id_env": "QIP_TEST_S3_KEY", "secret_access_key_env": "QIP_TEST_S3_SECRET",
                    "ttl_seconds": 600, **store}
    return cfg


async def test_e2e_url_answers_are_presigned_bucket_links(start_proxy, tmp_path, moto_server, s3_bucket,  # noqa: F811
                                                          monkeypatch):
    _, client = await start_proxy(s3_config(tmp_path, moto_server, s3_bucket, monkeypatch))
    r = await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64", n=2,
                                     response_format="url")
    assert len(r.data) == 2
    for item in r.data:
        assert item.url.startswith(f"{moto_server.endpoint}/{s3_bucket}/{PREFIX}")
        assert "X-Amz-Signature=" in item.url and "X-Amz-Expires=600" in item.url
        status, headers, body = await fetch(item.url)
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(body)).size == (64, 64)


async def test_e2e_serve_via_proxy_streams_from_the_bucket(start_proxy, tmp_path, moto_server, s3_bucket,  # noqa: F811
                                                           monkeypatch):
    cfg = s3_config(tmp_path, moto_server, s3_bucket, monkeypatch, serve_via_proxy=True)
    server, client = await start_proxy(cfg)
    r = await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64",
                                     response_format="url")
    url = r.data[0].url
    assert url.startswith(str(server.make_url("/images/")))
    status, headers, body = await fetch(url)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert int(headers["Content-Length"]) == len(body)
    name = url.rsplit("/", 1)[1]
    stored = moto_server.client().get_object(Bucket=s3_bucket, Key=f"{PREFIX}{name}")["Body"].read()
    assert body == stored and Image.open(io.BytesIO(body)).size == (64, 64)
    async with aiohttp.ClientSession() as s, s.head(url) as head:
        assert head.status == 200 and head.headers["Content-Type"] == "image/png"
    status, _, body = await fetch(str(server.make_url("/images/" + "A" * 32 + ".png")))
    assert status == 404 and b"image_not_found" in body


async def test_e2e_a_bucket_that_is_down_is_a_503_never_a_silent_b64(start_proxy, tmp_path, moto_server,  # noqa: F811
                                                                     monkeypatch):
    cfg = s3_config(tmp_path, moto_server, "qip-unreachable", monkeypatch,
                    endpoint_url=f"http://127.0.0.1:{free_port()}", timeout=2)
    _, client = await start_proxy(cfg)
    started = time.monotonic()
    with pytest.raises(APIStatusError) as info:
        await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64",
                                     response_format="url")
    assert time.monotonic() - started < 20
    error = info.value
    assert error.status_code == 503 and error.code == "store_unavailable"
    assert error.response.headers["Retry-After"]
    assert S3_SECRET not in error.response.text
    # b64_json needs no store: it still works.
    r = await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64",
                                     response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 64)


async def test_e2e_a_missing_bucket_is_a_503_not_links_that_look_expired(start_proxy, tmp_path, moto_server,  # noqa: F811
                                                                         monkeypatch, caplog):
    # S3 answers NoSuchBucket with a 404 like a missing object: GET /images/<id> said "does not exist or
    # has expired" for every image while the bucket was gone.
    cfg = s3_config(tmp_path, moto_server, "qip-no-such-bucket", monkeypatch, serve_via_proxy=True)
    server, client = await start_proxy(cfg)
    status, headers, body = await fetch(str(server.make_url("/images/" + "A" * 32 + ".png")))
    assert status == 503 and b"store_unavailable" in body and headers["Retry-After"]
    with pytest.raises(APIStatusError) as info:
        await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64",
                                     response_format="url")
    assert info.value.status_code == 503 and info.value.code == "store_unavailable"
    assert "NoSuchBucket" in caplog.text
    assert S3_SECRET not in caplog.text and S3_SECRET not in info.value.response.text


# ---- links that outlive S3's 7 days ---------------------------------------------------------------------


async def test_idempotent_replays_of_presigned_links_end_when_the_links_do(start_proxy, tmp_path, moto_server,  # noqa: F811
                                                                          s3_bucket, monkeypatch, redis_server):  # noqa: F811
    """A presigned link lives 7 days at most, but a url answer was kept for min(idempotency_ttl,
    store.ttl_seconds): with both at 30 days, a repeat on day 8 replayed links S3 refuses (403). It is
    kept no longer than its links now (a repeat after that generates again), as for a shorter TTL."""
    month = 30 * 86400
    cfg = s3_config(tmp_path, moto_server, s3_bucket, monkeypatch, ttl_seconds=month)
    cfg["state"] = {"redis_url": redis_server.url, "key_prefix": "qip-links:", "idempotency_ttl": month}
    _, client = await start_proxy(cfg)
    ask = {"model": "qwen-image-placeholder", "prompt": "a fox", "size": "64x64", "response_format": "url",
           "extra_headers": {"Idempotency-Key": "links-1"}}
    first = await client.images.generate(**ask)
    assert "X-Amz-Expires=604800&" in first.data[0].url  # S3's limit, not the TTL's 30 days
    again = await client.images.with_raw_response.generate(**ask)
    assert again.headers["Idempotent-Replayed"] == "true" and again.parse().data[0].url == first.data[0].url
    db = RedisState(redis_server.url)
    await db.start()
    try:
        (key,) = await db.client.keys("qip-links:idem:*")
        assert 0 < await db.client.pttl(key) <= 7 * 86400 * 1000  # it was 30 days
    finally:
        await db.close()
