"""The image store in an S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, Ceph, ...), through obstore.

url answers are presigned GET links that expire with the store's TTL, or (serve_via_proxy) links to the
proxy's own /images/<name>, streamed from the bucket. A sweeper deletes objects older than the TTL, so a
bucket needs no lifecycle rule (one that also removes the leftovers of a crashed process is still wise:
see the README). Every failure to reach the bucket is a StoreUnavailable (503 store_unavailable).

obstore (the Rust object_store crate) does the I/O on its own threads: uploads and downloads never
hold the event loop, and signing is local.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from datetime import timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from ..config.sections import AWS_SECRET_VARIABLES, MAX_PRESIGN_SECONDS
from .store import CONTENT_TYPES, StoredImage, StoreUnavailable, new_name, proxy_url, valid_name

if TYPE_CHECKING:
    from ..config import StoreConfig

log = logging.getLogger("proxy.store_s3")  # its name before proxy/ had packages: logging configs keep working

# Objects are streamed to clients in chunks of about this size.
STREAM_CHUNK = 256 * 1024
# The error code in an S3 error answer (NoSuchBucket, AccessDenied, ...): obstore's message puts the answer's
# XML after its first line, which is all a log line keeps of it.
_S3_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")


def _obstore() -> ModuleType:
    try:
        import obstore
        import obstore.store
    except ImportError:  # pragma: no cover - the message is the point
        raise RuntimeError("store.kind: s3 needs the obstore package: pip install 'qwen-image-proxy[s3]'") from None
    return obstore


class S3Store:
    """Images as objects `<prefix><name>` in one bucket."""

    def __init__(self, bucket: str, *, ttl_seconds: float, endpoint_url: str | None = None,
                 region: str | None = None, prefix: str = "", access_key_id: str | None = None,
                 secret_access_key: str | None = None, presign: bool = True, public_url: str | None = None,
                 serve_via_proxy: bool = False, timeout: float = 30) -> None:
        _obstore()  # a missing extra is a clear error when the gateway is built, not on the first request
        self.bucket = bucket
        self.ttl = ttl_seconds
        self.endpoint_url = endpoint_url.rstrip("/") if endpoint_url else None
        self.region = region
        self.prefix = prefix.lstrip("/")
        # The objects' key prefix as obstore writes it: its path segments joined by "/", then "/" before the
        # name, so "qip" and "qip/" both store "qip/<name>" (a public link must name the same key, URL-encoded).
        self._key_prefix = "".join(f"{quote(part)}/" for part in self.prefix.split("/") if part)
        self.presign = presign
        self.public_url = public_url.rstrip("/") if public_url else None
        self.serve_via_proxy = serve_via_proxy
        self.timeout = timeout
        # Kept only to take them out of messages that reach logs (never out of this object otherwise). Without
        # keys given here, obstore takes them from the AWS_* variables: those are as secret.
        self._secrets = sorted({s for s in (access_key_id, secret_access_key, os.environ.get("AWS_ACCESS_KEY_ID"),
                                            *(os.environ.get(name) for name in AWS_SECRET_VARIABLES)) if s},
                               key=len, reverse=True)
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._store: Any = None
        self._sweeper: asyncio.Task | None = None

    @classmethod
    def from_config(cls, config: StoreConfig, env: Mapping[str, str] | None = None) -> S3Store:
        source = os.environ if env is None else env
        key_id = source.get(config.access_key_id_env) if config.access_key_id_env else None
        secret = source.get(config.secret_access_key_env) if config.secret_access_key_env else None
        assert config.bucket is not None  # StoreConfig requires it for kind s3
        return cls(config.bucket, ttl_seconds=config.ttl_seconds, endpoint_url=config.endpoint_url,
                   region=config.region, prefix=config.prefix, access_key_id=key_id, secret_access_key=secret,
                   presign=config.presign, public_url=config.public_url, serve_via_proxy=config.serve_via_proxy,
                   timeout=config.timeout)

    # ---- lifecycle ------------------------------------------------------------------------------

    def _client(self) -> Any:  # obstore.store.S3Store
        obstore = _obstore()
        options: dict[str, Any] = {}
        if self.endpoint_url:
            options["endpoint"] = self.endpoint_url
        if self.region:
            options["region"] = self.region
        elif self.endpoint_url:
            options["region"] = "us-east-1"  # MinIO and friends ignore it, but SigV4 needs one
        if self._access_key_id and self._secret_access_key:
            options["access_key_id"] = self._access_key_id
            options["secret_access_key"] = self._secret_access_key
        client_options = {
            "timeout": timedelta(seconds=self.timeout),
            "connect_timeout": timedelta(seconds=min(self.timeout, 5)),
            "allow_http": bool(self.endpoint_url and self.endpoint_url.startswith("http://")),
        }
        # One quick retry at most: the router has already spent the client's time making the images.
        retry = {"max_retries": 1, "retry_timeout": timedelta(seconds=self.timeout),
                 "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1),
                             "base": 2.0}}
        return obstore.store.S3Store(self.bucket, prefix=self.prefix or None, client_options=client_options,
                                     retry_config=retry, **options)

    async def start(self) -> None:
        if self._store is None:
            self._store = self._client()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._store is not None:
            self._store = None
            # obstore's connection pool winds down on its own runtime threads once the client is dropped;
            # a process that exits in that very moment can abort (SIGABRT) in interpreter teardown.
            # A short pause lets it finish (measured: 20% of quick exits aborted without it, none with 10 ms).
            await asyncio.sleep(0.05)

    @property
    def client(self) -> Any:  # obstore.store.S3Store
        if self._store is None:
            self._store = self._client()
        return self._store

    # ---- the interface --------------------------------------------------------------------------

    async def put(self, data: bytes, mime: str) -> str:
        obstore = _obstore()
        name = new_name(mime)
        try:
            await asyncio.wait_for(
                obstore.put_async(self.client, name, data, attributes={"Content-Type": mime}, use_multipart=False),
                self.timeout + 5)
        except Exception as e:
            raise self._unavailable("save images to", e) from None
        return name

    async def url_for(self, name: str, base_url: str) -> str:
        if self.serve_via_proxy:
            return proxy_url(base_url, name)
        if not self.presign:
            base = self.public_url or self._path_style_url()
            return f"{base}/{self._key_prefix}{name}"
        obstore = _obstore()
        seconds = max(1, min(MAX_PRESIGN_SECONDS, math.ceil(self.ttl)))
        try:
            return await obstore.sign_async(self.client, "GET", name, timedelta(seconds=seconds))
        except Exception as e:
            raise self._unavailable("sign links to", e) from None

    async def delete(self, name: str) -> None:
        if not valid_name(name):
            return
        try:
            await asyncio.wait_for(_obstore().delete_async(self.client, [name]), self.timeout + 5)
        except Exception as e:
            raise self._unavailable("delete images from", e) from None

    async def open(self, name: str) -> StoredImage | None:
        if not valid_name(name):
            return None
        obstore = _obstore()
        try:
            result = await asyncio.wait_for(obstore.get_async(self.client, name), self.timeout)
        except Exception as e:
            if _is_not_found(e):
                return None
            raise self._unavailable("read images from", e) from None
        meta = result.meta
        modified = meta["last_modified"].timestamp()
        if time.time() - modified > self.ttl:
            with contextlib.suppress(Exception):
                await obstore.delete_async(self.client, name)
            return None
        content_type = CONTENT_TYPES[name.rsplit(".", 1)[1]]
        return StoredImage(content_type=content_type, size=meta["size"], chunks=self._chunks(result),
                           expires_at=modified + self.ttl)

    async def _chunks(self, result: Any) -> AsyncIterator[bytes]:  # an obstore GetResult
        try:
            async for chunk in result.stream(min_chunk_size=STREAM_CHUNK):
                yield bytes(chunk)
        except Exception as e:
            # Headers are out already: the connection is cut, which the client sees as a failed download.
            raise self._unavailable("read images from", e) from None

    # ---- expiry ---------------------------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete this store's objects under the prefix older than the TTL; returns how many.

        Only names the store writes (an id and an image extension, right under the prefix): the bucket,
        and with an empty prefix its whole key space, may hold other things."""
        obstore = _obstore()
        cutoff = time.time() - self.ttl
        removed = 0
        try:
            async for batch in obstore.list(self.client, chunk_size=500):
                old = [m["path"] for m in batch
                       if m["last_modified"].timestamp() < cutoff and valid_name(m["path"])]
                if old:
                    await obstore.delete_async(self.client, old)
                    removed += len(old)
        except Exception as e:
            raise self._unavailable("sweep", e) from None
        return removed

    async def _sweep_forever(self) -> None:
        interval = min(max(self.ttl / 4, 1), 300)
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await self.sweep()
                if removed:
                    log.debug("image store: removed %d expired objects", removed)
            except StoreUnavailable:
                pass  # logged by _unavailable; the next round tries again

    # ---- helpers ----------------------------------------------------------------------------------

    def _path_style_url(self) -> str:
        if self.endpoint_url:
            return f"{self.endpoint_url}/{self.bucket}"
        region = self.region or "us-east-1"
        return f"https://{self.bucket}.s3.{region}.amazonaws.com"

    def _unavailable(self, what: str, error: BaseException) -> StoreUnavailable:
        detail = str(error).splitlines()[0][:4000] if str(error) else type(error).__name__
        for secret in self._secrets:  # before the cut: one cut through a secret would leave its first part
            detail = detail.replace(secret, "[redacted]")
        detail = detail[:300]
        code = _s3_code(error)
        log.warning("image store: cannot %s bucket %s: %s%s: %s", what, self.bucket, type(error).__name__,
                    f" ({code})" if code else "", detail)
        return StoreUnavailable(f"The image store (bucket '{self.bucket}') is unavailable: the proxy could not "
                                f"{what} it. Retry shortly.")


def _s3_code(error: BaseException) -> str | None:
    match = _S3_CODE.search(str(error))
    return match.group(1) if match else None


def _is_not_found(error: BaseException) -> bool:
    """An object that is not there (an unknown or expired image). A bucket that is not there is also a 404
    to obstore, but that is the store failing: every link would answer 'not found' as if expired."""
    try:
        from obstore.exceptions import NotFoundError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(error, NotFoundError | FileNotFoundError) and _s3_code(error) != "NoSuchBucket"
