"""Prototypical Networks (Snell et al. 2017): a class is the mean embedding of its support examples.

For each task: embed the support set, average each class's embeddings into its prototype ``c_k``,
and score every query input ``x`` by the logits ``-||f(x) - c_k||^2``; the loss is the
cross-entropy over those logits. There is no inner loop: the meta-parameters are those of the
embedding network, trained by the query loss through the prototypes. The embedding is the model's
``embedding_tap`` feature (the head's input); the model's own head is not used.

:class:`ProtoNet` has the public surface of :class:`~metakd_run.meta.maml.MAML`, so training,
validation, the meta-test, checkpoints, distillation (as teacher or student) and
``metakd_run.load`` take either. Two things differ, by construction:

- Inner steps mean nothing. Every adaptation curve holds the same value at every step, so a
  ProtoNet sits beside MAML models in the same tables and figures (a flat line).
- :meth:`ProtoNet.adapt` returns the parameters with the head replaced by the prototypes as a
  linear layer, ``W_k = 2 c_k`` and ``b_k = -||c_k||^2`` (Snell et al., section 2.4). The model's
  own forward then gives ``-||f(x) - c_k||^2 + ||f(x)||^2``: the same class probabilities and
  predictions as the distance logits (a softmax ignores a constant added to a row).

Batch norm is per task and per pass, as for MAML here: the support set is embedded in one pass and
the query inputs in another, each normalised with its own statistics. So :meth:`adapt` followed by
the model's forward (what the figures and the Python API do) predicts exactly what the meta-test
scores.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from metakd_run.config import MetaConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.learner import MetaLearner
from metakd_run.meta.losses import Params, Rates, accuracy, losses_per_task, piece_metrics
from metakd_run.meta.maml import Objective
from metakd_run.meta.threads import call_model

log = logging.getLogger(__name__)


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Each class's mean embedding: ``[..., S, D]`` with labels ``[..., S]`` -> ``[..., ways, D]``.

    Every class of an episode has support examples (``ways x shots``), so no mean is empty.
    """
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)  # [..., S, ways]
    return (onehot.transpose(-1, -2) @ embeddings) / onehot.sum(-2).unsqueeze(-1)


def distance_logits(queries: Tensor, protos: Tensor) -> Tensor:
    """``-||q - c_k||^2`` per query and prototype: ``[..., Q, D]``, ``[..., K, D]`` -> ``[..., Q, K]``."""
    return -(queries.unsqueeze(-2) - protos.unsqueeze(-3)).pow(2).sum(-1)


class ProtoNet(MetaLearner):
    """An embedding network scored by distances to class prototypes; MAML's interface, no inner loop.

    ``task`` must be ``"classification"``; ``cfg`` is the ``meta`` group (its batching, chunk and
    outer settings apply; the inner-loop settings, and ``kd.inner`` for a student, do not).
    """

    inner_loop = False

    def __init__(self, model: nn.Module, task: str, cfg: MetaConfig) -> None:
        if task != "classification":
            raise ValueError(f"protonet scores classes by their prototypes, but these tasks are {task}")
        super().__init__(model, task, cfg, adapted=[])  # no inner loop: nothing is adapted
        self.tap = getattr(model, "embedding_tap", "embedding")
        self.head_prefix = getattr(model, "head_prefix", "head.")
        if not isinstance(model.get_submodule(self.head_prefix.rstrip(".")), nn.Linear):
            raise ValueError(f"protonet needs a model whose {self.head_prefix!r} is a linear layer")
        _say_steps_do_not_apply()

    # --- one task ----------------------------------------------------------------------------------
    def adapt(
        self,
        params: Params,
        lrs: Rates,  # noqa: ARG002 - MAML's signature: there are no rates
        x: Tensor,
        y: Tensor,
        steps: int | None = None,  # noqa: ARG002 - no inner steps
        create_graph: bool | None = None,  # noqa: ARG002 - nothing to differentiate twice
    ) -> Params:
        """ONE task's prototypes from its support set ``x [S, ...]``, ``y [S]``, as the head's weights."""
        weight, bias = f"{self.head_prefix}weight", f"{self.head_prefix}bias"
        _, feats = call_model(self.model, params, x)
        protos = prototypes(feats[self.tap].flatten(1), y, params[weight].shape[0])
        if protos.shape != params[weight].shape:
            raise ValueError(
                f"protonet: the head takes {tuple(params[weight].shape)} weights but the prototypes of "
                f"{self.tap!r} are {tuple(protos.shape)}: the head must sit on the embedding"
            )
        return {**params, weight: 2 * protos, bias: -protos.pow(2).sum(-1)}

    def query_loss(
        self,
        out: Tensor,
        y: Tensor,
        features: Mapping[str, Tensor] | None = None,  # noqa: ARG002 - CNP's NLL reads its sigma
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Cross-entropy of ONE task on its labelled query points (the first ``len(y)`` outputs)."""
        out = out[: y.shape[0]]
        loss = F.cross_entropy(out, y)
        return loss, {"task_loss": loss, "accuracy": accuracy(out, y)}

    def query_losses(self, out: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`query_loss` of every task at once: ``out [T, B(+U), K]``, ``y [T, B]`` -> ``[T]``."""
        out = out[:, : y.shape[1]]
        losses = losses_per_task(self.task, out, y)
        return losses, {"task_loss": losses, "accuracy": accuracy(out, y)}

    # --- every task of a batch ---------------------------------------------------------------------
    def logits(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Distance logits ``[T, Q, K]`` of every task's inputs ``qx`` and their features.

        ``K`` is the model's output width (the data set's ways); support and query inputs are
        embedded in separate passes (batch norm per pass, as in MAML's inner and outer losses).
        """
        tasks = self.strategy
        p = tasks.start(params, sx.shape[0])
        out, feats = tasks.forward(p, sx)
        protos = prototypes(feats[self.tap].flatten(2), sy, out.shape[-1])
        _, q_feats = tasks.forward(p, qx)
        return distance_logits(q_feats[self.tap].flatten(2), protos), q_feats

    def task_losses(
        self,
        batch: TaskBatch,
        objective: Objective | None,
        extra: Mapping[str, Tensor],
        query_x: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-task outer losses ``[T]`` (and metrics): ``objective`` scores one task's distance logits
        on ``query_x`` (default: :meth:`query_loss`), as :meth:`MAML.task_losses` does after adapting."""
        out, feats = self.logits(self.params(), batch.support_x, batch.support_y, query_x)
        if objective is None:
            return self.query_losses(out, batch.query_y)
        return self.strategy.map(objective, out, feats, batch.query_y, dict(extra))

    def meta_backward(
        self,
        batch: TaskBatch,
        objective: Objective | None = None,
        extra: Mapping[str, Tensor] | None = None,
        query_x: Tensor | None = None,
        wrt: Sequence[Tensor] | None = None,
    ) -> dict[str, float]:
        """Accumulate the gradient of the mean outer loss into ``.grad``; return mean metrics.

        With ``meta.chunk`` the tasks go through in pieces whose gradients add up to the same result;
        ``wrt`` as in :meth:`MAML.meta_backward`.
        """
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
        steps: int | None = None,  # noqa: ARG002 - no inner steps: the prototypes are the adaptation
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Distance logits and features on ``qx`` given each task's support set: no graph."""
        params, _ = self.frozen()
        return self.strategy.chunked(functools.partial(self.logits, params), sx, sy, qx)

    @torch.no_grad()
    def adaptation_curve(
        self, batch: TaskBatch, steps: int, at: Sequence[int] | None = None
    ) -> dict[str, Tensor]:
        """Query loss and accuracy per task, ``{metric: [len(at), T]}``: the same row at every step."""
        at = sorted({s for s in (range(steps + 1) if at is None else at) if 0 <= s <= steps})
        params, _ = self.frozen()

        def curve(part: TaskBatch) -> dict[str, Tensor]:
            out, _ = self.logits(params, part.support_x, part.support_y, part.query_x)
            aux = self.query_losses(out, part.query_y)[1]
            return {
                k: v.unsqueeze(1).expand(-1, len(at)).contiguous() for k, v in aux.items()
            }  # [T, len(at)]

        return {k: v.transpose(0, 1) for k, v in self.strategy.chunked(curve, batch).items()}


@functools.cache
def _say_steps_do_not_apply() -> None:
    log.info(
        "protonet has no inner loop: its meta-test curves hold the same value at every inner step "
        "(eval.steps), and meta.inner_lr, meta.inner_steps and meta.first_order do not apply to it"
    )
