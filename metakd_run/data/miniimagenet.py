"""miniImageNet (Vinyals et al. 2016) under the Ravi & Larochelle split, as a uint8 tensor.

64 / 16 / 20 classes (train / val / test) of 600 RGB images, 84x84. A split is read from
whichever of these exists under ``root`` (or ``root/miniimagenet``, ``root/mini-imagenet``), in
this order of preference:

1. torchmeta's ``{split}_data.hdf5`` (group ``datasets``: one uint8 dataset ``[600, 84, 84, 3]``
   per class) with ``{split}_labels.json`` (the list of class names; without it the dataset
   names, sorted, are the classes);
2. the pickle caches ``mini-imagenet-cache-{split}.pkl`` (``image_data`` uint8
   ``[N, 84, 84, 3]``, ``class_dict`` ``{class: [indices]}``; learn2learn names the val file
   ``mini-imagenet-cache-validation.pkl``), written with any pickle protocol (2 to 5). Only
   numpy arrays and plain containers are unpickled, so a malicious pickle cannot run code;
3. ``{split}.csv`` (``filename,label``) with an ``images/`` folder, or with ``images.zip``
   (``images/<filename>``), the layout of the widely used download.

Classes are sorted by name; the images of a class keep their order in the source. Images
whose size differs from ``image_size`` are resized with PIL's LANCZOS filter.
"""

from __future__ import annotations

import _codecs
import csv
import json
import os
import pickle
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from metakd_run.data import archive
from metakd_run.data.archive import ImageFormat
from metakd_run.data.cache import file_identity
from metakd_run.data.episodes import ClassImages
from metakd_run.data.errors import DataError
from metakd_run.data.images import ImageDataSet, Source, Split, hdf5_images, load_split, open_hdf5

NAME = "miniimagenet"
SPLITS = ("train", "val", "test")
PICKLES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
_RGB = "RGB"


# --- torchmeta HDF5 ----------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Hdf5(Source):
    """``{split}_data.hdf5``: one uint8 dataset ``[600, 84, 84, 3]`` per class."""

    path: Path

    def counts(self) -> dict[str, int]:
        with open_hdf5(self.path) as f:
            group = _datasets(f)
            return {c: int(group[c].shape[0]) for c in self.listed or ()}

    def read(self, groups: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        with open_hdf5(self.path) as f:
            group = _datasets(f)
            fmt = ImageFormat(_RGB, size)  # per class: classes stored at other sizes still stack
            return np.concatenate(
                [archive.resize_stack(hdf5_images(self.path, group[c], rgb=True), fmt) for c in groups]
            )


def _datasets(f: h5py.File) -> h5py.Group:
    return f["datasets"] if "datasets" in f else f


def _find_hdf5(folder: Path, split: Split) -> _Hdf5 | None:
    path = folder / f"{split.name}_data.hdf5"
    if not path.is_file():
        return None
    with open_hdf5(path) as f:
        names = sorted(k for k, v in _datasets(f).items() if isinstance(v, h5py.Dataset))
    classes, files = names, [path]
    labels_path = folder / f"{split.name}_labels.json"
    if labels_path.is_file():
        classes = sorted(_read_labels(labels_path))
        files.append(labels_path)
        absent = [c for c in classes if c not in names]
        if absent:
            raise DataError(
                f"{labels_path} names {len(absent)} class(es) absent from {path}, e.g. "
                f"'{absent[0]}': the two files do not belong together; rebuild them"
            )
    return _Hdf5(kind="hdf5", folder=folder, files=files, description=str(path), listed=classes, path=path)


def _read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable JSON list of class names ({err})") from err
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path} must hold a JSON list of class names")
    return labels


# --- pickle caches -----------------------------------------------------------------------------
def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as pickle protocols 0-2 use it: bytes stored as a latin-1 string."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing to load _codecs.encode with encoding {encoding!r}")
    return _codecs.encode(text, "latin1", errors)


_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    *(
        (mod, name)
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    ),
    *((mod, "_frombuffer") for mod in ("numpy.core.numeric", "numpy._core.numeric")),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a pickle cannot run code here.

    Protocols 3-5 store bytes natively; protocols 0-2 (Python 3 writing for Python 2) store
    each array's bytes as ``_codecs.encode(<latin-1 text>, "latin1")``, which is allowed with
    that one encoding and no other.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


@dataclass(kw_only=True)
class _Pickle(Source):
    """``mini-imagenet-cache-{split}.pkl``: ``image_data [N, 84, 84, 3]`` and ``class_dict``."""

    path: Path

    @cached_property
    def content(self) -> tuple[np.ndarray, dict[str, Any]]:
        return _read_pickle(self.path)

    def counts(self) -> dict[str, int]:
        return {c: len(indices) for c, indices in self.content[1].items()}

    def read(self, groups: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        images, class_dict = self.content
        index = np.concatenate([np.asarray(class_dict[c], dtype=np.int64) for c in groups])
        return archive.resize_stack(images[index], ImageFormat(_RGB, size))


def _find_pickle(folder: Path, split: Split) -> _Pickle | None:
    path = next((folder / n for n in PICKLES[split.name] if (folder / n).is_file()), None)
    if path is None:
        return None
    return _Pickle(kind="pickle", folder=folder, files=[path], description=str(path), path=path)


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="latin1").load()
        images, class_dict = data["image_data"], data["class_dict"]
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise DataError(
            f"{path} is not a miniImageNet pickle cache (dict with 'image_data' and "
            f"'class_dict') or is corrupt ({err}): delete it and download again"
        ) from err
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{path}: 'image_data' must be a uint8 array [N, H, W, 3]")
    return images, {str(k): v for k, v in class_dict.items()}


# --- CSV + images/ or images.zip ---------------------------------------------------------------
@dataclass(kw_only=True)
class _Csv(Source):
    """``{split}.csv`` (``filename,label``) with the images in ``images/`` or ``images.zip``."""

    by_class: dict[str, list[str]]  # label -> image file names
    refs: dict[str, archive.ImageRef] | None = None  # from images/; None: list images.zip on demand
    image_files: list[list[Any]] = field(default_factory=list)  # [path, size, mtime] of images/ files

    def identity(self, split: Split) -> list[list[Any]]:
        return [*file_identity(self.files), *self.image_files]

    def counts(self) -> dict[str, int]:
        return {c: len(names) for c, names in self.by_class.items()}

    def read(self, groups: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        names = [n for c in groups for n in self.by_class[c]]
        refs = self.refs
        if refs is None:  # listing 60,000 members takes a while: only on a cache miss
            csv_path, zip_path = self.files
            refs = _zip_refs(zip_path, names, csv_path)
        todo = [refs[n] for n in names]
        return archive.decode_images(todo, ImageFormat(_RGB, size), workers=workers, desc=desc)


def _find_csv(folder: Path, split: Split) -> _Csv | None:
    csv_path = folder / f"{split.name}.csv"
    if not csv_path.is_file():
        return None
    by_class = _read_csv(csv_path)
    classes = sorted(by_class)
    names = [n for c in classes for n in by_class[c]]
    images_dir, zip_path = folder / "images", folder / "images.zip"
    if images_dir.is_dir():
        refs, image_files = _folder_refs(images_dir, names, csv_path)
        return _Csv(
            kind="folder",
            folder=folder,
            files=[csv_path],
            description=str(images_dir),
            listed=classes,
            by_class=by_class,
            refs=refs,
            image_files=image_files,
        )
    if zip_path.is_file():
        return _Csv(
            kind="zip",
            folder=folder,
            files=[csv_path, zip_path],
            description=str(zip_path),
            listed=classes,
            by_class=by_class,
        )
    raise DataError(
        f"{csv_path} found but neither {images_dir}/ nor {zip_path} exists: put the "
        "images next to the split files"
    )


def _read_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [image file names]}`` from a Ravi split file (``filename,label``).

    A damaged file (not UTF-8 text, a row without its label or with a field too many, an unclosed
    quote) is one line naming the file and the row, not a traceback from the csv module.
    """
    line = 0
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is no field
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
                raise DataError(f"{path} must start with the header 'filename,label'")
            by_class: dict[str, list[str]] = {}
            for row in reader:
                line = reader.line_num
                name, label = (row.get("filename") or "").strip(), (row.get("label") or "").strip()
                if not name or not label or None in row:
                    raise DataError(
                        f"{path}, line {line}: expected 'filename,label', got "
                        f"{_raw_row(row, reader.fieldnames)!r}: restore the split file"
                    )
                if "." not in name:
                    name += ".jpg"
                by_class.setdefault(label, []).append(name)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not a UTF-8 text file (byte {err.start}: {err.reason}): restore the split file"
        ) from err
    except csv.Error as err:
        raise DataError(f"{path}, line {line + 1}: {err}: restore the split file") from err
    if not by_class:
        raise DataError(f"{path} lists no images: restore the split file")
    return by_class


def _raw_row(row: dict[Any, Any], fields: Any) -> str:
    """The row as the file wrote it, roughly: its fields joined by commas (extra fields too)."""
    values = [row.get(k) for k in fields] + list(row.get(None) or [])
    return ",".join("" if v is None else str(v) for v in values)


def _check_missing(missing: list[str], total: int, csv_path: Path, where: Path) -> None:
    if missing:
        raise DataError(
            f"miniImageNet split '{csv_path.stem}': {len(missing)} of {total} images listed in "
            f"{csv_path} are missing from {where} (e.g. {missing[0]}): this copy lacks them; "
            f"get the complete images (all 100 classes) or use another split (e.g. eval.split=val)"
        )


def _folder_refs(
    images_dir: Path, names: list[str], csv_path: Path
) -> tuple[dict[str, archive.ImageRef], list[list[Any]]]:
    """Each listed image's file in ``images/``, and its [path, size, mtime] for the cache key."""
    with os.scandir(images_dir) as entries:
        stats = {entry.name: entry for entry in entries}
    _check_missing([n for n in names if n not in stats], len(names), csv_path, images_dir)
    identity = []
    for n in names:
        st = stats[n].stat()
        identity.append([str(images_dir / n), st.st_size, st.st_mtime_ns])
    return {n: (None, str(images_dir / n)) for n in names}, identity


def _zip_refs(zip_path: Path, names: list[str], csv_path: Path) -> dict[str, archive.ImageRef]:
    """Each listed image's member of ``images.zip`` (any folder inside it)."""
    with archive.open_zip(zip_path) as zf:
        members = {m.rsplit("/", 1)[-1]: m for m in zf.namelist() if not m.endswith("/")}
    _check_missing([n for n in names if n not in members], len(names), csv_path, zip_path)
    return {n: (str(zip_path), members[n]) for n in names}


# --- the data set ------------------------------------------------------------------------------
class MiniImageNet(ImageDataSet):
    """miniImageNet: each split has its own files, which name its classes."""

    name = NAME
    title = "miniImageNet"
    folders = ("", NAME, "mini-imagenet", "mini_imagenet")
    holds = "train.csv, val.csv, test.csv and images/ or images.zip (or miniimagenet/ with them)"
    formats = (_find_hdf5, _find_pickle, _find_csv)

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise DataError(f"'{name}' is not a miniImageNet split: use one of {', '.join(SPLITS)}")
        return Split(name)

    def missing(self, root: Path, split: Split, download: bool) -> str:
        advice = (
            "dataset.download cannot fetch miniImageNet (it has no official public address): "
            if download
            else ""
        )
        return (
            f"no miniImageNet data for split '{split.name}' under {root}: expected {split.name}.csv "
            f"with images/ or images.zip, {PICKLES[split.name][0]}, or torchmeta's "
            f"{split.name}_data.hdf5 in {root} or {root / NAME}; {advice}download it and point "
            "dataset.root there"
        )


def load_miniimagenet(
    root: Path | str,
    split: str,
    image_size: int = 84,
    *,
    cache_dir: Path | None = None,
    download: bool = False,
    workers: int | None = None,
) -> ClassImages:
    """Split ``split`` as uint8 ``[C, 600, 3, image_size, image_size]``, decoded once and cached.

    ``download`` cannot fetch miniImageNet (it has no official public address); it only
    changes the advice given when the data are missing.
    """
    return load_split(
        MiniImageNet(), root, split, image_size, cache_dir=cache_dir, download=download, workers=workers
    )
