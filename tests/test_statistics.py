"""The statistics of the comparison (paired, over seeds), the students' shared task stream, and the
set distances against their direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.distill.losses import DISTANCES, make_distance
from metakd_run.evaluate import gap_closed, mean_ci, paired, summarise, t_interval


def test_paired_difference_against_a_hand_computed_example():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    b = torch.tensor([0.5, 2.5, 2.0, 3.0])
    # d = [0.5, -0.5, 1.0, 1.0]: mean 0.5, sample std sqrt(((0)^2+(1)^2+(.5)^2+(.5)^2)/3) = sqrt(0.5)
    out = paired(a, b)
    assert out["mean"] == pytest.approx(0.5)
    assert out["ci95"] == pytest.approx(1.96 * math.sqrt(0.5) / 2)
    assert out["share_positive"] == pytest.approx(0.75)
    # the paired interval is narrower than the two separate intervals would suggest
    assert out["ci95"] < mean_ci(a)[1] + mean_ci(b)[1]


def test_t_interval_over_seeds_uses_student_t():
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == pytest.approx(3.0)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert math.isnan(t_interval([1.0])[1])


def test_gap_closed_for_losses_and_accuracies():
    teacher = torch.tensor([1.0, 1.0, 1.0])
    baseline = torch.tensor([3.0, 3.0, 3.0])
    distilled = torch.tensor([2.0, 2.0, 2.0])
    g = gap_closed(teacher, distilled, baseline, higher_is_better=False)
    assert g["value"] == pytest.approx(0.5)
    assert g["ci95_low"] == pytest.approx(0.5) and g["ci95_high"] == pytest.approx(0.5)
    acc = gap_closed(1 - teacher / 10, 1 - distilled / 10, 1 - baseline / 10, higher_is_better=True)
    assert acc["value"] == pytest.approx(0.5)
    # a distilled student worse than the baseline closes a negative share
    worse = gap_closed(teacher, torch.tensor([4.0, 4.0, 4.0]), baseline, higher_is_better=False)
    assert worse["value"] == pytest.approx(-0.5)


def test_summarise_reports_divergence_instead_of_nan():
    table = torch.tensor([[1.0, 2.0], [0.5, float("inf")], [float("nan"), 1.0]])
    out = summarise({"mse": table}, at=[0, 1, 2], report_steps=[0, 2])["mse"]
    assert out["step_0"]["mean"] == pytest.approx(1.5)
    assert out["step_2"] == {"mean": None, "ci95": None}
    assert out["diverged_at_step"] == 1
    assert out["curve"]["mean"][1] is None


def test_both_students_meet_identical_sinusoid_tasks():
    """The distilled student asks for transfer inputs, the baseline does not: same tasks anyway."""
    source = SinusoidTasks()
    g_kd, g_base = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        kd = source.sample(5, g_kd, transfer=20)
        base = source.sample(5, g_base, transfer=0)
        assert kd.transfer_x is not None and kd.transfer_x.shape == (5, 20, 1)
        assert base.transfer_x is None
        for name in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(kd, name), getattr(base, name)), name
        # the transfer inputs are fresh points, not copies of the labelled ones
        assert not torch.isin(kd.transfer_x, kd.query_x).any()


def _gauss(d2: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return torch.exp(-d2 / h)


def test_mmd_against_direct_formula():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64) + 0.5
    d = {
        (i, j): torch.cdist(x, y).pow(2)
        for (i, x), (j, y) in [((0, s), (0, s)), ((1, t), (1, t)), ((0, s), (1, t))]
    }
    pooled = torch.cat([d[(0, 0)].flatten(), d[(1, 1)].flatten(), d[(0, 1)].flatten(), d[(0, 1)].flatten()])
    h0 = pooled.median()
    expected = (
        sum(
            _gauss(d[(0, 0)], c * h0).mean()
            + _gauss(d[(1, 1)], c * h0).mean()
            - 2 * _gauss(d[(0, 1)], c * h0).mean()
            for c in (0.5, 1.0, 2.0)
        )
        / 3
    )
    got = make_distance("mmd", 1.0)(s, t)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)
    assert float(make_distance("mmd", 1.0)(s, s)) == pytest.approx(0.0, abs=1e-12)


def test_rkd_against_direct_formula():
    torch.manual_seed(1)
    s, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)

    def dist(x):
        d = torch.cdist(x, x)
        return d / d[~torch.eye(5, dtype=bool)].mean()

    def angles(x):
        out = torch.zeros(5, 5, 5, dtype=x.dtype)
        for i in range(5):
            for j in range(5):
                for k in range(5):
                    if i != j and k != j:
                        e1, e2 = x[i] - x[j], x[k] - x[j]
                        out[j, i, k] = e1 @ e2 / (e1.norm() * e2.norm())
        return out

    f = torch.nn.functional.smooth_l1_loss
    expected = f(dist(s), dist(t)) + 2.0 * f(angles(s), angles(t))
    assert float(make_distance("rkd", 1.0)(s, t)) == pytest.approx(float(expected), rel=1e-5)


def test_sp_against_direct_formula():
    torch.manual_seed(2)
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)

    def gram(x):
        g = x @ x.T
        return g / g.norm(dim=1, keepdim=True)

    expected = ((gram(s) - gram(t)) ** 2).sum() / 16
    assert float(make_distance("sp", 1.0)(s, t)) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("name", sorted(DISTANCES))
def test_every_distance_runs_under_vmap_and_is_differentiable(name):
    """The strategies vmap the per-task objective: every distance must batch and give gradients."""
    dist = make_distance(name, 2.0)
    s = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, 5, dtype=torch.float64)
    per_task = torch.func.vmap(dist)(s, t)
    assert per_task.shape == (3,)
    looped = torch.stack([dist(s[i], t[i]) for i in range(3)])
    assert torch.allclose(per_task, looped)
    per_task.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
