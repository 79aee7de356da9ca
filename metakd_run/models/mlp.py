"""A plain MLP for regression tasks (the MAML paper's sinusoid network)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

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
        makes MAML's meta-batch cheap on a CPU (see ``meta.batching=batched``). A parameter without
        the task dimension is shared by all tasks (one ``linear`` over all T x B rows): MAML's
        tasks all start at the meta-parameters, so the first inner step needs no per-task copies.
        """
        feats: dict[str, Tensor] = {}
        h = x
        for i in range(len(self.body)):
            h = self.act(_linear(h, params[f"body.{i}.weight"], params[f"body.{i}.bias"]))
            feats[f"hidden{i + 1}"] = h
        return _linear(h, params["head.weight"], params["head.bias"]), feats

    @property
    def has_batched_gradients(self) -> bool:
        """Whether the closed forms below apply (:meth:`batched_gradients`, :meth:`batched_hvp`): ReLU."""
        return isinstance(self.act, nn.ReLU)

    def _layers(self) -> list[tuple[str, str]]:
        return [(f"body.{i}.weight", f"body.{i}.bias") for i in range(len(self.body))] + [
            ("head.weight", "head.bias")
        ]

    def batched_gradients(
        self,
        params: dict[str, Tensor],
        x: Tensor,
        loss_grad: Callable[[Tensor], Tensor],
        names: Collection[str] | None = None,
    ) -> tuple[dict[str, Tensor], Backprop]:
        """Every task's gradient of its loss, written out: backpropagation by hand (ReLU only).

        ``params`` are shared (no task dimension) or per task (leading T), ``x`` is ``[T, B, in]``,
        and ``loss_grad`` maps the outputs ``[T, B, out]`` to the loss's gradient w.r.t. them.
        Returns the gradients (per task, leading T; of ``names`` and the layers above them, or of
        every parameter) and what :meth:`batched_hvp` reuses. The result is what
        ``torch.autograd.grad`` gives, ReLU's derivative being autograd's own
        ``threshold_backward``, but as a plain differentiable expression of ``params``, so a
        second-order step can still be differentiated by autograd, with far fewer ops (which is
        what a small network's step costs) than autograd's double backward.
        """
        layers = self._layers()
        hs = [x]
        for w, b in layers[:-1]:
            hs.append(torch.relu(_linear(hs[-1], params[w], params[b])))
        out = _linear(hs[-1], params[layers[-1][0]], params[layers[-1][1]])
        lowest = 0
        if names is not None:
            lowest = min(i for i, (w, b) in enumerate(layers) if w in names or b in names)
        d = loss_grad(out)
        deltas: list[Tensor | None] = [None] * len(layers)
        grads: dict[str, Tensor] = {}
        for i in reversed(range(lowest, len(layers))):
            if i < len(layers) - 1:
                d = torch.ops.aten.threshold_backward(torch.matmul(d, params[layers[i + 1][0]]), hs[i + 1], 0)
            deltas[i] = d
            grads[layers[i][0]] = torch.bmm(d.transpose(1, 2), hs[i])
            grads[layers[i][1]] = d.sum(1)
        if names is not None:
            grads = {n: grads[n] for n in names}
        return grads, Backprop(hs, deltas, out)

    def batched_hvp(
        self,
        params: dict[str, Tensor],
        cache: Backprop,
        tangent: dict[str, Tensor],
        loss_hvp: Callable[[Tensor, Tensor], Tensor],
    ) -> dict[str, Tensor]:
        """Every task's Hessian of its loss times ``tangent``, for every parameter, in closed form.

        Pearlmutter's R-operator on :meth:`batched_gradients`: the forward pass and the hand-written
        backward pass differentiated in the direction ``tangent`` (a subset of the parameters,
        per task; the others do not move; empty: returns ``{}``). ``cache`` is the backprop at
        ``params`` (every layer's deltas), ``loss_hvp(out, d_out)`` the loss's Hessian w.r.t. the
        outputs times ``d_out``.
        ReLU's masks are constant (its second derivative is 0 where it exists, as in autograd).
        This is MAML's second-order term: the meta-gradient then needs no autograd at all.
        """
        layers = self._layers()
        hs, deltas = cache.hs, cache.deltas
        dhs: list[Tensor | None] = [None]  # the inputs x do not move
        dz: Tensor | None = None
        for i, (w, b) in enumerate(layers):
            # dz = dh W^T + h dW^T + db, with the products fused into the sums (baddbmm): every op
            # saved counts, a sinusoid step being a few hundred microsecond-sized ops
            dz = tangent[b].unsqueeze(1) if b in tangent else None
            if w in tangent:
                wt = tangent[w].transpose(1, 2)
                dz = torch.bmm(hs[i], wt) if dz is None else torch.baddbmm(dz, hs[i], wt)
            if dhs[i] is not None:
                dz = _add_product(dz, dhs[i], params[w].transpose(-1, -2))
            if i < len(layers) - 1:
                dhs.append(None if dz is None else torch.ops.aten.threshold_backward(dz, hs[i + 1], 0))
        if dz is None:  # an empty direction: nothing moves
            return {}
        dd = loss_hvp(cache.out, dz)
        hv: dict[str, Tensor] = {}
        for i in reversed(range(len(layers))):
            w, b = layers[i]
            d = deltas[i]
            hv[w] = torch.bmm(dd.transpose(1, 2), hs[i])
            if dhs[i] is not None:
                hv[w] = torch.baddbmm(hv[w], d.transpose(1, 2), dhs[i])
            hv[b] = dd.sum(1)
            if i > 0:
                back = torch.bmm(d, tangent[w]) if w in tangent else None
                dd = torch.ops.aten.threshold_backward(_add_product(back, dd, params[w]), hs[i], 0)
        return hv


@dataclass
class Backprop:
    """What one hand-written backprop leaves for a Hessian-vector product at the same point."""

    hs: list[Tensor]  # each layer's input: x, h1, ..., hL
    deltas: list[Tensor | None]  # the loss's gradient w.r.t. each layer's output (pre-activation)
    out: Tensor  # the network's output


def _add_product(total: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``total + a @ b`` (``a`` per task ``[T, n, k]``; ``b`` per task or shared), one op when it can be."""
    if total is None:
        return torch.matmul(a, b)
    if b.dim() == 2:  # shared: a stride-0 batch for baddbmm
        b = b.expand(a.shape[0], *b.shape)
    return torch.baddbmm(total, a, b)


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h [T, B, in]`` through one layer: shared by all tasks (``w [out, in]``) or per task (leading T)."""
    if w.dim() == 2:
        return F.linear(h, w, b)
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


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
