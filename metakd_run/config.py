"""Structured configs: the schema of every group, registered in Hydra's ConfigStore.

Hydra type-checks each YAML file against these dataclasses when it composes the config, so a
key that does not exist or a value of the wrong type fails before any work starts. Range checks
that a type cannot express live in :func:`validate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

DATA_ROOT = "${oc.env:METAKD_DATA_ROOT,data}"


class ConfigError(ValueError):
    """A user's mistake in the config: reported as one line, before any training."""


# --- data sets -------------------------------------------------------------------------------
@dataclass
class SinusoidConfig:
    name: str = "sinusoid"
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    shots: int = 10
    queries: int = 10
    noise: float = 0.0


@dataclass
class ImageDatasetConfig:
    name: str = MISSING
    root: str = DATA_ROOT
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int = 28
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    cache_dir: str | None = None
    download: bool = False


@dataclass
class OmniglotConfig(ImageDatasetConfig):
    name: str = "omniglot"
    image_size: int = 28


@dataclass
class MiniImageNetConfig(ImageDatasetConfig):
    name: str = "miniimagenet"
    image_size: int = 84


# --- models ----------------------------------------------------------------------------------
@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [40, 40])
    activation: str = "relu"


@dataclass
class Conv4Config:
    name: str = "conv4"
    filters: int = 64
    blocks: int = 4


@dataclass
class ResNet12Config:
    name: str = "resnet12"
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])


# --- algorithm, distillation, training, evaluation -----------------------------------------------
@dataclass
class MetaConfig:
    name: str = "maml"
    inner_lr: float = 0.01
    inner_steps: int = 1
    first_order: bool = False
    learn_inner_lr: bool = False
    anil: bool = False
    outer_lr: float = 0.001
    outer_schedule: str = "constant"  # or "cosine": anneal to outer_lr_min over each stage (MAML++)
    outer_lr_min: float = 0.0
    meta_batch: int = 25
    batching: str = "auto"
    chunk: int = 0
    task_shards: int = 0  # >0: draw the meta-batch as N rank-seeded shards (see distributed.py)


@dataclass
class KDConfig:
    name: str = "mse"
    distance: str = "mse"
    weight: float = 1.0
    temperature: float = 4.0
    taps: list[str] = field(default_factory=lambda: ["output"])
    student_taps: list[str] | None = None
    source: str = "adapted"
    transfer: int = 0


@dataclass
class TrainConfig:
    iterations: int = 5000
    student_iterations: int | None = None  # both student stages; None: same as iterations
    val_every: int = 500
    val_tasks: int = 100
    log_every: int = 50
    checkpoint_every: int = 1000
    stages: list[str] = field(default_factory=lambda: ["teacher", "student_kd", "student_base"])
    teacher_checkpoint: str | None = None
    stop_after: str | None = None
    resume: str | None = None
    progress: bool = True


@dataclass
class EvalConfig:
    tasks: int = 600
    steps: int = 10
    report_steps: list[int] = field(default_factory=lambda: [0, 1, 10])
    split: str = "test"
    seed: int = 1234
    batch: int = 100
    plot_tasks: int = 4
    every_step: bool = True


@dataclass
class Config:
    dataset: Any = MISSING
    teacher: Any = MISSING
    student: Any = MISSING
    meta: MetaConfig = field(default_factory=MetaConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0
    name: str = "metakd"


def register_configs() -> None:
    """Put every schema into the ConfigStore; the YAML files name them in their defaults."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="dataset", name="sinusoid_schema", node=SinusoidConfig)
    cs.store(group="dataset", name="omniglot_schema", node=OmniglotConfig)
    cs.store(group="dataset", name="miniimagenet_schema", node=MiniImageNetConfig)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="model", name="conv4_schema", node=Conv4Config)
    cs.store(group="model", name="resnet12_schema", node=ResNet12Config)
    cs.store(group="meta", name="meta_schema", node=MetaConfig)
    cs.store(group="kd", name="kd_schema", node=KDConfig)


# --- range checks ----------------------------------------------------------------------------------
def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {need}")


def _check_model(prefix: str, m: DictConfig) -> None:
    if m.name == "mlp":
        _check(
            len(m.hidden) > 0 and all(h >= 1 for h in m.hidden),
            f"{prefix}.hidden",
            list(m.hidden),
            "give one or more layer widths >= 1, e.g. [40,40]",
        )
        _check(
            m.activation in ("relu", "tanh", "gelu"),
            f"{prefix}.activation",
            m.activation,
            "choose relu, tanh or gelu",
        )
    elif m.name == "conv4":
        _check(m.filters >= 1, f"{prefix}.filters", m.filters, "must be >= 1")
        _check(m.blocks >= 1, f"{prefix}.blocks", m.blocks, "must be >= 1")
    elif m.name == "resnet12":
        _check(
            len(m.widths) == 4 and all(w >= 1 for w in m.widths),
            f"{prefix}.widths",
            list(m.widths),
            "give four widths >= 1",
        )


def validate(cfg: DictConfig) -> None:
    """Reject values that are the right type but cannot work, naming the key and the fix."""
    ds, meta, kd, train, ev = cfg.dataset, cfg.meta, cfg.kd, cfg.train, cfg.eval
    _check(ds.shots >= 1, "dataset.shots", ds.shots, "must be >= 1")
    _check(ds.queries >= 1, "dataset.queries", ds.queries, "must be >= 1")
    if ds.name == "sinusoid":
        for key in ("amplitude", "phase", "x_range"):
            lo_hi = list(ds[key])
            _check(
                len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1],
                f"dataset.{key}",
                lo_hi,
                "give [low, high] with low <= high",
            )
        _check(ds.noise >= 0, "dataset.noise", ds.noise, "must be >= 0")
        for who in ("teacher", "student"):
            _check(
                cfg[who].name == "mlp",
                f"{who}",
                cfg[who].name,
                "sinusoid regression takes model=mlp (choose with model@" + who + "=mlp)",
            )
    else:
        _check(ds.ways >= 2, "dataset.ways", ds.ways, "must be >= 2")
        _check(ds.image_size >= 8, "dataset.image_size", ds.image_size, "must be >= 8")
        for who in ("teacher", "student"):
            _check(
                cfg[who].name in ("conv4", "resnet12"),
                f"{who}",
                cfg[who].name,
                f"image data sets take model@{who}=conv4 or resnet12",
            )
    _check_model("teacher", cfg.teacher)
    _check_model("student", cfg.student)
    _check(meta.inner_lr >= 0, "meta.inner_lr", meta.inner_lr, "must be >= 0")
    _check(meta.inner_steps >= 0, "meta.inner_steps", meta.inner_steps, "must be >= 0")
    _check(meta.outer_lr > 0, "meta.outer_lr", meta.outer_lr, "must be > 0")
    _check(
        meta.outer_schedule in ("constant", "cosine"),
        "meta.outer_schedule",
        meta.outer_schedule,
        "choose constant or cosine",
    )
    _check(
        0 <= meta.outer_lr_min <= meta.outer_lr,
        "meta.outer_lr_min",
        meta.outer_lr_min,
        f"must be between 0 and meta.outer_lr ({meta.outer_lr})",
    )
    _check(meta.meta_batch >= 1, "meta.meta_batch", meta.meta_batch, "must be >= 1")
    _check(
        meta.batching in ("auto", "batched", "vmap", "loop"),
        "meta.batching",
        meta.batching,
        "choose auto, batched, vmap or loop",
    )
    _check(meta.chunk >= 0, "meta.chunk", meta.chunk, "must be >= 0 (0: the whole meta-batch)")
    _check(
        kd.distance in ("mse", "cosine", "kl", "attention"),
        "kd.distance",
        kd.distance,
        "choose mse, cosine, kl or attention",
    )
    _check(kd.weight >= 0, "kd.weight", kd.weight, "must be >= 0")
    _check(kd.temperature > 0, "kd.temperature", kd.temperature, "must be > 0")
    _check(len(kd.taps) >= 1, "kd.taps", list(kd.taps), "name at least one tap, e.g. [output]")
    if kd.student_taps is not None:
        _check(
            len(kd.student_taps) == len(kd.taps),
            "kd.student_taps",
            list(kd.student_taps),
            f"give one student tap per teacher tap ({len(kd.taps)})",
        )
    _check(kd.source in ("adapted", "init"), "kd.source", kd.source, "choose adapted or init")
    _check(kd.transfer >= 0, "kd.transfer", kd.transfer, "must be >= 0")
    _check(train.iterations >= 1, "train.iterations", train.iterations, "must be >= 1")
    if train.student_iterations is not None:
        _check(
            train.student_iterations >= 1,
            "train.student_iterations",
            train.student_iterations,
            "must be >= 1, or null to use train.iterations",
        )
    for key in ("val_every", "val_tasks", "log_every", "checkpoint_every"):
        _check(train[key] >= 1, f"train.{key}", train[key], "must be >= 1")
    stages = ("teacher", "student_kd", "student_base")
    _check(
        all(s in stages for s in train.stages),
        "train.stages",
        list(train.stages),
        f"choose from {list(stages)}",
    )
    _check(ev.tasks >= 2, "eval.tasks", ev.tasks, "must be >= 2 (a confidence interval needs two)")
    _check(ev.steps >= 0, "eval.steps", ev.steps, "must be >= 0")
    _check(
        all(0 <= s <= ev.steps for s in ev.report_steps),
        "eval.report_steps",
        list(ev.report_steps),
        f"each must lie in [0, eval.steps={ev.steps}]",
    )
    _check(ev.batch >= 0, "eval.batch", ev.batch, "must be >= 0")
    _check(cfg.dtype in ("float32", "float64"), "dtype", cfg.dtype, "choose float32 or float64")
    dev = str(cfg.device)
    _check(dev in ("auto", "cpu") or dev.startswith("cuda"), "device", dev, "choose auto, cpu or cuda")
    if dev.startswith("cuda"):
        import torch

        _check(
            torch.cuda.is_available(),
            "device",
            dev,
            "no CUDA device is visible: use device=cpu or device=auto",
        )
    _check(cfg.threads >= 0, "threads", cfg.threads, "must be >= 0 (0: PyTorch's default)")
