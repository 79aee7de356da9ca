"""Every data set by its ``dataset.name``: adding one is a class and one line here."""

from __future__ import annotations

from typing import Any, Protocol

from metakd_run.data.errors import DataError
from metakd_run.data.miniimagenet import MiniImageNet
from metakd_run.data.omniglot import Omniglot
from metakd_run.data.sinusoid import Sinusoid
from metakd_run.data.tasks import TaskSource


class DataSet(Protocol):
    """A data set as the pipeline sees it: a name, and tasks from a split."""

    name: str

    def task_source(self, cfg: Any, split: str, transfer: int = 0) -> TaskSource:
        """The tasks of split ``split`` (a split name such as ``cfg.val_split``), configured by ``cfg``.

        ``transfer`` is the number of unlabelled inputs per task (per class for images) that the
        distillation stage will ask for, checked here so that a split too small fails up front.
        """
        ...


DATASETS: dict[str, DataSet] = {
    ds.name: ds
    for ds in (
        Sinusoid(),
        Omniglot(),
        MiniImageNet(),
    )
}


def get_dataset(name: str) -> DataSet:
    """The data set called ``name``; an unknown name is a one-line DataError listing the others."""
    try:
        return DATASETS[str(name).lower()]
    except KeyError:
        raise DataError(f"dataset.name={name} is unknown: use one of {', '.join(DATASETS)}") from None
