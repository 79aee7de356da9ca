"""What the families without an inner loop share (ProtoNet, CNP, pretrain at meta-test).

Their adaptation is one function of the support set (prototypes, an aggregate, a fitted head), so a
task's prediction is ``outputs(params, support_x, support_y, query_x)``, and everything MAML
computes by inner steps follows from it the same way for all three: the outer loss of a meta-batch,
a teacher's targets for distillation, and the adaptation curve, flat because there are no steps.
Each family writes ``outputs`` (and ``adapt``, the per-task form the API and the figures use);
this class writes the rest once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.learner import MetaLearner
from metakd_run.meta.losses import Objective, Params, piece_metrics


class FeedForward(MetaLearner):
    """A meta-learner whose adaptation is a forward pass over the support set: no inner loop."""

    inner_loop = False
    # Each family defines it: every task's outputs ``[T, Q, ...]`` on ``qx`` given its support set
    # (``params, sx, sy, qx``), and the features.
    outputs: Callable[[Params, Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]

    # --- every task of a batch -----------------------------------------------------------------------
    def task_losses(
        self,
        batch: TaskBatch,
        objective: Objective | None,
        extra: Mapping[str, Tensor],
        query_x: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-task outer losses ``[T]`` (and metrics): ``objective`` scores one task's outputs on
        ``query_x`` (default: :meth:`query_loss`), as :meth:`MAML.task_losses` does after adapting."""
        out, feats = self.outputs(self.params(), batch.support_x, batch.support_y, query_x)
        if objective is None:
            return self.query_losses(out, batch.query_y, feats)
        return self.strategy.map(objective, out, feats, batch.query_y, dict(extra))

    def meta_backward(
        self,
        batch: TaskBatch,
        objective: Objective | None = None,
        extra: Mapping[str, Tensor] | None = None,
        query_x: Tensor | None = None,
        wrt: Sequence[Tensor] | None = None,
    ) -> dict[str, float]:
        """Accumulate the gradient of the mean outer loss into ``.grad``; return mean metrics
        (``meta.chunk`` and ``wrt`` as in :meth:`MAML.meta_backward`: pieces whose gradients add up
        to the whole batch's)."""
        total = batch.num_tasks

        def piece(
            part: TaskBatch, part_extra: dict[str, Tensor], part_qx: Tensor
        ) -> tuple[Tensor, dict[str, Tensor]]:
            losses, aux = self.task_losses(part, objective, part_extra, part_qx)
            return losses.sum() / total, piece_metrics(losses, aux)

        qx = batch.query_x if query_x is None else query_x
        params = list(self.parameters()) if wrt is None else wrt
        metrics = self.strategy.backward(piece, params, batch, dict(extra or {}), qx)
        return {k: float(v.mean()) for k, v in metrics.items()}

    @torch.no_grad()
    def adapted_outputs(
        self,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        steps: int | None = None,  # noqa: ARG002 - no inner steps: the support set is the adaptation
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Outputs and features on ``qx`` given each task's support set, building no graph (a
        teacher's distillation targets)."""
        params, _ = self.frozen()
        return self.strategy.chunked(functools.partial(self.outputs, params), sx, sy, qx)

    @torch.no_grad()
    def adaptation_curve(
        self, batch: TaskBatch, steps: int, at: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Query metrics per task, ``{metric: [len(at), T]}``: the same row at every step."""
        at = sorted({s for s in (range(steps + 1) if at is None else at) if 0 <= s <= steps})
        params, _ = self.frozen()

        def curve(part: TaskBatch) -> dict[str, Tensor]:
            out, feats = self.outputs(params, part.support_x, part.support_y, part.query_x)
            aux = self.query_losses(out, part.query_y, feats)[1]
            return {k: v.unsqueeze(1).expand(-1, len(at)).contiguous() for k, v in aux.items()}

        return {k: v.transpose(0, 1) for k, v in self.strategy.chunked(curve, batch).items()}
