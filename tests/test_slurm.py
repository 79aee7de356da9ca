"""The SLURM launcher, preemption, time limits, data-parallel steps and failing jobs on a real
(one-node, local) SLURM cluster: scripts/slurm_local.sh, started once for the session.

The budgets are tiny: what is checked is the scheduler plumbing, not the learning.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import metakd_run_exe
from tests.slurm_fixture import LocalCluster, slurm_cluster_fixture  # noqa: F401 - the session fixture

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
pytestmark = pytest.mark.slow  # each test runs sweeps or trains

TINY = [
    "train.iterations=4",
    "train.val_every=2",
    "train.val_tasks=4",
    "train.log_every=2",
    "train.progress=false",
    "train.stages=[teacher]",
    "meta.meta_batch=4",
    "eval.tasks=4",
    "eval.steps=1",
    "eval.report_steps=[0,1]",
    "eval.batch=4",
    "threads=1",
]
# Long enough that the stage still runs when the test signals it (a few seconds); the cosine schedule
# makes a resume that lost the scheduler's state end with a different summary.
LONGER = [
    *[o for o in TINY if not o.startswith(("train.iterations", "train.val_every"))],
    "train.iterations=800",
    "train.val_every=500",
    "train.checkpoint_every=25",
    "meta.outer_schedule=cosine",
]


def sweep(tmp_path: Path, *overrides: str, launcher: str = "slurm_cpu") -> tuple[subprocess.Popen, Path]:
    sweep_dir = tmp_path / "sweep"
    args = [*metakd_run_exe(), "-m", f"hydra/launcher={launcher}", *overrides, f"hydra.sweep.dir={sweep_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    return proc, sweep_dir


def finish(proc: subprocess.Popen, timeout: int = 240) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def rows(sweep_dir: Path) -> dict[str, dict[str, str]]:
    with (sweep_dir / "sweep_summary.csv").open() as f:
        return {r["job"]: r for r in csv.DictReader(f)}


def last_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the sweep ended before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def job_log(job_dir: Path) -> str:
    """What the job logged (Hydra's ``<job name>.log`` in its folder)."""
    return "".join(p.read_text() for p in sorted(job_dir.glob("*.log")))


def array_job(sweep_dir: Path, task: int) -> str:
    """The SLURM id of one job of the sweep, ``<array>_<task>`` (a sweep of one job is no array):
    submitit names the job's folder after it."""
    folders = [
        d.name for d in (sweep_dir / ".submitit").iterdir() if (d / f"{d.name}_submitted.pkl").is_file()
    ]
    names = [n for n in folders if n.endswith(f"_{task}")] or (folders if len(folders) == 1 else [])
    assert len(names) == 1, folders
    return names[0]


def test_sweep_submits_a_job_array_and_summarises_every_cell(slurm_cluster: LocalCluster, tmp_path: Path):
    proc, sweep_dir = sweep(tmp_path, *TINY, "kd.weight=0,-1")
    _, err = finish(proc)
    assert proc.returncode == 1, err[-3000:]
    table = rows(sweep_dir)
    assert set(table) == {"0", "1"}
    assert table["0"]["status"] == "ok" and table["0"]["best"] == "*" and float(table["0"]["objective"]) > 0
    # the failing cell is reported as on one machine, plus where SLURM ran it and its log
    failed = table["1"]
    assert failed["status"] == "failed" and failed["error"].startswith("kd.weight=-1.0 is invalid")
    job_id = array_job(sweep_dir, 1)
    assert f"SLURM job {job_id}, log " in failed["error"]
    log = Path(failed["error"].rsplit("log ", 1)[1].rstrip(")"))
    assert log.is_file() and "kd.weight=-1.0 is invalid" in log.read_text()
    line = last_line(err)
    assert line.startswith("metakd-run: error: 1 of 2 sweep jobs failed: job 1: kd.weight=-1.0")
    assert job_id.split("_")[0] == array_job(sweep_dir, 0).split("_")[0]  # one job array
    assert slurm_cluster.job_state(job_id) == "COMPLETED"


def test_preempted_job_saves_is_requeued_and_ends_with_the_same_summary(
    slurm_cluster: LocalCluster, tmp_path: Path
):
    """Two identical cells; job 1 gets SIGUSR2 mid-stage (what SLURM sends before a preemption)."""
    proc, sweep_dir = sweep(tmp_path, *LONGER, "seed=3,3", "hydra.launcher.timeout_min=60")
    wait_for(sweep_dir / "1" / "checkpoints" / "teacher_last.pt", proc)
    job_id = array_job(sweep_dir, 1)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    out, err = finish(proc)
    assert proc.returncode == 0, err[-3000:]
    log = job_log(sweep_dir / "1")
    assert "stopped by signal 12" in log and "handing over to submitit" in log
    resumed = re.findall(r"teacher: resumed from .*teacher_last.pt at iteration (\d+)", log)
    assert len(resumed) == 1 and 0 < int(resumed[0]) < 800
    assert "this job is preempted" in (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", "-o", job_id)
    assert not job_log(sweep_dir / "0").count("resumed from")
    # the requeued job ran in its own folder and ended exactly as the job left alone
    assert (sweep_dir / "1" / "summary.json").read_text() == (sweep_dir / "0" / "summary.json").read_text()
    assert [r["status"] for r in rows(sweep_dir).values()] == ["ok", "ok"]


def test_time_limit_signal_requeues_until_max_num_timeout(slurm_cluster: LocalCluster, tmp_path: Path):
    """With timeout_min=2, submitit counts any SIGUSR2 as the time limit (it ran past
    min(0.8 * limit, limit - 10 min)): the first is requeued (max_num_timeout=1), the second is not,
    and the job ends with one line saying so and how to resume."""
    proc, sweep_dir = sweep(
        tmp_path, *LONGER, "seed=5", "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=1",
        "hydra.launcher.max_num_timeout=1",
    )  # fmt: skip
    job_dir = sweep_dir / "0"
    wait_for(job_dir / "checkpoints" / "teacher_last.pt", proc)
    job_id = array_job(sweep_dir, 0)
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    deadline = time.time() + 120
    while "resumed from" not in job_log(job_dir):
        assert proc.poll() is None and time.time() < deadline, "the job was not requeued and resumed"
        time.sleep(0.05)
    first = int(re.findall(r"at iteration (\d+)", job_log(job_dir))[-1])
    slurm_cluster.run("scancel", "--signal=USR2", job_id)
    _, err = finish(proc)
    assert proc.returncode == 1, err[-3000:]
    stderr_log = (sweep_dir / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()
    assert stderr_log.count("this job is timed-out") == 2
    error = (job_dir / "error.txt").read_text()
    assert (
        "stopped by signal 12" in error
        and "not requeued: Job not requeued because: timed-out too many times" in error
    )
    assert f"train.resume={job_dir}" in error and f"SLURM job {job_id}" in error
    assert last_line(err).startswith(
        "metakd-run: error: 1 of 1 sweep jobs failed: job 0: stage teacher stopped"
    )
    second = torch.load(job_dir / "checkpoints" / "teacher_last.pt", weights_only=False)["iteration"]
    assert second > first  # the second stop saved its own checkpoint


def test_a_job_that_dies_on_its_node_is_one_line_not_a_hang(slurm_cluster: LocalCluster, tmp_path: Path):
    """The job's process is killed by the kernel (CPU time limit) before it can leave a result."""
    proc, sweep_dir = sweep(tmp_path, *TINY, "hydra.launcher.setup=[ulimit -t 1]")
    _, err = finish(proc, timeout=180)
    assert proc.returncode == 1, err[-3000:]
    job_id = array_job(sweep_dir, 0)
    line = last_line(err)
    assert line.startswith(
        "metakd-run: error: 1 of 1 sweep jobs failed: job 0: ended without a result (state "
    )
    assert (
        "CPU time limit exceeded" in line
        and f"SLURM job {job_id}, log {sweep_dir}/.submitit/{job_id}/" in line
    )
    assert "Traceback" not in err
    assert rows(sweep_dir)["0"]["status"] == "failed"


def test_a_bad_data_root_on_the_node_is_one_line(slurm_cluster: LocalCluster, tmp_path: Path):
    proc, sweep_dir = sweep(
        tmp_path, *TINY, "experiment=omniglot_5w1s_cpu", f"dataset.root={tmp_path / 'absent'}", "seed=0"
    )
    _, err = finish(proc)
    assert proc.returncode == 1, err[-3000:]
    line = last_line(err)
    assert line.startswith("metakd-run: error: 1 of 1 sweep jobs failed: job 0: dataset.root=")
    assert "does not exist" in line and f"SLURM job {array_job(sweep_dir, 0)}, log " in line


def test_srun_two_ranks_equal_one_process_on_the_same_tasks(
    slurm_cluster: LocalCluster, tmp_path: Path, compose
):
    """``srun -n 2 metakd-run``: the ranks find each other from SLURM's variables, no torchrun."""
    run = [o for o in TINY if not o.startswith(("train.iterations", "train.val_every"))]
    run += [
        "train.iterations=3",
        "train.val_every=3",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "device=cpu",
    ]
    ddp = tmp_path / "ddp"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["srun", "-n", "2", *metakd_run_exe(), *run, f"hydra.run.dir={ddp}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from metakd_run.config import to_typed
    from metakd_run.pipeline import Experiment

    torch.set_num_threads(1)
    Experiment(to_typed(compose(*run, "meta.task_shards=2")), tmp_path / "one").run()
    a = torch.load(ddp / "checkpoints" / "teacher.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "one" / "checkpoints" / "teacher.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports


def test_optuna_study_in_sqlite_resumes_where_it_stopped(tmp_path: Path):
    """A search killed during its second trial and started again runs only the trials left
    (n_trials counts the stored study), in new job folders; the killed trial is a row without result."""
    sqlalchemy = pytest.importorskip("sqlalchemy")
    if int(sqlalchemy.__version__.split(".")[0]) >= 2:
        pytest.skip("optuna 2.10's RDB storage needs SQLAlchemy<2: pip install '.[sweep]' pins it")
    import optuna

    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    search = [
        *TINY,
        "hparams_search=sinusoid_optuna",
        f"hydra.sweeper.storage={db}",
        "hydra.sweeper.n_trials=3",
    ]
    proc, sweep_dir = sweep(tmp_path, *search, launcher="basic")
    wait_for(sweep_dir / "1" / ".hydra", proc)  # trial 0 was told to the study, trial 1 runs
    proc.kill()
    proc.wait(timeout=30)
    first = optuna.load_study(study_name="sinusoid_mkd", storage=db).trials
    assert first[0].state.name == "COMPLETE" and len(first) <= 2, [t.state.name for t in first]

    again, _ = sweep(tmp_path, *search, launcher="basic")
    _, err = finish(again)
    trials = optuna.load_study(study_name="sinusoid_mkd", storage=db).trials
    states = [t.state.name for t in trials]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "FAIL")]  # a tiny trial may diverge
    assert len(finished) == 3 and len(trials) == len(first) + 2, (states, err[-2000:])
    # the new trials ran in new folders, numbered after the study's trials
    table = rows(sweep_dir)
    assert list(table) == [str(n) for n in range(len(trials))]
    assert (sweep_dir / str(len(trials) - 1) / ".hydra").is_dir()
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml").best_value
    assert best == pytest.approx(min(t.value for t in finished if t.state.name == "COMPLETE"))
    if len(first) == 2:  # the killed trial has no result: the search ends saying so
        assert table["1"]["status"] == "no result"
        assert again.returncode == 1 and "job 1: no result" in last_line(err)


def test_ctrl_c_on_the_wait_leaves_the_jobs_running(slurm_cluster: LocalCluster, tmp_path: Path):
    """Ctrl-C reaches only the command waiting for the job array: one line and exit 130, and the
    SLURM job runs on to its result in the sweep folder (it is SLURM's, not the waiter's)."""
    proc, sweep_dir = sweep(tmp_path, *LONGER, "seed=3", "hydra.launcher.timeout_min=60")
    wait_for(sweep_dir / "0" / "checkpoints" / "teacher_last.pt", proc)
    job_id = array_job(sweep_dir, 0)
    proc.send_signal(signal.SIGINT)
    _, err = finish(proc)
    assert proc.returncode == 130, err[-3000:]
    line = last_line(err)
    assert line.startswith("metakd-run: error: interrupted (SIGINT). Only the wait stopped")
    assert "Traceback" not in err
    summary = sweep_dir / "0" / "summary.json"
    deadline = time.time() + 240
    while not summary.exists() and time.time() < deadline:
        time.sleep(0.5)
    assert summary.is_file(), job_log(sweep_dir / "0")[-2000:]
    while slurm_cluster.job_state(job_id) in ("RUNNING", "COMPLETING") and time.time() < deadline + 60:
        time.sleep(0.5)
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
