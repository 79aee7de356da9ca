"""Prototypical Networks: prototypes, distance logits and the meta-gradient against a direct per-task
computation (float64), the prototype head that ``adapt`` returns, flat curves, and the CLI."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F

from metakd_run import build
from metakd_run.config import ConfigError, Conv4Config, MetaConfig, MLPConfig
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.data.tasks import TaskBatch
from metakd_run.meta.protonet import ProtoNet
from metakd_run.models.conv4 import Conv4
from tests.conftest import read_summary
from tests.test_data_images import make_omniglot, make_splits

STRATEGIES = ["loop", "vmap", "batched"]
WAYS, SHOTS, QUERIES, SIZE = 3, 2, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def image_tasks(tasks: int = 4, seed: int = 0, shuffle: bool = True) -> TaskBatch:
    """Classification tasks of noisy copies of one random image per class, labels in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, WAYS, 1, SIZE, SIZE, generator=g, dtype=torch.float64)

    def labels(per_class: int) -> Tensor:
        y = torch.arange(WAYS).repeat_interleave(per_class).expand(tasks, -1)
        if shuffle:
            y = torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in y])
        return y.contiguous()

    def images(y: Tensor) -> Tensor:
        noise = torch.randn(*y.shape, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
        return torch.stack([centres[t, y[t]] for t in range(tasks)]) + 0.7 * noise

    sy, qy = labels(SHOTS), labels(QUERIES)
    return TaskBatch(images(sy), sy, images(qy), qy)


def protonet(batching: str, chunk: int = 0) -> ProtoNet:
    torch.manual_seed(0)
    model = Conv4((1, SIZE, SIZE), WAYS, filters=4, blocks=2).double()
    return ProtoNet(model, "classification", MetaConfig(batching=batching, chunk=chunk))


def direct_logits(model: torch.nn.Module, sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
    """ONE task by hand: each class's prototype is a loop's mean, each logit a loop's squared distance."""
    support = model(sx)[1]["embedding"]
    query = model(qx)[1]["embedding"]
    protos = torch.stack([support[sy == k].mean(0) for k in range(WAYS)])
    return torch.stack([torch.stack([-((q - c) ** 2).sum() for c in protos]) for q in query])


# --- prototypes and distance logits ------------------------------------------------------------------
@pytest.mark.parametrize("batching", STRATEGIES)
def test_distance_logits_match_a_direct_computation(batching: str) -> None:
    batch = image_tasks()
    learner = protonet(batching)
    out, feats = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    assert out.shape == (4, WAYS * QUERIES, WAYS) and feats["embedding"].shape[:2] == (4, WAYS * QUERIES)
    with torch.no_grad():
        for t in range(batch.num_tasks):
            ref = direct_logits(learner.model, batch.support_x[t], batch.support_y[t], batch.query_x[t])
            assert float((out[t] - ref).abs().max()) <= 1e-10
            assert float(ref.abs().min()) > 1e-3  # not vacuous
    # the tasks were told apart: most queries are nearest to their own class's prototype
    assert float((out.argmax(-1) == batch.query_y).double().mean()) > 0.6


@pytest.mark.parametrize(("batching", "chunk"), [("loop", 0), ("vmap", 3), ("batched", 0), ("batched", 3)])
def test_meta_gradient_matches_a_direct_computation(batching: str, chunk: int) -> None:
    batch = image_tasks()
    learner = protonet(batching, chunk)
    metrics = learner.meta_backward(batch)
    losses = [
        F.cross_entropy(direct_logits(learner.model, *task), task_y)
        for *task, task_y in zip(batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    ]
    loss = torch.stack(losses).mean()
    body = [(n, p) for n, p in learner.model.named_parameters() if not n.startswith("head.")]
    ref = torch.autograd.grad(loss, [p for _, p in body])
    for (name, p), r in zip(body, ref):
        assert float((p.grad - r).abs().max()) <= 1e-10, name
    assert abs(metrics["loss"] - float(loss.detach())) <= 1e-10
    assert float(torch.cat([r.flatten() for r in ref]).abs().max()) > 1e-4
    assert all(p.grad is None for n, p in learner.model.named_parameters() if n.startswith("head."))


def test_adapt_returns_the_prototypes_as_a_linear_head() -> None:
    """``adapt`` then the model's forward (the figures, metakd_run.load) gives the distance logits plus
    ``||f(x)||^2`` per row: the same probabilities and predictions."""
    batch = image_tasks(tasks=1)
    learner = protonet("loop")
    params, lrs = learner.frozen()
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    with torch.no_grad():
        fast = learner.adapt(params, lrs, sx, sy, steps=5)
        out, feats = functional_call(learner.model, fast, (qx,))
        ref = direct_logits(learner.model, sx, sy, qx)
    shift = feats["embedding"].pow(2).sum(-1, keepdim=True)
    assert float((out - (ref + shift)).abs().max()) <= 1e-9
    assert torch.allclose(out.softmax(-1), ref.softmax(-1), atol=1e-12, rtol=0)
    assert {n for n in fast if not torch.equal(fast[n], params[n])} == {"head.weight", "head.bias"}


def test_curves_hold_the_same_value_at_every_step() -> None:
    batch = image_tasks()
    learner = protonet("loop")
    curve = learner.adaptation_curve(batch, steps=3)
    assert set(curve) == {"task_loss", "accuracy"} and curve["accuracy"].shape == (4, batch.num_tasks)
    assert torch.equal(curve["task_loss"], curve["task_loss"][:1].expand(4, -1))
    with torch.no_grad():
        losses, _ = learner.task_losses(batch, None, {}, batch.query_x)
    assert torch.allclose(curve["task_loss"][0], losses, atol=1e-12, rtol=0)
    assert learner.adaptation_curve(batch, 10, at=[0, 10])["accuracy"].shape == (2, batch.num_tasks)


# --- user mistakes -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("meta", "who", "key"),
    [
        (MetaConfig(family="protonet"), "teacher", "meta.family=protonet"),
        (MetaConfig(student_family="protonet"), "student", "meta.student_family=protonet"),
    ],
)
def test_regression_is_refused_in_one_line_naming_the_key(meta: MetaConfig, who: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        build.meta_learner(MLPConfig(), who, SinusoidTasks(), meta, seed=0)
    assert str(info.value).startswith(key) and "regression" in str(info.value) and "\n" not in str(info.value)
    assert build.meta_learner(
        MLPConfig(), "teacher", SinusoidTasks(), meta if who == "student" else MetaConfig(), 0
    )


def test_the_cli_refuses_protonet_on_the_sinusoid(run_cli, tmp_path):
    proc = run_cli("meta=protonet", run_dir=tmp_path / "r")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("metakd-run: error")]
    assert len(lines) == 1 and "meta.family=protonet" in lines[0] and "regression" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


def test_a_model_without_a_linear_head_is_refused() -> None:
    model = Conv4((1, SIZE, SIZE), WAYS, filters=4, blocks=2)
    model.head = torch.nn.Sequential(torch.nn.Linear(16, WAYS))
    with pytest.raises(ValueError, match="linear layer"):
        ProtoNet(model, "classification", MetaConfig())


# --- end to end on the generated Omniglot ------------------------------------------------------------
@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> list[str]:
    """The Omniglot preset on the generated Omniglot of test_data_images (2-way, tiny models)."""
    base = tmp_path_factory.mktemp("omniglot")
    root = make_omniglot(base / "data")
    splits = make_splits(base / "splits")
    return [
        "experiment=omniglot_5w1s",
        f"dataset.root={root}",
        f"dataset.cache_dir={base / 'cache'}",
        f"dataset.train_split={splits / 'train.txt'}",
        f"dataset.val_split={splits / 'val.txt'}",
        f"dataset.test_split={splits / 'test.txt'}",
        "dataset.ways=2",
        "dataset.queries=2",
        "teacher.filters=4",
        "student.filters=2",
        "meta.meta_batch=2",
    ]


def test_protonet_runs_every_stage_on_omniglot(run_cli, tmp_path, omniglot):
    import metakd_run

    run_dir = tmp_path / "run"
    proc = run_cli(*omniglot, "meta=protonet", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["task"] == "classification" and summary["hparams"]["meta"] == "protonet"
    for name in ("teacher", "student_kd", "student_base"):
        acc = summary["models"][name]["metrics"]["accuracy"]
        assert 0.0 <= acc["step_0"]["mean"] <= 1.0
        assert acc["step_0"] == acc["step_1"] == acc["step_3"]  # no inner loop: a flat curve
        assert summary["models"][name]["training"]["best_val"] is not None
    # the Python API loads a ProtoNet back and predicts with its prototype head
    student = metakd_run.load(run_dir, "student_kd")
    assert isinstance(student.maml, ProtoNet)
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.rand(2, 1, 28, 28, generator=g), torch.tensor([0, 1])
    fast = student.adapt(sx, sy)
    assert fast["head.weight"].shape == (2, 2)  # two prototypes of the 2-filter embedding
    logits = student.predict(sx, fast)
    assert logits.shape == (2, 2) and bool(torch.isfinite(logits).all())


def test_protonet_family_is_built_for_its_role_only() -> None:
    """``meta.teacher_family`` / ``meta.student_family`` choose per role; ``meta.family`` is everyone's."""
    from metakd_run.meta.maml import MAML

    class Images:
        task, in_shape, out_dim = "classification", (1, 28, 28), 5

    meta = MetaConfig(teacher_family="protonet")
    assert isinstance(build.meta_learner(Conv4Config(filters=2), "teacher", Images(), meta, 0), ProtoNet)
    assert isinstance(build.meta_learner(Conv4Config(filters=2), "student_kd", Images(), meta, 0), MAML)
    meta = MetaConfig(family="protonet", teacher_family="maml")
    assert isinstance(build.meta_learner(Conv4Config(filters=2), "teacher", Images(), meta, 0), MAML)
    assert isinstance(build.meta_learner(Conv4Config(filters=2), "student_base", Images(), meta, 0), ProtoNet)
