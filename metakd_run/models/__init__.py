"""Model zoo: every model returns ``(output, {feature_name: tensor})``.

``MODELS`` maps a ``model`` config's ``name`` to a builder ``(cfg, in_shape, out_dim) -> nn.Module``;
adding a model is its class, its schema in ``config.py`` and one ``@register`` line. Each model
names its features (``hidden<i>``, ``block<i>``, ``embedding``), says which is the head's input
(``embedding_tap``) and which parameters form the head (``head_prefix``, for ANIL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from metakd_run.models.mlp import MLP, feature_shapes

__all__ = ["MODELS", "build_model", "feature_shapes", "register"]

Builder = Callable[[Any, Sequence[int], int], nn.Module]
MODELS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        MODELS[name] = builder
        return builder

    return add


@register("mlp")
def _mlp(cfg: Any, in_shape: Sequence[int], out_dim: int) -> nn.Module:
    if len(in_shape) != 1:
        raise ValueError(f"model 'mlp' takes flat inputs, got shape {tuple(in_shape)}")
    return MLP(in_shape[0], out_dim, list(cfg.hidden), cfg.activation)


@register("conv4")
def _conv4(cfg: Any, in_shape: Sequence[int], out_dim: int) -> nn.Module:
    from metakd_run.models.conv4 import Conv4

    return Conv4(in_shape, out_dim, filters=cfg.filters, blocks=cfg.blocks)


@register("resnet12")
def _resnet12(cfg: Any, in_shape: Sequence[int], out_dim: int) -> nn.Module:
    from metakd_run.models.resnet12 import ResNet12

    return ResNet12(in_shape, out_dim, widths=list(cfg.widths))


def build_model(cfg: Any, in_shape: Sequence[int], out_dim: int) -> nn.Module:
    """Instantiate the model named by ``cfg.name`` for inputs of ``in_shape`` and ``out_dim`` outputs."""
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model {cfg.name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[cfg.name](cfg, in_shape, out_dim)
