"""``train.teacher_cache``: the teacher and the undistilled student, which do not depend on the
distillation, are kept by their settings and seed and shared; under parallel jobs one job trains a
seed's model, the others of that seed wait for its file and load it (a lock file beside it)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import TINY, metakd_run_exe

pytestmark = pytest.mark.slow


def popen(overrides: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        args = [*metakd_run_exe(), *TINY, *overrides]
        return subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for_text(log: Path, text: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"no '{text}' in {log}"
        time.sleep(0.1)


def second(cached: Path, tmp_path: Path) -> list[str]:
    return [f"train.teacher_cache={cached.parent}", f"hydra.run.dir={tmp_path / 'second'}"]


@pytest.fixture
def cached_teacher(run_cli, tmp_path: Path) -> tuple[Path, Path]:
    """A cache holding one tiny teacher, and that teacher moved aside (the cache is empty again)."""
    cache = tmp_path / "cache"
    first = run_cli("train.stages=[teacher]", f"train.teacher_cache={cache}", run_dir=tmp_path / "first")
    assert first.returncode == 0, first.stderr[-2000:]
    (cached,) = cache.glob("*.pt")
    aside = tmp_path / "aside.pt"
    cached.rename(aside)
    return cached, aside


def test_a_job_waits_for_the_teacher_another_job_is_training_and_loads_it(tmp_path, cached_teacher):
    cached, aside = cached_teacher
    with open(cached.parent / f"{cached.name}.lock", "a+") as lock:  # "another job" trains it
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        log = tmp_path / "second.log"
        proc = popen(second(cached, tmp_path), tmp_path, log)
        wait_for_text(log, "another job is training", proc)
        time.sleep(1.0)
        assert proc.poll() is None and not (tmp_path / "second" / "checkpoints" / "teacher.pt").exists()
        aside.rename(cached)  # the other job's teacher is done
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    timings = json.loads((tmp_path / "second" / "timings.json").read_text())
    assert timings["obtained"]["teacher"] == f"loaded: train.teacher_cache file {cached}"
    assert timings["obtained"]["student_kd"] == "trained"


def test_ctrl_c_while_waiting_for_a_cached_teacher_is_one_line_and_exit_130(tmp_path, cached_teacher):
    cached, _ = cached_teacher
    with open(cached.parent / f"{cached.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        log = tmp_path / "second.log"
        proc = popen(second(cached, tmp_path), tmp_path, log)
        wait_for_text(log, "another job is training", proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and f"while waiting for {cached}" in text
    assert not (tmp_path / "second" / "summary.json").exists() and not cached.exists()


def test_two_parallel_jobs_of_one_seed_train_its_teacher_once(tmp_path):
    """A parallel sweep's two cells of seed 0 share one teacher: one trains it, the other waits."""
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    proc = subprocess.run(
        [*metakd_run_exe(), "-m", *TINY, "train.iterations=60", "kd.weight=0.5,2",
         f"train.teacher_cache={cache}", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    timings = [json.loads((sweep / j / "timings.json").read_text()) for j in ("0", "1")]
    for stage in ("teacher", "student_base"):
        obtained = [t["obtained"][stage] for t in timings]
        assert sorted(o.split(":")[0] for o in obtained) == ["loaded", "trained"], obtained
    assert [t["obtained"]["student_kd"] for t in timings] == ["trained", "trained"]
    assert sorted(p.name.split("-")[0] for p in cache.glob("*.pt")) == ["student_base", "teacher"]


def _metric(run_dir: Path, model: str) -> list[float]:
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["models"][model]["metrics"]["mse"]["curve"]["mean"]


def test_the_undistilled_student_is_shared_by_runs_that_vary_only_the_distillation(run_cli, tmp_path):
    cache = tmp_path / "cache"
    first = run_cli(f"train.teacher_cache={cache}", run_dir=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    (base,) = cache.glob("student_base-seed0-*.pt")
    assert not list(cache.glob("student_kd*"))  # the distilled student is what cells vary

    other_kd = run_cli(f"train.teacher_cache={cache}", "kd.weight=2", run_dir=tmp_path / "b")
    assert other_kd.returncode == 0, other_kd.stderr[-2000:]
    obtained = json.loads((tmp_path / "b" / "timings.json").read_text())["obtained"]
    assert obtained["student_base"] == f"loaded: train.teacher_cache file {base}"
    assert obtained["student_kd"] == "trained"
    assert _metric(tmp_path / "b", "student_base") == _metric(tmp_path / "a", "student_base")
    assert _metric(tmp_path / "b", "student_kd") != _metric(tmp_path / "a", "student_kd")
    assert (tmp_path / "b" / "checkpoints" / "student_base.pt").is_file()  # the run folder stays whole

    # what makes sharing it sound: trained without the cache, after no distilled stage and with
    # other distillation settings, the undistilled student comes out the same
    alone = run_cli("kd.weight=2", "train.stages=[teacher,student_base]", run_dir=tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert _metric(tmp_path / "alone", "student_base") == _metric(tmp_path / "a", "student_base")

    # a setting that shapes the undistilled student trains its own, under its own name
    other_student = run_cli(f"train.teacher_cache={cache}", "meta.inner_lr=0.02", run_dir=tmp_path / "c")
    assert other_student.returncode == 0, other_student.stderr[-2000:]
    obtained = json.loads((tmp_path / "c" / "timings.json").read_text())["obtained"]
    assert obtained["student_base"] == "trained"
    assert len(list(cache.glob("student_base-seed0-*.pt"))) == 2


def test_a_cached_model_named_by_an_older_digest_is_found_by_its_fingerprint(run_cli, tmp_path):
    """A file whose name no longer matches (written while a label still counted, say) is the same
    model when its fingerprint holds this run's settings; a file of other settings is not."""
    cache = tmp_path / "cache"
    teacher_only = ["train.stages=[teacher]", f"train.teacher_cache={cache}"]
    first = run_cli(*teacher_only, "meta=fomaml", run_dir=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    (written,) = cache.glob("teacher-*.pt")
    older = cache / "teacher-seed0-0123456789abcdef.pt"
    written.rename(older)

    same = run_cli(*teacher_only, "meta.first_order=true", run_dir=tmp_path / "b")
    assert same.returncode == 0, same.stderr[-2000:]
    obtained = json.loads((tmp_path / "b" / "timings.json").read_text())["obtained"]
    assert obtained["teacher"] == f"loaded: train.teacher_cache file {older}"
    assert list(cache.glob("teacher-*.pt")) == [older]

    other = run_cli(*teacher_only, run_dir=tmp_path / "c")  # second order: another model
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "timings.json").read_text())["obtained"]["teacher"] == "trained"
    assert len(list(cache.glob("teacher-*.pt"))) == 2
