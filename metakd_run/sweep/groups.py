"""A sweep's settings and the verdict on them.

Jobs that differ only by ``seed`` are one *setting*. The variance that decides a claim lies
between training runs, so each setting is reported over its seeds: Student-t 95% intervals, the
distilled-minus-baseline difference seed by seed and how many seeds distillation wins. A best
setting is starred only when its lead exceeds that noise (:func:`judge`); a single seed of a seed
sweep is never starred.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metakd_run.evaluation.stats import t_interval
from metakd_run.names import BASE, KD, primary_metric
from metakd_run.presentation.table import stat_text
from metakd_run.sweep.jobs import JobRow, keys_of, read_jobs


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


def collect(sweep_dir: Path) -> list[JobRow]:
    """One row per job folder of this sweep (a folder with Hydra's ``.hydra/`` or our ``error.txt``)."""
    rows = read_jobs(sweep_dir)
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
        kv = keys_of(g.jobs[0])
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
        f"{fmt_stat(best, metric)}) is not separated from {failing[0][1]}"
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
        how = f"{other.label}, lead {fmt_stat(lead, metric, signed=True)} paired over {len(shared)} seeds"
        return lead.mean - lead.ci95 > 0, how, True
    a, b = leader.objective(), other.objective()
    assert a is not None and b is not None
    if a.ci95 is None or b.ci95 is None:
        return False, f"{other.label} (fewer than two seeds to compare)", True
    how = f"{other.label}, {fmt_stat(a, metric)} against {fmt_stat(b, metric)} over seeds"
    return sign * (a.mean - b.mean) > a.ci95 + b.ci95, how, True


def _compare_runs(leader: Group, other: Group, sign: float, metric: str) -> tuple[bool, str, bool]:
    """(separated, how, tested): one run each, the lead against the summed half-widths."""
    a, b = leader.scored[0], other.scored[0]
    lead = Stat(sign * (a.objective - b.objective), None, 1)  # type: ignore[operator]
    shown = fmt_stat(lead, metric, signed=True)
    if a.noise is None or b.noise is None:  # a summary.json without intervals: nothing to test against
        return True, f"job {b.job} ({other.label}), lead {shown}: summary.json holds no interval", False
    width = Stat(a.noise + b.noise, None, 1)
    how = (
        f"job {b.job} ({other.label}), lead {shown} against summed 95% half-widths {fmt_stat(width, metric)}"
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
    varying = [k for k, v in values.items() if len(v) > 1 or any(k not in keys_of(r) for r in rows)]
    shared = [o for o in rows[0].overrides if o in common] if rows else []
    return varying, shared


def report_steps(groups: list[Group]) -> list[int]:
    return sorted({s for g in groups for j in g.ok for steps in j.primary.values() for s in steps})


def fmt_stat(stat: Stat | None, metric: str, signed: bool = False) -> str:
    """Accuracy in percent (differences in points), MSE as it is; no interval below two seeds."""
    return "" if stat is None else stat_text(stat.mean, stat.ci95, metric, signed)
