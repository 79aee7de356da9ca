"""The batched meta-gradient against an independent per-task loop with torch.autograd.grad.

``METAKD_TEST_DEVICE=cuda`` adds a CUDA case to the tests that take ``device`` (skipped where torch
sees no GPU); ``scripts/gpu_check.py`` runs them that way.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.nn import functional as F

from metakd_run.config import MetaConfig
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.meta.maml import MAML
from metakd_run.models.mlp import MLP
from tests.conftest import intra_op_threads

DEVICES = ["cpu"]
if os.environ.get("METAKD_TEST_DEVICE", "cpu").startswith("cuda"):
    DEVICES.append(
        pytest.param(
            os.environ["METAKD_TEST_DEVICE"],
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
        )
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_meta_grad(model: MLP, batch, lr: float, steps: int, first_order: bool, lrs=None):
    """The way the older libraries do it: a Python loop over tasks, create_graph=True."""
    params = list(model.parameters())

    def forward(ps, x):
        h = x
        for i in range(0, len(ps) - 2, 2):
            h = torch.relu(F.linear(h, ps[i], ps[i + 1]))
        return F.linear(h, ps[-2], ps[-1])

    total = 0.0
    for t in range(batch.num_tasks):
        fast = params
        for _ in range(steps):
            loss = ((forward(fast, batch.support_x[t]) - batch.support_y[t]) ** 2).mean()
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            rates = lrs if lrs is not None else [lr] * len(fast)
            fast = [p - r * g for p, r, g in zip(fast, rates, grads)]
        total = total + ((forward(fast, batch.query_x[t]) - batch.query_y[t]) ** 2).mean()
    wrt = params + (list(lrs) if lrs is not None else [])
    return torch.autograd.grad(total / batch.num_tasks, wrt)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return SinusoidTasks(shots=5, queries=7).sample(6, g).to("cpu", torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batching", ["vmap", "loop", "batched"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_per_task_loop(batch, batching, first_order, steps, device):
    torch.manual_seed(1)
    model = MLP(1, 1, [16, 12]).double().to(device)
    batch = batch.to(device)
    cfg = MetaConfig(inner_lr=0.05, inner_steps=steps, first_order=first_order, batching=batching)
    maml = MAML(model, "regression", cfg)
    metrics = maml.meta_backward(batch)
    ours = [p.grad.clone() for p in model.parameters()]
    ref = reference_meta_grad(model, batch, 0.05, steps, first_order)
    err = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    assert err <= 1e-6, err
    assert metrics["loss"] > 0


def test_second_order_differs_from_first_order(batch):
    """Guards against the inner gradient being silently detached in second-order mode."""
    torch.manual_seed(1)
    model = MLP(1, 1, [16]).double()
    grads = {}
    for fo in (False, True):
        model.zero_grad()
        MAML(model, "regression", MetaConfig(inner_lr=0.1, inner_steps=2, first_order=fo)).meta_backward(
            batch
        )
        grads[fo] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((grads[False] - grads[True]).abs().max()) > 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batching", ["vmap", "loop", "batched"])
def test_meta_sgd_learned_rates_get_the_right_gradient(batch, batching, device):
    torch.manual_seed(2)
    model = MLP(1, 1, [8]).double().to(device)
    batch = batch.to(device)
    cfg = MetaConfig(inner_lr=0.05, inner_steps=2, learn_inner_lr=True, batching=batching)
    maml = MAML(model, "regression", cfg)
    for r in maml.inner_lrs.values():  # make the rates differ per entry
        r.data.uniform_(0.01, 0.1)
    maml.meta_backward(batch)
    rates = [maml.inner_lrs[n.replace(".", "__")] for n, _ in model.named_parameters()]
    ref = reference_meta_grad(model, batch, 0.0, 2, False, lrs=rates)
    ours = [p.grad for p in model.parameters()] + [r.grad for r in rates]
    assert max(float((a - b).abs().max()) for a, b in zip(ours, ref)) <= 1e-6


def test_anil_adapts_only_the_head(batch):
    torch.manual_seed(3)
    model = MLP(1, 1, [8, 8]).double()
    maml = MAML(model, "regression", MetaConfig(inner_lr=0.1, inner_steps=1, anil=True))
    assert maml.adapted == ["head.weight", "head.bias"]
    params = {n: p.detach() for n, p in maml.params().items()}
    fast = maml.adapt(params, maml.lrs(), batch.support_x[0], batch.support_y[0])
    assert torch.equal(fast["body.0.weight"], params["body.0.weight"])
    assert not torch.equal(fast["head.weight"], params["head.weight"])


@pytest.mark.parametrize("batching", ["vmap", "loop", "batched"])
def test_chunked_meta_batch_gives_the_same_gradient(batch, batching):
    torch.manual_seed(4)
    model = MLP(1, 1, [16, 16]).double()
    grads = []
    for chunk in (0, 4):
        model.zero_grad()
        MAML(model, "regression", MetaConfig(inner_lr=0.05, chunk=chunk, batching=batching)).meta_backward(
            batch
        )
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-12


@pytest.mark.slow
def test_adaptation_curve_improves_on_the_support_set():
    """After meta-training a little, more inner steps should lower the loss of a fresh task."""
    torch.manual_seed(5)
    model = MLP(1, 1, [40, 40])
    maml = MAML(model, "regression", MetaConfig(inner_lr=0.01))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    src = SinusoidTasks()
    for _ in range(300):
        opt.zero_grad()
        maml.meta_backward(src.sample(10, g))
        opt.step()
    curve = maml.adaptation_curve(src.sample(50, g), steps=5)["task_loss"].mean(1)
    assert curve[5] < curve[0]


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_meta_gradient_agrees_across_strategies(batch, first_order):
    torch.manual_seed(6)
    model = MLP(1, 1, [8, 8]).double()
    grads = []
    for batching in ("vmap", "loop", "batched"):
        model.zero_grad()
        cfg = MetaConfig(inner_lr=0.1, inner_steps=2, anil=True, first_order=first_order, batching=batching)
        MAML(model, "regression", cfg).meta_backward(batch)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-10
    assert float((grads[0] - grads[2]).abs().max()) <= 1e-10


def test_evaluation_paths_agree_across_strategies(batch):
    torch.manual_seed(7)
    model = MLP(1, 1, [16, 16]).double()
    curves, outs = [], []
    for batching in ("vmap", "loop", "batched"):
        maml = MAML(model, "regression", MetaConfig(inner_lr=0.05, inner_steps=2, batching=batching))
        curves.append(maml.adaptation_curve(batch, steps=4)["task_loss"])
        outs.append(maml.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)[1]["hidden2"])
    for other in (1, 2):
        assert torch.allclose(curves[0], curves[other], atol=1e-10)
        assert torch.allclose(outs[0], outs[other], atol=1e-10)


# --- conv4 with batch norm and max-pool, second order -------------------------------------------
def _conv_batch(tasks: int = 3, ways: int = 3, size: int = 12):
    g = torch.Generator().manual_seed(11)
    from metakd_run.data.tasks import TaskBatch

    sx = torch.rand(tasks, ways, 1, size, size, generator=g, dtype=torch.float64)
    qx = torch.rand(tasks, 2 * ways, 1, size, size, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat(tasks, 1)
    qy = torch.arange(ways).repeat(tasks, 2)
    return TaskBatch(sx, sy, qx, qy)


def _conv_reference_loss(model, params: dict, batch, lr: float, steps: int) -> torch.Tensor:
    """Per-task loop with torch.autograd.grad(create_graph=True), no torch.func transform."""
    from torch.func import functional_call

    total = 0.0
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(steps):
            out, _ = functional_call(model, fast, (batch.support_x[t],))
            loss = F.cross_entropy(out, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        out, _ = functional_call(model, fast, (batch.query_x[t],))
        total = total + F.cross_entropy(out, batch.query_y[t])
    return total / batch.num_tasks


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batching", ["vmap", "loop", "batched"])
def test_conv4_second_order_meta_gradient_matches_loop_and_finite_differences(batching, device):
    from metakd_run.models.conv4 import Conv4

    torch.manual_seed(12)
    model = Conv4((1, 12, 12), 3, filters=4, blocks=2).double().to(device)
    batch = _conv_batch().to(device)
    maml = MAML(model, "classification", MetaConfig(inner_lr=0.3, inner_steps=2, batching=batching))
    maml.meta_backward(batch)
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    ref = torch.autograd.grad(_conv_reference_loss(model, params, batch, 0.3, 2), list(params.values()))
    for (name, a), b in zip(ours.items(), ref):
        assert float((a - b).abs().max()) <= 1e-9, name
    # a conv bias right before batch norm cannot change the output: its meta-gradient is exactly 0
    for name, g in ours.items():
        if name.endswith("conv.bias"):
            assert float(g.abs().max()) <= 1e-10, name
    # central finite differences on a few entries
    eps = 1e-6
    for name, index in [("head.bias", (1,)), (next(iter(params)), (0, 0, 1, 1))]:
        p = params[name].data
        old = p[index].item()
        p[index] = old + eps
        up = _conv_reference_loss(model, params, batch, 0.3, 2)
        p[index] = old - eps
        down = _conv_reference_loss(model, params, batch, 0.3, 2)
        p[index] = old
        assert abs((up - down).item() / (2 * eps) - ours[name][index].item()) <= 1e-6, name


def test_conv4_batched_runs_in_chunks_and_evaluates_like_the_loop():
    from metakd_run.models.conv4 import Conv4

    torch.manual_seed(13)
    model = Conv4((1, 12, 12), 3, filters=4, blocks=2).double()
    batch = _conv_batch(tasks=6)
    auto = MAML(model, "classification", MetaConfig(inner_lr=0.3, inner_steps=2, batching="batched"))
    loop = MAML(model, "classification", MetaConfig(inner_lr=0.3, inner_steps=2))
    assert (auto.batching, auto.chunk, loop.batching, loop.chunk) == ("batched", 4, "loop", 1)
    for a, b in zip(auto.adaptation_curve(batch, 3).values(), loop.adaptation_curve(batch, 3).values()):
        assert torch.allclose(a, b, atol=1e-10)
    out_a = auto.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    out_l = loop.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    assert torch.allclose(out_a[0], out_l[0], atol=1e-10)
    assert torch.allclose(out_a[1]["block2"], out_l[1]["block2"], atol=1e-10)


def test_meta_config_is_read_by_attribute_in_every_form():
    """The ``meta`` group arrives as the dataclass, an enum choice, or Hydra's DictConfig."""
    from omegaconf import OmegaConf

    from metakd_run.config import Batching

    model = MLP(1, 1, [4])
    assert MAML(model, "regression", MetaConfig(batching=Batching.vmap)).batching == "vmap"
    assert MAML(model, "regression", OmegaConf.structured(MetaConfig(batching="loop"))).batching == "loop"
    assert MAML(model, "regression", MetaConfig()).batching == "batched"  # auto, for an MLP
    with pytest.raises(ValueError, match="meta.batching"):
        MAML(model, "regression", MetaConfig(batching="grouped"))


# --- the closed-form MLP path, the first-order conv path, and auto's choice by device --------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("first_order", "learn_lr", "anil"),
    [(False, False, False), (False, True, False), (True, True, False), (False, False, True)],
)
def test_mlp_classification_closed_form_matches_autograd_loop(device, first_order, learn_lr, anil):
    """Cross-entropy's closed-form gradient and Hessian-vector product (``batched``) against the loop."""
    torch.manual_seed(8)
    g = torch.Generator().manual_seed(8)
    from metakd_run.data.tasks import TaskBatch

    batch = TaskBatch(
        torch.randn(4, 6, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4, 6), generator=g),
        torch.randn(4, 5, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4, 5), generator=g),
    ).to(device)
    grads = []
    for batching in ("batched", "loop"):
        torch.manual_seed(9)
        model = MLP(3, 3, [7, 5]).double().to(device)
        cfg = MetaConfig(
            inner_lr=0.5,
            inner_steps=2,
            first_order=first_order,
            learn_inner_lr=learn_lr,
            anil=anil,
            batching=batching,
        )
        maml = MAML(model, "classification", cfg)
        if learn_lr:
            for r in maml.inner_lrs.values():
                r.data.uniform_(0.1, 0.9, generator=torch.Generator(device=r.device).manual_seed(3))
        metrics = maml.meta_backward(batch)
        grads.append((torch.cat([p.grad.flatten() for p in maml.parameters()]), metrics))
    (ours, m_ours), (ref, m_ref) = grads
    assert float((ours - ref).abs().max()) <= 1e-10
    assert float(ref.abs().max()) > 1e-3
    assert abs(m_ours["accuracy"] - m_ref["accuracy"]) < 1e-12 and abs(m_ours["loss"] - m_ref["loss"]) < 1e-10


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batching", ["loop", "batched", "vmap"])
def test_conv4_first_order_meta_gradient_matches_loop(batching, device):
    from metakd_run.models.conv4 import Conv4

    torch.manual_seed(14)
    model = Conv4((1, 12, 12), 3, filters=4, blocks=2).double().to(device)
    batch = _conv_batch().to(device)
    maml = MAML(
        model, "classification", MetaConfig(inner_lr=0.3, inner_steps=2, first_order=True, batching=batching)
    )
    maml.meta_backward(batch)
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(batch.num_tasks):
        fast = dict(params)
        for _ in range(2):
            out, _ = torch.func.functional_call(model, fast, (batch.support_x[t],))
            grads = torch.autograd.grad(F.cross_entropy(out, batch.support_y[t]), list(fast.values()))
            fast = {n: p - 0.3 * g for (n, p), g in zip(fast.items(), grads)}
        out, _ = torch.func.functional_call(model, fast, (batch.query_x[t],))
        total = total + F.cross_entropy(out, batch.query_y[t])
    ref = torch.autograd.grad(total / batch.num_tasks, list(params.values()))
    for (name, p), r in zip(params.items(), ref):
        assert float((p.grad - r).abs().max()) <= 1e-10, name


def test_auto_chooses_by_model_and_device():
    from metakd_run.meta.auto import resolve_batching
    from metakd_run.models.conv4 import Conv4

    conv, mlp = Conv4((1, 12, 12), 3, filters=2, blocks=2), MLP(1, 1, [4])
    assert resolve_batching("auto", conv) == "loop"  # parameters on the CPU
    assert resolve_batching("auto", conv, "cuda") == "vmap"
    assert resolve_batching("auto", conv, torch.device("cuda", 1)) == "vmap"
    assert resolve_batching("auto", mlp, "cuda") == "batched"
    assert resolve_batching("loop", conv, "cuda") == "loop"  # an explicit choice is kept
    maml = MAML(conv, "classification", MetaConfig())
    assert maml.batching == "loop"
    if torch.cuda.is_available():  # resolved again once the model has moved
        assert maml.to("cuda").batching == "vmap"


def test_auto_on_a_cpu_groups_small_conv_tasks_and_loops_over_large_ones():
    """The CPU rule of resolve_batching: per-task pixels x widest filters^2 against GROUPED_BELOW,
    whose limit depends on torch's intra-op thread count."""
    from types import SimpleNamespace

    from metakd_run.build import task_pixels
    from metakd_run.meta.auto import resolve_batching
    from metakd_run.models.conv4 import Conv4
    from metakd_run.models.resnet12 import ResNet12

    def pixels(ways: int, shots: int, queries: int, side: int) -> int:
        return task_pixels(SimpleNamespace(in_shape=(1, side, side), ways=ways, shots=shots, queries=queries))

    assert pixels(5, 1, 5, 28) == 30 * 28 * 28
    assert task_pixels(SimpleNamespace(in_shape=(1,), shots=10, queries=10)) == 0  # not images
    preset, paper = Conv4((1, 28, 28), 5, filters=32), Conv4((1, 28, 28), 5, filters=64)
    tiny, mini = Conv4((1, 28, 28), 5, filters=8), Conv4((3, 84, 84), 5, filters=32)
    with intra_op_threads(2):
        assert resolve_batching("auto", preset, "cpu", pixels(5, 1, 5, 28)) == "batched"  # 24M
        assert resolve_batching("auto", paper, "cpu", pixels(5, 1, 15, 28)) == "loop"  # 257M
        assert resolve_batching("auto", preset, "cpu", 0) == "loop"  # size unknown
        assert resolve_batching("auto", preset, "cuda", pixels(5, 1, 5, 28)) == "vmap"
        assert resolve_batching("auto", mini, "cpu", pixels(5, 1, 5, 84)) == "loop"  # 217M
        assert (
            resolve_batching("auto", Conv4((3, 84, 84), 5, filters=8), "cpu", pixels(5, 1, 5, 84))
            == "batched"
        )
        small_resnet = ResNet12((3, 84, 84), 5, widths=[4, 4, 4, 4])  # no batched_forward: the loop
        assert resolve_batching("auto", small_resnet, "cpu", pixels(5, 1, 1, 84)) == "loop"
        maml = MAML(preset, "classification", MetaConfig())
        maml.task_pixels = pixels(5, 1, 5, 28)
        assert maml.batching == "batched"
    with intra_op_threads(1):  # one intra-op thread: the loop wins from a smaller size on
        assert resolve_batching("auto", preset, "cpu", pixels(5, 1, 5, 28)) == "loop"
        assert resolve_batching("auto", tiny, "cpu", pixels(5, 1, 5, 28)) == "batched"  # 1.5M
