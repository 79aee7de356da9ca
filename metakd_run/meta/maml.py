"""MAML, first-order MAML, Meta-SGD and ANIL as pure functions of parameters (torch.func).

The inner loop is written once, for one task, as a function of a parameter dict. A meta-batch
is then either vmapped (one call for all tasks) or looped over, behind the same interface, because
which is faster depends on the shape: vmap wins on small MLPs, a plain loop on convolutions on a
CPU. Second-order meta-gradients come from running ``torch.func.grad`` inside the graph that the
outer ``backward`` differentiates; first order detaches the inner gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metakd_run.data.tasks import TaskBatch

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]
# objective(output, features, query_targets, extra) -> (loss, {name: scalar}); extra is per task
Objective = Callable[[Tensor, dict[str, Tensor], Tensor, Mapping[str, Tensor]], tuple[Tensor, dict]]

BATCHING = ("auto", "vmap", "loop")


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def accuracy(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).to(out.dtype).mean()


@dataclass(frozen=True)
class InnerLoopConfig:
    """What the inner loop does; the values come straight from the ``meta`` config group."""

    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    learn_inner_lr: bool = False
    anil: bool = False
    batching: str = "auto"
    chunk: int = 0


class MAML(nn.Module):
    """A model's meta-learned initialisation, its (optionally learned) inner rates, and the loop.

    ``task="regression"`` uses MSE, ``"classification"`` cross-entropy (and reports accuracy).
    """

    def __init__(self, model: nn.Module, task: str, cfg: InnerLoopConfig) -> None:
        super().__init__()
        if cfg.batching not in BATCHING:
            raise ValueError(f"batching must be one of {BATCHING}, got {cfg.batching!r}")
        self.model = model
        self.cfg = cfg
        self.task = task
        self.loss: LossFn = mse_loss if task == "regression" else cross_entropy
        head = getattr(model, "head_prefix", "head.")
        names = [n for n, _ in model.named_parameters()]
        self.adapted = [n for n in names if not cfg.anil or n.startswith(head)]
        if not self.adapted:
            raise ValueError("no parameter to adapt in the inner loop (ANIL found no head)")
        if cfg.learn_inner_lr:
            # Meta-SGD: one learned rate per adapted parameter entry, initialised at inner_lr.
            self.inner_lrs = nn.ParameterDict(
                {
                    _key(n): nn.Parameter(torch.full_like(p, cfg.inner_lr))
                    for n, p in model.named_parameters()
                    if n in self.adapted
                }
            )
        else:
            self.inner_lrs = None
        self.batching = resolve_batching(cfg.batching, model)

    # --- parameters ------------------------------------------------------------------------------
    def params(self) -> Params:
        """The meta-parameters as a dict (the live ``nn.Parameter`` objects, so grads land on them)."""
        return dict(self.model.named_parameters())

    def lrs(self) -> dict[str, Tensor | float]:
        if self.inner_lrs is None:
            return {n: self.cfg.inner_lr for n in self.adapted}
        return {n: self.inner_lrs[_key(n)] for n in self.adapted}

    # --- one task --------------------------------------------------------------------------------
    def inner_step(
        self, params: Params, lrs: Mapping[str, Tensor | float], x: Tensor, y: Tensor, create_graph: bool
    ) -> Params:
        """One gradient step on the support loss; a pure function of ``params``."""
        fast = {n: params[n] for n in self.adapted}

        def support_loss(fast_params: Params) -> Tensor:
            out, _ = functional_call(self.model, {**params, **fast_params}, (x,))
            return self.loss(out, y)

        grads = grad(support_loss)(fast)
        if not create_graph:
            grads = {n: g.detach() for n, g in grads.items()}
        return {**params, **{n: fast[n] - lrs[n] * grads[n] for n in self.adapted}}

    def adapt(
        self,
        params: Params,
        lrs: Mapping[str, Tensor | float],
        x: Tensor,
        y: Tensor,
        steps: int | None = None,
        create_graph: bool | None = None,
    ) -> Params:
        """``steps`` inner steps from ``params`` (default: the configured number and order)."""
        steps = self.cfg.inner_steps if steps is None else steps
        create_graph = (not self.cfg.first_order) if create_graph is None else create_graph
        for _ in range(steps):
            params = self.inner_step(params, lrs, x, y, create_graph)
        return params

    def task_objective(
        self,
        params: Params,
        lrs: Mapping[str, Tensor | float],
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
        extra: Mapping[str, Tensor],
        objective: Objective | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Adapt on the support set, then the outer loss on the query set (one task)."""
        adapted = self.adapt(params, lrs, sx, sy)
        out, feats = functional_call(self.model, adapted, (qx,))
        if objective is None:
            return self.query_loss(out, qy)
        return objective(out, feats, qy, extra)

    def query_loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The plain task loss on the labelled query points (the first ``len(y)`` outputs)."""
        out = out[: y.shape[0]]
        loss = self.loss(out, y)
        aux = {"task_loss": loss}
        if self.task == "classification":
            aux["accuracy"] = accuracy(out, y)
        return loss, aux

    # --- a meta-batch ----------------------------------------------------------------------------
    def map_tasks(self, fn: Callable, batch_args: tuple, shared: tuple = ()) -> object:
        """Apply ``fn(*shared, *per_task_args)`` to every task, batched as configured."""
        if self.batching == "vmap":
            in_dims = (None,) * len(shared) + (0,) * len(batch_args)
            return vmap(fn, in_dims=in_dims, randomness="different")(*shared, *batch_args)
        n = batch_args[0].shape[0]
        results = [fn(*shared, *(_index(a, i) for a in batch_args)) for i in range(n)]
        return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *results)

    def meta_backward(
        self,
        batch: TaskBatch,
        objective: Objective | None = None,
        extra: Mapping[str, Tensor] | None = None,
        query_x: Tensor | None = None,
    ) -> dict[str, float]:
        """Accumulate the meta-gradient of the mean outer loss into ``.grad``; return metrics.

        With ``cfg.chunk > 0`` the tasks go through in chunks whose gradients add up to the
        same result, so peak memory is bounded by the chunk, not the meta-batch.
        """
        qx_all = batch.query_x if query_x is None else query_x
        extra = dict(extra or {})
        total = batch.num_tasks
        sums: dict[str, float] = {}
        size = self.cfg.chunk if self.cfg.chunk > 0 else total
        params, lrs = self.params(), self.lrs()
        for start in range(0, total, size):
            stop = min(start + size, total)
            args = (
                batch.support_x[start:stop],
                batch.support_y[start:stop],
                qx_all[start:stop],
                batch.query_y[start:stop],
                {k: v[start:stop] for k, v in extra.items()},
            )

            def per_task(p, r, sx, sy, qx, qy, ex):  # noqa: ANN001, ANN202 - traced by vmap
                return self.task_objective(p, r, sx, sy, qx, qy, ex, objective)

            losses, aux = self.map_tasks(per_task, args, shared=(params, lrs))
            (losses.sum() / total).backward()
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
            sums["loss"] = sums.get("loss", 0.0) + float(losses.detach().sum())
        return {k: v / total for k, v in sums.items()}

    @torch.no_grad()
    def adaptation_curve(self, batch: TaskBatch, steps: int) -> dict[str, Tensor]:
        """Query loss (and accuracy) after 0..steps inner steps, per task: ``[steps+1, T]``.

        Used for meta-validation and meta-test; builds no graph.
        """
        params = {n: p.detach() for n, p in self.params().items()}
        lrs = {n: (r.detach() if isinstance(r, Tensor) else r) for n, r in self.lrs().items()}

        def curve(p, r, sx, sy, qx, qy):  # noqa: ANN001, ANN202 - traced by vmap
            rows: dict[str, list[Tensor]] = {}
            for s in range(steps + 1):
                out, _ = functional_call(self.model, p, (qx,))
                _, aux = self.query_loss(out, qy)
                for k, v in aux.items():
                    rows.setdefault(k, []).append(v)
                if s < steps:
                    p = self.inner_step(p, r, sx, sy, create_graph=False)
            return {k: torch.stack(v) for k, v in rows.items()}

        args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        out = self.map_tasks(curve, args, shared=(params, lrs))
        return {k: v.transpose(0, 1) for k, v in out.items()}  # type: ignore[union-attr]


def resolve_batching(choice: str, model: nn.Module) -> str:
    """``auto`` picks what the benchmark measured as faster for this kind of model on the CPU."""
    if choice != "auto":
        return choice
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return "loop" if has_conv else "vmap"


def _key(name: str) -> str:
    return name.replace(".", "__")


def _index(tree: object, i: int) -> object:
    return torch.utils._pytree.tree_map(lambda t: t[i], tree)
