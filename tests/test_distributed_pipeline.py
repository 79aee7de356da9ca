"""torchrun over the whole pipeline: a conv model, all three stages, and resumption.

``test_distributed.py`` compares the teacher's weights on the sinusoid; this compares whole
summaries (every model, metric and step, the paired comparisons) of an image run under torchrun
with the same run in one process drawing both ranks' shards, and a torchrun run killed mid-stage
and resumed under torchrun with the same run left alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import metakd_run_exe
from tests.test_cli_images import TINY_IMAGES
from tests.test_data_images import make_mini

pytestmark = pytest.mark.slow

RUN = [
    *TINY_IMAGES,
    "kd=kl",
    "train.iterations=6",
    "train.val_every=3",
    "train.val_tasks=4",
    "train.log_every=1",
    "train.checkpoint_every=1",
    "train.progress=false",
    "meta.meta_batch=4",
    "meta.batching=loop",
    "eval.tasks=6",
    "eval.steps=1",
    "eval.report_steps=[0,1]",
    "eval.batch=3",
    "threads=1",
    "device=cpu",
]
VARIES = ("environment", "teacher_source")  # the commit and threads; where the teacher came from


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_mini(tmp_path_factory.mktemp("data"))
    return [f"dataset.root={root}", f"dataset.cache_dir={root / 'cache'}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
            "-m", "metakd_run.cli", *args]  # fmt: skip


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def comparable(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in VARIES}


def assert_close(a: Any, b: Any, where: str = "") -> None:
    """Equal structure; numbers equal up to the order of floating-point sums across ranks."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5), where
    else:
        assert a == b, where


def test_torchrun_equals_one_process_over_all_stages_of_a_conv_run(tmp_path, data):
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    proc = subprocess.run(
        torchrun(*RUN, *data, f"hydra.run.dir={ddp}"), cwd=tmp_path, capture_output=True, text=True,
        timeout=400, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    alone = subprocess.run(
        [*metakd_run_exe(), *RUN, *data, "meta.task_shards=2", f"hydra.run.dir={one}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=400, env=ENV,
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    a, b = comparable(ddp), comparable(one)
    assert set(a["models"]) == {"teacher", "student_kd", "student_base"}
    assert a["comparisons"]["pairs"]  # the paired comparisons are compared too
    assert_close(a, b)


def test_torchrun_splits_a_pretrain_mini_batch_as_one_process_with_task_shards(tmp_path, data):
    """A pretrain teacher into a ProtoNet student: the teacher's mini-batch is shared between the two
    ranks (each its own batch statistics); one process with ``meta.task_shards=2`` does the same."""
    run = [*RUN, "meta=pretrain", "meta.student_family=protonet", "meta.pretrain.batch=8", "kd=cosine"]
    ddp, one, whole = tmp_path / "ddp", tmp_path / "one", tmp_path / "whole"
    proc = subprocess.run(
        torchrun(*run, *data, f"hydra.run.dir={ddp}"), cwd=tmp_path, capture_output=True, text=True,
        timeout=400, env=ENV,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder, shards in ((one, 2), (whole, 0)):
        alone = subprocess.run(
            [*metakd_run_exe(), *run, *data, f"meta.task_shards={shards}", f"hydra.run.dir={folder}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=400, env=ENV,
        )  # fmt: skip
        assert alone.returncode == 0, alone.stderr[-3000:]
    assert_close(comparable(ddp), comparable(one))
    # and the split matters: one process on the whole mini-batch normalises over 8 images, not 4
    with pytest.raises(AssertionError):
        assert_close(comparable(ddp)["models"]["teacher"], comparable(whole)["models"]["teacher"])


def test_torchrun_refuses_a_pretrain_mini_batch_it_cannot_split(tmp_path, data):
    run = [*RUN, "meta=pretrain", "meta.student_family=protonet", "meta.pretrain.batch=7", "kd=cosine"]
    proc = subprocess.run(
        torchrun(*run, *data, f"hydra.run.dir={tmp_path / 'ddp'}"), cwd=tmp_path, capture_output=True,
        text=True, timeout=400, env=ENV,
    )  # fmt: skip
    assert proc.returncode != 0
    # each rank's one line (torchrun's own launcher then prints its ChildFailedError report)
    needle = "meta.pretrain.batch=7 is invalid: it must be divisible by the number of processes (2)"
    ours = 'File "' + str(Path(__file__).parents[1] / "metakd_run")  # a traceback through our code
    assert f"metakd-run: error: {needle}" in proc.stderr and ours not in proc.stderr
    assert not list((tmp_path / "ddp").rglob("*.pt"))  # refused before any training


def test_torchrun_killed_mid_stage_resumes_to_the_same_summary(tmp_path, data):
    left_alone = tmp_path / "alone"
    done = subprocess.run(
        torchrun(*RUN, *data, f"hydra.run.dir={left_alone}"), cwd=tmp_path, capture_output=True, text=True,
        timeout=400, env=ENV,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        torchrun(*RUN, *data, f"hydra.run.dir={killed}"), cwd=tmp_path, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    partial = killed / "checkpoints" / "student_kd_last.pt"
    deadline = time.monotonic() + 300
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-stage
    proc.wait()
    assert partial.exists() and not (killed / "summary.json").exists()

    resumed = subprocess.run(
        torchrun(f"train.resume={killed}"), cwd=tmp_path, capture_output=True, text=True, timeout=400, env=ENV
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert comparable(killed) == comparable(left_alone)
