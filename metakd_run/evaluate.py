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
    learner: MAML, tasks: Sequence[TaskBatch], steps: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Tensor]:
    """Per-task query metrics after 0..steps inner steps: ``{metric: [steps+1, num_tasks]}``."""
    parts: dict[str, list[Tensor]] = {}
    for batch in tasks:
        curve = learner.adaptation_curve(batch.to(device, dtype), steps)
        for k, v in curve.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v, dim=1) for k, v in parts.items()}


def summarise(curves: dict[str, Tensor], report_steps: Sequence[int]) -> dict[str, dict]:
    """``{metric: {"step_k": {"mean": .., "ci95": ..}, "curve": [means per step]}}``."""
    summary: dict[str, dict] = {}
    for metric, table in curves.items():
        entry: dict = {}
        for s in report_steps:
            mean, ci = mean_ci(table[s])
            entry[f"step_{s}"] = {"mean": mean, "ci95": ci}
        entry["curve"] = [float(row.double().mean()) for row in table]
        summary[metric] = entry
    return summary
