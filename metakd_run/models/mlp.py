"""A plain MLP for regression tasks (the MAML paper's sinusoid network)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """``in -> hidden... -> out``; returns the output and each hidden activation by name.

    Features are named ``hidden1``, ``hidden2``, ... so a distillation config can tap any layer.
    The last layer is called ``head`` so that ANIL can adapt it alone.
    """

    head_prefix = "head."

    def __init__(
        self, in_features: int, out_features: int, hidden: Sequence[int], activation: str = "relu"
    ) -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = ACTIVATIONS[activation]()
        self.head = nn.Linear(widths[-1], out_features)
        self.embedding_tap = f"hidden{len(hidden)}"  # the head's input: what feature distances match

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats: dict[str, Tensor] = {}
        h = x
        for i, layer in enumerate(self.body, start=1):
            h = self.act(layer(h))
            feats[f"hidden{i}"] = h
        return self.head(h), feats

    def batched_forward(self, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The same network for T tasks at once, each with its own parameters (leading dim T).

        ``x`` is ``[T, B, in]``; one ``baddbmm`` per layer replaces T small matmuls, which is what
        makes MAML's meta-batch cheap on a CPU (see ``meta.batching=batched``).
        """
        feats: dict[str, Tensor] = {}
        h = x
        for i in range(len(self.body)):
            w, b = params[f"body.{i}.weight"], params[f"body.{i}.bias"]
            h = self.act(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)))
            feats[f"hidden{i + 1}"] = h
        out = torch.baddbmm(params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2))
        return out, feats


def feature_shapes(model: nn.Module, in_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """Shapes (without the batch dimension) of the output and every named feature."""
    was_training = model.training
    with torch.no_grad():
        p = next(model.parameters())
        out, feats = model(torch.zeros(2, *in_shape, dtype=p.dtype, device=p.device))
    model.train(was_training)
    shapes = {name: tuple(t.shape[1:]) for name, t in feats.items()}
    shapes["output"] = tuple(out.shape[1:])
    return shapes
