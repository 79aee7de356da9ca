"""Meta knowledge distillation: the student's outer loss distils from the teacher adapted per task.

For each task the frozen teacher adapts on the support set (no graph), and its outputs and
features on the query inputs (plus optional unlabelled transfer inputs) become targets. The
student adapts on the same support set; its outer loss is its task loss on the labelled query
points plus ``weight`` times the distance to the teacher's targets on all query inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from metakd_run.data.tasks import TaskBatch
from metakd_run.distill.losses import Distiller
from metakd_run.meta.maml import MAML


class MetaDistillation:
    """Binds a frozen teacher, a student learner and a distiller into one meta-objective."""

    def __init__(
        self,
        teacher: MAML,
        student: MAML,
        distiller: Distiller,
        weight: float,
        source: str = "adapted",
    ) -> None:
        if source not in ("adapted", "init"):
            raise ValueError(f"kd.source must be 'adapted' or 'init', got {source!r}")
        self.teacher = teacher
        self.student = student
        self.distiller = distiller
        self.weight = weight
        self.source = source
        self.teacher_taps = sorted({t for t, _ in distiller.pairs})

    def teacher_targets(self, batch: TaskBatch, query_x: Tensor) -> dict[str, Tensor]:
        """The teacher's outputs/features on every query input, per task: ``{tap: [T, Q(+U), ...]}``."""
        steps = None if self.source == "adapted" else 0
        out, feats = self.teacher.adapted_outputs(batch.support_x, batch.support_y, query_x, steps)
        feats = {**feats, "output": out}
        return {t: feats[t] for t in self.teacher_taps}

    def objective(
        self, out: Tensor, feats: dict[str, Tensor], qy: Tensor, extra: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per task: task loss on the labelled queries + weight x distance on all query inputs."""
        task_loss, aux = self.student.query_loss(out, qy)
        distance = self.distiller({**feats, "output": out}, extra)
        aux = {**aux, "kd_loss": distance}
        return task_loss + self.weight * distance, aux

    def meta_backward(self, batch: TaskBatch) -> dict[str, float]:
        """Accumulate the student's (and projections') meta-gradient; return the metrics."""
        for p in self.teacher.parameters():  # frozen from the first distillation step (it was trained)
            p.requires_grad_(False)
        query_x = batch.query_x
        if batch.transfer_x is not None:
            query_x = torch.cat([query_x, batch.transfer_x], dim=1)
        extra = self.teacher_targets(batch, query_x)
        return self.student.meta_backward(batch, self.objective, extra, query_x=query_x)
