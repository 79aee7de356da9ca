"""End-to-end on image classification with tiny generated data sets (no download, no real data)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from tests.conftest import read_summary
from tests.tensorboard_runs import TensorBoardRuns
from tests.test_data_images import make_mini

TINY_IMAGES = [
    "experiment=miniimagenet_5w1s",
    "dataset.ways=2",
    "dataset.queries=2",
    "dataset.image_size=20",
    "teacher.filters=4",
    "student.filters=2",
    "teacher.blocks=2",
    "student.blocks=2",
    "meta.inner_steps=1",
    "eval.split=val",
]


@pytest.fixture(scope="module")
def mini_root(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("data"))


def test_miniimagenet_pipeline_runs_and_logs_accuracy(run_cli, tmp_path, mini_root):
    run_dir = tmp_path / "run"
    proc = run_cli(
        *TINY_IMAGES,
        f"dataset.root={mini_root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        "kd=mse",
        "kd.taps=[block2]",
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["task"] == "classification" and summary["eval"]["split"] == "val"
    per_task = json.loads((run_dir / "per_task.json").read_text())
    for name in ("teacher", "student_kd", "student_base"):
        acc = summary["models"][name]["metrics"]["accuracy"]
        # the summary's mean and interval are those of the per-task accuracies it wrote beside it,
        # each a count of a task's 2 x 2 query images
        tasks = per_task[name]["accuracy"]["step_3"]
        assert len(tasks) == summary["eval"]["tasks"] == 10
        assert all(a * 4 == round(a * 4) for a in tasks), tasks
        assert acc["step_3"]["mean"] == pytest.approx(sum(tasks) / len(tasks), abs=1e-12)
        half = 1.96 * statistics.stdev(tasks) / math.sqrt(10)
        assert acc["step_3"]["ci95"] == pytest.approx(half, abs=1e-12)
    # the student's 2-channel block2 was projected to the teacher's 4 channels by a 1x1 conv
    state = torch.load(run_dir / "checkpoints" / "student_kd.pt", weights_only=True)["state_dict"]
    assert state["distiller.projections.block2__to__block2.weight"].shape == (4, 2, 1, 1)
    ea = TensorBoardRuns(run_dir)
    scalars = ea.tags("scalars")
    assert {"teacher/val/accuracy", "student_kd/train/kd_loss", "student_kd/train/accuracy"} <= scalars
    assert "teacher/test_accuracy_by_step/mean" in scalars
    assert "eval/test_tasks" in ea.tags("images")


@pytest.mark.parametrize("kd", ["kd=kl", "kd=attention kd.taps=[block1,block2]"])
def test_classification_distances_run(run_cli, tmp_path, mini_root, kd):
    proc = run_cli(
        *TINY_IMAGES,
        f"dataset.root={mini_root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        *kd.split(),
        "train.stages=[teacher,student_kd]",
        "meta=anil",
        run_dir=tmp_path / "r",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(tmp_path / "r")["models"]["student_kd"]["training"]["best_val"] is not None


@pytest.mark.parametrize(
    "override,needle",
    [
        ("dataset.ways=5", "dataset.ways"),
        ("dataset.queries=20", "per class"),
    ],
)
def test_data_mistakes_fail_before_training_with_one_line(run_cli, tmp_path, mini_root, override, needle):
    args = [a for a in TINY_IMAGES if not a.startswith(override.split("=")[0] + "=")]
    proc = run_cli(
        *args,
        f"dataset.root={mini_root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        override,
        run_dir=tmp_path / "r",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("metakd-run: error")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


def test_missing_test_images_name_the_split(run_cli, tmp_path):
    root = make_mini(tmp_path / "data", without_test=True)
    proc = run_cli(
        *[a for a in TINY_IMAGES if a != "eval.split=val"],
        f"dataset.root={root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        run_dir=tmp_path / "r",
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("metakd-run: error")]
    assert len(lines) == 1 and "test" in lines[0] and "eval.split=val" in lines[0]
    assert not (tmp_path / "r").exists()
