"""A run folder's results belong to its settings: what may be reused, and what is refused.

Each scenario is the one a new user meets: the same ``hydra.run.dir`` (or ``hydra.sweep.dir``) run
again with other settings, a partial checkpoint of other settings, a given teacher of another
algorithm, two processes on one folder, and a sweep run again to continue.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from metakd_run import fingerprint
from metakd_run.config import Stage, to_dict, to_typed
from tests.conftest import TINY, metakd_run_exe, read_summary
from tests.test_resume import one_error_line

pytestmark = pytest.mark.slow


def test_a_folder_of_other_settings_is_refused_before_training(run_cli, tmp_path):
    run = tmp_path / "X"
    assert run_cli(run_dir=run).returncode == 0
    teacher = run / "checkpoints" / "teacher.pt"
    before = (teacher.stat().st_mtime_ns, (run / "summary.json").read_bytes())

    proc = run_cli("meta.inner_lr=0.05", "student.hidden=[10]", run_dir=run)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "meta.inner_lr: 0.01 -> 0.05" in line and "student.hidden: [10, 10] -> [10]" in line
    assert "hydra.run.dir" in line and "train.accept_mismatch=true" in line
    # nothing trained, nothing rewritten: the folder still describes the models it holds
    assert (teacher.stat().st_mtime_ns, (run / "summary.json").read_bytes()) == before
    assert "inner_lr: 0.01" in (run / ".hydra" / "config.yaml").read_text()
    assert "meta.inner_lr=0.05" not in (run / ".hydra" / "overrides.yaml").read_text()


def test_the_same_settings_reuse_the_folder_and_say_so(run_cli, tmp_path):
    run = tmp_path / "X"
    assert run_cli(run_dir=run).returncode == 0
    first = read_summary(run)
    again = run_cli("eval.tasks=12", run_dir=run)  # the meta-test may change: the models are reused
    assert again.returncode == 0, again.stderr[-2000:]
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings["obtained"].values()) == {"loaded: finished earlier in this run folder"}
    summary = read_summary(run)
    assert summary["teacher_source"] == "trained in this run"
    assert "accepted_mismatch" not in summary
    assert summary["eval"]["tasks"] == 12 and first["eval"]["tasks"] == 10


def test_an_accepted_mismatch_is_reported(run_cli, tmp_path):
    run = tmp_path / "X"
    assert run_cli(run_dir=run).returncode == 0
    proc = run_cli("meta.inner_lr=0.05", "train.accept_mismatch=true", run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = read_summary(run)
    assert summary["accepted_mismatch"]["teacher"] == ["meta.inner_lr: 0.01 -> 0.05"]
    assert "meta.inner_lr: 0.01 -> 0.05" in summary["accepted_mismatch"]["student_base"]
    assert "from_teacher.meta.inner_lr: 0.01 -> 0.05" in summary["accepted_mismatch"]["student_kd"]
    assert "trained with other settings" in summary["teacher_source"]
    assert summary["teacher_source"] != "trained in this run"


def test_a_partial_checkpoint_of_other_settings_is_refused(run_cli, tmp_path, compose):
    run = tmp_path / "P"
    other = to_typed(compose(*TINY, "train.iterations=99"))
    (run / "checkpoints").mkdir(parents=True)
    stale = {"fingerprint": fingerprint.record(fingerprint.stage_settings(other, Stage.teacher))}
    torch.save(stale, run / "checkpoints" / "teacher_last.pt")
    proc = run_cli(run_dir=run)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "teacher_last.pt" in line and "iterations: 99 -> 12" in line
    assert not (run / "checkpoints" / "teacher.pt").exists()


def test_a_given_teacher_of_another_algorithm_is_refused_another_seed_is_not(run_cli, tmp_path):
    assert run_cli("train.stages=[teacher]", "meta.inner_lr=0.05", run_dir=tmp_path / "t").returncode == 0
    given = tmp_path / "t" / "checkpoints" / "teacher.pt"
    proc = run_cli(f"train.teacher_checkpoint={given}", run_dir=tmp_path / "other")
    assert proc.returncode == 2
    assert "meta.inner_lr: 0.05 -> 0.01" in one_error_line(proc)
    assert not (tmp_path / "other").exists()

    seed = run_cli(
        f"train.teacher_checkpoint={given}", "meta.inner_lr=0.05", "seed=3", run_dir=tmp_path / "s"
    )
    assert seed.returncode == 0, seed.stderr[-2000:]
    assert read_summary(tmp_path / "s")["teacher_source"] == f"train.teacher_checkpoint={given}"


def test_two_processes_cannot_write_one_folder(run_cli, tmp_path):
    run = tmp_path / "L"
    run.mkdir()
    with open(run / "run.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("metakd-run pid 4242\n")
        held.flush()
        proc = run_cli(run_dir=run)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "in use by metakd-run pid 4242" in line and "hydra.run.dir" in line
    assert not (run / "checkpoints").exists()
    assert run_cli(run_dir=run).returncode == 0  # released: the folder is free again


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [*metakd_run_exe(), "-m", *TINY, *overrides, f"hydra.sweep.dir={tmp_path / 'sw'}"]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_a_sweep_run_again_continues_and_leaves_out_stale_jobs(tmp_path):
    first = sweep(tmp_path, "seed=0,1")
    assert first.returncode == 0, first.stderr[-2000:]
    job1 = tmp_path / "sw" / "1" / "summary.json"
    stamp = job1.stat().st_mtime_ns

    again = sweep(tmp_path, "seed=0,1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stderr.count("finished earlier with these settings: kept") == 2
    assert job1.stat().st_mtime_ns == stamp  # kept, not evaluated again
    assert "2 of 2 jobs finished" in (tmp_path / "sw" / "sweep_summary.md").read_text()

    fewer = sweep(tmp_path, "seed=0")
    assert fewer.returncode == 0, fewer.stderr[-2000:]
    md = (tmp_path / "sw" / "sweep_summary.md").read_text()
    assert "1 of 1 jobs finished" in md and "Left out: job folders 1" in md
    rows = (tmp_path / "sw" / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 2  # the header and job 0 only

    other = sweep(tmp_path, "seed=0", "meta.inner_lr=0.05")
    assert other.returncode == 1
    assert "meta.inner_lr: 0.01 -> 0.05" in (tmp_path / "sw" / "0" / "error.txt").read_text()


def test_teachers_cached_by_earlier_versions_are_found(compose):
    """Teachers cached before fingerprints stay reusable: their names' digest is still computed."""
    cfg = to_typed(compose(*TINY))
    # meta.pretrain joined the schema later and shapes a pretrain role only: earlier names never held it
    meta = {k: v for k, v in to_dict(cfg.meta).items() if not k.endswith("family") and k != "pretrain"}
    key = {
        "dataset": to_dict(cfg.dataset),
        "teacher": to_dict(cfg.teacher),
        "meta": {**meta, "family": "maml"},
        "iterations": 12,
        "validation": [6, 8, 1234, 5],
        "seed": 0,
        "dtype": "float32",
    }
    old = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint.cache_digest(cfg) == old


def test_execution_keys_do_not_change_a_fingerprint(compose):
    base = to_typed(compose(*TINY))
    same = to_typed(compose(*TINY, "meta.batching=loop", "meta.chunk=2", "threads=2", "train.progress=true"))
    other = to_typed(compose(*TINY, "kd.weight=2"))
    for stage in Stage:
        assert fingerprint.stage_settings(base, stage) == fingerprint.stage_settings(same, stage)
    assert fingerprint.stage_settings(base, Stage.teacher) == fingerprint.stage_settings(other, Stage.teacher)
    assert fingerprint.differences(
        fingerprint.stage_settings(base, Stage.student_kd),
        fingerprint.stage_settings(other, Stage.student_kd),
    ) == [f"kd.weight: {base.kd.weight} -> 2.0"]
    assert fingerprint.stage_settings(base, Stage.student_base) == fingerprint.stage_settings(
        other, Stage.student_base
    )


def test_the_teacher_cache_is_shared_whatever_the_data_root_spelling(run_cli, tmp_path):
    cache = tmp_path / "cache"
    first = run_cli("train.stages=[teacher]", f"train.teacher_cache={cache}", run_dir=tmp_path / "a")
    assert first.returncode == 0, first.stderr[-2000:]
    (cached,) = cache.glob("*.pt")  # beside its lock file (test_teacher_cache.py)
    second = run_cli(
        "train.stages=[teacher]", f"train.teacher_cache={cache}", "meta.batching=loop", run_dir=tmp_path / "b"
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert read_summary(tmp_path / "b")["teacher_source"] == f"shared: {cached}"
    assert list(cache.glob("*.pt")) == [cached]


def test_a_checkpoint_holding_a_key_that_later_became_an_execution_key_is_reused(run_cli, tmp_path):
    """Checkpoints written while ``dataset.test_split`` was still in the stage settings (before it
    joined the execution keys) are this run's models: continuing such a study must not refuse them."""
    run = tmp_path / "X"
    assert run_cli(run_dir=run).returncode == 0
    for ckpt in (run / "checkpoints").glob("*.pt"):
        state = torch.load(ckpt, weights_only=False)
        state["fingerprint"]["settings"]["dataset.test_split"] = "test"
        torch.save(state, ckpt)
    again = run_cli(run_dir=run)
    assert again.returncode == 0, again.stderr[-2000:]
    timings = json.loads((run / "timings.json").read_text())
    assert set(timings["obtained"].values()) == {"loaded: finished earlier in this run folder"}
    # a key that shapes a stage still refuses
    saved = {"meta.inner_lr": 0.01, "dataset.test_split": "test"}
    assert fingerprint.differences(saved, {"meta.inner_lr": 0.05}) == ["meta.inner_lr: 0.01 -> 0.05"]


def test_labels_do_not_change_a_fingerprint(compose):
    """``meta=fomaml`` is ``meta.first_order=true`` under another name: one model, one fingerprint
    (as ``meta=protonet`` and a study's ``meta.teacher_family=protonet`` are)."""
    named = to_typed(compose(*TINY, "meta=fomaml"))
    spelled = to_typed(compose(*TINY, "meta.first_order=true", "kd.name=my_label"))
    assert named.meta.name != spelled.meta.name
    for stage in Stage:
        assert fingerprint.stage_settings(named, stage) == fingerprint.stage_settings(spelled, stage)
    assert fingerprint.run_settings(named) == fingerprint.run_settings(spelled)
    second_order = to_typed(compose(*TINY, "meta=maml"))
    teacher = fingerprint.stage_settings(named, Stage.teacher)
    assert fingerprint.differences(teacher, fingerprint.stage_settings(second_order, Stage.teacher)) == [
        "meta.first_order: true -> false"
    ]
    # a given teacher (train.teacher_checkpoint) of meta=protonet is one of meta.teacher_family=protonet
    assert fingerprint.differences({"meta.name": "protonet", "meta.family": "protonet"},
                                   {"meta.name": "maml", "meta.family": "protonet"}) == []  # fmt: skip


def test_a_finished_job_named_by_an_older_digest_is_still_finished(compose, tmp_path):
    """A sweep job finished before a key stopped counting (a label) keeps its summary: its saved
    settings decide, not the digest they were named by then."""
    from metakd_run.pipeline import FINGERPRINT_FILE, finished_summary

    cfg = to_typed(compose(*TINY))
    now = fingerprint.run_settings(cfg)
    (tmp_path / "summary.json").write_text(json.dumps({"objective": 0.5}))
    older = {**now, "teacher.meta.name": "maml", "student_kd.kd.name": "mse"}
    saved = {"digest": fingerprint.digest(older), "settings": older}
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(saved))
    assert finished_summary(tmp_path, cfg) == {"objective": 0.5}
    other = {**older, "teacher.meta.inner_lr": 0.5}
    saved = {"digest": fingerprint.digest(other), "settings": other}
    (tmp_path / FINGERPRINT_FILE).write_text(json.dumps(saved))
    assert finished_summary(tmp_path, cfg) is None
