"""The loop's task-parallel meta-backward (``LoopStrategy.backward``): on a CPU with several threads,
a conv model's tasks run in worker threads. Held to the one-task-at-a-time path in float64 for every
learner that uses it (MAML, MAML++, ProtoNet, distillation in the outer loss and through the inner
loop with learned values), and checked for what a user relies on: reproducible (in float32, and a
whole run's summary.json), the thread setting restored, no gradient lost."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from metakd_run.config import MetaConfig
from metakd_run.distill.losses import Distiller
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.meta import threads as task_threads
from metakd_run.meta.maml import MAML
from metakd_run.meta.protonet import ProtoNet
from metakd_run.models import feature_shapes
from metakd_run.models.conv4 import Conv4
from tests.conftest import intra_op_threads
from tests.test_cli_images import TINY_IMAGES
from tests.test_data_images import make_mini
from tests.test_protonet import SIZE, WAYS, image_tasks

TASKS = 5  # odd: the two workers get unequal shares


def conv_maml(seed: int = 0, filters: int = 4, cls: type = MAML, **cfg) -> MAML | ProtoNet:
    torch.manual_seed(seed)
    model = Conv4((1, SIZE, SIZE), WAYS, filters=filters, blocks=2).double()
    return cls(model, "classification", MetaConfig(inner_lr=0.1, inner_steps=2, batching="loop", **cfg))


def grads(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{n}": p.grad.clone()
        for i, m in enumerate(modules)
        for n, p in m.named_parameters()
        if p.grad is not None
    }


def run_with(threads: int, step: Callable[[], dict[str, float]], modules: list[nn.Module]) -> tuple:
    """One meta-step at ``threads`` threads: its gradients, its metrics, and which threads ran tasks."""
    for m in modules:
        m.zero_grad(set_to_none=True)
    names: set[str] = set()
    call = task_threads.functional_call  # what every per-task model call ends in (call_model)

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        names.add(threading.current_thread().name)
        return call(*args, **kwargs)

    with intra_op_threads(threads), pytest.MonkeyPatch.context() as mp:
        mp.setattr(task_threads, "functional_call", spy)
        metrics = step()
        assert torch.get_num_threads() == threads  # restored after the workers set theirs to 1
    return grads(modules), metrics, names


def assert_parallel_equals_serial(step: Callable[[], dict[str, float]], modules: list[nn.Module]) -> None:
    serial, serial_metrics, serial_threads = run_with(1, step, modules)
    parallel, parallel_metrics, parallel_threads = run_with(2, step, modules)
    assert serial_threads == {threading.current_thread().name}
    # the tasks ran in the pool's workers (a distillation's teacher runs in this thread, before
    # them; on a busy machine one worker may take both shares before the other starts)
    assert {n for n in parallel_threads if n.startswith("metakd-task")}
    assert serial.keys() == parallel.keys() and serial
    for n, g in serial.items():
        assert float(g.abs().max()) > 0 or n.endswith("conv.bias")
        assert torch.allclose(parallel[n], g, atol=1e-12, rtol=1e-10), n
    assert parallel_metrics == pytest.approx(serial_metrics, abs=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_tasks_in_threads_give_the_serial_meta_gradient(first_order: bool) -> None:
    maml = conv_maml(first_order=first_order)
    batch = image_tasks(tasks=TASKS)
    assert_parallel_equals_serial(lambda: maml.meta_backward(batch), [maml])


def test_mamlpp_tasks_in_threads_give_the_serial_meta_gradient() -> None:
    maml = conv_maml(lslr=True, per_step_bn=True, msl=True)
    maml.begin_iteration(0, 10)
    with torch.no_grad():  # every step's norms differ
        for p in maml.step_norms.values():
            p.add_(torch.rand(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    batch = image_tasks(tasks=TASKS)
    assert_parallel_equals_serial(lambda: maml.meta_backward(batch), [maml])


def test_protonet_tasks_in_threads_give_the_serial_gradient() -> None:
    proto = conv_maml(cls=ProtoNet)
    batch = image_tasks(tasks=TASKS)
    assert_parallel_equals_serial(lambda: proto.meta_backward(batch), [proto])


@pytest.mark.parametrize("inner", [False, True])
def test_distillation_in_threads_gives_the_serial_gradients(inner: bool) -> None:
    """Outer mode: the projection (8-wide embedding into 16) learns; inner mode: the weight and T."""
    teacher, student = conv_maml(0, filters=8), conv_maml(1, filters=4)
    shapes = (feature_shapes(teacher.model, (1, SIZE, SIZE)), feature_shapes(student.model, (1, SIZE, SIZE)))
    torch.manual_seed(2)
    if inner:
        distiller = Distiller(
            "kl", 2.0, [("output", "output")], *shapes, learn_weight=True, learn_temperature=True
        )
    else:
        distiller = Distiller("mse", 2.0, [("embedding", "embedding")], *shapes)
    mkd = MetaDistillation(teacher, student, distiller.double(), 0.7, inner=inner)
    batch = image_tasks(tasks=TASKS)
    assert_parallel_equals_serial(lambda: mkd.meta_backward(batch), [student, distiller])
    assert all(p.grad is None for p in teacher.parameters())


def test_tasks_in_threads_are_reproducible_in_float32() -> None:
    maml = conv_maml().float()
    batch = image_tasks(tasks=TASKS).to("cpu", torch.float32)
    first, _, _ = run_with(2, lambda: maml.meta_backward(batch), [maml])
    second, _, _ = run_with(2, lambda: maml.meta_backward(batch), [maml])
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_a_leaf_missing_from_wrt_is_our_bug_not_a_silent_zero() -> None:
    maml = conv_maml()
    batch = image_tasks(tasks=TASKS)
    listed = [p for n, p in maml.named_parameters() if n != "model.head.weight"]
    with pytest.raises(RuntimeError, match="wrt misses leaves"):
        run_with(2, lambda: maml.meta_backward(batch, wrt=listed), [maml])


# --- end to end ------------------------------------------------------------------------------------
def test_image_runs_with_task_threads_are_byte_identical(run_cli, tmp_path: Path) -> None:
    """threads=2: the loop runs the tasks of each meta-batch in two worker threads; the same
    config and seed must still write the same summary.json, byte for byte."""
    mini_root = make_mini(tmp_path / "data")
    summaries = []
    for i in (1, 2):
        run_dir = tmp_path / f"run{i}"
        proc = run_cli(
            *TINY_IMAGES,
            f"dataset.root={mini_root}",
            f"dataset.cache_dir={tmp_path / 'cache'}",
            "threads=2",
            "meta.batching=loop",  # auto would group these tiny tasks (resolve_batching)
            "train.stages=[teacher]",  # one stage is enough to exercise the threads
            run_dir=run_dir,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries.append((run_dir / "summary.json").read_bytes())
    assert summaries[0] == summaries[1]
