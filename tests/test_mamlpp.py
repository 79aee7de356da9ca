"""MAML++ (Antoniou et al. 2019), option by option, against its definition.

Each meta-gradient is held to an independent per-task loop in float64 that writes the definition
out: plain ``torch.autograd.grad`` with ``create_graph``, the step's own rates and batch-norm
values picked by hand, and the multi-step loss summed by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metakd_run.config import ConfigError, MetaConfig
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.maml import MAML, msl_weights
from metakd_run.models.conv4 import Conv4
from metakd_run.models.mlp import MLP
from tests.conftest import read_summary

STRATEGIES = ["loop", "vmap", "batched"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sine():
    g = torch.Generator().manual_seed(0)
    return SinusoidTasks(shots=5, queries=7).sample(4, g).to("cpu", torch.float64)


@pytest.fixture
def images():
    """Three 3-way 2-shot tasks of random 1x8x8 images."""
    g = torch.Generator().manual_seed(1)
    t, ways, shots, queries = 3, 3, 2, 2

    def labels(n: int) -> torch.Tensor:
        return torch.arange(ways).repeat_interleave(n).expand(t, -1).contiguous()

    return TaskBatch(
        torch.randn(t, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64),
        labels(shots),
        torch.randn(t, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64),
        labels(queries),
    )


def reference_loss(maml: MAML, batch: TaskBatch, weights: list[float], first_order: bool) -> torch.Tensor:
    """The MAML++ outer loss written out: per task, per step, the step's own rates and norms."""
    model, steps = maml.model, maml.cfg.inner_steps
    params = dict(model.named_parameters())
    norms = maml.norm_names
    loss_fn = maml.loss

    def rate(name: str, k: int):
        if maml.step_lrs is not None:
            return maml.step_lrs[name.replace(".", "__")][k]
        return maml.cfg.inner_lr

    def norms_of_step(k: int) -> dict[str, torch.Tensor]:
        if k == 0:
            return {n: params[n] for n in norms}  # the model's own
        return {n: maml.step_norms[n.replace(".", "__")][k - 1] for n in norms}

    total = 0.0
    for t in range(batch.num_tasks):
        theta = dict(params)
        for k in range(steps):
            theta = {**theta, **norms_of_step(k)}
            out, _ = functional_call(model, theta, (batch.support_x[t],))
            adapted = [n for n in theta if n not in norms]
            grads = torch.autograd.grad(
                loss_fn(out, batch.support_y[t]), [theta[n] for n in adapted], create_graph=not first_order
            )
            theta = {**theta, **{n: theta[n] - rate(n, k) * g for n, g in zip(adapted, grads)}}
            if weights[k]:
                out, _ = functional_call(model, theta, (batch.query_x[t],))
                total = total + weights[k] * loss_fn(out, batch.query_y[t])
    return total / batch.num_tasks


def grads_of(maml: MAML) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in maml.named_parameters() if p.grad is not None}


def assert_same_meta_gradient(maml: MAML, batch: TaskBatch, weights: list[float], first_order: bool) -> None:
    maml.zero_grad()
    maml.meta_backward(batch)
    ours = grads_of(maml)
    wrt = dict(maml.named_parameters())
    ref = torch.autograd.grad(reference_loss(maml, batch, weights, first_order), list(wrt.values()))
    ref = {n: g for n, g in zip(wrt, ref)}
    assert set(ours) <= set(ref)
    for n, g in ref.items():
        ours_n = ours.get(n, torch.zeros_like(g))
        assert torch.allclose(ours_n, g, atol=1e-9, rtol=1e-7), (n, float((ours_n - g).abs().max()))


# --- the multi-step loss's weights --------------------------------------------------------------------
def test_msl_weights_follow_the_definition():
    assert msl_weights(5, 0.0) == pytest.approx([0.2] * 5)  # all equal at the start
    # half-way: each early weight has lost half of 1/S, the last holds the rest
    assert msl_weights(5, 0.5) == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.6])
    for annealed in (0.0, 0.3, 0.9, 0.99):
        assert sum(msl_weights(5, annealed)) == pytest.approx(1.0)
    floor = 0.03 / 5
    assert msl_weights(5, 0.99)[:4] == pytest.approx([floor] * 4)  # the early weights' floor
    assert msl_weights(5, 1.0) == [0.0, 0.0, 0.0, 0.0, 1.0]  # after the anneal: the last step alone
    assert msl_weights(1, 0.0) == [1.0]


def test_msl_is_on_only_for_the_first_part_of_a_stage():
    maml = MAML(MLP(1, 1, [4]), "regression", MetaConfig(inner_steps=3, msl=True, msl_until=0.2))
    maml.begin_iteration(0, 100)
    assert maml.msl_weights() == pytest.approx([1 / 3] * 3)
    maml.begin_iteration(10, 100)  # half-way through the anneal
    assert maml.msl_weights() == msl_weights(3, 0.5)
    maml.begin_iteration(20, 100)
    assert maml.msl_weights() is None  # the plain last-step loss from here on


@pytest.mark.parametrize("batching", STRATEGIES)
def test_msl_meta_gradient_matches_the_weighted_per_step_losses(sine, batching):
    torch.manual_seed(0)
    maml = MAML(
        MLP(1, 1, [8, 8]).double(),
        "regression",
        MetaConfig(inner_lr=0.05, inner_steps=3, msl=True, msl_until=0.5, batching=batching),
    )
    maml.begin_iteration(1, 4)  # annealed 0.5 of the way
    weights = msl_weights(3, 0.5)
    assert weights[-1] > weights[0] > 0
    assert_same_meta_gradient(maml, sine, weights, first_order=False)


# --- learned per-layer, per-step rates (LSLR) -----------------------------------------------------------
def test_lslr_has_one_rate_per_adapted_tensor_and_step():
    model = MLP(1, 1, [8, 8])
    maml = MAML(model, "regression", MetaConfig(inner_lr=0.02, inner_steps=4, lslr=True))
    assert len(maml.step_lrs) == len(list(model.parameters()))
    for rates in maml.step_lrs.values():
        assert rates.shape == (4,)
        assert torch.allclose(rates, torch.full((4,), 0.02))
    # steps past the trained ones (a longer meta-test) reuse the last step's rate
    last = maml.rates_at(maml.lrs(), 9)
    assert all(
        float(r.detach()) == float(maml.step_lrs[n.replace(".", "__")][3].detach()) for n, r in last.items()
    )


@pytest.mark.parametrize("batching", STRATEGIES)
@pytest.mark.parametrize("first_order", [False, True])
def test_lslr_meta_gradient_matches_a_per_task_reference(sine, batching, first_order):
    torch.manual_seed(1)
    maml = MAML(
        MLP(1, 1, [8, 8]).double(),
        "regression",
        MetaConfig(inner_lr=0.05, inner_steps=3, lslr=True, first_order=first_order, batching=batching),
    )
    with torch.no_grad():  # different rates per tensor and per step
        for rates in maml.step_lrs.values():
            rates.uniform_(0.01, 0.1)
    assert_same_meta_gradient(maml, sine, [0.0, 0.0, 1.0], first_order)
    assert all(float(r.grad.abs().sum()) > 0 for r in maml.step_lrs.values())


def test_lslr_and_meta_sgd_together_are_refused():
    with pytest.raises(ConfigError, match=r"meta.lslr=True is invalid"):
        MetaConfig(lslr=True, learn_inner_lr=True)


@pytest.mark.parametrize("key", ["msl_until", "first_order_until"])
def test_fractions_out_of_range_are_refused(key):
    with pytest.raises(ConfigError, match=rf"meta.{key}=1.5 is invalid"):
        MetaConfig(**{key: 1.5})


# --- per-step batch-norm weights and biases -------------------------------------------------------------
def image_maml(**cfg) -> MAML:
    torch.manual_seed(2)
    model = Conv4((1, 8, 8), 3, filters=4, blocks=2).double()
    return MAML(model, "classification", MetaConfig(inner_lr=0.1, **cfg))


def test_per_step_bn_is_meta_learned_not_adapted():
    maml = image_maml(inner_steps=3, per_step_bn=True)
    assert maml.norm_names == [
        "block1.norm.weight",
        "block1.norm.bias",
        "block2.norm.weight",
        "block2.norm.bias",
    ]
    assert not set(maml.norm_names) & set(maml.adapted)
    assert {tuple(p.shape) for p in maml.step_norms.values()} == {
        (2, 4)
    }  # steps 1 and 2; step 0: the model's
    with torch.no_grad():
        maml.step_norms["block1__norm__weight"][1].fill_(3.0)
    assert float(maml.norms_at(2)["block1.norm.weight"][0].detach()) == 3.0
    assert maml.norms_at(0) == {}
    # past the trained steps: the last trained step's
    assert float(maml.norms_at(7)["block1.norm.weight"][0].detach()) == 3.0


@pytest.mark.parametrize("batching", STRATEGIES)
def test_per_step_bn_meta_gradient_matches_a_per_task_reference(images, batching):
    maml = image_maml(inner_steps=3, per_step_bn=True, lslr=True, batching=batching)
    assert {p.dtype for p in maml.parameters()} == {torch.float64}  # the rates and norms follow the model
    with torch.no_grad():  # make every step's norms and rates differ
        for p in [*maml.step_norms.values(), *maml.step_lrs.values()]:
            p.add_(torch.rand_like(p) * 0.2)
    assert_same_meta_gradient(maml, images, [0.0, 0.0, 1.0], first_order=False)
    assert all(float(p.grad.abs().sum()) > 0 for p in maml.step_norms.values())


def test_every_option_together_matches_the_reference(images):
    maml = image_maml(inner_steps=3, per_step_bn=True, lslr=True, msl=True, batching="loop")
    with torch.no_grad():
        for p in maml.step_norms.values():
            p.add_(torch.rand_like(p) * 0.2)
    maml.begin_iteration(0, 10)
    assert_same_meta_gradient(maml, images, msl_weights(3, 0.0), first_order=False)


def test_per_step_bn_adaptation_curve_uses_each_steps_norms(images):
    """The meta-test's curve after k steps equals the written-out adaptation with step k-1's norms."""
    maml = image_maml(inner_steps=2, per_step_bn=True)
    with torch.no_grad():
        for p in maml.step_norms.values():
            p.add_(0.5)
    curve = maml.adaptation_curve(images, steps=2)["task_loss"]
    ref = reference_loss(maml, images, [0.0, 1.0], first_order=True).detach()
    assert float(curve[2].mean()) == pytest.approx(float(ref), rel=1e-9)
    assert float(curve[2].mean()) != pytest.approx(
        float(image_maml(inner_steps=2).adaptation_curve(images, 2)["task_loss"][2].mean())
    )


# --- derivative-order annealing --------------------------------------------------------------------------
def test_first_order_until_switches_to_second_order(sine):
    def gradient(first_order: bool, until: float, iteration: int) -> torch.Tensor:
        torch.manual_seed(3)
        maml = MAML(
            MLP(1, 1, [8]).double(),
            "regression",
            MetaConfig(inner_lr=0.1, inner_steps=2, first_order=first_order, first_order_until=until),
        )
        maml.begin_iteration(iteration, 10)
        maml.meta_backward(sine)
        return torch.cat([p.grad.flatten() for p in maml.model.parameters()])

    first, second = gradient(True, 0.0, 0), gradient(False, 0.0, 0)
    assert float((first - second).abs().max()) > 1e-4
    assert torch.allclose(gradient(False, 0.5, 4), first)  # iteration 4 of 10: still first order
    assert torch.allclose(gradient(False, 0.5, 5), second)  # from half-way: second order


# --- end to end -------------------------------------------------------------------------------------------
def test_mamlpp_preset_runs_end_to_end_and_logs_the_rates(run_cli, tmp_path):
    from tests.tensorboard_runs import TensorBoardRuns
    from tests.test_cli_images import TINY_IMAGES
    from tests.test_data_images import make_mini

    root = make_mini(tmp_path / "data")
    run_dir = tmp_path / "run"
    proc = run_cli(
        *(a for a in TINY_IMAGES if not a.startswith("meta.inner_steps=")),
        "meta=mamlpp",
        "meta.inner_steps=2",  # two steps, so the per-step norms and the multi-step loss act
        "kd.inner=true",
        f"dataset.root={root}",
        f"dataset.cache_dir={tmp_path / 'cache'}",
        run_dir=run_dir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["hparams"]["meta"] == "mamlpp"
    for name in ("teacher", "student_kd", "student_base"):
        assert 0.0 <= summary["models"][name]["metrics"]["accuracy"]["step_3"]["mean"] <= 1.0
    state = torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=True)["state_dict"]
    assert state["step_lrs.head__weight"].shape == (2,)
    assert state["step_norms.block1__norm__weight"].shape == (1, 4)
    scalars = TensorBoardRuns(run_dir).tags("scalars")
    assert {"teacher/train/inner_lr/step0", "student_kd/train/inner_lr/step1"} <= scalars


def test_rate_lr_puts_the_learned_rates_in_their_own_adam_group():
    from metakd_run.training import param_groups

    maml = MAML(MLP(1, 1, [4]), "regression", MetaConfig(inner_steps=2, lslr=True))
    (one,) = param_groups(maml, maml.cfg)  # default: one group, outer_lr for everything
    assert len(one["params"]) == 8
    cfg = MetaConfig(inner_steps=2, lslr=True, rate_lr=1e-5)
    rest, rates = param_groups(maml, cfg)
    assert rates["lr"] == 1e-5 and len(rates["params"]) == 4 and len(rest["params"]) == 4
    assert {id(p) for p in rates["params"]} == {id(p) for p in maml.step_lrs.values()}
    optimizer = torch.optim.Adam(param_groups(maml, cfg), lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-5]
