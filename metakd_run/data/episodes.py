"""N-way K-shot episodes drawn from a split held in memory as one uint8 tensor.

A split is a tensor ``[C, M, ch, H, W]``: C classes with M images each (Omniglot: 20 drawings
per character and rotation, miniImageNet: 600 photos per class). Sampling an episode batch is
pure tensor indexing, vectorised over tasks, so it costs far less than a meta-gradient step and
needs no worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metakd_run.data.errors import DataError
from metakd_run.data.tasks import MiniBatch, TaskBatch


@dataclass(frozen=True)
class ClassImages:
    """One split as loaded from disk: uint8 ``images [C, M, ch, H, W]`` and the class names.

    ``source`` names what it was decoded from, ``cache_file`` where the decoded tensor lives
    (None: not cached), ``prepared_s`` the seconds spent decoding (None: read from the cache).
    """

    images: Tensor
    classes: list[str]
    dataset: str
    split: str
    source: str
    cache_file: Path | None = None
    prepared_s: float | None = None


class EpisodeSampler:
    """Draws N-way K-shot Q-query classification tasks from one split.

    Each task picks ``ways`` distinct classes uniformly at random; their random order defines
    the labels ``0..ways-1``, so a class gets a fresh label in every task. Within each class a
    random permutation of its images gives the K support, Q query and U transfer images, which
    are therefore disjoint. Rows are grouped by label: ``support_y`` is ``[0]*K + [1]*K + ...``
    (likewise the query set). Inputs are float32 in ``[0, 1]`` (uint8 / 255, no mean/std
    normalisation: the models' batch norm takes care of scale). ``info["classes"]`` holds the
    split's class index behind each label, ``[T, ways]``.

    Everything random comes from the ``generator`` passed to :meth:`sample`, so a seed fixes
    the episodes, whatever device the images live on.
    """

    task = "classification"

    def __init__(
        self,
        images: Tensor,
        ways: int,
        shots: int,
        queries: int,
        *,
        transfer: int = 0,
        dataset: str = "dataset",
        split: str = "train",
        class_names: Sequence[str] | None = None,
    ) -> None:
        if images.dim() != 5 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be uint8 [classes, per_class, ch, H, W], got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        self.images = images
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.dataset, self.split = dataset, split
        self.class_names = list(class_names) if class_names is not None else None
        self._check_counts()
        self._check_per_class(transfer)

    @classmethod
    def from_class_images(
        cls, data: ClassImages, ways: int, shots: int, queries: int, *, transfer: int = 0
    ) -> EpisodeSampler:
        """A sampler over a loaded split, keeping its names for messages and plots."""
        return cls(
            data.images,
            ways,
            shots,
            queries,
            transfer=transfer,
            dataset=data.dataset,
            split=data.split,
            class_names=data.classes,
        )

    # --- facts the models need ---------------------------------------------------------------
    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(channels, height, width)`` of one input."""
        ch, h, w = self.images.shape[2:]
        return (int(ch), int(h), int(w))

    @property
    def out_dim(self) -> int:
        """Logits per input: the number of ways."""
        return self.ways

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def images_per_class(self) -> int:
        return int(self.images.shape[1])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> EpisodeSampler:
        """The same sampler with its images on ``device`` (sampling then gathers there)."""
        moved = EpisodeSampler.__new__(EpisodeSampler)
        moved.__dict__.update(self.__dict__)
        moved.images = self.images.to(device)
        return moved

    # --- sampling ------------------------------------------------------------------------------
    def sample(self, num_tasks: int, generator: torch.Generator, transfer: int = 0) -> TaskBatch:
        """``num_tasks`` episodes; ``transfer > 0`` adds that many unlabelled images per class."""
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self._check_per_class(transfer)
        t, n, k, q = num_tasks, self.ways, self.shots, self.queries
        picks = k + q + transfer
        rand_dev = generator.device
        # The top-k of i.i.d. uniform keys is a uniformly random ordered k-subset of each row,
        # for all rows at once; topk is O(n) where a full argsort would be O(n log n).
        keys = torch.rand(t, self.num_classes, generator=generator, device=rand_dev)
        classes = keys.topk(n, dim=1).indices
        keys = torch.rand(t, n, self.images_per_class, generator=generator, device=rand_dev)
        order = keys.topk(picks, dim=2).indices
        classes, order = classes.to(self.device), order.to(self.device)
        rows = classes[:, :, None]
        support_x = self._gather(rows, order[:, :, :k])
        query_x = self._gather(rows, order[:, :, k : k + q])
        transfer_x = self._gather(rows, order[:, :, k + q :]) if transfer > 0 else None
        return TaskBatch(
            support_x=support_x,
            support_y=self._labels(t, k),
            query_x=query_x,
            query_y=self._labels(t, q),
            transfer_x=transfer_x,
            info={"classes": classes},
        )

    def _gather(self, rows: Tensor, cols: Tensor) -> Tensor:
        """Images ``[T, N, P]`` -> float ``[T, N*P, ch, H, W]`` in [0, 1]."""
        picked = self.images[rows, cols]  # advanced indexing: one gather, uint8
        t, n, p = cols.shape
        return picked.reshape(t, n * p, *self.in_shape).to(torch.float32).div_(255.0)

    def _labels(self, num_tasks: int, per_class: int) -> Tensor:
        labels = torch.arange(self.ways, device=self.device).repeat_interleave(per_class)
        return labels.repeat(num_tasks, 1)

    def sample_images(self, size: int, generator: torch.Generator) -> MiniBatch:
        """``size`` images drawn uniformly (with replacement) from the whole split, labelled by their
        class index in the split: plain pretraining's mini-batches. Every class holds as many images,
        so a uniform class and a uniform image within it is a uniform image of the split. Draws only
        from ``generator``, so a seed (and a resumed generator state) gives the same batches."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        rand_dev = generator.device
        classes = torch.randint(self.num_classes, (size,), generator=generator, device=rand_dev)
        index = torch.randint(self.images_per_class, (size,), generator=generator, device=rand_dev)
        classes, index = classes.to(self.device), index.to(self.device)
        x = self.images[classes, index].to(torch.float32).div_(255.0)
        return MiniBatch(x, classes)

    # --- validation ----------------------------------------------------------------------------
    def _where(self) -> str:
        return f"split '{self.split}' of {self.dataset}"

    def _check_counts(self) -> None:
        for key, value in (("ways", self.ways), ("shots", self.shots), ("queries", self.queries)):
            if value < 1:
                raise DataError(f"dataset.{key}={value} must be >= 1")
        if self.ways > self.num_classes:
            raise DataError(
                f"dataset.ways={self.ways} but {self._where()} has only {self.num_classes} "
                "classes; lower dataset.ways"
            )

    def _check_per_class(self, transfer: int) -> None:
        if transfer < 0:
            raise DataError(f"kd.transfer={transfer} must be >= 0")
        need = self.shots + self.queries + transfer
        if need <= self.images_per_class:
            return
        extra = f" + kd.transfer={transfer}" if transfer else ""
        knobs = "dataset.shots, dataset.queries or kd.transfer"
        lower = knobs if transfer else "dataset.shots or dataset.queries"
        raise DataError(
            f"dataset.shots={self.shots} + dataset.queries={self.queries}{extra} = {need} images "
            f"per class but {self._where()} has only {self.images_per_class} per class; "
            f"lower {lower}"
        )
