"""``meta.batching=auto``: the measured policy that picks a strategy per model, device and task size."""

from __future__ import annotations

import torch
from torch import nn

from metakd_run.config import Batching

BATCHING = tuple(b.value for b in Batching)  # the choice list's one home is the config's schema


# Per-task convolution work (input pixels of a task's images x the widest layer's filters squared)
# below which grouped convolutions beat the per-task loop on a CPU, by torch's intra-op threads.
# Measured on the 2-core CPU, second order, interleaved (README, Speed). 2 threads: batched took
# 0.46-0.92x the loop's time up to 96M (conv4-8 to conv4-64 at 28x28, conv4-8 at 84x84), 1.00x at
# 64M and 1.06-1.15x from 217M up. 1 thread: 0.71-0.89x up to 6M, 1.00x at 14M, 1.06-1.19x from
# 16M up (grouped convolutions gain more from a second intra-op thread than the loop's task
# threads do). More threads than 2 were not measured and take the 2-thread limit.
GROUPED_BELOW = {1: 2**23, 2: 2**27}


def resolve_batching(
    choice: str, model: nn.Module, device: torch.device | str | None = None, task_pixels: int = 0
) -> str:
    """``auto`` picks, per model, device and task size, what ``scripts/benchmark.py`` measured fastest.

    ``device`` defaults to where the model's parameters are: resolve after ``model.to(device)``
    (:class:`~metakd_run.meta.learner.MetaLearner` does this lazily, at first use on a device).
    ``task_pixels`` is the pixel count of one task's support and query images together (0: not
    known, as for a model used outside the pipeline).

    - MLPs (``batched_forward``, no convolution): ``batched`` on every device. One ``baddbmm`` per
      layer for the whole meta-batch and, with ReLU, the closed-form meta-gradient: on the 2-core
      CPU, sinusoid shape, 1 thread, interleaved, 20-22x the per-task reference loop (12x through
      autograd) where ``vmap`` gives 5-6x and ``loop`` 0.9x.
    - Convolutional networks on CUDA: ``vmap``. On an H200, Omniglot 5-way 1-shot at the paper's
      shape (conv4-64, meta-batch 32, second order), ``vmap`` ran 29 meta-iterations/s,
      ``batched`` (4 tasks per grouped-convolution graph) 4.5 and ``loop`` 1.9: the GPU wants few
      large kernels, and the loop launches hundreds of tiny ones per task.
    - Convolutional networks on a CPU: by the task's convolution work, ``task_pixels`` times the
      widest layer's filters squared, against a limit that depends on torch's intra-op thread
      count when the strategy is made (:data:`GROUPED_BELOW`). Large tasks are compute-bound: the
      ``loop`` (one task per graph, tasks in worker threads) ran at 1.01-1.05x the reference (a
      per-task loop over plain ``torch.nn`` layers) on the benchmark's three image shapes, where
      ``batched`` ran at 0.61-0.99x and ``vmap`` at about 0.4x. Small tasks (the CPU presets'
      conv4-32 at 28x28 with 5 queries, any conv4-8, with 2 threads) are op-count-bound, and
      grouped convolutions (``batched``, where the model has ``batched_forward``) run 1.1-2.2x
      faster than the loop. Unknown size: ``loop``.
    - Anything else: ``vmap`` (it needs nothing from the model).

    The README's "Speed" section has the figures and the commands that measure them.
    """
    choice = str(getattr(choice, "value", choice))  # a str-valued Enum member, or the string itself
    if choice not in BATCHING:
        raise ValueError(f"meta.batching must be one of {BATCHING}, got {choice!r}")
    if choice != "auto":
        return choice
    if device is None:
        device = device_of(model)
    if has_conv(model):
        if torch.device(device).type == "cuda":
            return "vmap"
        limit = GROUPED_BELOW[min(torch.get_num_threads(), 2)]
        small = 0 < task_pixels * conv_width(model) ** 2 < limit
        return "batched" if small and hasattr(model, "batched_forward") else "loop"
    return "batched" if hasattr(model, "batched_forward") else "vmap"


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def conv_width(model: nn.Module) -> int:
    """The most filters of any convolution in ``model``."""
    return max((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), default=0)
