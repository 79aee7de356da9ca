"""The statistics of the comparison (paired, over seeds), the students' shared task stream, and the
set distances against their direct formulas."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.distill.losses import DISTANCES, make_distance
from metakd_run.evaluation.stats import gap_closed, mean_ci, paired, summarise, t_interval, t_quantile


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
    assert half == pytest.approx(2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert math.isnan(t_interval([1.0])[1])
    # 32 seeds: 31 degrees of freedom take 2.0395, not the normal 1.96
    values = [float(v) for v in range(32)]
    assert t_interval(values)[1] == pytest.approx(2.0395134464 * statistics.stdev(values) / math.sqrt(32))


def test_t_quantile_matches_scipy_over_degrees_of_freedom():
    from scipy import stats

    for df in [*range(1, 201), 500, 1000, 10**4, 10**6]:
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9), df
    for level in (0.5, 0.9, 0.99, 0.999):  # other levels and fractional degrees of freedom
        for df in (1, 2.5, 7, 50):
            assert t_quantile(df, level) == pytest.approx(stats.t.ppf(0.5 + level / 2, df), rel=1e-9)
    with pytest.raises(ValueError, match="df > 0"):
        t_quantile(0)


def test_gap_closed_on_constant_tasks_for_losses_and_accuracies():
    teacher = torch.tensor([1.0, 1.0, 1.0])
    baseline = torch.tensor([3.0, 3.0, 3.0])
    distilled = torch.tensor([2.0, 2.0, 2.0])
    g = gap_closed(teacher, distilled, baseline, higher_is_better=False)
    assert g["value"] == pytest.approx(0.5)
    acc = gap_closed(1 - teacher / 10, 1 - distilled / 10, 1 - baseline / 10, higher_is_better=True)
    assert acc["value"] == pytest.approx(0.5)
    # a distilled student worse than the baseline closes a negative share
    worse = gap_closed(teacher, torch.tensor([4.0, 4.0, 4.0]), baseline, higher_is_better=False)
    assert worse["value"] == pytest.approx(-0.5)


def _quantile(sorted_values: list[float], q: float) -> float:
    """The linear interpolation between order statistics (numpy's and torch's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


@pytest.mark.parametrize("higher_is_better", [False, True])
def test_gap_closed_bootstrap_is_a_paired_resampling_of_tasks(higher_is_better: bool):
    """Tasks whose values vary, against the bootstrap written out: each resample draws task indices
    (the documented generator, seed 0) and takes the SAME tasks for all three models."""
    g = torch.Generator().manual_seed(5)
    n, resamples = 40, 500
    difficulty = torch.rand(n, generator=g, dtype=torch.float64) * 3  # shared by the models: pairing matters
    teacher = difficulty + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    baseline = difficulty + 1.0 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    distilled = difficulty + 0.6 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    if higher_is_better:
        teacher, baseline, distilled = -teacher, -baseline, -distilled
    sign = 1.0 if higher_is_better else -1.0

    def share(idx: list[int]) -> float:
        t, s, b = (sum(float(x[i]) for i in idx) / len(idx) for x in (teacher, distilled, baseline))
        return sign * (s - b) / (sign * (t - b))

    draws = torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(0))
    boot = sorted(share(row) for row in draws.tolist())
    got = gap_closed(teacher, distilled, baseline, higher_is_better=higher_is_better, resamples=resamples)
    assert got["value"] == pytest.approx(share(list(range(n))), rel=1e-12)
    assert 0.3 < got["value"] < 0.6  # not a degenerate case
    assert got["ci95_low"] == pytest.approx(_quantile(boot, 0.025), rel=1e-9)
    assert got["ci95_high"] == pytest.approx(_quantile(boot, 0.975), rel=1e-9)
    assert got["ci95_low"] < got["value"] < got["ci95_high"]
    # resampling each model's tasks apart would lose the pairing and give a far wider interval
    apart = [torch.randint(n, (n,), generator=g).tolist() for _ in range(3 * resamples)]
    unpaired = sorted(
        sign
        * (
            sum(float(distilled[i]) for i in apart[3 * r + 1]) / n
            - sum(float(baseline[i]) for i in apart[3 * r + 2]) / n
        )
        / (
            sign
            * (
                sum(float(teacher[i]) for i in apart[3 * r]) / n
                - sum(float(baseline[i]) for i in apart[3 * r + 2]) / n
            )
        )
        for r in range(resamples)
    )
    paired_width = got["ci95_high"] - got["ci95_low"]
    assert _quantile(unpaired, 0.975) - _quantile(unpaired, 0.025) > 2 * paired_width


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
