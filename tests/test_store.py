"""The filesystem image store: unguessable ids, lookups, expiry and path safety."""

from __future__ import annotations

import asyncio
import os
import re
import time

import pytest

from proxy.state.store_folder import FilesystemStore


def age(path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


async def test_start_creates_the_folder(tmp_path):
    s = FilesystemStore(tmp_path / "a" / "b", ttl_seconds=60)
    await s.start()
    try:
        assert (tmp_path / "a" / "b").is_dir()
    finally:
        await s.close()


async def test_put_then_lookup(store):
    name = await store.put(b"png bytes", "image/png")
    assert name.endswith(".png")
    found = store.lookup(name)
    assert found is not None
    path, content_type = found
    assert content_type == "image/png"
    assert path.read_bytes() == b"png bytes"
    assert path.parent == store.root
    # no temporary file is left behind
    assert sorted(p.name for p in store.root.iterdir()) == [name]


@pytest.mark.parametrize(
    "mime, ext", [("image/png", "png"), ("image/jpeg", "jpeg"), ("image/webp", "webp"), ("image/gif", "gif"),
                  ("image/avif", "avif")],
)
async def test_extension_and_content_type_follow_the_mime(store, mime, ext):
    name = await store.put(b"x", mime)
    assert name.rsplit(".", 1)[1] == ext
    assert store.lookup(name)[1] == mime


async def test_ids_are_long_random_and_unique(store):
    names = [await store.put(b"x", "image/png") for _ in range(200)]
    ids = [n.rsplit(".", 1)[0] for n in names]
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{32}", i), i
    # 32 url-safe characters carry 192 bits only if every position is random: each position must
    # take many of the 64 values across 200 ids (a fixed prefix or a counter would not).
    for pos in range(32):
        assert len({i[pos] for i in ids}) > 20, f"position {pos} is not random"


async def test_expired_file_is_gone_on_lookup(store):
    name = await store.put(b"x", "image/png")
    path = store.root / name
    age(path, 61)
    assert store.lookup(name) is None
    assert not path.exists()


async def test_fresh_file_survives_a_small_ttl(tmp_path):
    s = FilesystemStore(tmp_path, ttl_seconds=0.2)
    name = await s.put(b"x", "image/webp")
    assert s.lookup(name) is not None
    time.sleep(0.3)
    assert s.lookup(name) is None
    assert not (tmp_path / name).exists()


async def test_sweep_removes_expired_and_keeps_fresh(store):
    old = [await store.put(b"old", "image/png") for _ in range(3)]
    new = await store.put(b"new", "image/jpeg")
    for name in old:
        age(store.root / name, 120)
    stale_tmp = store.root / ".leftover.png.tmp"
    stale_tmp.write_bytes(b"half")
    age(stale_tmp, 120)

    assert store.sweep() == 4
    assert sorted(p.name for p in store.root.iterdir()) == [new]
    assert store.lookup(new) is not None
    assert store.sweep() == 0


async def test_sweeper_runs_in_the_background(tmp_path):
    s = FilesystemStore(tmp_path, ttl_seconds=0.2)
    name = await s.put(b"x", "image/png")
    s_start = time.monotonic()
    await s.start()  # the sweeper wakes every max(ttl / 4, 1) s
    try:
        age(tmp_path / name, 10)
        while (tmp_path / name).exists() and time.monotonic() - s_start < 3:
            await asyncio.sleep(0.05)
        assert not (tmp_path / name).exists()
    finally:
        await s.close()


async def test_unknown_name_is_none(store):
    assert store.lookup("A" * 32 + ".png") is None


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "../secret.png",
        "..%2Fsecret.png",
        "/etc/passwd",
        "A" * 32 + ".exe",
        "A" * 32 + ".PNG",
        "A" * 32,
        "A" * 31 + ".png",
        "A" * 33 + ".png",
        "A" * 29 + "/.." + ".png",
        "." + "A" * 31 + ".png",
        "",
    ],
)
async def test_invalid_names_are_refused(store, tmp_path, name):
    # a real file outside the store, reachable by a traversal
    (tmp_path / "secret.png").write_bytes(b"secret")
    assert store.lookup(name) is None


async def test_a_stored_name_with_another_extension_is_not_found(store):
    name = await store.put(b"x", "image/png")
    stem = name.rsplit(".", 1)[0]
    assert store.lookup(stem + ".jpeg") is None
    assert store.lookup(stem + ".png") is not None
