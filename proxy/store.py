"""The image store behind response_format=url: files with unguessable ids that expire after a TTL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from pathlib import Path

log = logging.getLogger(__name__)

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "image/gif": "gif",
              "image/avif": "avif"}
CONTENT_TYPES = {ext: mime for mime, ext in EXTENSIONS.items()}
# 32 url-safe characters = 192 random bits, well above the 128 asked for.
_NAME = re.compile(r"^[A-Za-z0-9_-]{32}\.(png|jpeg|webp|gif|avif)$")


class FilesystemStore:
    def __init__(self, root: str | os.PathLike, ttl_seconds: float):
        self.root = Path(root)
        self.ttl = ttl_seconds
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def put(self, data: bytes, mime: str) -> str:
        """Store bytes; returns the file name (id + extension) to build a URL from."""
        name = f"{secrets.token_urlsafe(24)}.{EXTENSIONS[mime]}"
        await asyncio.to_thread(self._write, name, data)
        return name

    def _write(self, name: str, data: bytes) -> None:
        # Write then rename, so a reader never sees half a file.
        tmp = self.root / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / name)

    def lookup(self, name: str) -> tuple[Path, str] | None:
        """The path and Content-Type of a live file; None when unknown or expired."""
        if not _NAME.match(name):
            return None
        path = self.root / name
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None
        if age > self.ttl:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        return path, CONTENT_TYPES[name.rsplit(".", 1)[1]]

    def sweep(self) -> int:
        removed, now = 0, time.time()
        for path in self.root.iterdir():
            try:
                if path.is_file() and now - path.stat().st_mtime > self.ttl:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    async def _sweep_forever(self) -> None:
        interval = min(max(self.ttl / 4, 1), 300)
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await asyncio.to_thread(self.sweep)
                if removed:
                    log.debug("image store: removed %d expired files", removed)
            except OSError as e:
                log.warning("image store sweep failed: %s", e)
