"""Learners and the distiller, built from the typed config before the first stage.

Building them is cheap and checks everything a stage would otherwise discover late: a model
that does not fit the input (too many pools), a tap that a model lacks, a projection that cannot
match two shapes, a distance that makes no sense for the task. Each becomes a one-line
:class:`ConfigError` naming the key, so a typo never costs a trained teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from metakd_run.config import ConfigError, KDConfig, MetaConfig
from metakd_run.distill.losses import DISTANCES, EMBEDDING, OUTPUT, Distiller
from metakd_run.meta.maml import MAML
from metakd_run.models import MODELS, build_model, feature_shapes


def learner(model_cfg: Any, who: str, source: Any, meta: MetaConfig, seed: int) -> MAML:
    """A model of ``model_cfg`` for ``source``'s tasks inside MAML, initialised from ``seed``."""
    if model_cfg.name not in MODELS:
        raise ConfigError(f"{who}={model_cfg.name!r} is invalid: choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    try:
        model = build_model(model_cfg, source.in_shape, source.out_dim)
    except ValueError as err:
        raise ConfigError(f"{who}.{err}" if "=" in str(err).split(" ")[0] else f"{who}: {err}") from None
    try:
        return MAML(model, source.task, meta)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def tap_pairs(kd: KDConfig, teacher: MAML, student: MAML) -> list[tuple[str, str]]:
    """(teacher tap, student tap) pairs; ``null`` taps take the distance's default for each model."""
    distance = DISTANCES[kd.distance]

    def default(model: Any) -> str:
        return OUTPUT if distance.default_tap == OUTPUT else getattr(model, "embedding_tap", EMBEDDING)

    teacher_taps = list(kd.taps) if kd.taps is not None else [default(teacher.model)]
    if kd.student_taps is not None:
        student_taps = list(kd.student_taps)
    elif kd.taps is None:
        student_taps = [default(student.model)]
    else:
        student_taps = teacher_taps
    return list(zip(teacher_taps, student_taps))


def distiller(kd: KDConfig, teacher: MAML, student: MAML, in_shape: tuple[int, ...]) -> Distiller:
    """The distillation term for this teacher and student, every tap and shape checked."""
    if kd.distance not in DISTANCES:
        raise ConfigError(f"kd.distance={kd.distance!r} is invalid: choose one of {', '.join(DISTANCES)}")
    if DISTANCES[kd.distance].needs_logits and teacher.task != "classification":
        raise ConfigError(
            f"kd.distance={kd.distance} compares class probabilities, but these tasks are {teacher.task}: "
            "choose kd=mse, kd=cosine or a set distance (kd=mmd, kd=rkd, kd=sp)"
        )
    pairs = tap_pairs(kd, teacher, student)
    t_shapes = feature_shapes(teacher.model, in_shape)
    s_shapes = feature_shapes(student.model, in_shape)
    for t_tap, s_tap in pairs:
        for tap, shapes, key in ((t_tap, t_shapes, "kd.taps"), (s_tap, s_shapes, "kd.student_taps")):
            if tap not in shapes:
                who = "teacher" if key == "kd.taps" else "student"
                raise ConfigError(
                    f"{key}: {tap!r} is not a feature of the {who}, which has {', '.join(sorted(shapes))}"
                )
    try:
        return Distiller(kd.distance, kd.temperature, pairs, t_shapes, s_shapes)
    except ValueError as err:
        taps = ",".join(t for t, _ in pairs)
        raise ConfigError(f"kd.taps=[{taps}] is invalid for kd.distance={kd.distance}: {err}") from None
