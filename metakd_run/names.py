"""The names every table, figure, dashboard and summary share: stages, their labels, the pairs
compared, the metric a run is judged on and the scale it is shown in. One home for each, so the
console table, the figures, TensorBoard, the sweep tables and the ledger cannot drift apart.

A leaf: it imports only :mod:`metakd_run.config` (for :class:`Stage`).
"""

from __future__ import annotations

from metakd_run.config import Stage

# The three models, in the order every table and figure lists them.
STAGES: tuple[str, ...] = tuple(s.value for s in Stage)
TEACHER, KD, BASE = STAGES
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
# The comparison a study is about: the distilled minus the baseline student.
STUDENTS = (KD, BASE)
PAIR = f"{KD}-{BASE}"

# How the test drawings of Lake et al.'s runs are batched (metakd_run.evaluation.lake_runs), in the
# order every table lists them, and the fair one.
LAKE_MODES = {
    "transductive": "the run's 20 test drawings in one batch (batch norm sees all of them)",
    "support": "each test drawing normalised with the 20 training drawings' statistics (fair)",
    "alone": "each test drawing alone, a batch of one",
}
LAKE_FAIR = "support"


def label(name: str) -> str:
    """A stage's label (``student_kd`` -> ``student (MKD)``); any other name as it is."""
    return LABELS.get(Stage(name), name) if name in Stage._value2member_map_ else name


def primary_metric(task: str | None) -> tuple[str, bool]:
    """The metric a run is judged on and whether higher is better: a classification run's query
    accuracy, else (regression, or a task not known) its MSE."""
    return ("accuracy", True) if task == "classification" else ("mse", False)


def scale(metric: str) -> float:
    """Accuracies are shown in percent (their differences in points); every other metric as it is."""
    return 100.0 if metric == "accuracy" else 1.0


def unit(metric: str) -> str:
    """The suffix a column or axis of ``metric`` carries (`` (%)`` for accuracy)."""
    return " (%)" if metric == "accuracy" else ""


def percent(value: float, signed: bool = False, digits: int = 1) -> str:
    """A fraction in percent, ``digits`` decimals, no ``-0.0`` (``+ 0.0`` turns it into 0.0)."""
    sign = "+" if signed else ""
    return f"{100 * value + 0.0:{sign}.{digits}f}"
