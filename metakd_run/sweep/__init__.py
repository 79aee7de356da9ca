"""Sweeps: a Hydra callback that tabulates every job of a multirun when it ends.

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

:mod:`~metakd_run.sweep.callback` (the callback), :mod:`~metakd_run.sweep.jobs` (reading job
folders), :mod:`~metakd_run.sweep.groups` (settings and the verdict), :mod:`~metakd_run.sweep.tables`
(the CSV and markdown reports, the study). ``metakd_run.sweep.SweepSummary`` is the name
``configs/hydra/default.yaml`` registers.
"""

from metakd_run.sweep.callback import LAST_SWEEP, SweepOutcome, SweepSummary
from metakd_run.sweep.groups import Group, Stat, Verdict, collect, group, judge, mark_best
from metakd_run.sweep.jobs import JobRow, read_job, stale_jobs, stamp_job, start_sweep
from metakd_run.sweep.tables import write_study, write_summary

__all__ = [
    "LAST_SWEEP", "Group", "JobRow", "Stat", "SweepOutcome", "SweepSummary", "Verdict", "collect",
    "group", "judge", "mark_best", "read_job", "stale_jobs", "stamp_job", "start_sweep", "write_study",
    "write_summary",
]  # fmt: skip
