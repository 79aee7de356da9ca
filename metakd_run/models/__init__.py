"""Model zoo: every model returns ``(output, {feature_name: tensor})``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from metakd_run.models.mlp import MLP, feature_shapes

__all__ = ["build_model", "feature_shapes"]


def build_model(cfg: Any, in_shape: Sequence[int], out_dim: int) -> nn.Module:
    """Instantiate the model named by ``cfg.name`` for inputs of ``in_shape`` and ``out_dim`` outputs."""
    if cfg.name == "mlp":
        if len(in_shape) != 1:
            raise ValueError(f"model 'mlp' takes flat inputs, got shape {tuple(in_shape)}")
        return MLP(in_shape[0], out_dim, list(cfg.hidden), cfg.activation)
    if cfg.name == "conv4":
        from metakd_run.models.conv4 import Conv4

        return Conv4(in_shape, out_dim, filters=cfg.filters, blocks=cfg.blocks)
    if cfg.name == "resnet12":
        from metakd_run.models.resnet12 import ResNet12

        return ResNet12(in_shape, out_dim, widths=list(cfg.widths))
    raise ValueError(f"unknown model {cfg.name!r}")
