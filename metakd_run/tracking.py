"""TensorBoard and console output: the pipeline hands metrics here, the meta core never does."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summary


class Tracker:
    """One TensorBoard run per experiment run, written into the run folder itself.

    HParams are written into this same run (not the sub-run that ``add_hparams`` creates), so the
    HParams tab links the hyperparameters to the scalars the run logged.
    """

    def __init__(self, log_dir: str | Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = SummaryWriter(log_dir=str(log_dir)) if enabled else None

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        if self.writer is None:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def text(self, tag: str, body: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, body)

    def figure(self, tag: str, fig: Any, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_figure(tag, fig, step, close=False)

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Final metrics as scalars plus the HParams plugin's summaries, in this run."""
        if self.writer is None:
            return
        clean = {k: _hparam_value(v) for k, v in params.items()}
        exp, ssi, sei = hparams_summary(clean, dict(metrics))
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _hparam_value(v: Any) -> Any:
    """HParams accept numbers, strings and bools; lists and None become strings."""
    if isinstance(v, bool | int | float | str):
        return v
    return str(v)
