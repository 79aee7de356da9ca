"""Distillation distances, each a small module chosen by ``kd.distance``.

Every distance takes ``(student, teacher)`` tensors of one task (a leading batch of points or
images) and returns a scalar. Where the student's width differs from the teacher's, a learned
projection maps the student's feature into the teacher's space; it is meta-learned with the
student (outer loop only), as in torchdistill's regressors and FitNets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class MSEDistance(nn.Module):
    """Mean squared error between features or outputs."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ((student - teacher) ** 2).mean()


class CosineDistance(nn.Module):
    """One minus the cosine similarity per point, averaged: ignores the features' scale."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        cos = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1, eps=1e-8)
        return (1.0 - cos).mean()


class KLDistance(nn.Module):
    """Hinton et al.'s softened KL(teacher || student) on logits, scaled by T^2."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        return kl * t * t


class AttentionDistance(nn.Module):
    """Zagoruyko & Komodakis' attention transfer: compare normalised maps of squared activity.

    For a conv map ``[B, C, H, W]`` the attention is the channel mean of the squared activations
    (so widths need not match, only spatial sizes); for a flat feature it is the squared vector.
    """

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ((_attention(student) - _attention(teacher)) ** 2).sum(-1).mean()


def _attention(f: Tensor) -> Tensor:
    a = f.pow(2).mean(1).flatten(1) if f.dim() > 2 else f.pow(2)
    return F.normalize(a, dim=-1, eps=1e-12)


DISTANCES = ("mse", "cosine", "kl", "attention")


def make_distance(name: str, temperature: float) -> nn.Module:
    if name == "mse":
        return MSEDistance()
    if name == "cosine":
        return CosineDistance()
    if name == "kl":
        return KLDistance(temperature)
    if name == "attention":
        return AttentionDistance()
    raise ValueError(f"unknown distance {name!r}; choose one of {DISTANCES}")


def make_projection(student: Sequence[int], teacher: Sequence[int]) -> nn.Module:
    """A linear (flat features) or 1x1-conv (maps) projection from student to teacher width."""
    if tuple(student) == tuple(teacher):
        return nn.Identity()
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    if len(student) == 3 and len(teacher) == 3 and tuple(student[1:]) == tuple(teacher[1:]):
        return nn.Conv2d(student[0], teacher[0], kernel_size=1)
    raise ValueError(
        f"cannot match a student feature of shape {tuple(student)} to a teacher feature of shape "
        f"{tuple(teacher)}: choose taps whose spatial sizes agree"
    )


class Distiller(nn.Module):
    """The weighted-free distillation term: the mean distance over the configured tap pairs."""

    def __init__(
        self,
        distance: str,
        temperature: float,
        pairs: Sequence[tuple[str, str]],
        teacher_shapes: Mapping[str, tuple[int, ...]],
        student_shapes: Mapping[str, tuple[int, ...]],
    ) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.distance = make_distance(distance, temperature)
        needs_projection = distance in ("mse", "cosine")
        self.projections = nn.ModuleDict()
        for t_tap, s_tap in self.pairs:
            for tap, shapes, who in ((t_tap, teacher_shapes, "teacher"), (s_tap, student_shapes, "student")):
                if tap not in shapes:
                    raise ValueError(f"kd tap {tap!r} is not a feature of the {who}; it has {sorted(shapes)}")
            if distance == "kl" and (t_tap != "output" or s_tap != "output"):
                raise ValueError("kd.distance=kl compares logits: set kd.taps=[output]")
            proj = (
                make_projection(student_shapes[s_tap], teacher_shapes[t_tap])
                if needs_projection
                else nn.Identity()
            )
            self.projections[_key(t_tap, s_tap)] = proj

    def forward(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
        terms = [self.distance(self.projections[_key(t, s)](student[s]), teacher[t]) for t, s in self.pairs]
        return torch.stack(terms).mean()


def _key(teacher_tap: str, student_tap: str) -> str:
    return f"{teacher_tap}__to__{student_tap}"
