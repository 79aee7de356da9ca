"""Every data set by its ``dataset.name``: adding one is a class and one line here.

The registry sits on top of the data sets: every look-up by name lives here (the image loaders'
too), and no data set module imports it."""

from __future__ import annotations

from typing import Any, Protocol

from metakd_run.data.episodes import ClassImages, EpisodeSampler
from metakd_run.data.errors import DataError
from metakd_run.data.images import ImageDataSet
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


# --- by dataset.name -----------------------------------------------------------------------------
def load_class_images(cfg: Any, split: str, *, workers: int | None = None) -> ClassImages:
    """Split ``split`` (a split *name*, e.g. ``cfg.train_split``) of data set ``cfg.name``.

    ``cfg`` is the dataset config (:class:`~metakd_run.config.OmniglotConfig` or
    :class:`~metakd_run.config.MiniImageNetConfig`, or a DictConfig of either).
    """
    return _image_data_set(cfg).load(cfg, split, workers=workers)


def build_episode_sampler(
    cfg: Any, split: str, *, transfer: int = 0, workers: int | None = None
) -> EpisodeSampler:
    """An N-way K-shot sampler over split ``split`` (a split name such as ``cfg.val_split``).

    ``transfer`` is checked up front (images per class must cover shots + queries + transfer);
    ``sample`` checks it again for the value it is given. Raises :class:`DataError` for a
    missing root, missing or broken files, and ways/shots/queries the split cannot supply.
    """
    return _image_data_set(cfg).task_source(cfg, split, transfer, workers=workers)


def _image_data_set(cfg: Any) -> ImageDataSet:
    dataset = DATASETS.get(str(cfg.name).lower())
    if not isinstance(dataset, ImageDataSet):
        names = " or ".join(n for n, d in DATASETS.items() if isinstance(d, ImageDataSet))
        raise DataError(f"dataset.name={cfg.name} is not an image data set: use {names}")
    return dataset
