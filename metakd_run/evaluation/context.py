"""What an evaluation protocol may read: the run's config, where and in which precision to compute,
the test split's task source, what training returned, and what the protocol's own ``check`` prepared.

Not the experiment: a protocol sees no run folder, no tracker and no checkpoints, so it can only
compute; :mod:`metakd_run.presentation` presents what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from metakd_run.config import Config


@dataclass
class Context:
    cfg: Config
    device: torch.device
    dtype: torch.dtype
    test: Any  # the task source of ``eval.split`` (``sample(n, generator) -> TaskBatch``)
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> what training returned
    prepared: dict[str, Any] = field(default_factory=dict)  # protocol -> what its check(cfg) returned
