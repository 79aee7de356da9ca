"""What the budget scripts share: run the console script as a child, and measure its CPU time.

``time_to_accuracy.py`` and ``kd_vs_mkd.py`` compare runs by CPU-minutes, not by iterations: a
pretrain step (one mini-batch) and a meta-step (a meta-batch of episodes) cost very different
amounts. The CPU time of a child is exact (getrusage, user + system), and the training loop
measures each stage's process CPU seconds (``cpu_seconds`` in ``timings.json``). A stage trained
before the loop measured them has only wall seconds: its CPU seconds are then estimated as its wall
seconds times the whole run's CPU/wall ratio (which assumes the contention was even over the run).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def metakd_run() -> list[str]:
    """The console script of this environment (or the module, where it is not installed)."""
    exe = shutil.which("metakd-run", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "metakd_run.cli"]


def run(overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """One console-script run into ``run_dir``; returns its CPU seconds (user + system) and wall
    seconds. A failed run ends the script with metakd-run's last line."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    tic = time.perf_counter()
    proc = subprocess.run(
        [*metakd_run(), *overrides, f"hydra.run.dir={run_dir}"], capture_output=True, text=True
    )
    wall = time.perf_counter() - tic
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        sys.exit(f"metakd-run failed ({proc.returncode}) in {run_dir}: {last[0]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def stage_timings(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``timings.json`` of a finished run: each stage's seconds, validation seconds, iterations."""
    return json.loads((run_dir / "timings.json").read_text())


def training_cpu_seconds(stage: dict[str, Any], cpu_per_wall: float) -> float:
    """CPU seconds of a stage's training, validation left out: measured where the stage kept them,
    else its wall seconds x ``cpu_per_wall``. A resumed stage's seconds carry on from its
    checkpoint (training.py keeps both clocks there), so they are the whole stage's."""
    if stage.get("cpu_seconds") is not None and stage.get("validation_cpu_seconds") is not None:
        return stage["cpu_seconds"] - stage["validation_cpu_seconds"]
    return cpu_per_wall * (stage["seconds"] - stage["validation_seconds"])


def training_seconds_per_iteration(stage: dict[str, Any], cpu_per_wall: float) -> float:
    """CPU seconds of one training iteration of a stage: the whole stage's (over every sitting)
    divided by all its iterations, not by those of the last sitting."""
    return training_cpu_seconds(stage, cpu_per_wall) / max(1, stage["iterations"])
