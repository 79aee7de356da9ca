"""scripts/time_to_accuracy.py: a pretrain teacher trained for as many iterations as a CPU budget
buys, end to end on a tiny Omniglot.

What could break: the iterations not following from the calibration and the budget, the curve not
having its validations, the final figure not being the run's own meta-test on the split asked for,
the CPU time not being measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_kd_vs_mkd import tiny_omniglot

SCRIPT = ROOT / "scripts" / "time_to_accuracy.py"


@pytest.mark.slow
@pytest.mark.parametrize("split", ["val", "test"])
def test_the_budget_buys_the_calibrated_iterations_and_the_final_figure_is_the_runs(tmp_path, split):
    overrides = tiny_omniglot(tmp_path / "data")
    out = tmp_path / "tta"
    cmd = [sys.executable, str(SCRIPT), "--experiment", "omniglot_5w1s", "--minutes", "0.1",
           "--calibrate", "4", "--points", "2", "--split", split, "--out", str(out), *overrides]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = out / "omniglot_5w1s-0.1min"
    record = json.loads((base / "time_to_accuracy.json").read_text())
    calib = json.loads((base / "calibration" / "timings.json").read_text())["teacher"]
    per_iteration = (calib["cpu_seconds"] - calib["validation_cpu_seconds"]) / calib["iterations"]
    assert record["iterations"] == max(2, int(0.1 * 60 * 0.85 / per_iteration))
    run = base / "run"
    config = (run / ".hydra" / "config.yaml").read_text()
    assert f"split: {split}" in config and "family: pretrain" in config
    timings = json.loads((run / "timings.json").read_text())["teacher"]
    assert timings["iterations"] == record["iterations"] and len(record["curve"]) == 2
    # the curve reads the loop's clock: rising CPU minutes, the last within the stage's total
    assert record["curve_cpu"] == "measured by the training loop"
    cpu = [c["cpu_minutes"] for c in record["curve"]]
    assert 0 < cpu[0] < cpu[1] <= timings["cpu_seconds"] / 60 + 1e-9
    assert [c["iteration"] for c in timings["validation_clock"]] == [c["iteration"] for c in record["curve"]]
    summary = json.loads((run / "summary.json").read_text())
    final = summary["models"]["teacher"]["metrics"]["accuracy"]["step_0"]
    assert record["final"]["accuracy"] == final["mean"] and record["final"]["split"] == split
    assert 0 < record["training_cpu_minutes"] < record["run_cpu_minutes"]
    assert f"{split} tasks" in proc.stdout
