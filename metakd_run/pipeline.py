"""The experiment, stage by stage: teacher -> distilled student -> baseline student -> meta-test.

:meth:`Experiment.prepare` loads every split and builds every learner and the distiller before
any training, so a user's mistake fails in seconds; :meth:`Experiment.run` then reads like the
README. Each stage's result is a checkpoint in ``checkpoints/``: a finished stage is loaded, an
interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metakd_run import __version__, build, distributed, results
from metakd_run.checkpoint import CheckpointError, load, load_state, save_atomic
from metakd_run.config import Config, Split, Stage, to_dict
from metakd_run.data import build_task_source
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.evaluate import fixed_tasks
from metakd_run.meta.maml import MAML
from metakd_run.seeding import derive_seed
from metakd_run.tracking import Tracker
from metakd_run.training import StageSpec, StopFlag, final_path, run_stage

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per process
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


@dataclass
class Sources:
    train: Any
    val: Any
    test: Any


@dataclass
class Trainee:
    """What one stage trains: the learner it evaluates, the module it saves, its meta-step."""

    learner: MAML
    module: nn.Module
    step: Any
    model_cfg: Any


class Experiment:
    """One run: the typed config, the run folder, the device, the data and the learners."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from metakd_run.config import ConfigError

            raise ConfigError(
                f"device={cfg.device} is invalid: no CUDA device is visible; use device=cpu or auto"
            )
        # data-parallel (torchrun): join the group; every rank works in rank 0's run folder
        self.dist = distributed.setup(self.device, cfg.meta.meta_batch, cfg.meta.task_shards)
        self.run_dir = self.dist.shared_dir(Path(run_dir))
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dtype = getattr(torch, str(cfg.dtype))
        self.src: Sources | None = None
        self.trainees: dict[str, Trainee] = {}
        self.teacher_origin = ""
        self.tracker: Tracker | None = None

    # --- before any training -------------------------------------------------------------------
    def prepare(self) -> None:
        """Load every split, build every learner and the distiller, check a given teacher checkpoint."""
        cfg, ds = self.cfg, self.cfg.dataset
        split = getattr(ds, "split_name", lambda role: str(role))
        from metakd_run.lake import check as check_lake_runs

        check_lake_runs(cfg)  # eval.lake_runs: the runs are readable and the heads as wide as they are
        val = build_task_source(ds, split(Split.val))
        self.src = Sources(
            train=build_task_source(ds, split(Split.train), transfer=cfg.kd.transfer),
            val=val,
            test=val if cfg.eval.split == Split.val else build_task_source(ds, split(cfg.eval.split)),
        )
        if cfg.eval.split == Split.val and self.dist.is_main and ds.name != "sinusoid":
            log.warning(
                "eval.split=val is also the validation split that picks the best checkpoints: "
                "its accuracies are slightly optimistic (different tasks, same classes)"
            )
        self.teacher_origin = self.teacher_source()
        train = self.src.train
        teacher = build.learner(cfg.teacher, "teacher", train, cfg.meta, self.seed("teacher_init"))
        self.trainees["teacher"] = Trainee(teacher, teacher, teacher.meta_backward, cfg.teacher)
        if cfg.train.teacher_checkpoint:
            self.load_finished(Path(cfg.train.teacher_checkpoint).expanduser(), teacher, self.teacher_what())
        elif self.cached_teacher() is not None and self.cached_teacher().exists():
            pass  # loaded when the teacher's turn comes
        elif Stage.teacher not in cfg.train.stages and not final_path(self.ckpt_dir, "teacher").exists():
            raise CheckpointError(
                "train.stages leaves out 'teacher' but no train.teacher_checkpoint names one"
            )
        for name in (Stage.student_kd, Stage.student_base):
            if name in cfg.train.stages:
                self.trainees[name.value] = self.student(name, teacher)
        # rank 0 alone logs
        self.tracker = Tracker(self.run_dir, enabled=self.dist.is_main, logger=cfg.logger)

    def student(self, name: str, teacher: MAML) -> Trainee:
        """The same student init for both students; the distilled one also trains its projections."""
        cfg = self.cfg
        student = build.learner(cfg.student, "student", self.src.train, cfg.meta, self.seed("student_init"))
        if name == Stage.student_base:
            return Trainee(student, student, student.meta_backward, cfg.student)
        torch.manual_seed(self.seed("projection_init"))
        distiller = build.distiller(cfg.kd, teacher, student, self.src.train.in_shape)
        mkd = MetaDistillation(teacher, student, distiller, cfg.kd.weight, cfg.kd.source, inner=cfg.kd.inner)
        module = nn.ModuleDict({"learner": student, "distiller": distiller})
        return Trainee(student, module, mkd.meta_backward, cfg.student)

    # --- the stages ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        if self.src is None:
            self.prepare()
        trained: dict[str, dict[str, Any]] = {}
        with StopFlag() as stop:
            for name, trainee in self.trainees.items():
                trained[name] = self.obtain(name, trainee, stop)
        if not self.dist.is_main:  # rank 0 alone runs the meta-test and writes the summary
            return {"objective": float("nan"), "rank": self.dist.rank}
        learners = {name: t.learner for name, t in self.trainees.items()}
        return results.meta_test(self, learners, trained)

    def teacher_source(self) -> str:
        """Where the teacher comes from, as the summary reports it."""
        if self.cfg.train.teacher_checkpoint:
            return f"train.teacher_checkpoint={self.cfg.train.teacher_checkpoint}"
        cached = self.cached_teacher()
        if cached is not None and cached.exists():
            return f"shared: {cached}"
        return "trained in this run"

    def cached_teacher(self) -> Path | None:
        """``train.teacher_cache``: one file per teacher config, budget and seed, so the cells of a
        study (or a seed sweep) that share a teacher train it once."""
        cfg = self.cfg
        if not cfg.train.teacher_cache:
            return None
        key = {
            "dataset": to_dict(cfg.dataset),
            "teacher": to_dict(cfg.teacher),
            # the teacher's family stands in for the family fields: the students' family is not its own
            "meta": {
                **{k: v for k, v in to_dict(cfg.meta).items() if not k.endswith("family")},
                "family": str(cfg.meta.family_of("teacher")),
            },
            "iterations": cfg.train.iterations,
            "validation": [cfg.train.val_every, cfg.train.val_tasks, cfg.eval.seed, cfg.eval.batch],
            "seed": cfg.seed,
            "dtype": str(cfg.dtype),
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return Path(cfg.train.teacher_cache).expanduser() / f"teacher-seed{cfg.seed}-{digest}.pt"

    def obtain(self, name: str, trainee: Trainee, stop: StopFlag) -> dict[str, Any]:
        """Load the stage's finished checkpoint if there is one, else train it and save it."""
        path = final_path(self.ckpt_dir, name)
        given = self.cfg.train.teacher_checkpoint if name == Stage.teacher else None
        cached = self.cached_teacher() if name == Stage.teacher else None
        if given:
            return self.load_finished(Path(given).expanduser(), trainee.module, self.teacher_what())
        if path.exists():
            return self.load_finished(path, trainee.module, f"checkpoint {path}")
        if cached is not None and cached.exists():
            result = self.load_finished(cached, trainee.module, f"train.teacher_cache file {cached}")
            if self.dist.is_main:  # the run folder stays complete (metakd_run.load reads it)
                save_atomic(load(cached), path)
            return result
        if name not in self.cfg.train.stages:
            raise CheckpointError(f"train.stages leaves out '{name}' but no checkpoint of it exists")
        result = run_stage(self.stage_spec(name, trainee), self.tracker, stop)
        if self.dist.is_main:  # rank 0 alone writes checkpoints
            finished = {
                "stage": name,
                "state_dict": trainee.module.state_dict(),
                "model": to_dict(trainee.model_cfg),
                "meta": to_dict(self.cfg.meta),
                "dataset": self.cfg.dataset.name,
                "result": result,
                "metakd_run": __version__,
            }
            save_atomic(finished, path)
            if cached is not None:
                save_atomic(finished, cached)
            (self.ckpt_dir / f"{name}_last.pt").unlink(missing_ok=True)
        return result

    def stage_spec(self, name: str, trainee: Trainee) -> StageSpec:
        cfg, src = self.cfg, self.src
        task_seed = self.seed("teacher_tasks" if name == Stage.teacher else "student_tasks")
        transfer = cfg.kd.transfer if name == Stage.student_kd else 0
        sharded = distributed.task_sampler(
            self.dist, src.train, cfg.meta.meta_batch, transfer, task_seed, cfg.meta.task_shards
        )

        def sample(iteration: int, generator: torch.Generator) -> Any:
            if sharded is not None:  # data-parallel: this process's shard of the iteration
                return sharded(iteration)
            return src.train.sample(cfg.meta.meta_batch, generator, transfer)

        return StageSpec(
            name=name,
            module=trainee.module.to(self.device, self.dtype),
            learner=trainee.learner,
            step=self.dist.wrap_step(trainee.step),
            sample_tasks=sample,
            val_tasks=fixed_tasks(
                src.val, cfg.train.val_tasks, derive_seed(cfg.eval.seed, "val"), cfg.eval.batch
            ),
            meta=cfg.meta,
            train=cfg.train,
            task_seed=task_seed,
            checkpoint_dir=self.ckpt_dir,
            device=self.device,
            dtype=self.dtype,
            on_gradients=self.dist.all_reduce_gradients if self.dist.active else None,
            is_main=self.dist.is_main,
        )

    # --- helpers -------------------------------------------------------------------------------
    def seed(self, purpose: str) -> int:
        return derive_seed(self.cfg.seed, purpose)

    def teacher_what(self) -> str:
        return f"train.teacher_checkpoint={self.cfg.train.teacher_checkpoint}"

    def load_finished(self, path: Path, module: nn.Module, what: str) -> dict[str, Any]:
        state = load(path)
        if "state_dict" not in state:
            raise CheckpointError(f"{path} is not a finished-stage checkpoint of metakd-run")
        load_state(module, state["state_dict"], what)
        module.to(self.device, self.dtype)
        return state.get("result", {})
