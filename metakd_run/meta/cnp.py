"""Conditional Neural Processes (Garnelo et al., ICML 2018): a task is summarised by one forward pass.

An encoder ``h`` maps each support pair ``(x_i, y_i)`` to a representation ``r_i``; their mean
``r`` (permutation invariant, any number of points) summarises the task; a decoder ``g`` maps a
query input ``x`` and ``r`` to the prediction. There is no inner loop: the meta-parameters are
those of ``h`` and ``g``, trained end to end by the query loss of each task given its support set.

Regression (the sinusoid). ``h`` is an MLP on ``[x, y]`` and ``g`` an MLP on ``[x, r]``, both with
the role's model widths (``model.hidden``: ``mlp`` with ``[40, 40]`` gives ``h: 2-40-40-40`` and
``g: 41-40-40-2``, the last hidden width being ``r``'s). ``g`` outputs a mean and a raw scale,
``sigma = 0.1 + 0.9 * softplus(raw)`` (the bounded scale of DeepMind's CNP notebook), and the loss
is the Gaussian negative log-likelihood of the query targets. Where sigma goes: the model's
*output* is the predicted mean, and sigma is the feature ``sigma``. So ``predict``,
``adapted_outputs`` and the figures give the mean, ``kd=mse`` on ``output`` compares means (with a
MAML model's output as well as a CNP's), and ``task_loss`` is the MSE of the mean, the metric
that sits beside MAML's in every table; the per-task log-likelihood is the further metric
``log_likelihood`` (in the summary and ``per_task.json``). The training loss (``loss`` in the logs)
is the NLL.

Classification (Omniglot, miniImageNet). The role's backbone (conv4, resnet12) embeds each image
(its ``embedding_tap`` feature; its linear head is dropped); a class's aggregate ``r_k`` is the mean
embedding of its support images: the paper's classification model aggregates the encodings class
by class. The decoder, an MLP with two hidden layers as wide as the backbone's widest convolution
(at least 64: :data:`DECODER_MIN_WIDTH`), maps the pair ``[e(x), r_k]`` to class ``k``'s logit,
the same MLP for every class. That per-class decoder is this project's choice, not a detail taken
from the paper: it keeps the logits equivariant to the order of the classes (labels are shuffled
per episode) and makes the model a learned comparison. ProtoNet is the special case
``logit_k = -||e(x) - r_k||^2`` with nothing learned after the embedding; Relation Networks (Sung
et al. 2018) score the same concatenated pair with a learned relation module, there on feature
maps and with a regression loss, here on embeddings with the cross-entropy of the logits.

:class:`CNP` has the public surface of :class:`~metakd_run.meta.maml.MAML` (as
:class:`~metakd_run.meta.protonet.ProtoNet` has): :meth:`CNP.adapt` returns the parameters with the
model's ``context`` buffer set to the task's aggregate, so ``predict(adapt(...), x)`` (the Python
API, the figures) predicts exactly what the meta-test scores. Inner steps mean nothing: every
adaptation curve is flat. Distillation taps: ``output``; regression's decoder features
``hidden1``.. (``hidden<n>``, the decoder head's input, is the embedding tap, named as a MAML MLP's
are), ``representation`` (``r`` at each input) and ``sigma``; classification's backbone features
(``block1``.., ``embedding``, the embedding tap, shared with MAML and ProtoNet on the same backbone)
and the decoder's ``decoder1``, ``decoder2`` (``[classes, width]`` per input).

How the tasks go through: a regression task's MLPs broadcast over the task dimension, so every
task runs in one batched graph whatever ``meta.batching`` says; an image backbone normalises its
batch per task and pass (support, then query, as for MAML and ProtoNet), so the classification
tasks go through ``meta.batching``'s strategy (loop or vmap: the CNP has no ``batched_forward``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from metakd_run.config import MetaConfig
from metakd_run.meta.auto import conv_width
from metakd_run.meta.feedforward import FeedForward
from metakd_run.meta.losses import Params, Rates, accuracy, losses_per_task
from metakd_run.meta.threads import call_model, replica_of
from metakd_run.models.mlp import ACTIVATIONS, MLP

log = logging.getLogger(__name__)

MIN_SIGMA = 0.1  # sigma = MIN_SIGMA + (1 - MIN_SIGMA) * softplus(raw): bounded away from 0
CONTEXT = "context"  # the model's buffer that :meth:`CNP.adapt` sets to the task's aggregate
SIGMA = "sigma"
# The classification decoder's hidden width: the backbone's widest convolution, and at least this.
# Narrower decoders (8 units, a conv4-8's) were measured to collapse to class-blind logits (a loss of
# log(ways) for good) on tests/test_learning.py's images, at outer rates 0.002 and 0.01; 64 learned.
DECODER_MIN_WIDTH = 64


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


class CNPRegressor(nn.Module):
    """Encoder ``h([x, y]) -> r_i``, mean aggregate ``r``, decoder ``g([x, r]) -> (mean, sigma)``.

    ``forward(x)`` decodes with the ``context`` buffer as ``r`` (``[r]``, or ``[T, r]`` for inputs
    ``[T, N, x]``); zeros until :meth:`CNP.adapt` sets it: the unconditioned prediction.
    """

    head_prefix = "decoder.head."

    def __init__(self, x_dim: int, y_dim: int, hidden: Sequence[int], activation: str) -> None:
        super().__init__()
        if not hidden:
            raise ValueError(
                "cnp needs an mlp with at least one hidden layer: its width is the representation's"
            )
        r_dim = hidden[-1]
        self.y_dim = y_dim
        self.encoder = MLP(x_dim + y_dim, r_dim, hidden, activation)
        self.decoder = MLP(x_dim + r_dim, 2 * y_dim, hidden, activation)
        self.register_buffer(CONTEXT, torch.zeros(r_dim), persistent=False)
        self.embedding_tap = f"hidden{len(hidden)}"  # the decoder head's input, named as MLP's

    def represent(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The aggregate ``r`` of support pairs ``x [..., S, x]``, ``y [..., S, y]``: ``[..., r]``."""
        r_i, _ = functional_call(self.encoder, _sub(params, "encoder."), (torch.cat([x, y], -1),))
        return r_i.mean(-2)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        r = self.context.unsqueeze(-2).expand(*x.shape[:-1], -1)
        raw, feats = self.decoder(torch.cat([x, r], -1))
        mean, raw_sigma = raw.split(self.y_dim, -1)
        sigma = MIN_SIGMA + (1 - MIN_SIGMA) * F.softplus(raw_sigma)
        return mean, {**feats, "representation": r, SIGMA: sigma}

    def batched_forward(self, params: Params, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Every task at once (``x [T, N, x]``, ``params`` shared, ``context`` ``[T, r]``): the
        MLPs broadcast over tasks, so this is :meth:`forward` (``meta.batching=batched``)."""
        return functional_call(self, params, (x,))


class CNPClassifier(nn.Module):
    """A backbone's embedding ``e``, class aggregates ``r_k`` (mean support embeddings), and one
    decoder MLP ``g([e(x), r_k]) -> logit_k`` shared by every class.

    ``forward(x)`` scores ``x`` against the ``context`` buffer ``[classes, D]`` (zeros until
    :meth:`CNP.adapt` sets it).
    """

    head_prefix = "decoder.head."

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.head_name = getattr(backbone, "head_prefix", "head.").rstrip(".")
        head = backbone.get_submodule(self.head_name)
        if not isinstance(head, nn.Linear) or "." in self.head_name:
            raise ValueError(f"cnp needs a model whose {self.head_name!r} is a linear layer on its embedding")
        dim, classes = head.in_features, head.out_features
        setattr(backbone, self.head_name, nn.Identity())  # the decoder scores the classes: no head
        self.backbone = backbone
        self.tap = getattr(backbone, "embedding_tap", "embedding")
        self.embedding_tap = self.tap
        width = max(conv_width(backbone), DECODER_MIN_WIDTH)
        self.decoder = MLP(2 * dim, 1, [width, width], "relu")
        self.register_buffer(CONTEXT, torch.zeros(classes, dim), persistent=False)

    def embed(self, params: Params, x: Tensor) -> Tensor:
        """Each image's embedding ``[N, D]`` (one pass: batch norm over these images)."""
        _, feats = functional_call(self.backbone, _sub(params, "backbone."), (x,))
        return feats[self.tap].flatten(1)

    def represent(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Each class's aggregate, the mean embedding of its support images: ``[classes, D]``."""
        return class_means(self.embed(params, x), y, self.context.shape[0])

    def decode(self, e: Tensor, r: Tensor, params: Params | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Logits ``[..., N, K]`` of embeddings ``e [..., N, D]`` against aggregates ``r [..., K, D]``
        (with the decoder's own parameters, or those of ``params``)."""
        n, k = e.shape[-2], r.shape[-2]
        pairs = torch.cat(
            [e.unsqueeze(-2).expand(*e.shape[:-1], k, -1), r.unsqueeze(-3).expand(*r.shape[:-2], n, k, -1)],
            -1,
        )
        if params is None:
            logits, hidden = self.decoder(pairs)  # [..., N, K, 1]
        else:
            logits, hidden = functional_call(self.decoder, _sub(params, "decoder."), (pairs,))
        return logits.squeeze(-1), {f"decoder{i}": h for i, h in enumerate(hidden.values(), start=1)}

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _, feats = self.backbone(x)
        logits, decoder = self.decode(feats[self.tap].flatten(1), self.context)
        return logits, {**feats, **decoder}


class GroupedCNPClassifier(CNPClassifier):
    """:class:`CNPClassifier` on a backbone with ``batched_forward`` (conv4): every task's images go
    through one grouped pass, batch norm still per task (``meta.batching=batched``)."""

    def embed_tasks(self, params: Params, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Every task's embeddings ``[T, N, D]`` and backbone features, from shared ``params``."""
        t = x.shape[0]
        shared = _sub(params, "backbone.")
        per_task = {n: v.expand(t, *v.shape) for n, v in shared.items()}
        # the backbone's head was dropped; its batched_forward still applies one: a zero one-output stand-in
        dim = self.context.shape[-1]
        per_task[f"{self.head_name}.weight"] = x.new_zeros(t, 1, dim)
        per_task[f"{self.head_name}.bias"] = x.new_zeros(t, 1)
        _, feats = self.backbone.batched_forward(per_task, x)
        return feats[self.tap].flatten(2), feats

    def batched_outputs(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict]:
        """Every task's logits ``[T, Q, K]`` and features: support and query in two grouped passes."""
        support, _ = self.embed_tasks(params, sx)
        r = class_means(support, sy, self.context.shape[0])  # [T, K, D]
        query, feats = self.embed_tasks(params, qx)
        logits, decoder = self.decode(query, r, params)
        return logits, {**feats, **decoder}

    def batched_forward(self, params: Params, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Every task's logits against its own ``context`` in ``params`` (``[T, K, D]``)."""
        query, feats = self.embed_tasks(params, x)
        logits, decoder = self.decode(query, params[CONTEXT], params)
        return logits, {**feats, **decoder}


def class_means(embeddings: Tensor, labels: Tensor, classes: int) -> Tensor:
    """Each class's mean embedding: ``[..., S, D]``, labels ``[..., S]`` -> ``[..., classes, D]``."""
    onehot = (labels.unsqueeze(-1) == torch.arange(classes, device=labels.device)).to(embeddings.dtype)
    return (onehot.transpose(-1, -2) @ embeddings) / onehot.sum(-2).unsqueeze(-1)


class CNP(FeedForward):
    """A Conditional Neural Process with MAML's interface: no inner loop, one pass per task.

    ``model`` is the role's built model: an ``mlp`` for regression (its widths and activation
    shape the encoder and decoder), an image backbone for classification. ``cfg`` is the ``meta``
    group (its batching, chunk and outer settings apply; the inner-loop settings, and
    ``kd.inner``/``kd.source=init`` for a CNP student/teacher, do not).
    """

    def __init__(self, model: nn.Module, task: str, cfg: MetaConfig) -> None:
        if task == "regression":
            if not isinstance(model, MLP):
                raise ValueError(f"cnp regresses with MLPs, got {type(model).__name__}")
            act = next(name for name, cls in ACTIVATIONS.items() if isinstance(model.act, cls))
            hidden = [layer.out_features for layer in model.body]
            net: nn.Module = CNPRegressor(model.body[0].in_features if hidden else model.head.in_features,
                                          model.head.out_features, hidden, act)  # fmt: skip
        else:
            grouped = hasattr(model, "batched_forward")  # meta.batching=batched: grouped convolutions
            net = (GroupedCNPClassifier if grouped else CNPClassifier)(model)
        ref = next(model.parameters())
        net.to(ref.device, ref.dtype)  # the new encoder and decoder where the role's model is
        super().__init__(net, task, cfg, adapted=[])  # no inner loop: nothing is adapted
        _say_steps_do_not_apply()

    # --- one task ----------------------------------------------------------------------------------
    def represent(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The task's aggregate from its support set (this thread's replica of the model)."""
        if self.task == "regression" and y.dim() < x.dim():
            y = y.unsqueeze(-1)
        return replica_of(self.model).represent(params, x, y)

    def adapt(
        self,
        params: Params,
        lrs: Rates,  # noqa: ARG002 - MAML's signature: there are no rates
        x: Tensor,
        y: Tensor,
        steps: int | None = None,  # noqa: ARG002 - no inner steps
        create_graph: bool | None = None,  # noqa: ARG002 - nothing to differentiate twice
    ) -> Params:
        """ONE task's parameters: ``params`` with the ``context`` set to its support set's aggregate."""
        return {**params, CONTEXT: self.represent(params, x, y)}

    def query_loss(
        self, out: Tensor, y: Tensor, features: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """ONE task's loss on its labelled query points (the first ``len(y)`` outputs): the Gaussian
        NLL (regression: needs the ``sigma`` feature) or the cross-entropy."""
        n = y.shape[0]
        out = out[:n]
        if self.task == "classification":
            loss = F.cross_entropy(out, y)
            return loss, {"task_loss": loss, "accuracy": accuracy(out, y)}
        if features is None or SIGMA not in features:
            raise ValueError("cnp scores a regression task by its predicted sigma: pass the features")
        log_lik = gaussian_log_likelihood(out, features[SIGMA][:n], y).mean()
        return -log_lik, {"task_loss": ((out - y) ** 2).mean(), "log_likelihood": log_lik}

    def query_losses(
        self, out: Tensor, y: Tensor, features: Mapping[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`query_loss` of every task at once: ``out [T, B(+U), ...]``, ``y [T, B]`` -> ``[T]``."""
        n = y.shape[1]
        out = out[:, :n]
        losses = losses_per_task(self.task, out, y)
        if self.task == "classification":
            return losses, {"task_loss": losses, "accuracy": accuracy(out, y)}
        if features is None or SIGMA not in features:
            raise ValueError("cnp scores a regression task by its predicted sigma: pass the features")
        log_lik = gaussian_log_likelihood(out, features[SIGMA][:, :n], y).flatten(1).mean(1)
        return -log_lik, {"task_loss": losses, "log_likelihood": log_lik}

    # --- every task of a batch ---------------------------------------------------------------------
    def _task_outputs(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict]:
        return call_model(self.model, self.adapt(params, {}, sx, sy), qx)

    def outputs(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Every task's outputs ``[T, Q, ...]`` and features on ``qx`` given its support set.

        Regression: one batched graph (the MLPs broadcast over tasks). Classification: per task
        through the strategy (support and query embedded in separate passes, batch norm per pass).
        """
        if self.task == "regression":
            return self._task_outputs(params, sx, sy, qx)
        if self.strategy.name == "batched":
            return self.model.batched_outputs(params, sx, sy, qx)
        return self.strategy.map(functools.partial(self._task_outputs, params), sx, sy, qx)


def gaussian_log_likelihood(mean: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
    """``log N(y; mean, sigma^2)`` entry by entry."""
    return -0.5 * math.log(2 * math.pi) - sigma.log() - 0.5 * ((y - mean) / sigma) ** 2


@functools.cache
def _say_steps_do_not_apply() -> None:
    log.info(
        "cnp has no inner loop: its meta-test curves hold the same value at every inner step "
        "(eval.steps), and meta.inner_lr, meta.inner_steps and meta.first_order do not apply to it"
    )
