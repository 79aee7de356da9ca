"""Distillation across families (MAML and ProtoNet, either way round) and meta-learned distillation:
the inner-loop distillation's meta-gradient against a per-task reference, the learned temperature's
and weight's gradients against finite differences (float64), the logged values, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from metakd_run import build
from metakd_run.config import ConfigError, Conv4Config, KDConfig, MetaConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.distill.losses import Distiller
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.meta.maml import MAML
from metakd_run.meta.protonet import ProtoNet
from metakd_run.models import feature_shapes
from metakd_run.models.conv4 import Conv4
from metakd_run.models.mlp import MLP
from tests.conftest import read_summary
from tests.tensorboard_runs import TensorBoardRuns
from tests.test_protonet import SIZE, WAYS, image_tasks
from tests.test_protonet import omniglot as omniglot  # noqa: F401 - the module fixture, reused

STRATEGIES = ["loop", "vmap", "batched"]
LR, STEPS, WEIGHT, TEMPERATURE = 0.3, 2, 0.7, 2.0


pytestmark = pytest.mark.usefixtures("one_thread")


# --- (1) any family into any family ------------------------------------------------------------------
def family_learner(family: str, filters: int, seed: int) -> MAML | ProtoNet:
    torch.manual_seed(seed)
    model = Conv4((1, SIZE, SIZE), WAYS, filters=filters, blocks=2).double()
    cls = ProtoNet if family == "protonet" else MAML
    return cls(model, "classification", MetaConfig(inner_lr=0.1, inner_steps=1, batching="loop"))


CROSS = [
    (teacher, student, inner)
    for teacher in ("maml", "protonet")
    for student in ("maml", "protonet")
    for inner in (False, True)
    if not (inner and student == "protonet")
]


@pytest.mark.parametrize("distance", ["kl", "mse"])
@pytest.mark.parametrize(("teacher_family", "student_family", "inner"), CROSS)
def test_every_family_distils_into_every_family(teacher_family, student_family, inner, distance) -> None:
    """A meta-step of each pairing: the distillation's share of the student's meta-gradient (weight 1
    minus weight 0) is finite and non-zero, and the teacher gets none."""
    batch = image_tasks(tasks=3)
    teacher = family_learner(teacher_family, 4, seed=0)
    student = family_learner(student_family, 2, seed=1)
    tap = "output" if distance == "kl" else "embedding"  # mse: the 8-wide embedding projected to 16
    torch.manual_seed(2)
    distiller = Distiller(
        distance,
        TEMPERATURE,
        [(tap, tap)],
        feature_shapes(teacher.model, (1, SIZE, SIZE)),
        feature_shapes(student.model, (1, SIZE, SIZE)),
    ).double()
    grads = []
    for weight in (0.0, 1.0):
        student.zero_grad(set_to_none=True)
        metrics = MetaDistillation(teacher, student, distiller, weight, inner=inner).meta_backward(batch)
        assert math.isfinite(metrics["loss"]) and metrics["kd_loss"] > 1e-6
        grads.append({n: p.grad.clone() for n, p in student.model.named_parameters() if p.grad is not None})
    assert grads[1] and grads[1].keys() == grads[0].keys()
    share = torch.cat([(grads[1][n] - grads[0][n]).flatten() for n in grads[1]])
    assert bool(torch.isfinite(share).all()) and float(share.abs().max()) > 1e-8
    assert all(p.grad is None for p in teacher.parameters())
    if distance == "mse" and not inner:  # the projection learns in the outer loss
        assert all(p.grad is not None for p in distiller.parameters())


# --- (2) inner-loop distillation against a per-task reference (float64) ------------------------------
def blob_tasks(
    tasks: int = 3, shots: int = 2, queries: int = 3, transfer: int = 2, seed: int = 0
) -> TaskBatch:
    """2-D Gaussian blobs, one per class and task: a classification toy for an MLP."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(tasks, WAYS, 2, generator=g, dtype=torch.float64)

    def points(labels: Tensor) -> Tensor:
        noise = 0.6 * torch.randn(*labels.shape, 2, generator=g, dtype=torch.float64)
        return torch.stack([centres[t, labels[t]] for t in range(tasks)]) + noise

    sy = torch.arange(WAYS).repeat_interleave(shots).expand(tasks, -1).contiguous()
    qy = torch.arange(WAYS).repeat_interleave(queries).expand(tasks, -1).contiguous()
    ty = torch.randint(0, WAYS, (tasks, transfer), generator=g)
    return TaskBatch(points(sy), sy, points(qy), qy, transfer_x=points(ty) if transfer else None)


def mlp_pair(batching: str, first_order: bool = False) -> tuple[MAML, MAML]:
    torch.manual_seed(0)
    cfg = MetaConfig(inner_lr=LR, inner_steps=STEPS, first_order=first_order, batching=batching)
    teacher = MAML(
        MLP(2, WAYS, [12, 12]).double(), "classification", MetaConfig(inner_lr=LR, inner_steps=STEPS)
    )
    student = MAML(MLP(2, WAYS, [6, 6]).double(), "classification", cfg)
    return teacher, student


def learned_distiller(teacher: MAML, student: MAML, pairs=(("output", "output"),), distance="kl", **learn):
    torch.manual_seed(1)
    shapes = feature_shapes(teacher.model, (2,)), feature_shapes(student.model, (2,))
    return Distiller(distance, TEMPERATURE, list(pairs), *shapes, **learn).double()


def _mlp(ps: list[Tensor], x: Tensor) -> Tensor:
    h = x
    for i in range(0, len(ps) - 2, 2):
        h = torch.relu(F.linear(h, ps[i], ps[i + 1]))
    return F.linear(h, ps[-2], ps[-1])


def _kl(s: Tensor, t: Tensor, temperature: Tensor) -> Tensor:
    log_s, log_t = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2


def reference_inner_loss(
    teacher: MAML, student: MAML, batch: TaskBatch, weight: Tensor, temperature: Tensor, first_order: bool
) -> Tensor:
    """By hand, per task: the teacher adapts (no graph); the student takes STEPS steps on CE(support) +
    weight x KL_T(student, teacher) over the support and transfer points; the loss is CE on the queries."""
    total = 0.0
    for t in range(batch.num_tasks):
        x = torch.cat([batch.support_x[t], batch.transfer_x[t]])
        sy = batch.support_y[t]
        fast_t = [p.detach().requires_grad_() for p in teacher.model.parameters()]
        for _ in range(STEPS):
            loss = F.cross_entropy(_mlp(fast_t, batch.support_x[t]), sy)
            fast_t = [p - LR * g for p, g in zip(fast_t, torch.autograd.grad(loss, fast_t))]
        target = _mlp(fast_t, x).detach()
        fast = list(student.model.parameters())
        for _ in range(STEPS):
            out = _mlp(fast, x)
            loss = F.cross_entropy(out[: sy.numel()], sy) + weight * _kl(out, target, temperature)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [p - LR * g for p, g in zip(fast, grads)]
        total = total + F.cross_entropy(_mlp(fast, batch.query_x[t]), batch.query_y[t])
    return total / batch.num_tasks


@pytest.mark.parametrize("batching", STRATEGIES)
def test_inner_distillation_meta_gradient_matches_a_per_task_reference(batching: str) -> None:
    batch = blob_tasks()
    teacher, student = mlp_pair(batching)
    distiller = learned_distiller(teacher, student, learn_weight=True, learn_temperature=True)
    with torch.no_grad():  # away from the starting values, so the factors matter
        distiller.log_weight.fill_(0.3)
        distiller.log_temperature.fill_(math.log(1.5))
    metrics = MetaDistillation(teacher, student, distiller, WEIGHT, inner=True).meta_backward(batch)
    wrt = [*student.model.parameters(), distiller.log_weight, distiller.log_temperature]
    weight, temperature = WEIGHT * distiller.log_weight.exp()[0], distiller.log_temperature.exp()[0]
    loss = reference_inner_loss(teacher, student, batch, weight, temperature, first_order=False)
    for p, r in zip(wrt, torch.autograd.grad(loss, wrt)):
        assert float((p.grad - r).abs().max()) <= 1e-10
    assert abs(metrics["loss"] - float(loss.detach())) <= 1e-10
    assert abs(metrics["kd_temperature"] - 1.5) <= 1e-12
    assert abs(metrics["kd_weight"] - WEIGHT * math.exp(0.3)) <= 1e-12


def test_first_order_inner_distillation_matches_its_reference() -> None:
    """Fixed weight and temperature, first order: the inner gradients are constants."""
    batch = blob_tasks()
    teacher, student = mlp_pair("loop", first_order=True)
    distiller = learned_distiller(teacher, student)
    MetaDistillation(teacher, student, distiller, WEIGHT, inner=True).meta_backward(batch)
    wrt = list(student.model.parameters())
    fixed = torch.tensor(WEIGHT, dtype=torch.float64), torch.tensor(TEMPERATURE, dtype=torch.float64)
    loss = reference_inner_loss(teacher, student, batch, *fixed, first_order=True)
    for p, r in zip(wrt, torch.autograd.grad(loss, wrt)):
        assert float((p.grad - r).abs().max()) <= 1e-10


# --- (3) the learned temperature's and weight's gradients against finite differences ----------------
@pytest.mark.parametrize("name", ["log_temperature", "log_weight"])
def test_learned_parameter_gradient_matches_finite_differences(name: str) -> None:
    batch = blob_tasks(tasks=4)
    teacher, student = mlp_pair("batched")
    distiller = learned_distiller(teacher, student, learn_weight=True, learn_temperature=True)
    mkd = MetaDistillation(teacher, student, distiller, WEIGHT, inner=True)
    param = getattr(distiller, name)

    def loss_at(value: float) -> float:
        with torch.no_grad():
            param.fill_(value)
        student.zero_grad(set_to_none=True)
        distiller.zero_grad(set_to_none=True)
        return mkd.meta_backward(batch)["loss"]

    start, eps = float(param.detach()), 1e-5
    loss_at(start)
    analytic = float(param.grad)
    numeric = (loss_at(start + eps) - loss_at(start - eps)) / (2 * eps)
    assert abs(analytic) > 1e-5  # it does move the meta-loss
    assert abs(analytic - numeric) <= 1e-5 * abs(analytic)  # central differences: O(eps^2)


# --- (4) per-tap values and what the metrics report -------------------------------------------------
def test_per_tap_weights_are_learned_and_reported_by_tap() -> None:
    batch = blob_tasks()
    teacher, student = mlp_pair("batched")
    pairs = (("hidden2", "hidden2"), ("output", "output"))
    distiller = learned_distiller(teacher, student, pairs, "mse", learn_weight=True, per_tap=True)
    assert distiller.log_weight.shape == (2,) and distiller.log_temperature is None
    metrics = MetaDistillation(teacher, student, distiller, WEIGHT, inner=True).meta_backward(batch)
    assert metrics["kd_weight/hidden2"] == metrics["kd_weight/output"] == WEIGHT
    assert "kd_weight" not in metrics and "kd_temperature" not in metrics
    grad = distiller.log_weight.grad
    assert bool(torch.isfinite(grad).all()) and bool((grad.abs() > 1e-8).all()) and grad[0] != grad[1]


# --- (5) refusals, one line each ----------------------------------------------------------------------
class Images:
    task, in_shape, out_dim = "classification", (1, 28, 28), 5


def _build(kd: KDConfig, meta: MetaConfig) -> Distiller:
    teacher = build.meta_learner(Conv4Config(filters=4), "teacher", Images(), meta, 0)
    student = build.meta_learner(Conv4Config(filters=2), "student", Images(), meta, 1)
    return build.distiller(kd, teacher, student, Images.in_shape)


@pytest.mark.parametrize(
    ("kd", "meta", "needle"),
    [
        (dict(distance="kl", inner=True), dict(student_family="protonet"), "kd.inner=true"),
        (dict(distance="kl", inner=True), dict(inner_steps=0), "meta.inner_steps=0"),
        (dict(distance="kl", inner=True, learn_temperature=True), dict(first_order=True), "meta.first_order"),
        (dict(distance="mse", inner=True, learn_temperature=True), {}, "kd.distance=mse"),
        (dict(distance="kl", source="init"), dict(teacher_family="protonet"), "kd.source=init"),
    ],
    ids=["protonet-student-inner", "no-inner-step", "first-order", "no-temperature", "protonet-init"],
)
def test_modes_a_family_cannot_take_are_refused(kd: dict, meta: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _build(KDConfig(**kd), MetaConfig(**meta))
    assert needle in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["learn_weight", "learn_temperature"])
def test_learning_without_the_inner_loop_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match=r"kd\.inner=true"):
        KDConfig(distance="kl", **{key: True})


def test_learned_values_start_at_the_config() -> None:
    kd = KDConfig(
        distance="kl", temperature=3.0, weight=0.5, inner=True, learn_weight=True, learn_temperature=True
    )
    distiller = _build(kd, MetaConfig(teacher_family="protonet"))
    assert distiller.learned_values(kd.weight) == pytest.approx({"kd_weight": 0.5, "kd_temperature": 3.0})


# --- (6) end to end: a ProtoNet teacher, MAML students with learned distillation ----------------------
def test_protonet_teacher_into_maml_student_with_learned_kd(run_cli, tmp_path, omniglot):  # noqa: F811
    run_dir = tmp_path / "run"
    proc = run_cli(
        *omniglot,
        "meta.teacher_family=protonet",
        "kd=kl",
        "kd.inner=true",
        "kd.learn_temperature=true",
        "kd.learn_weight=true",
        "train.stages=[teacher,student_kd]",
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = read_summary(run_dir)["models"]
    acc = models["teacher"]["metrics"]["accuracy"]
    assert acc["step_0"] == acc["step_3"]  # the ProtoNet teacher: flat
    assert models["student_kd"]["training"]["best_val"] is not None
    state = torch.load(run_dir / "checkpoints" / "student_kd.pt", weights_only=True)["state_dict"]
    assert {"distiller.log_weight", "distiller.log_temperature"} <= set(state)
    ea = TensorBoardRuns(run_dir)
    scalars = ea.tags("scalars")
    assert {
        "student_kd/train/kd_temperature",
        "student_kd/train/kd_weight",
        "student_kd/train/kd_loss",
    } <= scalars
    # every logged value (iterations 3, 6, 9, 12): started at kd.temperature=4 and kd.weight=1, each
    # moved by Adam at outer_lr 0.001 (a few thousandths in log space per step), none frozen
    learned_start = {"kd_temperature": 4.0, "kd_weight": 1.0}
    for name, start in learned_start.items():
        logged = ea.scalars(f"student_kd/train/{name}")
        assert [e.step for e in logged] == [3, 6, 9, 12], name
        values = [e.value for e in logged]
        assert all(abs(math.log(v / start)) < 0.05 for v in values), (name, values)
        assert all(a != b for a, b in zip([start, *values], values)), (name, values)  # it moved every time
    # the checkpoint holds learned values too, not the ones the run started from
    assert abs(math.log(float(state["distiller.log_temperature"].exp()) / 4.0)) > 1e-4
    assert abs(float(state["distiller.log_weight"])) > 1e-4
