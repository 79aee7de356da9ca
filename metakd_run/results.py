"""The meta-test and what a run leaves behind: summary.json, per_task.json, timings, figures, TensorBoard.

Every model meets the same fixed test tasks, so besides each model's mean and interval the
summary holds paired comparisons (distilled vs baseline, each student vs the teacher) and the
share of the student-teacher gap that distillation closes, and the per-task values themselves
(``per_task.json``) so that two runs can be compared task by task afterwards.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from metakd_run import __version__
from metakd_run.checkpoint import write_bytes_atomic, write_text_atomic
from metakd_run.config import Config, Split, Stage, to_yaml
from metakd_run.evaluate import adaptation_curves, curve_steps, fixed_tasks, gap_closed, paired, summarise
from metakd_run.meta.maml import MAML
from metakd_run.seeding import derive_seed

if TYPE_CHECKING:
    from metakd_run.pipeline import Experiment

log = logging.getLogger(__name__)

TRAINING_KEYS = ("best_val", "val_metric", "history")
# One name per model, the same in every table, figure and dashboard.
LABELS = {
    Stage.teacher: "teacher",
    Stage.student_kd: "student (MKD)",
    Stage.student_base: "student (baseline)",
}
PAIRS = (  # (a, b): a - b per task
    (Stage.student_kd, Stage.student_base),
    (Stage.student_kd, Stage.teacher),
    (Stage.student_base, Stage.teacher),
)


def label(name: str) -> str:
    return LABELS.get(Stage(name), name) if name in Stage._value2member_map_ else name


def meta_test(
    exp: Experiment, learners: dict[str, MAML], trained: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Score every model on the same fixed tasks; write every output; return the summary."""
    cfg, ev = exp.cfg, exp.cfg.eval
    test_source = exp.src.test
    tasks = fixed_tasks(test_source, ev.tasks, meta_test_seed(ev.seed, ev.split), ev.batch)
    at = curve_steps(ev.steps, ev.report_steps, ev.every_step)
    models: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    per_task: dict[str, dict[str, dict[str, list[float]]]] = {}
    curves_by_model: dict[str, dict[str, torch.Tensor]] = {}
    for name, learner in learners.items():
        tic = time.perf_counter()
        curves = adaptation_curves(learner, tasks, ev.steps, exp.device, exp.dtype, at)
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
            "training": {k: v for k, v in trained.get(name, {}).items() if k in TRAINING_KEYS},
        }
        row = {s: i for i, s in enumerate(at)}
        per_task[name] = {
            metric: {f"step_{s}": [float(v) for v in table[row[s]]] for s in ev.report_steps}
            for metric, table in curves.items()
        }
    summary = {
        "experiment": cfg.name,
        "dataset": cfg.dataset.name,
        "task": test_source.task,
        "eval": {"split": str(ev.split), "tasks": ev.tasks, "steps": ev.steps, "seed": ev.seed},
        "hparams": key_hparams(cfg),
        "teacher_source": exp.teacher_origin,
        **({"accepted_mismatch": exp.accepted} if exp.accepted else {}),
        "models": models,
        "comparisons": comparisons(curves_by_model, at, list(ev.report_steps), test_source.task),
        "environment": environment(exp.device),
    }
    summary["objective"] = objective_value(summary)
    if ev.lake_runs:  # Lake et al.'s 20 fixed one-shot runs (metakd_run/lake.py), logged to the tracker
        from metakd_run.lake import score_lake_runs

        summary["lake_runs"] = score_lake_runs(exp, learners)
    # Wall times and resumption facts vary between identical runs: they stay out of summary.json.
    timings: dict[str, Any] = {
        name: {k: v for k, v in r.items() if k not in TRAINING_KEYS} for name, r in trained.items()
    }
    timings["meta_test_seconds"] = seconds
    timings["obtained"] = dict(exp.reuse)  # trained, resumed, or loaded (and from where)
    write_outputs(exp, summary, timings, per_task, learners, tasks)
    return summary


def meta_test_seed(seed: int, split: Split) -> int:
    """The test split's tasks come from ``eval.seed``; another split's from a stream of its own, so
    that the sinusoid (one task family, no class splits) also has a val split apart from test."""
    return seed if split == Split.test else derive_seed(seed, f"split/{split}")


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric a run is judged on and whether higher is better."""
    return ("accuracy", True) if task == "classification" else ("mse", False)


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


def write_outputs(
    exp: Experiment,
    summary: dict,
    timings: dict,
    per_task: dict,
    learners: dict[str, MAML],
    tasks: list,
) -> None:
    run_dir, tracker, cfg = exp.run_dir, exp.tracker, exp.cfg
    write_text_atomic(json.dumps(summary, indent=2, sort_keys=True) + "\n", run_dir / "summary.json")
    write_text_atomic(json.dumps(per_task) + "\n", run_dir / "per_task.json")
    write_text_atomic(json.dumps(timings, indent=2) + "\n", run_dir / "timings.json")
    from metakd_run import plots

    fig = plots.test_tasks_figure(learners, tasks[0], cfg, exp.device, exp.dtype)
    save_png(fig, run_dir / "test_tasks.png")
    tracker.figure("eval/test_tasks", fig)
    curve_fig = plots.adaptation_figure(summary)
    save_png(curve_fig, run_dir / "adaptation.png")
    tracker.figure("eval/adaptation_curve", curve_fig)
    plots.close(fig, curve_fig)
    for name, model in summary["models"].items():
        for metric, entry in model["metrics"].items():
            for step, value in zip(entry["curve"]["steps"], entry["curve"]["mean"]):
                if value is not None:
                    tracker.scalars(f"{name}/test_{metric}_by_step", {"mean": value}, step)
    tracker.text("config", "```yaml\n" + to_yaml(cfg) + "\n```")
    tracker.hparams(summary["hparams"], final_metrics(summary))
    tracker.close()


def save_png(fig: Any, path: Path) -> None:
    """A figure as a PNG through the atomic writer: a full disk leaves the previous file (or none),
    never half an image, and is the same one line as for a checkpoint."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomic(buffer.getbuffer(), path)


def mamlpp_options(meta: Any) -> str:
    """MAML++'s options that are on, as one HParams column (``none`` for plain MAML)."""
    on = [k for k in ("msl", "lslr", "per_step_bn") if getattr(meta, k)]
    if meta.first_order_until:
        on.append(f"first_order_until={meta.first_order_until}")
    return ",".join(on) or "none"


def key_hparams(cfg: Config) -> dict[str, Any]:
    """The hyperparameters a reader compares runs on (also the HParams tab's columns)."""
    ds, meta, kd = cfg.dataset, cfg.meta, cfg.kd
    hp: dict[str, Any] = {
        "dataset": ds.name,
        "teacher": cfg.teacher.describe(),
        "student": cfg.student.describe(),
        "meta": meta.name,
        "meta.teacher_family": str(meta.family_of("teacher")),
        "meta.student_family": str(meta.family_of("student")),
        "meta.inner_lr": meta.inner_lr,
        "meta.inner_steps": meta.inner_steps,
        "meta.first_order": meta.first_order,
        "meta.learn_inner_lr": meta.learn_inner_lr,
        "meta.anil": meta.anil,
        "meta.mamlpp": mamlpp_options(meta),
        "meta.outer_lr": meta.outer_lr,
        "meta.outer_schedule": str(meta.outer_schedule),
        "meta.meta_batch": meta.meta_batch,
        "kd": kd.name,
        "kd.distance": kd.distance,
        "kd.weight": kd.weight,
        "kd.temperature": kd.temperature,
        "kd.taps": "auto" if kd.taps is None else ",".join(kd.taps),
        "kd.source": str(kd.source),
        "kd.transfer": kd.transfer,
        "kd.inner": kd.inner,
        "kd.learned": ",".join(k for k in ("weight", "temperature") if getattr(kd, f"learn_{k}")) or "none",
        "train.iterations": cfg.train.iterations,
        "train.student_iterations": cfg.train.stage_iterations(Stage.student_kd),
        "seed": cfg.seed,
    }
    for key in ("ways", "shots", "queries"):
        if hasattr(ds, key):
            hp[f"dataset.{key}"] = getattr(ds, key)
    return hp


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flat_metrics(summary: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``<prefix><model>/<metric>_step_<k>`` and the paired comparisons: the final metrics, flat,
    for the HParams tab and the sweep tables. Non-finite entries are left out."""
    flat: dict[str, float] = {}
    for name, model in summary.get("models", {}).items():
        for metric, entry in model.get("metrics", {}).items():
            for key, value in entry.items():
                if key.startswith("step_") and value["mean"] is not None:
                    flat[f"{prefix}{name}/{metric}_{key}"] = value["mean"]
    comp = summary.get("comparisons", {})
    for pair, steps in comp.get("pairs", {}).items():
        for key, value in steps.items():
            if value["mean"] is not None:
                flat[f"{prefix}paired/{pair}/{comp['metric']}_{key}"] = value["mean"]
    for key, value in comp.get("gap_closed", {}).items():
        if value["value"] is not None:
            flat[f"{prefix}gap_closed/{comp['metric']}_{key}"] = value["value"]
    return flat


def final_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The HParams tab's metric columns, under ``final/`` (a prefix the Scalars page can filter)."""
    return flat_metrics(summary, prefix="final/")


def objective_value(summary: dict[str, Any]) -> float:
    """What a sweeper optimises: the distilled student's (else the teacher's) validation metric."""
    models = summary["models"]
    name = Stage.student_kd.value if Stage.student_kd in models else Stage.teacher.value
    best = models[name]["training"].get("best_val")
    if best is None:
        metrics = models[name]["metrics"]
        entry = metrics.get("accuracy") or metrics["mse"]
        best = entry["curve"]["mean"][-1]
    return float("nan") if best is None else float(best)


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
