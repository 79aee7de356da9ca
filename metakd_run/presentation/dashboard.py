"""Dashboard entries (TensorBoard, or MLflow): what a run's tracker receives once it is evaluated.

Reads the summary and the protocols' sections; the tracker is :class:`metakd_run.tracking.Tracker`
(or anything with its ``scalars``, ``figure``, ``text``, ``hparams`` and ``close``).
"""

from __future__ import annotations

from typing import Any

from metakd_run.config import Config, to_yaml
from metakd_run.evaluation.summary import final_metrics
from metakd_run.presentation.table import lake_table


def log_curves(tracker: Any, summary: dict[str, Any]) -> None:
    """Each model's test metric against the inner step."""
    for name, model in summary["models"].items():
        for metric, entry in model["metrics"].items():
            for step, value in zip(entry["curve"]["steps"], entry["curve"]["mean"]):
                if value is not None:
                    tracker.scalars(f"{name}/test_{metric}_by_step", {"mean": value}, step)


def log_run(tracker: Any, summary: dict[str, Any], cfg: Config) -> None:
    """The config as text, and the HParams row (the key settings, the final metrics)."""
    tracker.text("config", "```yaml\n" + to_yaml(cfg) + "\n```")
    tracker.hparams(summary["hparams"], final_metrics(summary))


def log_lake_runs(tracker: Any, section: dict[str, Any]) -> None:
    """Lake's runs: the means, each run's error (x = run number), the published figures, and the
    console table as text."""
    for name, model in section["models"].items():
        tracker.scalars(f"{name}/lake_error", {m: e["mean"] for m, e in model["error"].items()}, 0)
        for i in range(len(section["runs"])):
            by_mode = {m: e["per_run"][i] for m, e in model["error"].items()}
            tracker.scalars(f"{name}/lake_error_by_run", by_mode, i + 1)
    for pair, by_mode in section["paired"].items():
        tracker.scalars(f"paired/{pair}/lake_error", {m: d["mean"] for m, d in by_mode.items()}, 0)
    tracker.scalars("lake_published_error", section["published_error"], 0)
    tracker.text("eval/lake_runs", "```\n" + lake_table(section) + "\n```")


# A protocol's section -> its dashboard entries (a protocol without any appears in summary.json only).
SECTION_LOGGERS = {"lake_runs": log_lake_runs}
