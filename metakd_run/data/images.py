"""Builds the episode sampler of an image data set (Omniglot, miniImageNet) from its config."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from metakd_run.data.cache import default_cache_dir
from metakd_run.data.episodes import ClassImages, EpisodeSampler
from metakd_run.data.errors import DataError

log = logging.getLogger(__name__)

_HOLDS = {  # what dataset.root must hold, for the error message
    "omniglot": "images_background.zip and images_evaluation.zip (or omniglot/ with them)",
    "miniimagenet": "train.csv, val.csv, test.csv and images/ or images.zip (or miniimagenet/ with them)",
}


def load_class_images(cfg: Any, split: str, *, workers: int | None = None) -> ClassImages:
    """Split ``split`` (a split *name*, e.g. ``cfg.train_split``) of data set ``cfg.name``.

    ``cfg`` is the dataset config (:class:`~metakd_run.config.OmniglotConfig` or
    :class:`~metakd_run.config.MiniImageNetConfig`, or a DictConfig of either).
    """
    name = str(cfg.name).lower()
    if name not in _HOLDS:
        raise DataError(f"dataset.name={cfg.name} is not an image data set: use omniglot or miniimagenet")
    root = Path(str(cfg.root)).expanduser()
    download = bool(getattr(cfg, "download", False)) and name == "omniglot"
    if not root.is_dir() and not download:
        raise DataError(
            f"dataset.root={cfg.root} does not exist: point it at the folder that holds "
            f"{_HOLDS[name]}, or set METAKD_DATA_ROOT"
        )
    cache_dir = Path(str(cfg.cache_dir)).expanduser() if cfg.cache_dir else default_cache_dir(root)
    start = time.perf_counter()
    if name == "omniglot":
        from metakd_run.data.omniglot import load_omniglot

        root.mkdir(parents=True, exist_ok=True)  # only reached without it when downloading
        data = load_omniglot(
            root,
            split,
            int(cfg.image_size),
            cache_dir=cache_dir,
            download=download,
            workers=workers,
        )
    else:
        from metakd_run.data.miniimagenet import load_miniimagenet

        data = load_miniimagenet(
            root,
            split,
            int(cfg.image_size),
            cache_dir=cache_dir,
            download=bool(getattr(cfg, "download", False)),
            workers=workers,
        )
    _log_load(data, time.perf_counter() - start)
    return data


def build_episode_sampler(
    cfg: Any, split: str, *, transfer: int = 0, workers: int | None = None
) -> EpisodeSampler:
    """An N-way K-shot sampler over split ``split`` (a split name such as ``cfg.val_split``).

    ``transfer`` is checked up front (images per class must cover shots + queries + transfer);
    ``sample`` checks it again for the value it is given. Raises :class:`DataError` for a
    missing root, missing or broken files, and ways/shots/queries the split cannot supply.
    """
    data = load_class_images(cfg, split, workers=workers)
    return EpisodeSampler.from_class_images(
        data, int(cfg.ways), int(cfg.shots), int(cfg.queries), transfer=transfer
    )


def _log_load(data: ClassImages, seconds: float) -> None:
    shape = "x".join(str(d) for d in data.images.shape)
    if data.prepared_s is not None:
        where = f"cached in {data.cache_file}" if data.cache_file else "not cached"
        log.info(
            "%s/%s: prepared %s uint8 images from %s in %.1f s (%s)",
            data.dataset,
            data.split,
            shape,
            data.source,
            data.prepared_s,
            where,
        )
    else:
        log.info(
            "%s/%s: loaded %s uint8 images from cache %s in %.2f s",
            data.dataset,
            data.split,
            shape,
            data.cache_file,
            seconds,
        )
