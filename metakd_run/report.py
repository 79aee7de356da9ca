"""The table a run ends with: each model's size and test metric (mean ± 95% CI) per step."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def format_table(summary: dict[str, Any]) -> str:
    metric = "accuracy" if summary["task"] == "classification" else "mse"
    models = summary["models"]
    first = next(iter(models.values()))
    steps = [k for k in first["metrics"][metric] if k.startswith("step_")]
    scale = 100.0 if metric == "accuracy" else 1.0
    unit = " (%)" if metric == "accuracy" else ""
    header = ["model", "params"] + [f"{metric}{unit} @ {s.split('_')[1]} steps" for s in steps]
    rows = [header]
    for model in models.values():
        cells = [model["label"], f"{model['parameters']:,}"]
        for s in steps:
            e = model["metrics"][metric][s]
            cells.append(f"{e['mean'] * scale:.3f} ± {e['ci95'] * scale:.3f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ev = summary["eval"]
    title = (
        f"{summary['dataset']}: query {metric} on {ev['tasks']} {ev['split']} tasks "
        f"(mean ± 95% CI), after 0..{ev['steps']} inner steps"
    )
    return "\n".join([title, *lines])


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    print()
    print(format_table(summary))
    print(f"\nrun folder: {run_dir}  (summary.json, checkpoints/, *.png, TensorBoard events)")
