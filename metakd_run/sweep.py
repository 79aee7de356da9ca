"""The sweep summary: a Hydra callback that tabulates every job of a multirun when it ends.

Whatever the launcher (basic, joblib, submitit) or sweeper (grid, Optuna), each job leaves its
overrides in ``<job>/.hydra/overrides.yaml``, its config in ``.hydra/config.yaml`` and either
``summary.json`` or ``error.txt`` in its folder, so the tables are built from the folders, not
from the launcher's return values: a job that failed is a row with its error.

Jobs that differ only by ``seed`` are one *setting*. The variance that decides a claim lies
between training runs, so each setting is reported over its seeds: Student-t 95% intervals, the
distilled-minus-baseline difference seed by seed and how many seeds distillation wins. A best
setting is starred only when its lead exceeds that noise (:func:`judge`); a single seed of a seed
sweep is never starred. A study preset (``study=``) closes its sweep with ``study.md`` and
``study.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from metakd_run.evaluation.stats import t_interval
from metakd_run.evaluation.summary import flat_metrics
from metakd_run.names import LABELS, primary_metric

log = logging.getLogger(__name__)

MODELS = ("teacher", "student_kd", "student_base")
KD, BASE = "student_kd", "student_base"
PAIR = f"{KD}-{BASE}"


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


@dataclass
class Stat:
    """A mean over seeds with its Student-t 95% half-width (``None`` below two seeds)."""

    mean: float
    ci95: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        vals = [v for v in values if v is not None and math.isfinite(v)]
        if not vals:
            return None
        mean, ci = t_interval(vals)
        return cls(mean, ci if math.isfinite(ci) else None, len(vals))


@dataclass
class Group:
    """A setting: the jobs whose overrides agree except for ``seed``."""

    setting: tuple[str, ...]
    jobs: list[JobRow]
    best: bool = False
    values: dict[str, str] = field(default_factory=dict)  # the swept keys that tell it from the others

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values.items()) or "(every job)"

    @property
    def ok(self) -> list[JobRow]:
        return [j for j in self.jobs if j.status == "ok"]

    @property
    def scored(self) -> list[JobRow]:
        return [j for j in self.jobs if j.scored]

    @property
    def seeds(self) -> list[int | None]:
        return [j.seed for j in self.ok]

    @property
    def task(self) -> str | None:
        return next((j.task for j in self.ok if j.task), None)

    def objective(self) -> Stat | None:
        return Stat.of([j.objective for j in self.scored])  # type: ignore[misc]

    def metric(self, model: str, step: int) -> Stat | None:
        return Stat.of([j.primary[model][step] for j in self.ok if step in j.primary.get(model, {})])

    def differences(self, step: int) -> list[float]:
        """Per seed: the distilled minus the baseline student's test metric at ``step``."""
        return [
            j.primary[KD][step] - j.primary[BASE][step]
            for j in self.ok
            if step in j.primary.get(KD, {}) and step in j.primary.get(BASE, {})
        ]

    def wins(self, step: int, higher: bool) -> int:
        """Seeds where the distilled student is better: higher accuracy, lower MSE."""
        return sum(1 for d in self.differences(step) if (d > 0 if higher else d < 0))

    def teacher(self) -> str:
        return teacher_line(self.jobs)


def teacher_line(jobs: list[JobRow]) -> str:
    """Whether the teacher was trained per seed or shared, from each job's saved config."""
    ok = [j for j in jobs if j.status == "ok"] or jobs
    given = {j.teacher_checkpoint for j in ok if j.teacher_checkpoint}
    if given and len(given) == len({j.seed for j in ok}) > 1:
        return "one given per seed (train.teacher_checkpoint)"
    if given:
        return (
            "one for every seed, train.teacher_checkpoint=" + ", ".join(sorted(given))
            + " (the teacher's own seed variance is not in the intervals)"
        )  # fmt: skip
    if any(j.teacher_cache for j in ok):
        reused = sum(1 for j in ok if j.teacher_source.startswith("shared"))
        return (
            f"trained once per seed and teacher setting, kept in train.teacher_cache "
            f"({reused} of {len(ok)} jobs reused a cached one)"
        )
    return "trained in every job (per seed and setting)"


@dataclass
class Verdict:
    """Which setting (if any) is ahead of the noise, and the sentence that says why."""

    best: Group | None
    text: str


def read_job(job_dir: Path) -> JobRow:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    row = JobRow(job=job_dir.name, overrides=overrides, status="no result")
    config = _raw_config(job_dir / ".hydra" / "config.yaml")
    train = config.get("train") or {}
    row.teacher_checkpoint, row.teacher_cache = train.get("teacher_checkpoint"), train.get("teacher_cache")
    seed = config.get("seed", _keys(row).get("seed"))
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


def start_sweep(sweep_dir: Path) -> str:
    """Give the sweep about to launch a fresh id; each of its jobs copies it into its folder
    (:func:`stamp_job`), so the summary can leave out the folders of an earlier sweep launched into
    the same ``hydra.sweep.dir``. A sweep run again to continue stamps every job again."""
    import uuid

    sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep_id = uuid.uuid4().hex
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
    """True unless the sweep folder has an id and the job folder was last run by another sweep."""
    try:
        sweep_id = (sweep_dir / SWEEP_ID).read_text()
    except OSError:
        return True  # a sweep folder from before ids, or read from elsewhere: every job counts
    try:
        return (job_dir / SWEEP_ID).read_text() == sweep_id
    except OSError:
        return False


def stale_jobs(sweep_dir: Path) -> list[str]:
    """Job folders that an earlier sweep into the same folder left and this sweep did not run."""
    return [d.name for d in _job_dirs(sweep_dir) if not _of_this_sweep(sweep_dir, d)]


def collect(sweep_dir: Path) -> list[JobRow]:
    """One row per job folder of this sweep (a folder with Hydra's ``.hydra/`` or our ``error.txt``)."""
    dirs = [d for d in _job_dirs(sweep_dir) if _of_this_sweep(sweep_dir, d)]
    rows = [read_job(d) for d in dirs]
    mark_best(rows)
    return rows


def group(rows: list[JobRow]) -> list[Group]:
    """Settings in the order of their first job: jobs whose overrides agree except for ``seed``."""
    groups: dict[tuple[str, ...], Group] = {}
    for r in rows:
        key = tuple(sorted(o for o in r.overrides if o.partition("=")[0] != "seed"))
        groups.setdefault(key, Group(key, [])).jobs.append(r)
    varying = [k for k in swept_keys(rows)[0] if k != "seed"]
    for g in groups.values():
        kv = _keys(g.jobs[0])
        g.values = {k: kv[k] for k in varying if k in kv}
    return list(groups.values())


def is_seed_sweep(groups: list[Group]) -> bool:
    return any(len(g.jobs) > 1 for g in groups)


def mark_best(rows: list[JobRow], groups: list[Group] | None = None) -> Verdict:
    """Star the best setting if its lead exceeds the noise; a job only when each setting is one job."""
    groups = group(rows) if groups is None else groups
    for r in rows:
        r.best = False
    verdict = judge(groups)
    if verdict.best is not None and not is_seed_sweep(groups):
        verdict.best.jobs[0].best = True
    return verdict


def judge(groups: list[Group]) -> Verdict:
    """The best setting by its mean objective, starred only when it is ahead of every other one.

    With seeds: seed s of every setting shares the teacher and the task streams, so settings are
    compared seed by seed: the 95% t-interval of the leader's lead over the seeds both share must
    exclude zero (with fewer than two shared seeds, the two settings' own intervals must not
    overlap). With one run per setting: the lead must exceed the two runs' summed 95% half-widths
    (:func:`objective_noise`), i.e. their intervals must not overlap.
    """
    for g in groups:
        g.best = False
    scored = [g for g in groups if g.scored]
    if not scored:
        return Verdict(None, "No job finished with a finite objective.")
    higher = scored[0].task == "classification"
    metric, _ = primary_metric(scored[0].task or "regression")
    sign = 1.0 if higher else -1.0
    if len(scored) == 1:
        if len(groups) == 1:
            return Verdict(None, "One setting: nothing to compare.")
        scored[0].best = True
        return Verdict(scored[0], f"★ {scored[0].label}: the only setting with a result.")
    ranked = sorted(scored, key=lambda g: -sign * g.objective().mean)  # type: ignore[union-attr]
    leader, rest = ranked[0], ranked[1:]
    seeds = len(leader.scored) > 1 or any(len(g.scored) > 1 for g in rest)
    compare = _compare_seeds if seeds else _compare_runs
    checks = [compare(leader, g, sign, metric) for g in rest]
    failing = [c for c in checks if not c[0]]
    best = leader.objective()
    assert best is not None
    who = leader.label if seeds else f"job {leader.scored[0].job}, {leader.label}"
    if not failing:
        leader.best = True
        how = "beyond the noise" if all(c[2] for c in checks) else "(not all of them tested against noise)"
        return Verdict(leader, f"★ **{who}** is ahead of every other setting {how}; closest: {checks[0][1]}.")
    return Verdict(
        None,
        f"No setting is ahead of the noise: the best{' mean' if seeds else ''} objective ({who}: "
        f"{_fmt_stat(best, metric)}) is not separated from {failing[0][1]}"
        + (f" (and {len(failing) - 1} more)" if len(failing) > 1 else "")
        + ".",
    )


def _compare_seeds(leader: Group, other: Group, sign: float, metric: str) -> tuple[bool, str, bool]:
    """(separated, how, tested): paired over the shared seeds, else the two intervals."""
    mine = {j.seed: j.objective for j in leader.scored}
    theirs = {j.seed: j.objective for j in other.scored}
    shared = sorted(s for s in mine if s in theirs and s is not None)
    if len(shared) >= 2:
        lead = Stat.of([sign * (mine[s] - theirs[s]) for s in shared])  # type: ignore[operator]
        assert lead is not None and lead.ci95 is not None
        how = f"{other.label}, lead {_fmt_stat(lead, metric, signed=True)} paired over {len(shared)} seeds"
        return lead.mean - lead.ci95 > 0, how, True
    a, b = leader.objective(), other.objective()
    assert a is not None and b is not None
    if a.ci95 is None or b.ci95 is None:
        return False, f"{other.label} (fewer than two seeds to compare)", True
    how = f"{other.label}, {_fmt_stat(a, metric)} against {_fmt_stat(b, metric)} over seeds"
    return sign * (a.mean - b.mean) > a.ci95 + b.ci95, how, True


def _compare_runs(leader: Group, other: Group, sign: float, metric: str) -> tuple[bool, str, bool]:
    """(separated, how, tested): one run each, the lead against the summed half-widths."""
    a, b = leader.scored[0], other.scored[0]
    lead = Stat(sign * (a.objective - b.objective), None, 1)  # type: ignore[operator]
    shown = _fmt_stat(lead, metric, signed=True)
    if a.noise is None or b.noise is None:  # a summary.json without intervals: nothing to test against
        return True, f"job {b.job} ({other.label}), lead {shown}: summary.json holds no interval", False
    width = Stat(a.noise + b.noise, None, 1)
    how = (
        f"job {b.job} ({other.label}), lead {shown} against summed 95% half-widths {_fmt_stat(width, metric)}"
    )
    return lead.mean > width.mean, how, True


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


def report_steps(groups: list[Group]) -> list[int]:
    return sorted({s for g in groups for j in g.ok for steps in j.primary.values() for s in steps})


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
            kv = _keys(r)
            writer.writerow(
                [r.job, r.status, "*" if r.best else "", *(kv.get(k, "") for k in varying),
                 _num(r.objective), *(_num(r.metrics.get(k)) for k in metric_keys),
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
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        kv = _keys(r)
        job = f"**{r.job}** ★" if r.best else r.job
        cells = [job, r.status, *(kv.get(k, "") for k in varying), _num(r.objective)]
        cells += [_num(r.metrics.get(k)) for k in metric_keys] + [r.error.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def group_table(
    groups: list[Group], keys: list[str], metric: str, higher: bool, verdict: Verdict
) -> list[str]:
    """The settings' markdown table: objective, each model's test metric, the paired difference."""
    steps = report_steps(groups)
    last = steps[-1] if steps else None
    unit = " (%)" if metric == "accuracy" else ""
    lines = [
        "## Settings, over seeds",
        "",
        verdict.text,
        "",
        f"Mean ± Student-t 95% half-width over seeds. Test {metric}{unit} after {last} inner "
        f"step{'' if last == 1 else 's'} for each "
        f"model; **MKD − baseline** is the distilled minus the baseline student's test {metric} per seed "
        f"(same tasks), averaged; *wins*: seeds where the distilled student is better "
        f"({'higher accuracy' if higher else 'lower MSE'}).",
        "",
    ]
    header = [*keys, "seeds", "objective"]
    header += [f"{LABELS.get(m, m)} @{last}" for m in MODELS] if last is not None else []
    shown = [s for s in steps if s > 0] or steps
    header += [f"MKD − baseline @{s}" for s in shown]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        kv = _keys(g.jobs[0])
        name = [kv.get(k, "") for k in keys]
        if g.best and name:
            name[0] = f"**{name[0]}** ★"
        seeds = " ".join(str(s) for s in g.seeds)
        lost = len(g.jobs) - len(g.ok)
        cells = [
            *name,
            f"{len(g.ok)}" + (f" ({seeds})" if seeds else "") + (f", {lost} failed" if lost else ""),
        ]
        cells.append(_fmt_stat(g.objective(), metric))
        if last is not None:
            cells += [_fmt_stat(g.metric(m, last), metric) for m in MODELS]
        for s in shown:
            diff = Stat.of(g.differences(s))
            cells.append(
                f"{_fmt_stat(diff, metric, signed=True)} ({g.wins(s, higher)}/{diff.n} wins)" if diff else ""
            )
        lines.append("| " + " | ".join(cells) + " |")
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
            kv = _keys(g.jobs[0])
            obj = g.objective()
            row = [*(kv.get(k, "") for k in keys), " ".join(str(s) for s in g.seeds), len(g.ok)]
            row += [len(g.jobs) - len(g.ok), "*" if g.best else "", g.teacher()]
            row += [_num(obj.mean if obj else None), _num(obj.ci95 if obj else None)]
            for s in steps:
                diff = Stat.of(g.differences(s))
                row += [_num(diff.mean), _num(diff.ci95), g.wins(s, higher)] if diff else ["", "", ""]
            for k in averaged:
                stat = Stat.of([j.metrics[k] for j in g.ok if k in j.metrics])
                row += [_num(stat.mean), _num(stat.ci95)] if stat else ["", ""]
            writer.writerow(row)


# --- studies -----------------------------------------------------------------------------------------


def study_rows(
    groups: list[Group], x_mode: str, step: int
) -> tuple[list[dict[str, Any]], list[tuple[Any, Group]]]:
    """``plots.study_figure`` rows (x, model, mean, ci95, n) and each setting's x value, in x order.

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
        for model in MODELS:
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
    unit = "accuracy (%)" if metric == "accuracy" else "MSE"
    lines += [
        f"Test {unit} of each model, mean ± Student-t 95% half-width over seeds; **MKD − baseline** is the "
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
        header = [x_label, "setting", "seeds", *(LABELS.get(m, m) for m in MODELS), "MKD − baseline", "wins"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for x, g in xs:
            diff = Stat.of(g.differences(s))
            cells = [_compact_x(x), g.label, str(len(g.ok))]
            cells += [_fmt_stat(g.metric(m, s), metric) for m in MODELS]
            cells += [_fmt_stat(diff, metric, signed=True), f"{g.wins(s, higher)}/{diff.n}" if diff else ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    fig_rows, xs = study_rows(groups, x_mode, step)
    png: Path | None = None
    if fig_rows:
        from metakd_run.outputs import figures as plots

        categorical = not all(_is_number(x) for x, _ in xs)
        if categorical:  # the settings' names at positions 0..n-1 (a linear axis)
            at = {x: i for i, (x, _) in enumerate(xs)}
            fig_rows = [{**r, "x": at[r["x"]]} for r in fig_rows]
        fig = plots.study_figure(fig_rows, x_label, metric, higher)
        ax = fig.axes[0]
        steps_text = f" after {step} inner step{'' if step == 1 else 's'} against "
        ax.set_title(ax.get_title().replace(" against ", steps_text, 1), fontsize=9)
        if categorical:  # unordered settings: points and bars, no connecting lines
            for line in ax.get_lines():
                line.set_linestyle("none")
            ax.set_xticks(list(at.values()), [str(x) for x in at], rotation=30, ha="right", fontsize=7)
            fig.tight_layout()
        fig.savefig(png_path, dpi=110, bbox_inches="tight")
        plots.close(fig)
        png = png_path
        lines += [f"![{name}](study.png)", ""]
    md_path.write_text("\n".join(lines))
    return md_path, png


def _compact_x(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# --- number formats ----------------------------------------------------------------------------------


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.6g}"


def _fmt_stat(stat: Stat | None, metric: str, signed: bool = False) -> str:
    """Accuracy in percent (differences in points), MSE as it is; no interval below two seeds."""
    if stat is None:
        return ""
    scale = 100.0 if metric == "accuracy" else 1.0
    mean = stat.mean * scale
    sign = "+" if signed else ""
    text = f"{mean:{sign}.2f}" if scale != 1.0 else f"{mean:{sign}.4g}"
    if stat.ci95 is None:
        return text
    ci = stat.ci95 * scale
    return f"{text} ± {ci:.2f}" if scale != 1.0 else f"{text} ± {ci:.2g}"


class SweepSummary(Callback):
    """Registered in ``configs/hydra/default.yaml``; Hydra calls it in the process that launched
    the sweep, after every job has returned."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        start_sweep(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        _, md_path = write_summary(sweep_dir, rows)
        failed = [(r.job, r.error or r.status) for r in rows if r.status != "ok"]
        LAST_SWEEP.jobs, LAST_SWEEP.failed, LAST_SWEEP.summary = len(rows), failed, md_path
        print(md_path.read_text())
        study = OmegaConf.select(config, "study", default=None)
        if study is not None and study.get("name"):
            study_md, png = write_study(sweep_dir, rows, study)
            print(study_md.read_text())
            log.info("study: %s%s", study_md, f", {png}" if png else "")
        log.info("sweep summary: %s (%d jobs, %d failed)", md_path, len(rows), len(failed))
