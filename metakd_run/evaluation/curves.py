"""The meta-test's raw material: the fixed tasks every model meets, and each model's per-task query
metrics after each inner step (its adaptation curve)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.learner import MetaLearner


def fixed_tasks(source, num_tasks: int, seed: int, chunk: int) -> list[TaskBatch]:  # noqa: ANN001
    """The same ``num_tasks`` tasks for every model and every run with this seed, in chunks."""
    g = torch.Generator().manual_seed(seed)
    sizes = [min(chunk, num_tasks - i) for i in range(0, num_tasks, chunk)] if chunk > 0 else [num_tasks]
    return [source.sample(n, g) for n in sizes]


def adaptation_curves(
    learner: MetaLearner,
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
