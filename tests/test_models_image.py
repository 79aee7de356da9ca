"""Image classifiers for MAML: shapes, names, batch norm, and exact second-order meta-gradients.

The meta-gradient helpers below are a deliberately tiny MAML (one inner SGD step, second order)
written twice: vmapped over tasks with ``torch.func`` and as a plain per-task autograd loop. They
are kept here, independent of ``metakd_run.meta``, to pin down the models' own behaviour; the
last tests hold ``metakd_run.meta``'s strategies to the plain loop on these models.

Batch norm is the delicate part: ``F.batch_norm``'s vmap batching rule gives wrong second-order
gradients (functorch issue 534), so under ``torch.func`` transforms our models normalise with
primitive ops, and with torch's fused kernel elsewhere (``models/norm.py``). What we rely on is
checked strictly: the two agree to second order, the kernel under vmap is wrong, no strategy calls
the kernel under a transform, and every strategy's second-order meta-gradient equals the per-task
loop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from metakd_run.config import MetaConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.maml import MAML
from metakd_run.models import build_model, feature_shapes
from metakd_run.models.conv4 import Conv4
from metakd_run.models.norm import MetaBatchNorm2d, batch_norm_2d, primitive_batch_norm
from metakd_run.models.resnet12 import ResNet12

DT = torch.float64
Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor, Tensor, Tensor]


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_close(a: Tensor, b: Tensor, tol: float = 1e-12) -> None:
    # Not torch.testing.assert_close: its first call costs ~2 s of lazy imports.
    assert a.shape == b.shape and (a - b).abs().max().item() < tol


# --- shapes, names, factory --------------------------------------------------------------------
def test_conv4_omniglot_shapes() -> None:
    model = Conv4((1, 28, 28), 5, filters=4)
    out, feats = model(torch.randn(6, 1, 28, 28))
    assert out.shape == (6, 5)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "block1": (6, 4, 14, 14),
        "block2": (6, 4, 7, 7),
        "block3": (6, 4, 3, 3),
        "block4": (6, 4, 1, 1),
        "embedding": (6, 4),
    }


def test_conv4_miniimagenet_shapes() -> None:
    model = Conv4((3, 84, 84), 5, filters=4)
    assert model.head.in_features == 4 * 5 * 5
    shapes = feature_shapes(model, (3, 84, 84))
    assert shapes["block4"] == (4, 5, 5)
    assert shapes["embedding"] == (100,)
    assert shapes["output"] == (5,)


def test_resnet12_miniimagenet_shapes() -> None:
    model = ResNet12((3, 84, 84), 5, widths=[2, 3, 4, 5])
    out, feats = model(torch.randn(2, 3, 84, 84))
    assert out.shape == (2, 5)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "block1": (2, 42, 42),
        "block2": (3, 21, 21),
        "block3": (4, 10, 10),
        "block4": (5, 5, 5),
        "embedding": (5,),
    }


def test_parameter_names_and_no_buffers() -> None:
    conv = Conv4((1, 28, 28), 5, filters=4)
    assert [n for n, _ in conv.named_parameters()] == [
        f"block{i}.{layer}.{p}" for i in range(1, 5) for layer in ("conv", "norm") for p in ("weight", "bias")
    ] + ["head.weight", "head.bias"]
    res = ResNet12((3, 32, 32), 5, widths=[2, 3, 4, 5])
    names = [n for n, _ in res.named_parameters()]
    assert names[:4] == [
        "block1.conv1.weight",
        "block1.norm1.weight",
        "block1.norm1.bias",
        "block1.conv2.weight",
    ]
    assert "block4.shortcut_conv.weight" in names and names[-2:] == ["head.weight", "head.bias"]
    for model in (conv, res):
        assert list(model.buffers()) == []
        assert model.head_prefix == "head."


def test_factory_builds_image_models() -> None:
    conv = build_model(SimpleNamespace(name="conv4", filters=4, blocks=4), (1, 28, 28), 5)
    res = build_model(SimpleNamespace(name="resnet12", widths=[2, 2, 2, 2]), (3, 84, 84), 5)
    assert isinstance(conv, Conv4) and isinstance(res, ResNet12)
    with pytest.raises(ValueError):
        Conv4((1, 8, 8), 5, filters=4, blocks=4)


# --- batch norm ---------------------------------------------------------------------------------
class _TorchCalls(TorchFunctionMode):
    """Records the name of every torch function called while active (under vmap and grad too)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.transformed: list[bool] = []  # whether a torch.func transform was active at the call

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(getattr(func, "__name__", str(func)))
        self.transformed.append(torch._C._are_functorch_transforms_active())
        return func(*args, **(kwargs or {}))


def test_meta_batch_norm_matches_functional_batch_norm() -> None:
    torch.manual_seed(0)
    norm = MetaBatchNorm2d(3, eps=1e-3).to(DT)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = 2.0 + 3.0 * torch.randn(5, 3, 4, 6, dtype=DT)
    ref = F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=1e-3)
    _assert_close(norm(x), ref)
    norm.eval()  # batch statistics in eval too (transductive, as in MAML)
    _assert_close(norm(x), ref)
    with primitive_batch_norm():
        _assert_close(norm(x), ref)


def _second_order_grads(fast: bool) -> tuple[Tensor, ...]:
    """Gradients of a function of the first gradients through the norm: what MAML's outer step needs."""
    gen = torch.Generator().manual_seed(0)
    x, v = (torch.randn(6, 3, 5, 5, dtype=DT, generator=gen) for _ in range(2))
    w, b = (torch.randn(3, dtype=DT, generator=gen) for _ in range(2))
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    with contextlib.nullcontext() if fast else primitive_batch_norm(), _TorchCalls() as calls:
        out = batch_norm_2d(x, w, b)
        first = torch.autograd.grad((out * v).sin().sum(), [x, w, b], create_graph=True)
    assert ("batch_norm" in calls.names) == fast  # the switch really chose the kernel it names
    return torch.autograd.grad(sum((g * g).sum() for g in first), [x, w, b])


def test_fused_and_primitive_batch_norm_agree_to_second_order() -> None:
    fused, primitive = _second_order_grads(True), _second_order_grads(False)
    for a, b in zip(fused, primitive):
        assert a.abs().max() > 1e-3  # not vacuous
        _assert_close(a, b, 1e-10)


def test_fused_batch_norm_under_vmap_gets_second_order_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Why the primitive version exists (functorch issue 534): the fused kernel forced under vmap.

    If this fails, torch has fixed the batching rule and ``models/norm.py`` could drop its switch.
    """
    model, params = _tiny_net()
    batch = _tasks((1, 6, 6), 3)
    monkeypatch.setattr(torch._C, "_are_functorch_transforms_active", lambda: False)
    wrong = meta_grad_vmap(model, params, batch, LR)
    monkeypatch.undo()
    assert _max_diff(wrong, meta_grad_loop(model, params, batch, LR)) > 1e-2
    assert wrong["block1.conv.bias"].abs().max() > 1e-2  # its true meta-gradient is 0


# --- a tiny second-order MAML, two ways ---------------------------------------------------------
def _loss(model: nn.Module, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(functional_call(model, params, (x,))[0], y)


def _leaves(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


def meta_grad_vmap(model: nn.Module, params: Params, batch: Batch, lr: float) -> Params:
    """Mean query loss after one inner step, vmapped over tasks; inner step by ``func.grad``."""

    def task_loss(p: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> Tensor:
        g = grad(_loss, argnums=1)(model, p, sx, sy)
        return _loss(model, {k: p[k] - lr * g[k] for k in p}, qx, qy)

    leaves = _leaves(params)
    vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(leaves, *batch).mean().backward()
    return {k: v.grad for k, v in leaves.items()}  # type: ignore[misc]


def meta_loss_loop(model: nn.Module, params: Params, batch: Batch, lr: float) -> Tensor:
    """The same meta-loss, task by task, with ``autograd.grad(create_graph=True)``."""
    total = torch.zeros((), dtype=DT)
    for sx, sy, qx, qy in zip(*batch):
        g = torch.autograd.grad(_loss(model, params, sx, sy), list(params.values()), create_graph=True)
        fast = {k: p - lr * gk for (k, p), gk in zip(params.items(), g)}
        total = total + _loss(model, fast, qx, qy)
    return total / len(batch[0])


def meta_grad_loop(model: nn.Module, params: Params, batch: Batch, lr: float) -> Params:
    leaves = _leaves(params)
    meta_loss_loop(model, leaves, batch, lr).backward()
    return {k: v.grad for k, v in leaves.items()}  # type: ignore[misc]


def _tiny_net() -> tuple[nn.Module, Params]:
    """conv -> norm -> relu -> pool -> linear, i.e. a one-block Conv4, with a random init."""
    torch.manual_seed(0)
    model = Conv4((1, 6, 6), 3, filters=3, blocks=1).to(DT)
    # Perturbed so that the norm affine and biases are non-trivial and no gradient vanishes by init.
    params = {k: v.detach() + 0.3 * torch.randn_like(v) for k, v in model.named_parameters()}
    return model, params


def _tasks(in_shape: tuple[int, ...], n_way: int, tasks: int = 3, shot: int = 2, query: int = 3) -> Batch:
    gen = torch.Generator().manual_seed(1)
    sx = torch.randn(tasks, n_way * shot, *in_shape, dtype=DT, generator=gen)
    qx = torch.randn(tasks, n_way * query, *in_shape, dtype=DT, generator=gen)
    sy = torch.arange(n_way).repeat_interleave(shot).expand(tasks, -1)
    qy = torch.arange(n_way).repeat_interleave(query).expand(tasks, -1)
    return sx, sy, qx, qy


def _max_diff(a: Params, b: Params) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


LR = 0.4


def test_second_order_meta_gradient_vmap_equals_loop_and_finite_differences() -> None:
    model, params = _tiny_net()
    batch = _tasks((1, 6, 6), 3)
    g_vmap = meta_grad_vmap(model, params, batch, LR)
    g_loop = meta_grad_loop(model, params, batch, LR)
    assert _max_diff(g_vmap, g_loop) < 1e-10
    # The conv bias feeds a batch norm, so the loss does not depend on it at all.
    assert g_vmap["block1.conv.bias"].abs().max() < 1e-10
    assert g_loop["block1.conv.bias"].abs().max() < 1e-10
    assert g_vmap["block1.conv.weight"].abs().max() > 1e-4  # the check below is not vacuous

    eps = 1e-6
    probes = [
        ("block1.conv.weight", (0, 0, 1, 1)),
        ("block1.conv.weight", (2, 0, 0, 2)),
        ("block1.norm.weight", (1,)),
        ("head.bias", (0,)),
        ("head.bias", (2,)),
    ]
    for name, idx in probes:
        plus = {k: v.clone() for k, v in params.items()}
        minus = {k: v.clone() for k, v in params.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = _meta_loss_value(model, plus, batch) - _meta_loss_value(model, minus, batch)
        fd = fd / (2 * eps)
        assert abs(fd - g_loop[name][idx].item()) < 1e-6, (name, idx)
        assert abs(fd - g_vmap[name][idx].item()) < 1e-6, (name, idx)


def _meta_loss_value(model: nn.Module, params: Params, batch: Batch) -> float:
    return meta_loss_loop(model, _leaves(params), batch, LR).item()


# --- both models under functional_call + vmap ---------------------------------------------------
MODELS: dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]] = {
    "conv4": lambda: (Conv4((1, 8, 8), 3, filters=3, blocks=2), (1, 8, 8)),
    "resnet12": lambda: (ResNet12((3, 8, 8), 3, widths=[2, 3]), (3, 8, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_vmap_with_batched_params_matches_per_task_forward(name: str) -> None:
    torch.manual_seed(0)
    model, in_shape = MODELS[name]()
    model = model.to(DT)
    params = {k: v.detach() + 0.1 * torch.randn(3, *v.shape, dtype=DT) for k, v in model.named_parameters()}
    x = torch.randn(3, 4, *in_shape, dtype=DT)
    out, feats = vmap(lambda p, xt: functional_call(model, p, (xt,)))(params, x)
    for t in range(3):
        out_t, feats_t = functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],))
        _assert_close(out[t], out_t)
        for k in feats_t:
            _assert_close(feats[k][t], feats_t[k])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_second_order_meta_gradient_vmap_equals_loop(name: str) -> None:
    torch.manual_seed(0)
    model, in_shape = MODELS[name]()
    model = model.to(DT)
    params = {k: v.detach() + 0.1 * torch.randn_like(v) for k, v in model.named_parameters()}
    batch = _tasks(in_shape, 3)
    g_vmap = meta_grad_vmap(model, params, batch, LR)
    g_loop = meta_grad_loop(model, params, batch, LR)
    assert _max_diff(g_vmap, g_loop) < 1e-10
    if name == "conv4":
        assert g_vmap["block1.conv.bias"].abs().max() < 1e-10


# --- batch norm under our meta-learning strategies -------------------------------------------------
STRATEGY_CASES = [("conv4", s) for s in ("loop", "vmap", "batched")] + [
    ("resnet12", s) for s in ("loop", "vmap")
]


def _batch_norm_calls(run: Callable[[], object]) -> list[tuple[str, bool]]:
    """Each torch batch-norm call ``run`` makes, with whether a ``torch.func`` transform was active."""
    with _TorchCalls() as calls:
        run()
    return [(n, t) for n, t in zip(calls.names, calls.transformed) if "batch_norm" in n]


def _learner(name: str, batching: str) -> tuple[MAML, Params, tuple[int, ...]]:
    """A tiny model of ``name`` with perturbed parameters (no gradient vanishes by init), in MAML."""
    torch.manual_seed(0)
    model, in_shape = MODELS[name]()
    model = model.to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    return (
        MAML(model, "classification", MetaConfig(inner_lr=LR, inner_steps=1, batching=batching)),
        params,
        in_shape,
    )


def test_the_recorder_sees_functional_batch_norm_under_vmap() -> None:
    """The control for the test below: an empty record there means no call, not a blind recorder."""
    norm = nn.BatchNorm2d(3, track_running_stats=False).to(DT)
    calls = _batch_norm_calls(lambda: vmap(norm)(torch.randn(2, 4, 3, 5, 5, dtype=DT)))
    assert calls == [("batch_norm", True)]


@pytest.mark.parametrize(("name", "batching"), STRATEGY_CASES)
def test_no_strategy_calls_the_fused_batch_norm_under_a_transform(name: str, batching: str) -> None:
    maml, _, in_shape = _learner(name, batching)
    batch = TaskBatch(*_tasks(in_shape, 3))
    calls = _batch_norm_calls(lambda: (maml.meta_backward(batch), maml.adaptation_curve(batch, 1)))
    assert not any(transformed for _, transformed in calls)
    # vmap runs every norm under its transform (primitive ops); the others take the fast kernel
    assert bool(calls) == (batching != "vmap")


# METAKD_TEST_DEVICE=cuda adds a CUDA case below (skipped where torch sees no GPU): scripts/gpu_check.py
DEVICES = ["cpu"]
if os.environ.get("METAKD_TEST_DEVICE", "cpu").startswith("cuda"):
    DEVICES.append(
        pytest.param(
            os.environ["METAKD_TEST_DEVICE"],
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
        )
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("name", "batching"), STRATEGY_CASES)
def test_every_strategy_gets_exact_second_order_batch_norm_gradients(
    name: str, batching: str, device: str
) -> None:
    maml, params, in_shape = _learner(name, batching)
    batch = _tasks(in_shape, 3)
    maml.to(device).meta_backward(TaskBatch(*batch).to(device))
    ours = {n: p.grad.cpu() for n, p in maml.model.named_parameters()}
    maml.to("cpu")
    ref = meta_grad_loop(maml.model, params, batch, LR)
    assert _max_diff(ours, ref) < 1e-10
    assert max(g.abs().max().item() for g in ref.values()) > 1e-4  # not vacuous
    if name == "conv4":  # a conv bias feeding a batch norm cannot change the loss
        assert ours["block1.conv.bias"].abs().max() < 1e-10
