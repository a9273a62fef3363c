"""The cache of seeded requests: a request with an explicit seed whose normalized fields match an earlier
success gets the same images back. Images live in the configured image store; the index in memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import pybase64 as base64

from ..config.usage import CacheConfig
from ..output import MIME, FinalImage

log = logging.getLogger("proxy.usage")


def cache_key(req, routes: str, key_name: str | None, config: CacheConfig) -> tuple | None:
    """The request's cache key (pure): None without an explicit seed (it asks for a new image). A tuple of
    plain values, compared whole by the in-memory index (no digest to collide, and cheap to hash).

    Everything that changes the pictures is in it: the model and what its routes run (`routes`: the
    model's routes_signature), prompt, negative prompt, size, n, seed, steps, cfg, tier, LoRAs, input images and
    mask by content hash, output format and compression, and the key with scope: key.
    """
    if req.seed is None:
        return None
    return (
        req.model, routes, req.prompt, req.negative_prompt, req.width, req.height, req.n,
        req.seed, req.num_inference_steps, req.cfg_scale, req.resolution, req.prompt_enhancement, req.quality,
        req.background, req.style, req.input_fidelity, tuple((lora.path, lora.scale) for lora in req.loras),
        tuple(hashlib.sha256(img.data).digest() for img in req.images),
        hashlib.sha256(req.mask.data).digest() if req.mask is not None else None,
        req.output_format, req.output_compression, repr(sorted(req.extra.items())) if req.extra else None,
        key_name if config.scope == "key" else None,
    )


def routes_signature(routes: list) -> str:
    """What a model's routes run (provider, upstream model, params, dropped fields): part of its cache keys."""
    return json.dumps([(r.provider, r.model, r.params, r.drop) for r in routes], sort_keys=True, default=str)


@dataclass
class Entry:
    names: list[str]  # in the image store
    formats: list[str]
    seeds: list[int | None]
    revised: list[str | None]
    route: str
    provider: str
    expires: float
    size: int


def _raw(img: FinalImage) -> bytes | None:
    if img.data is not None:
        return img.data
    if img.b64 is not None:
        return base64.b64decode(img.b64)
    return None  # an upstream URL handed on: nothing to keep


class SeededCache:
    """One LRU index per model (each within its model's max_mb); entries expire after ttl_seconds or when
    the store lets their images go (store.ttl_seconds), whichever comes first."""

    def __init__(self, store):
        self.store = store
        self._index: dict[str, OrderedDict[tuple, Entry]] = {}
        self._bytes: dict[str, int] = {}

    async def get(self, model: str, key: tuple) -> tuple[list[FinalImage], Entry] | None:
        index = self._index.get(model)
        entry = index.get(key) if index else None
        if entry is None:
            return None
        if entry.expires <= time.time():
            self._forget(model, key)
            return None
        index.move_to_end(key)
        datas = []
        for name in entry.names:
            data = await self._read(name)
            if data is None:  # the store let it go: a miss
                self._forget(model, key)
                return None
            datas.append(data)
        images = [FinalImage(data, fmt, seed, revised)
                  for data, fmt, seed, revised in zip(datas, entry.formats, entry.seeds, entry.revised, strict=True)]
        return images, entry

    async def _read(self, name: str) -> bytes | None:
        found = await self.store.open(name)
        if found is None:
            return None
        if found.path is not None:
            try:
                return await asyncio.to_thread(found.path.read_bytes)
            except OSError:
                return None
        return b"".join([chunk async for chunk in found.chunks])

    async def put(self, model: str, key: tuple, images: list[FinalImage], route: str, provider: str,
                  config: CacheConfig) -> None:
        datas = await asyncio.to_thread(lambda: [_raw(img) for img in images])
        if any(d is None or img.format is None for d, img in zip(datas, images, strict=True)):
            return
        size = sum(len(d) for d in datas)
        limit = int(config.max_mb * 1024 * 1024)
        if size > limit:
            return
        names = [await self.store.put(d, MIME[img.format]) for d, img in zip(datas, images, strict=True)]
        ttl = min(config.ttl_seconds, getattr(self.store, "ttl", config.ttl_seconds))
        self._forget(model, key)
        index = self._index.setdefault(model, OrderedDict())
        index[key] = Entry(names, [img.format for img in images], [img.seed for img in images],
                           [img.revised_prompt for img in images], route, provider, time.time() + ttl, size)
        self._bytes[model] = self._bytes.get(model, 0) + size
        while self._bytes[model] > limit and index:
            self._forget(model, next(iter(index)))

    def _forget(self, model: str, key: tuple) -> None:
        entry = self._index.get(model, {}).pop(key, None)
        if entry is not None:
            self._bytes[model] -= entry.size
