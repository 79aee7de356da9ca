"""Sinusoid regression tasks as in the MAML paper: y = A sin(x - phase)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from metakd_run.data.tasks import TaskBatch


class SinusoidTasks:
    """An endless distribution of sine tasks; each call draws fresh amplitudes and phases.

    K support and Q query points per task, optionally U unlabelled transfer inputs drawn from
    the same input range (for distillation), and Gaussian observation noise on the targets.
    """

    task = "regression"
    in_shape = (1,)
    out_dim = 1

    def __init__(
        self,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, torch.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
        shots: int = 10,
        queries: int = 10,
        noise: float = 0.0,
    ) -> None:
        self.amplitude = tuple(amplitude)
        self.phase = tuple(phase)
        self.x_range = tuple(x_range)
        self.shots = shots
        self.queries = queries
        self.noise = noise

    def _uniform(self, bounds: tuple[float, ...], shape: tuple[int, ...], g: torch.Generator):
        lo, hi = bounds
        return torch.rand(shape, generator=g) * (hi - lo) + lo

    def sample(self, num_tasks: int, generator: torch.Generator, transfer: int = 0) -> TaskBatch:
        amp = self._uniform(self.amplitude, (num_tasks, 1, 1), generator)
        phase = self._uniform(self.phase, (num_tasks, 1, 1), generator)
        n = self.shots + self.queries
        x = self._uniform(self.x_range, (num_tasks, n, 1), generator)
        y = amp * torch.sin(x - phase)
        if self.noise > 0:
            y = y + self.noise * torch.randn(y.shape, generator=generator)
        # The transfer inputs come from a generator of their own, seeded by one draw that is made
        # whether or not they are asked for: the distilled student (transfer > 0) and the baseline
        # (transfer = 0) then meet identical tasks in identical order.
        transfer_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        transfer_x = None
        if transfer > 0:
            own = torch.Generator().manual_seed(transfer_seed)
            transfer_x = self._uniform(self.x_range, (num_tasks, transfer, 1), own)
        k = self.shots
        return TaskBatch(
            support_x=x[:, :k],
            support_y=y[:, :k],
            query_x=x[:, k:n],
            query_y=y[:, k:n],
            transfer_x=transfer_x,
            info={"amplitude": amp.view(-1), "phase": phase.view(-1)},
        )

    def curve(self, amplitude: torch.Tensor, phase: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The noiseless target function of the tasks with these parameters at inputs ``x``."""
        return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


class Sinusoid:
    """The sinusoid family as a registered data set: no files, no splits."""

    name = "sinusoid"

    def task_source(self, cfg: Any, split: str, transfer: int = 0) -> SinusoidTasks:
        """The same distribution for every split: held-out tasks come from separate seeds."""
        return SinusoidTasks(cfg.amplitude, cfg.phase, cfg.x_range, cfg.shots, cfg.queries, cfg.noise)
