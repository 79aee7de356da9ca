"""Meta-test: fixed tasks, adaptation curves, and the statistics that match the design.

Every model is scored on the same fixed tasks, so models are compared task by task (paired
differences), not by two intervals computed apart. Across training seeds the unit is the seed:
means get a Student-t interval over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.maml import MAML

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)  # fmt: skip


def t_quantile(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def fixed_tasks(source, num_tasks: int, seed: int, chunk: int) -> list[TaskBatch]:  # noqa: ANN001
    """The same ``num_tasks`` tasks for every model and every run with this seed, in chunks."""
    g = torch.Generator().manual_seed(seed)
    sizes = [min(chunk, num_tasks - i) for i in range(0, num_tasks, chunk)] if chunk > 0 else [num_tasks]
    return [source.sample(n, g) for n in sizes]


def mean_ci(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of the normal 95% interval, 1.96 std / sqrt(n), as the papers report."""
    v = values.double()
    n = v.numel()
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return float(v.mean()), 1.96 * std / math.sqrt(n)


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of the Student-t 95% interval (few units, e.g. seeds)."""
    v = torch.tensor(list(values), dtype=torch.float64)
    n = v.numel()
    if n < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), t_quantile(n - 1) * float(v.std(unbiased=True)) / math.sqrt(n)


def paired(a: Tensor, b: Tensor) -> dict[str, float]:
    """``a - b`` per task: mean, 95% half-width, and the share of tasks where ``a`` is larger."""
    d = a.double() - b.double()
    mean, ci = mean_ci(d)
    return {"mean": mean, "ci95": ci, "share_positive": float((d > 0).double().mean())}


def gap_closed(
    teacher: Tensor, distilled: Tensor, baseline: Tensor, higher_is_better: bool, resamples: int = 2000
) -> dict[str, float]:
    """Share of the baseline-to-teacher gap that distillation closes, with a bootstrap 95% CI.

    ``(baseline - distilled) / (baseline - teacher)`` for losses; the same with signs flipped for
    accuracies (``(distilled - baseline) / (teacher - baseline)``). Tasks are resampled together,
    so the pairing is kept; the generator is fixed, so the interval is reproducible.
    """
    t, s, b = (x.double() for x in (teacher, distilled, baseline))
    sign = 1.0 if higher_is_better else -1.0

    def ratio(idx: Tensor | None) -> Tensor:
        tt, ss, bb = (x if idx is None else x[..., idx] for x in (t, s, b))
        return sign * (ss.mean(-1) - bb.mean(-1)) / (sign * (tt.mean(-1) - bb.mean(-1)))

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(t.numel(), (resamples, t.numel()), generator=g)
    boot = ratio(idx)
    boot = boot[torch.isfinite(boot)]
    lo, hi = (torch.quantile(boot, q).item() for q in (0.025, 0.975)) if boot.numel() else (math.nan,) * 2
    return {"value": float(ratio(None)), "ci95_low": lo, "ci95_high": hi}


def adaptation_curves(
    learner: MAML,
    tasks: Sequence[TaskBatch],
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    at: Sequence[int] | None = None,
) -> dict[str, Tensor]:
    """Per-task query metrics after each inner step in ``at``: ``{metric: [len(at), num_tasks]}``."""
    parts: dict[str, list[Tensor]] = {}
    for batch in tasks:
        curve = learner.adaptation_curve(batch.to(device, dtype), steps, at)
        for k, v in curve.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v, dim=1) for k, v in parts.items()}


def curve_steps(steps: int, report_steps: Sequence[int], every_step: bool) -> list[int]:
    """The inner steps at which the meta-test evaluates the query set."""
    return list(range(steps + 1)) if every_step else sorted(set(report_steps))


def summarise(curves: dict[str, Tensor], at: Sequence[int], report_steps: Sequence[int]) -> dict[str, dict]:
    """``{metric: {"step_k": {"mean", "ci95"}, "curve": {"steps", "mean", "ci95"}}}``.

    A metric that is not finite on some task (an adaptation that diverged) is reported as such:
    its mean and interval are ``None`` and ``diverged_at_step`` names the first step where any
    task's value stopped being finite. JSON then holds ``null``, never a bare NaN.
    """
    summary: dict[str, dict] = {}
    row = {s: i for i, s in enumerate(at)}
    for metric, table in curves.items():
        finite = torch.isfinite(table).all(dim=1)
        entry: dict = {}
        for s in report_steps:
            mean, ci = mean_ci(table[row[s]]) if finite[row[s]] else (None, None)
            entry[f"step_{s}"] = {"mean": mean, "ci95": ci}
        stats = [mean_ci(r) if ok else (None, None) for r, ok in zip(table, finite)]
        entry["curve"] = {"steps": list(at), "mean": [m for m, _ in stats], "ci95": [c for _, c in stats]}
        if not bool(finite.all()):
            entry["diverged_at_step"] = int(at[int((~finite).nonzero()[0])])
        summary[metric] = entry
    return summary
