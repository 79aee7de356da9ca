"""Data-parallel meta-training: 2 CPU processes under torchrun equal one process on the same tasks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metakd_run.config import ConfigError
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.distributed import DistContext, ShardedTasks, setup, task_sampler

RUN = [
    "train.iterations=3",
    "train.val_every=3",
    "train.val_tasks=4",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.progress=false",
    "train.stages=[teacher]",
    "meta.meta_batch=4",
    "eval.tasks=4",
    "eval.steps=1",
    "eval.report_steps=[0,1]",
    "eval.batch=4",
    "threads=1",
    "device=cpu",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_same_tasks(tmp_path: Path, compose):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]  # fmt: skip
    proc = subprocess.run(
        [*torchrun, "-m", "metakd_run.cli", *RUN, f"hydra.run.dir={ddp}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one process drawing both ranks' shards (meta.task_shards=2) trains on the same meta-batches;
    # run in this process (the same pipeline the console script runs) to save a start-up
    from metakd_run.config import to_typed
    from metakd_run.pipeline import Experiment

    torch.set_num_threads(1)
    Experiment(to_typed(compose(*RUN, "meta.task_shards=2")), one).run()
    a = torch.load(ddp / "checkpoints" / "teacher.pt", weights_only=True)["state_dict"]
    b = torch.load(one / "checkpoints" / "teacher.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # rank 0 alone wrote: one summary, one TensorBoard file, one results table on stdout
    assert (ddp / "summary.json").is_file()
    assert len(list(ddp.glob("tb/teacher/events.out.tfevents.*"))) == 1
    assert proc.stdout.count("run folder:") == 1


def test_each_rank_draws_its_own_shard_and_one_process_draws_them_all():
    source = SinusoidTasks()
    r0 = task_sampler(DistContext(rank=0, world_size=2), source, 4, 0, 7, 0)
    r1 = task_sampler(DistContext(rank=1, world_size=2), source, 4, 0, 7, 0)
    both = task_sampler(DistContext(), source, 4, 0, 7, 2)
    assert isinstance(both, ShardedTasks) and task_sampler(DistContext(), source, 4, 0, 7, 0) is None
    a, b, ab = r0(5), r1(5), both(5)
    assert a.num_tasks == b.num_tasks == 2 and ab.num_tasks == 4
    assert not torch.equal(a.support_x, b.support_x)  # different tasks per rank
    assert torch.equal(ab.support_x, torch.cat([a.support_x, b.support_x]))
    assert torch.equal(ab.info["amplitude"], torch.cat([a.info["amplitude"], b.info["amplitude"]]))
    assert not torch.equal(r0(6).support_x, a.support_x)  # and different tasks per iteration


def test_meta_batch_must_split_evenly(monkeypatch):
    with pytest.raises(ConfigError, match="meta.meta_batch=5"):
        setup(torch.device("cpu"), 5, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        setup(torch.device("cpu"), 5, 0)
    with pytest.raises(ConfigError, match="meta.task_shards=3"):
        setup(torch.device("cpu"), 6, 3)
