"""Experiment tracking: the pipeline hands metrics here, the meta core never does.

``Tracker`` is the one face the pipeline talks to; the ``logger`` config group picks what is behind
it: TensorBoard event files in ``<run folder>/tb/``, one TensorBoard run per model
(``logger=tensorboard``, the default), an MLflow run
(``logger=mlflow``: a local store in the run folder, or a tracking server a team shares), or nothing
(``logger=none``). Each backend gets the same scalars, hyperparameters, final metrics, text and figures.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from metakd_run.config import ConfigError, Stage


class Backend(Protocol):
    """What a tracking backend implements; every method may be called any number of times."""

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None: ...

    def text(self, tag: str, body: str) -> None: ...

    def figure(self, tag: str, fig: Any, step: int) -> None: ...

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


# TensorBoard: one run per model under <run folder>/tb/, with the same tags in each, so that every page
# colours the models apart and names them in its legend; what belongs to no one model (figures, the
# config, comparisons between models, the final metrics' table) goes to the run "tb/run".
TB_DIR = "tb"
SHARED_RUN = "run"
MODEL_RUNS = tuple(stage.value for stage in Stage)
# The Custom Scalars tab: (category, chart, tag regex). A chart enters the layout once a tag it draws
# has been logged, so a regression run shows no empty accuracy chart and a run without learned
# distillation no empty weight-and-temperature chart.
CHARTS = (
    ("models compared", "meta-training loss", r"^train/loss$"),
    ("models compared", "meta-training task loss (query set)", r"^train/task_loss$"),
    ("models compared", "meta-training accuracy (query set)", r"^train/accuracy$"),
    ("models compared", "validation mse", r"^val/mse$"),
    ("models compared", "validation accuracy", r"^val/accuracy$"),
    ("models compared", "test mse against inner steps", r"^test_mse_by_step/mean$"),
    ("models compared", "test accuracy against inner steps", r"^test_accuracy_by_step/mean$"),
    ("models compared", "outer learning rate", r"^train/outer_lr$"),
    ("distillation", "distillation term", r"^train/kd_loss$"),
    ("distillation", "learned distillation weight and temperature", r"^train/kd_(weight|temperature).*$"),
)
# The HParams tab's metric columns: the last point of these curves in each model's run (the test
# metric after the last inner step, the last validation metric, the last training loss). Final
# metrics are not logged as one-point scalar charts; their full table is the text "final_metrics".
HPARAMS_METRICS = (
    "test_accuracy_by_step/mean",
    "test_mse_by_step/mean",
    "val/accuracy",
    "val/mse",
    "train/loss",
)


class TensorBoardBackend:
    """TensorBoard event files under ``<run folder>/tb/``: one run per model plus ``tb/run``.

    A tag's first part names its model (``teacher/train/loss``): the rest (``train/loss``) is logged
    in that model's run, so the teacher, the distilled and the baseline student share every chart
    in their own colours. Other tags (``eval/test_tasks``, ``paired/...``) go to ``tb/run``. Each
    model's run is also an HParams session, with the hyperparameters, ``model`` and the metrics of
    ``HPARAMS_METRICS``, so a sweep's HParams tab compares jobs model by model.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.root = Path(log_dir) / TB_DIR
        self.writers: dict[str, Any] = {}
        self.tags: dict[str, set[str]] = {}  # per run, the scalar tags logged by this process
        self.charts: tuple[tuple[str, str, str], ...] = ()  # those in the layout written last

    def _writer(self, run: str) -> Any:
        if run not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.root / run
            # A resumed run (train.resume=, a requeued job) keeps the charts of what it logged before.
            self.tags[run] = _logged_scalar_tags(folder) if run in MODEL_RUNS else set()
            self.writers[run] = SummaryWriter(log_dir=str(folder))
        return self.writers[run]

    def _route(self, tag: str) -> tuple[str, str]:
        """(run, tag in that run): ``teacher/train/loss`` -> (``teacher``, ``train/loss``)."""
        head, _, rest = tag.partition("/")
        return (head, rest) if head in MODEL_RUNS and rest else (SHARED_RUN, tag)

    def scalars(self, prefix: str, metrics: Mapping[str, float], step: int) -> None:
        for k, v in metrics.items():
            run, tag = self._route(f"{prefix}/{k}")
            self._writer(run).add_scalar(tag, v, step)
            self.tags[run].add(tag)
        self._update_layout()

    def _update_layout(self) -> None:
        """Rewrite the Custom Scalars layout when a chart gains its first data (the last one wins)."""
        logged = set().union(*(self.tags[run] for run in MODEL_RUNS if run in self.tags))
        charts = tuple(c for c in CHARTS if any(re.match(c[2], t) for t in logged))
        if charts == self.charts:
            return
        layout: dict[str, dict[str, list]] = {}
        for category, title, regex in charts:
            layout.setdefault(category, {})[title] = ["Multiline", [regex]]
        self._writer(SHARED_RUN).add_custom_scalars(layout)
        self.charts = charts

    def text(self, tag: str, body: str) -> None:
        self._writer(SHARED_RUN).add_text(tag, body)

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self._writer(SHARED_RUN).add_figure(tag, fig, step, close=False)

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """An HParams session per model run (its metrics: the last points of ``HPARAMS_METRICS``);
        the final metrics themselves as one table in the Text tab of ``tb/run``."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        models = [run for run in MODEL_RUNS if run in self.tags or (self.root / run).is_dir()]
        for run in models:  # one logged before a resume only: its tags are read back with its writer
            self._writer(run)
        logged = set().union(*(self.tags[run] for run in models))
        columns = {tag: 0.0 for tag in HPARAMS_METRICS if tag in logged}  # values: read from the curves
        for run in models:
            clean = {k: _hparam_value(v) for k, v in params.items()}
            exp, ssi, sei = hparams_summary({"model": run, **clean}, columns)
            file_writer = self._writer(run)._get_file_writer()
            for summary in (exp, ssi, sei):
                file_writer.add_summary(summary)
        if metrics:
            self.text("final_metrics", _metrics_table(metrics))

    def close(self) -> None:
        for writer in self.writers.values():
            writer.flush()
            writer.close()
        self.writers = {}


def _logged_scalar_tags(folder: Path) -> set[str]:
    """The scalar tags already in a model run's event files (scalars only: cheap to read)."""
    if not any(folder.glob("events.out.tfevents.*")):
        return set()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 1, "tensors": 1})
    return set(accumulator.Reload().Tags()["scalars"])


def _metrics_table(metrics: Mapping[str, float]) -> str:
    """``final/<row>/<column>`` values as a markdown table: a row per model (or comparison), a column
    per metric and inner step."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        row, _, column = key.removeprefix("final/").rpartition("/")
        rows.setdefault(row or "-", {})[column] = value
    columns = sorted({c for r in rows.values() for c in r}, key=_step_order)
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, values in rows.items():
        cells = [f"{values[c]:.4g}" if c in values else "" for c in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step_order(column: str) -> tuple[str, int]:
    """``mse_step_10`` after ``mse_step_2``."""
    name, _, step = column.rpartition("_step_")
    return (name, int(step)) if step.isdigit() else (column, -1)


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
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient  # noqa: F401 - the client _start builds
        except ImportError as err:
            raise ConfigError(
                f"logger=mlflow needs MLflow, which cannot be imported ({err}): "
                'pip install "metakd-run[mlflow]" (in a checkout: pip install -e ".[mlflow]"), '
                "or choose logger=tensorboard"
            ) from err
        run_dir = Path(run_dir)
        self.uri = tracking_uri or (run_dir / "mlruns").resolve().as_uri()
        _check_reachable(self.uri)
        try:
            self._start(run_dir, experiment_name, run_name)
        except MlflowException as err:  # a server that answers but refuses: before training, one line
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"logger.tracking_uri={self.uri}: MLflow could not start the run ({message}); fix the "
                "server or choose another logger"
            ) from err

    def _start(self, run_dir: Path, experiment_name: str, run_name: str | None) -> None:
        """Create this run's MLflow run, or reopen it when the run folder is resumed."""
        from mlflow.tracking import MlflowClient

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


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """An ``http(s)`` tracking server that does not accept a connection is one line, in seconds.

    MLflow's client retries a refused connection with backoff for minutes, then raises a traceback;
    the backend is built before the first iteration, so this fails before any training instead.
    """
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ConfigError(
            f"logger.tracking_uri={uri} does not answer ({reason}): start the MLflow server, fix the "
            "address, or set logger.tracking_uri=null (a store in the run folder)"
        ) from err


def _mlflow_key(key: str) -> str:
    """MLflow names allow letters, digits and ``_-. /``; anything else becomes ``_``."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _hparam_value(v: Any) -> Any:
    """HParams accept numbers, strings and bools; lists and None become strings."""
    if isinstance(v, bool | int | float | str):
        return v
    return str(v)
