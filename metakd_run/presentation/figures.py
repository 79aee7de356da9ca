"""Figures for the run folder and TensorBoard: test tasks with predictions, adaptation curves, studies.

Every figure is drawn from records alone (the summary, the example predictions of
:mod:`metakd_run.evaluation.examples`, a study's rows): none adapts a model or reads a data set.
Every figure names the models as the console table does (:func:`metakd_run.names.label`) and
gives each the same colour, so a reader can move between the table, the figures and TensorBoard.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.ticker import FixedLocator, LogFormatter, MaxNLocator, NullLocator  # noqa: E402

from metakd_run.config import Stage  # noqa: E402
from metakd_run.names import label, primary_metric, scale, unit  # noqa: E402

COLORS = {
    Stage.teacher.value: "tab:blue",
    Stage.student_kd.value: "tab:orange",
    Stage.student_base.value: "tab:green",
}
COLORS.update({label(name): color for name, color in list(COLORS.items())})
_RANK = {key: i for i, stage in enumerate(Stage) for key in (stage.value, label(stage.value))}
WRONG = "tab:red"
MAX_ROWS = 10  # classes per column block of the episode figure


def ordered(names: Sequence[str]) -> list[str]:
    """Teacher, distilled student, baseline student, then any other name: the table's order, also
    for a summary read back from ``summary.json`` (whose keys are sorted)."""
    return sorted(dict.fromkeys(names), key=lambda n: _RANK.get(n, len(Stage)))


def color(name: str) -> str | None:
    """The model's colour in every figure (``name`` is a stage name or its label)."""
    return COLORS.get(name)


def _scale(metric: str) -> tuple[float, str]:
    """Accuracies are shown in percent, as in the console table."""
    return scale(metric), f"{metric}{unit(metric)}"


# --- test tasks with predictions -------------------------------------------------------------------


def test_tasks_figure(examples: dict[str, Any]) -> plt.Figure:
    """A few test tasks: the data and each model's predictions after ``eval.steps`` inner steps, from
    the record of :func:`metakd_run.evaluation.examples.predictions`."""
    if examples["kind"] == "regression":
        return _regression_figure(examples)
    return _episode_figure(examples)


def _regression_figure(ex: dict[str, Any]) -> plt.Figure:
    """One panel per task: the true function (from the task source itself), the support and query
    points, and each model before adaptation (dotted) and after ``eval.steps`` steps (solid)."""
    n, grid, truth, steps = ex["tasks"], ex["grid"], ex["truth"], ex["steps"]
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False, layout="constrained")
    for t, ax in enumerate(axes[0]):
        sx, sy = ex["support_x"][t], ex["support_y"][t]
        if truth is not None:
            ax.plot(grid.cpu(), truth[t], color="black", lw=1.5, label="true function")
        ax.scatter(sx.cpu(), sy.cpu(), color="black", marker="^", zorder=5, label="support")
        ax.scatter(
            ex["query_x"][t],
            ex["query_y"][t],
            s=14,
            facecolors="none",
            edgecolors="gray",
            zorder=4,
            label="query",
        )
        for name in ordered(list(ex["after"])):
            c = color(name)
            ax.plot(grid, ex["before"][name][t], color=c, ls=":", lw=1)
            ax.plot(grid, ex["after"][name][t], color=c, lw=1.4, label=label(name))
        facts = [f"{k}={float(v[t]):.2f}" for k, v in ex["info"].items()]
        ax.set_title(f"test task {t}" + (": " + ", ".join(facts) if facts else ""), fontsize=9)
        ax.set_xlabel("x", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.legend(
        *axes[0][0].get_legend_handles_labels(), loc="outside lower center", ncol=7, fontsize=8, frameon=False
    )
    fig.suptitle(
        f"{n} {ex['split']} tasks: each model's prediction after {steps} inner steps on the "
        f"{ex['shots']} support points (solid) and before adaptation (dotted)",
        fontsize=9,
    )
    return fig


def _queries_per_class(ways: int, queries: int) -> int:
    """Enough queries per class to judge, few enough that a 20-way episode still fits a page."""
    return max(1, min(queries, max(3, 40 // ways)))


def _episode_figure(ex: dict[str, Any]) -> plt.Figure:
    """The first test episode, one row per class (in blocks of at most 10 rows side by side): its
    support images, then some of its queries with each model's predicted label after
    ``eval.steps`` steps, in red when wrong."""
    sx, sy, qx, qy = ex["support_x"], ex["support_y"], ex["query_x"], ex["query_y"]
    steps, split = ex["steps"], ex["split"]
    preds: dict[str, torch.Tensor] = {
        name: ex["predictions"][name] for name in ordered(list(ex["predictions"]))
    }
    classes = sorted(int(c) for c in torch.unique(sy.cpu()))
    support = {c: (sy.cpu() == c).nonzero().view(-1).tolist() for c in classes}
    query = {c: (qy == c).nonzero().view(-1).tolist() for c in classes}
    ways, queries = len(classes), int(qy.numel())
    shots = max(len(v) for v in support.values())
    shown = _queries_per_class(ways, max(len(v) for v in query.values()))
    blocks = math.ceil(ways / MAX_ROWS)
    rows = math.ceil(ways / blocks)
    block = [1.0] * shots + [0.25] + [1.0] * shown  # support, a narrow gap, queries
    ratios = [w for b in range(blocks) for w in ([0.6] if b else []) + block]
    width = 1.25 * sum(ratios) + 0.6
    acc = ", ".join(f"{label(n)} {100 * float((p == qy).double().mean()):.0f}%" for n, p in preds.items())
    per = queries // ways
    subset = f"{shown} of {per} per class" if shown < per else f"all {per} per class"
    title = textwrap.fill(
        f"One {split} episode, {ways}-way {shots}-shot. Each row is one class; its label "
        f"(0..{ways - 1}) is the class's index in this episode, taught by its support "
        f"image{'s' if shots > 1 else ''} on the left. Under each query ({subset}): each "
        f"model's predicted label after {steps} inner steps on the support set, in red when wrong. "
        f"Accuracy on all {queries} queries: {acc}.",
        width=int(width * 14),
    )
    head = 0.5 + 0.16 * (title.count("\n") + 1)
    lines = len(preds)
    fig = plt.figure(figsize=(width, (1.05 + 0.15 * lines) * rows + head))
    grid = fig.add_gridspec(
        rows,
        len(ratios),
        width_ratios=ratios,
        hspace=0.25 + 0.17 * lines,
        wspace=0.15,
        left=0.6 / width,
        right=0.99,
        top=1 - head / fig.get_figheight(),
        bottom=0.15 * lines / fig.get_figheight(),
    )
    for n, c in enumerate(classes):
        row, first = n % rows, (n // rows) * (len(block) + 1)
        for j, i in enumerate(support[c]):
            ax = _image_axes(fig, grid[row, first + j], sx[i])
            if j == 0:
                ax.text(
                    -0.12,
                    0.5,
                    f"label {c}",
                    transform=ax.transAxes,
                    rotation=90,
                    ha="right",
                    va="center",
                    fontsize=8,
                )
            if row == 0 and j == 0:
                ax.set_title("support", fontsize=8, loc="left")
        for j, i in enumerate(query[c][:shown]):
            ax = _image_axes(fig, grid[row, first + shots + 1 + j], qx[i])
            if row == 0 and j == 0:
                ax.set_title("queries", fontsize=8, loc="left")
            for k, (name, p) in enumerate(preds.items()):
                ok = int(p[i]) == int(qy[i])
                ax.text(
                    0.5,
                    -0.06 - 0.17 * k,
                    f"{label(name)}: {int(p[i])}",
                    transform=ax.transAxes,
                    ha="center",
                    va="top",
                    fontsize=6,
                    color="black" if ok else WRONG,
                )
    fig.suptitle(title, fontsize=8, y=1 - 0.15 / fig.get_figheight(), va="top")
    return fig


def _image_axes(fig: plt.Figure, cell: Any, x: torch.Tensor) -> Axes:
    ax = fig.add_subplot(cell)
    ax.imshow(_image(x), cmap="gray")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _image(x: torch.Tensor) -> Any:
    x = x.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


# --- adaptation curves ------------------------------------------------------------------------------


def adaptation_figure(summary: dict[str, Any]) -> plt.Figure:
    """The test metric against the number of inner steps: per model the mean over the test tasks
    with its 95% band. A model whose adaptation diverged is drawn up to the last finite step and
    marked where it diverged."""
    metric, higher = primary_metric(summary["task"])
    scale, ylabel = _scale(metric)
    fig, ax = plt.subplots(figsize=(5.6, 4.2), layout="constrained")
    ev = summary.get("eval", {})
    lows: list[float] = []
    notes: list[tuple[int, str | None]] = []
    for name in ordered(list(summary["models"])):
        entry = summary["models"][name]["metrics"][metric]
        curve = entry["curve"]
        diverged = entry.get("diverged_at_step")
        points = [
            (s, m * scale, (ci or 0.0) * scale)
            for s, m, ci in zip(curve["steps"], curve["mean"], curve["ci95"])
            if m is not None and (diverged is None or s < diverged)
        ]
        c = color(name)
        text = label(name) if diverged is None else f"{label(name)} (diverged at step {diverged})"
        if points:
            s, m, ci = (list(v) for v in zip(*points))
            ax.plot(s, m, marker="o", ms=3, color=c, label=text)
            low = [mm - cc for mm, cc in zip(m, ci)]
            lows += [v for v in low + m if v > 0]
            ax.fill_between(s, low, [mm + cc for mm, cc in zip(m, ci)], color=c, alpha=0.2, lw=0)
        else:
            ax.plot([], [], marker="o", ms=3, color=c, label=text)
        if diverged is not None:
            notes.append((int(diverged), c))
    if metric == "mse":
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(_PlainLog())
        ax.yaxis.set_minor_formatter(_PlainLog(minor_thresholds=(1.5, 0.5)))
        if lows:  # a band reaching zero runs off the bottom of the log axis
            ax.set_ylim(bottom=min(lows) * 0.8)
    for k, c in notes:  # the step where the curve leaves the finite numbers, off the top of the chart
        ax.axvline(k, color=c, ls="--", lw=1)
        ax.plot([k], [0.97], marker="X", ms=8, color=c, transform=ax.get_xaxis_transform(), clip_on=False)
        ax.annotate(
            f"diverged at step {k}",
            xy=(k, 0.92),
            xycoords=("data", "axes fraction"),
            color=c,
            rotation=90,
            ha="right",
            va="top",
            fontsize=7,
        )
    trained = summary.get("hparams", {}).get("meta.inner_steps")
    if trained is not None:
        ax.axvline(trained, color="gray", ls=":", lw=1)
        ax.annotate(
            f"meta-trained with {trained} step{'s' if trained != 1 else ''}",
            xy=(trained, 0.03),
            xycoords=("data", "axes fraction"),
            color="gray",
            rotation=90,
            ha="left",
            va="bottom",
            fontsize=7,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("inner steps on the support set at test")
    ax.set_ylabel(f"query {ylabel}")
    where = f" on {ev['tasks']} {ev['split']} tasks" if {"tasks", "split"} <= set(ev) else ""
    better = "higher" if higher else "lower"
    ax.set_title(
        f"{summary.get('dataset', '')}: query {metric}{where}\n(mean and 95% CI; {better} is better)",
        fontsize=9,
    )
    fig.legend(loc="outside lower center", ncol=_legend_columns(ax), fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    return fig


class _PlainLog(LogFormatter):
    """Log-axis labels as plain numbers (0.3, 2) rather than 3 x 10^-1; the same ticks get labels."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _legend_columns(ax: Axes) -> int:
    """All entries on one row when they are short, else one per row."""
    texts = ax.get_legend_handles_labels()[1]
    return len(texts) if sum(len(t) for t in texts) <= 60 else 1


# --- studies ------------------------------------------------------------------------------------------


def study_figure(
    rows: Sequence[dict[str, Any]], x_label: str, metric: str, higher_is_better: bool
) -> plt.Figure:
    """A study's answer: the metric of each model against a numeric setting.

    ``rows`` are ``{"x", "model", "mean", "ci95"}`` (optionally ``"n"``, the number of seeds), one
    per model and setting, in the units of ``summary.json`` (accuracy as a fraction; shown in %).
    ``x`` is a number, or a name (e.g. the distilled layer), then shown in order of appearance.
    ``model`` is a stage name or its label. Each point is a mean over seeds with its 95%
    t-interval as error bar (none with one seed). The x axis is logarithmic when the settings span
    more than a decade. Points of the three models are nudged sideways by a hair so that their bars
    do not hide each other; the ticks sit at the true settings.
    """
    if not rows:
        raise ValueError("study_figure needs at least one row")
    scale, ylabel = _scale(metric)
    models = ordered([str(r["model"]) for r in rows])
    numeric = all(isinstance(r["x"], int | float) and not isinstance(r["x"], bool) for r in rows)
    names = [] if numeric else list(dict.fromkeys(str(r["x"]) for r in rows))

    def at(r: dict[str, Any]) -> float:  # a category (e.g. a layer's name) sits at its index
        return float(r["x"]) if numeric else float(names.index(str(r["x"])))

    xs = sorted({at(r) for r in rows})
    log_x = numeric and xs[0] > 0 and xs[-1] / xs[0] > 10
    span = math.log10(xs[-1] / xs[0]) if log_x else (xs[-1] - xs[0]) or 1.0
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    missing: list[tuple[float, str]] = []
    for i, model in enumerate(models):
        shift = 0.012 * span * (i - (len(models) - 1) / 2)
        mine = sorted((r for r in rows if str(r["model"]) == model), key=at)
        ok = [r for r in mine if r.get("mean") is not None and math.isfinite(r["mean"])]
        missing += [(at(r), model) for r in mine if r not in ok]
        x = [at(r) * 10**shift if log_x else at(r) + shift for r in ok]
        y = [r["mean"] * scale for r in ok]
        err = [_finite_or_nan(r.get("ci95")) * scale for r in ok]
        ax.errorbar(
            x, y, yerr=err, marker="o", ms=4, capsize=3, lw=1.3, color=color(model), label=label(model)
        )
    for x, model in missing:
        ax.annotate(
            "not finite",
            xy=(x, 0.02),
            xycoords=("data", "axes fraction"),
            color=color(model),
            rotation=90,
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if log_x:
        ax.set_xscale("log")
    if not numeric:
        ax.xaxis.set_major_locator(FixedLocator(xs))
        long = max(len(n) for n in names) > 8
        ax.set_xticklabels(names, rotation=30 if long else 0, ha="right" if long else "center")
    elif len(xs) <= 12:
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([_compact(x) for x in xs])
    elif all(x == int(x) for x in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    seeds = {r.get("n") for r in rows} - {None}
    over = f"{seeds.pop()} seeds" if len(seeds) == 1 else "seeds"
    ax.set_xlabel(x_label)
    ax.set_ylabel(ylabel)
    better = "higher" if higher_is_better else "lower"
    ax.set_title(
        f"{metric} against {x_label}\n(mean over {over}, 95% t-interval; {better} is better)", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def study_figure_at(
    rows: Sequence[dict[str, Any]],
    x_label: str,
    metric: str,
    higher_is_better: bool,
    step: int,
    names: Sequence[Any] | None = None,
) -> plt.Figure:
    """A study's figure after ``step`` inner steps; ``names`` (settings without a numeric value, in
    sweep order) are placed at 0..n-1 as unordered points and bars, without connecting lines."""
    if names is not None:  # the settings' names at positions 0..n-1 (a linear axis)
        at = {x: i for i, x in enumerate(names)}
        rows = [{**r, "x": at[r["x"]]} for r in rows]
    fig = study_figure(rows, x_label, metric, higher_is_better)
    ax = fig.axes[0]
    steps_text = f" after {step} inner step{'' if step == 1 else 's'} against "
    ax.set_title(ax.get_title().replace(" against ", steps_text, 1), fontsize=9)
    if names is not None:
        for line in ax.get_lines():
            line.set_linestyle("none")
        ax.set_xticks(list(at.values()), [str(x) for x in at], rotation=30, ha="right", fontsize=7)
        fig.tight_layout()
    return fig


def _finite_or_nan(value: float | None) -> float:
    return float("nan") if value is None or not math.isfinite(value) else float(value)


def _compact(x: float) -> str:
    """Tick labels such as 40, 1.2k, 25k, 1.1M."""
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suffix}"
    return f"{x:g}"


def close(*figs: plt.Figure) -> None:
    for fig in figs:
        plt.close(fig)
