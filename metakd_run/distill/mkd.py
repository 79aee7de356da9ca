"""Meta knowledge distillation: the student learns from the teacher adapted to each task.

For each task the frozen teacher adapts on the support set (no graph), and its outputs and
features become targets. Teacher and student may be of different families
(:mod:`metakd_run.meta`): a MAML teacher's targets come from its adapted parameters, a ProtoNet's
are its distance logits given the support set, a CNP's its decoder's outputs given the support
set's aggregate; all come from ``adapted_outputs``, and a student of any family matches them with
the same distances (a CNP student in the outer loss only: it has no inner loop).

Where the distillation acts (``kd.inner``):

- in the outer loss (default): the student adapts on the support set as usual; its outer loss is
  its task loss on the labelled query points plus ``weight`` times the distance to the teacher's
  targets on all query inputs (and the optional unlabelled transfer inputs).
- in the inner loop: the student adapts on its support loss plus ``weight`` times the distance to
  the teacher on the support inputs (and the transfer inputs); the outer loss is the task loss on
  the query set alone. The meta-gradient then reaches the distillation's own parameters through
  the inner loop, which is how a learned weight and temperature (``kd.learn_*``) are trained: by
  what they do to the adapted student's query loss, as in Meta Knowledge Distillation (Liu et al.
  2022, arXiv 2202.07940) and MetaDistil (Zhou et al., ACL 2022). In both modes the student is
  evaluated alone: at meta-test it adapts on the task loss, with no teacher.

A pretrain student (:mod:`metakd_run.meta.pretrain`) sees no tasks: it learns by ordinary
distillation on its mini-batches of training images, its cross-entropy over the training classes
plus ``weight`` times the distance to the teacher's outputs and features on the same images: a
pretrain teacher's logits over the same classes (Hinton et al.'s KL with kd=kl) and features, or a
meta-learned teacher's unadapted features (no logits: refused before training, in build.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import grad

from metakd_run.data.tasks import MiniBatch, TaskBatch
from metakd_run.distill.losses import OUTPUT, Distiller
from metakd_run.meta.cnp import CNP
from metakd_run.meta.losses import TASK_LOSS, Params, piece_metrics
from metakd_run.meta.maml import MAML
from metakd_run.meta.pretrain import Pretrain
from metakd_run.meta.protonet import ProtoNet
from metakd_run.meta.threads import call_model

AnyLearner = MAML | ProtoNet | CNP | Pretrain  # the learners mkd reads the surface of


class MetaDistillation:
    """Binds a frozen teacher, a student learner and a distiller into one meta-objective.

    ``weight`` is the distillation's weight (a learned weight starts there, see
    :meth:`Distiller.weigh`); ``source="init"`` distils a MAML teacher's unadapted initialisation;
    ``inner`` moves the distillation into the student's inner loop (a MAML student's only).
    """

    def __init__(
        self,
        teacher: AnyLearner,
        student: AnyLearner,
        distiller: Distiller,
        weight: float,
        source: str = "adapted",
        inner: bool = False,
    ) -> None:
        if source not in ("adapted", "init"):
            raise ValueError(f"kd.source must be 'adapted' or 'init', got {source!r}")
        if inner and (not student.inner_loop or student.cfg.inner_steps < 1):
            raise ValueError("kd.inner=true distils in the student's inner loop, and this student has none")
        if distiller.learns and not inner:
            raise ValueError(
                "a learned kd weight or temperature is trained through the inner loop: kd.inner=true"
            )
        self.teacher = teacher
        self.student = student
        self.distiller = distiller
        self.weight = weight
        self.source = source
        self.inner = inner
        self.teacher_taps = sorted({t for t, _ in distiller.pairs})

    def teacher_targets(self, batch: TaskBatch, inputs: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs and features ``{tap: [T, N, ...]}`` on ``inputs``, per support set."""
        steps = None if self.source == "adapted" else 0
        out, feats = self.teacher.adapted_outputs(batch.support_x, batch.support_y, inputs, steps)
        feats = {**feats, OUTPUT: out}
        return {t: feats[t] for t in self.teacher_taps}

    @torch.no_grad()
    def teacher_on_images(self, x: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs and features ``{tap: [B, ...]}`` on a mini-batch of images: a pretrain
        teacher's logits over the training classes, else its meta-learned (unadapted) model's."""
        if isinstance(self.teacher, Pretrain):
            out, feats = self.teacher.classify(x)
        else:
            out, feats = self.teacher.model(x)
        feats = {**feats, OUTPUT: out}
        return {t: feats[t] for t in self.teacher_taps}

    # --- distillation in the outer loss ------------------------------------------------------------
    def objective(
        self, out: Tensor, feats: dict[str, Tensor], qy: Tensor, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per task: task loss on the labelled queries + weight x distance on all query inputs."""
        task_loss, aux = self.student.query_loss(out, qy, feats)
        terms = self.distiller.terms({**feats, OUTPUT: out}, extra)
        aux = {**aux, "kd_loss": terms.mean()}
        return task_loss + self.weight * self.distiller.weigh(terms), aux

    # --- distillation in the inner loop ------------------------------------------------------------
    def inner_task_losses(self, batch: TaskBatch, targets: Mapping[str, Tensor]) -> tuple[Tensor, dict]:
        """Per-task query losses ``[T]`` after inner steps on task loss + weight x distance.

        ``targets`` are the teacher's on each task's support inputs (then transfer inputs). The
        inner gradients keep their graph (unless ``meta.first_order``), so the outer loss reaches
        the meta-parameters, the projections and the learned weight and temperature through them.
        ``kd_loss`` reports the distance at the meta-parameters (the first inner step).
        """
        student = self.student
        params, lrs = student.params(), student.lrs()
        adapted = list(lrs)
        steps, second_order = student.cfg.inner_steps, student.second_order
        weights = student.msl_weights() or [0.0] * (steps - 1) + [1.0]  # MAML++'s multi-step loss
        task_loss = TASK_LOSS[student.task]
        shots = batch.support_y.shape[1]

        def one_task(
            x: Tensor, y: Tensor, teacher: dict[str, Tensor], qx: Tensor, qy: Tensor
        ) -> tuple[Tensor, dict[str, Tensor]]:
            def support_loss(fast: Params, fixed: Params) -> tuple[Tensor, Tensor]:
                out, feats = call_model(student.model, {**fixed, **fast}, x)
                terms = self.distiller.terms({**feats, OUTPUT: out}, teacher)
                return task_loss(out[:shots], y) + self.weight * self.distiller.weigh(terms), terms.mean()

            fast, fixed, first_distance, loss = {n: params[n] for n in adapted}, params, None, 0.0
            for k, weight in enumerate(weights):
                fixed = {**fixed, **student.norms_at(k)}  # MAML++'s per-step batch norm, if on
                rates = student.rates_at(lrs, k)
                grads, distance = grad(support_loss, has_aux=True)(fast, fixed)
                if not second_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                fast = {n: fast[n] - rates[n] * grads[n] for n in adapted}
                first_distance = distance if first_distance is None else first_distance
                if weight:
                    out, _ = call_model(student.model, {**fixed, **fast}, qx)
                    step_loss, aux = student.query_loss(out, qy)
                    loss = loss + weight * step_loss
            return loss, {**aux, "kd_loss": first_distance.detach()}

        inputs = support_inputs(batch)
        return student.strategy.map(
            one_task, inputs, batch.support_y, dict(targets), batch.query_x, batch.query_y
        )

    # --- one meta-step -----------------------------------------------------------------------------
    def meta_backward(self, batch: TaskBatch) -> dict[str, float]:
        """Accumulate the student's (projections', learned values') meta-gradient; return the metrics.

        The metrics hold the learned weight and temperature (``kd_weight``, ``kd_temperature``, or
        per tap ``kd_weight/<tap>``, ...) when they are learned: the training loop logs them.
        """
        for p in self.teacher.parameters():  # frozen from the first distillation step (it was trained)
            p.requires_grad_(False)
        if isinstance(batch, MiniBatch):  # a pretrain student: ordinary distillation
            extra = self.teacher_on_images(batch.x)
            metrics = self.student.meta_backward(batch, self.objective, extra, wrt=self.trained_parameters())
        elif self.inner:
            metrics = self._inner_meta_backward(batch)
        else:
            query_x = batch.query_x
            if batch.transfer_x is not None:
                query_x = torch.cat([query_x, batch.transfer_x], dim=1)
            extra = self.teacher_targets(batch, query_x)
            metrics = self.student.meta_backward(
                batch, self.objective, extra, query_x=query_x, wrt=self.trained_parameters()
            )
        return {**metrics, **self.distiller.learned_values(self.weight)}

    def trained_parameters(self) -> list[Tensor]:
        """What a distillation step trains: the student's and the distiller's parameters."""
        return [*self.student.parameters(), *self.distiller.parameters()]

    def _inner_meta_backward(self, batch: TaskBatch) -> dict[str, float]:
        total = batch.num_tasks
        targets = self.teacher_targets(batch, support_inputs(batch))

        def piece(part: TaskBatch, part_targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
            losses, aux = self.inner_task_losses(part, part_targets)
            return losses.sum() / total, piece_metrics(losses, aux)

        metrics = self.student.strategy.backward(piece, self.trained_parameters(), batch, targets)
        # the student's own meta_backward (outer mode) adds its learned rates; this path bypasses it
        return {**{k: float(v.mean()) for k, v in metrics.items()}, **self.student.learned_rates()}


def support_inputs(batch: TaskBatch) -> Tensor:
    """Each task's support inputs, then its transfer inputs if any: ``[T, S(+U), ...]``."""
    if batch.transfer_x is None:
        return batch.support_x
    return torch.cat([batch.support_x, batch.transfer_x], dim=1)
