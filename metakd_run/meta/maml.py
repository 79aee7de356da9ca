"""MAML, first-order MAML, Meta-SGD and ANIL as pure functions of parameters.

The inner loop is written for one task as a function of a parameter dict (``torch.func``), and
a meta-batch goes through one of three strategies behind the same interface, because which is
fastest depends on the shape (``scripts/benchmark.py`` measures them):

- ``vmap``: ``torch.func.vmap`` over the per-task function; second order comes from running
  ``torch.func.grad`` inside the graph that the outer ``backward`` differentiates.
- ``loop``: the same per-task function in a Python loop; wins for convolutions on a CPU.
- ``batched``: every task gets its own view of the parameters (``expand``), the model's
  ``batched_forward`` runs all tasks at once (``bmm`` / grouped convolution), and plain
  ``torch.autograd.grad`` gives all per-task inner gradients in one call, with far fewer and
  larger ops than vmap. Needs a model with ``batched_forward``.

First order detaches the inner gradients, so the meta-gradient flows only through the identity
path of the update. The per-task query objective (task loss, distillation) is written once, for
one task, and vmapped in every strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from metakd_run.data.tasks import TaskBatch

Params = dict[str, Tensor]
Rates = Mapping[str, Tensor | float]
LossFn = Callable[[Tensor, Tensor], Tensor]
# objective(output, features, query_targets, extra) -> (loss, {name: scalar}), for ONE task
Objective = Callable[[Tensor, dict[str, Tensor], Tensor, Mapping[str, Tensor]], tuple[Tensor, dict]]

BATCHING = ("auto", "vmap", "loop", "batched")


def mse_loss(out: Tensor, y: Tensor) -> Tensor:
    return ((out - y) ** 2).mean()


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y)


def accuracy(out: Tensor, y: Tensor) -> Tensor:
    return (out.argmax(-1) == y).to(out.dtype).mean()


def batched_task_losses(task: str, out: Tensor, y: Tensor) -> Tensor:
    """Per-task mean losses ``[T]`` for outputs ``[T, B, ...]``, without vmap."""
    if task == "regression":
        return ((out - y) ** 2).flatten(1).mean(1)
    t, b = y.shape[:2]
    return F.cross_entropy(out.reshape(t * b, -1), y.reshape(t * b), reduction="none").view(t, b).mean(1)


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
        # Grouped convolutions over all tasks at once are memory-bound on a CPU; a few tasks per
        # graph keep each layer's activations in cache (measured: 4 tasks is the sweet spot).
        self.chunk = cfg.chunk or (4 if self.batching == "batched" and _has_conv(model) else 0)
        if self.batching == "batched" and not hasattr(model, "batched_forward"):
            raise ValueError(
                f"meta.batching=batched needs a model with batched_forward; {type(model).__name__} has none"
            )

    # --- parameters ------------------------------------------------------------------------------
    def params(self) -> Params:
        """The meta-parameters as a dict (the live ``nn.Parameter`` objects, so grads land on them)."""
        return dict(self.model.named_parameters())

    def lrs(self) -> dict[str, Tensor | float]:
        if self.inner_lrs is None:
            return {n: self.cfg.inner_lr for n in self.adapted}
        return {n: self.inner_lrs[_key(n)] for n in self.adapted}

    def frozen(self) -> tuple[Params, dict[str, Tensor | float]]:
        """Detached parameters and rates, for adaptation that must build no graph."""
        lrs = {n: (r.detach() if isinstance(r, Tensor) else r) for n, r in self.lrs().items()}
        return {n: p.detach() for n, p in self.params().items()}, lrs

    # --- one task (vmap and loop) ------------------------------------------------------------------
    def inner_step(self, params: Params, lrs: Rates, x: Tensor, y: Tensor, create_graph: bool) -> Params:
        """One gradient step on the support loss; a pure function of ``params`` (one task).

        Under vmap the gradient comes from ``torch.func.grad``; the ``loop`` strategy uses plain
        ``torch.autograd.grad`` instead, which is the same arithmetic without the functorch
        layers (measured 1.6x faster on conv4).
        """
        if self.batching == "loop":
            return self._autograd_step(
                lambda p, inp: functional_call(self.model, p, (inp,)),
                self.loss,
                params,
                lrs,
                x,
                y,
                create_graph,
            )
        fast = {n: params[n] for n in self.adapted}

        def support_loss(fast_params: Params) -> Tensor:
            out, _ = functional_call(self.model, {**params, **fast_params}, (x,))
            return self.loss(out, y)

        grads = grad(support_loss)(fast)
        if not create_graph:
            grads = {n: g.detach() for n, g in grads.items()}
        return {**params, **{n: fast[n] - lrs[n] * grads[n] for n in self.adapted}}

    def _autograd_step(
        self,
        forward: Callable,
        loss_fn: Callable,
        p: Params,
        lrs: Rates,
        x: Tensor,
        y: Tensor,
        create_graph: bool,
    ) -> Params:
        """A gradient step with ``torch.autograd.grad`` (no vmap): the loop and batched paths."""
        if create_graph:
            out, _ = forward(p, x)
            grads = torch.autograd.grad(loss_fn(out, y), [p[n] for n in self.adapted], create_graph=True)
        else:
            # The gradient as if the parameters were leaves: no graph through it (first order,
            # a frozen teacher, evaluation), while ``p`` itself may still carry the meta-graph.
            leaves = {n: v.detach().requires_grad_(n in self.adapted) for n, v in p.items()}
            with torch.enable_grad():
                out, _ = forward(leaves, x)
                grads = torch.autograd.grad(loss_fn(out, y), [leaves[n] for n in self.adapted])
        return {**p, **{n: p[n] - lrs[n] * g for n, g in zip(self.adapted, grads)}}

    def adapt(
        self,
        params: Params,
        lrs: Rates,
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

    def query_loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The plain task loss on the labelled query points (the first ``len(y)`` outputs)."""
        out = out[: y.shape[0]]
        loss = self.loss(out, y)
        aux = {"task_loss": loss}
        if self.task == "classification":
            aux["accuracy"] = accuracy(out, y)
        return loss, aux

    def batched_query_loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`query_loss` for all tasks at once: ``out [T, B(+U), ...]``, ``y [T, B]``."""
        out = out[:, : y.shape[1]]
        losses = batched_task_losses(self.task, out, y)
        aux = {"task_loss": losses}
        if self.task == "classification":
            aux["accuracy"] = (out.argmax(-1) == y).to(out.dtype).mean(1)
        return losses, aux

    def _plain_objective(self, out: Tensor, feats: dict, y: Tensor, extra: Mapping) -> tuple[Tensor, dict]:  # noqa: ARG002
        return self.query_loss(out, y)

    def map_tasks(self, fn: Callable, batch_args: tuple, shared: tuple = ()) -> object:
        """Apply ``fn(*shared, *per_task_args)`` to every task: vmapped, or looped for ``loop``."""
        if self.batching == "loop":
            n = batch_args[0].shape[0]
            results = [fn(*shared, *(_index(a, i) for a in batch_args)) for i in range(n)]
            return torch.utils._pytree.tree_map(lambda *xs: torch.stack(xs), *results)
        in_dims = (None,) * len(shared) + (0,) * len(batch_args)
        return vmap(fn, in_dims=in_dims, randomness="different")(*shared, *batch_args)

    # --- all tasks at once (batched) ---------------------------------------------------------------
    def batched_step(self, p: Params, lrs: Rates, x: Tensor, y: Tensor, create_graph: bool) -> Params:
        """One inner step for all tasks; ``p`` holds per-task parameters ``[T, ...]``."""
        return self._autograd_step(
            self.model.batched_forward, self._summed_task_loss, p, lrs, x, y, create_graph
        )

    def _summed_task_loss(self, out: Tensor, y: Tensor) -> Tensor:
        # the sum of per-task means: its gradient w.r.t. each task's parameters is that task's own
        return batched_task_losses(self.task, out, y).sum()

    def expand(self, params: Params, tasks: int) -> Params:
        return {n: v.unsqueeze(0).expand(tasks, *v.shape) for n, v in params.items()}

    # --- a meta-batch ------------------------------------------------------------------------------
    def task_losses(
        self,
        batch: TaskBatch,
        objective: Objective | None,
        extra: Mapping[str, Tensor],
        query_x: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-task outer losses ``[T]`` (and metrics) after adapting on each support set."""
        objective = objective or self._plain_objective
        params, lrs = self.params(), self.lrs()
        second = not self.cfg.first_order
        if self.batching == "batched":
            p = self.expand(params, batch.num_tasks)
            for _ in range(self.cfg.inner_steps):
                p = self.batched_step(p, lrs, batch.support_x, batch.support_y, second)
            out, feats = self.model.batched_forward(p, query_x)
            if objective is self._plain_objective:  # the common case, without vmap's dispatch cost
                return self.batched_query_loss(out, batch.query_y)
            return vmap(objective)(out, feats, batch.query_y, dict(extra))

        def per_task(p, r, sx, sy, qx, qy, ex):  # noqa: ANN001, ANN202 - traced by vmap
            adapted = self.adapt(p, r, sx, sy)
            out, feats = functional_call(self.model, adapted, (qx,))
            return objective(out, feats, qy, ex)

        args = (batch.support_x, batch.support_y, query_x, batch.query_y, dict(extra))
        return self.map_tasks(per_task, args, shared=(params, lrs))  # type: ignore[return-value]

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
        size = self.chunk if self.chunk > 0 else total
        sums: dict[str, Tensor] = {}
        for start in range(0, total, size):
            stop = min(start + size, total)
            part = batch.slice(start, stop)
            losses, aux = self.task_losses(
                part, objective, {k: v[start:stop] for k, v in extra.items()}, qx_all[start:stop]
            )
            (losses.sum() / total).backward()
            for k, v in {**aux, "loss": losses}.items():
                sums[k] = sums.get(k, 0.0) + v.detach().sum()
        return {k: float(v) / total for k, v in sums.items()}

    @torch.no_grad()
    def adapted_outputs(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs and features on ``qx`` after adapting a frozen copy on each task: no graph."""
        steps = self.cfg.inner_steps if steps is None else steps
        params, lrs = self.frozen()
        if self.batching == "batched":
            if 0 < self.chunk < sx.shape[0]:
                parts = [
                    self.adapted_outputs(
                        sx[i : i + self.chunk], sy[i : i + self.chunk], qx[i : i + self.chunk], steps
                    )
                    for i in range(0, sx.shape[0], self.chunk)
                ]
                return torch.utils._pytree.tree_map(lambda *xs: torch.cat(xs), *parts)
            p = self.expand(params, sx.shape[0])
            for _ in range(steps):
                p = self.batched_step(p, lrs, sx, sy, create_graph=False)
            return self.model.batched_forward(p, qx)

        def outputs(p, r, x, y, q):  # noqa: ANN001, ANN202 - traced by vmap
            p = self.adapt(p, r, x, y, steps=steps, create_graph=False)
            return functional_call(self.model, p, (q,))

        return self.map_tasks(outputs, (sx, sy, qx), shared=(params, lrs))  # type: ignore[return-value]

    @torch.no_grad()
    def adaptation_curve(
        self, batch: TaskBatch, steps: int, at: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Query loss (and accuracy) after each inner step in ``at`` (default 0..steps), per task.

        Returns ``{metric: [len(at), T]}``. Used for meta-validation and meta-test; builds no
        graph, and evaluates the query set only at the steps asked for (it costs more than a step).
        """
        at = sorted(set(range(steps + 1) if at is None else at))
        params, lrs = self.frozen()
        if self.batching == "batched" and 0 < self.chunk < batch.num_tasks:
            parts = [self.adaptation_curve(part, steps, at) for part in batch.chunks(self.chunk)]
            return {k: torch.cat([part[k] for part in parts], dim=1) for k in parts[0]}
        if self.batching == "batched":
            p = self.expand(params, batch.num_tasks)
            rows: list[dict[str, Tensor]] = []
            for s in range(steps + 1):
                if s in at:
                    out, _ = self.model.batched_forward(p, batch.query_x)
                    rows.append(self.batched_query_loss(out, batch.query_y)[1])
                if s < steps:
                    p = self.batched_step(p, lrs, batch.support_x, batch.support_y, create_graph=False)
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

        def curve(p, r, sx, sy, qx, qy):  # noqa: ANN001, ANN202 - traced by vmap
            per_step: dict[str, list[Tensor]] = {}
            for s in range(steps + 1):
                if s in at:
                    out, _ = functional_call(self.model, p, (qx,))
                    for k, v in self.query_loss(out, qy)[1].items():
                        per_step.setdefault(k, []).append(v)
                if s < steps:
                    p = self.inner_step(p, r, sx, sy, create_graph=False)
            return {k: torch.stack(v) for k, v in per_step.items()}

        args = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        out = self.map_tasks(curve, args, shared=(params, lrs))
        return {k: v.transpose(0, 1) for k, v in out.items()}  # type: ignore[union-attr]


def resolve_batching(choice: str, model: nn.Module) -> str:
    """``auto`` picks what ``scripts/benchmark.py`` measured as fastest on the 2-core CPU.

    MLPs run ``batched`` (bmm: 17-20x the per-task loop on the sinusoid shape). Convolutional
    networks run a plain ``loop``: vmapped convolutions are 2x slower, and conv4's grouped
    convolutions (``batched``) win only on small shapes (1.2x on the Omniglot CPU preset, 0.7x on
    the paper's Omniglot shape), so the presets that profit set ``meta.batching=batched``
    themselves. Anything else runs ``vmap``. The README's "Speed" section has the figures.
    """
    if choice != "auto":
        return choice
    if _has_conv(model):
        return "loop"
    return "batched" if hasattr(model, "batched_forward") else "vmap"


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _key(name: str) -> str:
    return name.replace(".", "__")


def _index(tree: object, i: int) -> object:
    return torch.utils._pytree.tree_map(lambda t: t[i], tree)
