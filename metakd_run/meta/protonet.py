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

from torch import Tensor, nn
from torch.nn import functional as F

from metakd_run.config import MetaConfig
from metakd_run.meta.feedforward import FeedForward
from metakd_run.meta.losses import Params, Rates
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


class ProtoNet(FeedForward):
    """An embedding network scored by distances to class prototypes; MAML's interface, no inner loop.

    ``task`` must be ``"classification"``; ``cfg`` is the ``meta`` group (its batching, chunk and
    outer settings apply; the inner-loop settings, and ``kd.inner`` for a student, do not).
    """

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

    # --- every task of a batch ---------------------------------------------------------------------
    def outputs(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
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


@functools.cache
def _say_steps_do_not_apply() -> None:
    log.info(
        "protonet has no inner loop: its meta-test curves hold the same value at every inner step "
        "(eval.steps), and meta.inner_lr, meta.inner_steps and meta.first_order do not apply to it"
    )
