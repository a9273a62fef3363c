"""Content hashes of the LoRA files a seeded request loads, for its cache key: a LoRA file replaced in
place makes a new key, so the cache never serves pictures of the old weights.

A file's digest is kept per (path, size, mtime_ns, ctime_ns, inode): a repeated request costs a stat,
not a read of a 300 MB file; a file written again changes at least its ctime, which no tool sets back.
Blocking (reads files): call from a thread.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..request import LoraRef

_KEEP = 512  # digests remembered (a few dozen bytes each)


class LoraDigests:
    def __init__(self) -> None:
        self._known: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # files hashed (tests read it: a repeat reads nothing)

    def digest(self, path: str) -> str | None:
        """The sha256 of the file at `path`, or None when it cannot be read."""
        try:
            with open(path, "rb") as f:
                before = os.fstat(f.fileno())
                stamp = (path, before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino)
                with self._lock:
                    found = self._known.get(stamp)
                    if found is not None:
                        self._known.move_to_end(stamp)
                        return found
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                after = os.fstat(f.fileno())
        except OSError:
            return None
        self.reads += 1
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != stamp[1:4]:
            return digest  # written while read: right for this request, not to be remembered
        with self._lock:
            self._known[stamp] = digest
            while len(self._known) > _KEEP:
                self._known.popitem(last=False)
        return digest

    def keys(self, loras: Sequence[LoraRef], resolvers: Sequence[Callable[[str], str | None]]) -> tuple:
        """(path, scale, content hash) per LoRA: the file the first route able to see it would load; the
        hash None where no route sees a file (an upstream's LoRA, a URL not yet downloaded: its path
        is all there is to compare)."""
        out = []
        for lora in loras:
            file = next((f for resolve in resolvers if (f := resolve(lora.path)) is not None), None)
            out.append((lora.path, lora.scale, self.digest(file) if file is not None else None))
        return tuple(out)
