"""Class slices of a split (``train@:4``, ``train@4:``): disjoint class sets carved from one split,
so that settings can be chosen on classes held out of training when the test classes are absent."""

from __future__ import annotations

import pytest
import torch

from metakd_run.data.errors import DataError
from metakd_run.data.miniimagenet import load_miniimagenet
from tests.conftest import read_summary
from tests.test_cli_images import TINY_IMAGES
from tests.test_data_images import make_mini


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("data"))


def test_slices_are_disjoint_and_cover_the_split(root):
    whole = load_miniimagenet(root, "train", 20, cache_dir=root / "cache")
    n = len(whole.classes)
    cut = n // 2
    head = load_miniimagenet(root, f"train@:{cut}", 20, cache_dir=root / "cache")
    tail = load_miniimagenet(root, f"train@{cut}:", 20, cache_dir=root / "cache")
    assert head.split == f"train@:{cut}" and tail.split == f"train@{cut}:"
    assert head.classes == whole.classes[:cut] and tail.classes == whole.classes[cut:]
    assert not set(head.classes) & set(tail.classes)
    assert torch.equal(torch.cat([head.images, tail.images]), whole.images)


@pytest.mark.parametrize("name", ["train@5:2", "train@:999", "train@999:"])
def test_a_slice_without_classes_is_one_line(root, name):
    with pytest.raises(DataError, match=rf"split '{name}' selects no classes: 'train' has \d+ classes"):
        load_miniimagenet(root, name, 20, cache_dir=root / "cache")


@pytest.mark.slow
def test_a_run_trains_on_a_slice(run_cli, tmp_path, root):
    """The fixture's train split has 3 classes: training takes 2 (the tasks are 2-way)."""
    run = tmp_path / "run"
    proc = run_cli(
        *TINY_IMAGES,
        f"dataset.root={root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.train_split=train@:2",
        run_dir=run,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(run)["eval"]["split"] == "val"
    too_few = run_cli(
        *TINY_IMAGES, f"dataset.root={root}", "dataset.train_split=train@2:", run_dir=tmp_path / "x"
    )
    assert too_few.returncode == 2
    assert "train@2:" in too_few.stderr and not (tmp_path / "x").exists()
