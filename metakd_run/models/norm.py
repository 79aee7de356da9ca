"""Batch norm for MAML: batch statistics always, no running statistics, safe under ``vmap``.

Finn et al. (2017) normalise every forward pass with the statistics of the images in that pass
(support set in the inner loop, query set in the outer loss; "transductive" batch norm) and keep no
running averages. So the layer below has the same behaviour in ``train()`` and ``eval()``, and no
buffers, which keeps ``torch.func.functional_call`` with a plain parameter dict sufficient.

Why not ``F.batch_norm(x, None, None, w, b, training=True)``: on torch 2.13 (CPU at least) its
batching rule gives wrong second-order gradients when it runs under ``torch.func.vmap`` inside a
``torch.func.grad`` inner step (functorch issue 534). A conv bias right before the norm, whose
true meta-gradient is exactly 0, gets about 1e-3, and other entries are off by up to 7e-2. The
same computation written with primitive ops (mean, subtraction, square, rsqrt) is exact under the
same transforms; ``tests/test_models_image.py`` checks both facts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def batch_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise ``x`` ``[N, C, H, W]`` per channel over ``(N, H, W)`` with the biased variance.

    Built from primitive ops only, so that ``vmap``/``grad``/double backward compose exactly.
    ``sum * (1/n)`` rather than ``mean``: mean's backward materialises a full-size division, the
    sum's is a broadcast view (about 10x cheaper on CPU); ``c * c`` is cheaper than ``square``.
    """
    dims = (0, 2, 3)
    inv_n = 1.0 / (x.numel() // x.shape[1])
    mean = x.sum(dim=dims, keepdim=True) * inv_n
    centred = x - mean
    var = (centred * centred).sum(dim=dims, keepdim=True) * inv_n
    scale = torch.rsqrt(var + eps) * weight.view(1, -1, 1, 1)
    return centred * scale + bias.view(1, -1, 1, 1)


class MetaBatchNorm2d(nn.Module):
    """``BatchNorm2d`` the MAML way: always the current batch's statistics, learnable affine.

    Unlike ``nn.BatchNorm2d`` there are no running statistics and no buffers, and ``eval()``
    changes nothing (test-time batches are normalised with their own statistics, as in MAML).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"MetaBatchNorm2d expects [N, C, H, W], got shape {tuple(x.shape)}")
        return batch_norm_2d(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
