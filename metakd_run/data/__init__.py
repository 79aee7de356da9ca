"""Task sources: everything the pipeline samples tasks from has ``sample(n, generator, transfer)``.

A source also tells the models what they face: ``task`` (regression or classification),
``in_shape`` and ``out_dim``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from metakd_run.data.tasks import TaskBatch


class TaskSource(Protocol):
    task: str
    in_shape: tuple[int, ...]
    out_dim: int

    def sample(self, num_tasks: int, generator: torch.Generator, transfer: int = 0) -> TaskBatch: ...


def build_task_source(cfg: Any, split: str, transfer: int = 0) -> TaskSource:
    """The task distribution of data set ``cfg.name`` on ``split`` (train, val, test, ...).

    ``transfer`` is the number of unlabelled inputs per task (per class for images) that the
    distillation stage will ask for, checked here so a split too small for it fails up front.
    """
    if cfg.name == "sinusoid":
        from metakd_run.data.sinusoid import SinusoidTasks

        # The sinusoid family has no splits: held-out tasks come from separate seeds.
        return SinusoidTasks(cfg.amplitude, cfg.phase, cfg.x_range, cfg.shots, cfg.queries, cfg.noise)
    from metakd_run.data.images import build_episode_sampler

    return build_episode_sampler(cfg, split, transfer=transfer)
