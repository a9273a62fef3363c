"""The image store under a hostile world: a folder or bucket shared with other files, a folder removed or
broken while the proxy runs, a disk that refuses writes, odd names on /images/, and caches that must not
keep an image past its expiry."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from openai import APIStatusError, AsyncOpenAI
from PIL import Image

from proxy.state.store_s3 import S3Store

from .conftest import base_config
from .services import S3_KEY_ID, S3_SECRET, free_port, moto_server, s3_bucket, wait_for_port  # noqa: F401
from .test_s3_store import s3_config

MODEL = "qwen-image-placeholder"
ROOT = Path(__file__).resolve().parent.parent


def age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


async def get(url: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers or {}) as r:
        return r.status, dict(r.headers), await r.read()


def max_age(headers: dict) -> int:
    match = re.fullmatch(r"private, max-age=(\d+)", headers["Cache-Control"])
    assert match, headers["Cache-Control"]
    return int(match.group(1))


def assert_png(body: bytes, size=(64, 64)) -> None:
    im = Image.open(io.BytesIO(body))
    assert (im.format, im.size) == ("PNG", size)


# ---- a folder shared with other files -------------------------------------------------------------------


async def test_the_sweeper_removes_only_its_own_files(store):
    """store.path may point at a folder that holds other things (a mistake, or on purpose): the sweeper
    removed every file in it older than the TTL, whatever it was."""
    mine = await store.put(b"old", "image/png")
    fresh = await store.put(b"new", "image/webp")
    foreign = ["notes.txt", "backup.png", "A" * 32 + ".png.bak", ".bashrc", "README"]
    for name in foreign:
        (store.root / name).write_bytes(b"precious")
    (store.root / "sub").mkdir()
    (store.root / "sub" / ("B" * 32 + ".png")).write_bytes(b"precious")
    leftover = store.root / f".{'C' * 32}.png.tmp"  # a write a crashed process never finished
    leftover.write_bytes(b"half")
    for path in [store.root / mine, leftover, store.root / "sub", *(store.root / n for n in foreign)]:
        age(path, 3600)

    assert store.sweep() == 2
    left = sorted(p.name for p in store.root.iterdir())
    assert left == sorted([fresh, "sub", *foreign])
    assert (store.root / "sub" / ("B" * 32 + ".png")).exists()


async def test_the_bucket_sweeper_removes_only_its_own_objects(moto_server, s3_bucket):  # noqa: F811
    """With no prefix the sweeper listed the whole bucket and deleted every object older than the TTL."""
    s3 = moto_server.client()
    foreign = ["notes.txt", "backup/db.sql", "other/" + "A" * 32 + ".png", "B" * 32 + ".png.bak"]
    for key in foreign:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"precious")
    # Last-Modified has whole seconds: with a 1 ms TTL everything written before now is expired.
    store = S3Store(s3_bucket, ttl_seconds=0.001, endpoint_url=moto_server.endpoint,
                    access_key_id=S3_KEY_ID, secret_access_key=S3_SECRET)  # not started: no background sweeper
    try:
        mine = await store.put(b"\x89PNG old", "image/png")
        await asyncio.sleep(0.01)
        assert await store.sweep() == 1
    finally:
        await store.close()
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == sorted(foreign) and mine not in keys


# ---- the folder removed or broken while the proxy runs --------------------------------------------------


async def test_a_removed_store_folder_is_made_again(start_proxy, tmp_path):
    """A tmp cleaner or an operator removes the folder: every url request was a 503 until a restart."""
    _, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    shutil.rmtree(tmp_path / "images")
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url", n=2)
    for item in r.data:
        status, headers, body = await get(item.url)
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert_png(body)


async def test_a_store_folder_that_cannot_be_made_does_not_stop_the_proxy(start_proxy, tmp_path):
    """The folder could not be created at start (here its parent is a file): the proxy refused to start
    with a traceback, though b64_json answers need no store at all."""
    cfg = base_config(tmp_path)
    (tmp_path / "blocked").write_bytes(b"a file where a folder should be")
    cfg["store"]["path"] = str(tmp_path / "blocked" / "images")
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="b64_json")
    assert_png(base64.b64decode(r.data[0].b64_json))
    with pytest.raises(APIStatusError) as info:
        await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    assert info.value.status_code == 503 and info.value.code == "store_unavailable"
    assert str(tmp_path) not in info.value.response.text
    # the obstacle goes: url answers work without a restart
    (tmp_path / "blocked").unlink()
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    status, _, body = await get(r.data[0].url)
    assert status == 200
    assert_png(body)


async def test_a_store_folder_that_cannot_be_read_is_a_503_not_a_500(start_proxy, tmp_path):
    """The folder turned into something else (here a file, as a failed mount can leave it): GET /images/
    answered 500 internal_error with a traceback in the log."""
    server, client = await start_proxy(base_config(tmp_path))
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    shutil.rmtree(tmp_path / "images")
    (tmp_path / "images").write_bytes(b"not a folder")
    for method in ("GET", "HEAD"):
        async with aiohttp.ClientSession() as s, s.request(method, r.data[0].url) as resp:
            assert resp.status == 503 and resp.headers["Retry-After"]
            if method == "GET":
                error = (await resp.json())["error"]
                assert error["code"] == "store_unavailable" and str(tmp_path) not in error["message"]
    with pytest.raises(APIStatusError) as info:
        await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    assert info.value.status_code == 503 and info.value.code == "store_unavailable"
    assert str(tmp_path) not in info.value.response.text


async def test_a_full_disk_is_a_503_and_leaves_no_partial_file(tmp_path):
    """The disk takes only part of an image (here a file size limit on the process: the kernel cuts the
    write as a full disk does): the client gets 503 store_unavailable, and the part written was left in
    the folder until the TTL, eating the little space there was."""
    import resource

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))

    port = free_port()
    cfg = base_config(tmp_path)
    cfg["server"] = {"port": port}
    (tmp_path / "images").mkdir()
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=small_files)
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30)
    try:
        await asyncio.to_thread(wait_for_port, port, 30)
        with pytest.raises(APIStatusError) as info:
            # 64x64 noise-free PNG: about 2.3 KB, more than the 1 KB the "disk" takes
            await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
        assert info.value.status_code == 503 and info.value.code == "store_unavailable"
        assert "b64_json" in info.value.message and str(tmp_path) not in info.value.response.text
        assert list((tmp_path / "images").iterdir()) == []
        r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="b64_json")
        assert r.data[0].b64_json
    finally:
        await client.close()
        proc.terminate()
        proc.wait(10)


# ---- names and caching on GET /images/ ------------------------------------------------------------------


async def test_cache_lifetime_ends_when_the_image_expires(start_proxy, tmp_path):
    """Cache-Control said max-age=3600 whatever the TTL and the file's age: a browser kept showing an image
    up to an hour after it expired and was deleted."""
    cfg = base_config(tmp_path)
    cfg["store"]["ttl_seconds"] = 60
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    status, headers, body = await get(r.data[0].url)
    assert status == 200 and 0 < max_age(headers) <= 60
    # A browser takes the stored type as it is, never sniffs HTML or script from the bytes.
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert_png(body)
    age(tmp_path / "images" / r.data[0].url.rsplit("/", 1)[1], 50)
    status, headers, _ = await get(r.data[0].url)
    assert status == 200 and max_age(headers) <= 10
    # a revalidation carries the same, shorter lifetime
    status, revalidated, _ = await get(r.data[0].url, {"If-None-Match": headers["Etag"]})
    assert status == 304 and max_age(revalidated) <= 10


async def test_cache_lifetime_from_the_bucket_ends_with_the_ttl(start_proxy, tmp_path, moto_server,  # noqa: F811
                                                                s3_bucket, monkeypatch):  # noqa: F811
    cfg = s3_config(tmp_path, moto_server, s3_bucket, monkeypatch, serve_via_proxy=True, ttl_seconds=120)
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    status, headers, body = await get(r.data[0].url)
    assert status == 200 and 0 < max_age(headers) <= 120
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert_png(body)


async def test_a_name_with_a_trailing_newline_is_a_404_from_the_bucket(start_proxy, tmp_path, moto_server,  # noqa: F811
                                                                       s3_bucket, monkeypatch):  # noqa: F811
    """A stored name plus a trailing newline passed the name check (`$` matches before a final newline);
    the bucket then refused the key and the client got 503 store_unavailable (and the log a warning)."""
    cfg = s3_config(tmp_path, moto_server, s3_bucket, monkeypatch, serve_via_proxy=True)
    _, client = await start_proxy(cfg)
    r = await client.images.generate(model=MODEL, prompt="a fox", size="64x64", response_format="url")
    status, _, body = await get(r.data[0].url + "%0A")
    assert status == 404 and b"image_not_found" in body
    assert (await get(r.data[0].url))[0] == 200
