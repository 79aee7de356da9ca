"""The table a run ends with: each model's size and test metric per step, then the paired comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metakd_run.results import label, primary_metric


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned text lines (first column left, the rest right) with a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _cell(entry: dict[str, Any], scale: float, diverged: int | None, signed: bool = False) -> str:
    if entry.get("mean") is None:
        return f"diverged (step {diverged})" if diverged is not None else "n/a"
    sign = "+" if signed else ""
    return f"{entry['mean'] * scale:{sign}.3f} ± {entry['ci95'] * scale:.3f}"


def format_table(summary: dict[str, Any]) -> str:
    metric, _ = primary_metric(summary["task"])
    models = summary["models"]
    first = next(iter(models.values()))
    steps = [k for k in first["metrics"][metric] if k.startswith("step_")]
    scale = 100.0 if metric == "accuracy" else 1.0
    unit = " (%)" if metric == "accuracy" else ""
    header = ["model", "params"] + [f"{metric}{unit} @ {s.split('_')[1]} steps" for s in steps]
    rows = [header]
    for model in models.values():
        entry = model["metrics"][metric]
        cells = [model["label"], f"{model['parameters']:,}"]
        cells += [_cell(entry[s], scale, entry.get("diverged_at_step")) for s in steps]
        rows.append(cells)
    ev = summary["eval"]
    title = (
        f"{summary['dataset']}: query {metric} on {ev['tasks']} {ev['split']} tasks "
        f"(mean ± 95% CI), after 0..{ev['steps']} inner steps"
    )
    out = [title, *text_table(rows)]
    comp = summary.get("comparisons", {})
    if comp.get("pairs"):
        rows = [["paired difference (same tasks)", ""] + [f"@ {s.split('_')[1]} steps" for s in steps]]
        for pair, by_step in comp["pairs"].items():
            a, b = pair.split("-")
            name = f"{label(a)} - {label(b)}"
            rows.append([name, ""] + [_cell(by_step[s], scale, None, signed=True) for s in steps])
        gap = comp.get("gap_closed") or {}
        if gap:
            cells = []
            for s in steps:
                g = gap[s]
                cells.append(
                    "n/a"
                    if g["value"] is None
                    else f"{100 * g['value']:.0f}% [{100 * (g['ci95_low'] or 0):.0f}, "
                    f"{100 * (g['ci95_high'] or 0):.0f}]"
                )
            rows.append(["gap closed by distillation (bootstrap CI)", ""] + cells)
        out += ["", *text_table(rows)]
    if summary.get("lake_runs"):  # eval.lake_runs: Lake et al.'s 20 one-shot runs
        from metakd_run.lake import format_table as format_lake_table

        out += ["", format_lake_table(summary["lake_runs"])]
    return "\n".join(out)


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    print()
    print(format_table(summary))
    print(f"\nrun folder: {run_dir}  (summary.json, per_task.json, checkpoints/, *.png, TensorBoard events)")
