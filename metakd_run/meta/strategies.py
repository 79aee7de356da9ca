"""How the tasks of a meta-batch are computed: ``loop``, ``vmap`` or ``batched``, behind one interface.

MAML (``meta/maml.py``) is the same algorithm for every strategy: start every task at the
meta-parameters, adapt each on its own support set, run each on its own query inputs, score each
with a per-task objective. A strategy decides only *how* the tasks go through those steps, and
which is fastest depends on the model and the shape (``scripts/benchmark.py`` measures them):

- ``loop``: a Python loop over tasks with plain ``torch.autograd.grad``; wins for convolutions on
  a CPU (vmapped convolutions are slower, and ``grad`` without the functorch layers is the same
  arithmetic, measured 1.6x faster on conv4). There, a conv model's tasks run one per graph
  (``default_chunk``), in as many worker threads as torch has intra-op threads
  (:meth:`LoopStrategy.backward`).
- ``vmap``: ``torch.func.vmap`` over the per-task step, whose gradient comes from
  ``torch.func.grad``; second order comes from running it inside the graph that the outer
  ``backward`` differentiates.
- ``batched``: every task gets its own view of the parameters (``expand``), the model's
  ``batched_forward`` runs all tasks at once (``bmm`` / grouped convolution), and one plain
  ``torch.autograd.grad`` gives all per-task inner gradients, with far fewer and larger ops than
  vmap. Needs a model with ``batched_forward``. A model that also writes its gradients and
  Hessian-vector products out (``batched_gradients`` / ``batched_hvp``: the ReLU MLP) skips
  autograd: its inner steps use the closed-form gradient, and the plain MAML objective's
  meta-gradient is carried back through them by hand (:meth:`BatchedStrategy.meta_gradient`),
  about 1.8x the autograd-batched step on the sinusoid (the step costs its op count there).

The interface (:class:`Strategy`): ``start`` (every task at the meta-parameters), ``adapt``
(inner steps of every task, with or without a graph), ``forward`` (every task's outputs and
features, stacked ``[T, ...]``), ``map`` (a function written for ONE task, applied to every task)
and ``chunked`` (the one place that splits a meta-batch into pieces and joins the results). The
per-task parameters a strategy hands from ``start`` to ``adapt`` to ``forward`` are its own
business: a list of dicts (loop), shared plus per-task tensors (vmap), expanded tensors (batched).

First order (``create_graph=False``) takes the inner gradients as if the parameters were leaves:
the meta-gradient then flows only through the identity path of the update.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_map

from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.auto import device_of, has_conv, resolve_batching
from metakd_run.meta.inner import autograd_step, sgd_step, sgd_update
from metakd_run.meta.losses import TASK_LOSS, Params, Rates, losses_per_task
from metakd_run.meta.threads import WORKER, call_model, pool, thread_state
from metakd_run.meta.threads import replicas as model_replicas

Piece = Callable[..., tuple[Tensor, dict[str, Tensor]]]  # a chunk's loss to back-propagate, and its metrics
P = TypeVar("P")  # a strategy's per-task parameters
R = TypeVar("R")


class Strategy(ABC, Generic[P]):
    """How every task of a meta-batch is adapted and run; ``P`` is its per-task parameters."""

    name: ClassVar[str]

    def __init__(self, model: nn.Module, task: str, adapted: list[str], chunk: int) -> None:
        self.model = model
        self.task = task
        self.loss = TASK_LOSS[task]
        self.adapted = adapted
        self.chunk = chunk

    @staticmethod
    def default_chunk(model: nn.Module) -> int:  # noqa: ARG004
        """Tasks per piece when ``meta.chunk=0``: 0 runs the whole meta-batch at once."""
        return 0

    @abstractmethod
    def start(self, params: Params, tasks: int) -> P:
        """Every one of ``tasks`` tasks at the meta-parameters ``params``."""

    @abstractmethod
    def adapt(self, p: P, lrs: Rates, x: Tensor, y: Tensor, steps: int, create_graph: bool) -> P:
        """``steps`` inner steps of every task on its own support set ``x [T, S, ...]``."""

    @abstractmethod
    def replace(self, p: P, values: Params) -> P:
        """Every task with the non-adapted parameters in ``values`` set to those (shared) values.

        MAML++'s per-step batch-norm weights: the step decides them, the tasks share them.
        """

    @abstractmethod
    def forward(self, p: P, x: Tensor, features: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """Every task's outputs and features on its own inputs ``x [T, N, ...]``, stacked ``[T, ...]``.

        ``features=False`` may return no features (``{}``): the loop then skips stacking every
        feature map of every task, a full copy of the activations that the plain query loss never reads.
        """

    def map(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn`` written for ONE task, applied to every task; args and results lead with ``T``."""
        return vmap(fn, randomness="different")(*args)

    def chunked(self, fn: Callable[..., R], *args: Any) -> R:
        """``fn`` on consecutive pieces of at most ``chunk`` tasks, results joined along dim 0.

        Every argument leads with the task dimension (a TaskBatch, a tensor, a dict of tensors), and
        so does every tensor ``fn`` returns. Peak memory is then bounded by the piece, not the
        meta-batch; the results are those of one call on all tasks.
        """
        pieces = self._pieces(_num_tasks(args[0]))
        if len(pieces) == 1:
            return fn(*args)
        parts = [fn(*(_cut(a, i, j) for a in args)) for i, j in pieces]
        return tree_map(lambda *xs: torch.cat(xs), *parts)

    def _pieces(self, total: int) -> list[tuple[int, int]]:
        """The task ranges ``[i, j)`` a meta-batch of ``total`` tasks is cut into (``chunk`` each)."""
        if not 0 < self.chunk < total:
            return [(0, total)]
        return [(i, min(i + self.chunk, total)) for i in range(0, total, self.chunk)]

    def backward(self, piece: Piece, wrt: Sequence[Tensor], *args: Any) -> dict[str, Tensor]:
        """``piece`` on each chunk (as :meth:`chunked`); each chunk's loss goes back into ``.grad``.

        ``piece`` returns the chunk's loss and its per-task metrics (leading with ``T``, detached);
        the metrics come back joined. ``wrt`` lists every leaf the loss may reach (the trainee's
        parameters): a strategy that runs chunks concurrently needs it; this one calls ``backward``.
        """

        def one(*a: Any) -> dict[str, Tensor]:
            loss, metrics = piece(*a)
            loss.backward()
            return metrics

        return self.chunked(one, *args)


class LoopStrategy(Strategy[list[Params]]):
    """A Python loop over tasks, ``torch.autograd.grad`` per task: the per-task parameters are a list.

    On a CPU with several threads, a convolutional model's meta-batch is split between as many
    worker threads as ``torch.get_num_threads()``, each running its tasks with one intra-op thread
    (:meth:`backward`). Why: a conv4 task's small support-set ops do not keep two cores busy, and
    torch releases the GIL inside every op. Measured on the 2-core CPU, in one process each,
    interleaved against the same loop with the threads switched off: 1.04x (Omniglot 5-way 1-shot,
    second order) and 1.06x (first order); on miniImageNet's larger images nothing (1.00x second
    order, 0.94x first), where one task's ops fill both cores already. Each worker owns a fixed
    share of the tasks and sums its gradients in task order, and the shares are added in worker
    order, so a run is reproducible for a given thread count.
    """

    name = "loop"
    _leaves_checked = False  # set by the first threaded step (_check_leaves)

    def backward(self, piece: Piece, wrt: Sequence[Tensor], *args: Any) -> dict[str, Tensor]:
        bounds = self._pieces(_num_tasks(args[0]))
        threads = torch.get_num_threads()
        workers = min(len(bounds), threads)
        if workers < 2 or not has_conv(self.model) or device_of(self.model).type != "cpu":
            return super().backward(piece, wrt, *args)
        leaves = [w for w in wrt if w.requires_grad]
        state = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

        replicas = model_replicas(self.model, workers)  # made here: no thread copies a model another uses

        def share(w: int) -> tuple[list[Tensor | None], list[tuple[int, dict[str, Tensor]]]]:
            grads: list[Tensor | None] = [None] * len(leaves)
            metrics = []
            torch.set_num_threads(1)  # this thread's intra-op threads (OpenMP's setting is per thread)
            WORKER.models = {id(self.model): replicas[w]}
            try:
                with thread_state(*state):
                    for k in range(w, len(bounds), workers):
                        loss, m = piece(*(_cut(a, *bounds[k]) for a in args))
                        self._check_leaves(loss, leaves)
                        got = torch.autograd.grad(loss, leaves, allow_unused=True)
                        grads = [a if b is None else b if a is None else a + b for a, b in zip(grads, got)]
                        metrics.append((k, m))
            finally:
                WORKER.models = {}
            return grads, metrics

        try:
            shares = list(pool(workers).map(share, range(workers)))
        finally:
            torch.set_num_threads(threads)  # MKL's setting is global: put it back for everyone
        for i, leaf in enumerate(leaves):
            parts = [g[i] for g, _ in shares if g[i] is not None]
            if parts:
                summed = torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]
                leaf.grad = summed if leaf.grad is None else leaf.grad + summed
        ordered = sorted((m for _, ms in shares for m in ms), key=lambda km: km[0])
        return tree_map(lambda *xs: torch.cat(xs), *[m for _, m in ordered])

    def _check_leaves(self, loss: Tensor, leaves: list[Tensor]) -> None:
        """Once per strategy: every leaf the loss reaches is in ``wrt`` (else a gradient would be lost)."""
        if self._leaves_checked:
            return
        listed = {id(t) for t in leaves}
        missing = [tuple(t.shape) for t in _graph_leaves(loss) if id(t) not in listed]
        if missing:
            raise RuntimeError(f"meta_backward's wrt misses leaves the loss reaches (shapes {missing})")
        self._leaves_checked = True

    @staticmethod
    def default_chunk(model: nn.Module) -> int:
        # Convolutions: one task per graph. Each task's backward runs as soon as its loss exists and
        # frees its activations, so peak memory is one task's graph instead of the meta-batch's
        # (omniglot_20w1s second order: 5.3 GB -> 0.4 GB), at the same speed or slightly better.
        # Small MLP steps are op-count bound: there one backward for the whole batch is cheaper.
        return 1 if has_conv(model) else 0

    def start(self, params: Params, tasks: int) -> list[Params]:
        return [params] * tasks

    def adapt(
        self, p: list[Params], lrs: Rates, x: Tensor, y: Tensor, steps: int, create_graph: bool
    ) -> list[Params]:
        def one_task(params: Params, xt: Tensor, yt: Tensor) -> Params:
            for _ in range(steps):
                params = autograd_step(self._call, self.loss, self.adapted, params, lrs, xt, yt, create_graph)
            return params

        return [one_task(pt, xt, yt) for pt, xt, yt in zip(p, x, y)]

    def replace(self, p: list[Params], values: Params) -> list[Params]:
        return [{**pt, **values} for pt in p]

    def forward(self, p: list[Params], x: Tensor, features: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        results = [self._call(pt, xt) for pt, xt in zip(p, x)]
        if not features:
            return torch.stack([out for out, _ in results]), {}
        return _stack(results)

    def map(self, fn: Callable[..., R], *args: Any) -> R:
        return _stack([fn(*tree_map(lambda a: a[t], args)) for t in range(_num_tasks(args))])

    def _call(self, params: Params, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return call_model(self.model, params, x)


@dataclass(frozen=True)
class VmapParams:
    """vmap's per-task parameters: the adapted ones per task (once adapted), the rest shared."""

    shared: Params  # every parameter, the same for all tasks
    fast: Params  # the adapted ones: ``[T, ...]`` if ``per_task``, else still the shared values
    per_task: bool


class VmapStrategy(Strategy[VmapParams]):
    """``torch.func.vmap`` over :func:`sgd_step` and the model's own forward."""

    name = "vmap"

    def start(self, params: Params, tasks: int) -> VmapParams:  # noqa: ARG002 - vmap needs no copies
        return VmapParams(params, {n: params[n] for n in self.adapted}, per_task=False)

    def adapt(
        self, p: VmapParams, lrs: Rates, x: Tensor, y: Tensor, steps: int, create_graph: bool
    ) -> VmapParams:
        if steps == 0:
            return p

        def one_task(fast: Params, xt: Tensor, yt: Tensor) -> Params:
            params = {**p.shared, **fast}
            for _ in range(steps):
                params = sgd_step(self.model, self.loss, self.adapted, params, lrs, xt, yt, create_graph)
            return {n: params[n] for n in self.adapted}

        in_dims = (0 if p.per_task else None, 0, 0)
        fast = vmap(one_task, in_dims=in_dims, randomness="different")(p.fast, x, y)
        return VmapParams(p.shared, fast, per_task=True)

    def replace(self, p: VmapParams, values: Params) -> VmapParams:
        return VmapParams({**p.shared, **values}, p.fast, p.per_task)

    def forward(self, p: VmapParams, x: Tensor, features: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        def one_task(fast: Params, xt: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            return functional_call(self.model, {**p.shared, **fast}, (xt,))

        return vmap(one_task, in_dims=(0 if p.per_task else None, 0), randomness="different")(p.fast, x)


class BatchedStrategy(Strategy[Params]):
    """All tasks in one graph through ``model.batched_forward``; per-task parameters lead with ``T``."""

    name = "batched"

    def __init__(self, model: nn.Module, task: str, adapted: list[str], chunk: int) -> None:
        if not hasattr(model, "batched_forward"):
            raise ValueError(
                f"meta.batching=batched needs a model with batched_forward; {type(model).__name__} has none"
            )
        super().__init__(model, task, adapted, chunk)

    @staticmethod
    def default_chunk(model: nn.Module) -> int:
        # Grouped convolutions over all tasks at once are memory-bound on a CPU; a few tasks per
        # graph keep each layer's activations in cache (measured: 4 tasks is the sweet spot).
        return 4 if has_conv(model) else 0

    def start(self, params: Params, tasks: int) -> Params:
        if self.closed_form:  # shared until the first step makes them per task (broadcasting)
            return dict(params)
        return {n: v.unsqueeze(0).expand(tasks, *v.shape) for n, v in params.items()}

    @property
    def closed_form(self) -> bool:
        """Whether the model writes its per-task gradients out (``batched_gradients``): MLP with ReLU."""
        return bool(getattr(self.model, "has_batched_gradients", False))

    def adapt(self, p: Params, lrs: Rates, x: Tensor, y: Tensor, steps: int, create_graph: bool) -> Params:
        if self.closed_form:
            for _ in range(steps):
                p = self._closed_form_step(p, lrs, x, y, create_graph)
            return p
        forward = self.model.batched_forward
        for _ in range(steps):
            p = autograd_step(forward, self._summed_loss, self.adapted, p, lrs, x, y, create_graph)
        return p

    def replace(self, p: Params, values: Params) -> Params:
        if self.closed_form:  # shared values broadcast
            return {**p, **values}
        tasks = next(iter(p.values())).shape[0]
        return {**p, **{n: v.unsqueeze(0).expand(tasks, *v.shape) for n, v in values.items()}}

    def _closed_form_step(self, p: Params, lrs: Rates, x: Tensor, y: Tensor, create_graph: bool) -> Params:
        """One step with the model's own written-out gradient (``batched_gradients``), no autograd.

        Second order: the gradient is an ordinary expression of ``p``, so the outer backward
        differentiates through it. First order: computed from detached values, it is a constant.
        """
        loss_grad = partial(self._loss_grad, y=y)
        if create_graph:
            grads, _ = self.model.batched_gradients(p, x, loss_grad, self.adapted)
        else:
            with torch.no_grad():
                detached = {n: v.detach() for n, v in p.items()}
                grads, _ = self.model.batched_gradients(detached, x, loss_grad, self.adapted)
        return {**p, **{n: sgd_update(p[n], lrs[n], grads[n]) for n in self.adapted}}

    def meta_gradient(
        self, params: Params, lrs: Rates, batch: TaskBatch, steps: int, first_order: bool, scale: float = 1.0
    ) -> tuple[Params, dict[str, Tensor], Tensor]:
        """MAML's meta-gradient of the summed query losses, in closed form: no autograd at all.

        For models with ``batched_hvp`` (the ReLU MLP) and the plain query loss. The inner steps run
        forward, keeping each step's point; the query loss's gradient at the adapted point is then
        carried back through each step ``theta' = theta - lr * g(theta)`` by its transpose Jacobian,
        ``adjoint -= H(theta) (lr * adjoint)`` (``H`` the support loss's Hessian, a closed-form
        Hessian-vector product; skipped for first order, where the update's Jacobian is the
        identity), and the learned rates collect ``-g(theta) * adjoint``. Returns the gradients of
        ``scale`` times the summed query losses w.r.t. ``params`` and the tensor rates in ``lrs``,
        and the query outputs. Call it under ``torch.no_grad()``.
        """
        model = self.model
        support_grad = partial(self._loss_grad, y=batch.support_y)
        points, caches = [], []
        theta = dict(params)
        for _ in range(steps):
            grads, cache = model.batched_gradients(theta, batch.support_x, support_grad)
            points.append(theta)
            caches.append((grads, cache))
            theta = {**theta, **{n: sgd_update(theta[n], lrs[n], grads[n]) for n in self.adapted}}
        query_grad = partial(self._loss_grad, y=batch.query_y, scale=scale)
        adjoint, query = model.batched_gradients(theta, batch.query_x, query_grad)
        lr_grads: dict[str, Tensor] = {}
        support_hvp = partial(self._loss_hvp, y=batch.support_y)
        for theta, (grads, cache) in zip(reversed(points), reversed(caches)):
            for n in self.adapted:
                if isinstance(lrs[n], Tensor):
                    lr_grads[n] = lr_grads.get(n, 0) - (grads[n] * adjoint[n]).sum(0)
            if not first_order:
                # (theta - lr g(theta))' adjoint = adjoint - H (lr * adjoint); a number lr comes out
                # of the (linear) product and folds into the subtraction: fewer ops
                rates = {lrs[n] if isinstance(lrs[n], float | int) else None for n in self.adapted}
                lr = rates.pop() if len(rates) == 1 else None  # one plain-number rate for all
                direction = {n: adjoint[n] if lr else lrs[n] * adjoint[n] for n in self.adapted}
                hv = model.batched_hvp(theta, cache, direction, support_hvp)
                adjoint = {
                    n: a if n not in hv else sgd_update(a, lr, hv[n]) if lr else a - hv[n]
                    for n, a in adjoint.items()
                }
        return {n: a.sum(0) for n, a in adjoint.items()}, lr_grads, query.out

    @property
    def has_meta_gradient(self) -> bool:
        """Whether :meth:`meta_gradient` applies to this model."""
        return self.closed_form and hasattr(self.model, "batched_hvp")

    def _loss_grad(self, out: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
        """``scale`` times the gradient of :meth:`_summed_loss` w.r.t. the outputs ``out [T, B, ...]``."""
        if self.task == "regression":  # d/d out of mean((out - y)^2) over each task's B x D entries
            return (out - y) * (2.0 * scale / out[0].numel())
        # d/d logits of each task's mean cross-entropy: (softmax - one-hot) / B
        onehot = F.one_hot(y, out.shape[-1]).to(out.dtype)
        return (torch.softmax(out, dim=-1) - onehot) * (scale / out.shape[1])

    def _loss_hvp(self, out: Tensor, d_out: Tensor, y: Tensor) -> Tensor:  # noqa: ARG002 - y for MSE
        """The Hessian of :meth:`_summed_loss` w.r.t. the outputs, times ``d_out`` (same shape)."""
        if self.task == "regression":
            return d_out * (2.0 / out[0].numel())
        # softmax's Jacobian: diag(s) - s s^T, per output row, over each task's B rows
        s = torch.softmax(out, dim=-1)
        return s * (d_out - (s * d_out).sum(-1, keepdim=True)) / out.shape[1]

    def forward(self, p: Params, x: Tensor, features: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        return self.model.batched_forward(p, x)

    def _summed_loss(self, out: Tensor, y: Tensor) -> Tensor:
        # the sum of per-task means: its gradient w.r.t. each task's parameters is that task's own
        return losses_per_task(self.task, out, y).sum()


STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (LoopStrategy, VmapStrategy, BatchedStrategy)}


def make_strategy(
    choice: str,
    chunk: int,
    model: nn.Module,
    task: str,
    adapted: list[str],
    device: torch.device | str | None = None,
    task_pixels: int = 0,
) -> Strategy:
    """The strategy ``meta.batching`` names (``auto``: by model, device and task size); ``chunk`` 0
    takes its default."""
    cls = STRATEGIES[resolve_batching(choice, model, device, task_pixels)]
    return cls(model, task, adapted, chunk or cls.default_chunk(model))


# --- helpers ------------------------------------------------------------------------------------------
def _graph_leaves(t: Tensor) -> list[Tensor]:
    """The leaf tensors whose ``.grad`` back-propagating ``t`` would fill (its AccumulateGrad nodes)."""
    seen, stack, leaves = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


def _num_tasks(tree: object) -> int:
    if isinstance(tree, TaskBatch):
        return tree.num_tasks
    return tree_flatten(tree)[0][0].shape[0]


def _cut(tree: object, start: int, stop: int) -> object:
    if isinstance(tree, TaskBatch):
        return tree.slice(start, stop)
    return tree_map(lambda t: t[start:stop], tree)


def _stack(results: list[R]) -> R:
    return tree_map(lambda *xs: torch.stack(xs), *results)
