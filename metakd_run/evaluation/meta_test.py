"""The fixed-task meta-test, an evaluation protocol: every model meets the same fixed test tasks.

Besides each model's mean and interval, its section holds paired comparisons (distilled vs
baseline, each student vs the teacher) and the share of the student-teacher gap that distillation
closes; its records hold the per-task values (``per_task.json``, so that two runs can be compared
task by task afterwards), each model's wall time and the example predictions the figures draw.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from metakd_run.config import Split, Stage
from metakd_run.evaluation import examples
from metakd_run.evaluation.context import Context
from metakd_run.evaluation.curves import adaptation_curves, curve_steps, fixed_tasks
from metakd_run.evaluation.protocols import Protocol, Section
from metakd_run.evaluation.stats import gap_closed, paired, summarise
from metakd_run.evaluation.summary import TRAINING_KEYS
from metakd_run.meta.learner import MetaLearner
from metakd_run.names import PAIRS, label, primary_metric
from metakd_run.seeding import derive_seed

log = logging.getLogger(__name__)


def run(context: Context, learners: dict[str, MetaLearner]) -> Section:
    """Score every model on the same fixed tasks: the summary's models, comparisons, task and eval."""
    cfg, ev = context.cfg, context.cfg.eval
    test_source = context.test
    tasks = fixed_tasks(test_source, ev.tasks, meta_test_seed(ev.seed, ev.split), ev.batch)
    at = curve_steps(ev.steps, ev.report_steps, ev.every_step)
    models: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    per_task: dict[str, dict[str, dict[str, list[float]]]] = {}
    curves_by_model: dict[str, dict[str, torch.Tensor]] = {}
    for name, learner in learners.items():
        tic = time.perf_counter()
        curves = adaptation_curves(learner, tasks, ev.steps, context.device, context.dtype, at)
        if learner.task == "regression":
            curves["mse"] = curves.pop("task_loss")
        seconds[name] = time.perf_counter() - tic
        curves_by_model[name] = curves
        metrics = summarise(curves, at, list(ev.report_steps))
        for metric, entry in metrics.items():
            if "diverged_at_step" in entry:
                log.warning(
                    "%s: the test %s is not finite from inner step %d on: the adaptation diverged. "
                    "Evaluate with at most meta.inner_steps=%d steps (eval.steps), or lower meta.inner_lr",
                    label(name), metric, entry["diverged_at_step"], cfg.meta.inner_steps,
                )  # fmt: skip
        models[name] = {
            "label": label(name),
            "parameters": count_parameters(learner.model),
            "meta_parameters": count_parameters(learner),
            "metrics": metrics,
            "training": {k: v for k, v in context.trained.get(name, {}).items() if k in TRAINING_KEYS},
        }
        row = {s: i for i, s in enumerate(at)}
        per_task[name] = {
            metric: {f"step_{s}": [float(v) for v in table[row[s]]] for s in ev.report_steps}
            for metric, table in curves.items()
        }
    section = {
        "task": test_source.task,
        "eval": {"split": str(ev.split), "tasks": ev.tasks, "steps": ev.steps, "seed": ev.seed},
        "models": models,
        "comparisons": comparisons(curves_by_model, at, list(ev.report_steps), test_source.task),
    }
    example = examples.predictions(learners, tasks[0], cfg, context.device, context.dtype, test_source)
    return Section(section, {"per_task": per_task, "seconds": seconds, "examples": example})


def meta_test_seed(seed: int, split: Split) -> int:
    """The test split's tasks come from ``eval.seed``; another split's from a stream of its own, so
    that the sinusoid (one task family, no class splits) also has a val split apart from test."""
    return seed if split == Split.test else derive_seed(seed, f"split/{split}")


def comparisons(
    curves: dict[str, dict[str, torch.Tensor]], at: list[int], report_steps: list[int], task: str
) -> dict[str, Any]:
    """Paired per-task differences of the primary metric and the share of the gap closed, per step."""
    metric, higher = primary_metric(task)
    row = {s: i for i, s in enumerate(at)}
    out: dict[str, Any] = {"metric": metric, "pairs": {}, "gap_closed": {}}
    for a, b in PAIRS:
        if a in curves and b in curves:
            out["pairs"][f"{a}-{b}"] = {
                f"step_{s}": _finite(paired(curves[a][metric][row[s]], curves[b][metric][row[s]]))
                for s in report_steps
            }
    if all(m in curves for m in Stage):
        out["gap_closed"] = {
            f"step_{s}": _finite(
                gap_closed(
                    curves[Stage.teacher][metric][row[s]],
                    curves[Stage.student_kd][metric][row[s]],
                    curves[Stage.student_base][metric][row[s]],
                    higher,
                )
            )
            for s in report_steps
        }
    return out


def _finite(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if v == v and abs(v) != float("inf") else None) for k, v in d.items()}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


PROTOCOL = Protocol(name="meta_test", enabled=lambda cfg: True, run=run, top_level=True)
