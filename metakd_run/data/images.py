"""Image data sets: the one split loader, and the few things each data set fills in.

Every image data set is read the same way (:func:`load_split`):

1. the data set resolves the split (:meth:`ImageDataSet.split`): Omniglot reads its split file,
   miniImageNet checks the name;
2. its formats (:attr:`ImageDataSet.formats`, in order of preference) look for the split's
   files in ``dataset.root`` and the subfolders named by :attr:`ImageDataSet.folders`; the
   first complete find wins, else the data set downloads what is missing, where it can;
3. the cache key (format, the files' identity, the classes, the image size) finds the decoded
   split in the disk cache, or it is built: every group of images (a class, or an Omniglot
   character) must hold the same number; the source decodes them in one pass; the data set
   arranges the groups into classes (Omniglot's rotations).

Adding a data set is a subclass of :class:`ImageDataSet` with its :class:`Source` formats, and
one line in :mod:`metakd_run.data.registry`.
"""

from __future__ import annotations

import logging
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np
import torch
from torch import Tensor

from metakd_run.data import archive
from metakd_run.data.cache import cache_stem, default_cache_dir, file_identity, load_or_build
from metakd_run.data.episodes import ClassImages, EpisodeSampler
from metakd_run.data.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """A split as its data set names it, resolved before any data file is opened.

    ``classes`` is set when the split itself lists them (Omniglot's split files); None means
    the classes are whatever the source holds for the split (miniImageNet's per-split files),
    sorted by name. ``groups`` names what the source stores images under when that differs
    from the classes (Omniglot stores characters; each gives four rotated classes).
    """

    name: str
    classes: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None


@dataclass(kw_only=True)
class Source(ABC):
    """One split's images found on disk, not yet read: one format of one data set.

    ``listed`` are the classes when the source names them without reading its images (None:
    only reading tells, as for a pickle); ``absent`` names the parts a partial find lacks.
    """

    kind: str  # the format, as recorded in the cache key
    folder: Path
    files: list[Path]  # what the cache key records by default (path, size, mtime)
    description: str  # what messages and logs name as the source
    absent: list[str] = field(default_factory=list)
    listed: list[str] | None = None

    def identity(self, split: Split) -> list[list[Any]]:
        """What the cache key records of the files: the split is read again when it changes."""
        return file_identity(self.files)

    @abstractmethod
    def counts(self) -> dict[str, int]:
        """Images per group, for every group the source holds (may read the source)."""

    @abstractmethod
    def read(self, groups: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        """The images of ``groups``, in order: uint8 ``[n, size, size]`` or ``[n, size, size, 3]``.

        ``workers`` decoding processes (None: as many as the CPUs allow, at most 8); ``desc``
        labels the progress bar.
        """


Finder = Callable[[Path, Split], Source | None]  # one format: its find in a folder, or None


class ImageDataSet(ABC):
    """What differs between image data sets; :func:`load_split` does the rest."""

    name: ClassVar[str]  # dataset.name
    title: ClassVar[str]  # the data set in messages
    folders: ClassVar[tuple[str, ...]]  # subfolders of dataset.root that may hold it ("": the root)
    holds: ClassVar[str]  # what dataset.root must hold, for the message when it does not exist
    formats: ClassVar[tuple[Finder, ...]]  # the formats, the preferred one first
    group_noun: ClassVar[str] = "class"  # what one group of images is, in messages

    @abstractmethod
    def split(self, name: str) -> Split:
        """Resolve split ``name``; an unknown split is a DataError naming the valid ones."""

    @abstractmethod
    def missing(self, root: Path, split: Split, download: bool) -> str:
        """The message when no format finds the split under ``root``: what it expected, and where."""

    def downloads(self) -> dict[str, tuple[str, str]]:
        """File name -> (URL, md5) of the files ``dataset.download=true`` fetches; none by default."""
        return {}

    @property
    def downloadable(self) -> bool:
        return bool(self.downloads())

    def arrange(self, split: Split, groups: list[str], images: Tensor) -> tuple[Tensor, list[str]]:
        """Groups ``[G, M, ch, H, W]`` -> classes and their names; by default a group is a class."""
        return images, groups

    # --- from the config --------------------------------------------------------------------
    def load(self, cfg: Any, split: str, *, workers: int | None = None) -> ClassImages:
        """Split ``split`` as configured by ``cfg`` (root, image_size, cache_dir, download)."""
        root = Path(str(cfg.root)).expanduser()
        download = bool(cfg.download)
        if not root.is_dir() and not (download and self.downloadable):
            raise DataError(
                f"dataset.root={cfg.root} does not exist: point it at the folder that holds "
                f"{self.holds}, or set METAKD_DATA_ROOT"
            )
        cache_dir = Path(str(cfg.cache_dir)).expanduser() if cfg.cache_dir else default_cache_dir(root)
        start = time.perf_counter()
        data = load_split(
            self, root, split, int(cfg.image_size), cache_dir=cache_dir, download=download, workers=workers
        )
        _log_load(data, time.perf_counter() - start)
        return data

    def task_source(
        self, cfg: Any, split: str, transfer: int = 0, *, workers: int | None = None
    ) -> EpisodeSampler:
        """An N-way K-shot sampler over ``split``, with ways/shots/queries from ``cfg``."""
        data = self.load(cfg, split, workers=workers)
        return EpisodeSampler.from_class_images(
            data, int(cfg.ways), int(cfg.shots), int(cfg.queries), transfer=transfer
        )


# --- the one split loader ------------------------------------------------------------------------
def load_split(
    dataset: ImageDataSet,
    root: Path | str,
    split: str,
    image_size: int,
    *,
    cache_dir: Path | None = None,
    download: bool = False,
    workers: int | None = None,
) -> ClassImages:
    """Split ``split`` of ``dataset`` under ``root`` as uint8 ``[C, M, ch, size, size]``.

    Decoded once and cached in ``cache_dir`` (None: no cache). ``download`` fetches missing
    files where the data set can; otherwise it only changes the advice when data are missing.
    ``split`` may take a slice of a split's classes, ``train@:48`` or ``train@48:`` (a Python
    slice of the split's own class order; Hydra's override grammar has no unquoted brackets):
    disjoint class sets carved from one split, e.g. to choose settings on classes held out of
    training when a copy of the data lacks its test classes.
    """
    sliced = CLASS_SLICE.fullmatch(split)
    if sliced is not None:
        options: dict[str, Any] = {"cache_dir": cache_dir, "download": download, "workers": workers}
        whole = load_split(dataset, root, sliced["base"], image_size, **options)
        return _class_slice(whole, split, sliced["start"], sliced["stop"])
    root = Path(root).expanduser()
    resolved = dataset.split(split)
    source = locate(dataset, root, resolved, download)
    key = {
        "dataset": dataset.name,
        "source": source.kind,
        "files": source.identity(resolved),
        "classes": list(resolved.classes) if resolved.classes is not None else source.listed,
        "image_size": image_size,
    }
    stem = cache_stem(dataset.name, resolved.name, image_size, root)
    result = load_or_build(
        cache_dir, stem, key, lambda: _build(dataset, source, resolved, image_size, workers)
    )
    return ClassImages(
        result.images,
        result.classes,
        dataset.name,
        resolved.name,
        source.description,
        result.path,
        result.built_s,
    )


CLASS_SLICE = re.compile(r"(?P<base>[^@]+)@(?P<start>\d*):(?P<stop>\d*)")


def _class_slice(whole: ClassImages, name: str, start: str, stop: str) -> ClassImages:
    """Classes ``start:stop`` of ``whole`` (a Python slice of its class order), named ``name``."""
    n = len(whole.classes)
    a, b = int(start) if start else 0, int(stop) if stop else n
    if not 0 <= a < b <= n:
        raise DataError(
            f"split '{name}' selects no classes: '{whole.split}' has {n} classes; use a slice within 0:{n}"
        )
    return replace(whole, images=whole.images[a:b], classes=list(whole.classes[a:b]), split=name)


def candidate_folders(dataset: ImageDataSet, root: Path) -> list[Path]:
    """The existing folders that may hold ``dataset``: the root and its named subfolders."""
    return [f for f in dict.fromkeys(root / sub for sub in dataset.folders) if f.is_dir()]


def locate(dataset: ImageDataSet, root: Path, split: Split, download: bool = False) -> Source:
    """The preferred complete source of ``split`` under ``root``, else a partial one.

    Formats are tried in order of preference, each in every candidate folder. With
    ``download`` (and a data set that can), missing files are fetched first.
    """
    partial: Source | None = None
    for find in dataset.formats:
        for folder in candidate_folders(dataset, root):
            source = find(folder, split)
            if source is not None and not source.absent:
                return source
            partial = partial or source
    if download and dataset.downloadable:
        fetch(dataset, root)
        return locate(dataset, root, split, download=False)
    if partial is None:
        raise DataError(dataset.missing(root, split, download))
    return partial


def fetch(dataset: ImageDataSet, root: Path) -> Path:
    """Download the data set's missing files (md5-checked) beside those present, else into
    ``root/<name>``; returns that folder."""
    files = dataset.downloads()
    folder = next(
        (f for f in candidate_folders(dataset, root) if any((f / name).is_file() for name in files)),
        root / dataset.name,
    )
    for name, (url, md5) in files.items():
        if not (folder / name).is_file():
            archive.download(url, folder / name, md5)
    return folder


def _build(
    dataset: ImageDataSet, source: Source, split: Split, size: int, workers: int | None
) -> tuple[Tensor, list[str]]:
    counts = source.counts()
    groups = list(split.groups or split.classes or sorted(counts))
    if not groups:
        raise DataError(
            f"{source.description} holds no {dataset.title} images for split '{split.name}': restore the data"
        )
    _check_present(dataset, source, split, groups, counts)
    per_group = same_count({g: counts[g] for g in groups}, dataset, source.description)
    flat = source.read(groups, size, workers, f"{dataset.name} {split.name}")
    if flat.shape[0] != len(groups) * per_group:
        raise ValueError(f"{source.kind} read {flat.shape[0]} images, not {len(groups)} x {per_group}")
    images = torch.from_numpy(flat.reshape(len(groups), per_group, *flat.shape[1:]))
    if images.dim() == 4:  # grey: [G, M, H, W] -> [G, M, 1, H, W]
        images = images.unsqueeze(2)
    else:  # colour: [G, M, H, W, 3] -> [G, M, 3, H, W]
        images = images.permute(0, 1, 4, 2, 3)
    images, classes = dataset.arrange(split, groups, images)
    return images.contiguous(), list(classes)


def _check_present(
    dataset: ImageDataSet, source: Source, split: Split, groups: list[str], counts: dict[str, int]
) -> None:
    missing = [g for g in groups if g not in counts]
    if not missing:
        return
    if source.absent:
        hint = f"{' and '.join(source.absent)} missing from {source.folder}: add it"
        hint += " or set dataset.download=true" if dataset.downloadable else ""
    else:
        hint = f"use the complete {dataset.title} files or fix the split"
    raise DataError(
        f"{dataset.title} split '{split.name}' names {len(missing)} {dataset.group_noun}(s) absent "
        f"from {source.description}, e.g. '{missing[0]}'; {hint}"
    )


def same_count(counts: dict[str, int], dataset: ImageDataSet, where: str) -> int:
    """The number of images every group holds; a group that differs is a DataError."""
    values = list(counts.values())
    usual = max(set(values), key=values.count)
    for group, n in counts.items():
        if n != usual:
            raise DataError(
                f"{dataset.title} {dataset.group_noun} {group} has {n} images in {where} where the "
                f"others have {usual}: every {dataset.group_noun} needs the same number; restore "
                "the data or download it again"
            )
    return usual


@contextmanager
def open_hdf5(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file for reading; a file h5py cannot open or read is the user's to replace."""
    try:
        with h5py.File(path, "r") as f:
            yield f
    except OSError as err:
        raise DataError(f"{path} is not a readable HDF5 file ({err}): delete it and rebuild it") from err


def hdf5_images(path: Path, data: Any, rgb: bool) -> np.ndarray:
    """One class's images from an HDF5 dataset, as uint8 ``[M, H, W]`` (``[M, H, W, 3]`` if ``rgb``).

    A dataset of another shape or of floats is not torchmeta's layout; read on regardless, it would
    become images of garbage (a 1-D row resizes to a picture) or a numpy error without the file's
    name, so it is named here.
    """
    ndim, tail = (4, (3,)) if rgb else (3, ())
    shape = tuple(data.shape)
    if len(shape) != ndim or shape[3:] != tail or data.dtype.kind not in "ui":
        expected = "[images, H, W, 3]" if rgb else "[images, H, W]"
        raise DataError(
            f"{path}: dataset {data.name} holds {data.dtype} {shape}, expected integer pixels "
            f"{expected} (torchmeta's layout): rebuild the file"
        )
    return np.asarray(data, dtype=np.uint8)


def _log_load(data: ClassImages, seconds: float) -> None:
    shape = "x".join(str(d) for d in data.images.shape)
    if data.prepared_s is not None:
        where = f"cached in {data.cache_file}" if data.cache_file else "not cached"
        log.info(
            "%s/%s: prepared %s uint8 images from %s in %.1f s (%s)",
            data.dataset,
            data.split,
            shape,
            data.source,
            data.prepared_s,
            where,
        )
    else:
        log.info(
            "%s/%s: loaded %s uint8 images from cache %s in %.2f s",
            data.dataset,
            data.split,
            shape,
            data.cache_file,
            seconds,
        )
