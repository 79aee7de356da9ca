"""A decode-once cache: each split's uint8 image tensor, saved with ``torch.save``.

Decoding tens of thousands of PNG/JPEG files takes seconds to minutes; reading the saved
tensor takes about a second. A cache file is trusted only if its key matches: the key covers
the source files' identity (path, size, mtime), the split's class list where it is known before
decoding, the image size and :data:`FORMAT_VERSION`, so any change to the inputs or to this
code's output format builds a fresh file. A file that fails to load, or fails its checksum, is
discarded (with a warning) and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metakd_run.checkpoint import atomic_file

log = logging.getLogger(__name__)

# Bump when the decoded tensor changes for the same inputs (resampling, inversion, layout...).
FORMAT_VERSION = 1
CACHE_FOLDER = ".metakd_cache"


def default_cache_dir(root: Path) -> Path:
    """``<root>/.metakd_cache`` if the data root is writable, else the user's cache folder.

    A folder whose permission bits forbid writing counts as read-only even for the superuser
    (shared data sets are often published that way), so the cache then goes to
    ``$XDG_CACHE_HOME/metakd_run`` (default ``~/.cache/metakd_run``).
    """
    local = Path(root) / CACHE_FOLDER
    if _writable(local if local.exists() else Path(root)):
        return local
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "metakd_run"


def _writable(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & 0o222) and os.access(path, os.W_OK)


def file_identity(paths: Iterable[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` per file: what changes when a source file is replaced."""
    out = []
    for path in paths:
        st = Path(path).stat()
        out.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_stem(dataset: str, split: str, image_size: int, root: Path) -> str:
    """File-name prefix of one split's cache; the root's hash keeps two data roots apart."""
    where = hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]
    label = split
    if "/" in split or "." in split:  # a split file: its name, told apart by its full path
        path = str(Path(split).expanduser().resolve())
        label = f"{Path(split).stem}.{hashlib.sha256(path.encode()).hexdigest()[:6]}"
    return f"{dataset}-{label}-{image_size}px-{where}"


@dataclass(frozen=True)
class CacheResult:
    """Images and class names, the cache file (None: not cached), build seconds (None: hit)."""

    images: Tensor
    classes: list[str]
    path: Path | None
    built_s: float | None


def load_or_build(
    cache_dir: Path | None,
    stem: str,
    key: dict[str, Any],
    build: Callable[[], tuple[Tensor, list[str]]],
) -> CacheResult:
    """The cached ``(images, classes)`` for ``key``, or ``build()`` them and save atomically.

    ``key`` must be JSON-serialisable and change whenever the result would. ``cache_dir=None``
    builds every time.
    """
    digest = _digest(key)
    path = None if cache_dir is None else Path(cache_dir) / f"{stem}-{digest[:20]}.pt"
    if path is not None and path.is_file():
        hit = _load(path, digest)
        if hit is not None:
            return CacheResult(hit[0], hit[1], path, None)
    start = time.perf_counter()
    images, classes = build()
    built_s = time.perf_counter() - start
    if path is not None and _save(path, digest, classes, images):
        _remove_stale(path, stem)
        return CacheResult(images, classes, path, built_s)
    return CacheResult(images, classes, None, built_s)


def _digest(key: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "key": key}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _checksum(images: Tensor) -> int:
    return zlib.crc32(images.contiguous().numpy().data)


def _load(path: Path, digest: str) -> tuple[Tensor, list[str]] | None:
    """The cached tensor and classes, or None (warned, file deleted) if the file is unusable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        problem = _check(payload, digest)
    except Exception as err:  # any failure to load means "do not trust it"
        first_line = (str(err).splitlines() or [""])[0][:120]
        problem = f"unreadable: {type(err).__name__} {first_line}".strip()
    if problem is None:
        return payload["images"], list(payload["classes"])
    log.warning("discarding corrupt cache file %s (%s); rebuilding it", path, problem)
    path.unlink(missing_ok=True)
    return None


def _check(payload: Any, digest: str) -> str | None:
    if not isinstance(payload, dict) or not isinstance(payload.get("images"), Tensor):
        return "not a cache payload"
    if payload.get("format") != FORMAT_VERSION or payload.get("key") != digest:
        return "key mismatch"
    images, classes = payload["images"], payload.get("classes")
    if images.dtype != torch.uint8 or not isinstance(classes, list):
        return "wrong content"
    if images.dim() != 5 or images.shape[0] != len(classes):
        return "wrong shape"
    if payload.get("crc32") != _checksum(images):
        return "checksum mismatch"
    return None


def _save(path: Path, digest: str, classes: list[str], images: Tensor) -> bool:
    """Write atomically, readable by whoever shares the folder; a failure only costs the cache."""
    payload = {
        "format": FORMAT_VERSION,
        "key": digest,
        "classes": list(classes),
        "images": images,
        "crc32": _checksum(images),
    }
    try:
        with atomic_file(path) as f:
            torch.save(payload, f)
    except OSError as err:
        log.warning(
            "cannot write the data cache %s (%s); continuing without it: set dataset.cache_dir "
            "to a writable folder",
            path,
            err,
        )
        return False
    return True


def _remove_stale(keep: Path, stem: str) -> None:
    """Delete this split's caches for older inputs (same stem, other key)."""
    for old in keep.parent.glob(f"{stem}-*.pt"):
        if old != keep:
            old.unlink(missing_ok=True)
