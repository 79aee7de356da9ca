"""What may be reused: the settings that shaped a stage or a run, and how two of them differ.

A run folder, a sweep job folder, a ``train.teacher_cache`` file and a ``train.teacher_checkpoint``
are all ways of *reusing* a trained model instead of training it again. Reuse is only honest when
the model was trained with the settings the new run reports, so each checkpoint carries the
fingerprint of its stage and each finished run folder the fingerprint of its run, and the
pipeline compares them before any training (:func:`differences`).

A fingerprint holds the settings that change what a stage computes (its model, data set, family
and algorithm options, distillation options, budget, validation tasks, seed, dtype) and leaves out
the ones that change only how it runs or what is shown (``threads``, ``device``, the batching
strategy and chunk size, progress bars, logging cadence, checkpoint cadence, the logger, paths,
and the labels ``meta.name`` and ``kd.name``).
The batching strategies are exact up to float rounding (the tests compare them), so a run resumed
with another strategy is the same run. This module imports only the config (a leaf).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from metakd_run.config import Config, Family, Stage, to_dict

# A config file's name for its choice, shown in tables and provenance; the options it stands for
# are in the fingerprint beside it. ``meta=protonet`` is ``meta=maml`` with ``family: protonet``, so
# its ProtoNet teacher and the one a study's ``meta.teacher_family=protonet`` trains are one model
# (and ``meta=fomaml`` is ``meta.first_order=true``).
LABEL_KEYS = frozenset({"meta.name", "kd.name"})

# Keys that change how a run executes or what it shows, never what a stage computes. (The test
# split shapes no stage: only the meta-test reads it, and the run's fingerprint holds it.)
EXECUTION_KEYS = (
    frozenset(
        {
            "dataset.root",
            "dataset.cache_dir",
            "dataset.download",
            "dataset.test_split",
            "meta.batching",
            "meta.chunk",
        }
    )
    | LABEL_KEYS
)

# A teacher named by train.teacher_checkpoint may come from another seed, budget or validation
# set (that is what the option is for); its data set, model and algorithm must be this run's.
GIVEN_TEACHER_IGNORES = ("iterations", "validation", "seed")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": leaf}``; lists stay leaves (compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _validation(cfg: Config) -> list[Any]:
    return [cfg.train.val_every, cfg.train.val_tasks, cfg.eval.seed, cfg.eval.batch]


def _meta(cfg: Config, role: str) -> dict[str, Any]:
    """The algorithm's options with the role's own family standing in for the family fields."""
    family = cfg.meta.family_of(role)
    meta = {k: v for k, v in to_dict(cfg.meta).items() if not k.endswith("family")}
    if family != Family.pretrain:  # its options shape a pretrain role only (and older fingerprints lack them)
        meta.pop("pretrain", None)
    return {**meta, "family": str(family)}


def teacher_settings(cfg: Config) -> dict[str, Any]:
    """The teacher stage's settings, nested (flattened by :func:`stage_settings`)."""
    return {
        "dataset": to_dict(cfg.dataset),
        "teacher": to_dict(cfg.teacher),
        "meta": _meta(cfg, "teacher"),
        "iterations": cfg.train.iterations,
        "validation": _validation(cfg),
        "seed": cfg.seed,
        "dtype": str(cfg.dtype),
    }


def student_settings(cfg: Config, stage: str, teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """A student stage's settings; the distilled one also depends on its distillation options and
    on the teacher it learned from (``teacher``: that teacher's settings, when it is not the one
    this config trains, e.g. a ``train.teacher_checkpoint``)."""
    settings: dict[str, Any] = {
        "dataset": to_dict(cfg.dataset),
        "student": to_dict(cfg.student),
        "meta": _meta(cfg, "student"),
        "iterations": cfg.train.stage_iterations(stage),
        "validation": _validation(cfg),
        "seed": cfg.seed,
        "dtype": str(cfg.dtype),
    }
    if stage == Stage.student_kd:
        settings["kd"] = to_dict(cfg.kd)
        settings["from_teacher"] = teacher if teacher is not None else teacher_settings(cfg)
    return settings


def stage_settings(cfg: Config, stage: str, teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flat settings that shaped ``stage``, execution keys left out."""
    nested = teacher_settings(cfg) if stage == Stage.teacher else student_settings(cfg, stage, teacher)
    return shaping(flatten(nested))


def run_settings(cfg: Config) -> dict[str, Any]:
    """The flat settings that shaped a whole run: every stage it trains and its meta-test."""
    settings: dict[str, Any] = {}
    for stage in Stage:
        for key, value in stage_settings(cfg, stage).items():
            settings[f"{stage.value}.{key}"] = value
    for key, value in flatten(to_dict(cfg.eval)).items():
        if key not in ("plot_tasks",):  # figures only
            settings[f"eval.{key}"] = value
    settings["stages"] = [str(s) for s in cfg.train.stages]
    settings["dataset.test_split"] = getattr(cfg.dataset, "test_split", None)
    return settings


def shaping(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` without the execution keys, wherever they sit (``from_teacher.meta.chunk`` too)."""
    return {k: v for k, v in flat.items() if not is_execution(k)}


def is_execution(key: str) -> bool:
    """Whether the flat ``key`` is an execution key, wherever it sits."""
    return any(key == e or key.endswith("." + e) for e in EXECUTION_KEYS)


def digest(settings: dict[str, Any]) -> str:
    """A short, stable name for a set of settings (sorted JSON, SHA-256)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_digest(cfg: Config) -> str:
    """The digest that named ``train.teacher_cache`` files before fingerprints (the nested teacher
    settings, execution keys and the data root in); such files are still found and reused. New
    files are named by the digest of :func:`stage_settings`, so a teacher is shared whatever path
    spelling reaches the data or whichever batching strategy trains it."""
    return digest(teacher_settings(cfg))


def record(settings: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint or a run folder stores: the settings and their digest."""
    return {"digest": digest(settings), "settings": settings}


def differences(saved: dict[str, Any], now: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """The stage settings whose values differ, as ``key: saved -> now`` (a key only one side has
    counts).

    ``ignore`` drops keys that start with one of its prefixes (a given teacher's seed, say). The
    execution keys are dropped too: a checkpoint written before a key joined them (the test split
    did, later) still holds it, and it never shaped what the stage computed."""

    def kept(key: str) -> bool:
        return not any(key == p or key.startswith(p + ".") for p in ignore) and not is_execution(key)

    out = []
    for key in sorted(set(saved) | set(now)):
        if not kept(key):
            continue
        a, b = saved.get(key, "<unset>"), now.get(key, "<unset>")
        if a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def summarise(diffs: list[str], most: int = 4) -> str:
    """The first few differences as one line."""
    more = f" and {len(diffs) - most} more" if len(diffs) > most else ""
    return "; ".join(diffs[:most]) + more
