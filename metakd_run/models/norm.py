"""Batch norm for MAML: batch statistics always, no running statistics, safe under ``vmap``.

Finn et al. (2017) normalise every forward pass with the statistics of the images in that pass
(support set in the inner loop, query set in the outer loss; "transductive" batch norm) and keep no
running averages. So the layer below has the same behaviour in ``train()`` and ``eval()``, and no
buffers, which keeps ``torch.func.functional_call`` with a plain parameter dict sufficient.

Two implementations of the same function, chosen per call:

- Outside any ``torch.func`` transform (the ``loop`` and ``batched`` strategies, evaluation):
  torch's own fused kernel, ``F.batch_norm(x, None, None, w, b, training=True)``. Its double
  backward is exact, and it is what a hand-written loop over ``nn.BatchNorm2d`` runs: on the
  2-core CPU, the second-order conv4 meta-step ran 1.2-1.3x faster with it than with the
  primitive version (``scripts/benchmark.py``'s ``loop, primitive batch norm`` row).
- Under ``vmap``/``grad`` (the ``vmap`` strategy, :meth:`MAML.adapt`): the same computation written
  with primitive ops (mean, subtraction, square, rsqrt). On torch 2.13 (CPU at least) the fused
  kernel's batching rule gives wrong second-order gradients when it runs under ``torch.func.vmap``
  inside a ``torch.func.grad`` inner step (functorch issue 534): a conv bias right before the norm,
  whose true meta-gradient is exactly 0, gets about 1e-3, and other entries are off by up to 7e-2.
  The primitive version is exact under the same transforms.

``tests/test_models_image.py`` checks all three facts: the kernel's double backward equals the
primitive version's in float64, the vmapped kernel is wrong, and no strategy ever calls the kernel
under a transform.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn import functional as F

_force_primitive = False


@contextmanager
def primitive_batch_norm() -> Iterator[None]:
    """Use the primitive-op batch norm everywhere while active (tests and the benchmark compare them)."""
    global _force_primitive
    previous, _force_primitive = _force_primitive, True
    try:
        yield
    finally:
        _force_primitive = previous


def batch_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Normalise ``x`` ``[N, C, H, W]`` per channel over ``(N, H, W)`` with the biased variance.

    torch's fused kernel when no ``torch.func`` transform is active (faster, exact double backward);
    otherwise :func:`primitive_batch_norm_2d`.
    """
    if _force_primitive or torch._C._are_functorch_transforms_active():
        return primitive_batch_norm_2d(x, weight, bias, eps)
    return F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)


def primitive_batch_norm_2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """:func:`batch_norm_2d` from primitive ops only: ``vmap``/``grad``/double backward compose exactly.

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
