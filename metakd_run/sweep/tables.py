"""A sweep's reports: ``sweep_summary.csv`` (every job), ``sweep_groups.csv`` (every setting, over
its seeds), ``sweep_summary.md`` (both, for reading); a study preset's ``study.md`` and ``study.png``."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from metakd_run.names import BASE, KD, LABELS, PAIR, STAGES, primary_metric, unit
from metakd_run.presentation.table import markdown_row, markdown_table, number
from metakd_run.sweep.groups import (
    Group,
    Stat,
    Verdict,
    fmt_stat,
    group,
    is_seed_sweep,
    mark_best,
    report_steps,
    swept_keys,
    teacher_line,
)
from metakd_run.sweep.jobs import JobRow, keys_of, stale_jobs


def write_summary(sweep_dir: Path, rows: list[JobRow]) -> tuple[Path, Path]:
    """``sweep_summary.csv`` (every job), ``sweep_groups.csv`` (every setting, over its seeds) and
    ``sweep_summary.md`` (both, for reading)."""
    varying, shared = swept_keys(rows)
    groups = group(rows)
    verdict = mark_best(rows, groups)
    seeded = is_seed_sweep(groups)
    metric_keys = sorted({k for r in rows for k in r.metrics})
    csv_path, md_path = sweep_dir / "sweep_summary.csv", sweep_dir / "sweep_summary.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "status", "best", *varying, "objective", *metric_keys, "overrides", "error"])
        for r in rows:
            kv = keys_of(r)
            writer.writerow(
                [r.job, r.status, "*" if r.best else "", *(kv.get(k, "") for k in varying),
                 number(r.objective), *(number(r.metrics.get(k)) for k in metric_keys),
                 " ".join(r.overrides), r.error]
            )  # fmt: skip
    setting_keys = [k for k in varying if k != "seed"]
    write_groups_csv(sweep_dir / "sweep_groups.csv", groups, setting_keys, metric_keys)
    ok = [r for r in rows if r.status == "ok"]
    task = ok[0].task if ok else None
    metric, higher = primary_metric(task or "regression")
    direction = "highest" if higher else "lowest"
    failed = sum(1 for r in rows if r.status == "failed")
    missing = sum(1 for r in rows if r.status == "no result")
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(ok)} of {len(rows)} jobs finished"
        + (f", {failed} failed" if failed else "")
        + (f", {missing} left no result" if missing else "")
        + f". The objective is the distilled student's best validation {metric}; the **best** "
        f"({direction} objective) is marked ★ only when its lead exceeds the noise.",
        "",
    ]
    if shared:
        lines += ["Overrides shared by every job: `" + " ".join(shared) + "`", ""]
    stale = stale_jobs(sweep_dir)
    if stale:
        lines += [
            f"Left out: job folders {', '.join(stale)}, left in this folder by an earlier sweep that "
            "this one did not run.",
            "",
        ]
    lines += [f"Teacher: {teacher_line(rows)}.", ""]
    if seeded:
        lines += group_table(groups, setting_keys, metric, higher, verdict)
        lines += [
            "## Jobs",
            "",
            "Seed sweep: each job is one seed of a setting; single seeds are never starred.",
            "",
        ]
    else:
        lines += [verdict.text, ""]
    header = ["job", "status", *varying, "objective", *metric_keys, "error"]
    lines += markdown_table(header)
    for r in rows:
        kv = keys_of(r)
        job = f"**{r.job}** ★" if r.best else r.job
        cells = [job, r.status, *(kv.get(k, "") for k in varying), number(r.objective)]
        cells += [number(r.metrics.get(k)) for k in metric_keys] + [r.error.replace("|", "\\|")]
        lines.append(markdown_row(cells))
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def group_table(
    groups: list[Group], keys: list[str], metric: str, higher: bool, verdict: Verdict
) -> list[str]:
    """The settings' markdown table: objective, each model's test metric, the paired difference."""
    steps = report_steps(groups)
    last = steps[-1] if steps else None
    lines = [
        "## Settings, over seeds",
        "",
        verdict.text,
        "",
        f"Mean ± Student-t 95% half-width over seeds. Test {metric}{unit(metric)} after {last} inner "
        f"step{'' if last == 1 else 's'} for each "
        f"model; **MKD − baseline** is the distilled minus the baseline student's test {metric} per seed "
        f"(same tasks), averaged; *wins*: seeds where the distilled student is better "
        f"({'higher accuracy' if higher else 'lower MSE'}).",
        "",
    ]
    header = [*keys, "seeds", "objective"]
    header += [f"{LABELS.get(m, m)} @{last}" for m in STAGES] if last is not None else []
    shown = [s for s in steps if s > 0] or steps
    header += [f"MKD − baseline @{s}" for s in shown]
    lines += markdown_table(header)
    for g in groups:
        kv = keys_of(g.jobs[0])
        name = [kv.get(k, "") for k in keys]
        if g.best and name:
            name[0] = f"**{name[0]}** ★"
        seeds = " ".join(str(s) for s in g.seeds)
        lost = len(g.jobs) - len(g.ok)
        cells = [
            *name,
            f"{len(g.ok)}" + (f" ({seeds})" if seeds else "") + (f", {lost} failed" if lost else ""),
        ]
        cells.append(fmt_stat(g.objective(), metric))
        if last is not None:
            cells += [fmt_stat(g.metric(m, last), metric) for m in STAGES]
        for s in shown:
            diff = Stat.of(g.differences(s))
            cells.append(
                f"{fmt_stat(diff, metric, signed=True)} ({g.wins(s, higher)}/{diff.n} wins)" if diff else ""
            )
        lines.append(markdown_row(cells))
    return lines + [""]


def write_groups_csv(path: Path, groups: list[Group], keys: list[str], metric_keys: list[str]) -> None:
    """One row per setting: n seeds, the objective and every final metric as mean and t half-width,
    and the distilled-minus-baseline difference per report step with its wins."""
    steps = report_steps(groups)
    higher = any(g.task == "classification" for g in groups)
    metric, _ = primary_metric("classification" if higher else "regression")
    averaged = [k for k in metric_keys if not k.startswith(f"paired/{PAIR}/")]
    diff_cols = [f"paired/{PAIR}/{metric}_step_{s}" for s in steps]
    header = [*keys, "seeds", "n", "failed", "best", "teacher", "objective_mean", "objective_ci95"]
    for c in diff_cols:
        header += [f"{c}_mean", f"{c}_ci95", f"{c}_wins"]
    for k in averaged:
        header += [f"{k}_mean", f"{k}_ci95"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g in groups:
            kv = keys_of(g.jobs[0])
            obj = g.objective()
            row = [*(kv.get(k, "") for k in keys), " ".join(str(s) for s in g.seeds), len(g.ok)]
            row += [len(g.jobs) - len(g.ok), "*" if g.best else "", g.teacher()]
            row += [number(obj.mean if obj else None), number(obj.ci95 if obj else None)]
            for s in steps:
                diff = Stat.of(g.differences(s))
                row += [number(diff.mean), number(diff.ci95), g.wins(s, higher)] if diff else ["", "", ""]
            for k in averaged:
                stat = Stat.of([j.metrics[k] for j in g.ok if k in j.metrics])
                row += [number(stat.mean), number(stat.ci95)] if stat else ["", ""]
            writer.writerow(row)


def study_rows(
    groups: list[Group], x_mode: str, step: int
) -> tuple[list[dict[str, Any]], list[tuple[Any, Group]]]:
    """``presentation.figures.study_figure`` rows (x, model, mean, ci95, n) and each setting's x
    value, in x order.

    ``x_mode`` ``student_parameters``: the student's parameter count (``summary.json``); otherwise the
    swept value, numeric where every value is a number, else the settings' names in sweep order.
    """
    xs: list[tuple[Any, Group]] = []
    for g in groups:
        if not g.ok:
            continue
        if x_mode == "student_parameters":
            counts = {j.parameters.get(KD, j.parameters.get(BASE)) for j in g.ok} - {None}
            if counts:
                xs.append((min(counts), g))  # type: ignore[type-var]
        else:
            xs.append((next(iter(g.values.values())) if len(g.values) == 1 else g.label, g))
    if xs and all(_is_number(x) for x, _ in xs):
        xs = sorted(((float(x), g) for x, g in xs), key=lambda t: t[0])
    rows = []
    for x, g in xs:
        for model in STAGES:
            stat = g.metric(model, step)
            if stat is not None:
                rows.append({"x": x, "model": model, "mean": stat.mean, "ci95": stat.ci95, "n": stat.n})
    return rows, xs


def _is_number(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


def write_study(sweep_dir: Path, rows: list[JobRow], study: Any) -> tuple[Path, Path | None]:
    """``study.md`` (one table per report step) and ``study.png`` (the figure's step)."""
    groups = group(rows)
    ok = [r for r in rows if r.status == "ok"]
    metric, higher = primary_metric((ok[0].task if ok else None) or "regression")
    steps = report_steps(groups)
    md_path, png_path = sweep_dir / "study.md", sweep_dir / "study.png"
    name, x_label = str(study.get("name")), str(study.get("x_label") or "setting")
    x_mode = str(study.get("x") or "setting")
    lines = [f"# Study `{name}`: {sweep_dir}", ""]
    if not steps:
        md_path.write_text("\n".join(lines + ["No job finished: nothing to show.", ""]))
        return md_path, None
    step = study.get("step")
    step = int(step) if step is not None and int(step) in steps else steps[-1]
    shown = "accuracy (%)" if metric == "accuracy" else "MSE"
    lines += [
        f"Test {shown} of each model, mean ± Student-t 95% half-width over seeds; **MKD − baseline** is the "
        f"distilled minus the baseline student's test {metric} per seed (same tasks), averaged; *wins*: "
        f"seeds where the distilled student is better ({'higher accuracy' if higher else 'lower MSE'}). "
        f"Teacher: {teacher_line(rows)}.",
        "",
    ]
    teacher_sizes = sorted({r.parameters["teacher"] for r in ok if "teacher" in r.parameters})
    if teacher_sizes:
        lines += [f"The teacher has {', '.join(str(n) for n in teacher_sizes)} parameters.", ""]
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        lines += [f"{len(failed)} of {len(rows)} jobs left no result (see sweep_summary.md).", ""]
    for s in [step] + [s for s in steps if s not in (0, step)]:
        _, xs = study_rows(groups, x_mode, s)
        lines += [f"## After {s} inner step{'' if s == 1 else 's'}", ""]
        header = [x_label, "setting", "seeds", *(LABELS.get(m, m) for m in STAGES), "MKD − baseline", "wins"]
        lines += markdown_table(header)
        for x, g in xs:
            diff = Stat.of(g.differences(s))
            cells = [_compact_x(x), g.label, str(len(g.ok))]
            cells += [fmt_stat(g.metric(m, s), metric) for m in STAGES]
            cells += [fmt_stat(diff, metric, signed=True), f"{g.wins(s, higher)}/{diff.n}" if diff else ""]
            lines.append(markdown_row(cells))
        lines.append("")
    fig_rows, xs = study_rows(groups, x_mode, step)
    png: Path | None = None
    if fig_rows:
        from metakd_run.presentation import figures

        categorical = not all(_is_number(x) for x, _ in xs)
        names = [x for x, _ in xs] if categorical else None
        fig = figures.study_figure_at(fig_rows, x_label, metric, higher, step, names)
        fig.savefig(png_path, dpi=110, bbox_inches="tight")
        figures.close(fig)
        png = png_path
        lines += [f"![{name}](study.png)", ""]
    md_path.write_text("\n".join(lines))
    return md_path, png


def _compact_x(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)
