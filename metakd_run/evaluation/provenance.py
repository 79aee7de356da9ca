"""Provenance: what produced a run (versions, commit, device) and the settings a reader compares
runs on (the HParams columns), as the summary records them."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from metakd_run import __version__
from metakd_run.config import Config, Stage


def mamlpp_options(meta: Any) -> str:
    """MAML++'s options that are on, as one HParams column (``none`` for plain MAML)."""
    on = [k for k in ("msl", "lslr", "per_step_bn") if getattr(meta, k)]
    if meta.first_order_until:
        on.append(f"first_order_until={meta.first_order_until}")
    return ",".join(on) or "none"


def pretrain_options(meta: Any) -> str:
    """The pretrain family's options in one cell, or ``none`` when no role is of that family."""
    if "pretrain" not in (str(meta.family_of("teacher")), str(meta.family_of("student"))):
        return "none"
    p = meta.pretrain
    scale = f"x{p.scale:g}" if str(p.classifier) == "cosine" else ""
    head = f"logreg(penalty={p.logreg_penalty:g})" if str(p.head) == "logreg" else str(p.head)
    return f"batch={p.batch},{p.classifier}{scale},{head}"


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
        "meta.pretrain": pretrain_options(meta),
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
