"""Learners and the distiller, built from the typed config before the first stage.

Building them is cheap and checks everything a stage would otherwise discover late: a model
that does not fit the input (too many pools), a tap that a model lacks, a projection that cannot
match two shapes, a distance that makes no sense for the task. Each becomes a one-line
:class:`ConfigError` naming the key, so a typo never costs a trained teacher.
"""

from __future__ import annotations

from typing import Any

import torch

from metakd_run.config import ConfigError, Family, KDConfig, KDSource, MetaConfig
from metakd_run.distill.losses import DISTANCES, EMBEDDING, OUTPUT, Distiller
from metakd_run.meta.cnp import CNP
from metakd_run.meta.learner import MetaLearner
from metakd_run.meta.maml import MAML
from metakd_run.meta.pretrain import Pretrain
from metakd_run.meta.protonet import ProtoNet
from metakd_run.models import MODELS, build_model, feature_shapes

AnyLearner = MAML | ProtoNet | CNP | Pretrain
LEARNERS: dict[Family, type[AnyLearner]] = {
    Family.maml: MAML,
    Family.protonet: ProtoNet,
    Family.cnp: CNP,
    Family.pretrain: Pretrain,
}
# what a family's teacher offers in place of an initialisation to distil (kd.source=init)
NO_INIT = {
    Family.protonet: "a protonet teacher has no initialisation to distil apart from its support prototypes",
    Family.cnp: "a cnp teacher has no initialisation to distil apart from its support set's aggregate",
    Family.pretrain: "a pretrain teacher has no initialisation to distil apart from its support-fitted head",
}


def meta_learner(model_cfg: Any, who: str, source: Any, meta: MetaConfig, seed: int) -> MetaLearner:
    """A model of ``model_cfg`` for ``source``'s tasks inside ``who``'s family (``meta.family_of``),
    initialised from ``seed``."""
    family = meta.family_of(who)
    if family == Family.protonet and source.task != "classification":
        raise ConfigError(
            f"{meta.family_key(who)}=protonet is invalid: Prototypical Networks classify, and these tasks "
            f"are {source.task}; choose the maml family (meta=maml, fomaml, metasgd or anil) or meta=cnp"
        )
    if family == Family.pretrain and (
        source.task != "classification" or not getattr(source, "num_classes", 0)
    ):
        raise ConfigError(
            f"{meta.family_key(who)}=pretrain is invalid: plain pretraining trains a classifier over an "
            f"image data set's training classes, and these tasks are {source.task}; choose the maml family"
        )
    if model_cfg.name not in MODELS:
        raise ConfigError(f"{who}={model_cfg.name!r} is invalid: choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    try:
        model = build_model(model_cfg, source.in_shape, source.out_dim)
    except ValueError as err:
        raise ConfigError(f"{who}.{err}" if "=" in str(err).split(" ")[0] else f"{who}: {err}") from None
    try:
        # the pretrain family's classifier spans every class of the training split
        extra = {"classes": int(source.num_classes)} if family == Family.pretrain else {}
        built = LEARNERS[family](model, source.task, meta, **extra)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    built.task_pixels = task_pixels(source)
    return built


def task_pixels(source: Any) -> int:
    """Pixels of one task's support and query images together (0 where inputs are not images).

    ``meta.batching=auto`` chooses grouped convolutions for small tasks on a CPU by it.
    """
    shape = tuple(source.in_shape)
    if len(shape) != 3:
        return 0
    images = getattr(source, "ways", 0) * (getattr(source, "shots", 0) + getattr(source, "queries", 0))
    return int(images * shape[1] * shape[2])


def tap_pairs(kd: KDConfig, teacher: AnyLearner, student: AnyLearner) -> list[tuple[str, str]]:
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


def distiller(kd: KDConfig, teacher: AnyLearner, student: AnyLearner, in_shape: tuple[int, ...]) -> Distiller:
    """The distillation term for this teacher and student, every tap and shape checked."""
    if kd.distance not in DISTANCES:
        raise ConfigError(f"kd.distance={kd.distance!r} is invalid: choose one of {', '.join(DISTANCES)}")
    check_families(kd, teacher, student)
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
        return Distiller(
            kd.distance,
            kd.temperature,
            pairs,
            t_shapes,
            s_shapes,
            learn_weight=kd.learn_weight,
            learn_temperature=kd.learn_temperature,
            per_tap=kd.learn_per_tap,
        )
    except ValueError as err:
        taps = ",".join(t for t, _ in pairs)
        student_taps = ",".join(s for _, s in pairs)
        raise ConfigError(
            f"kd.taps=[{taps}] with kd.student_taps=[{student_taps}] is invalid for "
            f"kd.distance={kd.distance}: {err}"
        ) from None


def check_families(kd: KDConfig, teacher: AnyLearner, student: AnyLearner) -> None:
    """What a distillation mode needs of the teacher's and the student's family (one line each)."""
    meta = student.cfg
    if isinstance(student, Pretrain):
        check_pretrain_student(kd, teacher, meta)
    if kd.source == KDSource.init and not teacher.inner_loop:
        raise ConfigError(
            f"kd.source=init is invalid: {NO_INIT[meta.family_of('teacher')]}; use kd.source=adapted"
        )
    if kd.inner and not student.inner_loop:
        family = meta.family_of("student")
        raise ConfigError(
            f"kd.inner=true is invalid: it distils in the student's inner loop, and the {family} students "
            f"({meta.family_key('student')}={family}) have none; use kd.inner=false"
        )
    if kd.inner and meta.inner_steps < 1:
        raise ConfigError("kd.inner=true is invalid with meta.inner_steps=0: the students take no inner step")
    learned = [k for k in ("learn_weight", "learn_temperature") if getattr(kd, k)]
    if learned and meta.first_order:
        raise ConfigError(
            f"kd.{learned[0]}=true is invalid with meta.first_order=true: it acts on the meta-loss only "
            "through the inner loop's gradients, which first order does not differentiate: set it false"
        )
    if kd.learn_temperature and not DISTANCES[kd.distance].uses_temperature:
        raise ConfigError(
            f"kd.learn_temperature=true is invalid: kd.distance={kd.distance} has no temperature (kd=kl has)"
        )


def check_pretrain_student(kd: KDConfig, teacher: AnyLearner, meta: MetaConfig) -> None:
    """A pretrain student learns by ordinary distillation on its mini-batches: what it cannot take."""
    key = f"{meta.family_key('student')}=pretrain"
    learned = [k for k in ("learn_weight", "learn_temperature") if getattr(kd, k)]
    if learned:
        raise ConfigError(
            f"kd.{learned[0]}=true is invalid with {key}: it is meta-learned through an inner loop, and "
            "plain pretraining has none; set it false"
        )
    if kd.inner:
        raise ConfigError(
            f"kd.inner=true is invalid with {key}: the pretrain student has no inner loop; use kd.inner=false"
        )
    if kd.source == KDSource.init:
        raise ConfigError(
            f"kd.source=init is invalid with {key}: a pretrain student sees no tasks, so there is nothing "
            "to adapt; use kd.source=adapted (a meta-learned teacher then gives its unadapted features)"
        )
    if kd.transfer > 0:
        raise ConfigError(
            f"kd.transfer={kd.transfer} is invalid with {key}: the pretrain student distils on its "
            "mini-batches, which have no transfer inputs; use kd.transfer=0"
        )
    if isinstance(teacher, Pretrain):
        return
    taps = (
        [OUTPUT] if DISTANCES[kd.distance].default_tap == OUTPUT and kd.taps is None else list(kd.taps or [])
    )
    if DISTANCES[kd.distance].needs_logits or OUTPUT in taps + list(kd.student_taps or []):
        raise ConfigError(
            f"kd.distance={kd.distance} with kd.taps=[{','.join(taps)}] is invalid with {key} and a "
            f"{meta.family_of('teacher')} teacher: the teacher has no logits over the training classes; "
            "distil features (e.g. kd=sp, kd=cosine, or kd.taps=[embedding])"
        )
