"""Reading a sweep's job folders: one row per job (its overrides, outcome and what the seed
statistics need), and the sweep id that tells this sweep's jobs from an earlier sweep's folders.

Whatever the launcher (basic, joblib, submitit) or sweeper (grid, Optuna), each job leaves its
overrides in ``<job>/.hydra/overrides.yaml``, its config in ``.hydra/config.yaml`` and either
``summary.json`` or ``error.txt`` in its folder, so the tables are built from the folders, not
from the launcher's return values: a job that failed is a row with its error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from metakd_run.evaluation.summary import flat_metrics
from metakd_run.names import KD, primary_metric


@dataclass
class JobRow:
    """One job folder: its overrides, its outcome, and what the seed statistics need of it."""

    job: str
    overrides: list[str]
    status: str  # ok | failed | no result
    objective: float | None = None
    task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    best: bool = False
    seed: int | None = None
    primary: dict[str, dict[int, float]] = field(default_factory=dict)  # model -> step -> mean
    parameters: dict[str, int] = field(default_factory=dict)
    noise: float | None = None  # estimated 95% half-width of the objective (one run)
    teacher_checkpoint: str | None = None
    teacher_cache: str | None = None
    teacher_source: str = ""

    @property
    def scored(self) -> bool:
        return self.status == "ok" and self.objective is not None and math.isfinite(self.objective)


def read_job(job_dir: Path) -> JobRow:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    row = JobRow(job=job_dir.name, overrides=overrides, status="no result")
    config = _raw_config(job_dir / ".hydra" / "config.yaml")
    train = config.get("train") or {}
    row.teacher_checkpoint, row.teacher_cache = train.get("teacher_checkpoint"), train.get("teacher_cache")
    seed = config.get("seed", keys_of(row).get("seed"))
    row.seed = int(seed) if isinstance(seed, int | str) and str(seed).isdigit() else None
    summary_file, error_file = job_dir / "summary.json", job_dir / "error.txt"
    if error_file.is_file():
        row.status, row.error = "failed", error_file.read_text().strip()
    elif summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        row.status, row.objective, row.task = "ok", summary.get("objective"), summary.get("task")
        row.metrics = flat_metrics(summary)
        row.teacher_source = str(summary.get("teacher_source", ""))
        metric, _ = primary_metric(row.task or "regression")
        for name, model in summary.get("models", {}).items():
            steps = model.get("metrics", {}).get(metric, {})
            row.primary[name] = {
                int(k[len("step_") :]): v["mean"]
                for k, v in steps.items()
                if k.startswith("step_") and v.get("mean") is not None
            }
            if "parameters" in model:
                row.parameters[name] = int(model["parameters"])
        row.noise = objective_noise(summary, train.get("val_tasks"))
    return row


def _raw_config(path: Path) -> dict[str, Any]:
    """The job's saved config as written, interpolations unresolved (they may need Hydra)."""
    if not path.is_file():
        return {}
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return raw if isinstance(raw, dict) else {}


def objective_noise(summary: dict[str, Any], val_tasks: Any) -> float | None:
    """The 95% half-width of one run's objective, estimated from its meta-test.

    The validation records no interval, so the test interval of the same model and metric at the
    validation's inner step (``meta.inner_steps``) stands in for it, widened by
    sqrt(test tasks / validation tasks) to the validation's task count. It measures task-sampling
    noise only; the seed-to-seed variation needs seeds.
    """
    models = summary.get("models", {})
    name = KD if KD in models else "teacher"
    metric, _ = primary_metric(summary.get("task") or "regression")
    entry = models.get(name, {}).get("metrics", {}).get(metric, {})
    curve = entry.get("curve")
    if not isinstance(curve, dict) or not curve.get("steps"):
        return None
    step = int(summary.get("hparams", {}).get("meta.inner_steps", curve["steps"][-1]))
    i = min(range(len(curve["steps"])), key=lambda k: abs(curve["steps"][k] - step))
    ci = curve.get("ci95", [None] * len(curve["steps"]))[i]
    if ci is None or not math.isfinite(ci):
        return None
    tasks = summary.get("eval", {}).get("tasks")
    if isinstance(val_tasks, int) and isinstance(tasks, int) and val_tasks > 0:
        ci *= math.sqrt(tasks / val_tasks)
    return float(ci)


SWEEP_ID = ".sweep_id"  # in the sweep folder: this sweep's id; in a job folder: the sweep that last ran it


def start_sweep(sweep_dir: Path, command: Any = None) -> str:
    """Name the sweep about to launch by its command; each of its jobs copies the name into its
    folder (:func:`stamp_job`), so the summary can leave out the folders of an earlier, different
    sweep launched into the same ``hydra.sweep.dir``. The same command run again (to continue a
    grid, or an Optuna study whose trials number on) has the same name, so its earlier jobs count."""
    import hashlib

    sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep_id = hashlib.sha256(json.dumps(command, sort_keys=True, default=str).encode()).hexdigest()[:16]
    (sweep_dir / SWEEP_ID).write_text(sweep_id + "\n")
    return sweep_id


def stamp_job(sweep_dir: Path, job_dir: Path) -> None:
    """Mark ``job_dir`` as a job of the sweep now running in ``sweep_dir`` (if it has an id)."""
    try:
        sweep_id = (sweep_dir / SWEEP_ID).read_text()
    except OSError:
        return
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / SWEEP_ID).write_text(sweep_id)


def _job_dirs(sweep_dir: Path) -> list[Path]:
    def is_job(d: Path) -> bool:
        return not d.name.startswith(".") and ((d / ".hydra").is_dir() or (d / "error.txt").is_file())

    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and is_job(d)]
    dirs.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    return dirs


def _of_this_sweep(sweep_dir: Path, job_dir: Path) -> bool:
    """False only for a job folder stamped by another sweep; a folder without a stamp (from before
    sweep ids, or a job that died before it could stamp it) counts, so a failure is never hidden."""
    try:
        sweep_id = (sweep_dir / SWEEP_ID).read_text()
    except OSError:
        return True  # a sweep folder from before ids, or read from elsewhere: every job counts
    try:
        return (job_dir / SWEEP_ID).read_text() == sweep_id
    except OSError:
        return True


def stale_jobs(sweep_dir: Path) -> list[str]:
    """Job folders that an earlier sweep into the same folder left and this sweep did not run."""
    return [d.name for d in _job_dirs(sweep_dir) if not _of_this_sweep(sweep_dir, d)]


def read_jobs(sweep_dir: Path) -> list[JobRow]:
    """One row per job folder of this sweep (a folder with Hydra's ``.hydra/`` or our ``error.txt``)."""
    return [read_job(d) for d in _job_dirs(sweep_dir) if _of_this_sweep(sweep_dir, d)]


def keys_of(row: JobRow) -> dict[str, str]:
    """The job's overrides as ``{key: value}``."""
    return dict(o.partition("=")[::2] for o in row.overrides)
