"""The sweep summary: a Hydra callback that tabulates every job of a multirun when it ends.

Whatever the launcher (basic, joblib, submitit) or sweeper (grid, Optuna), each job leaves its
overrides in ``<job>/.hydra/overrides.yaml`` and either ``summary.json`` or ``error.txt`` in its
folder, so the table is built from the folders, not from the launcher's return values: a job
that failed is a row with its error, and the best job by the objective is marked.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    """What the last sweep of this process produced; the console script exits 1 if jobs failed."""

    jobs: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    summary: Path | None = None

    def failure_line(self) -> str:
        job, error = self.failed[0]
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        return (
            f"{len(self.failed)} of {self.jobs} sweep jobs failed: job {job}: {error}{more}; "
            f"see {self.summary}"
        )


LAST_SWEEP = SweepOutcome()


@dataclass
class JobRow:
    job: str
    overrides: list[str]
    status: str  # ok | failed | no result
    objective: float | None = None
    task: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    best: bool = False


def flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """``<model>/<metric>_step_<k>``: the final test metrics, as the HParams tab names them."""
    flat: dict[str, float] = {}
    for name, model in summary.get("models", {}).items():
        for metric, entry in model.get("metrics", {}).items():
            for key, value in entry.items():
                if key.startswith("step_"):
                    flat[f"{name}/{metric}_{key}"] = value["mean"]
    return flat


def read_job(job_dir: Path) -> JobRow:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    row = JobRow(job=job_dir.name, overrides=overrides, status="no result")
    summary_file, error_file = job_dir / "summary.json", job_dir / "error.txt"
    if error_file.is_file():
        row.status, row.error = "failed", error_file.read_text().strip()
    elif summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        row.status, row.objective, row.task = "ok", summary.get("objective"), summary.get("task")
        row.metrics = flat_metrics(summary)
    return row


def collect(sweep_dir: Path) -> list[JobRow]:
    """One row per job folder (a folder with Hydra's ``.hydra/`` or our ``error.txt``)."""

    def is_job(d: Path) -> bool:
        return not d.name.startswith(".") and ((d / ".hydra").is_dir() or (d / "error.txt").is_file())

    dirs = [d for d in sweep_dir.iterdir() if d.is_dir() and is_job(d)]
    dirs.sort(key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))
    rows = [read_job(d) for d in dirs]
    mark_best(rows)
    return rows


def mark_best(rows: list[JobRow]) -> None:
    """Lowest objective for regression (MSE), highest for classification (accuracy)."""
    scored = [r for r in rows if r.status == "ok" and r.objective is not None and math.isfinite(r.objective)]
    if not scored:
        return
    higher = scored[0].task == "classification"
    best = max(scored, key=lambda r: r.objective) if higher else min(scored, key=lambda r: r.objective)
    best.best = True


def swept_keys(rows: list[JobRow]) -> tuple[list[str], list[str]]:
    """(keys whose value differs between jobs, overrides every job shares)."""
    values: dict[str, set[str]] = {}
    for r in rows:
        for o in r.overrides:
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    common = set.intersection(*(set(r.overrides) for r in rows)) if rows else set()
    varying = [k for k, v in values.items() if len(v) > 1 or any(k not in _keys(r) for r in rows)]
    shared = [o for o in rows[0].overrides if o in common] if rows else []
    return varying, shared


def _keys(row: JobRow) -> dict[str, str]:
    return dict(o.partition("=")[::2] for o in row.overrides)


def write_summary(sweep_dir: Path, rows: list[JobRow]) -> tuple[Path, Path]:
    """``sweep_summary.csv`` (every override and metric) and ``sweep_summary.md`` (for reading)."""
    varying, shared = swept_keys(rows)
    metric_keys = sorted({k for r in rows for k in r.metrics})
    csv_path, md_path = sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", "best", *varying, "objective", *metric_keys, "overrides", "error"])
        for r in rows:
            kv = _keys(r)
            writer.writerow(
                [r.job, r.status, "*" if r.best else "", *(kv.get(k, "") for k in varying),
                 _num(r.objective), *(_num(r.metrics.get(k)) for k in metric_keys),
                 " ".join(r.overrides), r.error]
            )  # fmt: skip
    ok = [r for r in rows if r.status == "ok"]
    direction = "highest" if ok and ok[0].task == "classification" else "lowest"
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(ok)} of {len(rows)} jobs finished; **best** ({direction} objective: the distilled student's "
        "best validation metric) is marked ★.",
        "",
    ]
    if shared:
        lines += ["Overrides shared by every job: `" + " ".join(shared) + "`", ""]
    header = ["job", "status", *varying, "objective", *metric_keys, "error"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        kv = _keys(r)
        job = f"**{r.job}** ★" if r.best else r.job
        cells = [job, r.status, *(kv.get(k, "") for k in varying), _num(r.objective)]
        cells += [_num(r.metrics.get(k)) for k in metric_keys] + [r.error.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


class SweepSummary(Callback):
    """Registered in ``configs/hydra/default.yaml``; Hydra calls it in the process that launched
    the sweep, after every job has returned."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        _, md_path = write_summary(sweep_dir, rows)
        failed = [(r.job, r.error or r.status) for r in rows if r.status != "ok"]
        LAST_SWEEP.jobs, LAST_SWEEP.failed, LAST_SWEEP.summary = len(rows), failed, md_path
        print(md_path.read_text())
        log.info("sweep summary: %s (%d jobs, %d failed)", md_path, len(rows), len(failed))
