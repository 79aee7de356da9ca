"""Scoring models on Lake et al.'s 20 one-shot runs, and the statistics over runs.

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

``python -m metakd_run.lake RUN_DIR`` scores the models of a finished run (see :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metakd_run.config import Config, ConfigError, Stage
from metakd_run.data.errors import DataError
from metakd_run.data.lake import LakeRuns, load_lake_runs
from metakd_run.evaluate import t_interval
from metakd_run.meta.maml import MAML
from metakd_run.models.norm import MetaBatchNorm2d
from metakd_run.report import text_table
from metakd_run.results import label

if TYPE_CHECKING:
    from metakd_run.pipeline import Experiment

log = logging.getLogger(__name__)

MODES = {
    "transductive": "the run's 20 test drawings in one batch (batch norm sees all of them)",
    "support": "each test drawing normalised with the 20 training drawings' statistics (fair)",
    "alone": "each test drawing alone, a batch of one",
}
FAIR = "support"
# Error rates on the 20 runs (Lake, Salakhutdinov & Tenenbaum 2015, Science 350:1332).
PUBLISHED = {"people": 0.045, "Bayesian Program Learning": 0.033, "siamese net (Koch et al. 2015)": 0.080}
PAIR = (Stage.student_kd.value, Stage.student_base.value)
# The 20 alphabets of images_evaluation, where the runs' characters come from.
EVALUATION_ALPHABETS = frozenset(
    (
        "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic",
        "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
        "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar", "Tibetan", "ULOG",
    )
)  # fmt: skip


# --- before training ---------------------------------------------------------------------------------
def check(cfg: Config) -> LakeRuns | None:
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
    for role, count in leaks(cfg).items():
        if count:
            log.warning(
                "eval.lake_runs: %d characters of the %s split (dataset.%s_split=%s) come from the "
                "evaluation alphabets that Lake's runs are drawn from: the runs' error rates will be "
                "optimistic. experiment=omniglot_lake_cpu trains on the background alphabets alone",
                count, role, role, ds.split_name(role),
            )  # fmt: skip
    return runs


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
    learner: MAML,
    runs: LakeRuns,
    steps: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Scores:
    """Adapt ``learner`` on each run's training drawings (``steps`` inner steps) and classify its tests."""
    predictions: dict[str, list[list[int]]] = {mode: [] for mode in MODES}
    params, lrs = learner.frozen()
    for run in runs.runs:
        sx = run.support_x().to(device, dtype)
        sy = run.support_y().to(device)
        with torch.no_grad():
            fast = learner.adapt(params, lrs, sx, sy, steps=steps, create_graph=False)
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
def summarise(scores: dict[str, Scores], runs: LakeRuns, steps: int) -> dict[str, Any]:
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
    if all(name in scores for name in PAIR):
        a, b = (scores[name] for name in PAIR)
        paired = {}
        for mode in MODES:
            diff = [x - y for x, y in zip(a.errors(mode), b.errors(mode))]
            paired[mode] = {
                **_stats(diff),
                "runs_lower": sum(d < 0 for d in diff),
                "runs_higher": sum(d > 0 for d in diff),
            }
        section["paired"][f"{PAIR[0]}-{PAIR[1]}"] = paired
    return section


def _stats(values: list[float]) -> dict[str, Any]:
    mean, half = t_interval(values)
    return {"mean": mean, "ci95": half if half == half else None, "per_run": values}


def score_lake_runs(exp: Experiment, learners: dict[str, MAML]) -> dict[str, Any]:
    """Score every model on the runs of ``eval.lake_runs``; log the figures; return the section."""
    cfg = exp.cfg
    runs = load_lake_runs(cfg.eval.lake_runs, cfg.dataset.image_size)
    scores = {name: score(m, runs, cfg.eval.steps, exp.device, exp.dtype) for name, m in learners.items()}
    section = summarise(scores, runs, cfg.eval.steps)
    section["leaks"] = leaks(cfg)
    if exp.tracker is not None:
        log_section(exp.tracker, section)
    return section


def log_section(tracker: Any, section: dict[str, Any]) -> None:
    """TensorBoard (or MLflow): the means, each run's error (x = run number), the published figures,
    and the console table as text."""
    for name, model in section["models"].items():
        tracker.scalars(f"{name}/lake_error", {m: e["mean"] for m, e in model["error"].items()}, 0)
        for i in range(len(section["runs"])):
            by_mode = {m: e["per_run"][i] for m, e in model["error"].items()}
            tracker.scalars(f"{name}/lake_error_by_run", by_mode, i + 1)
    for pair, by_mode in section["paired"].items():
        tracker.scalars(f"paired/{pair}/lake_error", {m: d["mean"] for m, d in by_mode.items()}, 0)
    tracker.scalars("lake_published_error", section["published_error"], 0)
    tracker.text("eval/lake_runs", "```\n" + format_table(section) + "\n```")


# --- the console table ------------------------------------------------------------------------------------
def _pct(entry: dict[str, Any], signed: bool = False) -> str:
    sign = "+" if signed else ""
    half = "n/a" if entry["ci95"] is None else f"{100 * entry['ci95']:.1f}"
    return f"{100 * entry['mean'] + 0.0:{sign}.1f} ± {half}"  # + 0.0: no "-0.0"


def format_table(section: dict[str, Any]) -> str:
    """Means with intervals per model and mode, the students' paired difference, the published
    figures, then each run's error in the fair mode."""
    n, ways, steps = len(section["runs"]), section["ways"], section["steps"]
    out = [
        f"Lake et al.'s {n} one-shot runs ({ways}-way, within alphabet, {steps} inner steps): error % "
        f"(mean ± 95% CI over runs, Student t)"
    ]
    rows = [["model", *(f"{m}{' (fair)' if m == section['fair'] else ''}" for m in MODES)]]
    for model in section["models"].values():
        rows.append([model["label"], *(_pct(model["error"][m]) for m in MODES)])
    for pair, by_mode in section["paired"].items():
        a, b = pair.split("-")
        rows.append([f"{label(a)} - {label(b)} (paired)", *(_pct(by_mode[m], signed=True) for m in MODES)])
    out += text_table(rows)
    published = ", ".join(f"{who} {100 * e:.1f}" for who, e in section["published_error"].items())
    out.append(f"published error %: {published}")
    out += [f"  {m}: {d}" for m, d in section["modes"].items()]
    header = ["error % per run (fair)", *(r.removeprefix("run") for r in section["runs"])]
    rows = [header]
    for model in section["models"].values():
        rows.append([model["label"], *(f"{100 * e:.0f}" for e in model["error"][section["fair"]]["per_run"])])
    out += ["", *text_table(rows)]
    return "\n".join(out)


# --- a finished run ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m metakd_run.lake RUN_DIR [--runs PATH] [--steps N]``: score a finished run's
    models on the runs, print the table and write ``RUN_DIR/lake_runs.json``."""
    from metakd_run.api import load
    from metakd_run.checkpoint import CheckpointError, write_text_atomic

    parser = argparse.ArgumentParser(prog="python -m metakd_run.lake", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--runs",
        default=None,
        help="all_runs.zip or its folder (default: the run's eval.lake_runs, else its dataset.root)",
    )
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the run's eval.steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the job is small)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        learners, cfg = {}, None
        for name in (s.value for s in Stage):
            if (args.run_dir / "checkpoints" / f"{name}.pt").is_file():
                loaded = load(args.run_dir, name, args.device)
                learners[name], cfg = loaded.maml, loaded.config
        if cfg is None:
            raise CheckpointError(f"{args.run_dir}/checkpoints holds no finished model (teacher.pt, ...)")
        cfg.eval.lake_runs = args.runs or cfg.eval.lake_runs or cfg.dataset.root
        runs = check(cfg)
        assert runs is not None
        steps = cfg.eval.steps if args.steps is None else args.steps
        dtype = getattr(torch, str(cfg.dtype))
        scores = {name: score(m, runs, steps, args.device, dtype) for name, m in learners.items()}
        section = summarise(scores, runs, steps)
        section["leaks"] = leaks(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"metakd_run.lake: error: {err}", file=sys.stderr)
        return 2
    print(format_table(section))
    write_text_atomic(json.dumps(section, indent=2) + "\n", args.run_dir / "lake_runs.json")
    print(f"\nwritten: {args.run_dir / 'lake_runs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
