"""The figures: model names as in the table, integer steps, CI bands, diverged curves, studies."""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_rgba
from omegaconf import OmegaConf
from torch.func import functional_call

from metakd_run.config import EvalConfig, MetaConfig, SinusoidConfig
from metakd_run.data.episodes import EpisodeSampler
from metakd_run.data.sinusoid import SinusoidTasks
from metakd_run.evaluation import examples
from metakd_run.meta.maml import MAML
from metakd_run.models.conv4 import Conv4
from metakd_run.models.mlp import MLP
from metakd_run.names import label
from metakd_run.presentation import figures as plots

NAMES = ["teacher", "student_kd", "student_base"]
LABELS = ["teacher", "student (MKD)", "student (baseline)"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _entry(steps: list[int], mean: list[float | None], ci: list[float | None], diverged: int | None = None):
    entry: dict[str, Any] = {"curve": {"steps": steps, "mean": mean, "ci95": ci}}
    if diverged is not None:
        entry["diverged_at_step"] = diverged
    return entry


def _summary(task: str, entries: dict[str, dict]) -> dict[str, Any]:
    metric = "accuracy" if task == "classification" else "mse"
    return {
        "task": task,
        "dataset": "fake",
        "eval": {"split": "test", "tasks": 50, "steps": 10},
        "hparams": {"meta.inner_steps": 1},
        "models": {n: {"label": label(n), "metrics": {metric: e}} for n, e in entries.items()},
    }


def _legend(fig: plt.Figure) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _bands(ax) -> list[PolyCollection]:  # noqa: ANN001
    return [c for c in ax.collections if isinstance(c, PolyCollection)]


def test_adaptation_figure_regression_has_integer_steps_bands_and_table_names() -> None:
    steps = list(range(11))
    summary = _summary(
        "regression",
        {
            n: _entry(steps, [scale * 0.8**s for s in steps], [0.1 * scale * 0.8**s for s in steps])
            for n, scale in zip(NAMES, (2.0, 3.0, 3.5))
        },
    )
    fig = plots.adaptation_figure(summary)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert _legend(fig) == LABELS
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)
    assert ax.get_yscale() == "log"
    bands = _bands(ax)
    assert len(bands) == 3
    # The teacher's band spans mean +- ci95 at step 0: 2.0 +- 0.2.
    xy = bands[0].get_paths()[0].vertices
    at0 = sorted({round(float(y), 9) for x, y in xy if x == 0})
    assert at0 == pytest.approx([1.8, 2.2])


def test_adaptation_figure_classification_in_percent_with_bands() -> None:
    summary = _summary(
        "classification",
        {
            n: _entry([0, 1, 3], [0.2, acc - 0.1, acc], [0.01, 0.02, 0.02])
            for n, acc in zip(NAMES, (0.9, 0.8, 0.7))
        },
    )
    fig = plots.adaptation_figure(summary)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert _legend(fig) == LABELS
    assert [list(line.get_ydata()) for line in ax.get_lines()[:3]] == [
        pytest.approx([20.0, 100 * (a - 0.1), 100 * a]) for a in (0.9, 0.8, 0.7)
    ]
    assert len(_bands(ax)) == 3
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "%" in ax.get_ylabel()


def test_adaptation_figure_keeps_the_table_order_for_a_summary_read_from_json() -> None:
    """summary.json is written with sorted keys; the legend still reads teacher first."""
    summary = _summary("classification", {n: _entry([0, 1], [0.2, 0.5], [0.01, 0.01]) for n in sorted(NAMES)})
    assert list(summary["models"]) != NAMES
    fig = plots.adaptation_figure(summary)
    assert _legend(fig) == LABELS
    assert [line.get_color() for line in fig.axes[0].get_lines()[:3]] == [plots.color(n) for n in NAMES]


def test_diverged_curve_is_drawn_up_to_the_step_and_annotated() -> None:
    steps = list(range(6))
    summary = _summary(
        "regression",
        {
            "teacher": _entry(steps, [1.0] * 6, [0.1] * 6),
            "student_kd": _entry(steps, [None] * 6, [None] * 6, diverged=0),
            "student_base": _entry(
                steps, [2.0, 1.5, 1.2, None, None, None], [0.2] * 3 + [None] * 3, diverged=3
            ),
        },
    )
    fig = plots.adaptation_figure(summary)
    ax = fig.axes[0]
    legend = _legend(fig)
    assert legend == [
        "teacher",
        "student (MKD) (diverged at step 0)",
        "student (baseline) (diverged at step 3)",
    ]
    base = next(line for line in ax.get_lines() if line.get_label().startswith("student (baseline)"))
    assert list(base.get_xdata()) == [0, 1, 2]
    assert list(base.get_ydata()) == pytest.approx([2.0, 1.5, 1.2])
    notes = [t.get_text() for t in ax.texts]
    assert "diverged at step 3" in notes and "diverged at step 0" in notes
    assert {3, 0} <= {line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"}


def _cfg(dataset: Any, steps: int, plot_tasks: int = 2) -> Any:
    ev = EvalConfig(steps=steps, report_steps=[0, steps], plot_tasks=plot_tasks)
    return OmegaConf.create({"dataset": OmegaConf.structured(dataset), "eval": OmegaConf.structured(ev)})


def _tasks_figure(learners: dict, batch: Any, cfg: Any, source: Any) -> Any:
    """The test-task figure as a run draws it: the predictions computed, then drawn from the record."""
    record = examples.predictions(learners, batch, cfg, torch.device("cpu"), torch.float32, source)
    return plots.test_tasks_figure(record)


def test_regression_tasks_figure_takes_the_truth_from_the_task_source() -> None:
    torch.manual_seed(0)
    ds = SinusoidConfig(amplitude=[1.0, 2.0], x_range=[-3.0, 3.0], shots=5, queries=5)
    source = SinusoidTasks(ds.amplitude, ds.phase, ds.x_range, ds.shots, ds.queries)
    batch = source.sample(3, torch.Generator().manual_seed(1))
    learners = {n: MAML(MLP(1, 1, [8]), "regression", MetaConfig(inner_lr=0.05)) for n in NAMES}
    fig = _tasks_figure(learners, batch, _cfg(ds, steps=4), source)
    panels = [ax for ax in fig.axes if ax.get_title().startswith("test task")]
    assert len(panels) == 2  # eval.plot_tasks
    assert "after 4 inner steps" in fig.get_suptitle()
    assert _legend(fig)[-3:] == LABELS
    for t, ax in enumerate(panels):
        truth = next(line for line in ax.get_lines() if line.get_label() == "true function")
        x = torch.as_tensor(truth.get_xdata(), dtype=torch.float64).view(1, -1, 1)
        want = source.curve(batch.info["amplitude"][t : t + 1], batch.info["phase"][t : t + 1], x).view(-1)
        assert torch.as_tensor(truth.get_ydata(), dtype=torch.float64) == pytest.approx(want, abs=1e-5)
        assert x.min() == pytest.approx(-3.0) and x.max() == pytest.approx(3.0)


def test_episode_figure_shows_every_class_and_marks_wrong_predictions_red() -> None:
    torch.manual_seed(0)
    ways, queries, steps = 11, 2, 2  # 11 classes: two column blocks
    images = (torch.rand(12, 4, 1, 8, 8) * 255).to(torch.uint8)
    batch = EpisodeSampler(images, ways, 1, queries).sample(1, torch.Generator().manual_seed(0))
    learners = {
        n: MAML(Conv4((1, 8, 8), ways, filters=f, blocks=2), "classification", MetaConfig(inner_lr=0.5))
        for n, f in zip(NAMES, (4, 2, 2))
    }
    cfg = _cfg({"name": "fake"}, steps=steps)
    fig = _tasks_figure(learners, batch, cfg, None)
    title = fig.get_suptitle()
    assert f"after {steps} inner steps" in title and "red when wrong" in title
    texts = [t for ax in fig.axes for t in ax.texts]
    assert {t.get_text() for t in texts if t.get_text().startswith("label ")} == {
        f"label {c}" for c in range(ways)
    }
    # Every query is shown (2 per class); each carries each model's prediction under its full name.
    query_axes = [ax for ax in fig.axes if ax.texts and not ax.texts[0].get_text().startswith("label ")]
    assert len(query_axes) == ways * queries
    qx, qy = batch.query_x[0], batch.query_y[0]
    for name, learner in learners.items():
        params, lrs = learner.frozen()
        fast = learner.adapt(
            params, lrs, batch.support_x[0], batch.support_y[0], steps=steps, create_graph=False
        )
        with torch.no_grad():
            want = functional_call(learner.model, fast, (qx,))[0].argmax(-1)
        for i, ax in enumerate(query_axes):  # queries are grouped by label, drawn in that order
            text = next(t for t in ax.texts if t.get_text().startswith(f"{label(name)}: "))
            assert text.get_text() == f"{label(name)}: {int(want[i])}"
            wrong = int(want[i]) != int(qy[i])
            assert (to_rgba(text.get_color()) == to_rgba(plots.WRONG)) == wrong


def _study_rows(xs: list[float], means: dict[str, list[float | None]]) -> list[dict[str, Any]]:
    return [
        {"x": x, "model": m, "mean": v, "ci95": 0.01, "n": 5}
        for m, vs in means.items()
        for x, v in zip(xs, vs)
    ]


def test_study_figure_has_one_line_per_model_with_error_bars_and_log_x() -> None:
    xs = [300, 1000, 3500, 13000]
    rows = _study_rows(
        xs,
        {"teacher": [0.95] * 4, "student_kd": [0.7, 0.75, 0.8, 0.9], "student_base": [0.69, 0.74, 0.8, 0.89]},
    )
    fig = plots.study_figure(rows, "student parameters", "accuracy", higher_is_better=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == LABELS
    assert len(ax.containers) == 3
    for container, want in zip(
        ax.containers, ([95.0] * 4, [70.0, 75.0, 80.0, 90.0], [69.0, 74.0, 80.0, 89.0])
    ):
        line, _, (bars,) = container
        assert list(line.get_ydata()) == pytest.approx(want)
        segments = bars.get_segments()
        assert [s[1][1] - s[0][1] for s in segments] == pytest.approx([2.0] * 4)  # 2 x ci95, in %
    assert ax.get_xscale() == "log"
    assert list(ax.get_xticks()) == xs
    assert "5 seeds" in ax.get_title() and "higher is better" in ax.get_title()


def test_study_figure_linear_integer_axis_and_non_finite_points_named() -> None:
    rows = _study_rows([1, 2, 3, 5], {"teacher": [0.3, 0.2, 0.1, 0.05], "student_kd": [0.5, 0.3, None, 0.1]})
    fig = plots.study_figure(rows, "inner steps", "mse", higher_is_better=False)
    ax = fig.axes[0]
    assert ax.get_xscale() == "linear"
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert len(ax.containers) == 2
    assert len(ax.containers[1][0].get_xdata()) == 3
    assert [t.get_text() for t in ax.texts] == ["not finite"]
    assert not math.isnan(ax.get_ylim()[0])


def test_study_figure_places_named_settings_in_order() -> None:
    taps = ["block1", "block4", "embedding"]
    rows = _study_rows(taps, {"student_kd": [0.6, 0.7, 0.65], "student_base": [0.62] * 3})  # type: ignore[arg-type]
    fig = plots.study_figure(rows, "distilled layer", "accuracy", higher_is_better=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == taps
    assert list(ax.get_xticks()) == [0, 1, 2]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == LABELS[1:]
