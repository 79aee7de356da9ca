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

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metakd_run.config import MetaConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.inner import sgd_step
from metakd_run.meta.learner import MetaLearner
from metakd_run.meta.losses import (  # noqa: F401 - Objective: MAML's surface, re-exported
    TASK_LOSS,
    Objective,
    Params,
    Rates,
    accuracy,
    losses_per_task,
    piece_metrics,
)
from metakd_run.meta.strategies import Strategy
from metakd_run.models.norm import MetaBatchNorm2d

log = logging.getLogger(__name__)


class MAML(MetaLearner):
    """A model's meta-learned initialisation, its (optionally learned) inner rates, and the loop.

    ``task="regression"`` uses MSE, ``"classification"`` cross-entropy (and reports accuracy).
    ``cfg`` is the ``meta`` config group, read by attribute.
    """

    def __init__(self, model: nn.Module, task: str, cfg: MetaConfig) -> None:
        head = getattr(model, "head_prefix", "head.")
        # MAML++'s per-step batch norm: the norms' weights and biases are meta-learned per step and
        # not adapted (as in Antoniou et al.'s code); the model's own serve step 0
        self.norm_names = norm_parameters(model) if cfg.per_step_bn else []
        # said when training starts (begin_iteration), not during the pre-flight, whose errors come alone
        self._notes = []
        if cfg.per_step_bn and not self.norm_names:
            self._notes.append(
                f"meta.per_step_bn: the {type(model).__name__} model has no batch norm, nothing to do"
            )
        if (cfg.msl or cfg.per_step_bn) and cfg.inner_steps < 2:
            self._notes.append(
                f"meta.msl and meta.per_step_bn change nothing with meta.inner_steps={cfg.inner_steps}"
            )
        adapted = [
            n
            for n, _ in model.named_parameters()
            if (not cfg.anil or n.startswith(head)) and n not in self.norm_names
        ]
        if not adapted:
            raise ValueError("no parameter to adapt in the inner loop (ANIL found no head)")
        super().__init__(model, task, cfg, adapted)
        self.loss = TASK_LOSS[task]
        named = dict(model.named_parameters())
        if cfg.learn_inner_lr:
            # Meta-SGD: one learned rate per adapted parameter entry, initialised at inner_lr.
            self.inner_lrs = nn.ParameterDict(
                {_key(n): nn.Parameter(torch.full_like(named[n], cfg.inner_lr)) for n in self.adapted}
            )
        else:
            self.inner_lrs = None
        # MAML++'s LSLR: one learned rate per adapted tensor and per inner step, initialised at inner_lr
        # (in the model's dtype and device, like Meta-SGD's rates above)
        steps = max(cfg.inner_steps, 1)
        self.step_lrs = (
            nn.ParameterDict(
                {_key(n): nn.Parameter(named[n].new_full((steps,), cfg.inner_lr)) for n in self.adapted}
            )
            if cfg.lslr
            else None
        )
        # per-step batch norm: the values of steps 1..S-1, each starting as the model's own
        self.step_norms = nn.ParameterDict(
            {
                _key(n): nn.Parameter(named[n].detach().clone().unsqueeze(0).repeat(steps - 1, 1))
                for n in self.norm_names
                if steps > 1
            }
        )

    # --- parameters ------------------------------------------------------------------------------
    def lrs(self) -> dict[str, Tensor | float]:
        """Each adapted tensor's rate: a number, a tensor like it (Meta-SGD) or ``[S]`` per step (LSLR)."""
        if self.step_lrs is not None:
            return {n: self.step_lrs[_key(n)] for n in self.adapted}
        if self.inner_lrs is None:
            return {n: self.cfg.inner_lr for n in self.adapted}
        return {n: self.inner_lrs[_key(n)] for n in self.adapted}

    @property
    def per_step(self) -> bool:
        """Whether inner steps differ (LSLR rates, per-step batch norm): then they run one at a time."""
        return self.step_lrs is not None or len(self.step_norms) > 0

    def rates_at(self, lrs: Rates, step: int) -> Rates:
        """Inner step ``step``'s rates (0-based); with LSLR, steps past the trained ones reuse the last."""
        if self.step_lrs is None:
            return lrs
        return {n: r[min(step, r.shape[0] - 1)] for n, r in lrs.items()}  # type: ignore[union-attr]

    def norms_at(self, step: int) -> Params:
        """The batch-norm weights and biases that inner step ``step`` (and the query after it) uses.

        Step 0 uses the model's own, which every adaptation starts from (so ``{}``); steps past
        the trained ones take the last trained step's.
        """
        k = min(step, self.cfg.inner_steps - 1)
        if k < 1 or not self.step_norms:
            return {}
        return {n: self.step_norms[_key(n)][k - 1] for n in self.norm_names}

    @property
    def second_order(self) -> bool:
        """Whether this meta-iteration differentiates the inner gradients: not first-order MAML, and
        past MAML++'s first-order start (``meta.first_order_until`` of the stage)."""
        return not self.cfg.first_order and self.progress >= self.cfg.first_order_until

    def begin_iteration(self, iteration: int, total: int) -> None:
        super().begin_iteration(iteration, total)
        for note in self._notes:
            _say_once(note)

    def msl_weights(self) -> list[float] | None:
        """This meta-iteration's multi-step loss weights, or None when only the last step counts."""
        cfg = self.cfg
        if not cfg.msl or cfg.inner_steps < 2 or self.progress >= cfg.msl_until:
            return None
        return msl_weights(cfg.inner_steps, self.progress / cfg.msl_until)

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
        create_graph = self.second_order if create_graph is None else create_graph
        for k in range(steps):
            params = {**params, **self.norms_at(k)}
            rates = self.rates_at(lrs, k)
            params = sgd_step(self.model, self.loss, self.adapted, params, rates, x, y, create_graph)
        return params

    def run_steps(
        self,
        tasks: Strategy,
        fast: Any,
        lrs: Rates,
        x: Tensor,
        y: Tensor,
        start: int,
        stop: int,
        create_graph: bool,
    ) -> Any:
        """Inner steps ``start..stop-1`` of every task (``tasks``' per-task parameters ``fast``).

        All at once when the steps are alike; one at a time, each with its own rates and batch-norm
        values, when they are not (MAML++).
        """
        if not self.per_step:
            return tasks.adapt(fast, lrs, x, y, stop - start, create_graph)
        for k in range(start, stop):
            norms = self.norms_at(k)
            if norms:
                fast = tasks.replace(fast, norms)
            fast = tasks.adapt(fast, self.rates_at(lrs, k), x, y, 1, create_graph)
        return fast

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
        steps, weights = self.cfg.inner_steps, self.msl_weights()
        fast = tasks.start(self.params(), batch.num_tasks)
        lrs, create_graph = self.lrs(), self.second_order
        sx, sy = batch.support_x, batch.support_y

        def score(fast: Any) -> tuple[Tensor, dict[str, Tensor]]:
            out, feats = tasks.forward(fast, query_x, features=objective is not None)
            if objective is None:  # the plain query loss, for all tasks at once
                return self.query_losses(out, batch.query_y)
            return tasks.map(objective, out, feats, batch.query_y, dict(extra))

        if weights is None:
            return score(self.run_steps(tasks, fast, lrs, sx, sy, 0, steps, create_graph))
        # MAML++'s multi-step loss: the query loss after every step, weighted (metrics: the last step)
        total: Tensor | float = 0.0
        for k, weight in enumerate(weights):
            fast = self.run_steps(tasks, fast, lrs, sx, sy, k, k + 1, create_graph)
            losses, aux = score(fast)
            total = total + weight * losses
        return total, aux  # type: ignore[return-value]

    def meta_backward(
        self,
        batch: TaskBatch,
        objective: Objective | None = None,
        extra: Mapping[str, Tensor] | None = None,
        query_x: Tensor | None = None,
        wrt: Sequence[Tensor] | None = None,
    ) -> dict[str, float]:
        """Accumulate the meta-gradient of the mean outer loss into ``.grad``; return mean metrics.

        With ``meta.chunk`` (or the strategy's default) the tasks go through in pieces whose
        gradients add up to the same result, so peak memory is bounded by the piece. ``wrt``: every
        parameter the loss reaches (default: this learner's; an ``objective`` with parameters of its
        own adds them), for a strategy that runs pieces concurrently (:meth:`Strategy.backward`).
        """
        total = batch.num_tasks
        strategy = self.strategy  # resolved once: the lookup walks the model (a sinusoid step is ~1 ms)

        closed_form = (
            objective is None
            and query_x is None
            and getattr(strategy, "has_meta_gradient", False)
            and not self.per_step
            and self.msl_weights() is None
        )

        def closed_form_piece(part: TaskBatch) -> dict[str, Tensor]:
            losses, aux = self._closed_form_backward(strategy, part, total)
            return piece_metrics(losses, aux)

        def piece(
            part: TaskBatch, part_extra: dict[str, Tensor], part_qx: Tensor
        ) -> tuple[Tensor, dict[str, Tensor]]:
            losses, aux = self.task_losses(part, objective, part_extra, part_qx)
            return losses.sum() / total, piece_metrics(losses, aux)

        if closed_form:
            metrics = strategy.chunked(closed_form_piece, batch)
        else:
            qx = batch.query_x if query_x is None else query_x
            params = list(self.parameters()) if wrt is None else wrt
            metrics = strategy.backward(piece, params, batch, dict(extra or {}), qx)
        return {**{k: float(v.mean()) for k, v in metrics.items()}, **self.learned_rates()}

    def learned_rates(self) -> dict[str, float]:
        """LSLR's rates, averaged over the adapted tensors, per step (``inner_lr/step<k>``), for the logs."""
        if self.step_lrs is None:
            return {}
        rates = torch.stack([r.detach() for r in self.step_lrs.values()]).mean(0)
        return {f"inner_lr/step{k}": float(r) for k, r in enumerate(rates)}

    @torch.no_grad()
    def _closed_form_backward(
        self, strategy: Strategy, batch: TaskBatch, total: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`meta_backward`'s piece through the strategy's closed-form meta-gradient (no autograd).

        Same result as the autograd path (``tests/test_maml_gradients.py`` holds both to a plain
        per-task loop); the gradients are added to ``.grad`` as ``backward`` would add them.
        """
        # under no_grad the live parameters build no graph: no detached copies needed
        live, lrs = self.params(), self.lrs()
        grads, lr_grads, out = strategy.meta_gradient(
            live, lrs, batch, self.cfg.inner_steps, not self.second_order, scale=1.0 / total
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
            fast = self.run_steps(tasks, tasks.start(params, sx.shape[0]), lrs, sx, sy, 0, steps, False)
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
                fast = self.run_steps(tasks, fast, lrs, part.support_x, part.support_y, done, s, False)
                done = s
                out, _ = tasks.forward(fast, part.query_x, features=False)
                rows.append(self.query_losses(out, part.query_y)[1])
            return {k: torch.stack([r[k] for r in rows], dim=1) for k in rows[0]}  # [T, len(at)]

        return {k: v.transpose(0, 1) for k, v in tasks.chunked(curve, batch).items()}


@functools.cache
def _say_once(message: str) -> None:
    log.info(message)


def _key(name: str) -> str:
    return name.replace(".", "__")


def norm_parameters(model: nn.Module) -> list[str]:
    """The names of the weights and biases of the model's batch norms (``MetaBatchNorm2d``)."""
    return [
        f"{prefix}.{n}" if prefix else n
        for prefix, m in model.named_modules()
        if isinstance(m, MetaBatchNorm2d)
        for n, _ in m.named_parameters(recurse=False)
    ]


def msl_weights(steps: int, annealed: float) -> list[float]:
    """MAML++'s multi-step loss weights of ``steps`` inner steps, ``annealed`` (0..1) into the anneal.

    At 0 every step weighs ``1/S``. Linearly towards 1, every weight but the last falls to a floor of
    ``0.03/S`` and the last takes what they give up, so the weights always sum to 1 (Antoniou et al.
    2019, section 4, and their code's per-step loss importance). At 1 and after, the last step alone
    counts; :meth:`MAML.msl_weights` then returns None and the plain loss is used.
    """
    if annealed >= 1 or steps < 2:
        return [0.0] * (steps - 1) + [1.0]
    floor = 0.03 / steps
    early = max((1 - annealed) / steps, floor)
    last = min((1 + annealed * (steps - 1)) / steps, 1 - (steps - 1) * floor)
    return [early] * (steps - 1) + [last]
