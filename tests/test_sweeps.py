"""Sweeps: a joblib grid with failing cells, Optuna on submitit_local, the summary, the presets.

The end-to-end sweeps run the real console script with a budget smaller than TINY (teacher only,
a few iterations): what is checked is the sweep machinery, not the learning.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metakd_run.sweep import collect, write_summary
from tests.conftest import TINY, metakd_run_exe


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        return False


def needs(*plugins: str) -> pytest.MarkDecorator:
    """Skip one test, not the module, when a Hydra plugin it uses is not installed."""
    missing = [p for p in plugins if not _installed(f"hydra_plugins.{p}")]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install '.[sweep]')")


JOBLIB, OPTUNA, SUBMITIT = "hydra_joblib_launcher", "hydra_optuna_sweeper", "hydra_submitit_launcher"

# TINY, shortened further: the sweep tests run several jobs each.
SWEEP_TINY = [o for o in TINY if not o.startswith(("train.iterations", "train.val_every"))] + [
    "train.iterations=4",
    "train.val_every=2",
    "train.stages=[teacher]",
]


def multirun(tmp_path: Path, *overrides: str, timeout: int = 240) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path / "sweep"
    args = [*metakd_run_exe(), "--multirun", *SWEEP_TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, sweep_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@needs(JOBLIB)
def test_joblib_grid_with_a_bad_cell_and_a_diverging_cell(tmp_path: Path):
    """2x2 grid on two joblib workers: one good job, one diverging, two failing validation."""
    proc, sweep_dir = multirun(
        tmp_path, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
        "kd.weight=0.5,-1", "meta.inner_lr=0.01,1e30",
    )  # fmt: skip
    # every job ran and was summarised; the failures make the exit status 1, with one line
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("metakd-run: error: 3 of 4 sweep jobs failed") and "sweep_summary.md" in last
    rows = {r["job"]: r for r in read_csv(sweep_dir / "sweep_summary.csv")}
    assert set(rows) == {"0", "1", "2", "3"}
    assert rows["0"]["status"] == "ok" and rows["0"]["best"] == "*"
    assert (rows["0"]["kd.weight"], rows["0"]["meta.inner_lr"]) == ("0.5", "0.01")
    objective = json.loads((sweep_dir / "0" / "summary.json").read_text())["objective"]
    assert float(rows["0"]["objective"]) == pytest.approx(objective, rel=1e-5)
    assert float(rows["0"]["teacher/mse_step_1"]) > 0
    assert rows["1"]["status"] == "failed" and "meta-loss became" in rows["1"]["error"]
    for job in ("2", "3"):
        assert rows[job]["status"] == "failed" and "kd.weight" in rows[job]["error"]
    assert "train.iterations=4" in rows["2"]["overrides"]
    md = (sweep_dir / "sweep_summary.md").read_text()
    assert "| **0** ★ | ok | 0.5 | 0.01 |" in md and "must be >= 0" in md

    # TensorBoard on the sweep folder: each finished job is a run with its HParams session
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(sweep_dir))
    mux.Reload()
    content = mux.PluginRunToTagToContent("hparams")
    run = str(Path("0") / "tb" / "teacher")  # one TensorBoard run per model of each job
    assert run in content
    start = plugin_data_pb2.HParamsPluginData.FromString(content[run]["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["kd.weight"].number_value == 0.5
    assert start.session_start_info.hparams["model"].string_value == "teacher"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content[run]["_hparams_/experiment"])
    assert "test_mse_by_step/mean" in {m.name.tag for m in experiment.experiment.metric_infos}


@pytest.mark.slow
@needs(OPTUNA, SUBMITIT)
def test_optuna_search_runs_its_trials_on_submitit_local(tmp_path: Path):
    """The sinusoid preset (TPE, seeded) with two trials, each a submitit_local job."""
    proc, sweep_dir = multirun(
        tmp_path, "hparams_search=sinusoid_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
        "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(results.best_params) == {"meta.inner_lr", "meta.inner_steps", "kd.weight"}
    rows = read_csv(sweep_dir / "sweep_summary.csv")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    best = [r for r in rows if r["best"] == "*"]
    # a star only when the best trial is ahead beyond the noise (tiny trials rarely are)
    assert len(best) <= 1
    if best:
        assert float(best[0]["objective"]) == pytest.approx(results.best_value, rel=1e-5)
    # the sweeper minimised the MSE: the best trial has the lowest objective
    assert min(float(r["objective"]) for r in rows) == pytest.approx(results.best_value, rel=1e-5)
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # the jobs went through submitit


def _job(sweep: Path, name: str, overrides: list[str], summary: dict | None = None, error: str = "") -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if error:
        (job / "error.txt").write_text(error + "\n")


def _summary(task: str, objective: float) -> dict:
    metric = "accuracy" if task == "classification" else "mse"
    entry = {"step_0": {"mean": 0.2}, "step_1": {"mean": objective}, "curve": [0.2, objective]}
    return {"task": task, "objective": objective, "models": {"student_kd": {"metrics": {metric: entry}}}}


def test_summary_marks_the_highest_accuracy_and_lists_errors_and_missing_jobs(tmp_path: Path):
    _job(tmp_path, "0", ["kd.weight=0", "seed=1"], _summary("classification", 0.61))
    _job(tmp_path, "1", ["kd.weight=1", "seed=1"], _summary("classification", 0.74))
    _job(tmp_path, "2", ["kd.weight=2", "seed=1"], error="stage teacher: the meta-loss became nan")
    _job(tmp_path, "10", ["kd.weight=3", "seed=1"])  # killed: no summary, no error
    rows = collect(tmp_path)
    assert [r.job for r in rows] == ["0", "1", "2", "10"]
    assert [r.best for r in rows] == [False, True, False, False]
    assert [r.status for r in rows] == ["ok", "ok", "failed", "no result"]
    csv_path, md_path = write_summary(tmp_path, rows)
    table = read_csv(csv_path)
    assert table[1]["student_kd/accuracy_step_1"] == "0.74" and table[2]["error"].startswith("stage teacher")
    md = md_path.read_text()
    assert "highest objective" in md and "Overrides shared by every job: `seed=1`" in md
    assert "| **1** ★ | ok | 1 | 0.74 |" in md


@needs(OPTUNA, SUBMITIT, JOBLIB)
def test_presets_and_launcher_configs_compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import metakd_run.cli  # noqa: F401 - registers the structured configs
    from tests.conftest import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        img = hydra_compose("config", ["hparams_search=omniglot_optuna"], return_hydra_config=True)
        sin = hydra_compose("config", ["hparams_search=sinusoid_optuna"], return_hydra_config=True)
        slurm = hydra_compose("config", ["hydra/launcher=slurm"], return_hydra_config=True)
        par = hydra_compose("config", ["hydra/launcher=parallel"], return_hydra_config=True)
    assert img.dataset.name == "omniglot" and img.hydra.sweeper.direction == "maximize"
    searched = {"meta.inner_lr", "meta.inner_steps", "kd.weight", "kd.temperature"}
    assert set(img.hydra.sweeper.params) == searched
    assert sin.hydra.sweeper.direction == "minimize" and sin.hydra.sweeper.sampler.seed == 0
    assert str(sin.hydra.mode) == "RunMode.MULTIRUN"
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.timeout_min > 0 and launcher.max_num_timeout > 0
    assert "partition" in launcher
    assert par.hydra.launcher._target_.endswith("JoblibLauncher")
    assert par.hydra.callbacks.sweep_summary._target_ == "metakd_run.sweep.SweepSummary"
