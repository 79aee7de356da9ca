"""A run folder's files once it is evaluated: ``summary.json``, ``per_task.json``, ``timings.json``,
the figures; and the dashboard entries, in the order a run has always written them."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from metakd_run.checkpoint import write_bytes_atomic, write_text_atomic
from metakd_run.config import Config
from metakd_run.presentation import dashboard, figures


def write_run(
    run_dir: Path,
    tracker: Any,
    cfg: Config,
    summary: dict[str, Any],
    timings: dict[str, Any],
    records: dict[str, dict[str, Any]],
) -> None:
    """Present an evaluated run: ``records`` are the protocols' records, by protocol name."""
    for name, log_section in dashboard.SECTION_LOGGERS.items():
        if summary.get(name) and tracker is not None:
            log_section(tracker, summary[name])
    meta_test = records.get("meta_test", {})
    write_text_atomic(json.dumps(summary, indent=2, sort_keys=True) + "\n", run_dir / "summary.json")
    write_text_atomic(json.dumps(meta_test.get("per_task", {})) + "\n", run_dir / "per_task.json")
    write_text_atomic(json.dumps(timings, indent=2) + "\n", run_dir / "timings.json")
    fig = figures.test_tasks_figure(meta_test["examples"])
    save_png(fig, run_dir / "test_tasks.png")
    tracker.figure("eval/test_tasks", fig)
    curve_fig = figures.adaptation_figure(summary)
    save_png(curve_fig, run_dir / "adaptation.png")
    tracker.figure("eval/adaptation_curve", curve_fig)
    figures.close(fig, curve_fig)
    dashboard.log_curves(tracker, summary)
    dashboard.log_run(tracker, summary, cfg)
    tracker.close()


def save_png(fig: Any, path: Path) -> None:
    """A figure as a PNG through the atomic writer: a full disk leaves the previous file (or none),
    never half an image, and is the same one line as for a checkpoint."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(buffer.getbuffer(), path)
