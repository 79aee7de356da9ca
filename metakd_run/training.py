"""The meta-training loop of one stage: sample, meta-step, validate, checkpoint, resume, stop.

The loop is the same for the teacher, the distilled student and the baseline student; what
differs is the ``step`` function (plain MAML or meta-distillation) and the module saved.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from metakd_run.checkpoint import load_checkpoint, load_state, save_atomic
from metakd_run.config import MetaConfig, OuterSchedule, TrainConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.evaluation.curves import adaptation_curves
from metakd_run.evaluation.stats import mean_ci
from metakd_run.meta.learner import MetaLearner

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The meta-loss became NaN or infinite: one line names the stage, iteration and checkpoint."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived: a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between meta-iterations.

    In a job of the SLURM launcher (submitit), the requeue signal (SIGUSR2: a time limit or a
    preemption ahead) is a flag too: the loop saves a checkpoint and stops, then submitit's own
    handler requeues the job, which resumes from that checkpoint (see metakd_run/slurm.py).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._requeue: tuple[int, Callable[[int, Any], Any]] | None = None

    def __enter__(self) -> StopFlag:
        import os

        signals: list[int] = [signal.SIGINT, signal.SIGTERM]
        if "SUBMITIT_FOLDER" in os.environ:  # a submitit job: submitit is installed
            from metakd_run.slurm import requeue_handler, requeue_signal

            handler = requeue_handler()
            if handler is not None:
                self._requeue = (requeue_signal(), handler)
                signals.append(self._requeue[0])
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self.signum = signum

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        late = exc is None and self.signum is not None
        if late:
            # The signal came after the last stage's last check (its final validation, its save):
            # every stage is saved, and the user asked to stop, not to sit through the meta-test.
            exc = Interrupted(
                f"stopped by signal {self.signum} after the last stage; every stage is saved", self.signum
            )  # type: ignore[arg-type]
        if isinstance(exc, Interrupted) and self._requeue is not None and exc.signum == self._requeue[0]:
            from metakd_run.slurm import hand_over

            reason = hand_over(self._requeue[1], exc.signum, str(exc))  # exits when requeued
            raise Interrupted(f"{exc}; not requeued: {reason}", exc.signum) from exc
        if late:
            raise exc


@dataclass
class StageSpec:
    """One stage: what it trains and with which step; the budget and rates stay in the config."""

    name: str
    module: nn.Module  # all trainable state of the stage (learner, projections)
    learner: MetaLearner  # the learner validated and evaluated (MAML or ProtoNet)
    step: Callable[[TaskBatch], dict[str, float]]
    sample_tasks: Callable[[int, torch.Generator], TaskBatch]  # (iteration, generator) -> tasks
    val_tasks: list[TaskBatch]
    meta: MetaConfig
    train: TrainConfig
    task_seed: int
    checkpoint_dir: Path
    device: torch.device
    dtype: torch.dtype
    on_gradients: Callable[[nn.Module], None] | None = None  # data-parallel: average across ranks
    is_main: bool = True
    fingerprint: dict[str, Any] | None = None  # the stage's settings (metakd_run.fingerprint), saved with it

    @property
    def iterations(self) -> int:
        return self.train.stage_iterations(self.name)


def validation_metric(learner: MetaLearner, tasks: list[TaskBatch], device, dtype) -> tuple[str, float, bool]:  # noqa: ANN001
    """The metric that picks the best checkpoint: query accuracy or loss after the inner steps."""
    steps = learner.cfg.inner_steps
    curves = adaptation_curves(learner, tasks, steps, device, dtype, at=[steps])
    if "accuracy" in curves:
        return "accuracy", mean_ci(curves["accuracy"][-1])[0], True
    return "mse", mean_ci(curves["task_loss"][-1])[0], False


def outer_scheduler(optimizer: torch.optim.Optimizer, spec: StageSpec) -> Any:
    """The meta-optimiser's learning rate per iteration: constant, or cosine-annealed over the stage.

    Annealing (MAML++, Antoniou et al. 2019) lets short CPU budgets settle instead of ending
    on a noisy, full-size step.
    """
    if spec.meta.outer_schedule == OuterSchedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=spec.iterations, eta_min=spec.meta.outer_lr_min
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def param_groups(module: nn.Module, meta: MetaConfig) -> list[dict[str, Any]]:
    """Adam's parameter groups: one, or with ``meta.rate_lr`` the learned inner rates on their own.

    A learned rate starts near ``inner_lr`` (0.01 on the sinusoid), and Adam moves every entry by
    about ``outer_lr`` per iteration whatever its gradient's scale: 10% of the rate per step there.
    """
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if meta.rate_lr is None:
        return [{"params": [p for _, p in trainable]}]
    rates = [p for n, p in trainable if RATE_NAMES.search(n)]
    rest = [p for n, p in trainable if not RATE_NAMES.search(n)]
    return [{"params": rest}, {"params": rates, "lr": meta.rate_lr}]


RATE_NAMES = re.compile(r"(^|\.)(inner_lrs|step_lrs)\.")


def last_path(spec: StageSpec) -> Path:
    return spec.checkpoint_dir / f"{spec.name}_last.pt"


def final_path(checkpoint_dir: Path, stage: str) -> Path:
    return checkpoint_dir / f"{stage}.pt"


def run_stage(spec: StageSpec, tracker: Any, stop: StopFlag) -> dict[str, Any]:
    """Meta-train one stage (resuming from its last checkpoint if there is one)."""
    optimizer = torch.optim.Adam(param_groups(spec.module, spec.meta), lr=spec.meta.outer_lr)
    scheduler = outer_scheduler(optimizer, spec)
    generator = torch.Generator().manual_seed(spec.task_seed)
    start, best, best_state, elapsed, val_elapsed = 0, None, None, 0.0, 0.0
    # Process CPU seconds (every thread of this process), beside the wall seconds: the cost of a
    # stage on a shared machine, where wall time also counts the other jobs' share of the cores.
    # None once a resume meets a checkpoint written before they were kept: the total is unknown.
    cpu: float | None = 0.0
    val_cpu: float | None = 0.0
    history: list[dict[str, float]] = []
    # when each validation ended, in the stage's seconds and CPU seconds (validation included):
    # kept beside the history, out of summary.json (clocks vary between identical runs)
    clock: list[dict[str, float | None]] = []
    resume_file = last_path(spec)
    if resume_file.exists():
        state = load_checkpoint(resume_file)
        load_state(spec.module, state["module"], f"checkpoint {resume_file}")
        optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["rng"]["tasks"])
        _set_global_rng(state["rng"])
        start, best, best_state = state["iteration"], state["best"], state["best_state"]
        elapsed, history = state["elapsed"], state["history"]
        val_elapsed = state.get("val_elapsed", 0.0)
        cpu, val_cpu = state.get("cpu_elapsed"), state.get("val_cpu_elapsed")
        clock = state.get("clock", [])
        log.info("%s: resumed from %s at iteration %d", spec.name, resume_file, start)

    def save_last(iteration: int) -> Path:
        return save_atomic(
            {
                "stage": spec.name,
                "iteration": iteration,
                "module": spec.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best": best,
                "best_state": best_state,
                "elapsed": elapsed,
                "val_elapsed": val_elapsed,
                "cpu_elapsed": cpu,
                "val_cpu_elapsed": val_cpu,
                "clock": clock,
                "history": history,
                "rng": {"tasks": generator.get_state(), **_global_rng()},
                "fingerprint": spec.fingerprint,
            },
            resume_file,
        )

    bar = tqdm(
        total=spec.iterations,
        initial=start,
        desc=spec.name,
        disable=not (spec.train.progress and spec.is_main),
        dynamic_ncols=True,
        leave=True,
    )
    tic, cpu_tic = time.perf_counter(), time.process_time()
    metric_name = "metric"
    for it in range(start, spec.iterations):
        batch = spec.sample_tasks(it, generator).to(spec.device, spec.dtype)
        optimizer.zero_grad(set_to_none=True)
        spec.learner.begin_iteration(it, spec.iterations)  # MAML++'s schedules read the progress
        metrics = spec.step(batch)
        if not math.isfinite(metrics["loss"]):
            where = resume_file if resume_file.exists() else "none yet"
            learned = spec.meta.lslr or spec.meta.learn_inner_lr
            fix = (
                "The inner rates are learned: lower meta.rate_lr (their Adam rate) or turn them off "
                "(meta.lslr / meta.learn_inner_lr), and start again"
                if learned
                else "Lower meta.outer_lr or meta.inner_lr and resume"
            )
            raise TrainingDiverged(
                f"stage {spec.name}: the meta-loss became {metrics['loss']} at iteration {it + 1}; "
                f"last good checkpoint: {where}. {fix}"
            )
        if spec.on_gradients is not None:
            spec.on_gradients(spec.module)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        done = it + 1
        if spec.is_main and (done % spec.train.log_every == 0 or done == spec.iterations):
            tracker.scalars(f"{spec.name}/train", {**metrics, "outer_lr": lr}, done)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        bar.update(1)
        if done % spec.train.val_every == 0 or done == spec.iterations:
            val_tic, val_cpu_tic = time.perf_counter(), time.process_time()
            metric_name, value, higher = validation_metric(
                spec.learner, spec.val_tasks, spec.device, spec.dtype
            )
            val_elapsed += time.perf_counter() - val_tic
            val_cpu = None if val_cpu is None else val_cpu + time.process_time() - val_cpu_tic
            history.append({"iteration": done, metric_name: value})
            clock.append(
                {
                    "iteration": done,
                    "seconds": elapsed + time.perf_counter() - tic,
                    "cpu_seconds": None if cpu is None else cpu + time.process_time() - cpu_tic,
                }
            )
            if spec.is_main:
                tracker.scalars(f"{spec.name}/val", {metric_name: value}, done)
            if best is None or (value > best if higher else value < best):
                best, best_state = value, copy.deepcopy(spec.module.state_dict())
        stopping = stop.signum is not None
        if spec.is_main and (done % spec.train.checkpoint_every == 0 or stopping) and done < spec.iterations:
            elapsed += time.perf_counter() - tic
            cpu = None if cpu is None else cpu + time.process_time() - cpu_tic
            tic, cpu_tic = time.perf_counter(), time.process_time()
            path = save_last(done)
            if stopping:
                bar.close()
                raise Interrupted(
                    f"stage {spec.name} stopped by signal {stop.signum} at iteration {done}; "
                    f"checkpoint saved to {path}",
                    stop.signum,  # type: ignore[arg-type]
                )
    bar.close()
    elapsed += time.perf_counter() - tic
    cpu = None if cpu is None else cpu + time.process_time() - cpu_tic
    spec.learner.begin_iteration(spec.iterations, spec.iterations)  # the schedules' final state
    if best_state is not None:
        spec.module.load_state_dict(best_state)
    done_iters = spec.iterations - start
    unit, per_iteration = spec.learner.throughput_unit()
    train_seconds = elapsed - val_elapsed
    return {
        "best_val": best,
        "val_metric": metric_name,
        "history": history,
        "seconds": elapsed,
        "validation_seconds": val_elapsed,
        "cpu_seconds": cpu,
        "validation_cpu_seconds": val_cpu,
        "validation_clock": clock,
        "iterations": spec.iterations,
        # training throughput (tasks, or a pretrain stage's images, per second), validation left out
        f"{unit}_per_second": per_iteration * spec.iterations / train_seconds if train_seconds > 0 else 0.0,
        "resumed_at": start,
        "iterations_run": done_iters,
    }


def _global_rng() -> dict[str, Any]:
    """Every global random state, as tensors and plain values so ``weights_only`` loading works."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def _set_global_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
