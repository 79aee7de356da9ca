"""Experiment tracking: the pipeline hands metrics here, the meta core never does.

``Tracker`` is the one face the pipeline talks to; the ``logger`` config group picks what is behind
it: TensorBoard event files in the run folder (``logger=tensorboard``, the default), an MLflow run
(``logger=mlflow``: a local store in the run folder, or a tracking server a team shares), or nothing
(``logger=none``). Each backend gets the same scalars, hyperparameters, final metrics, text and figures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from metakd_run.config import ConfigError


class Backend(Protocol):
    """What a tracking backend implements; every method may be called any number of times."""

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None: ...

    def text(self, tag: str, body: str) -> None: ...

    def figure(self, tag: str, fig: Any, step: int) -> None: ...

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


MODELS = "(teacher|student_kd|student_base)"
# The Custom Scalars tab: the three models on one chart each (the Scalars page keeps one chart per tag).
COMPARISON_LAYOUT = {
    "models compared": {
        "meta-training loss": ["Multiline", [rf"^{MODELS}/train/loss$"]],
        "meta-training task loss (query set)": ["Multiline", [rf"^{MODELS}/train/task_loss$"]],
        "meta-training accuracy (query set)": ["Multiline", [rf"^{MODELS}/train/accuracy$"]],
        "validation metric": ["Multiline", [rf"^{MODELS}/val/(mse|accuracy)$"]],
        "test metric against inner steps": ["Multiline", [rf"^{MODELS}/test_(mse|accuracy)_by_step/mean$"]],
        "outer learning rate": ["Multiline", [rf"^{MODELS}/train/outer_lr$"]],
    },
    "distillation": {
        "distillation term": ["Multiline", [r"^student_kd/train/kd_loss$"]],
        "learned distillation weight and temperature": [
            "Multiline",
            [r"^student_kd/train/kd_(weight|temperature).*$"],
        ],
    },
}


class TensorBoardBackend:
    """One TensorBoard run per experiment run, written into the run folder itself.

    HParams are written into this same run (not the sub-run that ``add_hparams`` creates), so the
    HParams tab links the hyperparameters to the scalars the run logged.
    """

    def __init__(self, log_dir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_custom_scalars(COMPARISON_LAYOUT)

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def text(self, tag: str, body: str) -> None:
        self.writer.add_text(tag, body)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.writer.add_figure(tag, fig, step, close=False)

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Final metrics as scalars plus the HParams plugin's summaries, in this run."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: _hparam_value(v) for k, v in params.items()}
        exp, ssi, sei = hparams_summary(clean, dict(metrics))
        file_writer = self.writer._get_file_writer()
        for summary in (exp, ssi, sei):
            file_writer.add_summary(summary)
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, 0)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class MLflowBackend:
    """One MLflow run per experiment run, in the experiment ``experiment_name``.

    ``tracking_uri`` null keeps the store in the run folder (``<run>/mlruns``, ``mlflow ui
    --backend-store-uri <run>/mlruns`` shows it); ``http://host:5000`` logs to a tracking server. A run
    that is resumed (``train.resume=``, or a SLURM job requeued after a time limit) logs into the same
    MLflow run: its id is kept in ``<run>/mlflow_run.txt``. Figures and the config are artefacts.
    """

    def __init__(
        self, run_dir: str | Path, tracking_uri: str | None, experiment_name: str, run_name: str | None
    ) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise ConfigError(
                'logger=mlflow needs MLflow: pip install ".[mlflow]" (or choose logger=tensorboard)'
            ) from err
        run_dir = Path(run_dir)
        self.uri = tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        id_file = run_dir / "mlflow_run.txt"
        saved = id_file.read_text().split() if id_file.is_file() else []
        if len(saved) == 2 and saved[0] == self.uri:
            self.run_id = saved[1]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = self._experiment(experiment_name)
            name = run_name or "/".join(run_dir.resolve().parts[-2:])
            run = self.client.create_run(
                experiment_id, run_name=name, tags={"run_dir": str(run_dir.resolve())}
            )
            self.run_id = run.info.run_id
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(f"{self.uri} {self.run_id}\n")

    def _experiment(self, name: str) -> str:
        """The experiment's id, created if new; the jobs of a sweep may race to create it."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another job created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        self._metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step)

    def _artifacts(self) -> None:
        """MLflow resolves a server's ``mlflow-artifacts:`` store through the global tracking URI,
        not the client's: point it at this run's server before each upload."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)

    def text(self, tag: str, body: str) -> None:
        self._artifacts()
        self.client.log_text(self.run_id, body, f"{_mlflow_key(tag)}.md")

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self._artifacts()
        self.client.log_figure(self.run_id, fig, f"figures/{_mlflow_key(tag).replace('/', '_')}.png")

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params  # a resumed run logs each param once
        batch = [Param(_mlflow_key(k), str(v)) for k, v in params.items() if _mlflow_key(k) not in logged]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[start : start + 100])
        self._metrics(metrics, 0)

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")


class Tracker:
    """What the pipeline logs to: ``Tracker(run_dir, enabled=..., logger=cfg.logger)``.

    ``enabled=False`` (the ranks other than 0 of a data-parallel run) logs nothing. ``logger`` is the
    ``logger`` config group (``backend`` and its options); None means TensorBoard.
    """

    def __init__(
        self, log_dir: str | Path, enabled: bool = True, logger: Mapping[str, Any] | Any | None = None
    ) -> None:
        self.enabled = enabled
        self.backend: Backend | None = make_backend(log_dir, logger) if enabled else None

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        if self.backend is not None:
            self.backend.scalars(prefix, metrics, step)

    def text(self, tag: str, body: str) -> None:
        if self.backend is not None:
            self.backend.text(tag, body)

    def figure(self, tag: str, fig: Any, step: int = 0) -> None:
        if self.backend is not None:
            self.backend.figure(tag, fig, step)

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """Hyperparameters and the final metrics they led to."""
        if self.backend is not None:
            self.backend.hparams(params, metrics)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None


def make_backend(run_dir: str | Path, logger: Mapping[str, Any] | Any | None) -> Backend | None:
    """The backend the ``logger`` config names (TensorBoard when there is none); ``logger`` is a
    mapping (DictConfig, dict) or a dataclass such as the typed config's ``LoggerConfig``."""
    if dataclasses.is_dataclass(logger) and not isinstance(logger, type):
        logger = dataclasses.asdict(logger)
    logger = logger or {}
    kind = logger.get("backend", "tensorboard")
    kind = getattr(kind, "value", kind)  # an Enum member names its backend by its value
    if kind == "tensorboard":
        return TensorBoardBackend(run_dir)
    if kind == "mlflow":
        return MLflowBackend(
            run_dir,
            logger.get("tracking_uri"),
            logger.get("experiment_name") or "metakd-run",
            logger.get("run_name"),
        )
    if kind == "none":
        return None
    raise ConfigError(f"logger.backend={kind!r} is invalid: choose tensorboard, mlflow or none")


def _mlflow_key(key: str) -> str:
    """MLflow names allow letters, digits and ``_-. /``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _hparam_value(v: Any) -> Any:
    """HParams accept numbers, strings and bools; lists and None become strings."""
    if isinstance(v, bool | int | float | str):
        return v
    return str(v)
