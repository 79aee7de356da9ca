"""The experiment, stage by stage: teacher -> distilled student -> baseline student -> meta-test.

Seeds, the device, resumption and the run folder live here. Each stage's result is a checkpoint
in ``checkpoints/``; a resumed run loads finished stages and continues the interrupted one.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import time
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from metakd_run import __version__, distributed
from metakd_run.checkpoint import CheckpointError, load, load_state, save_atomic, write_text_atomic
from metakd_run.data import build_task_source
from metakd_run.distill.losses import Distiller
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.evaluate import adaptation_curves, curve_steps, fixed_tasks, summarise
from metakd_run.meta.maml import MAML, InnerLoopConfig
from metakd_run.models import build_model, feature_shapes
from metakd_run.tracking import Tracker
from metakd_run.training import StageSpec, StopFlag, final_path, run_stage

log = logging.getLogger(__name__)

STAGES = ("teacher", "student_kd", "student_base")
TRAINING_KEYS = ("best_val", "val_metric", "history")
LABELS = {"teacher": "teacher", "student_kd": "student (MKD)", "student_base": "student (baseline)"}


def derive_seed(seed: int, name: str) -> int:
    """Independent, reproducible seeds per purpose, so adding a stage never shifts another's tasks."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


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


def inner_config(meta: DictConfig) -> InnerLoopConfig:
    """The ``meta`` group's inner-loop keys, handed on unchanged (same names in both)."""
    return InnerLoopConfig(**{f.name: meta[f.name] for f in fields(InnerLoopConfig)})


def build_learner(model_cfg: DictConfig, source: Any, cfg: DictConfig, seed: int) -> MAML:
    torch.manual_seed(seed)
    model = build_model(model_cfg, source.in_shape, source.out_dim)
    return MAML(model, source.task, inner_config(cfg.meta))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def split_name(cfg: DictConfig, which: str) -> str:
    return str(cfg.dataset.get(f"{which}_split", which))


class Experiment:
    """One run: holds the config, the run folder, the device and the tracker."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(cfg.device)
        # data-parallel (torchrun): join the group; every rank works in rank 0's run folder
        self.dist = distributed.setup(self.device, cfg.meta.meta_batch, cfg.meta.task_shards)
        self.run_dir = self.dist.shared_dir(self.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dtype = getattr(torch, cfg.dtype)
        self.seed = int(cfg.seed)
        self.src: Sources | None = None
        self.tracker: Tracker | None = None

    def prepare(self) -> None:
        """Load every split before any training, so missing or bad data fail first."""
        ds = self.cfg.dataset
        val_name = split_name(self.cfg, "val")
        val = build_task_source(ds, val_name)
        self.src = Sources(
            train=build_task_source(ds, split_name(self.cfg, "train"), transfer=self.cfg.kd.transfer),
            val=val,
            test=val if self.cfg.eval.split == val_name else build_task_source(ds, self.cfg.eval.split),
        )
        self.tracker = Tracker(self.run_dir, enabled=self.dist.is_main)  # rank 0 alone logs
        if self.cfg.eval.split == val_name and self.dist.is_main:
            log.warning(
                "eval.split=%s is also the validation split that picks the best checkpoints: "
                "its accuracies are slightly optimistic (different tasks, same classes)",
                self.cfg.eval.split,
            )

    # --- stages ------------------------------------------------------------------------------
    def stage_spec(self, name: str, module: nn.Module, learner: MAML, step, src: Sources) -> StageSpec:  # noqa: ANN001
        cfg, train = self.cfg, self.cfg.train
        val_tasks = fixed_tasks(src.val, train.val_tasks, derive_seed(cfg.eval.seed, "val"), cfg.eval.batch)
        task_seed = derive_seed(self.seed, "teacher_tasks" if name == "teacher" else "student_tasks")
        transfer = cfg.kd.transfer if name == "student_kd" else 0
        dist = self.dist
        return StageSpec(
            name=name,
            module=module.to(self.device, self.dtype),
            learner=learner,
            step=dist.wrap_step(step),
            source=src.train,
            val_tasks=val_tasks,
            iterations=stage_iterations(train, name),
            meta_batch=cfg.meta.meta_batch,
            outer_lr=cfg.meta.outer_lr,
            outer_schedule=cfg.meta.outer_schedule,
            outer_lr_min=cfg.meta.outer_lr_min,
            transfer=transfer,
            task_seed=task_seed,
            checkpoint_dir=self.ckpt_dir,
            val_every=train.val_every,
            log_every=train.log_every,
            checkpoint_every=train.checkpoint_every,
            device=self.device,
            dtype=self.dtype,
            progress=train.progress,
            on_gradients=dist.all_reduce_gradients if dist.active else None,
            is_main=dist.is_main,
            sample_tasks=distributed.task_sampler(
                dist, src.train, cfg.meta.meta_batch, transfer, task_seed, cfg.meta.task_shards
            ),
        )

    def finish_stage(
        self, name: str, module: nn.Module, result: dict[str, Any], model_cfg: DictConfig
    ) -> None:
        if not self.dist.is_main:  # rank 0 alone writes checkpoints
            return
        save_atomic(
            {
                "stage": name,
                "state_dict": module.state_dict(),
                "model": OmegaConf.to_container(model_cfg, resolve=True),
                "dataset": self.cfg.dataset.name,
                "result": result,
                "metakd_run": __version__,
            },
            final_path(self.ckpt_dir, name),
        )
        (self.ckpt_dir / f"{name}_last.pt").unlink(missing_ok=True)

    def load_finished(self, path: Path, module: nn.Module, what: str) -> dict[str, Any]:
        state = load(path)
        if "state_dict" not in state:
            raise CheckpointError(f"{path} is not a finished-stage checkpoint of metakd-run")
        load_state(module, state["state_dict"], what)
        module.to(self.device, self.dtype)
        return state.get("result", {})

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.src is None:
            self.prepare()
        src = self.src
        assert src is not None
        results: dict[str, dict[str, Any]] = {}
        learners: dict[str, MAML] = {}
        stop = StopFlag()
        with stop:
            teacher = build_learner(cfg.teacher, src.train, cfg, derive_seed(self.seed, "teacher_init"))
            teacher_file = final_path(self.ckpt_dir, "teacher")
            if cfg.train.teacher_checkpoint:
                results["teacher"] = self.load_finished(
                    Path(cfg.train.teacher_checkpoint),
                    teacher,
                    f"train.teacher_checkpoint={cfg.train.teacher_checkpoint}",
                )
            elif teacher_file.exists():
                results["teacher"] = self.load_finished(teacher_file, teacher, f"checkpoint {teacher_file}")
            elif "teacher" in cfg.train.stages:
                spec = self.stage_spec("teacher", teacher, teacher, teacher.meta_backward, src)
                results["teacher"] = run_stage(spec, self.tracker, stop)
                self.finish_stage("teacher", teacher, results["teacher"], cfg.teacher)
            else:
                raise CheckpointError(
                    "train.stages leaves out 'teacher' but no train.teacher_checkpoint names one"
                )
            learners["teacher"] = teacher

            for name in ("student_kd", "student_base"):
                if name not in cfg.train.stages:
                    continue
                student = build_learner(cfg.student, src.train, cfg, derive_seed(self.seed, "student_init"))
                module, step = self.student_objective(name, teacher, student, src)
                path = final_path(self.ckpt_dir, name)
                if path.exists():
                    results[name] = self.load_finished(path, module, f"checkpoint {path}")
                else:
                    spec = self.stage_spec(name, module, student, step, src)
                    results[name] = run_stage(spec, self.tracker, stop)
                    self.finish_stage(name, module, results[name], cfg.student)
                learners[name] = student
        if not self.dist.is_main:  # rank 0 alone runs the meta-test and writes the summary
            return {"objective": float("nan"), "rank": self.dist.rank}
        return self.evaluate(learners, results)

    def student_objective(self, name: str, teacher: MAML, student: MAML, src: Sources):  # noqa: ANN201
        """The module to train and its meta-step: distillation for ``student_kd``, plain MAML else."""
        if name == "student_base":
            return student, student.meta_backward
        kd = self.cfg.kd
        pairs = list(zip(kd.taps, kd.student_taps or kd.taps))
        t_shapes = feature_shapes(teacher.model, src.train.in_shape)
        s_shapes = feature_shapes(student.model, src.train.in_shape)
        distiller = Distiller(kd.distance, kd.temperature, pairs, t_shapes, s_shapes)
        torch.manual_seed(derive_seed(self.seed, "projection_init"))
        distiller.to(self.device, self.dtype)
        mkd = MetaDistillation(teacher, student, distiller, kd.weight, kd.source)
        return nn.ModuleDict({"learner": student, "distiller": distiller}), mkd.meta_backward

    # --- meta-test ---------------------------------------------------------------------------
    def evaluate(self, learners: dict[str, MAML], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        ev = cfg.eval
        assert self.src is not None
        test_source = self.src.test
        tasks = fixed_tasks(test_source, ev.tasks, ev.seed, ev.batch)
        models: dict[str, Any] = {}
        seconds: dict[str, float] = {}
        for name, learner in learners.items():
            tic = time.perf_counter()
            at = curve_steps(ev.steps, ev.report_steps, ev.every_step)
            curves = adaptation_curves(learner, tasks, ev.steps, self.device, self.dtype, at)
            metrics = summarise(curves, at, list(ev.report_steps))
            seconds[name] = time.perf_counter() - tic
            if "task_loss" in metrics and learner.task == "regression":
                metrics["mse"] = metrics.pop("task_loss")
            models[name] = {
                "label": LABELS[name],
                "parameters": count_parameters(learner.model),
                "meta_parameters": count_parameters(learner),
                "metrics": metrics,
                "training": {k: v for k, v in results.get(name, {}).items() if k in TRAINING_KEYS},
            }
        summary = {
            "experiment": cfg.name,
            "dataset": cfg.dataset.name,
            "task": test_source.task,
            "eval": {"split": ev.split, "tasks": ev.tasks, "steps": ev.steps, "seed": ev.seed},
            "hparams": key_hparams(cfg),
            "models": models,
            "environment": environment(self.device),
        }
        summary["objective"] = objective_value(summary)
        # Wall times and resumption facts vary between identical runs: they stay out of summary.json.
        timings: dict[str, Any] = {
            name: {k: v for k, v in r.items() if k not in TRAINING_KEYS} for name, r in results.items()
        }
        timings["meta_test_seconds"] = seconds
        self.write_outputs(summary, timings, learners, tasks)
        return summary

    def write_outputs(self, summary: dict, timings: dict, learners: dict[str, MAML], tasks: list) -> None:  # noqa: ANN001
        write_text_atomic(json.dumps(summary, indent=2, sort_keys=True) + "\n", self.run_dir / "summary.json")
        write_text_atomic(json.dumps(timings, indent=2) + "\n", self.run_dir / "timings.json")
        from metakd_run import plots

        fig = plots.test_tasks_figure(learners, tasks[0], self.cfg, self.device, self.dtype)
        fig.savefig(self.run_dir / "test_tasks.png", dpi=110, bbox_inches="tight")
        self.tracker.figure("eval/test_tasks", fig)
        curve_fig = plots.adaptation_figure(summary)
        curve_fig.savefig(self.run_dir / "adaptation.png", dpi=110, bbox_inches="tight")
        self.tracker.figure("eval/adaptation_curve", curve_fig)
        plots.close(fig, curve_fig)
        for name, model in summary["models"].items():
            for metric, entry in model["metrics"].items():
                for step, value in zip(entry["curve"]["steps"], entry["curve"]["mean"]):
                    self.tracker.scalars(f"{name}/test_{metric}_by_step", {"mean": value}, step)
        self.tracker.text("config", "```yaml\n" + OmegaConf.to_yaml(self.cfg) + "\n```")
        self.tracker.hparams(summary["hparams"], final_metrics(summary))
        self.tracker.close()


def key_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters a reader compares runs on (also the HParams tab's columns)."""
    ds = cfg.dataset
    hp: dict[str, Any] = {
        "dataset": ds.name,
        "teacher": _model_desc(cfg.teacher),
        "student": _model_desc(cfg.student),
        "meta.inner_lr": cfg.meta.inner_lr,
        "meta.inner_steps": cfg.meta.inner_steps,
        "meta.first_order": cfg.meta.first_order,
        "meta.learn_inner_lr": cfg.meta.learn_inner_lr,
        "meta.anil": cfg.meta.anil,
        "meta.outer_lr": cfg.meta.outer_lr,
        "meta.outer_schedule": cfg.meta.outer_schedule,
        "meta.meta_batch": cfg.meta.meta_batch,
        "kd.distance": cfg.kd.distance,
        "kd.weight": cfg.kd.weight,
        "kd.temperature": cfg.kd.temperature,
        "kd.taps": ",".join(cfg.kd.taps),
        "kd.source": cfg.kd.source,
        "kd.transfer": cfg.kd.transfer,
        "train.iterations": cfg.train.iterations,
        "train.student_iterations": stage_iterations(cfg.train, "student_kd"),
        "seed": cfg.seed,
    }
    for key in ("ways", "shots", "queries"):
        if key in ds:
            hp[f"dataset.{key}"] = ds[key]
    return hp


def stage_iterations(train: DictConfig, stage: str) -> int:
    """Meta-iterations of one stage: the students may get their own budget (the teacher is trained once)."""
    if stage != "teacher" and train.student_iterations is not None:
        return int(train.student_iterations)
    return int(train.iterations)


def _model_desc(model_cfg: DictConfig) -> str:
    if model_cfg.name == "mlp":
        return "mlp-" + "-".join(str(h) for h in model_cfg.hidden)
    if model_cfg.name == "conv4":
        return f"conv4-{model_cfg.filters}"
    return f"resnet12-{'-'.join(str(w) for w in model_cfg.widths)}"


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """Flat ``final/<model>/<metric>_step<k>`` scalars for the HParams tab and sweep tables."""
    flat: dict[str, float] = {}
    for name, model in summary["models"].items():
        for metric, entry in model["metrics"].items():
            for key, value in entry.items():
                if key.startswith("step_"):
                    flat[f"final/{name}/{metric}_{key}"] = value["mean"]
    return flat


def objective_value(summary: dict[str, Any]) -> float:
    """What a sweeper optimises: the distilled student's (else the teacher's) validation metric."""
    models = summary["models"]
    name = "student_kd" if "student_kd" in models else "teacher"
    best = models[name]["training"].get("best_val")
    if best is None:
        metrics = models[name]["metrics"]
        entry = metrics.get("accuracy") or metrics["mse"]
        best = entry["curve"]["mean"][-1]
    return float(best)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, commit and device, so a summary says what produced it."""
    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "torch": torch.__version__,
        "metakd_run": __version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
    }
