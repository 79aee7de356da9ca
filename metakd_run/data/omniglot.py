"""Omniglot (Lake et al. 2015) under the Vinyals et al. split, as a uint8 class tensor.

A split file lists classes as ``Alphabet/characterNN/rotDDD``: each (character, rotation) is a
class of its own, as in the MAML and Prototypical Networks papers. The split files ship with
the package (``metakd_run/data/splits/omniglot/``, from the Prototypical Networks code, MIT).

The drawings are read from whichever of these exists under ``root`` (or ``root/omniglot``,
``root/omniglot-py``), in this order of preference:

1. the official archives ``images_background.zip`` and ``images_evaluation.zip``, read in place;
2. their extracted folders ``images_background/`` and ``images_evaluation/``;
3. torchmeta's ``data.hdf5``: groups ``images_background/<Alphabet>/<characterNN>`` (and
   ``images_evaluation/...``), each a uint8 dataset ``[20, 105, 105]``. torchmeta's
   ``vinyals_*_labels.json`` are not needed: the packaged split files name the classes.

Pixels: the official PNGs are black ink on white; they are inverted so that ink is 1 and the
background 0 (the usual practice, and what torchmeta stores in its HDF5 file, whose polarity is
detected rather than assumed). The 105x105 drawings are resized with PIL's LANCZOS filter (as
in the MAML code) and then rotated counter-clockwise by DDD degrees (``torch.rot90``, exact).
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from metakd_run.data import archive
from metakd_run.data.archive import ImageFormat
from metakd_run.data.cache import file_identity
from metakd_run.data.episodes import ClassImages
from metakd_run.data.errors import DataError
from metakd_run.data.images import ImageDataSet, Source, Split, hdf5_images, load_split, open_hdf5

NAME = "omniglot"
SPLITS = ("train", "val", "test", "trainval")
PARTS = ("images_background", "images_evaluation")
BASE_URL = "https://github.com/brendenlake/omniglot/raw/master/python"
# md5 of the official downloads (as checked by torchvision and torchmeta).
ARCHIVES: dict[str, tuple[str, str]] = {
    "images_background": (f"{BASE_URL}/images_background.zip", "68d2efa1b9178cc56df9314c21c6e718"),
    "images_evaluation": (f"{BASE_URL}/images_evaluation.zip", "6b91aef0f799c5bb55b94e3f2daec811"),
}
_ROT = re.compile(r"^rot(\d+)$")


# --- split files -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitEntry:
    """One class of a split: a character (``Alphabet/characterNN``) under a rotation."""

    character: str
    rotation: int  # degrees counter-clockwise, a multiple of 90

    @property
    def name(self) -> str:
        return f"{self.character}/rot{self.rotation:03d}"


def read_split(split: str, splits_dir: Path | None = None) -> list[SplitEntry]:
    """The classes of ``split``: a packaged split name, or the path of a split file.

    ``splits_dir`` replaces the packaged folder (``<splits_dir>/<split>.txt``), e.g. for tests.
    Lines without ``/rotDDD`` mean rotation 0; blank lines and ``#`` comments are skipped.
    """
    path, text = _split_text(split, splits_dir)
    entries: dict[SplitEntry, None] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            entries[_parse_line(line, f"{path}:{lineno}")] = None
    if not entries:
        raise DataError(f"Omniglot split file {path} lists no classes: fill it or pick another")
    return list(entries)


def _split_text(split: str, splits_dir: Path | None) -> tuple[str, str]:
    as_path = Path(split).expanduser()
    if split.endswith(".txt") or os.sep in split:
        if not as_path.is_file():
            raise DataError(f"Omniglot split file {as_path} does not exist: fix the path")
        return str(as_path), as_path.read_text()
    if splits_dir is not None:
        candidate = Path(splits_dir) / f"{split}.txt"
        if candidate.is_file():
            return str(candidate), candidate.read_text()
    else:
        packaged = importlib.resources.files("metakd_run.data") / "splits" / NAME / f"{split}.txt"
        if packaged.is_file():
            return f"<package>/splits/{NAME}/{split}.txt", packaged.read_text()
    raise DataError(
        f"'{split}' is not an Omniglot split: use one of {', '.join(SPLITS)} or the path of a "
        "split file (lines 'Alphabet/characterNN/rotDDD')"
    )


def _parse_line(line: str, where: str) -> SplitEntry:
    parts = line.split("/")
    rotation = 0
    match = _ROT.match(parts[-1])
    if match:
        rotation = int(match.group(1))
        parts = parts[:-1]
    if len(parts) != 2 or not all(parts):
        raise DataError(f"{where}: expected 'Alphabet/characterNN/rotDDD', got '{line}'")
    if rotation % 90 != 0:
        raise DataError(f"{where}: rotation {rotation} is not a multiple of 90 degrees")
    return SplitEntry("/".join(parts), rotation % 360)


# --- sources ---------------------------------------------------------------------------------
Catalog = tuple[dict[str, Any], dict[str, int]]  # character -> images (refs or HDF5 name), count


@dataclass(kw_only=True)
class _Drawings(Source):
    """The drawings of every character in one format; listing them waits for a cache miss."""

    catalog_of: Callable[[list[Path]], Catalog] = field(repr=False)

    @cached_property
    def catalog(self) -> Catalog:
        return self.catalog_of(self.files)

    def identity(self, split: Split) -> list[list[Any]]:
        """A folder tree has no single mtime: its drawings of the split's characters count."""
        if self.kind != "folders":
            return file_identity(self.files)
        index = self.catalog[0]
        return file_identity(Path(ref[1]) for c in split.groups or () for ref in index.get(c, []))

    def counts(self) -> dict[str, int]:
        return self.catalog[1]

    def read(self, groups: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        """``[n, size, size]`` uint8, ink 255 on 0."""
        index = self.catalog[0]
        if self.kind == "hdf5":
            return _read_hdf5(self.files[0], [index[c] for c in groups], size)
        refs: list[archive.ImageRef] = [ref for c in groups for ref in index[c]]
        return archive.decode_images(refs, ImageFormat("L", size, invert=True), workers=workers, desc=desc)


def _list_zips(paths: list[Path]) -> Catalog:
    """``images_*/<Alphabet>/<characterNN>/*.png`` members of the archives, sorted by name."""
    index: dict[str, list[archive.ImageRef]] = {}
    for path in paths:
        with archive.open_zip(path) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
        for name in names:
            parts = name.split("/")
            if len(parts) >= 3:
                index.setdefault("/".join(parts[-3:-1]), []).append((str(path), name))
    return index, {c: len(refs) for c, refs in index.items()}


def _list_folders(tops: list[Path]) -> Catalog:
    """``<top>/<Alphabet>/<characterNN>/*.png`` files, sorted by name."""
    index: dict[str, list[archive.ImageRef]] = {}
    for top in tops:
        for alphabet in sorted(p for p in top.iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                pngs = sorted(str(f) for f in char.iterdir() if f.suffix.lower() == ".png")
                index[f"{alphabet.name}/{char.name}"] = [(None, f) for f in pngs]
    return index, {c: len(refs) for c, refs in index.items()}


def _list_hdf5(paths: list[Path]) -> Catalog:
    """Datasets ``[M, 105, 105]`` under ``images_*/<Alphabet>/<characterNN>`` (or top-level)."""
    index: dict[str, str] = {}
    counts: dict[str, int] = {}
    with open_hdf5(paths[0]) as f:
        tops = [f[p] for p in PARTS if p in f] or [f]
        for top in tops:
            for alphabet, group in top.items():
                if not isinstance(group, h5py.Group):
                    continue
                for char, data in group.items():
                    if isinstance(data, h5py.Dataset):
                        index[f"{alphabet}/{char}"] = data.name
                        counts[f"{alphabet}/{char}"] = int(data.shape[0])
    return index, counts


def _read_hdf5(path: Path, names: list[str], size: int) -> np.ndarray:
    out = []
    with open_hdf5(path) as f:
        for name in names:
            stack = hdf5_images(path, f[name], rgb=False)
            invert = bool(stack.mean() > 127)  # mostly white: ink is dark, flip it
            out.append(archive.resize_stack(stack, ImageFormat("L", size, invert=invert)))
    return np.concatenate(out)


def _find(
    kind: str, folder: Path, paths: list[Path], absent: list[str], lister: Callable[[list[Path]], Catalog]
) -> _Drawings | None:
    present = [p for p in paths if p.exists()]
    if not present:
        return None
    description = ", ".join(str(p) for p in present)
    return _Drawings(
        kind=kind, folder=folder, files=present, description=description, absent=absent, catalog_of=lister
    )


def _zips(folder: Path, split: Split) -> _Drawings | None:
    files = [folder / f"{part}.zip" for part in PARTS]
    return _find("zip", folder, files, [p.name for p in files if not p.is_file()], _list_zips)


def _folders(folder: Path, split: Split) -> _Drawings | None:
    dirs = [folder / part for part in PARTS]
    return _find("folders", folder, dirs, [d.name + "/" for d in dirs if not d.is_dir()], _list_folders)


def _hdf5(folder: Path, split: Split) -> _Drawings | None:
    return _find("hdf5", folder, [folder / "data.hdf5"], [], _list_hdf5)


# --- the data set ------------------------------------------------------------------------------
@dataclass(frozen=True)
class OmniglotSplit(Split):
    """A split file's classes: each a character under a rotation."""

    entries: tuple[SplitEntry, ...] = ()


@dataclass(frozen=True)
class Omniglot(ImageDataSet):
    """Omniglot: the split files name the classes; the drawings are shared by all splits.

    ``splits_dir`` replaces the packaged split folder (``<splits_dir>/<split>.txt``).
    """

    splits_dir: Path | None = None

    name = NAME
    title = "Omniglot"
    folders = ("", NAME, "omniglot-py")
    holds = "images_background.zip and images_evaluation.zip (or omniglot/ with them)"
    formats = (_zips, _folders, _hdf5)
    group_noun = "character"

    def split(self, name: str) -> OmniglotSplit:
        entries = read_split(name, self.splits_dir)
        characters = tuple(dict.fromkeys(e.character for e in entries))
        return OmniglotSplit(name, tuple(e.name for e in entries), characters, tuple(entries))

    def missing(self, root: Path, split: Split, download: bool) -> str:
        return (
            f"no Omniglot data under {root}: expected images_background.zip and "
            f"images_evaluation.zip (or their extracted folders, or torchmeta's data.hdf5) in "
            f"{root} or {root / NAME}; set dataset.download=true to fetch them"
        )

    def downloads(self) -> dict[str, tuple[str, str]]:
        return {f"{part}.zip": ARCHIVES[part] for part in PARTS}

    def arrange(self, split: Split, groups: list[str], images: Tensor) -> tuple[Tensor, list[str]]:
        """Each character once -> its rotated copies, one class per split entry."""
        assert isinstance(split, OmniglotSplit)
        position = {c: i for i, c in enumerate(groups)}
        out = images[torch.tensor([position[e.character] for e in split.entries])]
        quarter_turns = torch.tensor([e.rotation // 90 for e in split.entries])
        for k in (1, 2, 3):
            mask = quarter_turns == k
            if bool(mask.any()):
                out[mask] = torch.rot90(out[mask], k, dims=(-2, -1))
        return out, [e.name for e in split.entries]


def load_omniglot(
    root: Path | str,
    split: str,
    image_size: int = 28,
    *,
    cache_dir: Path | None = None,
    download: bool = False,
    splits_dir: Path | None = None,
    workers: int | None = None,
) -> ClassImages:
    """Split ``split`` as uint8 ``[C, 20, 1, image_size, image_size]``, decoded once and cached.

    ``cache_dir=None`` disables the cache; ``download`` fetches missing official archives.
    """
    return load_split(
        Omniglot(splits_dir), root, split, image_size, cache_dir=cache_dir, download=download, workers=workers
    )
