"""Runs that survive faults: kill and resume, signals, divergence, damaged checkpoints, full disks."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from metakd_run.checkpoint import CheckpointError, load_checkpoint, save_atomic
from tests.conftest import TINY, metakd_run_exe

# Long enough that a stage is still running when the test kills it, short enough for CI; the
# cosine schedule makes a resume that lost the scheduler's state end with a different summary.
LONGER = [
    *TINY,
    "train.iterations=400",
    "train.checkpoint_every=25",
    "train.val_every=100",
    "meta.outer_schedule=cosine",
]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("[")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def start(run_dir: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*metakd_run_exe(), *LONGER, *extra, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_sigkill_mid_stage_then_resume_ends_with_the_same_summary(run_cli, tmp_path):
    alone = run_cli(*LONGER[len(TINY) :], run_dir=tmp_path / "alone")
    assert alone.returncode == 0, alone.stderr[-2000:]

    run_dir = tmp_path / "killed"
    proc = start(run_dir, tmp_path)
    wait_for(run_dir / "checkpoints" / "student_kd_last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run_dir / "summary.json").exists()
    checkpoint = torch.load(run_dir / "checkpoints" / "student_kd_last.pt", weights_only=False)
    assert 0 < checkpoint["cpu_elapsed"] <= checkpoint["elapsed"] * 4

    resumed = run_cli(f"train.resume={run_dir}", tiny=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "summary.json").read_text() == (tmp_path / "alone" / "summary.json").read_text()
    # the stage's clocks carry on from the checkpoint: its CPU time is the whole stage's
    stage = json.loads((run_dir / "timings.json").read_text())["student_kd"]
    assert stage["cpu_seconds"] > checkpoint["cpu_elapsed"] and stage["seconds"] > checkpoint["elapsed"]
    # and so does the clock of each validation: every one of the stage's, in order
    alone_clock = json.loads((tmp_path / "alone" / "timings.json").read_text())["student_kd"][
        "validation_clock"
    ]
    clock = stage["validation_clock"]
    assert [c["iteration"] for c in clock] == [c["iteration"] for c in alone_clock] and len(clock) >= 2
    assert all(a["cpu_seconds"] < b["cpu_seconds"] for a, b in zip(clock, clock[1:]))
    assert not list(tmp_path.glob("outputs/**/.hydra"))  # the resume made no second run folder


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(run_cli, tmp_path):
    run_dir = tmp_path / "term"
    proc = start(run_dir, tmp_path)
    wait_for(run_dir / "checkpoints" / "teacher.pt", proc)  # teacher done, a student stage running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    line = one_error_line(subprocess.CompletedProcess([], proc.returncode, "", err))
    assert f"train.resume={run_dir}" in line and "checkpoint saved to" in line
    last = list((run_dir / "checkpoints").glob("*_last.pt"))
    assert len(last) == 1 and load_checkpoint(last[0])["iteration"] > 0
    resumed = run_cli(f"train.resume={run_dir}", tiny=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / "summary.json").is_file()


def test_diverging_run_names_stage_iteration_and_checkpoint(run_cli, tmp_path):
    proc = run_cli("meta.inner_lr=1e6", run_dir=tmp_path / "div")
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "stage teacher" in line and "iteration" in line and "last good checkpoint" in line


def test_damaged_and_incompatible_checkpoints_are_refused(run_cli, tmp_path):
    first = run_cli("train.stages=[teacher]", run_dir=tmp_path / "t")
    assert first.returncode == 0, first.stderr[-2000:]
    good = tmp_path / "t" / "checkpoints" / "teacher.pt"

    other = run_cli(f"train.teacher_checkpoint={good}", "teacher.hidden=[20]", run_dir=tmp_path / "w")
    assert other.returncode == 2
    assert "teacher.hidden: [40, 40] -> [20]" in one_error_line(other)  # its fingerprint names the key
    assert not (tmp_path / "w").exists()
    # accepting the mismatch still cannot load a wrong shape
    wrong_shape = run_cli(
        f"train.teacher_checkpoint={good}",
        "teacher.hidden=[20]",
        "train.accept_mismatch=true",
        run_dir=tmp_path / "w",
    )
    assert wrong_shape.returncode == 2
    assert "does not fit the configured model" in one_error_line(wrong_shape)
    assert not (tmp_path / "w").exists()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bad = run_cli(f"train.teacher_checkpoint={truncated}", run_dir=tmp_path / "b")
    assert bad.returncode == 2
    assert "damaged or truncated" in one_error_line(bad)
    assert not (tmp_path / "b").exists()


def test_resume_folder_that_holds_no_run(run_cli, tmp_path):
    proc = run_cli(f"train.resume={tmp_path / 'nothing'}", tiny=False)
    assert proc.returncode == 2
    assert "holds no metakd-run run" in one_error_line(proc)


def test_missing_data_root_fails_before_training(run_cli, tmp_path):
    proc = run_cli("experiment=omniglot_5w1s", f"dataset.root={tmp_path / 'absent'}", run_dir=tmp_path / "r")
    assert proc.returncode == 2
    assert "dataset.root" in one_error_line(proc)
    assert not (tmp_path / "r").exists()


def test_full_disk_while_writing_a_checkpoint_leaves_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"w": torch.ones(3)}, path)

    def no_space(fd):  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_atomic({"w": torch.zeros(3)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
