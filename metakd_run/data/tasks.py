"""What every data set yields: a batch of tasks with a leading task dimension, from a source."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskBatch:
    """Support and query sets of T tasks, stacked so the meta core can vmap over dim 0.

    Shapes: ``support_x`` is ``[T, S, *input]``, ``support_y`` is ``[T, S, *target]`` (float
    targets for regression, int64 class indices for classification), likewise the query set.
    ``transfer_x`` holds optional unlabelled inputs ``[T, U, *input]`` used only by distillation.
    ``info`` carries per-task facts the plots need (e.g. the sinusoid's amplitude and phase).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    transfer_x: Tensor | None = None
    info: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move every tensor; ``dtype`` applies to floating-point inputs and targets only."""

        def move(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        kwargs = {f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "info"}
        return TaskBatch(**kwargs, info={k: v.to(device) for k, v in self.info.items()})

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Tasks ``start:stop`` (a view, no copy)."""
        cut = slice(start, stop)
        return replace(
            self,
            support_x=self.support_x[cut],
            support_y=self.support_y[cut],
            query_x=self.query_x[cut],
            query_y=self.query_y[cut],
            transfer_x=None if self.transfer_x is None else self.transfer_x[cut],
            info={k: v[cut] for k, v in self.info.items()},
        )

    def chunks(self, size: int) -> list[TaskBatch]:
        """Split into consecutive pieces of at most ``size`` tasks (``size <= 0``: one piece)."""
        if size <= 0 or size >= self.num_tasks:
            return [self]
        return [self.slice(i, min(i + size, self.num_tasks)) for i in range(0, self.num_tasks, size)]


class TaskSource(Protocol):
    """Everything the pipeline samples tasks from; it also tells the models what they face."""

    task: str  # "regression" or "classification"
    in_shape: tuple[int, ...]
    out_dim: int

    def sample(self, num_tasks: int, generator: torch.Generator, transfer: int = 0) -> TaskBatch:
        """``num_tasks`` tasks; ``transfer > 0`` adds that many unlabelled inputs (per class for images)."""
        ...


@dataclass(frozen=True)
class MiniBatch:
    """Images of the training split with their global class labels, for plain pretraining.

    ``x`` is ``[B, *input]``, ``y`` is int64 ``[B]`` (the split's class index, ``0..C-1``). It moves
    like a :class:`TaskBatch`, so the training loop takes either from a stage's sampler.
    """

    x: Tensor
    y: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MiniBatch:
        """Move both; ``dtype`` applies to the images only."""
        x = (
            self.x.to(device=device, dtype=dtype, non_blocking=True)
            if dtype is not None
            else self.x.to(device)
        )
        return MiniBatch(x, self.y.to(device=device, non_blocking=True))
