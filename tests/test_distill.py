"""Meta knowledge distillation against independent references: the KL formula, weight 0, a frozen
teacher, and the whole meta-gradient against a hand-written per-task autograd loop (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from metakd_run.config import MetaConfig
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.distill.losses import Distiller, make_distance
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.meta.maml import MAML
from metakd_run.models import feature_shapes
from metakd_run.models.mlp import MLP

pytestmark = pytest.mark.usefixtures("one_thread")


STRATEGIES = ["loop", "vmap", "batched"]
LR, STEPS, WEIGHT = 0.05, 2, 0.7


def _batch(transfer: int = 0):
    g = torch.Generator().manual_seed(0)
    return SinusoidTasks(shots=5, queries=6).sample(4, g, transfer=transfer).to("cpu", torch.float64)


def _learners(batching: str, first_order: bool = False, teacher_rates: bool = False) -> tuple[MAML, MAML]:
    """A wider teacher (12) and a narrower student (8), so feature taps need a projection."""
    cfg = MetaConfig(inner_lr=LR, inner_steps=STEPS, first_order=first_order, batching=batching)
    torch.manual_seed(0)
    teacher_cfg = MetaConfig(
        inner_lr=LR,
        inner_steps=STEPS,
        first_order=first_order,
        batching=batching,
        learn_inner_lr=teacher_rates,
    )
    teacher = MAML(MLP(1, 1, [12, 12]).double(), "regression", teacher_cfg)
    student = MAML(MLP(1, 1, [8, 8]).double(), "regression", cfg)
    return teacher, student


def _distiller(teacher: MAML, student: MAML, distance: str = "mse") -> Distiller:
    torch.manual_seed(1)
    pairs = [("hidden2", "hidden2"), ("output", "output")] if distance == "mse" else [("output", "output")]
    return Distiller(
        distance, 4.0, pairs, feature_shapes(teacher.model, (1,)), feature_shapes(student.model, (1,))
    ).double()


# --- (1) the KL distance is Hinton's formula -----------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_distance_is_the_softened_kl_times_t_squared(temperature: float) -> None:
    g = torch.Generator().manual_seed(2)
    s = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    t = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    shapes = {"output": (5,)}
    kd = Distiller("kl", temperature, [("output", "output")], shapes, shapes)
    ref = F.kl_div(
        F.log_softmax(s / temperature, dim=-1),
        F.log_softmax(t / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    ours = kd({"output": s}, {"output": t})
    assert abs(float(ours) - float(ref) * temperature**2) <= 1e-12
    assert float(ours) > 1e-3  # not vacuous
    assert abs(float(kd({"output": t}, {"output": t}))) <= 1e-12


def _cosine_reference(s: Tensor, t: Tensor) -> float:
    """1 - cos(s_i, t_i) per point, written out in float64 sums, averaged over the points."""
    total = 0.0
    for a, b in zip(s.reshape(len(s), -1).tolist(), t.reshape(len(t), -1).tolist()):
        dot = sum(x * y for x, y in zip(a, b))
        norms = sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5
        total += 1.0 - dot / norms
    return total / len(s)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2)])  # flat features, and conv maps (flattened)
def test_cosine_distance_against_its_formula(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(3)
    s, t = (
        torch.randn(shape, generator=g, dtype=torch.float64),
        torch.randn(shape, generator=g, dtype=torch.float64),
    )
    distance = make_distance("cosine", 1.0)
    assert float(distance(s, t)) == pytest.approx(_cosine_reference(s, t), rel=1e-12)
    # by hand: orthogonal 1, same direction at another scale 0, opposite 2: mean 1
    hand_s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    hand_t = torch.tensor([[0.0, 3.0], [2.0, 2.0], [-5.0, 0.0]], dtype=torch.float64)
    assert float(distance(hand_s, hand_t)) == pytest.approx(1.0, abs=1e-12)


def _attention_reference(s: Tensor, t: Tensor) -> float:
    """Zagoruyko & Komodakis's maps written out: per image, the squared activation summed over
    channels at each position (a flat feature: its squared entries), divided by its L2 norm;
    the squared differences of the two maps summed over positions, averaged over the images."""

    def maps(f: Tensor) -> list[list[float]]:
        out = []
        for image in f.tolist():
            if f.dim() == 2:
                a = [x * x for x in image]
            else:
                a = [sum(ch[i][j] ** 2 for ch in image) for i in range(f.shape[2]) for j in range(f.shape[3])]
            norm = sum(x * x for x in a) ** 0.5
            out.append([x / norm for x in a])
        return out

    pairs = list(zip(maps(s), maps(t)))
    return sum(sum((x - y) ** 2 for x, y in zip(a, b)) for a, b in pairs) / len(pairs)


def test_attention_distance_against_its_formula() -> None:
    g = torch.Generator().manual_seed(4)
    distance = make_distance("attention", 1.0)
    # conv maps: the channel counts differ (3 vs 5), the spatial sizes agree
    s, t = (
        torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64),
        torch.randn(4, 5, 3, 2, generator=g, dtype=torch.float64),
    )
    assert float(distance(s, t)) == pytest.approx(_attention_reference(s, t), rel=1e-12)
    flat_s, flat_t = (
        torch.randn(6, 7, generator=g, dtype=torch.float64),
        torch.randn(6, 7, generator=g, dtype=torch.float64),
    )
    assert float(distance(flat_s, flat_t)) == pytest.approx(_attention_reference(flat_s, flat_t), rel=1e-12)
    # the channel-summed map ignores the scale and the channel order: the same map gives 0
    assert float(distance(s, 2.0 * s.flip(1))) == pytest.approx(0.0, abs=1e-12)
    # by hand: maps [1, 0] and [0, 1] (one channel, 1x2) differ by 2 per image
    one, other = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    assert float(distance(one, other)) == pytest.approx(2.0, abs=1e-6)


# --- (2) weight 0 is plain MAML ------------------------------------------------------------------------
@pytest.mark.parametrize("batching", STRATEGIES)
def test_zero_weight_gives_the_plain_maml_meta_gradient(batching: str) -> None:
    batch = _batch()
    teacher, student = _learners(batching)
    student.meta_backward(batch)
    plain = [p.grad.clone() for p in student.model.parameters()]
    student.zero_grad(set_to_none=True)
    MetaDistillation(teacher, student, _distiller(teacher, student), weight=0.0).meta_backward(batch)
    distilled = [p.grad for p in student.model.parameters()]
    for a, b in zip(plain, distilled):
        # 0 x distance adds exact zeros; the plain MLP step (batched) takes the closed-form
        # meta-gradient, the distillation step autograd: equal up to rounding
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


# --- (3) the teacher stays frozen ------------------------------------------------------------------------
@pytest.mark.parametrize("batching", STRATEGIES)
def test_teacher_gets_no_gradient(batching: str) -> None:
    teacher, student = _learners(batching, teacher_rates=True)
    mkd = MetaDistillation(teacher, student, _distiller(teacher, student), weight=1.0)
    metrics = mkd.meta_backward(_batch(transfer=3))
    assert metrics["kd_loss"] > 0
    assert all(p.grad is None for p in teacher.parameters())  # the model and its learned rates
    assert all(p.grad is not None for p in student.model.parameters())


# --- (4) the meta-gradient against a per-task autograd loop ---------------------------------------------
def _mlp(ps: list[Tensor], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    feats, h = {}, x
    for i in range(0, len(ps) - 2, 2):
        h = torch.relu(F.linear(h, ps[i], ps[i + 1]))
        feats[f"hidden{i // 2 + 1}"] = h
    return F.linear(h, ps[-2], ps[-1]), feats


def _adapt(ps: list[Tensor], x: Tensor, y: Tensor, lrs: list, steps: int, create_graph: bool) -> list[Tensor]:
    for _ in range(steps):
        out, _ = _mlp(ps, x)
        grads = torch.autograd.grad(((out - y) ** 2).mean(), ps, create_graph=create_graph)
        ps = [p - r * g for p, r, g in zip(ps, lrs, grads)]
    return ps


def reference_kd_loss(
    teacher: MAML, student: MAML, distiller: Distiller, batch, first_order: bool, source: str
):
    """Mean over tasks of task loss + WEIGHT x mean over taps of MSE(projected student, teacher)."""
    t_lrs = list(teacher.lrs().values())
    (w_p, b_p) = list(distiller.projections["hidden2__to__hidden2"].parameters())
    s_params = list(student.model.parameters())
    total, kd_total = 0.0, 0.0
    for t in range(batch.num_tasks):
        qx = torch.cat([batch.query_x[t], batch.transfer_x[t]])
        # the teacher: a detached copy, adapted without any graph
        t_params = [p.detach().requires_grad_() for p in teacher.model.parameters()]
        t_steps = STEPS if source == "adapted" else 0
        t_rates = [r.detach() if isinstance(r, Tensor) else r for r in t_lrs]
        fast_t = _adapt(t_params, batch.support_x[t], batch.support_y[t], t_rates, t_steps, False)
        t_out, t_feats = _mlp(fast_t, qx)
        t_out, t_h2 = t_out.detach(), t_feats["hidden2"].detach()
        # the student: second order unless first_order
        fast_s = _adapt(
            s_params, batch.support_x[t], batch.support_y[t], [LR] * len(s_params), STEPS, not first_order
        )
        s_out, s_feats = _mlp(fast_s, qx)
        task = ((s_out[: batch.query_y.shape[1]] - batch.query_y[t]) ** 2).mean()
        hidden = ((F.linear(s_feats["hidden2"], w_p, b_p) - t_h2) ** 2).mean()
        output = ((s_out - t_out) ** 2).mean()
        kd = (hidden + output) / 2
        total = total + task + WEIGHT * kd
        kd_total = kd_total + kd.detach()
    return total / batch.num_tasks, kd_total / batch.num_tasks


@pytest.mark.parametrize("batching", STRATEGIES)
@pytest.mark.parametrize(("first_order", "source"), [(False, "adapted"), (True, "init")])
def test_distillation_meta_gradient_matches_per_task_reference(
    batching: str, first_order: bool, source: str
) -> None:
    batch = _batch(transfer=3)
    teacher, student = _learners(batching, first_order=first_order, teacher_rates=True)
    with torch.no_grad():  # make the teacher's learned rates differ per entry
        for r in teacher.inner_lrs.values():
            r.uniform_(0.01, 0.1)
    distiller = _distiller(teacher, student)
    assert isinstance(distiller.projections["hidden2__to__hidden2"], torch.nn.Linear)  # 8 -> 12
    metrics = MetaDistillation(teacher, student, distiller, WEIGHT, source).meta_backward(batch)

    wrt = list(student.model.parameters()) + list(distiller.parameters())
    loss, kd = reference_kd_loss(teacher, student, distiller, batch, first_order, source)
    ref = torch.autograd.grad(loss, wrt)
    for p, r in zip(wrt, ref):
        assert float((p.grad - r).abs().max()) <= 1e-10
    assert abs(metrics["kd_loss"] - float(kd)) <= 1e-10
    assert abs(metrics["loss"] - loss.item()) <= 1e-10
