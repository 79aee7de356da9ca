"""Figures for the run folder and TensorBoard: test tasks with predictions, adaptation curves."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from metakd_run.data.tasks import TaskBatch  # noqa: E402
from metakd_run.meta.maml import MAML  # noqa: E402

COLORS = {"teacher": "tab:blue", "student_kd": "tab:orange", "student_base": "tab:green"}


def _adapted(learner: MAML, sx: torch.Tensor, sy: torch.Tensor, steps: int) -> dict:
    with torch.no_grad():
        params = {n: p.detach() for n, p in learner.params().items()}
        lrs = {n: (r.detach() if isinstance(r, torch.Tensor) else r) for n, r in learner.lrs().items()}
        return learner.adapt(params, lrs, sx, sy, steps=steps, create_graph=False)


def _predict(learner: MAML, params: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out, _ = functional_call(learner.model, params, (x,))
    return out


def test_tasks_figure(
    learners: dict[str, MAML], batch: TaskBatch, cfg: Any, device: torch.device, dtype: torch.dtype
) -> plt.Figure:
    """A few test tasks: the data and each model's predictions before and after adaptation."""
    n = max(1, min(int(cfg.eval.plot_tasks), batch.num_tasks))
    if next(iter(learners.values())).task == "regression":
        return _regression_figure(learners, batch, n, cfg, device, dtype)
    return _episode_figure(learners, batch, cfg, device, dtype)


def _regression_figure(learners, batch, n, cfg, device, dtype):  # noqa: ANN001, ANN202
    lo, hi = cfg.dataset.x_range
    grid = torch.linspace(lo, hi, 200, dtype=dtype, device=device).view(-1, 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    steps = int(cfg.eval.steps)
    for t, ax in enumerate(axes[0]):
        sx = batch.support_x[t].to(device, dtype)
        sy = batch.support_y[t].to(device, dtype)
        amp, phase = batch.info["amplitude"][t], batch.info["phase"][t]
        ax.plot(grid.cpu(), (amp * torch.sin(grid.cpu() - phase)), color="black", lw=1.5, label="true")
        ax.scatter(sx.cpu(), sy.cpu(), color="black", marker="^", zorder=5, label="support")
        for name, learner in learners.items():
            color = COLORS.get(name, None)
            init = _adapted(learner, sx, sy, 0)
            ax.plot(grid.cpu(), _predict(learner, init, grid).cpu(), color=color, ls=":", lw=1)
            fast = _adapted(learner, sx, sy, steps)
            ax.plot(
                grid.cpu(),
                _predict(learner, fast, grid).cpu(),
                color=color,
                lw=1.3,
                label=f"{name} ({steps} steps)",
            )
        ax.set_title(f"test task {t}: A={float(amp):.2f}, phase={float(phase):.2f}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle("dotted: before adaptation; solid: after adaptation", fontsize=9)
    fig.tight_layout()
    return fig


def _episode_figure(learners, batch, cfg, device, dtype):  # noqa: ANN001, ANN202
    """The first test episode: support images, then query images with each model's prediction."""
    sx = batch.support_x[0].to(device, dtype)
    sy = batch.support_y[0].to(device)
    qx = batch.query_x[0].to(device, dtype)
    qy = batch.query_y[0]
    shown = min(10, qx.shape[0])
    preds = {}
    for name, learner in learners.items():
        fast = _adapted(learner, sx, sy, int(cfg.eval.steps))
        preds[name] = _predict(learner, fast, qx).argmax(-1).cpu()
    cols = max(sx.shape[0], shown)
    fig, axes = plt.subplots(2, cols, figsize=(1.3 * cols, 3.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(sx.shape[0]):
        axes[0][i].imshow(_image(sx[i]), cmap="gray")
        axes[0][i].set_title(f"support {int(sy[i])}", fontsize=7)
    for i in range(shown):
        axes[1][i].imshow(_image(qx[i]), cmap="gray")
        words = [f"{k[:1]}{'' if k == 'teacher' else k[-2:]}:{int(p[i])}" for k, p in preds.items()]
        ok = all(int(p[i]) == int(qy[i]) for p in preds.values())
        axes[1][i].set_title(
            f"y={int(qy[i])}\n" + " ".join(words), fontsize=6, color="green" if ok else "red"
        )
    fig.suptitle(
        "one test episode: support (top), queries with predictions (t=teacher, kd, se=baseline)", fontsize=8
    )
    fig.tight_layout()
    return fig


def _image(x: torch.Tensor) -> Any:
    x = x.detach().float().cpu()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()


def adaptation_figure(summary: dict[str, Any]) -> plt.Figure:
    """Mean test metric against the number of inner steps, one line per model."""
    models = summary["models"]
    metric = "accuracy" if summary["task"] == "classification" else "mse"
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, model in models.items():
        curve = model["metrics"][metric]["curve"]
        ax.plot(curve["steps"], curve["mean"], marker="o", ms=3, color=COLORS.get(name), label=model["label"])
    ax.set_xlabel("inner steps at test")
    ax.set_ylabel(f"query {metric}")
    if metric == "mse":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def close(*figs: plt.Figure) -> None:
    for fig in figs:
        plt.close(fig)
