"""Training learns: each model family ends far better than where it started, on the same tasks.

The rest of the suite compares runs with each other (resumption, data-parallel, sweeps), and two
runs that learn nothing agree too. These tests would fail if the meta-optimiser stopped stepping
or a family's loss stopped carrying a gradient:

- the sinusoid teacher's query MSE after adaptation falls far below its untrained initialisation's;
- the sinusoid CNP's query MSE falls far below its untrained self's;
- on a small synthetic image set whose classes are separable but hidden behind a larger
  distraction, MAML, MAML++, ProtoNet, CNP and a distilled student reach an accuracy far above chance,
  where their untrained initialisations stay near it;
- distillation pulls the student towards the adapted teacher: closer than the same student
  trained without the term (so a distillation term that adds nothing fails);
- the real console script does the same end to end (subprocess, summary.json, per_task.json);
- a stage ends with the weights of its best validation, not its last ones;
- the outer rate follows the closed-form cosine schedule.

Each was checked against the breakage it guards: every ``optimizer.step()`` of training.py made a
no-op, MAML's and ProtoNet's query losses times 0, the distillation term times 0.

The image classes: channel 0 carries a class's own 4x4 block pattern at low contrast; channels 1
and 2 carry a fresh random block pattern per image at higher contrast. An untrained network mixes
the channels, so the distraction swamps the class (measured: 5-way accuracy 0.26 for MAML after
adaptation, 0.43 for ProtoNet); a trained one learns to look at channel 0 (0.95 and 1.0).
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from metakd_run import build
from metakd_run.config import Conv4Config, KDConfig, MetaConfig, MLPConfig, OuterSchedule, TrainConfig
from metakd_run.data.episodes import EpisodeSampler
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.evaluation.curves import fixed_tasks
from metakd_run.training import StageSpec, StopFlag, run_stage
from tests.conftest import metakd_run_exe, read_summary

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CPU = torch.device("cpu")
WAYS, SHOTS, QUERIES = 5, 1, 3
CHANCE = 1.0 / WAYS
SIZE = 16  # pixels per side; the class pattern and the distraction are 4x4 blocks of 4x4 pixels


def class_images(classes: int, per_class: int, seed: int) -> torch.Tensor:
    """uint8 ``[classes, per_class, 3, SIZE, SIZE]``: a class pattern in channel 0 (contrast 0.3),
    a per-image random pattern in channels 1 and 2 (contrast 0.7), a little pixel noise."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, 2, (classes, 1, 1, 4, 4), generator=g).float()
    distraction = torch.randint(0, 2, (classes, per_class, 2, 4, 4), generator=g).float()

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(SIZE // 4, -1).repeat_interleave(SIZE // 4, -2)

    x = torch.cat([0.3 * blocks(pattern).expand(-1, per_class, -1, -1, -1), 0.7 * blocks(distraction)], 2)
    x = 0.5 + x - x.mean() + 0.03 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def images() -> SimpleNamespace:
    """Disjoint train and test classes, and fixed validation and test tasks (test classes)."""
    train = EpisodeSampler(class_images(30, 8, seed=1), WAYS, SHOTS, QUERIES)
    test = EpisodeSampler(class_images(12, 8, seed=2), WAYS, SHOTS, QUERIES)
    return SimpleNamespace(
        train=train, val=fixed_tasks(test, 20, 5, 20), test=fixed_tasks(test, 100, 7, 50), source=train
    )


def train_stage(
    name: str,
    module: nn.Module,
    learner: Any,
    step: Any,
    source: Any,
    val_tasks: list,
    meta: MetaConfig,
    iterations: int,
    checkpoint_dir: Path,
) -> dict[str, Any]:
    """One stage through the real training loop (``run_stage``), validated twice, no checkpoints."""
    train = TrainConfig(
        iterations=iterations,
        val_every=iterations // 2,
        val_tasks=len(val_tasks),
        log_every=10**6,
        checkpoint_every=10**6,
        progress=False,
    )
    spec = StageSpec(
        name=name,
        module=module,
        learner=learner,
        step=step,
        sample_tasks=lambda it, g: source.sample(meta.meta_batch, g),
        val_tasks=val_tasks,
        meta=meta,
        train=train,
        task_seed=3,
        checkpoint_dir=checkpoint_dir,
        device=CPU,
        dtype=torch.float32,
    )
    with StopFlag() as stop:
        return run_stage(spec, SimpleNamespace(scalars=lambda *a: None), stop)


def after_adaptation(learner: Any, tasks: list, metric: str) -> float:
    """The mean query ``metric`` (``mse`` or ``accuracy``) over ``tasks`` after ``meta.inner_steps``
    inner steps, computed here from the adapted outputs, not by the library's own metric code."""
    values = []
    for batch in tasks:
        out, _ = learner.adapted_outputs(batch.support_x, batch.support_y, batch.query_x)
        if metric == "mse":
            values.append(((out - batch.query_y) ** 2).flatten(1).mean(1))
        else:
            values.append((out.argmax(-1) == batch.query_y).double().mean(1))
    return float(torch.cat(values).mean())


def image_meta(family: str, batching: str = "auto") -> MetaConfig:
    if family == "mamlpp":  # configs/meta/mamlpp.yaml's switches, with two inner steps so that they act
        return MetaConfig(
            name="mamlpp", inner_lr=0.1, inner_steps=2, meta_batch=4, outer_lr=0.01, msl=True, lslr=True,
            per_step_bn=True, first_order_until=0.33, outer_schedule=OuterSchedule.cosine, batching=batching,
        )  # fmt: skip
    return MetaConfig(
        name=family, family=family, inner_lr=0.1, inner_steps=1, meta_batch=4,
        outer_lr=0.003 if family == "cnp" else 0.01, batching=batching,
    )  # fmt: skip


# --- the sinusoid --------------------------------------------------------------------------------
@pytest.mark.parametrize("batching", ["batched", "vmap"])  # the closed-form meta-gradient, and autograd
def test_sinusoid_teacher_adapts_far_better_than_its_untrained_initialisation(
    tmp_path: Path, batching: str
) -> None:
    source = SinusoidTasks((0.1, 5.0), (0.0, 3.141592653589793), (-5.0, 5.0), 10, 10, 0.0)
    meta = MetaConfig(inner_lr=0.01, inner_steps=1, meta_batch=10, outer_lr=0.01, batching=batching)
    teacher = build.meta_learner(MLPConfig(hidden=[40, 40]), "teacher", source, meta, seed=0)
    untrained = copy.deepcopy(teacher)
    val, test = fixed_tasks(source, 50, 11, 50), fixed_tasks(source, 200, 12, 100)
    train_stage("teacher", teacher, teacher, teacher.meta_backward, source, val, meta, 300, tmp_path)
    before = after_adaptation(untrained, test, "mse")
    after = after_adaptation(teacher, test, "mse")
    # measured: 4.06 untrained, 1.24 trained (the variance of the targets, A^2/2, is about 4.2)
    assert after < 0.5 * before, (before, after)


def test_sinusoid_cnp_predicts_far_better_than_its_untrained_self(tmp_path: Path) -> None:
    """The CNP family on the sinusoid: trained by the Gaussian NLL, scored here by the MSE of its mean."""
    source = SinusoidTasks((0.1, 5.0), (0.0, 3.141592653589793), (-5.0, 5.0), 10, 10, 0.0)
    meta = MetaConfig(family="cnp", meta_batch=10, outer_lr=0.01)
    learner = build.meta_learner(MLPConfig(hidden=[40, 40]), "teacher", source, meta, seed=0)
    untrained = copy.deepcopy(learner)
    val, test = fixed_tasks(source, 50, 11, 50), fixed_tasks(source, 200, 12, 100)
    train_stage("teacher", learner, learner, learner.meta_backward, source, val, meta, 800, tmp_path)
    before = after_adaptation(untrained, test, "mse")
    after = after_adaptation(learner, test, "mse")
    # measured: 4.19 untrained, 0.47 trained (the trained MAML teacher above: 1.24)
    assert after < 0.35 * before, (before, after)


# --- the image families ---------------------------------------------------------------------------
# auto is grouped convolutions (batched) for these tiny tasks on a CPU; vmap takes the other code path
@pytest.mark.parametrize(
    "family,batching",
    [
        ("maml", "auto"),
        ("maml", "vmap"),
        ("mamlpp", "auto"),
        ("protonet", "auto"),
        ("cnp", "auto"),
        ("cnp", "vmap"),
    ],
)
def test_image_family_reaches_far_above_chance(images, tmp_path: Path, family: str, batching: str) -> None:
    meta = image_meta(family, batching)
    learner = build.meta_learner(Conv4Config(filters=8, blocks=2), "teacher", images.train, meta, seed=0)
    untrained = copy.deepcopy(learner)
    result = train_stage("teacher", learner, learner, learner.meta_backward, images.train, images.val, meta,
                         100, tmp_path)  # fmt: skip
    before = after_adaptation(untrained, images.test, "accuracy")
    after = after_adaptation(learner, images.test, "accuracy")
    # measured: MAML 0.26 -> 0.95, MAML++ 0.26 -> 0.98, ProtoNet 0.43 -> 1.0, CNP 0.20 -> 0.96 (auto,
    # grouped) and 0.99 (vmap) at outer_lr 0.003 (chance 0.2)
    assert before < 0.5, f"the synthetic classes are too easy untrained ({before}): the test proves nothing"
    assert after > CHANCE + 0.5 and after > before + 0.3, (before, after)
    assert result["best_val"] > CHANCE + 0.5  # validation saw it too


@pytest.fixture(scope="module")
def image_teacher(images, tmp_path_factory) -> Any:
    """A MAML conv4-8 teacher trained on the synthetic classes (0.95 after adaptation)."""
    meta = image_meta("maml")
    teacher = build.meta_learner(Conv4Config(filters=8, blocks=2), "teacher", images.train, meta, seed=0)
    train_stage("teacher", teacher, teacher, teacher.meta_backward, images.train, images.val, meta, 100,
                tmp_path_factory.mktemp("teacher"))  # fmt: skip
    return teacher


@pytest.fixture(scope="module")
def distilled(images, image_teacher, tmp_path_factory) -> Any:
    """``distilled(weight, inner)``: (untrained copy, trained student), trained once per module."""
    trained: dict[tuple[float, bool], tuple[Any, Any]] = {}

    def get(weight: float, inner: bool) -> tuple[Any, Any]:
        if (weight, inner) not in trained:
            meta = image_meta("maml")
            student = build.meta_learner(
                Conv4Config(filters=4, blocks=2), "student", images.train, meta, seed=1
            )
            untrained = copy.deepcopy(student)
            kd = KDConfig(name="kl", distance="kl", weight=weight, temperature=4.0, inner=inner)
            distiller = build.distiller(kd, image_teacher, student, images.train.in_shape)
            mkd = MetaDistillation(image_teacher, student, distiller, kd.weight, kd.source, inner=kd.inner)
            module = nn.ModuleDict({"learner": student, "distiller": distiller})
            train_stage("student_kd", module, student, mkd.meta_backward, images.train, images.val, meta, 100,
                        tmp_path_factory.mktemp("student"))  # fmt: skip
            trained[(weight, inner)] = (untrained, student)
        return trained[(weight, inner)]

    return get


# weight 0 leaves the student its own task loss, through the distillation's objective, to learn from
@pytest.mark.parametrize("weight,inner", [(1.0, False), (0.0, False), (1.0, True)])
def test_distilled_student_reaches_far_above_chance(images, distilled, weight: float, inner: bool) -> None:
    untrained, student = distilled(weight, inner)
    before = after_adaptation(untrained, images.test, "accuracy")
    after = after_adaptation(student, images.test, "accuracy")
    # measured: 0.22 -> 0.93 (weight 1), 0.88 (weight 0), 0.85 (kd.inner)
    assert after > CHANCE + 0.5 and after > before + 0.3, (before, after)


def test_distillation_pulls_the_student_towards_its_teacher(images, image_teacher, distilled) -> None:
    """The same student trained with and without the distillation term: with it, its adapted class
    probabilities on the test tasks are closer (KL at T=4, computed here) to the teacher's."""

    def kl_to_teacher(student: Any) -> float:
        values = []
        for b in images.test:
            teacher_out, _ = image_teacher.adapted_outputs(b.support_x, b.support_y, b.query_x)
            student_out, _ = student.adapted_outputs(b.support_x, b.support_y, b.query_x)
            p, log_q = torch.softmax(teacher_out / 4, -1), torch.log_softmax(student_out / 4, -1)
            values.append((p * (p.log() - log_q)).sum(-1).flatten())
        return float(torch.cat(values).mean())

    with_kd, without = kl_to_teacher(distilled(1.0, False)[1]), kl_to_teacher(distilled(0.0, False)[1])
    # measured: 0.026 with, 0.039 without (0.66); a distillation term that adds nothing gives 1.0
    assert with_kd < 0.8 * without, (with_kd, without)


# --- the console script, end to end ---------------------------------------------------------------
def write_mini_pickles(root: Path) -> Path:
    """The synthetic classes as miniImageNet pickles (lossless, unlike JPEG), 16x16 already."""
    folder = root / "miniimagenet"
    folder.mkdir(parents=True)
    for split, classes, seed in (("train", 30, 1), ("val", 12, 2), ("test", 12, 3)):
        stack = class_images(classes, 8, seed)  # [C, M, 3, H, W]
        data = stack.flatten(0, 1).permute(0, 2, 3, 1).contiguous().numpy()  # [C*M, H, W, 3]
        class_dict = {f"{split}{c:03d}": list(range(c * 8, (c + 1) * 8)) for c in range(classes)}
        with open(folder / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return root


def test_console_script_trains_all_three_models_far_above_chance(tmp_path: Path) -> None:
    root = write_mini_pickles(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = [
        "dataset=miniimagenet", f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.image_size=16", f"dataset.ways={WAYS}", f"dataset.shots={SHOTS}",
        f"dataset.queries={QUERIES}",
        "model@teacher=conv4", "model@student=conv4", "teacher.filters=8", "student.filters=4",
        "teacher.blocks=2", "student.blocks=2", "kd=kl", "meta.inner_lr=0.1", "meta.inner_steps=1",
        "meta.meta_batch=4", "meta.outer_lr=0.01", "train.iterations=100", "train.val_every=50",
        "train.val_tasks=20", "train.log_every=50", "train.checkpoint_every=1000", "train.progress=false",
        "eval.tasks=60", "eval.steps=1", "eval.report_steps=[0,1]", "eval.batch=30", "threads=1",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    proc = subprocess.run(
        [*metakd_run_exe(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    per_task = json.loads((run_dir / "per_task.json").read_text())
    for name in ("teacher", "student_kd", "student_base"):
        accuracy = summary["models"][name]["metrics"]["accuracy"]
        # before adaptation the labels are a fresh permutation per task: chance, whatever was learned
        assert abs(accuracy["step_0"]["mean"] - CHANCE) < 0.1, (name, accuracy["step_0"])
        # measured: teacher 0.87, student_kd 0.81, student_base 0.73; untrained about 0.26
        assert accuracy["step_1"]["mean"] > CHANCE + 0.35, (name, accuracy["step_1"])
        tasks = per_task[name]["accuracy"]["step_1"]
        assert len(tasks) == 60 and accuracy["step_1"]["mean"] == pytest.approx(np.mean(tasks), abs=1e-9)


# --- the best validation, restored ----------------------------------------------------------------
@pytest.mark.parametrize("scripted,higher", [([0.4, 0.9, 0.6], True), ([3.0, 1.0, 2.0], False)])
def test_stage_ends_on_the_weights_of_its_best_validation(
    tmp_path: Path, monkeypatch, scripted: list[float], higher: bool
) -> None:
    """Validation is scripted to peak at its second of three calls; the real loop trains between."""
    import metakd_run.training as training

    source = SinusoidTasks((0.1, 5.0), (0.0, 3.141592653589793), (-5.0, 5.0), 5, 5, 0.0)
    meta = MetaConfig(inner_lr=0.01, inner_steps=1, meta_batch=4, outer_lr=0.01)
    learner = build.meta_learner(MLPConfig(hidden=[8]), "teacher", source, meta, seed=0)
    seen: list[dict[str, torch.Tensor]] = []

    def validation(learner_: Any, tasks: Any, device: Any, dtype: Any) -> tuple[str, float, bool]:
        seen.append({k: v.clone() for k, v in learner.state_dict().items()})
        return ("accuracy" if higher else "mse"), scripted[len(seen) - 1], higher

    monkeypatch.setattr(training, "validation_metric", validation)
    train = TrainConfig(iterations=15, val_every=5, val_tasks=1, log_every=100, checkpoint_every=100,
                        progress=False)  # fmt: skip
    spec = StageSpec("teacher", learner, learner, learner.meta_backward, lambda it, g: source.sample(4, g),
                     [], meta, train, 3, tmp_path, CPU, torch.float32)  # fmt: skip
    with StopFlag() as stop:
        result = run_stage(spec, SimpleNamespace(scalars=lambda *a: None), stop)
    assert len(seen) == 3 and result["best_val"] == scripted[1]
    assert [h["iteration"] for h in result["history"]] == [5, 10, 15]
    final = learner.state_dict()
    for k, v in seen[1].items():
        assert torch.equal(final[k], v), k
    # the last weights were different (training moved on), so the restore did something
    assert any(not torch.equal(seen[2][k], seen[1][k]) for k in final)


# --- the outer learning rate's schedule -----------------------------------------------------------
@pytest.mark.parametrize("schedule", [OuterSchedule.cosine, OuterSchedule.constant])
def test_outer_rate_follows_the_closed_form_schedule(tmp_path: Path, schedule: OuterSchedule) -> None:
    """The rate each meta-iteration k (0-based) of a T-iteration stage steps with, as logged:
    cosine ``lr_min + (lr - lr_min) (1 + cos(pi k / T)) / 2``, or ``lr`` throughout."""
    source = SinusoidTasks((0.1, 5.0), (0.0, 3.141592653589793), (-5.0, 5.0), 5, 5, 0.0)
    lr, lr_min, total = 0.01, 0.002, 16
    meta = MetaConfig(inner_lr=0.01, meta_batch=2, outer_lr=lr, outer_schedule=schedule, outer_lr_min=lr_min)
    learner = build.meta_learner(MLPConfig(hidden=[8]), "teacher", source, meta, seed=0)
    logged: dict[int, float] = {}

    def scalars(prefix: str, metrics: dict[str, float], step: int) -> None:
        if prefix == "teacher/train":
            logged[step] = metrics["outer_lr"]

    train = TrainConfig(iterations=total, val_every=total, val_tasks=1, log_every=1, checkpoint_every=100,
                        progress=False)  # fmt: skip
    spec = StageSpec("teacher", learner, learner, learner.meta_backward, lambda it, g: source.sample(2, g),
                     fixed_tasks(source, 2, 1, 2), meta, train, 3, tmp_path, CPU, torch.float32)  # fmt: skip
    with StopFlag() as stop:
        run_stage(spec, SimpleNamespace(scalars=scalars), stop)
    assert sorted(logged) == list(range(1, total + 1))  # logged after iteration k + 1
    if schedule == OuterSchedule.cosine:
        expected = [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)]
    else:
        expected = [lr] * total
    assert [logged[k + 1] for k in range(total)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
