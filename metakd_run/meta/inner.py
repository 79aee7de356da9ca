"""One inner step of ONE task, two ways: ``torch.func.grad`` (composes with vmap) and plain
``torch.autograd.grad`` (the loop and batched paths); and the update itself."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad

from metakd_run.meta.losses import LossFn, Params, Rates

Forward = Callable[[Params, Tensor], tuple[Tensor, dict[str, Tensor]]]


def sgd_step(
    model: nn.Module,
    loss: LossFn,
    adapted: list[str],
    params: Params,
    lrs: Rates,
    x: Tensor,
    y: Tensor,
    create_graph: bool,
) -> Params:
    """One gradient step of ONE task on its support loss, a pure function of ``params``.

    The gradient comes from ``torch.func.grad``, so it composes with ``vmap`` and works whether
    or not ``params`` carry a graph.
    """
    fast = {n: params[n] for n in adapted}

    def support_loss(fast_params: Params) -> Tensor:
        out, _ = functional_call(model, {**params, **fast_params}, (x,))
        return loss(out, y)

    grads = grad(support_loss)(fast)
    if not create_graph:
        grads = {n: g.detach() for n, g in grads.items()}
    return {**params, **{n: fast[n] - lrs[n] * grads[n] for n in adapted}}


def autograd_step(
    forward: Forward,
    loss: LossFn,
    adapted: list[str],
    params: Params,
    lrs: Rates,
    x: Tensor,
    y: Tensor,
    create_graph: bool,
) -> Params:
    """The same step with plain ``torch.autograd.grad`` (no functorch): the loop and batched paths."""
    if create_graph:
        out, _ = forward(params, x)
        grads = torch.autograd.grad(loss(out, y), [params[n] for n in adapted], create_graph=True)
    else:
        # The gradient as if the parameters were leaves: no graph through it (first order,
        # a frozen teacher, evaluation), while ``params`` itself may still carry the meta-graph.
        leaves = {n: v.detach().requires_grad_(n in adapted) for n, v in params.items()}
        with torch.enable_grad():
            out, _ = forward(leaves, x)
            grads = torch.autograd.grad(loss(out, y), [leaves[n] for n in adapted])
    return {**params, **{n: params[n] - lrs[n] * g for n, g in zip(adapted, grads)}}


def sgd_update(p: Tensor, lr: Tensor | float, g: Tensor) -> Tensor:
    """``p - lr * g``; one fused op for a plain-number rate (small steps are op-count bound)."""
    return torch.add(p, g, alpha=-lr) if isinstance(lr, float | int) else p - lr * g
