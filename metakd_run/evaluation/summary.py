"""Reading a summary: its final metrics flat (the HParams tab, the sweep tables) and the objective a
sweeper optimises. Pure functions of the ``summary.json`` dict: the presentation and the sweep read them."""

from __future__ import annotations

from typing import Any

from metakd_run.config import Stage
from metakd_run.names import primary_metric

TRAINING_KEYS = ("best_val", "val_metric", "history")  # what of training the summary keeps


def flat_metrics(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``<prefix><model>/<metric>_step_<k>`` and the paired comparisons: the final metrics, flat,
    for the HParams tab and the sweep tables. Non-finite entries are left out."""
    flat: dict[str, float] = {}
    for name, model in summary.get("models", {}).items():
        for metric, entry in model.get("metrics", {}).items():
            for key, value in entry.items():
                if key.startswith("step_") and value["mean"] is not None:
                    flat[f"{prefix}{name}/{metric}_{key}"] = value["mean"]
    comp = summary.get("comparisons", {})
    for pair, steps in comp.get("pairs", {}).items():
        for key, value in steps.items():
            if value["mean"] is not None:
                flat[f"{prefix}paired/{pair}/{comp['metric']}_{key}"] = value["mean"]
    for key, value in comp.get("gap_closed", {}).items():
        if value["value"] is not None:
            flat[f"{prefix}gap_closed/{comp['metric']}_{key}"] = value["value"]
    return flat


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The HParams tab's metric columns, under ``final/`` (a prefix the Scalars page can filter)."""
    return flat_metrics(summary, prefix="final/")


def objective_value(summary: dict[str, Any]) -> float:
    """What a sweeper optimises: the distilled student's (else the teacher's) validation metric."""
    models = summary["models"]
    name = Stage.student_kd.value if Stage.student_kd in models else Stage.teacher.value
    best = models[name]["training"].get("best_val")
    if best is None:
        entry = models[name]["metrics"][primary_metric(summary.get("task"))[0]]
        best = entry["curve"]["mean"][-1]
    return float("nan") if best is None else float(best)
