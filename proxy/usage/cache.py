"""The cache of seeded requests: a request with an explicit seed whose normalized fields match an earlier
success gets the same images back. Images live in the configured image store; the index in memory or
Redis (proxy/usage/cache_index.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING

import pybase64 as base64

from ..config.usage import CacheConfig
from ..media.output import MIME, FinalImage
from .cache_index import CacheIndex, Entry, MemoryIndex

if TYPE_CHECKING:
    from ..request import ImageRequest
    from ..state.store import ImageStore

log = logging.getLogger("proxy.usage")


def cache_key(req: ImageRequest, routes: str, key_name: str | None, config: CacheConfig,
              loras: tuple = ()) -> tuple | None:
    """The request's cache key (pure): None without an explicit seed (it asks for a new image). A tuple of
    plain values, compared whole by the in-memory index (no digest to collide, and cheap to hash).

    Everything that changes the pictures is in it: the model and what its routes run (`routes`: the
    model's routes_signature), prompt, negative prompt, size, n, seed, steps, cfg, tier, LoRAs (`loras`: path,
    scale and file content hash, from LoraDigests.keys), input images and mask by content hash, output format
    and compression, and the key with scope: key.
    """
    if req.seed is None:
        return None
    return (
        req.model, routes, req.prompt, req.negative_prompt, req.width, req.height, req.n,
        req.seed, req.num_inference_steps, req.cfg_scale, req.resolution, req.prompt_enhancement, req.quality,
        req.background, req.style, req.input_fidelity, loras or tuple((lora.path, lora.scale) for lora in req.loras),
        tuple(hashlib.sha256(img.data).digest() for img in req.images),
        hashlib.sha256(req.mask.data).digest() if req.mask is not None else None,
        req.output_format, req.output_compression, repr(sorted(req.extra.items())) if req.extra else None,
        key_name if config.scope == "key" else None,
    )


def routes_signature(routes: list) -> str:
    """What a model's routes run (provider, upstream model, params, dropped fields): part of its cache keys."""
    return json.dumps([(r.provider, r.model, r.params, r.drop) for r in routes], sort_keys=True, default=str)


def _raw(img: FinalImage) -> bytes | None:
    if img.data is not None:
        return img.data
    if img.b64 is not None:
        return base64.b64decode(img.b64)
    return None  # an upstream URL handed on: nothing to keep


class SeededCache:
    """Entries expire after ttl_seconds or when the store lets their images go (store.ttl_seconds),
    whichever comes first; past a model's max_mb the oldest go."""

    def __init__(self, store: ImageStore, index: CacheIndex | None = None) -> None:
        self.store = store
        self.index = index if index is not None else MemoryIndex()

    async def get(self, model: str, key: tuple) -> tuple[list[FinalImage], Entry] | None:
        entry = await self.index.get(model, key)
        if entry is None:
            return None
        if entry.expires <= time.time():
            await self.index.forget(model, key)
            return None
        datas = []
        for name in entry.names:
            data = await self._read(name)
            if data is None:  # the store let it go: a miss
                await self.index.forget(model, key)
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
        chunks = found.chunks
        assert chunks is not None, "a stored image has a path or chunks"
        return b"".join([chunk async for chunk in chunks])

    async def put(self, model: str, key: tuple, images: list[FinalImage], route: str, provider: str,
                  config: CacheConfig) -> None:
        raws = await asyncio.to_thread(lambda: [_raw(img) for img in images])
        datas = [d for d in raws if d is not None]
        formats = [img.format for img in images if img.format is not None]
        if len(datas) != len(raws) or len(formats) != len(images):
            return
        size = sum(len(d) for d in datas)
        limit = int(config.max_mb * 1024 * 1024)
        if size > limit:
            return
        names = [await self.store.put(d, MIME[fmt]) for d, fmt in zip(datas, formats, strict=True)]
        ttl = min(config.ttl_seconds, getattr(self.store, "ttl", config.ttl_seconds))
        entry = Entry(names, formats, [img.seed for img in images],
                      [img.revised_prompt for img in images], route, provider, time.time() + ttl, size)
        await self.index.put(model, key, entry, limit)
