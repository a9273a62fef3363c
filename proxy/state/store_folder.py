"""The image store in one folder, served by the proxy at /images/<name>, with a sweeper for expired files."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

from .store import CONTENT_TYPES, StoredImage, StoreUnavailable, new_name, proxy_url, sweepable, valid_name

log = logging.getLogger("proxy.store")  # its name before proxy/ had packages: logging configs keep working


class FilesystemStore:
    """Files in one folder, served by the proxy at /images/<name>; a background sweeper removes expired ones."""

    def __init__(self, root: str | os.PathLike, ttl_seconds: float) -> None:
        self.root = Path(root)
        self.ttl = ttl_seconds
        self._sweeper: asyncio.Task | None = None

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        except OSError as e:
            # Not fatal: b64_json answers need no store, and url ones get a 503 (a later write tries again).
            log.warning("image store: cannot create %s: %s; url answers fail until it can be", self.root, e)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def put(self, data: bytes, mime: str) -> str:
        """Store bytes; returns the file name (id + extension) to build a URL from."""
        name = new_name(mime)
        try:
            await asyncio.to_thread(self._write, name, data)
        except OSError as e:  # a full or read-only disk: the client's request is not at fault
            log.warning("image store: cannot write %s: %s", name, e)
            raise StoreUnavailable("The image store cannot save images now (the server's disk refused); "
                                   "retry shortly or ask for response_format=b64_json.") from None
        return name

    async def url_for(self, name: str, base_url: str) -> str:
        return proxy_url(base_url, name)

    async def open(self, name: str) -> StoredImage | None:
        found = await asyncio.to_thread(self._find, name)
        if found is None:
            return None
        path, content_type, mtime = found
        return StoredImage(content_type=content_type, path=path, expires_at=mtime + self.ttl)

    async def delete(self, name: str) -> None:
        if valid_name(name):
            await asyncio.to_thread(lambda: (self.root / name).unlink(missing_ok=True))

    def _write(self, name: str, data: bytes) -> None:
        # Write then rename, so a reader never sees half a file.
        tmp = self.root / f".{name}.tmp"
        try:
            try:
                tmp.write_bytes(data)
            except FileNotFoundError:
                # The folder was removed under us (a tmp cleaner, an operator): make it again rather than
                # refuse every url request until a restart.
                self.root.mkdir(parents=True, exist_ok=True)
                tmp.write_bytes(data)
            os.replace(tmp, self.root / name)
        except OSError:
            # A full disk leaves part of the file: give its space back now, not after the TTL.
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def lookup(self, name: str) -> tuple[Path, str] | None:
        """The path and Content-Type of a live file; None when unknown or expired."""
        found = self._find(name)
        return None if found is None else found[:2]

    def _find(self, name: str) -> tuple[Path, str, float] | None:
        if not valid_name(name):
            return None
        path = self.root / name
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as e:  # the folder is unreadable or not a folder any more: the server's fault, not a 500
            log.warning("image store: cannot read %s: %s", name, e)
            raise StoreUnavailable("The image store cannot read images now; retry shortly.") from None
        if time.time() - mtime > self.ttl:
            with contextlib.suppress(OSError):  # gone already, or the sweeper's to report
                path.unlink()
            return None
        return path, CONTENT_TYPES[name.rsplit(".", 1)[1]], mtime

    def sweep(self) -> int:
        removed, failed, now = 0, 0, time.time()
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not sweepable(entry.name):
                    continue
                try:
                    if entry.is_file(follow_symlinks=False) and now - entry.stat().st_mtime > self.ttl:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:  # another proxy on the same folder got there first
                    pass
                except OSError as e:  # one file we may not delete must not stop the rest from going
                    failed += 1
                    error = e
        if failed:
            log.warning("image store: cannot remove %d expired files (%s)", failed, error)
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
