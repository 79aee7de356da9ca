"""Tables: aligned text for the console, markdown for the sweep and study reports, and the table a
run ends with (each model's size and test metric per step, then the paired comparisons, then each
protocol's own table)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metakd_run.names import LAKE_MODES, label, percent, primary_metric, scale, unit


def text_table(rows: list[list[str]]) -> list[str]:
    """Rows as aligned text lines (first column left, the rest right) with a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_table(header: list[str], rows: list[list[str]] = ()) -> list[str]:  # type: ignore[assignment]
    """A markdown table's lines: the header, its rule, then the rows."""
    return [markdown_row(header), "|" + "---|" * len(header), *(markdown_row(r) for r in rows)]


def number(v: float | None) -> str:
    """A number for a CSV or markdown cell: six significant digits, empty when there is none."""
    return "" if v is None else f"{v:.6g}"


def stat_text(mean: float, ci95: float | None, metric: str, signed: bool = False) -> str:
    """A mean over seeds with its half-width: accuracy in percent (differences in points), MSE as it
    is; no interval below two seeds."""
    factor = scale(metric)
    shown = mean * factor
    sign = "+" if signed else ""
    text = f"{shown:{sign}.2f}" if factor != 1.0 else f"{shown:{sign}.4g}"
    if ci95 is None:
        return text
    ci = ci95 * factor
    return f"{text} ± {ci:.2f}" if factor != 1.0 else f"{text} ± {ci:.2g}"


def _cell(entry: dict[str, Any], factor: float, diverged: int | None, signed: bool = False) -> str:
    if entry.get("mean") is None:
        return f"diverged (step {diverged})" if diverged is not None else "n/a"
    sign = "+" if signed else ""
    return f"{entry['mean'] * factor:{sign}.3f} ± {entry['ci95'] * factor:.3f}"


def run_table(summary: dict[str, Any]) -> str:
    """The console table of a finished run, from its summary alone."""
    metric, _ = primary_metric(summary["task"])
    models = summary["models"]
    first = next(iter(models.values()))
    steps = [k for k in first["metrics"][metric] if k.startswith("step_")]
    factor = scale(metric)
    header = ["model", "params"] + [f"{metric}{unit(metric)} @ {s.split('_')[1]} steps" for s in steps]
    rows = [header]
    for model in models.values():
        entry = model["metrics"][metric]
        cells = [model["label"], f"{model['parameters']:,}"]
        cells += [_cell(entry[s], factor, entry.get("diverged_at_step")) for s in steps]
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
            rows.append([name, ""] + [_cell(by_step[s], factor, None, signed=True) for s in steps])
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
    for name, present in SECTION_TABLES.items():  # each protocol's own table, when it ran
        if summary.get(name):
            out += ["", present(summary[name])]
    return "\n".join(out)


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    print()
    print(run_table(summary))
    print(f"\nrun folder: {run_dir}  (summary.json, per_task.json, checkpoints/, *.png, TensorBoard events)")


# --- Lake et al.'s runs (the lake_runs section) ---------------------------------------------------------
def _pct(entry: dict[str, Any], signed: bool = False) -> str:
    half = "n/a" if entry["ci95"] is None else percent(entry["ci95"])
    return f"{percent(entry['mean'], signed)} ± {half}"


def lake_table(section: dict[str, Any]) -> str:
    """Means with intervals per model and mode, the students' paired difference, the published
    figures, then each run's error in the fair mode."""
    modes = [m for m in LAKE_MODES if m in section["modes"]]  # columns in this order, also from summary.json
    n, ways, steps = len(section["runs"]), section["ways"], section["steps"]
    out = [
        f"Lake et al.'s {n} one-shot runs ({ways}-way, within alphabet, {steps} inner steps): error % "
        f"(mean ± 95% CI over runs, Student t)"
    ]
    rows = [["model", *(f"{m}{' (fair)' if m == section['fair'] else ''}" for m in modes)]]
    for model in section["models"].values():
        rows.append([model["label"], *(_pct(model["error"][m]) for m in modes)])
    for pair, by_mode in section["paired"].items():
        a, b = pair.split("-")
        rows.append([f"{label(a)} - {label(b)} (paired)", *(_pct(by_mode[m], signed=True) for m in modes)])
    out += text_table(rows)
    published = ", ".join(f"{who} {percent(e)}" for who, e in section["published_error"].items())
    out.append(f"published error %: {published}")
    out += [f"  {m}: {d}" for m, d in section["modes"].items()]
    header = ["error % per run (fair)", *(r.removeprefix("run") for r in section["runs"])]
    rows = [header]
    for model in section["models"].values():
        per_run = model["error"][section["fair"]]["per_run"]
        rows.append([model["label"], *(percent(e, digits=0) for e in per_run)])
    out += ["", *text_table(rows)]
    return "\n".join(out)


# A protocol's section -> its console table (a protocol without one appears in summary.json only).
SECTION_TABLES = {"lake_runs": lake_table}
