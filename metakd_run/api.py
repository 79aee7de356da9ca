"""Use a trained model in your own code: load a run's teacher or student, adapt it, predict.

    import metakd_run
    student = metakd_run.load("outputs/2026-11-28/10-00-00", "student_kd")
    fast = student.adapt(support_x, support_y)          # one task: [S, *input], [S] or [S, 1]
    logits = student.predict(query_x, fast)              # [Q, classes] (or [Q, 1] for regression)

It builds the same meta-learner (MAML, ProtoNet or Pretrain) the console script trains, from the
run's saved config, and loads the stage's checkpoint into it (the distilled student's projections
are left out: they only serve training).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from metakd_run import build
from metakd_run.checkpoint import CheckpointError, load_checkpoint, load_state
from metakd_run.config import Config, ConfigError, SinusoidConfig, Stage, to_typed
from metakd_run.meta.learner import MetaLearner

Params = dict[str, Tensor]


@dataclass(frozen=True)
class TaskShape:
    """What a learner needs to know of its tasks (the run's data set is not loaded)."""

    task: str
    in_shape: tuple[int, ...]
    out_dim: int
    num_classes: int = 0  # training classes (the pretrain family's classifier; 0: not known)


@dataclass
class TrainedModel:
    """A trained model with its meta-learned initialisation and inner loop."""

    name: str
    maml: MetaLearner  # MAML or ProtoNet (the name predates ProtoNet; kept for callers)
    config: Config

    @property
    def model(self) -> torch.nn.Module:
        return self.maml.model

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None) -> Params:
        """Parameters adapted to one task's support set (default: the run's test steps)."""
        steps = self.config.eval.steps if steps is None else steps
        p = next(self.model.parameters())
        sx = support_x.to(p.device, p.dtype)
        sy = support_y.to(p.device, p.dtype if self.maml.task == "regression" else torch.long)
        return self.maml.adapt_frozen(sx, sy, steps)

    def predict(self, x: Tensor, params: Params | None = None) -> Tensor:
        """Outputs on ``x`` with adapted ``params`` (default: the meta-learned initialisation)."""
        p = next(self.model.parameters())
        params = params if params is not None else self.maml.frozen()[0]
        return self.maml.predict(params, x.to(p.device, p.dtype))


Learner = TrainedModel  # the name before 0.2; ``metakd_run.load`` returns a TrainedModel


def task_shape(cfg: Config) -> TaskShape:
    ds = cfg.dataset
    if isinstance(ds, SinusoidConfig):
        return TaskShape("regression", (1,), 1)
    channels = 1 if ds.name == "omniglot" else 3
    return TaskShape("classification", (channels, ds.image_size, ds.image_size), ds.ways)


def load(run_dir: str | Path, model: str = "student_kd", device: str = "cpu") -> TrainedModel:
    """The ``model`` (teacher, student_kd or student_base) of the run in ``run_dir``."""
    run_dir = Path(run_dir).expanduser()
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} holds no metakd-run run (no .hydra/config.yaml)")
    if model not in Stage._value2member_map_:
        raise ConfigError(f"model={model!r} is invalid: choose teacher, student_kd or student_base")
    raw = OmegaConf.load(saved)
    assert isinstance(raw, DictConfig)
    cfg = to_typed(raw)
    path = run_dir / "checkpoints" / f"{model}.pt"
    state = load_checkpoint(path)
    if "state_dict" not in state:
        raise CheckpointError(f"{path} is not a finished-stage checkpoint of metakd-run")
    weights = state["state_dict"]
    if any(k.startswith("learner.") for k in weights):  # the distilled student: drop its projections
        weights = {k[len("learner.") :]: v for k, v in weights.items() if k.startswith("learner.")}
    model_cfg = cfg.teacher if model == Stage.teacher else cfg.student
    shape = task_shape(cfg)
    if "classifier.weight" in weights:  # the pretrain family: its classifier spans the training classes
        shape = replace(shape, num_classes=int(weights["classifier.weight"].shape[0]))
    maml = build.meta_learner(model_cfg, model, shape, cfg.meta, seed=0)
    load_state(maml, weights, f"checkpoint {path}")
    maml.to(torch.device(device), getattr(torch, str(cfg.dtype)))
    maml.eval()
    return TrainedModel(model, maml, cfg)
