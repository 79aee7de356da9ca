"""MAML, first-order MAML, Meta-SGD and ANIL, as the papers write them.

For each task ``i`` of a meta-batch: start at the meta-parameters, ``theta_i = theta``; take
``inner_steps`` gradient steps on the support loss, ``theta_i -= alpha * grad L_support(theta_i)``;
score the adapted ``theta_i`` on the query set. The meta-gradient is that of the mean query score
with respect to ``theta`` (and ``alpha`` for Meta-SGD). First-order MAML treats the inner
gradients as constants; ANIL adapts the head alone.

How the tasks of a meta-batch go through those steps (a loop, ``vmap``, or one batched graph)
is a :class:`~metakd_run.meta.strategies.Strategy` chosen by ``meta.batching``; the algorithm
below is written once, for all of them. The query objective is written for ONE task:
``objective(output, features, query_targets, extra) -> (loss, {name: scalar})``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from metakd_run.config import MetaConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.learner import MetaLearner
from metakd_run.meta.strategies import (
    TASK_LOSS,
    Params,
    Rates,
    accuracy,
    losses_per_task,
    sgd_step,
)

# objective(output, features, query_targets, extra) -> (loss, {name: scalar}), for ONE task
Objective = Callable[[Tensor, dict[str, Tensor], Tensor, Mapping[str, Tensor]], tuple[Tensor, dict]]


class MAML(MetaLearner):
    """A model's meta-learned initialisation, its (optionally learned) inner rates, and the loop.

    ``task="regression"`` uses MSE, ``"classification"`` cross-entropy (and reports accuracy).
    ``cfg`` is the ``meta`` config group, read by attribute.
    """

    def __init__(self, model: nn.Module, task: str, cfg: MetaConfig) -> None:
        head = getattr(model, "head_prefix", "head.")
        adapted = [n for n, _ in model.named_parameters() if not cfg.anil or n.startswith(head)]
        if not adapted:
            raise ValueError("no parameter to adapt in the inner loop (ANIL found no head)")
        super().__init__(model, task, cfg, adapted)
        self.loss = TASK_LOSS[task]
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

    # --- parameters ------------------------------------------------------------------------------
    def lrs(self) -> dict[str, Tensor | float]:
        if self.inner_lrs is None:
            return {n: self.cfg.inner_lr for n in self.adapted}
        return {n: self.inner_lrs[_key(n)] for n in self.adapted}

    # --- one task ----------------------------------------------------------------------------------
    def adapt(
        self,
        params: Params,
        lrs: Rates,
        x: Tensor,
        y: Tensor,
        steps: int | None = None,
        create_graph: bool | None = None,
    ) -> Params:
        """``steps`` inner steps of ONE task from ``params`` (default: the configured number and order)."""
        steps = self.cfg.inner_steps if steps is None else steps
        create_graph = (not self.cfg.first_order) if create_graph is None else create_graph
        for _ in range(steps):
            params = sgd_step(self.model, self.loss, self.adapted, params, lrs, x, y, create_graph)
        return params

    def query_loss(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The plain task loss of ONE task on its labelled query points (the first ``len(y)`` outputs)."""
        out = out[: y.shape[0]]
        loss = self.loss(out, y)
        aux = {"task_loss": loss}
        if self.task == "classification":
            aux["accuracy"] = accuracy(out, y)
        return loss, aux

    def query_losses(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`query_loss` of every task at once: ``out [T, B(+U), ...]``, ``y [T, B]`` -> ``[T]``."""
        out = out[:, : y.shape[1]]
        losses = losses_per_task(self.task, out, y)
        aux = {"task_loss": losses}
        if self.task == "classification":
            aux["accuracy"] = accuracy(out, y)
        return losses, aux

    # --- a meta-batch ------------------------------------------------------------------------------
    def task_losses(
        self,
        batch: TaskBatch,
        objective: Objective | None,
        extra: Mapping[str, Tensor],
        query_x: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-task outer losses ``[T]`` (and metrics) after adapting on each support set.

        ``objective`` scores one task (default: :meth:`query_loss`); ``extra`` holds per-task
        tensors it reads (``[T, ...]``), ``query_x`` the inputs it sees (the query set, perhaps more).
        """
        tasks = self.strategy
        fast = tasks.start(self.params(), batch.num_tasks)
        fast = tasks.adapt(
            fast,
            self.lrs(),
            batch.support_x,
            batch.support_y,
            self.cfg.inner_steps,
            create_graph=not self.cfg.first_order,
        )
        out, feats = tasks.forward(fast, query_x, features=objective is not None)
        if objective is None:  # the plain query loss, for all tasks at once
            return self.query_losses(out, batch.query_y)
        return tasks.map(objective, out, feats, batch.query_y, dict(extra))

    def meta_backward(
        self,
        batch: TaskBatch,
        objective: Objective | None = None,
        extra: Mapping[str, Tensor] | None = None,
        query_x: Tensor | None = None,
    ) -> dict[str, float]:
        """Accumulate the meta-gradient of the mean outer loss into ``.grad``; return mean metrics.

        With ``meta.chunk`` (or the strategy's default) the tasks go through in pieces whose
        gradients add up to the same result, so peak memory is bounded by the piece.
        """
        total = batch.num_tasks

        closed_form = (
            objective is None and query_x is None and getattr(self.strategy, "has_meta_gradient", False)
        )

        def backward_piece(
            part: TaskBatch, part_extra: dict[str, Tensor], part_qx: Tensor
        ) -> dict[str, Tensor]:
            if closed_form:
                losses, aux = self._closed_form_backward(part, total)
            else:
                losses, aux = self.task_losses(part, objective, part_extra, part_qx)
                (losses.sum() / total).backward()
            return {k: v.detach() for k, v in {**aux, "loss": losses}.items()}

        qx = batch.query_x if query_x is None else query_x
        metrics = self.strategy.chunked(backward_piece, batch, dict(extra or {}), qx)
        return {k: float(v.mean()) for k, v in metrics.items()}

    @torch.no_grad()
    def _closed_form_backward(self, batch: TaskBatch, total: int) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`meta_backward`'s piece through the strategy's closed-form meta-gradient (no autograd).

        Same result as the autograd path (``tests/test_maml_gradients.py`` holds both to a plain
        per-task loop); the gradients are added to ``.grad`` as ``backward`` would add them.
        """
        # under no_grad the live parameters build no graph: no detached copies needed
        live, lrs = self.params(), self.lrs()
        grads, lr_grads, out = self.strategy.meta_gradient(
            live, lrs, batch, self.cfg.inner_steps, self.cfg.first_order, scale=1.0 / total
        )
        if self.inner_lrs is not None:
            live = {**live, **{f"lr:{n}": lrs[n] for n in self.adapted}}
            grads = {**grads, **{f"lr:{n}": g for n, g in lr_grads.items()}}
        for n, p in live.items():
            if p.requires_grad and n in grads:
                p.grad = grads[n] if p.grad is None else p.grad.add_(grads[n])
        return self.query_losses(out, batch.query_y)

    @torch.no_grad()
    def adapted_outputs(
        self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs and features on ``qx`` after adapting a frozen copy on each task: no graph."""
        steps = self.cfg.inner_steps if steps is None else steps
        params, lrs = self.frozen()
        tasks = self.strategy

        def outputs(sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            fast = tasks.adapt(tasks.start(params, sx.shape[0]), lrs, sx, sy, steps, create_graph=False)
            return tasks.forward(fast, qx)

        return tasks.chunked(outputs, sx, sy, qx)

    @torch.no_grad()
    def adaptation_curve(
        self, batch: TaskBatch, steps: int, at: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Query loss (and accuracy) after each inner step in ``at`` (default 0..steps), per task.

        Returns ``{metric: [len(at), T]}``. Used for meta-validation and meta-test; builds no
        graph, and evaluates the query set only at the steps asked for (it costs more than a step).
        """
        at = sorted({s for s in (range(steps + 1) if at is None else at) if 0 <= s <= steps})
        params, lrs = self.frozen()
        tasks = self.strategy

        def curve(part: TaskBatch) -> dict[str, Tensor]:
            fast, done, rows = tasks.start(params, part.num_tasks), 0, []
            for s in at:
                fast = tasks.adapt(fast, lrs, part.support_x, part.support_y, s - done, create_graph=False)
                done = s
                out, _ = tasks.forward(fast, part.query_x, features=False)
                rows.append(self.query_losses(out, part.query_y)[1])
            return {k: torch.stack([r[k] for r in rows], dim=1) for k in rows[0]}  # [T, len(at)]

        return {k: v.transpose(0, 1) for k, v in tasks.chunked(curve, batch).items()}


def _key(name: str) -> str:
    return name.replace(".", "__")
