"""The S3 image store against moto's S3 server: uploads, presigned links (downloadable, correctly signed,
expiring with the TTL), expiry by the sweeper, streaming through the proxy, and a bucket that is down."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import os
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from openai import APIStatusError
from PIL import Image

from proxy.config import ConfigError, parse_config
from proxy.state.factory import make_store
from proxy.state.shared_redis import RedisState
from proxy.state.store import StoreUnavailable
from proxy.state.store_s3 import S3Store

from .conftest import base_config
from .services import S3_KEY_ID, S3_SECRET, free_port, moto_server, redis_server, s3_bucket  # noqa: F401

PREFIX = "images/"
ROOT = Path(__file__).resolve().parent.parent


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


def test_a_prefix_the_bucket_client_cannot_use_is_a_config_error():
    # It passed check-config, then stopped `serve` at start with a traceback from the bucket client.
    for prefix in ("a//b/", "qip/../x", "./qip", "qip\n"):
        with pytest.raises(ConfigError, match="store.prefix"):
            parse_config({"store": {"kind": "s3", "bucket": "b", "prefix": prefix}}, env={})
    for prefix in ("qip", "qip/", "/qip/", "a/b/", "my images/", ""):
        assert parse_config({"store": {"kind": "s3", "bucket": "b", "prefix": prefix}}, env={}).store.prefix == prefix


def test_bucket_urls_and_names_the_client_cannot_use_are_config_errors():
    """endpoint_url: minio:9000 (no scheme) passed check-config; then every url request was a 503 and the
    bucket client printed a panic's stack trace. A user:password@ in endpoint_url or public_url went out
    in every link; a bucket named "a b" panicked the same way, "b?x" signed links with the key in the query."""
    def problem(**store) -> str:
        with pytest.raises(ConfigError) as info:
            parse_config({"store": {"kind": "s3", "bucket": "b", **store}}, env={})
        return str(info.value)

    for url in ("minio:9000", "127.0.0.1:9000", "ftp://minio:9000", "not a url"):
        assert "store.endpoint_url: must be an http:// or https:// URL" in problem(endpoint_url=url)
        assert "store.public_url: must be an http:// or https:// URL" in problem(presign=False, public_url=url)
    for key in ("endpoint_url", "public_url"):
        text = problem(**{key: "https://admin:hunter2-pw@minio.example.com"})
        assert f"store.{key}: must not hold credentials" in text and "hunter2-pw" not in text
    for name in ("a b", "b?x", "b/x", "..", "b\nx", "x" * 256):
        assert "store.bucket:" in problem(bucket=name)
    for url in ("http://127.0.0.1:9000", "https://s3.eu-central-1.amazonaws.com/", "http://[::1]:9000"):
        store = parse_config({"store": {"kind": "s3", "bucket": "my.images_Old-1", "endpoint_url": url,
                                        "public_url": url}}, env={}).store
        assert store.endpoint_url == url and store.bucket == "my.images_Old-1"


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


AWS_KEY_ID, AWS_SECRET, AWS_TOKEN = "AKIAFROMTHEENVIRONMENT", "aws-env-secret-0000000000", "aws-env-session-token-000000"


def aws_variables(monkeypatch) -> None:
    """Credentials in the standard variables only, as on a machine with an assumed role's keys."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", AWS_TOKEN)


async def test_credentials_from_the_aws_variables_never_reach_logs_or_answers(aiohttp_server, start_proxy, tmp_path,
                                                                               monkeypatch, caplog):
    """Keys from AWS_* (obstore's fallback when the config names none) were not secrets to the store or the
    log scrubber: a bucket's error that quotes them (S3's ExpiredToken and InvalidToken carry the session
    token) put them into the log line, where the named variables' values were taken out."""
    aws_variables(monkeypatch)

    async def expired(request: web.Request) -> web.Response:  # a terse server: the whole answer on one line
        token = request.headers.get("x-amz-security-token", "")
        body = f"<Error><Code>ExpiredToken</Code><Token-0>{token}</Token-0></Error>"
        return web.Response(status=400, text=body, content_type="application/xml")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", expired)
    bucket = await aiohttp_server(app)
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": "qip-echo", "endpoint_url": str(bucket.make_url("")).rstrip("/"),
                    "timeout": 2}
    _, client = await start_proxy(cfg)
    with pytest.raises(APIStatusError) as info:
        await client.images.generate(model="qwen-image-placeholder", prompt="a fox", size="64x64",
                                     response_format="url")
    assert info.value.status_code == 503 and info.value.code == "store_unavailable"
    assert "ExpiredToken" in caplog.text and "[redacted]" in caplog.text  # the log still says why
    for text in (caplog.text, info.value.response.text):
        for secret in (AWS_KEY_ID, AWS_SECRET, AWS_TOKEN):
            assert secret not in text


def test_a_secret_the_log_line_cuts_through_is_still_taken_out(caplog):
    """The log keeps 300 characters of the bucket's error; they were cut first and redacted after, so a
    secret across the cut (an echoed key, as above) left its first part in the log."""
    store = S3Store("qip-cut", ttl_seconds=60, endpoint_url="http://127.0.0.1:9",
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)
    error = store._unavailable("save images to", OSError("<Error>" + "." * 273 + S3_SECRET + "</Error>"))
    assert isinstance(error, StoreUnavailable)
    assert "....[redacted]" in caplog.text and S3_SECRET[:12] not in caplog.text


def test_the_buckets_credentials_are_secrets_like_the_others(monkeypatch, tmp_path):
    """config.secrets() (what every log record and error answer is scrubbed of) held no store credential."""
    aws_variables(monkeypatch)
    monkeypatch.setenv("QIP_TEST_S3_SECRET", "named-variable-secret-00")
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": "b", "secret_access_key_env": "QIP_TEST_S3_SECRET"}
    found = parse_config(cfg, env={}).secrets()
    assert {"named-variable-secret-00", AWS_SECRET, AWS_TOKEN} <= set(found)
    assert AWS_KEY_ID not in found  # in every presigned link (the store's own log line leaves it out)
    assert AWS_SECRET not in parse_config(base_config(tmp_path), env={}).secrets()  # a folder reads no AWS_*


def test_config_builds_the_store_and_reads_keys_from_the_named_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("MY_S3_KEY", "AKIAFROMENV")
    monkeypatch.setenv("MY_S3_SECRET", "secret-from-env")
    cfg = parse_config({"store": {"kind": "s3", "bucket": "b", "endpoint_url": "http://127.0.0.1:9",
                                  "access_key_id_env": "MY_S3_KEY", "secret_access_key_env": "MY_S3_SECRET",
                                  "prefix": "p/", "ttl_seconds": 120, "serve_via_proxy": True}}, env={})
    store = make_store(cfg.store)
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.ttl, store.serve_via_proxy) == ("b", "p/", 120, True)
    assert store._access_key_id == "AKIAFROMENV" and store._secret_access_key == "secret-from-env"


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


def test_check_config_warns_when_images_outlive_their_presigned_links(tmp_path):
    cfg = base_config(tmp_path)
    cfg["store"] = {"kind": "s3", "bucket": "b", "ttl_seconds": 30 * 86400}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", "--strict", "--config", str(path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr  # links that expire early still work: a warning, not an error
    assert "warning: store.ttl_seconds is 2592000, but presigned links live at most 604800 s" in out.stdout
    assert "serve_via_proxy: true" in out.stdout
    for fine in ({"ttl_seconds": 604800}, {"ttl_seconds": 30 * 86400, "serve_via_proxy": True},
                 {"ttl_seconds": 30 * 86400, "presign": False}):
        cfg["store"] = {"kind": "s3", "bucket": "b", **fine}
        assert parse_config(cfg, env={}).store.link_warning() is None
