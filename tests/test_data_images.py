"""The few-shot image data layer: every on-disk format, the cache, the sampler, the errors.

Tiny data sets are generated per test in ``tmp_path`` in each supported layout (a handful of
105x105 1-bit PNG characters, a few 84x84 JPEG classes), so the module runs in seconds. The
tests at the end read the real data from ``$METAKD_DATA_ROOT``: they skip when it is not set, and
fail when it is set and the data does not load.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw, ImageOps

from metakd_run.config import MiniImageNetConfig, OmniglotConfig, SinusoidConfig
from metakd_run.data import archive, build_task_source, omniglot
from metakd_run.data.cache import default_cache_dir
from metakd_run.data.episodes import EpisodeSampler
from metakd_run.data.errors import DataError
from metakd_run.data.images import ImageDataSet, Source, Split
from metakd_run.data.miniimagenet import load_miniimagenet
from metakd_run.data.omniglot import load_omniglot, read_split
from metakd_run.data.registry import DATASETS, build_episode_sampler, load_class_images

# --- tiny Omniglot ---------------------------------------------------------------------------
DRAWINGS = 6  # per character (the real set has 20)
OMNI_CHARS = {
    "images_background": ["Alpha/character01", "Alpha/character02", "Beta/character01"],
    "images_evaluation": ["Gamma/character01", "Gamma/character02"],
}
OMNI_SPLITS = {
    "train": [f"Alpha/character01/rot{r:03d}" for r in (0, 90, 180, 270)]
    + ["Alpha/character02/rot000", "Beta/character01/rot000", "Beta/character01/rot090"],
    "val": ["Gamma/character01/rot000", "Gamma/character02/rot000", "Gamma/character02/rot180"],
    "test": ["Gamma/character01/rot000", "Gamma/character01/rot270"],
}


def _drawing(seed: int) -> Image.Image:
    """A 105x105 1-bit drawing: random black strokes on white, like the official PNGs."""
    rng = np.random.default_rng(seed)
    img = Image.new("1", (105, 105), 1)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(10, 95, size=4))
        draw.line((x0, y0, x1, y1), fill=0, width=5)
    return img


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def omniglot_files() -> dict[str, bytes]:
    """Archive member name -> PNG bytes, in the official ``images_*/<A>/<c>/NNNN_KK.png`` layout."""
    files = {}
    for pi, (part, chars) in enumerate(OMNI_CHARS.items()):
        for ci, char in enumerate(chars):
            for k in range(DRAWINGS):
                seed = pi * 1000 + ci * 100 + k
                files[f"{part}/{char}/{ci + 1:04d}_{k + 1:02d}.png"] = _png(_drawing(seed))
    return files


def write_zip(path: Path, files: dict[str, bytes], skip: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            if skip is None or skip not in name:
                zf.writestr(name, data)
    return path


def make_omniglot(root: Path, fmt: str = "zip") -> Path:
    """A tiny Omniglot in ``root/omniglot``: official zips, extracted folders or torchmeta HDF5."""
    folder = root / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    files = omniglot_files()
    for part in OMNI_CHARS:
        members = {k: v for k, v in files.items() if k.startswith(part + "/")}
        if fmt == "zip":
            write_zip(folder / f"{part}.zip", members)
        elif fmt == "folders":
            for name, data in members.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
    if fmt == "hdf5":  # torchmeta's layout: images stored as 'L', inverted (ink 255)
        with h5py.File(folder / "data.hdf5", "w") as f:
            for part, chars in OMNI_CHARS.items():
                for char in chars:
                    names = sorted(k for k in files if k.startswith(f"{part}/{char}/"))
                    stack = [
                        np.asarray(ImageOps.invert(Image.open(io.BytesIO(files[n])).convert("L")))
                        for n in names
                    ]
                    f.create_dataset(f"{part}/{char}", data=np.stack(stack))
    return root


def make_splits(folder: Path, splits: dict[str, list[str]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (splits or OMNI_SPLITS).items():
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return folder


# --- tiny miniImageNet -----------------------------------------------------------------------
PER_CLASS = 8  # the real set has 600
MINI_CLASSES = {
    "train": ["n01000001", "n01000002", "n01000003"],
    "val": ["n02000001", "n02000002"],
    "test": ["n03000001", "n03000002"],
}


def _photo(seed: int) -> bytes:
    """An 84x84 RGB JPEG: a smooth random gradient plus noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:84, 0:84] / 84.0
    chans = [rng.uniform(0, 255) * (a * xx + (1 - a) * yy) for a in rng.uniform(0, 1, 3)]
    img = np.stack(chans, -1) + rng.normal(0, 8, (84, 84, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class MiniFiles:
    jpegs: dict[str, bytes]  # file name -> bytes
    csv: dict[str, str]  # split -> CSV text
    arrays: dict[str, np.ndarray]  # split -> decoded uint8 [C*M, 84, 84, 3], in CSV order


def mini_files() -> MiniFiles:
    jpegs, csvs, arrays = {}, {}, {}
    for si, (split, classes) in enumerate(MINI_CLASSES.items()):
        rows, decoded = ["filename,label"], []
        for ci, label in enumerate(classes):
            for k in range(PER_CLASS):
                name = f"{label}{k + 1:08d}.jpg"
                jpegs[name] = _photo(si * 1000 + ci * 100 + k)
                rows.append(f"{name},{label}")
                decoded.append(np.asarray(Image.open(io.BytesIO(jpegs[name])).convert("RGB")))
        csvs[split] = "\n".join(rows) + "\n"
        arrays[split] = np.stack(decoded)
    return MiniFiles(jpegs, csvs, arrays)


def make_mini(
    root: Path, fmt: str = "zip", *, without_test: bool = False, protocol: int | None = None
) -> Path:
    """A tiny miniImageNet in ``root/miniimagenet``: csv+folder, csv+zip, pickles or HDF5.

    ``protocol`` is the pickle protocol of the pickles (default: Python's).
    """
    folder = root / "miniimagenet"
    folder.mkdir(parents=True, exist_ok=True)
    data = mini_files()
    test_names = {n for n in data.jpegs if n.startswith(tuple(MINI_CLASSES["test"]))}
    keep = {n: b for n, b in data.jpegs.items() if not (without_test and n in test_names)}
    if fmt in ("zip", "folder"):
        for split, text in data.csv.items():
            (folder / f"{split}.csv").write_text(text)
    if fmt == "zip":
        write_zip(folder / "images.zip", {f"images/{n}": b for n, b in keep.items()})
    elif fmt == "folder":
        (folder / "images").mkdir()
        for name, raw in keep.items():
            (folder / "images" / name).write_bytes(raw)
    elif fmt == "pickle":
        for split, classes in MINI_CLASSES.items():
            class_dict = {c: list(range(i * PER_CLASS, (i + 1) * PER_CLASS)) for i, c in enumerate(classes)}
            name = "validation" if split == "val" else split  # learn2learn's val file name
            with open(folder / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
                content = {"image_data": data.arrays[split], "class_dict": class_dict}
                pickle.dump(content, f, protocol=protocol)
    elif fmt == "hdf5":
        for split, classes in MINI_CLASSES.items():
            with h5py.File(folder / f"{split}_data.hdf5", "w") as f:
                group = f.create_group("datasets")
                for i, c in enumerate(classes):
                    group.create_dataset(c, data=data.arrays[split][i * PER_CLASS : (i + 1) * PER_CLASS])
            (folder / f"{split}_labels.json").write_text(json.dumps(sorted(classes)))
    return root


def mini_cfg(root: Path, **kw) -> MiniImageNetConfig:
    base = dict(root=str(root), ways=3, shots=1, queries=2, cache_dir=str(root / "cache"))
    return MiniImageNetConfig(**{**base, **kw})


# --- formats load to the same tensor ---------------------------------------------------------
def test_packaged_vinyals_splits_have_the_published_sizes() -> None:
    sizes = {"train": 1028, "val": 172, "test": 423, "trainval": 1200}
    for split, characters in sizes.items():
        entries = read_split(split)
        assert len(entries) == 4 * characters
        assert len({e.character for e in entries}) == characters
        assert {e.rotation for e in entries} == {0, 90, 180, 270}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_omniglot_formats_load_identically(tmp_path: Path, split: str) -> None:
    splits = make_splits(tmp_path / "splits")
    loaded = {}
    for fmt in ("zip", "folders", "hdf5"):
        root = make_omniglot(tmp_path / fmt, fmt)
        data = load_omniglot(root, split, 28, splits_dir=splits)
        assert data.classes == OMNI_SPLITS[split]
        loaded[fmt] = data.images
    ref = loaded["zip"]
    assert ref.shape == (len(OMNI_SPLITS[split]), DRAWINGS, 1, 28, 28) and ref.dtype == torch.uint8
    for fmt, images in loaded.items():
        assert torch.equal(images, ref), fmt


def test_omniglot_ink_is_bright_and_rotations_are_exact(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path, "zip")
    data = load_omniglot(root, "train", 28, splits_dir=make_splits(tmp_path / "splits"))
    images = data.images
    assert images.float().mean() < 60 and images.max() > 200  # ink 255 on a 0 background
    pos = {name: i for i, name in enumerate(data.classes)}
    base = images[pos["Alpha/character01/rot000"]]
    for k, deg in enumerate((90, 180, 270), start=1):
        rotated = images[pos[f"Alpha/character01/rot{deg:03d}"]]
        assert torch.equal(rotated, torch.rot90(base, k, dims=(-2, -1)))
    assert not torch.equal(base, images[pos["Alpha/character01/rot090"]])


def test_omniglot_image_size_is_honoured(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path, "zip")
    data = load_omniglot(root, "val", 14, splits_dir=make_splits(tmp_path / "splits"))
    assert data.images.shape == (3, DRAWINGS, 1, 14, 14)


def test_omniglot_split_may_be_a_file_path(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path, "zip")
    custom = tmp_path / "mine.txt"
    custom.write_text("# two classes\nBeta/character01\n\nGamma/character02/rot090\n")
    data = load_omniglot(root, str(custom), 28)
    assert data.classes == ["Beta/character01/rot000", "Gamma/character02/rot090"]


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_miniimagenet_formats_load_identically(tmp_path: Path, split: str) -> None:
    loaded = {}
    for fmt in ("zip", "folder", "pickle", "hdf5"):
        data = load_miniimagenet(make_mini(tmp_path / fmt, fmt), split, 84)
        assert data.classes == sorted(MINI_CLASSES[split])
        loaded[fmt] = data.images
    ref = loaded["zip"]
    assert ref.shape == (len(MINI_CLASSES[split]), PER_CLASS, 3, 84, 84)
    expected = torch.from_numpy(mini_files().arrays[split]).permute(0, 3, 1, 2)
    assert torch.equal(ref.reshape(-1, 3, 84, 84), expected)
    for fmt, images in loaded.items():
        assert torch.equal(images, ref), fmt


def test_miniimagenet_resizes_to_image_size(tmp_path: Path) -> None:
    for fmt in ("zip", "hdf5"):
        data = load_miniimagenet(make_mini(tmp_path / fmt, fmt), "val", 32)
        assert data.images.shape == (2, PER_CLASS, 3, 32, 32)


# --- the sampler -----------------------------------------------------------------------------
def _id_images(classes: int, per_class: int) -> torch.Tensor:
    """uint8 [C, M, 1, 2, 2] whose pixels spell (class, image): every image is identifiable."""
    images = torch.zeros(classes, per_class, 1, 2, 2, dtype=torch.uint8)
    images[:, :, 0, 0, 0] = torch.arange(classes, dtype=torch.uint8)[:, None]
    images[:, :, 0, 0, 1] = torch.arange(per_class, dtype=torch.uint8)[None, :]
    return images


def _ids(x: torch.Tensor) -> list[tuple[int, int]]:
    raw = (x[:, 0, 0, :2] * 255).round().long()
    return [tuple(r) for r in raw.tolist()]


def test_sampler_shapes_dtypes_and_labels(tmp_path: Path) -> None:
    data = load_miniimagenet(make_mini(tmp_path, "zip"), "train", 84)
    sampler = EpisodeSampler.from_class_images(data, ways=3, shots=2, queries=3)
    assert sampler.in_shape == (3, 84, 84) and sampler.out_dim == 3
    assert sampler.num_classes == 3 and sampler.task == "classification"
    batch = sampler.sample(4, torch.Generator().manual_seed(0), transfer=2)
    assert batch.support_x.shape == (4, 6, 3, 84, 84)
    assert batch.query_x.shape == (4, 9, 3, 84, 84)
    assert batch.transfer_x is not None and batch.transfer_x.shape == (4, 6, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
    assert 0.0 <= float(batch.support_x.min()) and float(batch.query_x.max()) <= 1.0
    assert batch.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 4
    assert batch.query_y.shape == (4, 9) and set(batch.query_y.unique().tolist()) == {0, 1, 2}
    assert batch.info["classes"].shape == (4, 3)
    assert sampler.sample(2, torch.Generator().manual_seed(0)).transfer_x is None


def test_sampler_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    sampler = EpisodeSampler(_id_images(10, 20), ways=5, shots=1, queries=3)
    a = sampler.sample(8, torch.Generator().manual_seed(3), transfer=1)
    b = sampler.sample(8, torch.Generator().manual_seed(3), transfer=1)
    c = sampler.sample(8, torch.Generator().manual_seed(4), transfer=1)
    for field in ("support_x", "support_y", "query_x", "query_y", "transfer_x"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.support_x, c.support_x)
    assert not torch.equal(a.info["classes"], c.info["classes"])
    moved = sampler.to("cpu").sample(8, torch.Generator().manual_seed(3), transfer=1)
    assert torch.equal(moved.query_x, a.query_x)


def test_sampler_sets_are_disjoint_and_labels_match_classes() -> None:
    sampler = EpisodeSampler(_id_images(12, 20), ways=5, shots=2, queries=4)
    batch = sampler.sample(16, torch.Generator().manual_seed(1), transfer=3)
    assert batch.transfer_x is not None
    first_labels = set()
    for t in range(16):
        classes = batch.info["classes"][t].tolist()
        assert len(set(classes)) == 5  # distinct classes per task
        first_labels.add(classes[0])
        parts = {
            "s": (batch.support_x[t], batch.support_y[t]),
            "q": (batch.query_x[t], batch.query_y[t]),
        }
        seen: set[tuple[int, int]] = set()
        for x, y in parts.values():
            for (cls, img), label in zip(_ids(x), y.tolist()):
                assert cls == classes[label]  # label n always means the task's n-th class
                assert (cls, img) not in seen
                seen.add((cls, img))
        for cls, img in _ids(batch.transfer_x[t]):
            assert cls in classes and (cls, img) not in seen
            seen.add((cls, img))
        assert len(seen) == 5 * (2 + 4 + 3)
    assert len(first_labels) > 1  # labels are re-assigned per task


def test_sampler_rejects_what_the_split_cannot_supply() -> None:
    images = _id_images(20, 20)
    with pytest.raises(DataError, match=r"dataset.ways=30 but split 'val' of omniglot has only 20"):
        EpisodeSampler(images, ways=30, shots=1, queries=1, dataset="omniglot", split="val")
    with pytest.raises(DataError, match=r"dataset.shots=5 \+ dataset.queries=16 = 21 .* only 20"):
        EpisodeSampler(images, ways=5, shots=5, queries=16)
    sampler = EpisodeSampler(images, ways=5, shots=5, queries=10)
    with pytest.raises(DataError, match=r"kd.transfer=6 = 21 images per class"):
        sampler.sample(2, torch.Generator().manual_seed(0), transfer=6)
    with pytest.raises(DataError, match=r"kd.transfer=6"):
        EpisodeSampler(images, ways=5, shots=5, queries=10, transfer=6)
    with pytest.raises(DataError, match=r"dataset.shots=0 must be >= 1"):
        EpisodeSampler(images, ways=5, shots=0, queries=10)


# --- the cache -------------------------------------------------------------------------------
def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.pt"))


def test_cache_is_written_reused_and_invalidated(tmp_path: Path, monkeypatch) -> None:
    root = make_omniglot(tmp_path / "data", "zip")
    splits, cache = make_splits(tmp_path / "splits"), tmp_path / "cache"
    first = load_omniglot(root, "val", 28, splits_dir=splits, cache_dir=cache)
    assert first.prepared_s is not None and first.cache_file is not None
    assert _cache_files(cache) == [first.cache_file]
    assert not list(cache.glob(".*"))  # no temporary file left

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(archive, "decode_images", no_decoding)
        again = load_omniglot(root, "val", 28, splits_dir=splits, cache_dir=cache)
    assert again.prepared_s is None and torch.equal(again.images, first.images)
    assert again.classes == first.classes

    # A changed source (new bytes, new mtime) builds a new cache and drops the stale one.
    zip_path = root / "omniglot" / "images_evaluation.zip"
    files = {k: v for k, v in omniglot_files().items() if k.startswith("images_evaluation/")}
    files[next(iter(files))] = _png(_drawing(999))
    write_zip(zip_path, files)
    os.utime(zip_path, ns=(zip_path.stat().st_atime_ns, zip_path.stat().st_mtime_ns + 10**9))
    changed = load_omniglot(root, "val", 28, splits_dir=splits, cache_dir=cache)
    assert changed.prepared_s is not None and not torch.equal(changed.images, first.images)
    assert _cache_files(cache) == [changed.cache_file] and changed.cache_file != first.cache_file

    # Another image size is another cache entry (both are kept).
    other = load_omniglot(root, "val", 14, splits_dir=splits, cache_dir=cache)
    assert other.prepared_s is not None and len(_cache_files(cache)) == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped"])
def test_corrupt_cache_is_discarded_and_rebuilt(tmp_path: Path, caplog, damage: str) -> None:
    root = make_mini(tmp_path / "data", "zip")
    cache = tmp_path / "cache"
    first = load_miniimagenet(root, "val", 84, cache_dir=cache)
    assert first.cache_file is not None
    raw = first.cache_file.read_bytes()
    if damage == "garbage":
        first.cache_file.write_bytes(b"not a torch file")
    elif damage == "truncated":
        first.cache_file.write_bytes(raw[: len(raw) // 2])
    else:  # same size, one image byte changed: only the checksum can tell
        ref = first.images.reshape(-1).numpy().tobytes()
        at = raw.find(ref[:64]) + 100
        first.cache_file.write_bytes(raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :])
    with caplog.at_level(logging.WARNING, logger="metakd_run.data.cache"):
        rebuilt = load_miniimagenet(root, "val", 84, cache_dir=cache)
    assert "discarding corrupt cache file" in caplog.text
    assert rebuilt.prepared_s is not None and torch.equal(rebuilt.images, first.images)
    again = load_miniimagenet(root, "val", 84, cache_dir=cache)
    assert again.prepared_s is None


def test_default_cache_dir_avoids_a_read_only_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    writable = tmp_path / "rw"
    writable.mkdir()
    assert default_cache_dir(writable) == writable / ".metakd_cache"
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)  # read-only by its mode, even for root
    try:
        assert default_cache_dir(read_only) == tmp_path / "xdg" / "metakd_run"
    finally:
        read_only.chmod(0o755)


def test_unwritable_cache_dir_only_costs_the_cache(tmp_path: Path, caplog) -> None:
    root = make_mini(tmp_path / "data", "zip")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with caplog.at_level(logging.WARNING):
        data = load_miniimagenet(root, "val", 84, cache_dir=blocker / "cache")
    assert data.cache_file is None and "cannot write the data cache" in caplog.text


# --- errors name the culprit -----------------------------------------------------------------
def test_missing_root_is_a_data_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"dataset.root={missing} does not exist.*METAKD_DATA_ROOT"):
        build_episode_sampler(OmniglotConfig(root=str(missing)), "train")
    with pytest.raises(DataError, match=r"does not exist: point it at the folder that holds train"):
        build_episode_sampler(mini_cfg(missing), "train")


def test_empty_root_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no Omniglot data under .*download=true"):
        load_omniglot(tmp_path, "train")
    with pytest.raises(DataError, match=r"no miniImageNet data for split 'val'"):
        load_miniimagenet(tmp_path, "val")


@pytest.mark.parametrize("damage", ["truncated", "not_zip"])
def test_broken_archives_are_named(tmp_path: Path, damage: str) -> None:
    root = make_omniglot(tmp_path / "o", "zip")
    bad = root / "omniglot" / "images_evaluation.zip"
    bad.write_bytes(bad.read_bytes()[:300] if damage == "truncated" else b"<html>not found</html>")
    with pytest.raises(DataError, match=rf"{bad} is not a valid zip archive \(truncated or corrupt\)"):
        load_omniglot(root, "val", splits_dir=make_splits(tmp_path / "splits"))
    mini = make_mini(tmp_path / "m", "zip")
    bad = mini / "miniimagenet" / "images.zip"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=rf"{bad} is not a valid zip archive.*download again"):
        load_miniimagenet(mini, "train")


def test_undecodable_images_are_named(tmp_path: Path) -> None:
    files = omniglot_files()
    victim = "images_background/Beta/character01/0003_02.png"
    files[victim] = b"\x89PNG this is not an image"
    root = tmp_path / "o"
    for part in OMNI_CHARS:
        write_zip(root / f"{part}.zip", {k: v for k, v in files.items() if k.startswith(part)})
    with pytest.raises(DataError, match=rf"image {victim} in .*images_background.zip cannot be"):
        load_omniglot(root, "train", splits_dir=make_splits(tmp_path / "splits"))
    mini = make_mini(tmp_path / "m", "folder")
    broken = mini / "miniimagenet" / "images" / "n0200000200000003.jpg"
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(DataError, match=rf"image {broken} cannot be decoded"):
        load_miniimagenet(mini, "val")


def test_split_naming_absent_characters(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path, "zip")
    splits = make_splits(
        tmp_path / "splits", {"train": ["Alpha/character01/rot000", "Zeta/character09/rot090"]}
    )
    with pytest.raises(DataError, match=r"names 1 character\(s\) absent .* 'Zeta/character09'"):
        load_omniglot(root, "train", splits_dir=splits)
    with pytest.raises(DataError, match=r"'nope' is not an Omniglot split"):
        load_omniglot(root, "nope", splits_dir=splits)
    bad = tmp_path / "bad.txt"
    bad.write_text("Alpha/character01/rot045\n")
    with pytest.raises(DataError, match=r"bad.txt:1: rotation 45 is not a multiple of 90"):
        load_omniglot(root, str(bad))


def test_missing_archive_is_named_in_the_hint(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path, "zip")
    (root / "omniglot" / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match=r"'Gamma/character01'.*images_evaluation.zip missing"):
        load_omniglot(root, "val", splits_dir=make_splits(tmp_path / "splits"))


def test_missing_test_images(tmp_path: Path) -> None:
    for fmt in ("zip", "folder"):
        root = make_mini(tmp_path / fmt, fmt, without_test=True)
        assert load_miniimagenet(root, "train").images.shape[0] == 3
        with pytest.raises(
            DataError,
            match=r"split 'test': 16 of 16 images listed in .*test.csv "
            r"are missing from .*eval.split=val",
        ):
            load_miniimagenet(root, "test", cache_dir=tmp_path / "cache")
        assert not (tmp_path / "cache").exists() or not _cache_files(tmp_path / "cache")


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": Exploit(), "class_dict": {}}, f)
    with pytest.raises(DataError, match=r"mini-imagenet-cache-train.pkl .*refusing to load"):
        load_miniimagenet(tmp_path, "train")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_of_every_protocol_load(tmp_path: Path, protocol: int) -> None:
    """learn2learn's layout ({'image_data', 'class_dict'}); Python 3 writes protocol 2 bytes
    through ``_codecs.encode``, which the restricted unpickler allows for latin-1 only."""
    root = make_mini(tmp_path / "p", "pickle", protocol=protocol)
    raw = (root / "miniimagenet" / "mini-imagenet-cache-validation.pkl").read_bytes()
    assert raw[:2] == bytes([0x80, protocol])
    data = load_miniimagenet(root, "val", 84)
    expected = torch.from_numpy(mini_files().arrays["val"]).permute(0, 3, 1, 2)
    assert data.classes == MINI_CLASSES["val"]
    assert torch.equal(data.images.reshape(-1, 3, 84, 84), expected)


@pytest.mark.parametrize("protocol", [2, 5])
def test_protocol_2_pickle_naming_code_is_refused(tmp_path: Path, protocol: int) -> None:
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    class OtherCodec:  # _codecs.encode is allowed, but only as protocol 2 uses it (latin-1)
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    for payload, refused in ((Exploit(), r"refusing to load (posix|os|nt)\.system"), (OtherCodec(), "rot13")):
        with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
            pickle.dump({"image_data": payload, "class_dict": {}}, f, protocol=protocol)
        with pytest.raises(DataError, match=rf"mini-imagenet-cache-train.pkl .*{refused}") as err:
            load_miniimagenet(tmp_path, "train")
        assert "\n" not in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_unequal_classes_are_named(tmp_path: Path) -> None:
    arrays = mini_files().arrays["train"]
    class_dict = {"n01000001": list(range(8)), "n01000002": list(range(8, 16)), "n01000003": [16, 17]}
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": arrays, "class_dict": class_dict}, f, protocol=2)
    with pytest.raises(DataError, match=r"class n01000003 has 2 images in .*pkl where the others have 8"):
        load_miniimagenet(tmp_path, "train", cache_dir=tmp_path / "cache")
    with open(folder / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": arrays, "class_dict": {}}, f)
    with pytest.raises(DataError, match=r"pkl holds no miniImageNet images for split 'train'"):
        load_miniimagenet(tmp_path, "train")


# --- downloads and extraction ----------------------------------------------------------------
def test_download_verifies_md5_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(5000))
    good_md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest_dir = tmp_path / "dest"
    with pytest.raises(DataError, match=r"download of file:.* is corrupt \(md5 .*nothing was saved"):
        archive.download(src.as_uri(), dest_dir / "a.bin", md5="0" * 32)
    assert list(dest_dir.iterdir()) == []
    out = archive.download(src.as_uri(), dest_dir / "a.bin", md5=good_md5)
    assert out.read_bytes() == src.read_bytes() and list(dest_dir.iterdir()) == [out]


def test_interrupted_download_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    class Dropping(io.BytesIO):
        headers = {"Content-Length": "4000000"}

        def read(self, n: int = -1) -> bytes:
            if self.tell() > 1000:
                raise ConnectionResetError("connection reset by peer")
            return super().read(min(n, 600))

    monkeypatch.setattr(archive.urllib.request, "urlopen", lambda *a, **k: Dropping(b"x" * 5000))
    with pytest.raises(DataError, match=r"could not download https://x/y.zip .*connection reset"):
        archive.download("https://x/y.zip", tmp_path / "y.zip", md5=None)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    missing = tmp_path / "absent.zip"
    with pytest.raises(DataError, match=r"could not download file:"):
        archive.download(missing.as_uri(), tmp_path / "out" / "z.zip")
    assert list((tmp_path / "out").iterdir()) == []


def test_omniglot_download_fetches_missing_archives(tmp_path: Path, monkeypatch) -> None:
    server = make_omniglot(tmp_path / "server", "zip") / "omniglot"
    table = {
        part: ((server / f"{part}.zip").as_uri(), archive.md5sum(server / f"{part}.zip"))
        for part in omniglot.PARTS
    }
    monkeypatch.setattr(omniglot, "ARCHIVES", table)
    root = tmp_path / "fresh"
    cfg = OmniglotConfig(
        root=str(root), download=True, cache_dir=str(tmp_path / "cache"), ways=2, shots=1, queries=2
    )
    splits = make_splits(tmp_path / "splits")
    sampler = build_episode_sampler(cfg, str(splits / "val.txt"))
    assert sampler.num_classes == 3 and sampler.in_shape == (1, 28, 28)
    assert sorted(p.name for p in (root / "omniglot").iterdir()) == [
        "images_background.zip",
        "images_evaluation.zip",
    ]
    bad = {part: (url, "0" * 32) for part, (url, _) in table.items()}
    monkeypatch.setattr(omniglot, "ARCHIVES", bad)
    with pytest.raises(DataError, match=r"is corrupt \(md5"):
        load_omniglot(tmp_path / "other", "val", splits_dir=splits, download=True)
    assert not any((tmp_path / "other").rglob("*.zip*"))


def test_extract_zip_is_atomic(tmp_path: Path) -> None:
    zip_path = write_zip(tmp_path / "a.zip", {"d/x.txt": b"hello", "y.txt": b"world"})
    out = archive.extract_zip(zip_path, tmp_path / "out")
    assert (out / "d" / "x.txt").read_bytes() == b"hello"
    broken = tmp_path / "b.zip"
    broken.write_bytes(zip_path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"b.zip is not a valid zip archive"):
        archive.extract_zip(broken, tmp_path / "out2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip", "b.zip", "out"]


# --- the factory -----------------------------------------------------------------------------
def test_factory_builds_samplers_and_logs_preparation(tmp_path: Path, caplog) -> None:
    root = make_mini(tmp_path, "zip")
    with caplog.at_level(logging.INFO, logger="metakd_run.data.images"):
        sampler = build_episode_sampler(mini_cfg(root, image_size=32), "train", transfer=2)
    assert "miniimagenet/train: prepared 3x8x3x32x32 uint8 images" in caplog.text
    assert sampler.in_shape == (3, 32, 32) and sampler.out_dim == 3
    batch = sampler.sample(5, torch.Generator().manual_seed(0), transfer=2)
    assert batch.support_x.shape == (5, 3, 3, 32, 32) and batch.transfer_x.shape[1] == 6
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="metakd_run.data.images"):
        load_class_images(mini_cfg(root, image_size=32), "train")
    assert "loaded 3x8x3x32x32 uint8 images from cache" in caplog.text
    with pytest.raises(DataError, match=r"dataset.ways=3 but split 'val' of miniimagenet has only 2"):
        build_episode_sampler(mini_cfg(root), "val")
    with pytest.raises(DataError, match=r"'trainval' is not a miniImageNet split"):
        build_episode_sampler(mini_cfg(root), "trainval")


def test_registry_builds_every_source_from_attribute_only_configs(tmp_path: Path) -> None:
    """``cfg`` may be a dataclass, a DictConfig or any object with the fields as attributes."""
    root = make_mini(tmp_path, "zip")
    fields = dict(ways=3, shots=1, queries=2, image_size=32, cache_dir=str(tmp_path / "c"), download=False)
    image_cfgs = [
        mini_cfg(root, image_size=32),
        OmegaConf.structured(mini_cfg(root, image_size=32)),
        SimpleNamespace(name="miniimagenet", root=str(root), **fields),
    ]
    for cfg in image_cfgs:
        source = build_task_source(cfg, "train", transfer=1)
        assert isinstance(source, EpisodeSampler) and source.in_shape == (3, 32, 32)
    for cfg in (SinusoidConfig(shots=3), OmegaConf.structured(SinusoidConfig(shots=3))):
        batch = build_task_source(cfg, "test").sample(2, torch.Generator().manual_seed(0))
        assert batch.support_x.shape == (2, 3, 1)
    assert set(DATASETS) == {"sinusoid", "omniglot", "miniimagenet"}
    assert all(name == ds.name for name, ds in DATASETS.items())
    with pytest.raises(DataError, match=r"dataset.name=cub is unknown: use one of sinusoid, omniglot"):
        build_task_source(SimpleNamespace(name="cub"), "train")
    with pytest.raises(DataError, match=r"dataset.name=sinusoid is not an image data set"):
        load_class_images(SinusoidConfig(), "train")


class _NpyGroups(Source):
    def counts(self) -> dict[str, int]:
        return {p.stem: int(np.load(p, mmap_mode="r").shape[0]) for p in self.files}

    def read(self, groups: list[str], size: int, workers: int | None, desc: str) -> np.ndarray:
        return np.concatenate([np.load(self.folder / f"{g}.npy") for g in groups])


def _find_npy(folder: Path, split: Split) -> _NpyGroups | None:
    where = folder / split.name
    if not where.is_dir():
        return None
    return _NpyGroups(kind="npy", folder=where, files=sorted(where.glob("*.npy")), description=str(where))


class NpySet(ImageDataSet):
    """A data set added in one class: ``<root>/npyset/<split>/<class>.npy``, uint8 [M, 8, 8]."""

    name = "npyset"
    title = "NpySet"
    folders = ("npyset",)
    holds = "npyset/<split>/<class>.npy"
    formats = (_find_npy,)

    def split(self, name: str) -> Split:
        return Split(name)

    def missing(self, root: Path, split: Split, download: bool) -> str:
        return f"no NpySet split '{split.name}' under {root}"


def test_a_new_data_set_plugs_into_the_one_loader(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(DATASETS, "npyset", NpySet())
    rng = np.random.default_rng(0)
    folder = tmp_path / "npyset" / "train"
    folder.mkdir(parents=True)
    arrays = {c: rng.integers(0, 255, (4, 8, 8), dtype=np.uint8) for c in ("b", "a", "c")}
    for c, a in arrays.items():
        np.save(folder / f"{c}.npy", a)
    cfg = SimpleNamespace(
        name="npyset",
        root=str(tmp_path),
        ways=2,
        shots=1,
        queries=3,
        image_size=8,
        cache_dir=None,
        download=False,
    )
    data = load_class_images(cfg, "train")
    assert data.classes == ["a", "b", "c"] and data.images.shape == (3, 4, 1, 8, 8)
    assert torch.equal(data.images[1, :, 0], torch.from_numpy(arrays["b"]))
    assert data.cache_file is not None and load_class_images(cfg, "train").prepared_s is None
    assert build_task_source(cfg, "train").out_dim == 2
    with pytest.raises(DataError, match=r"no NpySet split 'val' under"):
        load_class_images(cfg, "val")
    np.save(folder / "d.npy", arrays["a"][:3])
    with pytest.raises(DataError, match=r"NpySet class d has 3 images in .*train where the others have 4"):
        load_class_images(cfg, "train")
    with pytest.raises(DataError, match=r"dataset.root=.*absent does not exist: .* npyset/<split>"):
        load_class_images(SimpleNamespace(**{**vars(cfg), "root": str(tmp_path / "absent")}), "train")


# --- the real data sets (skipped unless METAKD_DATA_ROOT names them) -------------------------
def _real_root() -> Path:
    """``$METAKD_DATA_ROOT``; unset: the test skips. Set, it must name a folder: a root that is set
    but wrong, or data there that does not load, fails the test instead of hiding behind a skip."""
    value = os.environ.get("METAKD_DATA_ROOT")
    if not value:
        pytest.skip("METAKD_DATA_ROOT is not set")
    assert Path(value).is_dir(), f"METAKD_DATA_ROOT={value} is not a folder"
    return Path(value)


def _real(name: str, split: str):
    """The real ``name`` split under ``$METAKD_DATA_ROOT``; any loader error fails the test."""
    cfg_cls = OmniglotConfig if name == "omniglot" else MiniImageNetConfig
    return load_class_images(cfg_cls(root=str(_real_root())), split)


@pytest.mark.parametrize("split,classes", [("train", 4112), ("val", 688), ("test", 1692)])
def test_real_omniglot_vinyals_split(split: str, classes: int) -> None:
    data = _real("omniglot", split)
    assert data.images.shape == (classes, 20, 1, 28, 28)
    sampler = EpisodeSampler.from_class_images(data, ways=5, shots=1, queries=15)
    batch = sampler.sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)


@pytest.mark.parametrize("split,classes", [("train", 64), ("val", 16)])
def test_real_miniimagenet_split(split: str, classes: int) -> None:
    data = _real("miniimagenet", split)
    assert data.images.shape == (classes, 600, 3, 84, 84)
    batch = EpisodeSampler.from_class_images(data, 5, 1, 15).sample(2, torch.Generator())
    assert batch.query_x.shape == (2, 75, 3, 84, 84)


def test_real_miniimagenet_test_split_is_missing() -> None:
    """The shared copy holds test.csv but not the test classes' images (see its README): the split
    is named as incomplete, with the count; a complete copy loads."""
    root = _real_root()
    assert (root / "miniimagenet" / "test.csv").is_file(), f"no miniimagenet/test.csv under {root}"
    try:
        data = load_class_images(MiniImageNetConfig(root=str(root)), "test")
    except DataError as err:
        assert "split 'test': 12000 of 12000 images" in str(err) and "missing" in str(err)
        return
    assert data.images.shape == (20, 600, 3, 84, 84)  # a complete copy: the test split loads
