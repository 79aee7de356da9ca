"""Lake et al.'s 20 one-shot classification runs: Omniglot's fixed public evaluation, as tensors.

The official repository ships them as ``python/one-shot-classification/all_runs.zip`` (MIT)::

    runNN/training/classKK.png   one drawing of each of the run's characters (20 per run)
    runNN/test/itemKK.png        another drawing of each of them, to classify (20 per run)
    runNN/class_labels.txt       lines 'runNN/test/itemKK.png runNN/training/classJJ.png'

Each run is a within-alphabet 20-way one-shot task drawn from the evaluation alphabets. The runs
are read from the zip in place or from the folder it extracts to (:func:`locate` says where it
looks). Every drawing goes through the decoding of the Omniglot training images
(:class:`~metakd_run.data.archive.ImageFormat` ``("L", size, invert=True)``: ink 1 on 0, PIL's
LANCZOS resize), so a run's drawing is the same tensor as that drawing in the Omniglot split that
holds it. Problems with the files are one-line :class:`DataError` messages naming the file.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metakd_run.data import archive
from metakd_run.data.archive import ImageFormat, ImageRef
from metakd_run.data.errors import DataError

LABELS_FILE = "class_labels.txt"
SOURCE = "all_runs.zip from python/one-shot-classification/ of https://github.com/brendenlake/omniglot"
# Where a folder named by eval.lake_runs may hold the runs (the official repository's layout, a data
# root laid out like the one of the Omniglot archives), each tried for runNN/, all_runs.zip, all_runs/.
PLACES = (
    "",
    "one-shot-classification",
    "python/one-shot-classification",
    "omniglot/one-shot-classification",
    "omniglot/python/one-shot-classification",
)
_RUN = re.compile(r"^run\d+$")
_NAME = {"training": re.compile(r"^class\d+\.png$"), "test": re.compile(r"^item\d+\.png$")}


@dataclass(frozen=True)
class LakeRun:
    """One run: the training drawings (label k = the k-th ``classNN.png`` by name), the test
    drawings (``itemNN.png`` by name) and each test drawing's training class."""

    name: str  # runNN
    support: Tensor  # uint8 [ways, 1, size, size]
    query: Tensor  # uint8 [items, 1, size, size]
    labels: Tensor  # int64 [items]
    classes: tuple[str, ...]  # training/classNN.png, in label order
    items: tuple[str, ...]  # test/itemNN.png, in query order

    @property
    def ways(self) -> int:
        return int(self.support.shape[0])

    def support_x(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The training drawings as the models see images: float in [0, 1], as the sampler makes them."""
        return self.support.to(torch.float32).div_(255.0).to(dtype)

    def query_x(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.query.to(torch.float32).div_(255.0).to(dtype)

    def support_y(self) -> Tensor:
        return torch.arange(self.ways)


@dataclass(frozen=True)
class LakeRuns:
    """The runs, in name order, and where they were read from."""

    runs: tuple[LakeRun, ...]
    source: str

    @property
    def ways(self) -> int:
        return self.runs[0].ways

    def __len__(self) -> int:
        return len(self.runs)


# --- where the runs are ----------------------------------------------------------------------------
def locate(path: str | Path) -> Path:
    """The zip, or the folder holding ``runNN/``, that ``path`` names or holds (see :data:`PLACES`)."""
    given = Path(str(path)).expanduser()
    if given.is_file():
        return given
    if not given.is_dir():
        raise DataError(
            f"eval.lake_runs={path} does not exist: point it at all_runs.zip or the folder it "
            f"extracts to (get {SOURCE})"
        )
    for sub in PLACES:
        folder = given / sub if sub else given
        if _has_runs(folder):
            return folder
        if (folder / "all_runs.zip").is_file():
            return folder / "all_runs.zip"
        if _has_runs(folder / "all_runs"):
            return folder / "all_runs"
    raise DataError(
        f"eval.lake_runs={path} holds none of Lake's runs: expected runNN/ folders, all_runs.zip or "
        f"all_runs/ there or under one-shot-classification/; get {SOURCE}"
    )


def _has_runs(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_dir() and _RUN.match(p.name) for p in folder.iterdir())


# --- reading -----------------------------------------------------------------------------------------
@dataclass
class _RunFiles:
    """One run's files, not yet decoded: image refs by ``training/..``/``test/..`` name, the labels' text."""

    images: dict[str, ImageRef]
    labels: str | None = None
    labels_where: str = ""


def load_lake_runs(path: str | Path, image_size: int = 28, *, workers: int | None = 1) -> LakeRuns:
    """Every run under ``path`` (zip or folder), drawings as uint8 ``[n, 1, image_size, image_size]``."""
    where = locate(path)
    files = _zip_runs(where) if where.is_file() else _folder_runs(where)
    if not files:
        raise DataError(f"{where} holds no runNN/ folders of Lake's runs: restore it ({SOURCE})")
    plans = [(run, *_plan(run, files[run], where)) for run in sorted(files)]
    refs = [ref for _, classes, items, _ in plans for ref in [*classes.values(), *items.values()]]
    flat = archive.decode_images(refs, ImageFormat("L", image_size, invert=True), workers=workers)
    images = torch.from_numpy(flat).unsqueeze(1)
    runs, at = [], 0
    for run, classes, items, labels in plans:
        n, m = len(classes), len(items)
        runs.append(
            LakeRun(
                run,
                images[at : at + n].clone(),
                images[at + n : at + n + m].clone(),
                torch.tensor(labels, dtype=torch.int64),
                tuple(classes),
                tuple(items),
            )
        )
        at += n + m
    counts = Counter(r.ways for r in runs)
    if len(counts) > 1:  # the most common width is right (on a tie, the first run's)
        usual = max(counts, key=lambda w: (counts[w], w == runs[0].ways))
        odd = next(r for r in runs if r.ways != usual)
        raise DataError(
            f"{where}: {odd.name} has {odd.ways} training drawings where the other runs have {usual}: "
            f"restore it ({SOURCE})"
        )
    return LakeRuns(tuple(runs), str(where))


def _zip_runs(path: Path) -> dict[str, _RunFiles]:
    """Members ``[prefix/]runNN/{training,test}/*.png`` and ``runNN/class_labels.txt`` of the zip."""
    runs: dict[str, _RunFiles] = {}
    with archive.open_zip(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/") and "__MACOSX" not in n]
        for name in names:
            parts = name.split("/")
            at = next((i for i, p in enumerate(parts) if _RUN.match(p)), None)
            if at is None:
                continue
            run, rest = parts[at], parts[at + 1 :]
            entry = runs.setdefault(run, _RunFiles({}))
            if rest == [LABELS_FILE]:
                try:
                    entry.labels = zf.read(name).decode("utf-8", errors="replace")
                except Exception as err:  # zipfile raises several kinds for a damaged member
                    raise DataError(
                        f"{name} in {path} cannot be read ({err}): the archive is corrupt; download it again"
                    ) from err
                entry.labels_where = f"{name} in {path}"
            elif len(rest) == 2 and rest[0] in _NAME and rest[1].lower().endswith(".png"):
                entry.images["/".join(rest)] = (str(path), name)
    return runs


def _folder_runs(folder: Path) -> dict[str, _RunFiles]:
    runs: dict[str, _RunFiles] = {}
    for run_dir in sorted(p for p in folder.iterdir() if p.is_dir() and _RUN.match(p.name)):
        entry = runs.setdefault(run_dir.name, _RunFiles({}))
        for kind in _NAME:
            if (run_dir / kind).is_dir():
                for f in sorted((run_dir / kind).iterdir()):
                    if f.is_file() and f.suffix.lower() == ".png":
                        entry.images[f"{kind}/{f.name}"] = (None, str(f))
        labels = run_dir / LABELS_FILE
        if labels.is_file():
            try:
                entry.labels = labels.read_text(encoding="utf-8", errors="replace")
            except OSError as err:
                raise DataError(f"cannot read {labels} ({err}): restore the file") from err
            entry.labels_where = str(labels)
    return runs


def _plan(
    run: str, files: _RunFiles, where: Path
) -> tuple[dict[str, ImageRef], dict[str, ImageRef], list[int]]:
    """The run's training and test drawings in name order, and each test drawing's label."""
    classes = {k: v for k, v in sorted(files.images.items()) if k.startswith("training/")}
    items = {k: v for k, v in sorted(files.images.items()) if k.startswith("test/")}
    for kind, found in (("training", classes), ("test", items)):
        if not found:
            raise DataError(f"{where}: {run}/{kind}/ holds no drawings: restore the run ({SOURCE})")
        odd = next((k for k in found if not _NAME[kind].match(k.split("/")[1])), None)
        if odd is not None:
            expected = "classNN.png" if kind == "training" else "itemNN.png"
            raise DataError(f"{where}: {run}/{odd} is not named {expected}: remove it or restore the run")
    if files.labels is None:
        raise DataError(f"{where}: {run}/{LABELS_FILE} is missing: restore it ({SOURCE})")
    position = {name: i for i, name in enumerate(classes)}
    label_of: dict[str, int] = {}
    for lineno, raw in enumerate(files.labels.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        here = f"{files.labels_where}:{lineno}"
        tokens = line.split()
        pair = [_member(t, run) for t in tokens] if len(tokens) == 2 else None
        if (
            pair is None
            or None in pair
            or not pair[0].startswith("test/")
            or not pair[1].startswith("training/")
        ):
            raise DataError(
                f"{here}: expected '{run}/test/itemNN.png {run}/training/classNN.png', got '{line}': "
                f"restore the file ({SOURCE})"
            )
        item, cls = pair
        if item not in items or cls not in position:
            raise DataError(
                f"{here}: {run}/{item if item not in items else cls} does not exist: restore the run"
            )
        if item in label_of:
            raise DataError(f"{here}: {run}/{item} is labelled twice: restore the file ({SOURCE})")
        label_of[item] = position[cls]
    unlabelled = [k for k in items if k not in label_of]
    if unlabelled:
        raise DataError(
            f"{files.labels_where} gives no training class for {run}/{unlabelled[0]}: restore the file "
            f"({SOURCE})"
        )
    return classes, items, [label_of[k] for k in items]


def _member(token: str, run: str) -> str | None:
    """``[prefix/][runNN/]test/itemKK.png`` -> ``test/itemKK.png``; None when it names another run."""
    parts = token.split("/")
    if len(parts) < 2:
        return None
    if len(parts) >= 3 and _RUN.match(parts[-3]) and parts[-3] != run:
        return None
    return "/".join(parts[-2:])
