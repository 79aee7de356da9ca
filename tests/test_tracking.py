"""Tracking backends: TensorBoard stays the default; MLflow logs the same things to a real
``mlflow server`` (started on 127.0.0.1 for this module) or to a local store in the run folder."""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.custom_scalar import layout_pb2  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402

from metakd_run.config import ConfigError  # noqa: E402
from metakd_run.tracking import MLflowBackend, TensorBoardBackend, Tracker  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``mlflow server`` on a free port of 127.0.0.1 (bounded wait), stopped with its workers at the end."""
    pytest.importorskip("mlflow", reason="logger=mlflow needs pip install '.[mlflow]'")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    log = (root / "server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", str(root / "store"), "--artifacts-destination", str(root / "artifacts"),
           "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server did not come up: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.25)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def _log_a_run(tracker: Tracker) -> None:
    """What the pipeline logs: training scalars, validation, the config, figures, hparams + final metrics."""
    tracker.scalars("teacher/train", {"loss": 1.5, "outer_lr": 0.001}, 3)
    tracker.scalars("teacher/train", {"loss": 1.0, "outer_lr": 0.0005}, 6)
    tracker.scalars("teacher/val", {"mse": 0.9}, 6)
    tracker.text("config", "```yaml\nseed: 0\n```")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    tracker.figure("eval/test_tasks", fig)
    plt.close(fig)
    tracker.hparams(
        {"meta.inner_lr": 0.01, "teacher": "mlp-40-40", "eval.report_steps": [0, 1], "kd.taps": None},
        {"final/teacher/mse_step_1": 0.5},
    )


def _run_id(run_dir: Path) -> str:
    return (run_dir / "mlflow_run.txt").read_text().split()[1]


def test_mlflow_server_gets_scalars_params_final_metrics_and_figures(mlflow_server: str, tmp_path: Path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "multirun" / "3"
    logger = {"backend": "mlflow", "tracking_uri": mlflow_server, "experiment_name": "metakd-test"}
    tracker = Tracker(run_dir, logger=logger)
    assert isinstance(tracker.backend, MLflowBackend)
    _log_a_run(tracker)
    tracker.close()

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(_run_id(run_dir))
    assert run.info.status == "FINISHED" and run.info.run_name == "multirun/3"
    assert client.get_experiment(run.info.experiment_id).name == "metakd-test"
    assert run.data.params["meta.inner_lr"] == "0.01" and run.data.params["eval.report_steps"] == "[0, 1]"
    assert run.data.params["kd.taps"] == "None"
    assert run.data.metrics["final/teacher/mse_step_1"] == 0.5
    history = client.get_metric_history(run.info.run_id, "teacher/train/loss")
    assert [(m.step, m.value) for m in history] == [(3, 1.5), (6, 1.0)]
    assert client.get_metric_history(run.info.run_id, "teacher/val/mse")[0].step == 6
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.md", "figures"} <= artifacts
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert figures == ["figures/eval_test_tasks.png"]
    local = Path(client.download_artifacts(run.info.run_id, "figures/eval_test_tasks.png", str(tmp_path)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a resumed run (train.resume=, a requeued SLURM job) logs on into the same MLflow run
    again = Tracker(run_dir, logger=logger)
    again.scalars("teacher/train", {"loss": 0.5, "outer_lr": 0.0001}, 9)
    _log_a_run(again)  # the same params again: logged once, no conflict
    again.close()
    assert _run_id(run_dir) == run.info.run_id
    history = client.get_metric_history(run.info.run_id, "teacher/train/loss")
    assert sorted(m.step for m in history) == [3, 3, 6, 6, 9]
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_mlflow_without_a_server_keeps_a_store_in_the_run_folder(tmp_path: Path):
    pytest.importorskip("mlflow", reason="logger=mlflow needs pip install '.[mlflow]'")
    from mlflow.tracking import MlflowClient

    tracker = Tracker(tmp_path / "run", logger={"backend": "mlflow", "experiment_name": "local"})
    _log_a_run(tracker)
    tracker.close()
    store = tmp_path / "run" / "mlruns"
    assert store.is_dir()
    run = MlflowClient(tracking_uri=store.as_uri()).get_run(_run_id(tmp_path / "run"))
    assert run.data.metrics["teacher/val/mse"] == 0.9 and run.info.status == "FINISHED"


def test_tensorboard_stays_the_default_and_none_logs_nothing(tmp_path: Path):
    tracker = Tracker(tmp_path / "tb")
    assert isinstance(tracker.backend, TensorBoardBackend)
    _log_a_run(tracker)
    tracker.close()
    runs = {p.parent.name for p in (tmp_path / "tb").glob("tb/*/events.out.tfevents.*")}
    assert runs == {"teacher", "run"}  # the one model logged, and the run's figures and text
    off = Tracker(tmp_path / "off", logger={"backend": "none"})
    _log_a_run(off)
    off.close()
    quiet = Tracker(tmp_path / "rank1", enabled=False, logger={"backend": "mlflow"})  # other ranks
    _log_a_run(quiet)
    quiet.close()
    assert not (tmp_path / "off").exists() and not (tmp_path / "rank1").exists()


def test_logger_options_and_a_bad_backend():
    for name, backend in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("none", "none")):
        assert OmegaConf.load(CONFIGS / "logger" / f"{name}.yaml").backend == backend
    mlflow_cfg = OmegaConf.load(CONFIGS / "logger" / "mlflow.yaml")
    assert {"tracking_uri", "experiment_name"} <= set(mlflow_cfg)  # what differs from the schema
    from metakd_run.config import LoggerConfig

    schema = {f.name for f in dataclasses.fields(LoggerConfig)}
    assert {"tracking_uri", "experiment_name", "run_name"} <= schema
    with pytest.raises(ConfigError, match="logger.backend='wandb' is invalid"):
        Tracker("unused", logger={"backend": "wandb"})


def test_a_typed_logger_config_picks_the_backend_too(tmp_path: Path):
    """The typed config hands a dataclass (with an Enum backend) rather than a mapping."""

    class Kind(enum.Enum):
        none = "none"
        tensorboard = "tensorboard"

    @dataclasses.dataclass
    class LoggerConfig:
        backend: Kind = Kind.tensorboard
        tracking_uri: str | None = None

    assert isinstance(Tracker(tmp_path / "a", logger=LoggerConfig()).backend, TensorBoardBackend)
    assert Tracker(tmp_path / "b", logger=LoggerConfig(Kind.none)).backend is None


STAGES = ("teacher", "student_kd", "student_base")


def _log_three_models(tracker: Tracker, metric: str) -> None:
    """What the pipeline logs for the three models of a run whose metric is ``metric``."""
    for i, name in enumerate(STAGES):
        for step in (5, 10):
            train = {"loss": 1.0 / step + i, "task_loss": 0.5 / step, "outer_lr": 0.001}
            if metric == "accuracy":
                train["accuracy"] = 0.1 * step
            if name == "student_kd":
                train["kd_loss"] = 0.2
            tracker.scalars(f"{name}/train", train, step)
            tracker.scalars(f"{name}/val", {metric: 0.3 + i}, step)
        for inner in (0, 1, 3):
            tracker.scalars(f"{name}/test_{metric}_by_step", {"mean": 2.0 - inner * 0.1 - i}, inner)
    fig, ax = plt.subplots()
    tracker.figure("eval/test_tasks", fig)
    plt.close(fig)
    tracker.text("config", "seed: 0")
    final = {f"final/{n}/{metric}_step_{s}": 2.0 - s * 0.1 - i for i, n in enumerate(STAGES) for s in (0, 3)}
    final["final/gap_closed/mse_step_3"] = 0.25
    tracker.hparams({"meta.inner_lr": 0.01, "eval.report_steps": [0, 3]}, final)
    tracker.close()


def _accumulator(path: Path) -> EventAccumulator:
    return EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "images": 0}).Reload()


def _layout(run_dir: Path) -> dict[str, list[str]]:
    """The Custom Scalars layout: chart title -> its tag regexes."""
    ea = _accumulator(run_dir / "tb" / "run")
    proto = layout_pb2.Layout.FromString(
        ea.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    )
    return {c.title: list(c.multiline.tag) for cat in proto.category for c in cat.chart}


def test_tensorboard_has_one_run_per_model_with_the_same_tags(tmp_path: Path):
    """The Scalars and Time Series pages colour runs apart and name them in the legend: each model is
    a run of its own under tb/, its tags without the model's name, the same in all three."""
    _log_three_models(Tracker(tmp_path), "mse")
    tb = tmp_path / "tb"
    assert {p.name for p in tb.iterdir()} == {*STAGES, "run"}
    tags = {name: set(_accumulator(tb / name).Tags()["scalars"]) for name in STAGES}
    common = {"train/loss", "train/task_loss", "train/outer_lr", "val/mse", "test_mse_by_step/mean"}
    assert all(tags[name] - {"train/kd_loss"} == common for name in STAGES), tags
    assert tags["student_kd"] == common | {"train/kd_loss"}
    val = _accumulator(tb / "student_base").Scalars("val/mse")
    assert [(e.step, round(e.value, 5)) for e in val] == [(5, 2.3), (10, 2.3)]
    shared = _accumulator(tb / "run")
    assert shared.Tags()["scalars"] == []  # no final/* one-point charts anywhere
    assert "eval/test_tasks" in shared.Tags()["images"]
    assert {"config/text_summary", "final_metrics/text_summary"} <= set(shared.Tags()["tensors"])
    table = shared.Tensors("final_metrics/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| student_kd | 1 | 0.7 |" in table and "| gap_closed |" in table


def test_each_model_run_is_an_hparams_session_whose_metrics_are_its_curves(tmp_path: Path):
    """The HParams tab reads a metric's value from the session's own run: every declared metric
    must be a tag logged there, and its last point is the final value."""
    _log_three_models(Tracker(tmp_path), "mse")
    for i, name in enumerate(STAGES):
        ea = _accumulator(tmp_path / "tb" / name)
        content = ea.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = start.session_start_info.hparams
        assert hparams["model"].string_value == name and hparams["meta.inner_lr"].number_value == 0.01
        assert hparams["eval.report_steps"].string_value == "[0, 3]"
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
        metrics = [m.name.tag for m in experiment.experiment.metric_infos]
        assert metrics == ["test_mse_by_step/mean", "val/mse", "train/loss"]
        assert set(metrics) <= set(ea.Tags()["scalars"])
        last = ea.Scalars("test_mse_by_step/mean")[-1]
        assert (last.step, round(last.value, 6)) == (3, round(1.7 - i, 6))


def test_custom_scalars_show_only_charts_that_have_data(tmp_path: Path):
    """A regression run has no accuracy and a run without learned distillation no kd weight: no
    empty chart for either; a classification run gets its accuracy charts."""
    _log_three_models(Tracker(tmp_path / "reg"), "mse")
    regression = _layout(tmp_path / "reg")
    assert not any("accuracy" in title for title in regression)
    assert "learned distillation weight and temperature" not in regression
    assert {
        "meta-training loss",
        "validation mse",
        "test mse against inner steps",
        "distillation term",
    } <= set(regression)
    tags = set().union(*(_accumulator(tmp_path / "reg" / "tb" / n).Tags()["scalars"] for n in STAGES))
    for title, regexes in regression.items():  # every chart draws something
        assert any(re.match(r, t) for r in regexes for t in tags), title
    _log_three_models(Tracker(tmp_path / "cls"), "accuracy")
    classification = _layout(tmp_path / "cls")
    assert {"meta-training accuracy (query set)", "validation accuracy"} <= set(classification)
    assert "validation mse" not in classification


def test_a_resumed_run_keeps_the_charts_of_what_it_logged_before(tmp_path: Path):
    """train.resume= (or a requeued job) logs on into the same folders: the Custom Scalars layout,
    whose last version wins, must still hold the charts of the stages finished before the stop."""
    first = Tracker(tmp_path)
    first.scalars("teacher/train", {"loss": 1.0, "outer_lr": 0.001}, 5)
    first.scalars("student_kd/train", {"loss": 1.0, "kd_loss": 0.2, "kd_weight": 3.0}, 5)
    first.close()
    again = Tracker(tmp_path)  # the student_kd stage had finished: only the baseline and the test log now
    again.scalars("student_base/train", {"loss": 1.2}, 5)
    again.scalars("student_kd/test_mse_by_step", {"mean": 0.5}, 1)
    again.hparams({"seed": 0}, {"final/student_kd/mse_step_1": 0.5})
    again.close()
    layout = _layout(tmp_path)
    assert {"distillation term", "learned distillation weight and temperature"} <= set(layout)
    assert {"meta-training loss", "test mse against inner steps"} <= set(layout)
    for name in STAGES:  # every model logged in either process is an HParams session
        content = _accumulator(tmp_path / "tb" / name).PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in content, name
