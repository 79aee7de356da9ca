"""Conditional Neural Processes: the forward pass, the loss and the meta-gradient against a written-out
per-task computation (float64) for regression and classification, permutation invariance of the
support set, flat curves, the API's adapt/predict, cross-family distillation and its refusals, and
the console script end to end on the sinusoid and on a tiny Omniglot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from metakd_run import build
from metakd_run.config import ConfigError, Conv4Config, KDConfig, MetaConfig, MLPConfig
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.data.tasks import TaskBatch
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.meta.cnp import CNP
from metakd_run.meta.maml import MAML
from metakd_run.meta.protonet import ProtoNet
from metakd_run.models.conv4 import Conv4
from metakd_run.models.mlp import MLP
from tests.conftest import read_summary
from tests.test_data_images import make_omniglot, make_splits

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 4, 8

pytestmark = pytest.mark.usefixtures("one_thread")


# --- fixtures ----------------------------------------------------------------------------------------
def sine_tasks(tasks: int = 3, shots: int = 5, queries: int = 7, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * 4 + 1
    phase = torch.rand(tasks, 1, 1, generator=g, dtype=torch.float64) * math.pi
    sx = torch.rand(tasks, shots, 1, generator=g, dtype=torch.float64) * 10 - 5
    qx = torch.rand(tasks, queries, 1, generator=g, dtype=torch.float64) * 10 - 5
    return TaskBatch(sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase))


def image_tasks(tasks: int = 3, seed: int = 0) -> TaskBatch:
    """Noisy copies of one random image per class, labels in shuffled order per task."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, WAYS, 1, SIZE, SIZE, generator=g, dtype=torch.float64)

    def labels(per_class: int) -> Tensor:
        y = torch.arange(WAYS).repeat_interleave(per_class).expand(tasks, -1)
        return torch.stack([row[torch.randperm(row.numel(), generator=g)] for row in y]).contiguous()

    def images(y: Tensor) -> Tensor:
        noise = torch.randn(*y.shape, 1, SIZE, SIZE, generator=g, dtype=torch.float64)
        return torch.stack([centres[t, y[t]] for t in range(tasks)]) + 0.7 * noise

    sy, qy = labels(SHOTS), labels(QUERIES)
    return TaskBatch(images(sy), sy, images(qy), qy)


def regressor(batching: str = "auto") -> CNP:
    torch.manual_seed(0)
    return CNP(MLP(1, 1, [6, 5]).double(), "regression", MetaConfig(batching=batching))


def classifier(batching: str = "loop", chunk: int = 0) -> CNP:
    torch.manual_seed(0)
    model = Conv4((1, SIZE, SIZE), WAYS, filters=4, blocks=2).double()
    return CNP(model, "classification", MetaConfig(batching=batching, chunk=chunk))


# --- written-out references: loops over points and classes, plain matrix-vector products -------------
def mlp_by_hand(p: dict[str, Tensor], prefix: str, layers: int, v: Tensor) -> tuple[Tensor, Tensor]:
    """One input vector through ``layers`` ReLU layers and a linear head: (output, last hidden)."""
    h = v
    for i in range(layers):
        h = torch.clamp(p[f"{prefix}body.{i}.weight"] @ h + p[f"{prefix}body.{i}.bias"], min=0)
    return p[f"{prefix}head.weight"] @ h + p[f"{prefix}head.bias"], h


def regression_by_hand(p: dict[str, Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> dict:
    """ONE task: r = (1/S) sum_i h([x_i, y_i]); (mu, raw) = g([x, r]); sigma = 0.1 + 0.9 log(1 + e^raw)."""
    r = sum(mlp_by_hand(p, "encoder.", 2, torch.cat([x, y]))[0] for x, y in zip(sx, sy)) / len(sx)
    means, sigmas, nll, sq = [], [], 0.0, 0.0
    for x, y in zip(qx, qy):
        (mu, raw), _ = mlp_by_hand(p, "decoder.", 2, torch.cat([x, r]))
        sigma = 0.1 + 0.9 * torch.log(1 + torch.exp(raw))
        nll = nll + 0.5 * math.log(2 * math.pi) + torch.log(sigma) + (y[0] - mu) ** 2 / (2 * sigma**2)
        sq = sq + (y[0] - mu) ** 2
        means.append(mu)
        sigmas.append(sigma)
    n = len(qx)
    return {"mean": torch.stack(means), "sigma": torch.stack(sigmas), "nll": nll / n, "mse": sq / n}


def classification_by_hand(model: torch.nn.Module, sx: Tensor, sy: Tensor, qx: Tensor) -> Tensor:
    """ONE task's logits: class means of the support embeddings, then the decoder on [e(q), r_k]."""
    p = dict(model.named_parameters())
    support = model.backbone(sx)[1]["embedding"]
    query = model.backbone(qx)[1]["embedding"]
    aggregates = [support[sy == k].mean(0) for k in range(WAYS)]
    return torch.stack(
        [
            torch.stack([mlp_by_hand(p, "decoder.", 2, torch.cat([q, r]))[0][0] for r in aggregates])
            for q in query
        ]
    )


# --- regression -------------------------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["auto", "loop", "batched"])
def test_regression_forward_loss_and_gradient_match_a_written_out_reference(batching: str) -> None:
    batch = sine_tasks()
    learner = regressor(batching)
    out, feats = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    assert out.shape == batch.query_y.shape and feats["sigma"].shape == batch.query_y.shape
    assert feats["hidden2"].shape == (3, 7, 5) and feats["representation"].shape == (3, 7, 5)
    curves = learner.adaptation_curve(batch, steps=2)
    params = dict(learner.model.named_parameters())
    parts = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
    refs = [regression_by_hand(params, *(t[i] for t in parts)) for i in range(batch.num_tasks)]
    with torch.no_grad():
        for t, ref in enumerate(refs):
            assert float((out[t, :, 0] - ref["mean"]).abs().max()) <= 1e-10
            assert float((feats["sigma"][t, :, 0] - ref["sigma"]).abs().max()) <= 1e-10
            assert float(ref["sigma"].min()) > 0.1  # bounded below
            for s in range(3):  # flat over inner steps
                assert float(curves["task_loss"][s, t]) == pytest.approx(float(ref["mse"]), abs=1e-10)
                assert float(curves["log_likelihood"][s, t]) == pytest.approx(-float(ref["nll"]), abs=1e-10)
    # the meta-gradient: of the mean NLL over tasks (the training loss), not of the MSE
    learner.zero_grad()
    metrics = learner.meta_backward(batch)
    loss = sum(ref["nll"] for ref in refs) / len(refs)
    assert metrics["loss"] == pytest.approx(loss.item(), abs=1e-10)
    assert metrics["task_loss"] == pytest.approx((sum(r["mse"] for r in refs) / len(refs)).item(), abs=1e-10)
    names = list(params)
    expected = torch.autograd.grad(loss, [params[n] for n in names])
    for name, g in zip(names, expected):
        assert float((params[name].grad - g).abs().max()) <= 1e-10, name
    assert float(torch.stack([g.abs().max() for g in expected]).min()) > 0  # every parameter is reached


def test_regression_is_invariant_to_the_order_of_the_support_set() -> None:
    batch = sine_tasks()
    learner = regressor()
    perm = torch.tensor([3, 0, 4, 1, 2])  # every point moves
    out, _ = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    shuffled, _ = learner.adapted_outputs(batch.support_x[:, perm], batch.support_y[:, perm], batch.query_x)
    assert float((out - shuffled).abs().max()) <= 1e-12
    # ...and not blind to it: another task's support set predicts otherwise
    other, _ = learner.adapted_outputs(batch.support_x.flip(0), batch.support_y.flip(0), batch.query_x)
    assert float((out - other).abs().max()) > 1e-3


def test_adapt_and_predict_give_the_mean_the_meta_test_scores() -> None:
    """What the Python API and the figures do (adapt_frozen, predict): the mean, as scored."""
    batch = sine_tasks()
    learner = regressor()
    out, _ = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    for t in range(batch.num_tasks):
        fast = learner.adapt_frozen(batch.support_x[t], batch.support_y[t], steps=5)
        assert float((learner.predict(fast, batch.query_x[t]) - out[t]).abs().max()) <= 1e-12


# --- classification ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("batching", "chunk"), [("loop", 0), ("vmap", 2), ("batched", 0), ("batched", 2)])
def test_classification_logits_loss_and_gradient_match_a_written_out_reference(
    batching: str, chunk: int
) -> None:
    batch = image_tasks()
    learner = classifier(batching, chunk)
    out, feats = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    assert out.shape == (3, WAYS * QUERIES, WAYS)
    assert feats["embedding"].shape == (3, WAYS * QUERIES, 16)  # 4 filters x 2 x 2
    assert feats["decoder2"].shape == (3, WAYS * QUERIES, WAYS, 64)  # the decoder's width: at least 64
    model = learner.model
    params = dict(model.named_parameters())
    refs = [
        classification_by_hand(model, batch.support_x[t], batch.support_y[t], batch.query_x[t])
        for t in range(3)
    ]
    losses = []
    for t, ref in enumerate(refs):
        assert float((out[t] - ref.detach()).abs().max()) <= 1e-10
        assert float(ref.abs().min()) > 1e-6  # not vacuous
        losses.append(-torch.log_softmax(ref, -1).gather(1, batch.query_y[t].unsqueeze(1)).mean())
    loss = sum(losses) / len(losses)
    curves = learner.adaptation_curve(batch, steps=1)
    assert curves["task_loss"][0].tolist() == pytest.approx([float(v) for v in losses], abs=1e-10)
    assert torch.equal(curves["task_loss"][0], curves["task_loss"][1])
    learner.zero_grad()
    metrics = learner.meta_backward(batch)
    assert metrics["loss"] == pytest.approx(float(loss), abs=1e-10)
    names = [n for n, p in params.items()]
    expected = torch.autograd.grad(loss, [params[n] for n in names])
    for name, g in zip(names, expected):
        assert params[name].grad is not None, name
        assert float((params[name].grad - g).abs().max()) <= 1e-9, name
    assert not any(n.startswith("backbone.head") and "weight" in n for n in names)  # no head: the decoder


def test_classification_is_invariant_to_the_order_of_the_support_set() -> None:
    batch = image_tasks()
    learner = classifier()
    perm = torch.tensor([5, 3, 0, 4, 1, 2])  # every image moves
    out, _ = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    shuffled, _ = learner.adapted_outputs(batch.support_x[:, perm], batch.support_y[:, perm], batch.query_x)
    assert float((out - shuffled).abs().max()) <= 1e-10
    # relabelling the classes permutes the logits' columns the same way (one decoder for every class)
    relabel = torch.tensor([2, 0, 1])
    renamed, _ = learner.adapted_outputs(batch.support_x, relabel[batch.support_y], batch.query_x)
    assert float((renamed[..., relabel] - out).abs().max()) <= 1e-10
    assert float((renamed - out).abs().max()) > 1e-6


# --- distillation across families --------------------------------------------------------------------
class Images:
    task, in_shape, out_dim = "classification", (1, SIZE, SIZE), WAYS


class Sine:
    task, in_shape, out_dim = "regression", (1,), 1


def learners(teacher: str, student: str, source) -> tuple:  # noqa: ANN001
    meta = MetaConfig(teacher_family=teacher, student_family=student, inner_steps=1, inner_lr=0.1)
    # a CNP teacher of 72 filters has a wider decoder than the student's 64: decoder taps are projected
    wide = 72 if teacher == student == "cnp" else 4
    cfg = (MLPConfig(hidden=[8, 8]), MLPConfig(hidden=[6, 6])) if source is Sine else (
        Conv4Config(filters=wide, blocks=2), Conv4Config(filters=2, blocks=2))  # fmt: skip
    return (
        build.meta_learner(cfg[0], "teacher", source, meta, 0),
        build.meta_learner(cfg[1], "student_kd", source, meta, 1),
    )


CROSS = [
    ("cnp", "maml", Images, "kl", None), ("cnp", "protonet", Images, "kl", None),
    ("maml", "cnp", Images, "kl", None), ("protonet", "cnp", Images, "cosine", None),
    ("cnp", "cnp", Images, "mse", ["decoder2"]), ("cnp", "maml", Sine, "mse", None),
    ("maml", "cnp", Sine, "rkd", None), ("cnp", "cnp", Sine, "mse", ["sigma"]),
]  # fmt: skip


@pytest.mark.parametrize(("teacher", "student", "source", "distance", "taps"), CROSS)
def test_cross_family_distillation_runs_in_the_outer_loss(teacher, student, source, distance, taps) -> None:  # noqa: ANN001
    t, s = learners(teacher, student, source)
    kd = KDConfig(distance=distance, taps=taps, transfer=0)
    distiller = build.distiller(kd, t, s, source.in_shape)
    if taps == ["decoder2"]:  # [classes, 64] onto [classes, 72]: one linear map of the width
        assert isinstance(next(iter(distiller.projections.values())), torch.nn.Linear)
    mkd = MetaDistillation(t, s, distiller, weight=1.0)
    batch = (image_tasks() if source is Images else sine_tasks()).to(torch.device("cpu"), torch.float32)
    s.zero_grad()
    metrics = mkd.meta_backward(batch)
    assert math.isfinite(metrics["loss"]) and metrics["kd_loss"] > 0
    reached = [p.grad is not None for p in s.model.parameters()]
    assert all(reached) if student != "protonet" else any(reached)  # ProtoNet's own head is unused
    assert all(p.grad is None for p in t.parameters())  # the teacher is frozen


REFUSED = [
    (["meta.student_family=cnp", "kd.inner=true"], "the student's inner loop, and the cnp students"),
    (["meta.teacher_family=cnp", "kd.source=init"], "kd.source=init is invalid: a cnp teacher"),
    (["meta=cnp", "kd.taps=[decoder2]"], "kd.taps: 'decoder2' is not a feature of the teacher"),
    (["meta.student_family=cnp", "kd.taps=[sigma]"], "kd.taps: 'sigma' is not a feature of the teacher"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_what_does_not_apply_is_refused_before_training(run_cli, tmp_path, overrides, message) -> None:  # noqa: ANN001
    run_dir = tmp_path / "run"
    proc = run_cli(*overrides, run_dir=run_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("metakd-run: error")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (run_dir / "checkpoints" / "teacher.pt").exists()


def test_family_is_built_for_its_role_only() -> None:
    meta = MetaConfig(student_family="cnp")
    assert isinstance(
        build.meta_learner(Conv4Config(filters=2, blocks=2), "teacher", Images(), meta, 0), MAML
    )
    assert isinstance(
        build.meta_learner(Conv4Config(filters=2, blocks=2), "student_base", Images(), meta, 0), CNP
    )
    meta = MetaConfig(family="cnp", teacher_family="protonet")
    assert isinstance(
        build.meta_learner(Conv4Config(filters=2, blocks=2), "teacher", Images(), meta, 0), ProtoNet
    )
    with pytest.raises(ConfigError, match="or meta=cnp"):
        build.meta_learner(MLPConfig(), "teacher", Sine(), MetaConfig(family="protonet"), 0)


# --- the console script ------------------------------------------------------------------------------
def test_console_script_runs_cnp_on_the_sinusoid_and_loads_it_back(run_cli, tmp_path) -> None:  # noqa: ANN001
    import metakd_run

    run_dir = tmp_path / "run"
    proc = run_cli("meta=cnp", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cnp has no inner loop" in proc.stdout + proc.stderr
    summary = read_summary(run_dir)
    assert summary["task"] == "regression" and summary["hparams"]["meta"] == "cnp"
    per_task = json.loads((run_dir / "per_task.json").read_text())
    for name in ("teacher", "student_kd", "student_base"):
        metrics = summary["models"][name]["metrics"]
        assert metrics["mse"]["step_0"] == metrics["mse"]["step_3"]  # flat
        assert metrics["mse"]["step_0"]["mean"] > 0 and math.isfinite(
            metrics["log_likelihood"]["step_0"]["mean"]
        )
        assert len(per_task[name]["log_likelihood"]["step_0"]) == 10
    # the round trip: the loaded student predicts what the meta-test scored
    student = metakd_run.load(run_dir, "student_kd")
    assert isinstance(student.maml, CNP)
    source = SinusoidTasks((0.1, 5.0), (0.0, math.pi), (-5.0, 5.0), 10, 10, 0.0)
    batch = source.sample(2, torch.Generator().manual_seed(0))
    fast = student.adapt(batch.support_x[0], batch.support_y[0])
    pred = student.predict(batch.query_x[0], fast)
    out, _ = student.maml.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    assert pred.shape == (10, 1) and torch.allclose(pred, out[0], atol=1e-6)


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> list[str]:  # noqa: ANN001
    base = tmp_path_factory.mktemp("omniglot")
    root = make_omniglot(base / "data")
    splits = make_splits(base / "splits")
    return [
        "experiment=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={base / 'cache'}",
        f"dataset.train_split={splits / 'train.txt'}", f"dataset.val_split={splits / 'val.txt'}",
        f"dataset.test_split={splits / 'test.txt'}", "dataset.ways=2", "dataset.queries=2",
        "teacher.filters=4", "student.filters=2", "meta.meta_batch=2",
    ]  # fmt: skip


def test_console_script_runs_cnp_on_omniglot(run_cli, tmp_path, omniglot) -> None:  # noqa: ANN001
    import metakd_run

    run_dir = tmp_path / "run"
    proc = run_cli(*omniglot, "meta=cnp", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["task"] == "classification" and summary["hparams"]["meta"] == "cnp"
    for name in ("teacher", "student_kd", "student_base"):
        acc = summary["models"][name]["metrics"]["accuracy"]
        assert 0.0 <= acc["step_0"]["mean"] <= 1.0 and acc["step_0"] == acc["step_3"]
        assert summary["models"][name]["training"]["best_val"] is not None
    student = metakd_run.load(run_dir, "student_kd")
    g = torch.Generator().manual_seed(0)
    sx, sy = torch.rand(2, 1, 28, 28, generator=g), torch.tensor([0, 1])
    fast = student.adapt(sx, sy)
    assert fast["context"].shape == (
        2,
        2,
    )  # two class aggregates of the 2-filter embedding (1x1 after 4 pools)
    logits = student.predict(sx, fast)
    assert logits.shape == (2, 2) and bool(torch.isfinite(logits).all())


def test_the_family_shapes_the_fingerprint_and_the_teacher_cache() -> None:
    """A CNP teacher is never reused for a MAML one (or back): the family is a setting of the stage."""
    from hydra import compose, initialize_config_dir

    import metakd_run.cli  # noqa: F401 - registers the structured configs
    from metakd_run import fingerprint
    from metakd_run.config import to_typed
    from tests.conftest import CONFIGS

    def typed(*overrides: str):  # noqa: ANN202
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return to_typed(compose("config", list(overrides)))

    maml, cnp, cnp_students = typed(), typed("meta=cnp"), typed("meta.student_family=cnp")
    assert fingerprint.teacher_settings(cnp) != fingerprint.teacher_settings(maml)
    assert fingerprint.cache_digest(cnp) != fingerprint.cache_digest(maml)
    assert fingerprint.teacher_settings(cnp_students) == fingerprint.teacher_settings(maml)  # same teacher
    diffs = fingerprint.differences(
        fingerprint.flatten(fingerprint.teacher_settings(maml)),
        fingerprint.flatten(fingerprint.teacher_settings(cnp)),
    )
    assert any("family" in d and "cnp" in d for d in diffs), diffs
    # the batching strategy is not a setting: CNP's paths agree (the reference tests above)
    loop = typed("meta=cnp", "meta.batching=loop")
    flat = [fingerprint.flatten(fingerprint.teacher_settings(c)) for c in (loop, cnp)]
    assert fingerprint.differences(*flat) == []
