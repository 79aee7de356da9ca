"""miniImageNet (Vinyals et al. 2016) under the Ravi & Larochelle split, as a uint8 tensor.

64 / 16 / 20 classes (train / val / test) of 600 RGB images, 84x84. A split is read from
whichever of these exists under ``root`` (or ``root/miniimagenet``, ``root/mini-imagenet``), in
this order of preference:

1. torchmeta's ``{split}_data.hdf5`` (group ``datasets``: one uint8 dataset ``[600, 84, 84, 3]``
   per class) with ``{split}_labels.json`` (the list of class names; without it the dataset
   names, sorted, are the classes);
2. the pickle caches ``mini-imagenet-cache-{split}.pkl`` (``image_data`` uint8
   ``[N, 84, 84, 3]``, ``class_dict`` ``{class: [indices]}``; learn2learn names the val file
   ``mini-imagenet-cache-validation.pkl``). Only numpy arrays and plain containers are
   unpickled, so a malicious pickle cannot run code;
3. ``{split}.csv`` (``filename,label``) with an ``images/`` folder, or with ``images.zip``
   (``images/<filename>``), the layout of the widely used download.

Classes are sorted by name; the images of a class keep their order in the source. Images
whose size differs from ``image_size`` are resized with PIL's LANCZOS filter.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from metakd_run.data import archive
from metakd_run.data.archive import ImageFormat
from metakd_run.data.cache import cache_stem, file_identity, load_or_build
from metakd_run.data.episodes import ClassImages
from metakd_run.data.errors import DataError

NAME = "miniimagenet"
SPLITS = ("train", "val", "test")
PICKLES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
_FOLDERS = ("", NAME, "mini-imagenet", "mini_imagenet")


@dataclass
class _Plan:
    """A split found on disk: what identifies it, and how to decode it."""

    kind: str
    description: str
    identity: list[list[Any]]  # [path, size, mtime_ns] of every file read
    classes: list[str] | None  # None: known only after reading the file (pickles)
    decode: Callable[[int, int | None], tuple[np.ndarray, list[str]]]  # -> [C, M, s, s, 3]


# --- public entry ------------------------------------------------------------------------------
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
    root = Path(root).expanduser()
    if split not in SPLITS:
        raise DataError(f"'{split}' is not a miniImageNet split: use one of {', '.join(SPLITS)}")
    plan = find_split(root, split, download)
    key = {
        "dataset": NAME,
        "source": plan.kind,
        "files": plan.identity,
        "classes": plan.classes,
        "image_size": image_size,
    }

    def build() -> tuple[Tensor, list[str]]:
        images, classes = plan.decode(image_size, workers)
        return torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(), classes

    result = load_or_build(cache_dir, cache_stem(NAME, split, image_size, root), key, build)
    return ClassImages(
        result.images, result.classes, NAME, split, plan.description, result.path, result.built_s
    )


def find_split(root: Path, split: str, download: bool = False) -> _Plan:
    """The preferred source of ``split`` under ``root``; DataError if there is none."""
    folders = [f for f in dict.fromkeys(root / name for name in _FOLDERS) if f.is_dir()]
    for finder in (_hdf5_plan, _pickle_plan, _csv_plan):
        for folder in folders:
            plan = finder(folder, split)
            if plan is not None:
                return plan
    advice = (
        "dataset.download cannot fetch miniImageNet (it has no official public address): " if download else ""
    )
    raise DataError(
        f"no miniImageNet data for split '{split}' under {root}: expected {split}.csv with "
        f"images/ or images.zip, {PICKLES[split][0]}, or torchmeta's {split}_data.hdf5 in "
        f"{root} or {root / NAME}; {advice}download it and point dataset.root there"
    )


# --- torchmeta HDF5 ----------------------------------------------------------------------------
def _hdf5_plan(folder: Path, split: str) -> _Plan | None:
    path = folder / f"{split}_data.hdf5"
    if not path.is_file():
        return None
    labels_path = folder / f"{split}_labels.json"
    try:
        with h5py.File(path, "r") as f:
            group = f["datasets"] if "datasets" in f else f
            names = sorted(k for k, v in group.items() if isinstance(v, h5py.Dataset))
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err}): delete it, rebuild") from err
    classes = names
    files = [path]
    if labels_path.is_file():
        classes = sorted(_read_labels(labels_path))
        files.append(labels_path)
        absent = [c for c in classes if c not in names]
        if absent:
            raise DataError(
                f"{labels_path} names {len(absent)} class(es) absent from {path}, e.g. "
                f"'{absent[0]}': the two files do not belong together; rebuild them"
            )

    def decode(size: int, workers: int | None) -> tuple[np.ndarray, list[str]]:
        with h5py.File(path, "r") as f:
            group = f["datasets"] if "datasets" in f else f
            stacks = [np.asarray(group[c], dtype=np.uint8) for c in classes]
        return _stack_classes(stacks, classes, size, str(path)), classes

    return _Plan("hdf5", str(path), file_identity(files), classes, decode)


def _read_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable JSON list of class names ({err})") from err
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{path} must hold a JSON list of class names")
    return labels


# --- pickle caches -----------------------------------------------------------------------------
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
    """Unpickles numpy arrays and plain containers only: a pickle cannot run code here."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _pickle_plan(folder: Path, split: str) -> _Plan | None:
    path = next((folder / n for n in PICKLES[split] if (folder / n).is_file()), None)
    if path is None:
        return None

    def decode(size: int, workers: int | None) -> tuple[np.ndarray, list[str]]:
        images, class_dict = _read_pickle(path)
        classes = sorted(class_dict)
        stacks = [images[np.asarray(class_dict[c], dtype=np.int64)] for c in classes]
        return _stack_classes(stacks, classes, size, str(path)), classes

    return _Plan("pickle", str(path), file_identity([path]), None, decode)


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
def _csv_plan(folder: Path, split: str) -> _Plan | None:
    csv_path = folder / f"{split}.csv"
    if not csv_path.is_file():
        return None
    by_class = _read_csv(csv_path)
    classes = sorted(by_class)
    names = [n for c in classes for n in by_class[c]]
    per_class = _same_count(by_class, str(csv_path))
    images_dir, zip_path = folder / "images", folder / "images.zip"
    if images_dir.is_dir():
        refs, files = _folder_refs(images_dir, names, split, csv_path)
        kind, where, identity = "folder", str(images_dir), [*file_identity([csv_path]), *files]
    elif zip_path.is_file():  # listing 60,000 members takes a while: only on a cache miss
        refs = None
        kind, where, identity = "zip", str(zip_path), file_identity([csv_path, zip_path])
    else:
        raise DataError(
            f"{csv_path} found but neither {images_dir}/ nor {zip_path} exists: put the "
            "images next to the split files"
        )

    def decode(size: int, workers: int | None) -> tuple[np.ndarray, list[str]]:
        todo = refs if refs is not None else _zip_refs(zip_path, names, split, csv_path)
        flat = archive.decode_images(todo, ImageFormat("RGB", size), workers=workers, desc=f"{NAME} {split}")
        return flat.reshape(len(classes), per_class, size, size, 3), classes

    return _Plan(kind, where, identity, classes, decode)


def _read_csv(path: Path) -> dict[str, list[str]]:
    """``{label: [image file names]}`` from a Ravi split file (``filename,label``)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"filename", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} must start with the header 'filename,label'")
        by_class: dict[str, list[str]] = {}
        for row in reader:
            name = row["filename"].strip()
            if "." not in name:
                name += ".jpg"
            by_class.setdefault(row["label"].strip(), []).append(name)
    if not by_class:
        raise DataError(f"{path} lists no images: restore the split file")
    return by_class


def _same_count(by_class: dict[str, list[Any]], where: str) -> int:
    counts = {c: len(v) for c, v in by_class.items()}
    usual = max(set(counts.values()), key=list(counts.values()).count)
    for c, n in counts.items():
        if n != usual:
            raise DataError(
                f"class {c} has {n} images in {where} where the others have {usual}: every "
                "class needs the same number; restore the data"
            )
    return usual


def _check_missing(split: str, missing: list[str], total: int, csv_path: Path, where: Path) -> None:
    if missing:
        raise DataError(
            f"miniImageNet split '{split}': {len(missing)} of {total} images listed in "
            f"{csv_path} are missing from {where} (e.g. {missing[0]}): this copy lacks them; "
            f"get the complete images (all 100 classes) or use another split (e.g. eval.split=val)"
        )


def _folder_refs(
    images_dir: Path, names: list[str], split: str, csv_path: Path
) -> tuple[list[archive.ImageRef], list[list[Any]]]:
    stats = {}
    with os.scandir(images_dir) as entries:
        for entry in entries:
            stats[entry.name] = entry
    _check_missing(split, [n for n in names if n not in stats], len(names), csv_path, images_dir)
    identity = []
    for n in names:
        st = stats[n].stat()
        identity.append([str(images_dir / n), st.st_size, st.st_mtime_ns])
    return [(None, str(images_dir / n)) for n in names], identity


def _zip_refs(zip_path: Path, names: list[str], split: str, csv_path: Path) -> list[archive.ImageRef]:
    with archive.open_zip(zip_path) as zf:
        members = {m.rsplit("/", 1)[-1]: m for m in zf.namelist() if not m.endswith("/")}
    _check_missing(split, [n for n in names if n not in members], len(names), csv_path, zip_path)
    return [(str(zip_path), members[n]) for n in names]


def _stack_classes(stacks: list[np.ndarray], classes: list[str], size: int, where: str) -> np.ndarray:
    """Per-class uint8 ``[M, H, W, 3]`` arrays -> one ``[C, M, size, size, 3]`` array."""
    _same_count({c: s for c, s in zip(classes, stacks)}, where)
    fmt = ImageFormat("RGB", size)
    return np.stack([archive.resize_stack(s, fmt) for s in stacks])
