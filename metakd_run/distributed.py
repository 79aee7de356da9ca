"""Data-parallel meta-training with ``torch.distributed``: a meta-batch split across processes.

Started with ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), each process
meta-trains on its share of the meta-batch; the meta-gradients are averaged with one all-reduce
before the optimizer step, so every process holds the same parameters after each meta-iteration.
Rank 0 alone logs, checkpoints and runs the meta-test. Without torchrun everything here is a no-op.

``DistributedDataParallel`` is not used on purpose: the meta core calls the model through
``torch.func.functional_call`` under ``vmap``, which bypasses DDP's forward hooks, so the gradient
reduction is done explicitly (``all_reduce`` of one flat buffer), where the training loop offers
its ``on_gradients`` hook.

Tasks: at meta-iteration ``i`` shard ``s`` of the meta-batch is drawn from a generator seeded with
(stage seed, ``i``, ``s``); process ``r`` draws shard ``r``. One process with
``meta.task_shards=N`` draws all N shards in rank order, which is exactly the meta-batch an
N-process run trains on: this reproduces a distributed run on one machine. The per-iteration seeds
also make resuming exact whatever the process count, with no generator state to save per rank.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from metakd_run.config import ConfigError
from metakd_run.data.tasks import MiniBatch, TaskBatch
from metakd_run.seeding import derive_seed

Batch = TypeVar("Batch", TaskBatch, MiniBatch)
# One training step: a meta-step takes a TaskBatch, a pretrain step a MiniBatch of images.
Step = Callable[[Batch], dict[str, float]]


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, else from an ``srun -n N`` job
    step's (see ``slurm_world``); (0, 1, 0) without either."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        slurm_world()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def slurm_world() -> None:
    """Translate an ``srun`` step's variables into torchrun's, so ``srun -n N metakd-run ...`` starts
    N ranks without torchrun: rank ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` ranks, local rank
    ``SLURM_LOCALID``; rank 0 is the step's first node, on port 20000 + job id mod 20000 unless
    ``MASTER_ADDR``/``MASTER_PORT`` are exported. (A batch script's own shell is not a step: there
    ``SLURM_STEP_NUM_TASKS`` is unset and the process stays alone.)
    """
    env = os.environ
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["RANK"] = env.get("SLURM_PROCID", "0")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        import subprocess

        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=False
        ).stdout.split()
        env["MASTER_ADDR"] = hosts[0] if hosts else nodes
    env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))


def is_secondary_rank() -> bool:
    """True in the processes of a torchrun launch other than rank 0 (they neither log nor write)."""
    rank, world, _ = env_world()
    return world > 1 and rank != 0


@dataclass
class DistContext:
    """Who this process is in the group; the single-process default makes every call a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shared_dir(self, run_dir: Path) -> Path:
        """Rank 0's run folder for every rank, so all read the same checkpoints when resuming.

        Each process's Hydra names its own folder (from the clock, unless ``hydra.run.dir`` is
        given); a folder another rank made that differs from rank 0's and holds nothing is removed.
        """
        if not self.active:
            return run_dir
        import torch.distributed as dist

        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        chosen = Path(shared[0])
        if chosen.resolve() != run_dir.resolve() and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
        return chosen

    def all_reduce_gradients(self, module: nn.Module) -> None:
        """Average the gradients of ``module``'s trainable parameters over all processes.

        Each process's loss is the mean over its share of the tasks, so the average of the
        processes' gradients is the gradient of the mean over the whole meta-batch. A parameter
        without a gradient contributes zeros, so every process sends a buffer of the same size.
        """
        if not self.active:
            return
        import torch.distributed as dist

        params = [p for p in module.parameters() if p.requires_grad]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def wrap_step(self, step: Step[Batch]) -> Step[Batch]:
        """The meta-step with its logged metrics averaged over processes.

        Rank 0 then logs the whole meta-batch's loss, and every process sees the same value, so a
        diverging meta-loss stops all of them at the same iteration instead of leaving some
        waiting in an all-reduce.
        """
        if not self.active:
            return step

        def averaged(batch: Batch) -> dict[str, float]:
            import torch.distributed as dist

            metrics = step(batch)
            keys = sorted(metrics)
            device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
            values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world_size
            return dict(zip(keys, values.tolist()))

        return averaged


def setup(device: torch.device, meta_batch: int, task_shards: int, minibatch: int = 0) -> DistContext:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); check the split.

    Raises ConfigError when the meta-batch (or ``minibatch``, the pretrain family's mini-batch of
    images, when a role trains on them) cannot be split evenly, before any training.
    """
    rank, world, local_rank = env_world()
    if task_shards < 0:
        raise ConfigError(f"meta.task_shards={task_shards} is invalid: must be >= 0 (0: one per process)")
    if world > 1 and task_shards not in (0, world):
        raise ConfigError(
            f"meta.task_shards={task_shards} is invalid: under torchrun it must be 0 or the number of "
            f"processes ({world})"
        )
    shards = task_shards or world
    if meta_batch % shards:
        raise ConfigError(
            f"meta.meta_batch={meta_batch} is invalid: it must be divisible by the number of "
            f"{'processes' if world > 1 else 'task shards'} ({shards}), so each draws as many tasks"
        )
    if minibatch and minibatch % shards:
        raise ConfigError(
            f"meta.pretrain.batch={minibatch} is invalid: it must be divisible by the number of "
            f"{'processes' if world > 1 else 'task shards'} ({shards}), so each takes as many images"
        )
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        atexit.register(_destroy)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def _destroy() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard_seed(task_seed: int, iteration: int, shard: int) -> int:
    """An independent, reproducible seed for one shard of one meta-iteration."""
    return derive_seed(task_seed, iteration, shard)


def cat_batches(batches: Sequence[TaskBatch]) -> TaskBatch:
    """Concatenate task batches along the task dimension (the shards of one meta-batch)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]

    def cat(name: str) -> Any:
        parts = [getattr(b, name) for b in batches]
        return None if parts[0] is None else torch.cat(parts)

    return TaskBatch(
        support_x=cat("support_x"),
        support_y=cat("support_y"),
        query_x=cat("query_x"),
        query_y=cat("query_y"),
        transfer_x=cat("transfer_x"),
        info={k: torch.cat([b.info[k] for b in batches]) for k in first.info},
    )


@dataclass
class ShardedTasks:
    """Draws this process's shards of meta-iteration ``i``: shard ``rank`` under torchrun, all
    ``task_shards`` shards (concatenated in rank order) in one process."""

    source: Any
    meta_batch: int
    transfer: int
    task_seed: int
    shards: int
    mine: tuple[int, ...]

    def __call__(self, iteration: int) -> TaskBatch:
        per_shard = self.meta_batch // self.shards
        return cat_batches(
            [
                self.source.sample(
                    per_shard,
                    torch.Generator().manual_seed(shard_seed(self.task_seed, iteration, s)),
                    self.transfer,
                )
                for s in self.mine
            ]
        )


def minibatch_share(ctx: DistContext, batch: MiniBatch) -> MiniBatch:
    """This process's images of a pretrain mini-batch: every rank draws the same mini-batch (one
    generator, one seed) and takes every ``world_size``-th image from its rank on."""
    if not ctx.active:
        return batch
    return MiniBatch(batch.x[ctx.rank :: ctx.world_size], batch.y[ctx.rank :: ctx.world_size])


def sharded_minibatch_step(step: Step[MiniBatch], shards: int, module: nn.Module) -> Step[MiniBatch]:
    """One process doing what ``shards`` torchrun processes do with a pretrain mini-batch: a forward
    and backward per shard (each with its own batch statistics, as DDP without SyncBatchNorm), the
    gradients and metrics averaged over the shards. ``meta.task_shards`` turns it on, so that a run
    in one process reproduces a torchrun run."""

    def run(batch: MiniBatch) -> dict[str, float]:
        metrics = [step(MiniBatch(batch.x[s::shards], batch.y[s::shards])) for s in range(shards)]
        for param in module.parameters():
            if param.grad is not None:
                param.grad /= shards
        return {k: sum(m[k] for m in metrics) / shards for k in metrics[0]}

    return run


def task_sampler(
    ctx: DistContext, source: Any, meta_batch: int, transfer: int, task_seed: int, task_shards: int
) -> Callable[[int], TaskBatch] | None:
    """The sharded sampler for a distributed run or ``meta.task_shards>0``; None keeps the
    single-process task stream (one generator seeded with the stage seed)."""
    if not ctx.active and task_shards <= 0:
        return None
    shards = ctx.world_size if ctx.active else task_shards
    mine = (ctx.rank,) if ctx.active else tuple(range(shards))
    return ShardedTasks(source, meta_batch, transfer, task_seed, shards, mine)
