"""The image store behind response_format=url: images with unguessable names that expire after a TTL.

The interface (`ImageStore`) and the names images get. Two kinds behind it: a folder served by the proxy
itself (store_folder.py) and an S3-compatible bucket (store_s3.py: presigned links, or streamed by the
proxy); factory.py picks one.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import ServiceUnavailable

if TYPE_CHECKING:
    pass

log = logging.getLogger("proxy.store")  # its name before proxy/ had packages: logging configs keep working

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "image/gif": "gif",
              "image/avif": "avif"}
CONTENT_TYPES = {ext: mime for mime, ext in EXTENSIONS.items()}
# 32 url-safe characters = 192 random bits, well above the 128 asked for. Used with fullmatch: `$` would
# also accept a trailing newline, which a bucket then rejects as a bad key (a 503 instead of a 404).
_NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpeg|webp|gif|avif)")
# What a write in progress is called (see FilesystemStore._write); the sweeper removes only these and _NAME.
_TMP = re.compile(r"\.[A-Za-z0-9_.-]+\.(png|jpeg|webp|gif|avif)\.tmp")


class StoreUnavailable(ServiceUnavailable):
    """The image store cannot take or give images now (the bucket is unreachable, refuses us, times out).

    A url answer is never silently turned into b64_json: the client gets this 503 with Retry-After."""

    code = "store_unavailable"

    def __init__(self, message: str = "The image store is unavailable; retry shortly.", *, retry_after: float = 5) -> None:
        super().__init__(message, retry_after=retry_after)


@dataclass
class StoredImage:
    """A live image to answer GET /images/<name> with: a local file (`path`), or a stream of chunks."""

    content_type: str
    size: int | None = None
    path: Path | None = None
    chunks: AsyncIterator[bytes] | None = None
    # When it expires (Unix time): caches must not keep it longer than that.
    expires_at: float | None = None


class ImageStore(Protocol):
    ttl: float

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, data: bytes, mime: str) -> str:
        """Store bytes; returns the name (id + extension). Raises StoreUnavailable."""
        ...

    async def url_for(self, name: str, base_url: str) -> str:
        """The link a url answer carries: the proxy's /images/<name> under base_url, or a presigned one."""
        ...

    async def delete(self, name: str) -> None:
        """Remove an image before its TTL (a deleted background job's result); unknown names are ignored."""
        ...

    async def open(self, name: str) -> StoredImage | None:
        """The image for GET /images/<name>; None when unknown, expired or not a valid name."""
        ...


def new_name(mime: str) -> str:
    return f"{secrets.token_urlsafe(24)}.{EXTENSIONS[mime]}"


def valid_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


def sweepable(name: str) -> bool:
    """A name this store writes: an image, or a write in progress. The folder or bucket may be shared with
    other files, and those are never the sweeper's business."""
    return bool(_NAME.fullmatch(name) or _TMP.fullmatch(name))


def proxy_url(base_url: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/images/{name}"
