"""Distillation distances, each a small class in a registry chosen by ``kd.distance``.

Every distance takes ``(student, teacher)`` tensors of ONE task (a leading dimension of points
or images) and returns a scalar. Point-wise distances (mse, cosine, kl, attention) compare each
input's features with the teacher's on the same input; set distances (mmd, rkd, sp) compare the
two models' features as distributions or relations over the task's inputs, which is what meta
knowledge distillation asks of a task. Where a distance needs the student's feature in the
teacher's space, a learned projection maps it there; it is meta-learned with the student (outer
loop only), as in torchdistill's regressors and FitNets. Adding a distance is one class with a
``@register`` line.

The :class:`Distiller` may also meta-learn the weight and the temperature of the distillation
(``kd.learn_weight``, ``kd.learn_temperature``), one for all taps or one per tap, each kept
positive as the exponential of a learned log; :mod:`metakd_run.distill.mkd` trains them
through the student's inner loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

OUTPUT = "output"
EMBEDDING = "embedding"  # stands for the model's own name of the head's input (hidden<n>, embedding)


class Distance(nn.Module):
    """One distance: its default tap, whether it compares logits, and whether it needs a projection."""

    default_tap: str = OUTPUT
    needs_logits: bool = False  # classification only (softmax over classes)
    uses_temperature: bool = False  # forward takes ``temperature=`` (a learned one, per tap)

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def projection(self, student: Sequence[int], teacher: Sequence[int]) -> nn.Module:
        """Maps the student's feature into the teacher's space (identity when they agree)."""
        return make_projection(student, teacher)


DISTANCES: dict[str, type[Distance]] = {}


def register(name: str) -> Callable[[type[Distance]], type[Distance]]:
    def add(cls: type[Distance]) -> type[Distance]:
        DISTANCES[name] = cls
        return cls

    return add


@register("mse")
class MSEDistance(Distance):
    """Mean squared error between features or outputs."""

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ((student - teacher) ** 2).mean()


@register("cosine")
class CosineDistance(Distance):
    """One minus the cosine similarity per point, averaged: ignores the features' scale."""

    default_tap = EMBEDDING

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        cos = F.cosine_similarity(student.flatten(1), teacher.flatten(1), dim=1, eps=1e-8)
        return (1.0 - cos).mean()


@register("kl")
class KLDistance(Distance):
    """Hinton et al.'s softened KL(teacher || student) on logits, scaled by T^2."""

    needs_logits = True
    uses_temperature = True

    def projection(self, student: Sequence[int], teacher: Sequence[int]) -> nn.Module:  # noqa: ARG002
        return nn.Identity()

    def forward(self, student: Tensor, teacher: Tensor, temperature: Tensor | None = None) -> Tensor:
        t = self.temperature if temperature is None else temperature
        log_p_s = F.log_softmax(student / t, dim=-1)
        log_p_t = F.log_softmax(teacher / t, dim=-1)
        kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean()
        return kl * t * t


@register("attention")
class AttentionDistance(Distance):
    """Zagoruyko & Komodakis' attention transfer: compare normalised maps of squared activity.

    For a conv map ``[B, C, H, W]`` the attention is the channel mean of the squared activations,
    so channel widths need not match (only spatial sizes); a flat feature's attention is its
    squared vector, so flat features of different widths are first projected (linear).
    """

    default_tap = EMBEDDING

    def projection(self, student: Sequence[int], teacher: Sequence[int]) -> nn.Module:
        if len(student) == 3 and len(teacher) == 3:
            if tuple(student[1:]) != tuple(teacher[1:]):
                raise ValueError(
                    f"attention maps of shape {tuple(student)} and {tuple(teacher)} differ in spatial size: "
                    "choose taps whose spatial sizes agree"
                )
            return nn.Identity()
        return make_projection(student, teacher)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return ((_attention(student) - _attention(teacher)) ** 2).sum(-1).mean()


def _attention(f: Tensor) -> Tensor:
    a = f.pow(2).mean(1).flatten(1) if f.dim() > 2 else f.pow(2)
    return F.normalize(a, dim=-1, eps=1e-12)


def _sq_distances(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``[N, M]`` from matrix products (vmap-friendly, unlike cdist)."""
    d = a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1).unsqueeze(0) - 2 * a @ b.transpose(0, 1)
    return d.clamp_min(0.0)


@register("mmd")
class MMDDistance(Distance):
    """Squared maximum mean discrepancy between the task's student and teacher feature sets.

    Gaussian kernels at several scales around the median-heuristic bandwidth (the median pairwise
    squared distance of the pooled features, not differentiated), biased V-statistic estimate:
    MMD^2 = mean k(s, s') + mean k(t, t') - 2 mean k(s, t). It matches distributions, not points.
    """

    default_tap = EMBEDDING
    scales = (0.5, 1.0, 2.0)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = student.flatten(1), teacher.flatten(1)
        d_ss, d_tt, d_st = _sq_distances(s, s), _sq_distances(t, t), _sq_distances(s, t)
        pooled = torch.cat([d_ss.flatten(), d_tt.flatten(), d_st.flatten(), d_st.flatten()])
        bandwidth = pooled.detach().median().clamp_min(1e-6)
        total = s.new_zeros(())
        for scale in self.scales:
            h = scale * bandwidth
            total = total + (-d_ss / h).exp().mean() + (-d_tt / h).exp().mean() - 2 * (-d_st / h).exp().mean()
        return total / len(self.scales)


@register("rkd")
class RelationalDistance(Distance):
    """Park et al. (2019) relational KD: pairwise distances (normalised by their mean) and the
    angles of every triplet, each matched with the Huber loss; widths need not agree.
    The paper's weights (25 for distances, 50 for angles) keep their 1:2 ratio here, and
    ``kd.weight`` scales the sum."""

    default_tap = EMBEDDING
    angle_weight = 2.0

    def projection(self, student: Sequence[int], teacher: Sequence[int]) -> nn.Module:  # noqa: ARG002
        return nn.Identity()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = student.flatten(1), teacher.flatten(1)
        loss = F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t.detach()))
        return loss + self.angle_weight * F.smooth_l1_loss(_angles(s), _angles(t.detach()))


def _normalised_distances(x: Tensor) -> Tensor:
    n = x.shape[0]
    d = (_sq_distances(x, x) + 1e-12).sqrt() * (1 - torch.eye(n, dtype=x.dtype, device=x.device))
    return d / (d.sum() / (n * (n - 1))).clamp_min(1e-12)


def _angles(x: Tensor) -> Tensor:
    """cos of the angle at j of every triplet (i, j, k): ``<e_ij, e_kj>``, ``[N, N, N]``."""
    e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2, eps=1e-12)  # e[j, i] = unit(x_i - x_j)
    return e @ e.transpose(1, 2)


@register("sp")
class SimilarityPreservingDistance(Distance):
    """Tung & Mori (2019): the task's row-normalised similarity (Gram) matrices should agree,
    ``||G_s - G_t||_F^2 / N^2``; widths need not agree."""

    default_tap = EMBEDDING

    def projection(self, student: Sequence[int], teacher: Sequence[int]) -> nn.Module:  # noqa: ARG002
        return nn.Identity()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        s, t = student.flatten(1), teacher.flatten(1)
        g_s = F.normalize(s @ s.transpose(0, 1), p=2, dim=1, eps=1e-12)
        g_t = F.normalize(t @ t.transpose(0, 1), p=2, dim=1, eps=1e-12)
        return (g_s - g_t).pow(2).sum() / s.shape[0] ** 2


def make_distance(name: str, temperature: float) -> Distance:
    if name not in DISTANCES:
        raise ValueError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")
    return DISTANCES[name](temperature)


def make_projection(student: Sequence[int], teacher: Sequence[int]) -> nn.Module:
    """A linear (flat or per-class features) or 1x1-conv (maps) projection from student to teacher width."""
    if tuple(student) == tuple(teacher):
        return nn.Identity()
    if len(student) == 1 and len(teacher) == 1:
        return nn.Linear(student[0], teacher[0])
    if len(student) == 3 and len(teacher) == 3 and tuple(student[1:]) == tuple(teacher[1:]):
        return nn.Conv2d(student[0], teacher[0], kernel_size=1)
    if len(student) == 2 and len(teacher) == 2 and student[0] == teacher[0]:
        # per-class features (a CNP decoder's [classes, width]): one map of the width, for every class
        return nn.Linear(student[1], teacher[1])
    raise ValueError(
        f"cannot project a student feature of shape {tuple(student)} onto a teacher feature of shape "
        f"{tuple(teacher)}: choose taps whose spatial sizes agree"
    )


class Distiller(nn.Module):
    """The distillation term: the mean distance over the configured tap pairs, and its learned parts.

    ``forward`` is the plain mean distance (what ``kd_loss`` reports); :meth:`weigh` applies the
    learned weight factors, ``exp(log_weight)`` (1 at the start, so the weight starts at kd.weight).
    A learned temperature is ``exp(log_temperature)``, started at ``temperature``. With
    ``per_tap`` each tap pair has its own of both, else one is shared by all.
    """

    def __init__(
        self,
        distance: str,
        temperature: float,
        pairs: Sequence[tuple[str, str]],
        teacher_shapes: Mapping[str, tuple[int, ...]],
        student_shapes: Mapping[str, tuple[int, ...]],
        *,
        learn_weight: bool = False,
        learn_temperature: bool = False,
        per_tap: bool = False,
    ) -> None:
        super().__init__()
        self.pairs = [tuple(p) for p in pairs]
        self.distance = make_distance(distance, temperature)
        if learn_temperature and not self.distance.uses_temperature:
            raise ValueError(f"kd.distance={distance} has no temperature to learn (kl has one)")
        n = len(self.pairs) if per_tap else 1
        self.log_weight = nn.Parameter(torch.zeros(n)) if learn_weight else None
        self.log_temperature = (
            nn.Parameter(torch.full((n,), math.log(temperature))) if learn_temperature else None
        )
        self.projections = nn.ModuleDict()
        for t_tap, s_tap in self.pairs:
            for tap, shapes, who in ((t_tap, teacher_shapes, "teacher"), (s_tap, student_shapes, "student")):
                if tap not in shapes:
                    raise ValueError(f"kd tap {tap!r} is not a feature of the {who}; it has {sorted(shapes)}")
            if self.distance.needs_logits and (t_tap != OUTPUT or s_tap != OUTPUT):
                raise ValueError(f"kd.distance={distance} compares logits: set kd.taps=[output]")
            self.projections[_key(t_tap, s_tap)] = self.distance.projection(
                student_shapes[s_tap], teacher_shapes[t_tap]
            )

    @property
    def learns(self) -> bool:
        """Whether anything beyond the projections is meta-learned (the weight or the temperature)."""
        return self.log_weight is not None or self.log_temperature is not None

    def terms(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
        """The distance of every tap pair, ``[pairs]``, at the (learned) temperatures."""
        temperature = None
        if self.log_temperature is not None:
            temperature = self.log_temperature.exp().expand(len(self.pairs))
        terms = []
        for i, (t, s) in enumerate(self.pairs):
            at = {} if temperature is None else {"temperature": temperature[i]}
            terms.append(self.distance(self.projections[_key(t, s)](student[s]), teacher[t], **at))
        return torch.stack(terms)

    def forward(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> Tensor:
        return self.terms(student, teacher).mean()

    def weigh(self, terms: Tensor) -> Tensor:
        """The mean of :meth:`terms`, each times its learned weight factor (if the weight is learned)."""
        if self.log_weight is None:
            return terms.mean()
        return (self.log_weight.exp() * terms).mean()

    def learned_values(self, weight: float) -> dict[str, float]:
        """The learned weights (``weight`` times the factors) and temperatures, for the logs: ``kd_weight``,
        or per tap ``kd_weight/<tap>`` (``kd_weight/<teacher tap>__to__<student tap>`` if they differ)."""
        values: dict[str, float] = {}
        for name, log_value, scale in (
            ("kd_weight", self.log_weight, weight),
            ("kd_temperature", self.log_temperature, 1.0),
        ):
            if log_value is None:
                continue
            current = (scale * log_value.detach().exp()).tolist()
            if len(current) == 1:
                values[name] = current[0]
            else:
                values.update(
                    {f"{name}/{t if t == s else _key(t, s)}": v for (t, s), v in zip(self.pairs, current)}
                )
        return values


def _key(teacher_tap: str, student_tap: str) -> str:
    return f"{teacher_tap}__to__{student_tap}"
