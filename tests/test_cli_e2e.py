"""End-to-end: the real console script in a subprocess, and what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import read_summary
from tests.tensorboard_runs import TensorBoardRuns

STAGES = ("teacher", "student_kd", "student_base")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny default run, shared by the checks below (it is the slowest part)."""
    import os
    import subprocess

    from tests.conftest import TINY, metakd_run_exe

    base = tmp_path_factory.mktemp("e2e")
    run_dir = base / "run"
    proc = subprocess.run(
        [*metakd_run_exe(), *TINY, f"hydra.run.dir={run_dir}"],
        cwd=base,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_run_folder_holds_config_summary_checkpoints_plots(tiny_run):
    run_dir, proc = tiny_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    summary = read_summary(run_dir)
    assert set(summary["models"]) == set(STAGES)
    for name in STAGES:
        mse = summary["models"][name]["metrics"]["mse"]
        assert set(mse) >= {"step_0", "step_1", "step_3", "curve"}
        assert mse["step_1"]["ci95"] > 0
        state = torch.load(run_dir / "checkpoints" / f"{name}.pt", weights_only=True)
        assert "state_dict" in state and state["stage"] == name
    assert summary["models"]["teacher"]["parameters"] > summary["models"]["student_kd"]["parameters"]
    assert summary["hparams"]["meta.inner_lr"] == 0.01
    assert summary["environment"]["torch"] == torch.__version__
    assert (run_dir / "test_tasks.png").stat().st_size > 1000
    assert not list((run_dir / "checkpoints").glob("*_last.pt"))  # finished stages leave no partial file
    timings = json.loads((run_dir / "timings.json").read_text())
    for name in STAGES:  # throughput counts training only: validation time is reported apart
        t = timings[name]
        assert 0 < t["validation_seconds"] < t["seconds"] and t["iterations"] == 12
        # and the process CPU time, which the ledger counts (wall time counts other jobs' share too)
        assert 0 < t["validation_cpu_seconds"] < t["cpu_seconds"] < 4 * t["seconds"]
        assert t["tasks_per_second"] > 4 * 12 / t["seconds"]
    assert set(timings["meta_test_seconds"]) == set(STAGES)
    # the table at the end names each model with mean ± CI per step
    for label in ("teacher", "student (MKD)", "student (baseline)"):
        assert label in proc.stdout
    assert "±" in proc.stdout


def test_tensorboard_has_each_stage_hparams_image_and_config(tiny_run):
    run_dir, _ = tiny_run
    ea = TensorBoardRuns(run_dir)  # tb/<model> per model, tb/run for the rest
    scalars = ea.tags("scalars")
    for name in STAGES:
        assert f"{name}/train/loss" in scalars
        assert f"{name}/val/mse" in scalars
    assert {"student_kd/train/task_loss", "student_kd/train/kd_loss"} <= scalars
    assert ea.scalars("teacher/train/loss")[-1].step == 12
    assert "eval/test_tasks" in ea.tags("images")
    assert {"config/text_summary", "final_metrics/text_summary"} <= ea.tags("tensors")
    assert not any(t.startswith("final/") for t in scalars)  # final metrics: HParams and text, no charts
    for name in STAGES:  # each model's run is an HParams session
        content = ea.runs[name].PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        assert "meta.inner_lr" in start.session_start_info.hparams
        assert start.session_start_info.hparams["model"].string_value == name
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
        assert "test_mse_by_step/mean" in metric_tags
        assert metric_tags <= set(ea.runs[name].Tags()["scalars"])  # HParams reads them from this run


def test_same_seed_same_summary_other_seed_differs(tiny_run, run_cli, tmp_path):
    run_dir, _ = tiny_run
    again = run_cli(run_dir=tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "again" / "summary.json").read_text() == (run_dir / "summary.json").read_text()
    other = run_cli("seed=1", run_dir=tmp_path / "other")
    assert other.returncode == 0
    assert read_summary(tmp_path / "other")["models"] != read_summary(run_dir)["models"]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("meta.inner_lr=-0.5", "meta.inner_lr"),
        ("dataset.shots=0", "dataset.shots"),
        ("meta.inner_lr=fast", "meta.inner_lr"),
        ("meta.innerlr=0.1", "meta.innerlr"),
        ("dataset=nosuchset", "nosuchset"),
        ("train.student_iterations=0", "train.student_iterations"),
        ("meta.outer_schedule=linear", "meta.outer_schedule"),
    ],
)
def test_bad_values_fail_with_one_line_and_no_run_folder(run_cli, tmp_path, override, needle):
    run_dir = tmp_path / "bad"
    proc = run_cli(override, run_dir=run_dir)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_train_only_the_teacher_then_reuse_it(run_cli, tmp_path: Path):
    first = run_cli("train.stages=[teacher]", run_dir=tmp_path / "t")
    assert first.returncode == 0, first.stderr[-2000:]
    assert set(read_summary(tmp_path / "t")["models"]) == {"teacher"}
    ckpt = tmp_path / "t" / "checkpoints" / "teacher.pt"
    second = run_cli(
        f"train.teacher_checkpoint={ckpt}",
        "kd.weight=0.5",
        "train.student_iterations=7",
        run_dir=tmp_path / "s",
    )
    assert second.returncode == 0, second.stderr[-2000:]
    s1, s2 = read_summary(tmp_path / "t"), read_summary(tmp_path / "s")
    assert s2["models"]["teacher"]["metrics"] == s1["models"]["teacher"]["metrics"]
    assert s2["hparams"]["train.student_iterations"] == 7
    ea = TensorBoardRuns(tmp_path / "s")
    assert "teacher/train/loss" not in ea.tags("scalars")
    for name in ("student_kd", "student_base"):  # the students ran their own budget, not train.iterations
        assert ea.scalars(f"{name}/train/loss")[-1].step == 7
