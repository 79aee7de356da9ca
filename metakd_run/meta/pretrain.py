"""Plain pretraining (Chen et al., ICLR 2019; Tian et al., ECCV 2020): no episodes at training time.

Training: the role's model's backbone plus a classifier over ALL the training split's classes, trained
with cross-entropy on mini-batches of images drawn uniformly from the split (``meta.pretrain.batch``),
each labelled by its class index in the split. The classifier is linear (Chen et al.'s Baseline) or
cosine (Baseline++: ``scale x cos(f, w_k)``). The model's own head (as wide as a task's ways) is not
trained; only the embedding (the model's ``embedding_tap``, the head's input) is.

Meta-test (and validation, on the same episodic val tasks as every family): the embedding is frozen
and each task's queries are classified from its support set by one of two heads
(``meta.pretrain.head``):

- ``centroid``: ProtoNet's prototypes on the frozen embedding and the logits ``-||f(x) - c_k||^2``;
- ``logreg``: a multinomial logistic regression fitted on the L2-normalised support embeddings, full
  batch LBFGS on ``sum_i CE(W f_i/||f_i||, y_i) + penalty/2 ||W||^2`` (scikit-learn's objective with
  ``C = 1/penalty``, as Tian et al. fit it), deterministic. The logits are ``W f/||f||``. There is no
  intercept: the head then stays a linear layer on the embedding (below). With balanced support sets
  scikit-learn's unpenalised intercept carries little.

:class:`Pretrain` has the public surface of :class:`~metakd_run.meta.maml.MAML` (and of
:class:`~metakd_run.meta.protonet.ProtoNet`, whose flat adaptation curves it shares), so validation,
the meta-test, checkpoints, ``metakd_run.load``, the figures and meta knowledge distillation from a
pretrained teacher (``adapted_outputs``) take it unchanged. :meth:`Pretrain.adapt` writes the head
into the model's own ``head``: the centroid head as ProtoNet does (``W_k = 2 c_k``,
``b_k = -||c_k||^2``), the logreg head as ``W`` with a zero bias, so the model's forward gives
``||f|| x`` the logreg's logits: the same predicted class for every input (Lake's runs and the
figures read the class), and :meth:`predict` divides by ``||f||`` to return the logits themselves.

One training step is :meth:`Pretrain.meta_backward` on a :class:`~metakd_run.data.tasks.MiniBatch`
(what :meth:`Pretrain.batches` draws); with an ``objective`` it is the step of ordinary distillation
(:mod:`metakd_run.distill.mkd`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from metakd_run.config import Classifier, MetaConfig, TestHead
from metakd_run.data.tasks import MiniBatch
from metakd_run.meta.feedforward import FeedForward
from metakd_run.meta.losses import Params, Rates, piece_metrics
from metakd_run.meta.maml import Objective
from metakd_run.meta.protonet import distance_logits, prototypes
from metakd_run.meta.threads import call_model

log = logging.getLogger(__name__)

NORM_EPS = 1e-12  # F.normalize's: an embedding of norm below it is divided by it instead


class CosineClassifier(nn.Module):
    """Baseline++'s classifier: ``scale x cos(f, w_k)`` for every class ``k``: ``[B, D] -> [B, C]``."""

    def __init__(self, dim: int, classes: int, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's initialisation
        self.scale = float(scale)

    def forward(self, f: Tensor) -> Tensor:
        return self.scale * F.normalize(f, dim=-1, eps=NORM_EPS) @ F.normalize(self.weight, dim=-1).T


def make_classifier(kind: Classifier | str, dim: int, classes: int, scale: float) -> nn.Module:
    if Classifier(kind) == Classifier.cosine:
        return CosineClassifier(dim, classes, scale)
    return nn.Linear(dim, classes)


def fit_logreg(features: Tensor, labels: Tensor, ways: int, penalty: float, steps: int) -> Tensor:
    """Weights ``[T, ways, D]`` of every task's multinomial logistic regression, without intercept.

    ``features [T, S, D]`` (already normalised if they should be), ``labels [T, S]``. Minimises
    ``sum_i CE(W f_i, y_i) + penalty/2 ||W||^2`` per task: the tasks' objectives are independent,
    so one full-batch LBFGS on their sum (strong Wolfe line search, from zero) solves each. Builds
    no graph outside itself; deterministic.
    """
    feats = features.detach()
    t, _, d = feats.shape
    weights = torch.zeros(t, ways, d, dtype=feats.dtype, device=feats.device, requires_grad=True)
    onehot = F.one_hot(labels, ways).to(feats.dtype)
    optimizer = torch.optim.LBFGS(
        [weights],
        lr=1.0,
        max_iter=steps,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = logreg_objective(weights, feats, onehot, penalty).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach()


def logreg_objective(weights: Tensor, feats: Tensor, onehot: Tensor, penalty: float) -> Tensor:
    """Each task's ``sum_i CE(W f_i, y_i) + penalty/2 ||W||^2``: ``[T]``."""
    logits = feats @ weights.transpose(-1, -2)  # [T, S, ways]
    ce = -(onehot * logits.log_softmax(-1)).sum((-1, -2))
    return ce + 0.5 * penalty * weights.pow(2).sum((-1, -2))


class Pretrain(FeedForward):
    """An embedding pretrained as a classifier over every training class; a frozen-embedding head at test.

    ``task`` must be ``"classification"``; ``classes`` is the number of training classes (the
    split's); ``cfg`` is the ``meta`` group (``meta.pretrain`` and ``meta.outer_lr`` apply, the
    inner-loop settings do not).
    """

    def __init__(self, model: nn.Module, task: str, cfg: MetaConfig, classes: int = 0) -> None:
        if task != "classification":
            raise ValueError(f"pretrain classifies images, but these tasks are {task}")
        if classes < 2:
            raise ValueError(
                f"pretrain trains a classifier over the training classes, but the training split offers "
                f"{classes}: it needs an image data set's training split"
            )
        super().__init__(model, task, cfg, adapted=[])  # no inner loop: nothing is adapted
        self.tap = getattr(model, "embedding_tap", "embedding")
        self.head_prefix = getattr(model, "head_prefix", "head.")
        head = model.get_submodule(self.head_prefix.rstrip("."))
        if not isinstance(head, nn.Linear):
            raise ValueError(f"pretrain needs a model whose {self.head_prefix!r} is a linear layer")
        self.settings = cfg.pretrain
        self.classes = int(classes)
        self.classifier = make_classifier(
            cfg.pretrain.classifier, head.in_features, classes, cfg.pretrain.scale
        )
        _say_steps_do_not_apply()

    # --- training: mini-batches over every training class -----------------------------------------
    def throughput_unit(self) -> tuple[str, int]:
        return "images", self.settings.batch

    def batches(self, source: Any, generator: torch.Generator) -> MiniBatch:
        """One training mini-batch from the training split's ``source`` (an episode sampler)."""
        return source.sample_images(self.settings.batch, generator)

    def classify(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits over the training classes ``[B, C]`` of images ``x [B, ...]`` and the model's features."""
        _, feats = self.model(x)
        return self.classifier(feats[self.tap].flatten(1)), feats

    def meta_backward(
        self,
        batch: MiniBatch,
        objective: Objective | None = None,
        extra: Mapping[str, Tensor] | None = None,
        query_x: Tensor | None = None,  # noqa: ARG002 - MAML's signature: a mini-batch has no query set
        wrt: Sequence[Tensor] | None = None,
    ) -> dict[str, float]:
        """Accumulate the gradient of the mini-batch's cross-entropy (or of ``objective(logits,
        features, labels, extra)``) into ``.grad``; return its metrics. ``wrt``: the tensors to
        differentiate (default: every trainable parameter)."""
        if not isinstance(batch, MiniBatch):
            raise TypeError("pretrain trains on mini-batches of images (Pretrain.batches), not on tasks")
        logits, feats = self.classify(batch.x)
        if objective is None:
            loss, aux = self.query_loss(logits, batch.y)
        else:
            loss, aux = objective(logits, feats, batch.y, dict(extra or {}))
        params = [p for p in (self.parameters() if wrt is None else wrt) if p.requires_grad]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:  # the model's own head and the teacher's parts take no gradient
                p.grad = g if p.grad is None else p.grad + g
        return {k: float(v.detach().mean()) for k, v in piece_metrics(loss, aux).items()}

    # --- one task ------------------------------------------------------------------------------------
    def adapt(
        self,
        params: Params,
        lrs: Rates,  # noqa: ARG002 - MAML's signature: there are no rates
        x: Tensor,
        y: Tensor,
        steps: int | None = None,  # noqa: ARG002 - no inner steps
        create_graph: bool | None = None,  # noqa: ARG002 - the embedding is frozen
    ) -> Params:
        """ONE task's head from its support set ``x [S, ...]``, ``y [S]``, as the model's head weights."""
        weight, bias = f"{self.head_prefix}weight", f"{self.head_prefix}bias"
        ways = params[weight].shape[0]
        _, feats = call_model(self.model, params, x)
        emb = feats[self.tap].flatten(1).detach()
        if self.settings.head == TestHead.centroid:
            protos = prototypes(emb, y, ways)
            return {**params, weight: 2 * protos, bias: -protos.pow(2).sum(-1)}
        w = self.fit(emb[None], y[None], ways)[0]
        return {**params, weight: w, bias: torch.zeros_like(params[bias])}

    @torch.no_grad()
    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The model's outputs on ``x`` with ``params``; with the logreg head, divided by each input's
        embedding norm: the logistic regression's logits ``W f/||f||`` (see the module's docstring)."""
        out, feats = functional_call(self.model, params, (x,))
        if self.settings.head == TestHead.logreg:
            return out / feats[self.tap].flatten(1).norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        return out

    def fit(self, emb: Tensor, y: Tensor, ways: int) -> Tensor:
        """The logreg head's weights ``[T, ways, D]`` from support embeddings ``[T, S, D]``."""
        s = self.settings
        return fit_logreg(F.normalize(emb, dim=-1, eps=NORM_EPS), y, ways, s.logreg_penalty, s.logreg_steps)

    # --- every task of a batch -----------------------------------------------------------------------
    def outputs(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The head's logits ``[T, Q, K]`` on every task's inputs ``qx`` and their features.

        Support and query inputs are embedded in separate passes (batch norm per pass, as ProtoNet
        and MAML's inner and outer losses); the head is fitted on the support embeddings, detached.
        """
        tasks = self.strategy
        p = tasks.start(params, sx.shape[0])
        out, feats = tasks.forward(p, sx)
        support = feats[self.tap].flatten(2).detach()
        ways = out.shape[-1]
        _, q_feats = tasks.forward(p, qx)
        queries = q_feats[self.tap].flatten(2)
        if self.settings.head == TestHead.centroid:
            return distance_logits(queries, prototypes(support, sy, ways)), q_feats
        weights = self.fit(support, sy, ways)
        return F.normalize(queries, dim=-1, eps=NORM_EPS) @ weights.transpose(-1, -2), q_feats


@functools.cache
def _say_steps_do_not_apply() -> None:
    log.info(
        "pretrain has no inner loop: its meta-test curves hold the same value at every inner step "
        "(eval.steps), and meta.inner_lr, meta.inner_steps and meta.first_order do not apply to it"
    )
