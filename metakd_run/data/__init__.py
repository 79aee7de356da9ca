"""Task sources: everything the pipeline samples tasks from has ``sample(n, generator, transfer)``.

A source also tells the models what they face: ``task`` (regression or classification),
``in_shape`` and ``out_dim``. The data sets are listed in :mod:`metakd_run.data.registry`.
"""

from __future__ import annotations

from typing import Any

from metakd_run.data.errors import DataError
from metakd_run.data.tasks import TaskBatch, TaskSource

__all__ = ["DataError", "TaskBatch", "TaskSource", "build_task_source"]


def build_task_source(cfg: Any, split: str, transfer: int = 0) -> TaskSource:
    """The task distribution of data set ``cfg.name`` on ``split`` (train, val, test, ...).

    ``transfer`` is the number of unlabelled inputs per task (per class for images) that the
    distillation stage will ask for, checked here so a split too small for it fails up front.
    """
    # Imported on first use: the registry brings every reader (h5py, PIL), which modules that
    # only need TaskBatch (the meta core, the models' tests) should not pay for.
    from metakd_run.data.registry import get_dataset

    return get_dataset(cfg.name).task_source(cfg, split, transfer)
