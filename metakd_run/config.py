"""The one schema: dataclasses whose fields are the settings the code reads.

Hydra type-checks each YAML file against these dataclasses when it composes the config (an
unknown key or a value of the wrong type fails there), the console script turns the composed
config into these typed objects once (:func:`to_typed`), and every module below it reads them by
attribute. Small closed choices are enums that the code imports; range checks sit beside their
fields in ``__post_init__``, so an object of this module is valid by construction. Choices that
are open registries (models, distances, data sets) are checked by their registries before any
training (the pre-flight checks of :mod:`metakd_run.build`). This module imports nothing from the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

DATA_ROOT = "${oc.env:METAKD_DATA_ROOT,data}"


class ConfigError(ValueError):
    """A user's mistake in the config: reported as one line, before any training."""


class Choice(str, Enum):
    """A closed choice: compares equal to its string, prints as its string, composes by name."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def names(cls) -> str:
        return ", ".join(m.value for m in cls)


class Batching(Choice):
    auto = "auto"
    batched = "batched"
    vmap = "vmap"
    loop = "loop"


class Family(Choice):
    """A family of meta-learners: how a model turns a task's support set into predictions."""

    maml = "maml"  # gradient steps from a learned initialisation (MAML, FOMAML, Meta-SGD, ANIL)
    protonet = "protonet"  # Prototypical Networks: class prototypes, distance logits, no inner loop
    cnp = "cnp"  # Conditional Neural Processes: a support set's mean encoding, a decoder, no inner loop
    pretrain = "pretrain"  # plain classification pretraining, a frozen embedding at test (meta/pretrain.py)


class OuterSchedule(Choice):
    constant = "constant"
    cosine = "cosine"


class KDSource(Choice):
    adapted = "adapted"  # the teacher adapted on each task's support set
    init = "init"  # the teacher's meta-learned initialisation, unadapted


class Stage(Choice):
    teacher = "teacher"
    student_kd = "student_kd"
    student_base = "student_base"


class Split(Choice):
    """A split's role; ``dataset.<role>_split`` names the split that plays it."""

    train = "train"
    val = "val"
    test = "test"


class DType(Choice):
    float32 = "float32"
    float64 = "float64"


def check(ok: bool, key: str, value: Any, need: str) -> None:
    """Raise the one-line :class:`ConfigError` that names the key, its value and the fix."""
    if not ok:
        shown = list(value) if isinstance(value, list | tuple) else value
        raise ConfigError(f"{key}={shown!r} is invalid: {need}")


def _range(low: float, high: float, value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2 and low <= value[0] <= value[1] <= high


# --- data sets -------------------------------------------------------------------------------
@dataclass
class SinusoidConfig:
    name: str = "sinusoid"
    amplitude: list[float] = field(default_factory=lambda: [0.1, 5.0])
    phase: list[float] = field(default_factory=lambda: [0.0, math.pi])
    x_range: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    shots: int = 10  # K support points per task
    queries: int = 10  # query points per task
    noise: float = 0.0  # std of Gaussian noise on the targets

    def __post_init__(self) -> None:
        for key in ("amplitude", "phase", "x_range"):
            value = getattr(self, key)
            check(
                _range(-math.inf, math.inf, value), f"dataset.{key}", value, "give [low, high], low <= high"
            )
        check(self.shots >= 1, "dataset.shots", self.shots, "must be >= 1")
        check(self.queries >= 1, "dataset.queries", self.queries, "must be >= 1")
        check(self.noise >= 0, "dataset.noise", self.noise, "must be >= 0")


@dataclass
class ImageDatasetConfig:
    name: str = MISSING
    root: str = DATA_ROOT
    ways: int = 5
    shots: int = 1
    queries: int = 15
    image_size: int = 28
    train_split: str = (
        "train"  # the split names that play each role (files for Omniglot, CSVs for miniImageNet)
    )
    val_split: str = "val"
    test_split: str = "test"
    cache_dir: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        check(self.ways >= 2, "dataset.ways", self.ways, "must be >= 2")
        check(self.shots >= 1, "dataset.shots", self.shots, "must be >= 1")
        check(self.queries >= 1, "dataset.queries", self.queries, "must be >= 1")
        check(self.image_size >= 8, "dataset.image_size", self.image_size, "must be >= 8")

    def split_name(self, role: Split | str) -> str:
        return str(getattr(self, f"{Split(role).value}_split"))


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

    def __post_init__(self) -> None:
        check(
            len(self.hidden) > 0 and all(h >= 1 for h in self.hidden),
            "hidden",
            self.hidden,
            "give one or more layer widths >= 1, e.g. [40,40]",
        )
        check(
            self.activation in ("relu", "tanh", "gelu"), "activation", self.activation, "relu, tanh or gelu"
        )

    def describe(self) -> str:
        return "mlp-" + "-".join(str(h) for h in self.hidden)


@dataclass
class Conv4Config:
    name: str = "conv4"
    filters: int = 64
    blocks: int = 4

    def __post_init__(self) -> None:
        check(self.filters >= 1, "filters", self.filters, "must be >= 1")
        check(self.blocks >= 1, "blocks", self.blocks, "must be >= 1")

    def describe(self) -> str:
        return f"conv4-{self.filters}" + (f"x{self.blocks}" if self.blocks != 4 else "")


@dataclass
class ResNet12Config:
    name: str = "resnet12"
    widths: list[int] = field(default_factory=lambda: [64, 160, 320, 640])

    def __post_init__(self) -> None:
        check(
            len(self.widths) == 4 and all(w >= 1 for w in self.widths),
            "widths",
            self.widths,
            "four widths >= 1",
        )

    def describe(self) -> str:
        return "resnet12-" + "-".join(str(w) for w in self.widths)


# --- algorithm, distillation, training, evaluation -----------------------------------------------
class Classifier(Choice):
    """The pretrain family's classifier over the training classes."""

    linear = "linear"  # Chen et al.'s Baseline: a linear layer on the embedding
    cosine = "cosine"  # Baseline++: scale x cosine similarity to a weight vector per class


class TestHead(Choice):
    """How a pretrained (frozen) embedding classifies a task's queries from its support set."""

    centroid = "centroid"  # nearest class centroid, ProtoNet's prototypes and distance logits
    logreg = "logreg"  # multinomial logistic regression on the L2-normalised support embeddings


@dataclass
class PretrainConfig:
    """``meta.family=pretrain`` (meta=pretrain): Chen et al. 2019, Tian et al. 2020. Shapes the
    fingerprint of a role of the pretrain family only."""

    batch: int = 64  # images per mini-batch (uniform over the training split's images, global labels)
    classifier: Classifier = Classifier.linear  # over every training class: linear or cosine
    scale: float = 10.0  # the cosine classifier's fixed scale (its logits lie in [-scale, scale])
    head: TestHead = TestHead.logreg  # meta-test (and validation) head on the frozen embedding
    logreg_penalty: float = 1.0  # L2 penalty on the logreg weights: sum of CE + penalty/2 ||W||^2 (1/C)
    logreg_steps: int = 100  # LBFGS iterations of the logreg fit (full batch, deterministic)

    def __post_init__(self) -> None:
        check(self.batch >= 1, "meta.pretrain.batch", self.batch, "must be >= 1")
        check(self.scale > 0, "meta.pretrain.scale", self.scale, "must be > 0")
        check(self.logreg_penalty > 0, "meta.pretrain.logreg_penalty", self.logreg_penalty, "must be > 0")
        check(self.logreg_steps >= 1, "meta.pretrain.logreg_steps", self.logreg_steps, "must be >= 1")


@dataclass
class MetaConfig:
    name: str = "maml"
    inner_lr: float = 0.01  # inner-loop step size (the initial value when learn_inner_lr)
    inner_steps: int = 1  # inner-loop steps during meta-training
    first_order: bool = False  # FOMAML: the inner gradients are not differentiated
    learn_inner_lr: bool = False  # Meta-SGD: a learned rate per parameter entry
    anil: bool = False  # ANIL: only the head adapts in the inner loop
    outer_lr: float = 0.001  # Adam's rate for the meta-update
    outer_schedule: OuterSchedule = OuterSchedule.constant  # cosine: anneal to outer_lr_min over each stage
    outer_lr_min: float = 0.0
    meta_batch: int = 25  # tasks per meta-update
    batching: Batching = Batching.auto  # how the tasks of a meta-batch are computed (meta/strategies.py)
    chunk: int = 0  # >0: this many tasks per graph (bounded memory); 0: the strategy's choice
    task_shards: int = 0  # >0: draw the meta-batch as N rank-seeded shards (see distributed.py)
    family: Family = Family.maml  # every model's family: maml (its options here), protonet, cnp, pretrain
    # MAML++ (Antoniou et al. 2019), each an option; meta=mamlpp turns them on
    msl: bool = False  # multi-step loss: the outer loss weighs the query loss after every inner step
    msl_until: float = 0.1  # ... with weights annealed to the last step over this fraction of a stage
    lslr: bool = False  # a learned inner rate per adapted tensor and per inner step
    per_step_bn: bool = False  # batch-norm weights and biases per inner step (meta-learned, not adapted)
    first_order_until: float = 0.0  # first order for this fraction of a stage, second order after
    rate_lr: float | None = None  # Adam's rate for learned inner rates (LSLR, Meta-SGD); null: outer_lr
    teacher_family: Family | None = None  # the teacher's, when it differs (null: family)
    student_family: Family | None = None  # both students', when it differs (null: family)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # the pretrain family's options

    def family_of(self, role: str) -> Family:
        """The family of ``role``: ``teacher``, or a student (``student``, ``student_kd``, ...)."""
        own = self.teacher_family if role == "teacher" else self.student_family
        return Family(self.family if own is None else own)

    def family_key(self, role: str) -> str:
        """The key that sets ``role``'s family, for messages."""
        own = "teacher_family" if role == "teacher" else "student_family"
        return f"meta.{own}" if getattr(self, own) is not None else "meta.family"

    def __post_init__(self) -> None:
        check(self.inner_lr >= 0, "meta.inner_lr", self.inner_lr, "must be >= 0")
        check(self.inner_steps >= 0, "meta.inner_steps", self.inner_steps, "must be >= 0")
        check(self.outer_lr > 0, "meta.outer_lr", self.outer_lr, "must be > 0")
        check(
            0 <= self.outer_lr_min <= self.outer_lr,
            "meta.outer_lr_min",
            self.outer_lr_min,
            f"must be between 0 and meta.outer_lr ({self.outer_lr})",
        )
        check(self.meta_batch >= 1, "meta.meta_batch", self.meta_batch, "must be >= 1")
        check(self.chunk >= 0, "meta.chunk", self.chunk, "must be >= 0 (0: the strategy's choice)")
        check(self.task_shards >= 0, "meta.task_shards", self.task_shards, "must be >= 0")
        check(self.rate_lr is None or self.rate_lr > 0, "meta.rate_lr", self.rate_lr, "must be > 0 or null")
        for key in ("msl_until", "first_order_until"):
            value = getattr(self, key)
            check(0 <= value <= 1, f"meta.{key}", value, "must be a fraction of the stage, between 0 and 1")
        check(
            not (self.lslr and self.learn_inner_lr),
            "meta.lslr",
            self.lslr,
            "meta.learn_inner_lr=true learns a rate per entry, LSLR one per tensor and step; set one false",
        )


@dataclass
class KDConfig:
    name: str = "mse"
    distance: str = "mse"  # a name in metakd_run.distill.DISTANCES
    weight: float = 1.0  # weight of the distillation term in the student's outer loss
    temperature: float = 4.0  # softmax temperature (kl only)
    taps: list[str] | None = None  # teacher features to match; null: the distance's default (preflight)
    student_taps: list[str] | None = None  # the student's features, one per tap; null: the same names
    source: KDSource = KDSource.adapted
    transfer: int = 0  # extra unlabelled inputs per task (per class for images) to distil on
    inner: bool = False  # distil in the student's inner loop (support set); outer loss: the task loss
    learn_weight: bool = False  # meta-learn a positive factor on kd.weight (through the inner loop)
    learn_temperature: bool = False  # meta-learn kd.temperature (kl; through the inner loop)
    learn_per_tap: bool = False  # one learned weight/temperature per tap pair, not one for all

    def __post_init__(self) -> None:
        for key in ("learn_weight", "learn_temperature"):
            check(
                self.inner or not getattr(self, key),
                f"kd.{key}",
                True,
                "it is meta-learned through the student's inner loop: set kd.inner=true too",
            )
        check(
            not self.learn_weight or self.weight > 0,
            "kd.weight",
            self.weight,
            "a learned weight scales kd.weight: start it > 0",
        )
        check(
            not self.learn_per_tap or self.learn_weight or self.learn_temperature,
            "kd.learn_per_tap",
            True,
            "set kd.learn_weight=true or kd.learn_temperature=true too",
        )
        check(self.weight >= 0, "kd.weight", self.weight, "must be >= 0")
        check(self.temperature > 0, "kd.temperature", self.temperature, "must be > 0")
        check(self.taps is None or len(self.taps) >= 1, "kd.taps", self.taps, "name a tap, e.g. [output]")
        if self.student_taps is not None:
            n = len(self.taps) if self.taps is not None else 1
            check(
                len(self.student_taps) == n,
                "kd.student_taps",
                self.student_taps,
                f"give one student tap per teacher tap ({n}); set kd.taps too",
            )
        check(self.transfer >= 0, "kd.transfer", self.transfer, "must be >= 0")


@dataclass
class TrainConfig:
    iterations: int = 5000
    student_iterations: int | None = None  # both student stages; None: same as iterations
    val_every: int = 500
    val_tasks: int = 100
    log_every: int = 50
    checkpoint_every: int = 1000
    stages: list[Stage] = field(default_factory=lambda: [Stage.teacher, Stage.student_kd, Stage.student_base])
    teacher_checkpoint: str | None = None  # a finished teacher.pt to use instead of training one
    # a folder where teachers and undistilled students (neither depends on the distillation) are
    # kept by their stage settings and seed, and reused
    teacher_cache: str | None = None
    resume: str | None = None
    accept_mismatch: bool = False  # load models (this folder's, a given teacher) trained with other settings
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.iterations >= 1, "train.iterations", self.iterations, "must be >= 1")
        check(
            self.student_iterations is None or self.student_iterations >= 1,
            "train.student_iterations",
            self.student_iterations,
            "must be >= 1, or null to use train.iterations",
        )
        for key in ("val_every", "val_tasks", "log_every", "checkpoint_every"):
            check(getattr(self, key) >= 1, f"train.{key}", getattr(self, key), "must be >= 1")

    def stage_iterations(self, stage: Stage | str) -> int:
        """The students may get their own budget (the teacher is trained once and shared)."""
        if stage != Stage.teacher and self.student_iterations is not None:
            return int(self.student_iterations)
        return int(self.iterations)


@dataclass
class EvalConfig:
    tasks: int = 600
    steps: int = 10
    report_steps: list[int] = field(default_factory=lambda: [0, 1, 10])
    split: Split = Split.test  # the role; dataset.<split>_split names the split (images)
    seed: int = 1234
    batch: int = 100
    plot_tasks: int = 4
    every_step: bool = True
    lake_runs: str | None = None  # Lake et al.'s 20 one-shot runs (all_runs.zip or a folder holding them)

    def __post_init__(self) -> None:
        check(self.tasks >= 2, "eval.tasks", self.tasks, "must be >= 2 (a confidence interval needs two)")
        check(self.steps >= 0, "eval.steps", self.steps, "must be >= 0")
        check(
            all(0 <= s <= self.steps for s in self.report_steps) and len(self.report_steps) > 0,
            "eval.report_steps",
            self.report_steps,
            f"each must lie in [0, eval.steps={self.steps}]",
        )
        check(self.batch >= 0, "eval.batch", self.batch, "must be >= 0")
        check(self.plot_tasks >= 1, "eval.plot_tasks", self.plot_tasks, "must be >= 1")
        check(
            self.lake_runs is None or bool(self.lake_runs.strip()),
            "eval.lake_runs",
            self.lake_runs,
            "give the path of all_runs.zip or of a folder that holds the runs, or null",
        )


@dataclass
class StudyConfig:
    """A study preset (``study=``, configs/study): read by the sweep summary, which closes the sweep
    with ``study.md`` and ``study.png``; ``cell``/``cells`` let one swept key stand for several."""

    name: str | None = None  # null: not a study
    x: str = "setting"  # student_parameters: the student's parameter count; setting: the swept value
    x_label: str = "setting"
    step: int | None = None  # the inner step the figure shows; null: the last of eval.report_steps
    cell: str | None = None  # the swept cell, a key of cells (the settings interpolate from it)
    cells: dict[str, Any] = field(default_factory=dict)


class LoggerBackend(Choice):
    tensorboard = "tensorboard"
    mlflow = "mlflow"
    none = "none"


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.tensorboard
    tracking_uri: str | None = None  # mlflow: null keeps a store in <run>/mlruns; or http(s)://server:port
    experiment_name: str | None = None  # mlflow: the experiment the run is filed under (null: metakd-run)
    run_name: str | None = None  # mlflow: null -> <parent folder>/<run folder>


@dataclass
class Config:
    dataset: Any = MISSING
    teacher: Any = MISSING
    student: Any = MISSING
    meta: MetaConfig = field(default_factory=MetaConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: DType = DType.float32
    threads: int = 0  # torch.set_num_threads; 0 keeps PyTorch's default
    name: str = "metakd"
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self) -> None:
        for who in ("teacher", "student"):
            model = getattr(self, who)
            if isinstance(model, DictConfig | dict):  # a plain (untyped) node: typed by to_typed
                continue
            wrong = isinstance(self.dataset, SinusoidConfig) != isinstance(model, MLPConfig)
            need = (
                f"sinusoid regression takes model@{who}=mlp"
                if isinstance(self.dataset, SinusoidConfig)
                else f"image data sets take model@{who}=conv4 or resnet12"
            )
            check(not wrong, who, model.name, need)
        check(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            "device",
            self.device,
            "choose auto, cpu or cuda",
        )
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: PyTorch's default)")
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")


# name -> schema, for the groups whose choice is a schema of its own
DATASET_SCHEMAS: dict[str, type] = {
    "sinusoid": SinusoidConfig,
    "omniglot": OmniglotConfig,
    "miniimagenet": MiniImageNetConfig,
}
MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConfig, "conv4": Conv4Config, "resnet12": ResNet12Config}


def register_configs() -> None:
    """Put every schema into the ConfigStore at the top level, outside every group users pick from.

    A group's YAML files extend their schema (``- /schema_model_conv4@_here_``); stored inside a
    group, the schemas would be listed by ``--help`` and could be chosen as options.
    """
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config, provider="metakd_run")
    for name, node in DATASET_SCHEMAS.items():
        cs.store(name=f"schema_dataset_{name}", node=node, provider="metakd_run")
    for name, node in MODEL_SCHEMAS.items():
        cs.store(name=f"schema_model_{name}", node=node, provider="metakd_run")
    cs.store(name="schema_meta", node=MetaConfig, provider="metakd_run")
    cs.store(name="schema_kd", node=KDConfig, provider="metakd_run")
    cs.store(name="schema_logger", node=LoggerConfig, provider="metakd_run")


def _typed_node(schemas: dict[str, type], node: Any, key: str, fix: str) -> Any:
    name = str(node.get("name")) if isinstance(node, DictConfig) else None
    if name not in schemas:
        raise ConfigError(f"{key}.name={name!r} is invalid: {fix}")
    merged = OmegaConf.merge(OmegaConf.structured(schemas[name]), node)
    return merged


def to_typed(cfg: DictConfig) -> Config:
    """The composed (or saved) config as a :class:`Config`: every range check has run.

    A config that Hydra composed is already typed; one loaded back from ``.hydra/config.yaml``
    (resumption, the Python API) is plain, so each schema is found again by its ``name``.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    base = OmegaConf.structured(Config)
    node = OmegaConf.create(plain)
    node.dataset = _typed_node(
        DATASET_SCHEMAS, node.get("dataset"), "dataset", "choose " + ", ".join(DATASET_SCHEMAS)
    )
    for who in ("teacher", "student"):
        node[who] = _typed_node(
            MODEL_SCHEMAS, node.get(who), who, f"choose model@{who}=" + "|".join(MODEL_SCHEMAS)
        )
        try:
            OmegaConf.to_object(node[who])
        except ConfigError as err:  # the model schemas do not know whose they are
            raise ConfigError(f"{who}.{err}") from None
    for key in ("dataset", "teacher", "student"):
        base[key] = node.pop(key)
    merged = OmegaConf.merge(base, node)
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, Config)
    return obj


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A typed config (or part of one) as plain containers, enums as their strings."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)
    assert isinstance(out, dict)
    return out
