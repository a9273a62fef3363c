"""Resolve, download, cache and activate LoRAs.

Resolution (`LoraManager.resolve_request`) runs at submit time on the caller's thread and only
touches the file system, so bad input fails synchronously. URL downloads (`safe_download`: https
only, every redirect hop on the allowlist, public addresses only, size and time caps) run on a helper thread;
the worker only takes a job once its downloads are done. Loading adapters into the pipeline
(`LoraManager.activate`) runs on the engine's worker thread, like every other pipeline call, and
alone among the process's module-building steps (local_backend.exclusive).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import urllib.parse
import warnings
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EngineConfig, LoraSpec
from .errors import LoraError
from .exclusive import exclusive
from .safe_download import DownloadError, DownloadPolicy, DownloadRefused, check_url, download

log = logging.getLogger(__name__)

MAX_REQUEST_LORAS = 3
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.safetensors)?$")
# Seconds for one LoRA download, redirects included (2 GB at ~4 MB/s).
DOWNLOAD_TIMEOUT = 600.0


@dataclass
class LoraRef:
    """A resolved LoRA: `source` yields (local safetensors path, content key) once available."""

    label: str  # for error messages (URLs without their query string)
    scale: float
    source: Future

    @property
    def ready(self) -> bool:
        return self.source.done()

    def key(self) -> str:
        return self.source.result()[1]


def _done(path: str, key: str) -> Future:
    fut: Future = Future()
    fut.set_result((path, key))
    return fut


def _adapter_name(key: str) -> str:
    # peft uses adapter names as module keys: keep them short and free of dots.
    return "lora_" + hashlib.sha1(key.encode()).hexdigest()[:16]


def check_safetensors(path: str, label: str) -> None:
    """Read only the header: reject pickles, empty files and files without tensors."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception:
        raise LoraError(f"LoRA {label!r} is not a safetensors file") from None
    if not keys:
        raise LoraError(f"LoRA {label!r} contains no tensors")


def _text_problem(path: str) -> str | None:
    """What makes `path` unusable as text, before it reaches the file system or a message."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it contains a lone surrogate)"
    if "\x00" in path:
        return "must not contain NUL characters"
    return None


def _safe_label(path: str) -> str:
    try:
        parts = urllib.parse.urlsplit(path)
    except ValueError:  # malformed, e.g. an unclosed IPv6 bracket: still never echo a query
        return path.split("?", 1)[0]
    if parts.scheme in ("http", "https"):  # a query may carry a token: never echo it
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return path


class LoraManager:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.cache_dir = Path(
            config.lora_cache_dir or Path.home() / ".cache" / "qwen-image-proxy" / "loras"
        ).expanduser()
        self._lock = threading.Lock()
        self._downloads: dict[str, Future] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> key, LRU order
        self._pinned: set[str] = set()
        self._allowed_dirs = [Path(d).expanduser().resolve() for d in config.lora_dirs]

    # ----- resolution (caller's thread) -----

    def resolve_request(self, specs: list[LoraSpec]) -> list[LoraRef]:
        if len(specs) > MAX_REQUEST_LORAS:
            raise LoraError(f"at most {MAX_REQUEST_LORAS} LoRAs per request, got {len(specs)}")
        return [self.resolve(spec, trusted=False) for spec in specs]

    def resolve(self, spec: LoraSpec, trusted: bool) -> LoraRef:
        """trusted=True for paths from the engine's own config: no allowlists apply."""
        path, scale = spec.path, spec.scale
        if not isinstance(path, str) or not path.strip():
            raise LoraError("a LoRA needs a path or a name")
        if problem := _text_problem(path):
            raise LoraError(f"a LoRA path {problem}")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise LoraError(f"LoRA {_safe_label(path)!r}: scale must be a finite number")
        if path in self.config.loras:  # operator-configured: trusted, its own scale times this one
            named = self.config.loras[path]
            try:
                source = self._source(named.path, trusted=True)
            except (LoraError, OSError, ValueError) as e:
                # The operator's file, not the client's: the client was told "LoRA '<its file>' not found:
                # not a configured name", naming the server's path and denying the name it had asked for.
                log.warning("configured LoRA %r cannot be loaded: %s", path, e)
                raise LoraError(f"LoRA {path!r} is configured on this server but cannot be loaded "
                                "(its file is missing or unreadable; the server's log says why)") from None
            return LoraRef(path, named.scale * scale, source)
        try:
            source = self._source(path, trusted)
        except (OSError, ValueError) as e:  # e.g. a name too long for the file system, a malformed URL
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)  # never the server's paths
            raise LoraError(f"LoRA {_safe_label(path)[:200]!r} cannot be used: {reason}") from None
        return LoraRef(_safe_label(path), scale, source)

    def _source(self, path: str, trusted: bool) -> Future:
        label = _safe_label(path)
        if "://" in path:
            return self._resolve_url(path, label, trusted)
        file = self._find_file(path, trusted)
        if file is not None:
            return self._file_source(file, label)
        if HUB_ID.match(path) and not path.startswith((".", "/", "~")):
            return self._resolve_hub(path)
        raise LoraError(
            f"LoRA {label!r} not found: not a configured name, an allowed file, a cached repo or a URL"
        )

    def local_file(self, path: str) -> str | None:
        """The local file a request's LoRA `path` names, resolved as a request's would be (a configured
        name, a file under lora_dirs, a cached repo, a URL already downloaded); None where there is none.
        Never downloads, never raises: what a request cannot use fails when the request runs."""
        try:
            trusted = path in self.config.loras
            target = self.config.loras[path].path if trusted else path
            if "://" in target:
                cached = self._cached_url(target)
                return None if cached is None else str(cached)
            file = self._find_file(target, trusted)
            if file is not None:
                return str(file)
            if HUB_ID.match(target) and not target.startswith((".", "/", "~")):
                return str(self._resolve_hub(target).result()[0])
        except (LoraError, OSError, ValueError):
            pass
        return None

    def _find_file(self, path: str, trusted: bool) -> Path | None:
        """The real path of a local file, or None when `path` may still be a repo id."""
        raw = Path(path).expanduser()
        explicit = raw.is_absolute() or path.startswith((".", "~"))  # clearly meant as a file path
        if trusted:
            real = raw.resolve()
            if real.is_file():
                return real
            if explicit:
                raise LoraError(f"LoRA file {path!r} not found")
            return None
        if raw.is_absolute() and not self._allowed_dirs:
            raise LoraError("LoRA file paths are not allowed (no LoRA folders are configured)")
        escaped = False
        for folder in self._allowed_dirs:
            candidate = folder / raw  # an absolute raw stays itself
            # resolve() follows symlinks and "..", so the containment check sees the real target.
            real = candidate.resolve()
            if real.is_relative_to(folder):
                if real.is_file():
                    return real
            elif not any(real.is_relative_to(d) for d in self._allowed_dirs):
                # Same answer whether or not the outside file exists: no probing of the disk.
                escaped = escaped or raw.is_absolute() or ".." in raw.parts or candidate.is_symlink()
        if escaped:
            raise LoraError(f"LoRA {path!r} is outside the allowed LoRA folders")
        if explicit:
            raise LoraError(f"LoRA file {path!r} not found")
        return None

    def _file_source(self, file: Path, label: str) -> Future:
        if file.suffix != ".safetensors":
            raise LoraError(f"LoRA {label!r} is not a safetensors file (only .safetensors can be loaded)")
        check_safetensors(str(file), label)
        stat = file.stat()
        return _done(str(file), f"file:{file}:{stat.st_size}:{stat.st_mtime_ns}")

    def _resolve_hub(self, path: str) -> Future:
        from huggingface_hub import snapshot_download

        parts = path.split("/")
        if ".." in parts:
            raise LoraError(f"LoRA {path!r}: '..' is not allowed in a repo path")
        repo, weight = "/".join(parts[:2]), "/".join(parts[2:]) or None
        try:  # cache only: a request must never trigger a multi-GB hub download
            folder = Path(snapshot_download(repo, local_files_only=True))
        except Exception:
            raise LoraError(f"LoRA repo {repo!r} is not in the local Hugging Face cache") from None
        if weight is None:
            files = sorted(folder.rglob("*.safetensors"))
            if len(files) != 1:
                found = ", ".join(str(f.relative_to(folder)) for f in files) or "none"
                raise LoraError(
                    f"LoRA repo {repo!r}: name one .safetensors file as {repo}/<file> (found: {found})"
                )
            file = files[0]
        else:
            file = folder / weight
            if not file.is_file():
                raise LoraError(f"LoRA file {weight!r} is not in the cached repo {repo!r}")
        real = file.resolve()  # the blob's name is its content hash: a stable key
        check_safetensors(str(real), path)
        return _done(str(real), f"blob:{real}")

    # ----- URLs (download helper thread) -----

    def _policy(self, trusted: bool) -> DownloadPolicy:
        """Request URLs: hosts on lora_url_hosts, public addresses. The operator's own: any host."""
        return DownloadPolicy(
            allowed_hosts=None if trusted else frozenset(self.config.lora_url_hosts),
            allow_private=trusted,
            max_bytes=self.config.lora_max_bytes,
            timeout=DOWNLOAD_TIMEOUT,
        )

    def _resolve_url(self, url: str, label: str, trusted: bool) -> Future:
        policy = self._policy(trusted)
        urllib.parse.urlsplit(url)  # malformed (an unclosed IPv6 bracket): ValueError, reported by resolve()
        try:
            check_url(url, policy)  # at once, on the caller's thread; each hop is checked again
        except DownloadRefused as e:
            raise LoraError(f"LoRA URL {label!r} is not allowed: {e}") from None
        cached = self._cached_url(url)
        if cached is not None:
            return _done(str(cached), f"sha256:{cached.stem}")
        with self._lock:
            fut = self._downloads.get(url)
            if fut is None or (fut.done() and fut.exception() is not None):  # retry failed downloads
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lora-download")
                fut = self._executor.submit(self._download, url, label, policy)
                self._downloads[url] = fut
            return fut

    def _index_path(self) -> Path:
        return self.cache_dir / "urls.json"

    def _read_index(self) -> dict[str, str]:
        try:
            return json.loads(self._index_path().read_text())
        except (OSError, ValueError):
            return {}

    def _cached_url(self, url: str) -> Path | None:
        digest = self._read_index().get(url)
        if digest:
            file = self.cache_dir / f"{digest}.safetensors"
            if file.is_file():
                return file
        return None

    def _download(self, url: str, label: str, policy: DownloadPolicy) -> tuple[str, str]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".part")
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out:

                def sink(chunk: bytes) -> None:
                    digest.update(chunk)
                    out.write(chunk)

                try:
                    download(url, sink, policy)
                except DownloadRefused as e:
                    log.warning("LoRA URL %s refused: %s", label, e)
                    raise LoraError(f"LoRA URL {label!r} refused: {e}") from None
                except DownloadError as e:
                    raise LoraError(f"LoRA URL {label!r} could not be downloaded: {e}") from None
            check_safetensors(tmp, label)
            final = self.cache_dir / f"{digest.hexdigest()}.safetensors"
            os.replace(tmp, final)  # content-addressed: two URLs with one file share it
            self._record(url, digest.hexdigest())
            return str(final), f"sha256:{digest.hexdigest()}"
        except LoraError:
            raise
        except Exception as exc:
            raise LoraError(f"LoRA URL {label!r} could not be downloaded: {type(exc).__name__}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _record(self, url: str, digest: str) -> None:
        with self._lock:
            index = self._read_index()
            index[url] = digest
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".json")
            with os.fdopen(fd, "w") as out:
                json.dump(index, out)
            os.replace(tmp, self._index_path())

    # ----- adapters (worker thread only) -----

    def activate(self, pipe: Any, refs: list[LoraRef], pinned: bool = False) -> None:
        """Make exactly `refs` active with their scales (none: plain base model)."""
        weights: OrderedDict[str, float] = OrderedDict()
        for ref in refs:
            name = self._ensure_loaded(pipe, ref, keep=list(weights), pinned=pinned)
            weights[name] = weights.get(name, 0.0) + ref.scale  # the same LoRA twice: deltas add
        if not weights:
            if self._loaded:
                pipe.disable_lora()
            return
        pipe.enable_lora()
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))

    def _ensure_loaded(self, pipe: Any, ref: LoraRef, keep: list[str], pinned: bool) -> str:
        path, key = ref.source.result()  # raises the download's LoraError, if any
        name = _adapter_name(key)
        if pinned:
            self._pinned.add(name)
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return name
        # peft builds the adapter's layers under a process-wide patch of torch (local_backend.exclusive):
        # never beside another engine's load, whichever thread this is.
        with exclusive():
            self._evict(pipe, keep)
            self._load(pipe, path, name, ref.label)
        self._loaded[name] = key
        return name

    def _evict(self, pipe: Any, keep: list[str]) -> None:
        unpinned = [n for n in self._loaded if n not in self._pinned and n not in keep]
        while len(unpinned) >= self.config.lora_cache_size:
            victim = unpinned.pop(0)
            pipe.delete_adapters(victim)
            del self._loaded[victim]

    def _load(self, pipe: Any, path: str, name: str, label: str) -> None:
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception:
            raise LoraError(f"LoRA {label!r} is not a safetensors file") from None
        try:
            with warnings.catch_warnings():  # peft warns on every adapter after the first: expected here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_weights(state, adapter_name=name)
        except Exception as exc:
            self._drop_partial(pipe, name)
            raise LoraError(f"LoRA {label!r} does not fit this model: {str(exc)[:200]}") from None
        # diffusers only logs a warning when no key matches a layer: check that it really loaded.
        if name not in pipe.get_list_adapters().get("transformer", []):
            self._drop_partial(pipe, name)
            raise LoraError(f"LoRA {label!r} loaded no weights: none of its keys match a Qwen-Image layer")

    @staticmethod
    def _drop_partial(pipe: Any, name: str) -> None:
        if any(name in names for names in pipe.get_list_adapters().values()):
            pipe.delete_adapters(name)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

