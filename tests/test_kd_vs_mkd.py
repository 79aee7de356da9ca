"""scripts/kd_vs_mkd.py: ordinary KD against MKD at one CPU budget, end to end on a tiny Omniglot.

What could break: the KD arm not being the pretrain family, its iterations not following from the
MKD arm's measured budget and the calibration, the arms scoring different test tasks (the
cross-arm difference would then compare nothing), the table disagreeing with the runs' own
summaries, and a rerun training again instead of continuing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.test_data_images import make_omniglot, make_splits

SCRIPT = ROOT / "scripts" / "kd_vs_mkd.py"


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    return tiny_omniglot(tmp_path_factory.mktemp("data"))


def tiny_omniglot(root: Path) -> list[str]:
    """Overrides for a tiny Omniglot in ``root`` (written here) that every family trains on."""
    make_omniglot(root)
    splits = make_splits(root / "splits")
    return [
        f"dataset.root={root}", f"dataset.cache_dir={root / 'cache'}",
        *(f"dataset.{s}_split={splits / s}.txt" for s in ("train", "val", "test")),
        "dataset.ways=2", "dataset.queries=2", "dataset.image_size=20", "teacher.filters=4",
        "student.filters=2", "teacher.blocks=2", "student.blocks=2", "meta.pretrain.batch=8",
        "meta.meta_batch=2", "train.iterations=6", "train.val_every=3", "train.val_tasks=2",
        "eval.tasks=6", "eval.batch=6",
    ]  # fmt: skip


def script(out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--experiment", "omniglot_5w1s", "--out", str(out), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
def test_kd_arm_spends_the_mkd_arms_budget_on_the_same_tasks_and_a_rerun_continues(tmp_path, overrides):
    out = tmp_path / "cmp"
    proc = script(out, "--seeds", "0", "1", "--calibrate", "4", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = out / "omniglot_5w1s"
    record = json.loads((base / "kd_vs_mkd.json").read_text())

    def cfg(run: Path) -> dict:
        return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())

    def timings(run: Path) -> dict:
        return json.loads((run / "timings.json").read_text())

    def train_cpu(run: Path, stage: str) -> float:  # the stage's measured process CPU time
        t = timings(run)[stage]
        return t["cpu_seconds"] - t["validation_cpu_seconds"]

    # the arms: the MKD arm is the meta-learned family at the preset's iterations, the KD arm pretrain
    for s in (0, 1):
        mkd, kd = cfg(base / "mkd" / f"seed{s}"), cfg(base / "kd" / f"seed{s}")
        assert (mkd["meta"]["family"], kd["meta"]["family"]) == ("protonet", "pretrain")
        assert mkd["train"]["iterations"] == 6 and mkd["seed"] == kd["seed"] == s
        assert kd["train"]["iterations"] == record["kd_iterations"]["teacher"]
        assert kd["train"]["student_iterations"] == record["kd_iterations"]["students"]
    # the budget is the MKD arm's mean training CPU time per stage; the KD iterations spend it at
    # the calibrated cost of a pretrain iteration
    calib = base / "kd" / "calibration"
    for stage, key in (("teacher", "teacher"), ("student_kd", "students")):
        budget = sum(train_cpu(base / "mkd" / f"seed{s}", stage) for s in (0, 1)) / 2 / 60
        assert math.isclose(record["budget_cpu_minutes"][stage], budget, rel_tol=1e-9)
        per_it = train_cpu(calib, stage) / timings(calib)[stage]["iterations"]
        assert record["kd_iterations"][key] == max(2, round(budget * 60 / per_it))
    # both arms scored the same test tasks: the same count, and the same eval stream
    for s in (0, 1):
        runs = [base / arm / f"seed{s}" for arm in ("mkd", "kd")]
        evals = [json.loads((r / "summary.json").read_text())["eval"] for r in runs]
        assert evals[0] == evals[1]
    # the table's cross-arm difference is recomputed from the runs' summaries
    acc = record["accuracy"]
    for model in ("teacher", "student_kd", "student_base"):
        for s in ("0", "1"):
            summary = json.loads((base / "kd" / f"seed{s}" / "summary.json").read_text())
            curve = summary["models"][model]["metrics"]["accuracy"]
            last = max((k for k in curve if k.startswith("step_")), key=lambda k: int(k.split("_")[1]))
            assert math.isclose(acc["kd"][s][model], 100 * curve[last]["mean"], rel_tol=1e-9)
    md = (base / "kd_vs_mkd.md").read_text()
    assert "| MKD (protonet) |" in md and "| ordinary KD (pretrain) |" in md and "| KD − MKD |" in md
    # a rerun continues: nothing is trained again, the same table comes out
    stamps = {p: p.stat().st_mtime_ns for p in base.rglob("budget.json")}
    again = script(out, "--seeds", "0", "1", "--calibrate", "4", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in base.rglob("budget.json")} == stamps
    assert (base / "kd_vs_mkd.md").read_text() == md


def test_a_pretrain_mkd_arm_is_refused_in_one_line(tmp_path):
    proc = script(tmp_path / "x", "--mkd-family", "pretrain")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0
    assert "--mkd-family=pretrain is invalid" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_a_resumed_stage_counts_its_whole_budget(tmp_path, monkeypatch):
    """A stage resumed from a checkpoint ran 120 of its 600 iterations in the last sitting, but its
    seconds carry on from the checkpoint's (training.py): they are the whole stage's budget, not a
    fifth of it, and not five times it."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import kd_vs_mkd

    stage = {"seconds": 130.0, "validation_seconds": 10.0, "iterations": 600, "iterations_run": 120}
    (tmp_path / "timings.json").write_text(json.dumps({m: stage for m in kd_vs_mkd.MODELS}))
    minutes = kd_vs_mkd.cpu_minutes(tmp_path, share=0.5)
    assert minutes == {m: 0.5 * 120.0 / 60 for m in kd_vs_mkd.MODELS}


def test_a_stage_measured_in_cpu_seconds_is_not_estimated_from_its_wall_time(tmp_path, monkeypatch):
    """Where the training loop kept the stage's process CPU time, the budget is that time (less
    validation's), whatever the run's CPU/wall share was."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import kd_vs_mkd

    stage = {"seconds": 130.0, "validation_seconds": 10.0, "cpu_seconds": 100.0,
             "validation_cpu_seconds": 4.0, "iterations": 600}  # fmt: skip
    (tmp_path / "timings.json").write_text(json.dumps({m: stage for m in kd_vs_mkd.MODELS}))
    assert kd_vs_mkd.cpu_minutes(tmp_path, share=0.5) == {m: 96.0 / 60 for m in kd_vs_mkd.MODELS}
