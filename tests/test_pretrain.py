"""The pretrain family (meta.family=pretrain, docs/pretrain.md): plain pretraining, ordinary distillation.

- Written-out float64 references: the linear classifier's logits, loss and gradient, the cosine
  classifier, the centroid head, the logreg head's fitted weights (optimality: the gradient of the
  penalised objective vanishes there) and the KL term of ordinary distillation.
- Learning: on test_learning.py's synthetic classes, the pretrained embedding's meta-test accuracy
  (either head) is far above chance and far above its untrained self.
- Ordinary distillation pulls the student's logits toward the teacher's (KL lower than its twin's
  trained without the term).
- An interrupted pretrain stage resumed from its checkpoint ends with the uninterrupted weights.
- The fingerprint: the pretrain options shape a pretrain role's, and leave every other family's alone.
- The console script on a tiny Omniglot: meta=pretrain end to end (summary.json, metakd_run.load),
  the mixed pipelines (pretrain->protonet, protonet->pretrain), and the refused combinations (exit 2,
  one line, before any training).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from metakd_run import build, fingerprint
from metakd_run.config import (
    Config,
    Conv4Config,
    KDConfig,
    MetaConfig,
    OmniglotConfig,
    PretrainConfig,
    Stage,
    TrainConfig,
)
from metakd_run.data.episodes import EpisodeSampler
from metakd_run.data.tasks import MiniBatch
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.evaluation.curves import fixed_tasks
from metakd_run.meta.pretrain import CosineClassifier, Pretrain, fit_logreg
from metakd_run.training import Interrupted, StageSpec, StopFlag, run_stage
from tests.conftest import read_summary
from tests.test_data_images import make_omniglot, make_splits
from tests.test_learning import CHANCE, QUERIES, SHOTS, WAYS, after_adaptation, class_images

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
SMALL = Conv4Config(filters=8, blocks=2)


def pretrain_meta(head: str = "logreg", classifier: str = "linear", batch: int = 32) -> MetaConfig:
    return MetaConfig(
        name="pretrain",
        family="pretrain",
        outer_lr=0.01,
        pretrain=PretrainConfig(batch=batch, head=head, classifier=classifier),
    )


@pytest.fixture(scope="module")
def images() -> SimpleNamespace:
    """test_learning.py's synthetic classes: 30 training classes, 12 disjoint test classes."""
    train = EpisodeSampler(class_images(30, 8, seed=1), WAYS, SHOTS, QUERIES)
    test = EpisodeSampler(class_images(12, 8, seed=2), WAYS, SHOTS, QUERIES)
    return SimpleNamespace(train=train, val=fixed_tasks(test, 20, 5, 20), test=fixed_tasks(test, 100, 7, 50))


def pretrain_stage(
    name: str, module: nn.Module, learner: Pretrain, step: Any, source: Any, val: list, iterations: int,
    checkpoint_dir: Path, stop: StopFlag | None = None, checkpoint_every: int = 10**6,
) -> dict[str, Any]:  # fmt: skip
    """One stage through the real training loop, on the learner's own mini-batches."""
    train = TrainConfig(iterations=iterations, val_every=max(1, iterations // 2), val_tasks=len(val),
                        log_every=10**6, checkpoint_every=checkpoint_every, progress=False)  # fmt: skip
    spec = StageSpec(name, module, learner, step, lambda it, g: learner.batches(source, g), val,
                     learner.cfg, train, 3, checkpoint_dir, CPU, torch.float32)  # fmt: skip
    if stop is not None:
        return run_stage(spec, SimpleNamespace(scalars=lambda *a: None), stop)
    with StopFlag() as flag:
        return run_stage(spec, SimpleNamespace(scalars=lambda *a: None), flag)


def built(
    images: SimpleNamespace, meta: MetaConfig, who: str = "teacher", seed: int = 0, model=SMALL
) -> Pretrain:
    learner = build.meta_learner(model, who, images.train, meta, seed)
    assert isinstance(learner, Pretrain) and learner.classes == 30
    return learner


# --- written-out references (float64) ------------------------------------------------------------------
def test_linear_classifier_logits_loss_and_gradient_match_a_written_out_reference(images) -> None:
    learner = built(images, pretrain_meta()).double()
    batch = learner.batches(images.train, torch.Generator().manual_seed(0)).to(CPU, torch.float64)
    metrics = learner.meta_backward(batch)
    _, feats = learner.model(batch.x)
    emb = feats["embedding"].flatten(1).detach()
    w, b = learner.classifier.weight.detach(), learner.classifier.bias.detach()
    logits = [[sum(emb[i, d] * w[k, d] for d in range(emb.shape[1])) + b[k] for k in range(30)]
              for i in range(len(emb))]  # fmt: skip
    logits = torch.tensor([[float(v) for v in row] for row in logits], dtype=torch.float64)
    p = logits.exp() / logits.exp().sum(1, keepdim=True)
    loss = -p[range(len(emb)), batch.y].log().mean()
    assert metrics["loss"] == pytest.approx(float(loss), rel=1e-10)
    onehot = F.one_hot(batch.y, 30).double()
    grad_w = (p - onehot).T @ emb / len(emb)  # d mean CE / d W
    torch.testing.assert_close(learner.classifier.weight.grad, grad_w, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(learner.classifier.bias.grad, (p - onehot).mean(0), rtol=1e-9, atol=1e-12)
    assert learner.model.head.weight.grad is None  # the model's own (ways-wide) head is not trained


def test_cosine_classifier_is_scale_times_the_cosine() -> None:
    torch.manual_seed(0)
    clf = CosineClassifier(6, 4, scale=7.0).double()
    f = torch.randn(5, 6, dtype=torch.float64)
    w = clf.weight.detach()
    ref = torch.tensor(
        [[7.0 * float(f[i] @ w[k]) / float(f[i].norm() * w[k].norm()) for k in range(4)] for i in range(5)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(clf(f).detach(), ref, rtol=1e-12, atol=1e-12)


def test_centroid_head_is_the_negative_squared_distance_to_class_means(images) -> None:
    learner = built(images, pretrain_meta(head="centroid")).double()
    batch = images.test[0].to(CPU, torch.float64).slice(0, 3)
    out, _ = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    for t in range(3):
        s_emb = learner.model(batch.support_x[t])[1]["embedding"].flatten(1)
        q_emb = learner.model(batch.query_x[t])[1]["embedding"].flatten(1)
        means = torch.stack([s_emb[batch.support_y[t] == k].mean(0) for k in range(WAYS)])
        ref = torch.tensor(
            [[-float(((q - c) ** 2).sum()) for c in means] for q in q_emb], dtype=torch.float64
        )
        torch.testing.assert_close(out[t], ref, rtol=1e-10, atol=1e-10)
    # adapt + the model's own forward: the same classes (the logits differ by ||f||^2 per row)
    fast = learner.adapt_frozen(batch.support_x[0], batch.support_y[0], 0)
    assert torch.equal(learner.predict(fast, batch.query_x[0]).argmax(-1), out[0].argmax(-1))


def test_logreg_head_is_the_penalised_optimum_on_normalised_embeddings(images) -> None:
    penalty = 0.5
    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(4, 10, 6, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.arange(5).repeat_interleave(2).repeat(4, 1)
    w = fit_logreg(feats, labels, 5, penalty, steps=200)
    for t in range(4):  # the gradient of sum_i CE(W f_i, y_i) + penalty/2 ||W||^2, written out
        p = (feats[t] @ w[t].T).softmax(-1)
        grad = (p - F.one_hot(labels[t], 5).double()).T @ feats[t] + penalty * w[t]
        assert grad.abs().max() < 1e-7, grad.abs().max()
        assert w[t].abs().max() > 0.1  # not the zero start: the fit moved
    # the learner's head: that fit on its L2-normalised support embeddings, logits W f/||f||
    meta = pretrain_meta(head="logreg")
    meta.pretrain.logreg_penalty, meta.pretrain.logreg_steps = penalty, 200
    learner = built(images, meta).double()
    batch = images.test[0].to(CPU, torch.float64).slice(0, 2)
    out, _ = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
    for t in range(2):
        s = F.normalize(learner.model(batch.support_x[t])[1]["embedding"].flatten(1), dim=-1)
        q = F.normalize(learner.model(batch.query_x[t])[1]["embedding"].flatten(1), dim=-1)
        w_t = fit_logreg(s[None], batch.support_y[t][None], WAYS, penalty, 200)[0]
        torch.testing.assert_close(out[t], q @ w_t.T, rtol=1e-6, atol=1e-6)
        # adapt + predict (the API's path) give the same logits
        fast = learner.adapt_frozen(batch.support_x[t], batch.support_y[t], 0)
        torch.testing.assert_close(learner.predict(fast, batch.query_x[t]), out[t], rtol=1e-6, atol=1e-6)


def test_ordinary_distillation_adds_weight_times_hinton_kl(images) -> None:
    meta = pretrain_meta()
    teacher = built(images, meta).double()
    student = built(images, meta, "student", seed=1, model=Conv4Config(filters=4, blocks=2)).double()
    kd = KDConfig(name="kl", distance="kl", weight=0.7, temperature=3.0)
    distiller = build.distiller(kd, teacher, student, images.train.in_shape).double()
    step = MetaDistillation(teacher, student, distiller, kd.weight, kd.source, inner=kd.inner)
    batch = student.batches(images.train, torch.Generator().manual_seed(1)).to(CPU, torch.float64)
    metrics = step.meta_backward(batch)
    with torch.no_grad():
        t_logits, s_logits = teacher.classify(batch.x)[0], student.classify(batch.x)[0]
    p_t, p_s = (t_logits / 3).softmax(-1), (s_logits / 3).softmax(-1)
    kl = 9.0 * float((p_t * (p_t.log() - p_s.log())).sum(-1).mean())  # T^2 KL(teacher || student)
    ce = float(F.cross_entropy(s_logits, batch.y))
    assert metrics["kd_loss"] == pytest.approx(kl, rel=1e-9)
    assert metrics["loss"] == pytest.approx(ce + 0.7 * kl, rel=1e-9)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher is frozen


# --- learning -----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("head,classifier", [("logreg", "linear"), ("centroid", "cosine")])
def test_pretrained_embedding_reaches_far_above_chance(images, tmp_path: Path, head: str, classifier: str):
    learner = built(images, pretrain_meta(head, classifier))
    untrained = copy.deepcopy(learner)
    result = pretrain_stage("teacher", learner, learner, learner.meta_backward, images.train, images.val,
                            150, tmp_path)  # fmt: skip
    before = after_adaptation(untrained, images.test, "accuracy")
    after = after_adaptation(learner, images.test, "accuracy")
    # measured: logreg/linear 0.44 -> 1.0, centroid/cosine 0.43 -> 1.0 (chance 0.2)
    assert before < 0.55, f"the synthetic classes are too easy untrained ({before}): the test proves nothing"
    assert after > CHANCE + 0.5 and after > before + 0.3, (before, after)
    assert result["best_val"] > CHANCE + 0.5


@pytest.fixture(scope="module")
def teacher_and_students(images, tmp_path_factory) -> SimpleNamespace:
    """A pretrain teacher (conv4-8) and a conv4-4 student trained twice on the same mini-batches:
    with ordinary distillation (KL at T=4, weight 1) and without (weight 0)."""
    meta = pretrain_meta()
    teacher = built(images, meta)
    pretrain_stage("teacher", teacher, teacher, teacher.meta_backward, images.train, images.val, 150,
                   tmp_path_factory.mktemp("teacher"))  # fmt: skip
    students = {}
    for weight in (1.0, 0.0):
        student = built(images, meta, "student", seed=1, model=Conv4Config(filters=4, blocks=2))
        kd = KDConfig(name="kl", distance="kl", weight=weight, temperature=4.0)
        distiller = build.distiller(kd, teacher, student, images.train.in_shape)
        step = MetaDistillation(teacher, student, distiller, kd.weight, kd.source, inner=kd.inner)
        module = nn.ModuleDict({"learner": student, "distiller": distiller})
        pretrain_stage("student_kd", module, student, step.meta_backward, images.train, images.val, 150,
                       tmp_path_factory.mktemp("student"))  # fmt: skip
        students[weight] = student
    return SimpleNamespace(teacher=teacher, with_kd=students[1.0], without=students[0.0])


@pytest.mark.slow
def test_ordinary_distillation_pulls_the_students_logits_toward_the_teachers(images, teacher_and_students):
    """KL(teacher || student) at T=4 over the training classes, on images of the training split
    (a fresh draw), for the student trained with the term and its twin trained without it."""
    batch = images.train.sample_images(512, torch.Generator().manual_seed(99))
    t = teacher_and_students.teacher

    def kl_to_teacher(student: Pretrain) -> float:
        with torch.no_grad():
            p = (t.classify(batch.x)[0] / 4).softmax(-1)
            log_q = (student.classify(batch.x)[0] / 4).log_softmax(-1)
        return float((p * (p.log() - log_q)).sum(-1).mean())

    with_kd, without = (
        kl_to_teacher(teacher_and_students.with_kd),
        kl_to_teacher(teacher_and_students.without),
    )
    # measured: 0.014 with, 0.051 without; a distillation term that adds nothing gives a ratio near 1
    assert with_kd < 0.6 * without, (with_kd, without)
    # and the distilled student still learned the embedding: far above chance at meta-test
    assert after_adaptation(teacher_and_students.with_kd, images.test, "accuracy") > CHANCE + 0.4


# --- resumption ---------------------------------------------------------------------------------------
def test_interrupted_pretrain_stage_resumes_to_the_uninterrupted_weights(images, tmp_path: Path) -> None:
    meta = pretrain_meta(batch=8)
    alone = built(images, meta)
    pretrain_stage("teacher", alone, alone, alone.meta_backward, images.train, images.val[:2], 20,
                   tmp_path / "alone")  # fmt: skip

    resumed = built(images, meta)
    calls = {"n": 0}
    with StopFlag() as stop:

        def step(batch: MiniBatch) -> dict[str, float]:
            calls["n"] += 1
            if calls["n"] == 7:  # a signal during iteration 7: the loop saves and stops after it
                stop.signum = 15
            return resumed.meta_backward(batch)

        with pytest.raises(Interrupted):
            pretrain_stage("teacher", resumed, resumed, step, images.train, images.val[:2], 20,
                           tmp_path / "cut", stop, checkpoint_every=5)  # fmt: skip
        stop.signum = None  # handled: the flag's exit would report it again
    fresh = built(images, pretrain_meta(batch=8), seed=5)  # other weights: all must come from the checkpoint
    result = pretrain_stage("teacher", fresh, fresh, fresh.meta_backward, images.train, images.val[:2], 20,
                            tmp_path / "cut", checkpoint_every=5)  # fmt: skip
    for key, value in alone.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    # an iteration is a mini-batch of 8 images, not a meta-batch of tasks: the throughput says so
    assert "tasks_per_second" not in result and result["images_per_second"] > 0


# --- fingerprints -------------------------------------------------------------------------------------
def test_pretrain_options_shape_a_pretrain_roles_fingerprint_only() -> None:
    def cfg(**meta: Any) -> Config:
        return Config(
            dataset=OmniglotConfig(), teacher=SMALL, student=Conv4Config(filters=4), meta=MetaConfig(**meta)
        )

    maml = fingerprint.stage_settings(cfg(), Stage.teacher)
    assert not any(".pretrain." in f".{k}" for k in maml)  # the other families' fingerprints are as before
    plain = cfg(family="pretrain")
    other = cfg(family="pretrain", pretrain=PretrainConfig(head="centroid"))
    for stage in (Stage.teacher, Stage.student_base):
        a, b = fingerprint.stage_settings(plain, stage), fingerprint.stage_settings(other, stage)
        assert fingerprint.differences(a, b) == ["meta.pretrain.head: logreg -> centroid"]
    kd_diffs = fingerprint.differences(
        fingerprint.stage_settings(plain, Stage.student_kd),
        fingerprint.stage_settings(other, Stage.student_kd),
    )
    assert kd_diffs == [
        "from_teacher.meta.pretrain.head: logreg -> centroid",
        "meta.pretrain.head: logreg -> centroid",
    ]
    # a pretrain teacher into a maml student: the student's own settings hold none, its teacher's do
    mixed = fingerprint.stage_settings(cfg(teacher_family="pretrain"), Stage.student_kd)
    assert "from_teacher.meta.pretrain.batch" in mixed and "meta.pretrain.batch" not in mixed


# --- the console script -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> list[str]:
    """A tiny Omniglot in its official zips (test_data_images.py) and its split files, as overrides."""
    root = tmp_path_factory.mktemp("data")
    make_omniglot(root)
    splits = make_splits(root / "splits")
    return [
        "experiment=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={root / 'cache'}",
        *(f"dataset.{s}_split={splits / s}.txt" for s in ("train", "val", "test")),
        "dataset.ways=2", "dataset.queries=2", "dataset.image_size=20", "teacher.filters=4",
        "student.filters=2", "teacher.blocks=2", "student.blocks=2", "meta.pretrain.batch=8",
    ]  # fmt: skip


def test_console_script_meta_pretrain_end_to_end_and_load(run_cli, tmp_path: Path, omniglot) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*omniglot, "meta=pretrain", "kd=kl", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["hparams"]["meta.pretrain"] == "batch=8,linear,logreg(penalty=1)"
    for name in ("teacher", "student_kd", "student_base"):
        acc = summary["models"][name]["metrics"]["accuracy"]
        steps = [acc[k]["mean"] for k in ("step_0", "step_1", "step_3")]
        assert len(set(steps)) == 1 and 0 <= steps[0] <= 1  # no inner loop: a flat curve
    # 7 training classes in the fixture's split: the classifier's width, found again by metakd_run.load
    state = torch.load(run_dir / "checkpoints" / "student_kd.pt", weights_only=False)["state_dict"]
    assert state["learner.classifier.weight"].shape[0] == 7
    import metakd_run

    loaded = metakd_run.load(run_dir, "student_kd")
    assert isinstance(loaded.maml, Pretrain) and loaded.maml.classes == 7
    sx, sy = torch.rand(2, 1, 20, 20), torch.tensor([0, 1])
    qx = torch.rand(4, 1, 20, 20)
    out, _ = loaded.maml.adapted_outputs(sx[None], sy[None], qx[None])
    torch.testing.assert_close(loaded.predict(qx, loaded.adapt(sx, sy)), out[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "families",
    [
        ["meta=protonet", "meta.teacher_family=pretrain", "kd=kl"],  # MKD from a pretrained teacher
        ["meta=protonet", "meta.student_family=pretrain", "kd=cosine"],  # feature KD into a pretrain student
    ],
)
def test_mixed_pipelines_run(run_cli, tmp_path: Path, omniglot, families: list[str]) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(*omniglot, *families, run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = read_summary(run_dir)["models"]
    assert set(models) == {"teacher", "student_kd", "student_base"}


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["experiment=sinusoid", "meta=pretrain"], "meta.family=pretrain is invalid"),
        (["meta=protonet", "meta.student_family=pretrain", "kd=kl"], "no logits over the training classes"),
        (["meta=maml", "meta.student_family=pretrain", "kd=mse", "kd.taps=[output]"], "no logits over"),
        (["meta=pretrain", "kd.inner=true"], "kd.inner=true is invalid with meta.family=pretrain"),
        (["meta=pretrain", "kd.source=init"], "kd.source=init is invalid"),
        (["meta=pretrain", "kd.inner=true", "kd.learn_weight=true"], "kd.learn_weight=true is invalid"),
        (["meta=pretrain", "kd.transfer=1"], "kd.transfer=1 is invalid"),
        (["meta=pretrain", "meta.pretrain.batch=0"], "meta.pretrain.batch=0 is invalid"),
    ],
)
def test_refused_combinations_exit_2_with_one_line_before_training(
    run_cli, tmp_path: Path, omniglot, overrides: list[str], needle: str
) -> None:
    run_dir = tmp_path / "run"
    base = [] if overrides[0].startswith("experiment=sinusoid") else omniglot
    proc = run_cli(*base, *overrides, run_dir=run_dir)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert not list((run_dir / "checkpoints").glob("*.pt"))  # refused before any training
