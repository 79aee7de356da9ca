"""Archives and image files: checked downloads, atomic extraction, parallel decoding.

Everything here leaves either a complete file or nothing: downloads and extractions go to a
temporary name in the destination's folder and are renamed into place only when whole, so an
interrupted run never leaves a half-written archive that a later run would trust. Problems with
the user's files come out as :class:`DataError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from metakd_run.checkpoint import atomic_file, current_umask
from metakd_run.data.errors import DataError

_CHUNK = 1 << 20  # download block size
_DECODE_CHUNK = 512  # images per worker task: big enough to amortise the IPC
_MIN_PARALLEL = 2048  # below this many images a process pool costs more than it saves


# --- downloads -------------------------------------------------------------------------------
def md5sum(path: Path) -> str:
    """Hex md5 of a file, read in blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None = None, *, timeout: float = 60.0) -> Path:
    """Fetch ``url`` to ``dest``, verifying ``md5``; on any failure nothing is left behind.

    The bytes stream through :func:`~metakd_run.checkpoint.atomic_file`, so ``dest`` appears
    only once it is complete and its checksum is right.
    """
    dest = Path(dest)
    try:
        with atomic_file(dest, suffix=".part") as out:
            digest = _stream(url, out, timeout)
            if md5 is not None and digest != md5.lower():
                raise DataError(
                    f"download of {url} is corrupt (md5 {digest}, expected {md5}); nothing was "
                    f"saved: try again, or download it by hand to {dest}"
                )
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DataError(
            f"could not download {url} to {dest} ({_reason(err)}); nothing was saved: check the "
            f"network and that {dest.parent} is writable, or download it by hand to {dest}"
        ) from err
    return dest


def _stream(url: str, out: IO[bytes], timeout: float) -> str:
    """Copy the response body of ``url`` to ``out``; returns its md5."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response:
        total = int(response.headers.get("Content-Length") or 0) or None
        received = 0
        with _progress(total, f"download {url.rsplit('/', 1)[-1]}", unit="B") as bar:
            for block in iter(lambda: response.read(_CHUNK), b""):
                digest.update(block)
                out.write(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise OSError(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return str(err) or type(err).__name__


# --- zip archives ----------------------------------------------------------------------------
def open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip for reading; a truncated or foreign file is the user's to replace."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError) as err:
        raise _bad_zip(path) from err


def _bad_zip(path: Path | str) -> DataError:
    return DataError(
        f"{path} is not a valid zip archive (truncated or corrupt): delete it and download again"
    )


def extract_zip(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into the folder ``dest``, all or nothing.

    The members go to a temporary folder beside ``dest`` which is renamed to ``dest`` only when
    complete; an existing ``dest`` is taken as done and left alone.
    """
    dest = Path(dest)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent))
    try:
        with open_zip(archive) as zf:
            try:
                zf.extractall(tmp)
            except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as err:
                raise _bad_zip(archive) from err
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the rename keeps that
        os.replace(tmp, dest)
    except OSError as err:
        raise DataError(
            f"could not extract {archive} to {dest} ({err}): check free space and permissions"
        ) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --- image decoding --------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFormat:
    """How decoded images are normalised: PIL mode (``L`` or ``RGB``), square size, polarity."""

    mode: str
    size: int
    invert: bool = False

    def apply(self, image: Image.Image) -> np.ndarray:
        """``image`` in this format as uint8 ``[size, size]`` (L) or ``[size, size, 3]`` (RGB)."""
        image = image.convert(self.mode)
        if self.invert:
            image = ImageOps.invert(image)
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.LANCZOS)
        return np.asarray(image, dtype=np.uint8)


# An image to decode: (zip archive, member) or (None, path of a plain file).
ImageRef = tuple[str | None, str]

_zips: dict[tuple[int, str], tuple[tuple[int, int, int], zipfile.ZipFile]] = {}


def _zip_for(path: str) -> zipfile.ZipFile:
    """An open handle on ``path``, reused within a process while the file stays the same.

    Parsing a large archive's directory takes most of a second, so a worker keeps its handle
    across chunks; the key holds the pid (a handle must not be shared across a fork) and the
    file's inode, size and mtime (an archive replaced on disk is reopened).
    """
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = (os.getpid(), path)
    held = _zips.get(key)
    if held is not None and held[0] == stamp:
        return held[1]
    if held is not None:
        held[1].close()
    handle = open_zip(Path(path))
    _zips[key] = (stamp, handle)
    return handle


def _close_zips() -> None:
    """Close this process's handles (the main process, after a decoding job)."""
    pid = os.getpid()
    for key in [k for k in _zips if k[0] == pid]:
        _zips.pop(key)[1].close()


def _read_bytes(ref: ImageRef, zips: dict[str, zipfile.ZipFile]) -> bytes:
    archive, name = ref
    if archive is None:
        try:
            return Path(name).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image {name} ({err}): restore the file") from err
    try:
        return zips[archive].read(name)
    except KeyError as err:
        raise DataError(f"{archive} has no member {name}: the archive changed; retry") from err
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise _bad_zip(archive) from err


def decode_image(ref: ImageRef, fmt: ImageFormat, zips: dict[str, zipfile.ZipFile]) -> np.ndarray:
    """Decode one image; an unreadable one is a DataError naming the file."""
    data = _read_bytes(ref, zips)
    try:
        with Image.open(io.BytesIO(data)) as image:
            return fmt.apply(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        where = ref[1] if ref[0] is None else f"{ref[1]} in {ref[0]}"
        raise DataError(
            f"image {where} cannot be decoded ({err}): the file is corrupt; replace it or "
            "download the data again"
        ) from err


def _decode_chunk(refs: Sequence[ImageRef], fmt: ImageFormat) -> np.ndarray:
    archives = {ref[0] for ref in refs if ref[0] is not None}
    try:
        zips = {path: _zip_for(path) for path in archives}
    except FileNotFoundError as err:
        raise DataError(f"{err.filename} disappeared while decoding: restore it") from err
    return np.stack([decode_image(ref, fmt, zips) for ref in refs])


def resize_stack(images: np.ndarray, fmt: ImageFormat) -> np.ndarray:
    """Bring already-decoded uint8 images ``[n, H, W(, 3)]`` to ``fmt`` (same path as files)."""
    if images.shape[1:3] == (fmt.size, fmt.size) and not fmt.invert:
        return np.ascontiguousarray(images, dtype=np.uint8)
    return np.stack([fmt.apply(Image.fromarray(np.asarray(img, dtype=np.uint8))) for img in images])


def default_workers() -> int:
    """Processes for decoding: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def decode_images(
    refs: Sequence[ImageRef], fmt: ImageFormat, *, workers: int | None = None, desc: str = ""
) -> np.ndarray:
    """Decode ``refs`` in order into one uint8 array ``[len(refs), size, size(, 3)]``.

    Decoding (PNG/JPEG parsing and resizing) is CPU-bound Python work, so large jobs run in a
    process pool: each worker opens the archive itself and returns a whole chunk as one array,
    which keeps the traffic between processes to one buffer per chunk. The pool uses the
    platform's default start method (``fork`` on Linux before Python 3.14, as PyTorch's
    DataLoader does): workers touch only PIL and numpy, never torch, and start in milliseconds,
    whereas ``forkserver``/``spawn`` workers re-import the package (and torch) first.
    ``workers=1`` (or 0) decodes in this process.
    """
    workers = default_workers() if workers is None else workers
    chunks = [refs[i : i + _DECODE_CHUNK] for i in range(0, len(refs), _DECODE_CHUNK)]
    if not chunks:
        raise ValueError("no images to decode")
    parts: list[np.ndarray] = []
    try:
        with _progress(len(refs), desc or "decode images", unit="img") as bar:
            for part in _map_chunks(chunks, fmt, workers if len(refs) >= _MIN_PARALLEL else 1):
                parts.append(part)
                bar.update(len(part))
    finally:
        _close_zips()
    return np.concatenate(parts)


def _map_chunks(chunks: list[Sequence[ImageRef]], fmt: ImageFormat, workers: int) -> Iterator[np.ndarray]:
    if workers <= 1 or len(chunks) == 1:
        for chunk in chunks:
            yield _decode_chunk(chunk, fmt)
        return
    with _pool(min(workers, len(chunks))) as pool:
        yield from pool.map(_decode_chunk, chunks, [fmt] * len(chunks))


@contextmanager
def _pool(workers: int) -> Iterator[ProcessPoolExecutor]:
    context = multiprocessing.get_context()  # the platform's default start method
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _progress(total: int | None, desc: str, unit: str) -> tqdm:
    """A tqdm bar, shown on a terminal only (``disable=None`` hides it in logs and tests)."""
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=None, leave=False)
