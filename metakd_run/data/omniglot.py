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
from dataclasses import dataclass
from functools import cached_property
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


@dataclass
class _Source:
    """Where the drawings are. Listing them (``catalog``) is deferred: a cache hit skips it."""

    kind: str  # "zip", "folders" or "hdf5"
    folder: Path
    present: list[Path]
    absent: list[str]

    @property
    def description(self) -> str:
        return ", ".join(str(p) for p in self.present)

    @cached_property
    def catalog(self) -> Catalog:
        return _LISTERS[self.kind](self.present)

    def identity(self, characters: list[str]) -> list[list[Any]]:
        """What the cache key records; a folder tree has no single mtime, so its files count."""
        if self.kind != "folders":
            return file_identity(self.present)
        index = self.catalog[0]
        return file_identity(Path(ref[1]) for c in characters for ref in index.get(c, []))

    def decode(self, characters: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        """``[len(characters), M, size, size]`` uint8, ink 255 on 0."""
        index, _ = self.catalog
        per_char = _count_per_character(self, characters)
        if self.kind == "hdf5":
            return _decode_hdf5(self.present[0], [index[c] for c in characters], size)
        refs: list[archive.ImageRef] = [ref for c in characters for ref in index[c]]
        flat = archive.decode_images(refs, ImageFormat("L", size, invert=True), workers=workers, desc=desc)
        return flat.reshape(len(characters), per_char, size, size)


def _count_per_character(source: _Source, characters: list[str]) -> int:
    counts = {c: source.catalog[1][c] for c in characters}
    usual = max(set(counts.values()), key=list(counts.values()).count)
    for c, n in counts.items():
        if n != usual:
            raise DataError(
                f"Omniglot character {c} has {n} drawings in {source.description} where the "
                f"others have {usual}: the data are incomplete; restore them or download again"
            )
    return usual


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
    try:
        with h5py.File(paths[0], "r") as f:
            for char, data in _hdf5_characters(f):
                index[char] = data.name
                counts[char] = int(data.shape[0])
    except OSError as err:
        raise DataError(f"{paths[0]} is not a readable HDF5 file ({err}): delete it and rebuild it") from err
    return index, counts


_LISTERS = {"zip": _list_zips, "folders": _list_folders, "hdf5": _list_hdf5}


def _hdf5_characters(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    tops = [f[p] for p in PARTS if p in f] or [f]
    found = []
    for top in tops:
        for alphabet, group in top.items():
            if isinstance(group, h5py.Group):
                found += [
                    (f"{alphabet}/{char}", data)
                    for char, data in group.items()
                    if isinstance(data, h5py.Dataset)
                ]
    return found


def _decode_hdf5(path: Path, names: list[str], size: int) -> np.ndarray:
    out = []
    with h5py.File(path, "r") as f:
        for name in names:
            stack = np.asarray(f[name], dtype=np.uint8)
            invert = bool(stack.mean() > 127)  # mostly white: ink is dark, flip it
            out.append(archive.resize_stack(stack, ImageFormat("L", size, invert=invert)))
    return np.stack(out)


def _zip_source(folder: Path) -> _Source | None:
    files = [folder / f"{part}.zip" for part in PARTS]
    return _make_source("zip", folder, files, [p.name for p in files if not p.is_file()])


def _folder_source(folder: Path) -> _Source | None:
    dirs = [folder / part for part in PARTS]
    return _make_source("folders", folder, dirs, [d.name + "/" for d in dirs if not d.is_dir()])


def _hdf5_source(folder: Path) -> _Source | None:
    return _make_source("hdf5", folder, [folder / "data.hdf5"], [])


def _make_source(kind: str, folder: Path, paths: list[Path], absent: list[str]) -> _Source | None:
    present = [p for p in paths if p.exists()]
    return _Source(kind, folder, present, absent) if present else None


def _candidates(root: Path) -> list[Path]:
    seen: list[Path] = []
    for folder in (root, root / NAME, root / "omniglot-py"):
        if folder.is_dir() and folder not in seen:
            seen.append(folder)
    return seen


def find_source(root: Path) -> _Source | None:
    """The preferred complete source under ``root``, else a partial one, else None."""
    partial: _Source | None = None
    for make in (_zip_source, _folder_source, _hdf5_source):
        for folder in _candidates(root):
            source = make(folder)
            if source is not None and not source.absent:
                return source
            partial = partial or source
    return partial


def download_archives(root: Path) -> Path:
    """Fetch the official archives that are missing (md5-checked) into ``root/omniglot``."""
    folder = next(
        (f for f in _candidates(root) if any((f / f"{p}.zip").is_file() for p in PARTS)),
        root / NAME,
    )
    for part, (url, md5) in ARCHIVES.items():
        dest = folder / f"{part}.zip"
        if not dest.is_file():
            archive.download(url, dest, md5)
    return folder


def _source_for(root: Path, download: bool) -> _Source:
    source = find_source(root)
    if download and (source is None or source.absent):
        source = _zip_source(download_archives(root))
    if source is None:
        raise DataError(
            f"no Omniglot data under {root}: expected images_background.zip and "
            f"images_evaluation.zip (or their extracted folders, or torchmeta's data.hdf5) in "
            f"{root} or {root / NAME}; set dataset.download=true to fetch them"
        )
    return source


# --- loading ---------------------------------------------------------------------------------
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
    root = Path(root).expanduser()
    entries = read_split(split, splits_dir)
    source = _source_for(root, download)
    characters = list(dict.fromkeys(e.character for e in entries))
    classes = [e.name for e in entries]
    key = {
        "dataset": NAME,
        "source": source.kind,
        "files": source.identity(characters),
        "classes": classes,
        "image_size": image_size,
    }
    result = load_or_build(
        cache_dir,
        cache_stem(NAME, split, image_size, root),
        key,
        lambda: (_build(source, characters, entries, image_size, workers, split), classes),
    )
    return ClassImages(result.images, classes, NAME, split, source.description, result.path, result.built_s)


def _check_present(split: str, characters: list[str], source: _Source) -> None:
    missing = [c for c in characters if c not in source.catalog[0]]
    if not missing:
        return
    hint = (
        f"{' and '.join(source.absent)} missing from {source.folder}: add it or set dataset.download=true"
        if source.absent
        else "use the official Omniglot archives or fix the split file"
    )
    raise DataError(
        f"Omniglot split '{split}' names {len(missing)} character(s) absent from "
        f"{source.description}, e.g. '{missing[0]}'; {hint}"
    )


def _build(
    source: _Source,
    characters: list[str],
    entries: list[SplitEntry],
    size: int,
    workers: int | None,
    split: str,
) -> Tensor:
    """Decode each character once, then make its rotated copies: ``[C, M, 1, size, size]``."""
    _check_present(split, characters, source)
    drawings = torch.from_numpy(source.decode(characters, size, workers, f"{NAME} {split}"))
    position = {c: i for i, c in enumerate(characters)}
    out = drawings[torch.tensor([position[e.character] for e in entries])]
    quarter_turns = torch.tensor([e.rotation // 90 for e in entries])
    for k in (1, 2, 3):
        mask = quarter_turns == k
        if bool(mask.any()):
            out[mask] = torch.rot90(out[mask], k, dims=(-2, -1))
    return out.unsqueeze(2).contiguous()
