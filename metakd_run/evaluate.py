"""Meta-test: fixed tasks, adaptation curves, mean and 95% confidence interval per step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.maml import MAML


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
    """``{metric: {"step_k": {"mean", "ci95"}, "curve": {"steps": [...], "mean": [...]}}}``."""
    summary: dict[str, dict] = {}
    row = {s: i for i, s in enumerate(at)}
    for metric, table in curves.items():
        entry: dict = {}
        for s in report_steps:
            mean, ci = mean_ci(table[row[s]])
            entry[f"step_{s}"] = {"mean": mean, "ci95": ci}
        entry["curve"] = {"steps": list(at), "mean": [float(r.double().mean()) for r in table]}
        summary[metric] = entry
    return summary
