"""The task losses and metrics every meta-learner and strategy shares, and the types of their
parameters: ONE task's loss, the per-task losses of a stacked meta-batch without vmap, accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor
from torch.nn import functional as F

Params = dict[str, Tensor]
Rates = Mapping[str, Tensor | float]
# objective(output, features, query_targets, extra) -> (loss, {name: scalar}), for ONE task
Objective = Callable[[Tensor, dict[str, Tensor], Tensor, Mapping[str, Tensor]], tuple[Tensor, dict]]
LossFn = Callable[[Tensor, Tensor], Tensor]


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def accuracy(out: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct labels over the last dimension of ``y`` (one task, or ``[T]`` for many)."""
    return (out.argmax(-1) == y).to(out.dtype).mean(-1)


TASK_LOSS: dict[str, LossFn] = {"regression": mse_loss, "classification": cross_entropy}


def piece_metrics(losses: Tensor, aux: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A piece of a meta-batch's per-task metrics, detached: ``aux`` and the losses as ``loss``."""
    return {k: v.detach() for k, v in {**aux, "loss": losses}.items()}


def losses_per_task(task: str, out: Tensor, y: Tensor) -> Tensor:
    """Each task's mean loss ``[T]`` for outputs ``[T, B, ...]``: ``TASK_LOSS[task]`` without vmap."""
    if task == "regression":
        return ((out - y) ** 2).flatten(1).mean(1)
    t, b = y.shape[:2]
    return F.cross_entropy(out.reshape(t * b, -1), y.reshape(t * b), reduction="none").view(t, b).mean(1)
