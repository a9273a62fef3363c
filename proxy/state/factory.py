"""Which backends hold the state and the images: the factory the interface modules do not hold."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from .shared_memory import MemoryState
from .shared_redis import RedisState
from .store import ImageStore
from .store_folder import FilesystemStore
from .store_s3 import S3Store

if TYPE_CHECKING:
    from ..config import Config, StoreConfig

State: TypeAlias = MemoryState | RedisState


def make_state(config: Config) -> State:
    """The state `config.state` asks for. What a request holds in Redis (a concurrency slot, an idempotency
    claim) frees itself within a short lease should its process die holding it (shared_redis.py)."""
    state = config.state
    if state.redis_url:
        return RedisState(state.redis_url, prefix=state.key_prefix, socket_timeout=state.socket_timeout,
                          cluster=state.redis_cluster)
    return MemoryState(state.memory_max_records, int(state.memory_max_mb * 1024 * 1024))


def make_store(config: StoreConfig) -> ImageStore:
    """The store the config names (the S3 one needs the `s3` extra: `pip install 'qwen-image-proxy[s3]'`)."""
    if config.kind == "s3":
        return S3Store.from_config(config)
    return FilesystemStore(config.path, config.ttl_seconds)
