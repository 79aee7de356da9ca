"""The example predictions the test-task figure draws, computed here so the figure only draws.

A regression run: a few test tasks, each model's prediction on a grid of inputs before adaptation
and after ``eval.steps`` inner steps, and the true function where the task source knows it. A
classification run: the first test episode and each model's predicted label of every query.
"""

from __future__ import annotations

from typing import Any

import torch

from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.learner import MetaLearner
from metakd_run.names import STAGES

GRID_POINTS = 200


def ordered(names: list[str]) -> list[str]:
    """Teacher, distilled student, baseline student, then any other name."""
    rank = {name: i for i, name in enumerate(STAGES)}
    return sorted(dict.fromkeys(names), key=lambda n: rank.get(n, len(STAGES)))


def predictions(
    learners: dict[str, MetaLearner],
    batch: TaskBatch,
    cfg: Any,
    device: torch.device,
    dtype: torch.dtype,
    source: Any,
) -> dict[str, Any]:
    """The record :func:`metakd_run.presentation.figures.test_tasks_figure` draws (tensors on the CPU)."""
    steps = int(cfg.eval.steps)
    record: dict[str, Any] = {"split": str(cfg.eval.split), "steps": steps}
    if next(iter(learners.values())).task == "regression":
        return {**record, **_regression(learners, batch, cfg, device, dtype, source, steps)}
    sx = batch.support_x[0].to(device, dtype)
    sy = batch.support_y[0].to(device)
    qx = batch.query_x[0].to(device, dtype)
    preds = {}
    for name in ordered(list(learners)):  # the whole query set at once, as the meta-test scores it
        learner = learners[name]
        preds[name] = learner.predict(learner.adapt_frozen(sx, sy, steps), qx).argmax(-1).cpu()
    return {
        **record,
        "kind": "episode",
        "support_x": sx.cpu(),
        "support_y": sy.cpu(),
        "query_x": qx.cpu(),
        "query_y": batch.query_y[0].cpu(),
        "predictions": preds,
    }


def _regression(learners, batch, cfg, device, dtype, source, steps) -> dict[str, Any]:  # noqa: ANN001
    """A few tasks (``eval.plot_tasks``): the true function (from the task source itself), the
    support and query points, each model before and after ``steps`` steps on a grid."""
    n = max(1, min(int(cfg.eval.plot_tasks), batch.num_tasks))
    lo, hi = cfg.dataset.x_range
    grid = torch.linspace(lo, hi, GRID_POINTS, dtype=dtype, device=device).view(-1, 1)
    truth = None
    if hasattr(source, "curve") and {"amplitude", "phase"} <= set(batch.info):
        amp, phase = batch.info["amplitude"][:n].cpu(), batch.info["phase"][:n].cpu()
        truth = source.curve(amp, phase, grid.cpu().double()[None]).float()  # [n, points, 1]
    before: dict[str, list[torch.Tensor]] = {}
    after: dict[str, list[torch.Tensor]] = {}
    for t in range(n):
        sx = batch.support_x[t].to(device, dtype)
        sy = batch.support_y[t].to(device, dtype)
        for name in ordered(list(learners)):
            learner = learners[name]
            before.setdefault(name, []).append(learner.predict(learner.adapt_frozen(sx, sy, 0), grid).cpu())
            after.setdefault(name, []).append(
                learner.predict(learner.adapt_frozen(sx, sy, steps), grid).cpu()
            )
    return {
        "kind": "regression",
        "tasks": n,
        "grid": grid.cpu(),
        "truth": truth,
        "support_x": batch.support_x[:n].cpu(),
        "support_y": batch.support_y[:n].cpu(),
        "query_x": batch.query_x[:n].cpu(),
        "query_y": batch.query_y[:n].cpu(),
        "shots": batch.support_x.shape[1],
        "info": {k: v[:n].cpu() for k, v in batch.info.items() if v.dim() == 1},
        "before": before,
        "after": after,
    }
