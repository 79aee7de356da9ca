"""What every meta-learner (MAML, ProtoNet, CNP, pretrain) holds: a model, its kind of task, the
``meta`` config, the parameters an inner loop adapts, and the strategy that runs a meta-batch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metakd_run.config import MetaConfig
from metakd_run.meta.auto import device_of
from metakd_run.meta.losses import TASK_LOSS, Params, accuracy, losses_per_task
from metakd_run.meta.strategies import Strategy, make_strategy


class MetaLearner(nn.Module):
    """The shared state and plumbing; subclasses write the algorithm (adapt, task losses, curves)."""

    inner_loop = True  # whether the family adapts by inner steps (feedforward.py's families do not)

    def __init__(self, model: nn.Module, task: str, cfg: MetaConfig, adapted: list[str]) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.task = task
        self.adapted = adapted
        # ``auto`` depends on the device, known only once the model has been moved there, so the
        # strategy is made at first use on each device (and checked now, for a bad choice).
        make_strategy(cfg.batching, cfg.chunk, model, task, adapted)
        self._strategies: dict[torch.device, Strategy] = {}
        # pixels of one task's images, support and query (0: unknown); ``auto`` weighs a conv
        # model's per-task work with it (resolve_batching). Set by the builder before first use.
        self.task_pixels = 0
        # how far the current stage is (0 at its first meta-iteration, 1 after it): schedules that
        # depend on it (MAML++'s) read it; outside training it is 1, the schedules' final state
        self.progress = 1.0

    def throughput_unit(self) -> tuple[str, int]:
        """What one training iteration processes, for the stage's throughput: ``meta_batch`` tasks
        here; the pretrain family's iterations are mini-batches of images instead."""
        return "tasks", self.cfg.meta_batch

    def query_loss(
        self,
        out: Tensor,
        y: Tensor,
        features: Mapping[str, Tensor] | None = None,  # noqa: ARG002 - CNP's NLL reads its sigma
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The plain task loss of ONE task on its labelled query points (the first ``len(y)`` outputs)
        and, for classification, its accuracy. Every family but the CNP's regression scores so."""
        out = out[: y.shape[0]]
        loss = TASK_LOSS[self.task](out, y)
        aux = {"task_loss": loss}
        if self.task == "classification":
            aux["accuracy"] = accuracy(out, y)
        return loss, aux

    def query_losses(
        self,
        out: Tensor,
        y: Tensor,
        features: Mapping[str, Tensor] | None = None,  # noqa: ARG002 - CNP's NLL reads its sigma
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """:meth:`query_loss` of every task at once: ``out [T, B(+U), ...]``, ``y [T, B]`` -> ``[T]``."""
        out = out[:, : y.shape[1]]
        losses = losses_per_task(self.task, out, y)
        aux = {"task_loss": losses}
        if self.task == "classification":
            aux["accuracy"] = accuracy(out, y)
        return losses, aux

    def begin_iteration(self, iteration: int, total: int) -> None:
        """Called by the training loop before each meta-iteration (0-based) of a stage of ``total``."""
        self.progress = iteration / max(total, 1)

    @property
    def strategy(self) -> Strategy:
        """How the tasks go through (``meta.batching``), resolved for the model's current device."""
        device = device_of(self.model)
        if device not in self._strategies:
            cfg = self.cfg
            self._strategies[device] = make_strategy(
                cfg.batching, cfg.chunk, self.model, self.task, self.adapted, device, self.task_pixels
            )
        return self._strategies[device]

    @property
    def batching(self) -> str:
        """The strategy in use (``meta.batching``, with ``auto`` resolved for this model and device)."""
        return self.strategy.name

    @property
    def chunk(self) -> int:
        """Tasks per piece of a meta-batch (0: all at once)."""
        return self.strategy.chunk

    def params(self) -> Params:
        """The meta-parameters as a dict (the live ``nn.Parameter`` objects, so grads land on them)."""
        return dict(self.model.named_parameters())

    def lrs(self) -> dict[str, Tensor | float]:
        """The inner rates of the adapted parameters (none by default)."""
        return {}

    def frozen(self) -> tuple[Params, dict[str, Tensor | float]]:
        """Detached parameters and rates, for adaptation that must build no graph."""
        lrs = {n: (r.detach() if isinstance(r, Tensor) else r) for n, r in self.lrs().items()}
        return {n: p.detach() for n, p in self.params().items()}, lrs

    def adapt_frozen(self, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """ONE task's parameters, adapted from a detached copy with ``steps`` inner steps: builds no
        graph. The one way a trained model is adapted outside training (the API, the evaluation
        protocols, the figures' examples), so they cannot disagree."""
        params, lrs = self.frozen()
        with torch.no_grad():
            return self.adapt(params, lrs, support_x, support_y, steps=steps, create_graph=False)

    @torch.no_grad()
    def predict(self, params: Params, x: Tensor) -> Tensor:
        """The model's outputs on ``x`` with ``params`` (adapted, or the meta-learned ones)."""
        return functional_call(self.model, params, (x,))[0]
