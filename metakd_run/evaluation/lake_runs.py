"""Lake et al.'s 20 one-shot runs, an evaluation protocol: the models scored on them, and the
statistics over runs.

Each model adapts on a run's 20 training drawings (one per character) with the run's test steps
(``eval.steps``) and classifies the run's 20 test drawings. The unit of the statistics is the run:
the error rate of each run, its mean over runs with a Student-t 95% interval, and the distilled
minus the baseline student's error run by run (a paired difference), beside the published
figures (Lake et al. 2015; Koch et al. 2015 for the siamese net).

The models' batch norm normalises with the statistics of the batch it is given (MAML's practice),
so how the test drawings are batched changes the predictions. Three figures, per model:

- ``transductive``: the run's 20 test drawings in one batch, as MAML's meta-test does: each
  prediction depends on the other test drawings of the run.
- ``support``: each test drawing normalised with the statistics of the run's 20 training
  drawings (computed on them alone, in every batch-norm layer): a prediction uses the training
  drawings and that one test drawing, which is what people were given. The fair comparison.
- ``alone``: each test drawing in a batch of one, normalised with its own statistics.

An evaluation protocol (:mod:`metakd_run.evaluation.protocols`), on with ``eval.lake_runs``;
``python -m metakd_run.lake RUN_DIR`` scores the models of a finished run with the same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metakd_run.config import Config, ConfigError
from metakd_run.data.errors import DataError
from metakd_run.data.omniglot_runs import LakeRuns, load_lake_runs
from metakd_run.evaluation.context import Context
from metakd_run.evaluation.protocols import Protocol
from metakd_run.evaluation.stats import t_interval
from metakd_run.meta.learner import MetaLearner
from metakd_run.models.norm import MetaBatchNorm2d
from metakd_run.names import LAKE_FAIR, LAKE_MODES, PAIR, STUDENTS, label

log = logging.getLogger(__name__)

MODES, FAIR = LAKE_MODES, LAKE_FAIR
# Error rates on the 20 runs (Lake, Salakhutdinov & Tenenbaum 2015, Science 350:1332).
PUBLISHED = {"people": 0.045, "Bayesian Program Learning": 0.033, "siamese net (Koch et al. 2015)": 0.080}
# The 20 alphabets of images_evaluation, where the runs' characters come from.
EVALUATION_ALPHABETS = frozenset(
    (
        "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic",
        "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
        "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
    )
)  # fmt: skip


@dataclass(frozen=True)
class Prepared:
    """What :func:`check` read before training, kept for :func:`run`: the runs are read and the
    leak audit computed once."""

    runs: LakeRuns
    leaks: dict[str, int]


# --- before training ---------------------------------------------------------------------------------
def check(cfg: Config) -> Prepared | None:
    """With ``eval.lake_runs``: read the runs and refuse a model that cannot be scored on them.

    Runs before any training, so a missing file or a head of the wrong width costs seconds. A
    training or validation split that holds characters of the evaluation alphabets (the Vinyals
    split does) is allowed but warned about: the runs' figures are then optimistic.
    """
    path = cfg.eval.lake_runs
    if not path:
        return None
    ds = cfg.dataset
    if ds.name != "omniglot":
        raise ConfigError(
            f"eval.lake_runs={path} is invalid with dataset={ds.name}: Lake's runs are Omniglot drawings; "
            "use an Omniglot experiment (e.g. experiment=omniglot_lake_cpu) or eval.lake_runs=null"
        )
    if path == ds.root and not Path(path).expanduser().is_dir():
        raise DataError(
            f"eval.lake_runs=dataset.root={path} does not exist: set METAKD_DATA_ROOT (or dataset.root) to "
            "the folder that holds omniglot/ with one-shot-classification/all_runs.zip, or name the runs "
            "with eval.lake_runs=PATH"
        )
    runs = load_lake_runs(path, ds.image_size)
    if ds.ways != runs.ways:
        raise ConfigError(
            f"dataset.ways={ds.ways} is invalid with eval.lake_runs: Lake's runs are {runs.ways}-way, so the "
            f"models' heads need {runs.ways} outputs; train with dataset.ways={runs.ways} "
            "(experiment=omniglot_lake_cpu) or drop eval.lake_runs"
        )
    leaked = leaks(cfg)
    for role, count in leaked.items():
        if count:
            log.warning(
                "eval.lake_runs: %d characters of the %s split (dataset.%s_split=%s) come from the "
                "evaluation alphabets that Lake's runs are drawn from: the runs' error rates will be "
                "optimistic. experiment=omniglot_lake_cpu trains on the background alphabets alone",
                count, role, role, ds.split_name(role),
            )  # fmt: skip
    return Prepared(runs, leaked)


def leaks(cfg: Config) -> dict[str, int]:
    """Characters of the evaluation alphabets in the training and validation splits, by role."""
    from metakd_run.data.omniglot import read_split

    out = {}
    for role in ("train", "val"):
        entries = read_split(cfg.dataset.split_name(role))
        out[role] = len({e.character for e in entries if alphabet(e.character) in EVALUATION_ALPHABETS})
    return out


def alphabet(character: str) -> str:
    """``Alphabet/characterNN[/rotDDD]`` -> ``Alphabet``."""
    return character.split("/")[0]


# --- scoring -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """One model on every run: per mode, the predicted training class of each test drawing."""

    predictions: dict[str, list[list[int]]]  # mode -> run -> item
    labels: list[list[int]]  # run -> item

    def errors(self, mode: str) -> list[float]:
        """Error rate of each run."""
        return [
            sum(p != y for p, y in zip(pred, lab)) / len(lab)
            for pred, lab in zip(self.predictions[mode], self.labels)
        ]


def score(
    learner: MetaLearner,
    runs: LakeRuns,
    steps: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Scores:
    """Adapt ``learner`` on each run's training drawings (``steps`` inner steps) and classify its tests."""
    predictions: dict[str, list[list[int]]] = {mode: [] for mode in MODES}
    for run in runs.runs:
        sx = run.support_x().to(device, dtype)
        sy = run.support_y().to(device)
        with torch.no_grad():
            fast = learner.adapt_frozen(sx, sy, steps)
            qx = run.query_x().to(device, dtype)
            for mode in MODES:
                logits = classify(learner.model, fast, sx, qx, mode)
                predictions[mode].append([int(i) for i in logits.argmax(-1).cpu()])
    return Scores(predictions, [[int(y) for y in run.labels] for run in runs.runs])


def classify(model: nn.Module, params: dict[str, Tensor], sx: Tensor, qx: Tensor, mode: str) -> Tensor:
    """Logits ``[items, ways]`` for the test drawings ``qx``, batched as ``mode`` says."""
    if mode == "transductive":
        return functional_call(model, params, (qx,))[0]
    if mode == "alone":
        return torch.cat([functional_call(model, params, (qx[i : i + 1],))[0] for i in range(len(qx))])
    if mode == "support":
        with support_statistics(model, len(sx)):
            out = functional_call(model, params, (torch.cat([sx, qx]),))[0]
        return out[len(sx) :]
    raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


@contextmanager
def support_statistics(model: nn.Module, n: int) -> Iterator[None]:
    """Every :class:`MetaBatchNorm2d` of ``model`` normalises its whole batch with the statistics
    of the batch's first ``n`` rows (the support set): the other rows no longer affect each other."""

    def normalise(module: MetaBatchNorm2d, inputs: tuple[Tensor, ...], _output: Tensor) -> Tensor:
        x = inputs[0]
        ref = x[:n]
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)
        var = ((ref - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        scale = torch.rsqrt(var + module.eps) * module.weight.view(1, -1, 1, 1)
        return (x - mean) * scale + module.bias.view(1, -1, 1, 1)

    handles = [m.register_forward_hook(normalise) for m in model.modules() if isinstance(m, MetaBatchNorm2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- statistics -----------------------------------------------------------------------------------------
def summarise_runs(scores: dict[str, Scores], runs: LakeRuns, steps: int) -> dict[str, Any]:
    """The ``lake_runs`` section of summary.json: per model and mode, the error of each run, their
    mean and Student-t 95% half-width over runs; the students' paired difference; the published figures."""
    models: dict[str, Any] = {}
    for name, s in scores.items():
        models[name] = {"label": label(name), "error": {mode: _stats(s.errors(mode)) for mode in MODES}}
    section: dict[str, Any] = {
        "source": runs.source,
        "runs": [r.name for r in runs.runs],
        "ways": runs.ways,
        "steps": steps,
        "modes": dict(MODES),
        "fair": FAIR,
        "published_error": dict(PUBLISHED),
        "models": models,
        "paired": {},
    }
    if all(name in scores for name in STUDENTS):
        a, b = (scores[name] for name in STUDENTS)
        paired = {}
        for mode in MODES:
            diff = [x - y for x, y in zip(a.errors(mode), b.errors(mode))]
            paired[mode] = {
                **_stats(diff),
                "runs_lower": sum(d < 0 for d in diff),
                "runs_higher": sum(d > 0 for d in diff),
            }
        section["paired"][PAIR] = paired
    return section


def _stats(values: list[float]) -> dict[str, Any]:
    mean, half = t_interval(values)
    return {"mean": mean, "ci95": half if half == half else None, "per_run": values}


def score_all(
    learners: dict[str, MetaLearner],
    prepared: Prepared,
    steps: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Every model on every run: the ``lake_runs`` section, the leak audit included."""
    scores = {name: score(m, prepared.runs, steps, device, dtype) for name, m in learners.items()}
    section = summarise_runs(scores, prepared.runs, steps)
    section["leaks"] = dict(prepared.leaks)
    return section


def run(context: Context, learners: dict[str, MetaLearner]) -> dict[str, Any]:
    """The protocol: score every model on the runs of ``eval.lake_runs``."""
    cfg = context.cfg
    prepared = context.prepared.get("lake_runs") or check(cfg)
    return score_all(learners, prepared, cfg.eval.steps, context.device, context.dtype)


PROTOCOL = Protocol(name="lake_runs", enabled=lambda cfg: bool(cfg.eval.lake_runs), check=check, run=run)
