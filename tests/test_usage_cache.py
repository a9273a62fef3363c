"""The cache of seeded requests through the official openai client: a repeat with the same seed is a hit
(byte-identical images, no upstream call, cost 0 in the ledger); no seed or Cache-Control: no-cache is not."""

from __future__ import annotations

import base64
import io
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image

from proxy.app import GATEWAY
from proxy.config.usage import CacheConfig
from proxy.media.output import FinalImage
from proxy.state.shared_redis import RedisState
from proxy.usage.cache import SeededCache
from proxy.usage.cache_index import RedisIndex

from .fake_openai_upstream import FakeOpenAIUpstream
from .local_helpers import make_lora_file
from .services import redis_server  # noqa: F401
from .test_usage_e2e import api, client_for, usage_config


async def seeded(client, seed=None, prompt="a fox", fmt="b64_json", headers=None):
    extra = {"seed": seed} if seed is not None else None
    return await client.images.with_raw_response.generate(
        model="vendor-image", prompt=prompt, size="64x64", n=2, response_format=fmt, extra_body=extra,
        extra_headers=headers)


async def two_proxies_sharing_a_cache(start_proxy, tmp_path, vendor_url: str, state: dict, **cache):
    """Two proxies with one image store and a shared seeded cache indexed in `state` (a Redis): a client
    for alice on the first, one for bob on the second."""
    servers = []
    for i in range(2):
        cfg = usage_config(tmp_path / f"p{i}", vendor_url)
        cfg["store"]["path"] = str(tmp_path / "shared-images")
        cfg["state"] = dict(state)
        cfg["models"]["vendor-image"]["cache"] = {"scope": "shared", **cache}
        server, _ = await start_proxy(cfg)
        servers.append(server)
    return client_for(servers[0], "sk-alice-0000000000"), client_for(servers[1], "sk-bob-0000000000")


async def test_seeded_repeat_is_a_hit(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    cfg = usage_config(tmp_path, vendor.url)
    cfg["models"]["vendor-image"]["cache"] = {"ttl_seconds": 600, "max_mb": 8, "scope": "key"}
    server, _ = await start_proxy(cfg)
    alice, bob = client_for(server, "sk-alice-0000000000"), client_for(server, "sk-bob-0000000000")
    try:
        first = await seeded(alice, seed=7)
        assert first.headers["x-qip-cache"] == "miss" and float(first.headers["x-qip-cost-usd"]) > 0
        calls = len(vendor.image_calls)
        second = await seeded(alice, seed=7)
        assert second.headers["x-qip-cache"] == "hit" and second.headers["x-qip-cost-usd"] == "0.000000"
        assert len(vendor.image_calls) == calls  # no upstream call
        a, b = first.parse(), second.parse()
        assert [d.b64_json for d in a.data] == [d.b64_json for d in b.data]
        # A url answer from the same entry: the same bytes behind the link.
        third = (await seeded(alice, seed=7, fmt="url")).parse()
        assert third.data[0].url.startswith("http")

        # Another seed, another prompt, another key (scope: key), no seed, or no-cache: all go upstream.
        for attempt in (seeded(alice, seed=8), seeded(alice, seed=7, prompt="an owl"), seeded(bob, seed=7),
                        seeded(alice), seeded(alice), seeded(alice, seed=7, headers={"Cache-Control": "no-cache"})):
            calls = len(vendor.image_calls)
            r = await attempt
            assert r.headers.get("x-qip-cache") != "hit"
            assert len(vendor.image_calls) == calls + 2
    finally:
        await alice.close()
        await bob.close()

    usage = server.app[GATEWAY].usage
    await usage.writer.flush()
    records = await usage.writer.backend.query(0, time.time() + 10)
    hits = [r for r in records if r.cache_hit]
    assert len(hits) == 2 and all(r.cost_usd == 0.0 and r.route == "vendor" and r.images_delivered == 2
                                  for r in hits)
    status, page = await api(server, "/v1/organization/usage/images",
                             {"start_time": str(int(time.time()) - 60), "group_by[]": "api_key_id"})
    assert status == 200
    by_key = {x["api_key_id"]: x for x in page["data"][0]["results"]}
    assert by_key["alice"]["cache_hits"] == 2 and by_key["bob"]["cache_hits"] == 0
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        body = await r.text()
    assert 'qip_cache_hits_total{model="vendor-image"} 2.0' in body


async def test_a_lora_replaced_in_place_is_a_miss(start_proxy, aiohttp_server, tmp_path, tiny_dir, one_torch_thread):
    """LoRAs are in the key by content hash: the same request after the LoRA file was overwritten with other
    weights (same path, same size) is made again, not served the old weights' pictures."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    loras = tmp_path / "loras"
    make_lora_file(tiny_dir, loras / "style.safetensors", seed=1)
    cfg = usage_config(tmp_path, vendor.url, tiny_dir)
    cfg["providers"]["local"]["lora_dirs"] = [str(loras)]
    cfg["models"]["tiny"]["cache"] = {"scope": "shared"}
    server, _ = await start_proxy(cfg)
    client = client_for(server, "sk-alice-0000000000")
    digests = server.app[GATEWAY].usage.lora_digests

    async def styled():
        r = await client.images.with_raw_response.generate(
            model="tiny", prompt="a fox", size="64x64", response_format="b64_json",
            extra_body={"seed": 5, "loras": [{"path": "style.safetensors", "scale": 1.0}]})
        image = Image.open(io.BytesIO(base64.b64decode(r.parse().data[0].b64_json)))
        assert image.size == (64, 64)
        return r.headers["x-qip-cache"], np.asarray(image.convert("RGB"), dtype=np.int16)

    try:
        first, old = await styled()
        again, same = await styled()
        assert (first, again) == ("miss", "hit") and (old == same).all()
        assert digests.reads == 1  # the repeat hashed nothing: its file's stamp was known
        size = (loras / "style.safetensors").stat().st_size
        make_lora_file(tiny_dir, loras / "style.safetensors", seed=2)  # other weights, in place
        assert (loras / "style.safetensors").stat().st_size == size
        after, new = await styled()
        assert after == "miss" and digests.reads == 2
        assert np.abs(new - old).max() > 0  # made with the new weights
        assert (await styled())[0] == "hit"
    finally:
        await client.close()


async def test_without_cache_config_a_seeded_repeat_goes_upstream(start_proxy, aiohttp_server, tmp_path):
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    server, _ = await start_proxy(usage_config(tmp_path, vendor.url))
    alice = client_for(server, "sk-alice-0000000000")
    try:
        await seeded(alice, seed=7)
        r = await seeded(alice, seed=7)
        assert "x-qip-cache" not in r.headers and len(vendor.image_calls) == 4
    finally:
        await alice.close()


async def test_two_proxies_share_the_cache_through_redis(start_proxy, aiohttp_server, tmp_path, redis_server):  # noqa: F811
    """With state.redis_url and one image store, a seeded request made on one proxy is a hit on another."""
    vendor = await FakeOpenAIUpstream().start(aiohttp_server)
    a, b = await two_proxies_sharing_a_cache(start_proxy, tmp_path, vendor.url, {"redis_url": redis_server.url})
    try:
        first = await seeded(a, seed=11)
        calls = len(vendor.image_calls)
        second = await seeded(b, seed=11)
        assert second.headers["x-qip-cache"] == "hit" and len(vendor.image_calls) == calls
        assert [d.b64_json for d in first.parse().data] == [d.b64_json for d in second.parse().data]
        redis_server.stop()  # the index away: served without it
        third = await seeded(b, seed=12)
        assert third.status_code == 200 and third.headers["x-qip-cache"] == "miss"
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("shared", [False, True])
async def test_past_max_mb_the_oldest_go(store, shared, request):
    index = None
    if shared:
        server = request.getfixturevalue("redis_server")
        state = RedisState(server.url, prefix="t:")
        index = RedisIndex(state)
    cache = SeededCache(store, index)
    config = CacheConfig(max_mb=3 * 1000 / (1024 * 1024))  # 3000 bytes
    images = [FinalImage(bytes([i]) * 1000, "png", i) for i in range(4)]
    for i, img in enumerate(images):
        await cache.put("m", ("k", i), [img], "r", "openai", config)
    found = [await cache.get("m", ("k", i)) for i in range(4)]
    assert [f is not None for f in found] == [False, True, True, True]
    assert found[3][0][0].data == images[3].data and found[3][1].route == "r"
    if shared:
        await state.close()
