"""Faults a real run meets: Ctrl-C on a run and on a sweep, a full disk, MLflow away, damaged data.

Each fault must end in one line on stderr (no traceback), the documented exit status, nothing
half-written, and a run that resumes to the same summary as a run left alone. The runs are the
real ``metakd-run`` console script in a subprocess. ``test_resume.py`` covers SIGKILL, SIGTERM,
divergence and damaged checkpoints; this file adds what it does not.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest

from metakd_run.checkpoint import load_checkpoint
from metakd_run.data.errors import DataError
from metakd_run.data.miniimagenet import load_miniimagenet
from metakd_run.data.omniglot import load_omniglot
from tests.conftest import TINY, metakd_run_exe
from tests.test_data_images import make_mini, make_omniglot, make_splits
from tests.test_resume import LONGER, one_error_line, wait_for

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def popen(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``metakd-run`` in a session of its own: a signal to its group is a terminal's Ctrl-C."""
    return subprocess.Popen(
        [*metakd_run_exe(), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or ENV,
        start_new_session=True,
    )


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*metakd_run_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env or ENV
    )


def results(summary_text: str) -> str:
    """summary.json without the git commit, which moves when a commit lands between two runs."""
    summary = json.loads(summary_text)
    summary["environment"].pop("git_commit", None)
    return json.dumps(summary, indent=2, sort_keys=True)


def half_written(folder: Path) -> list[Path]:
    """Temporary files of the atomic writer (``.<name>.<random>.tmp``) left behind."""
    return [p for p in folder.rglob(".*") if p.is_file() and p.name.endswith(".tmp")]


def assert_checkpoints_load(folder: Path) -> None:
    checkpoints = list((folder / "checkpoints").glob("*.pt"))
    assert checkpoints, f"no checkpoint in {folder}"
    for path in checkpoints:
        load_checkpoint(path)  # a truncated or half-written file raises CheckpointError


@pytest.fixture(scope="module")
def alone(tmp_path_factory) -> str:
    """summary.json of the LONGER run, seed 0, left alone: what every resumed run must end with."""
    folder = tmp_path_factory.mktemp("alone")
    proc = run([*LONGER, f"hydra.run.dir={folder / 'run'}"], folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (folder / "run" / "summary.json").read_text()


# --- Ctrl-C ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_mid_stage_exits_130_and_resumes_to_the_same_summary(tmp_path: Path, alone: str) -> None:
    run_dir = tmp_path / "run"
    proc = popen([*LONGER, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(run_dir / "checkpoints" / "teacher_last.pt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = one_error_line(subprocess.CompletedProcess([], 130, "", err))
    assert "stopped by signal 2" in line and f"Resume with: metakd-run train.resume={run_dir}" in line
    assert not half_written(run_dir) and not (run_dir / "summary.json").exists()
    assert_checkpoints_load(run_dir)

    resumed = run([f"train.resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results((run_dir / "summary.json").read_text()) == results(alone)


@pytest.mark.slow
def test_ctrl_c_during_the_meta_test_is_one_line_and_130(tmp_path: Path) -> None:
    """Ctrl-C outside a stage's loop (every stage done, the meta-test running) is no traceback
    either, and the resumed run loads the three stages and writes the results."""
    run_dir = tmp_path / "run"
    slow_test = ["eval.tasks=8000", "eval.batch=100"]  # seconds of meta-test to land in
    proc = popen([*TINY, *slow_test, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for(run_dir / "checkpoints" / "student_base.pt", proc)  # the last stage is done
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = one_error_line(subprocess.CompletedProcess([], 130, "", err))
    # in the meta-test; or, if the signal beat the stages' signal handler out, right after the stages
    assert line in (
        f"metakd-run: error: interrupted (SIGINT). Resume with: metakd-run train.resume={run_dir}",
        f"metakd-run: error: stopped by signal 2 after the last stage; every stage is saved. "
        f"Resume with: metakd-run train.resume={run_dir}",
    ), line
    assert not half_written(run_dir) and not (run_dir / "summary.json").exists()
    assert_checkpoints_load(run_dir)
    resumed = run([f"train.resume={run_dir}", f"hydra.run.dir={tmp_path / 'fresh'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["eval"]["tasks"] == 8000


@pytest.mark.slow
def test_ctrl_c_in_the_last_stages_last_iteration_is_not_swallowed(tmp_path: Path) -> None:
    """After the last iteration the loop looks at the flag no more: a Ctrl-C in the last stage's last
    iteration or final validation was ignored, and the run went on through the whole meta-test."""
    run_dir = tmp_path / "run"
    # many validation tasks: the final validation, after the last checkpoint, lasts long enough
    # for the signal to land in it even on a busy machine
    proc = popen(
        [*TINY, "train.checkpoint_every=11", "train.val_tasks=400", f"hydra.run.dir={run_dir}"], tmp_path
    )
    # saved after iteration 11's look at the flag: the next look, after iteration 12 of 12, is the
    # stage's last, and it does not stop a finished stage
    wait_for(run_dir / "checkpoints" / "student_base_last.pt", proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    line = one_error_line(subprocess.CompletedProcess([], 130, "", err))
    assert "stopped by signal 2 after the last stage; every stage is saved" in line
    assert f"train.resume={run_dir}" in line
    assert (run_dir / "checkpoints" / "student_base.pt").is_file() and not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_ctrl_c_on_a_joblib_sweep_exits_130_and_each_job_resumes(tmp_path: Path, alone: str) -> None:
    sweep = tmp_path / "sweep"
    proc = popen(["-m", "seed=0,1", "hydra/launcher=joblib", *LONGER, f"hydra.sweep.dir={sweep}"], tmp_path)
    deadline = time.time() + 180
    while not all(list((sweep / job / "checkpoints").glob("*.pt")) for job in ("0", "1")):  # both train
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the sweep's jobs wrote no checkpoint"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted (SIGINT)" in err  # the parent's own line
    for job in ("0", "1"):
        folder = sweep / job
        # a worker that stopped at its iteration's end said how to resume; one that joblib's abort
        # killed first (the parent hears the same Ctrl-C) left its last periodic checkpoint
        # a worker killed mid-write leaves the atomic writer's temporary file (its target intact);
        # the resumed run, holding the folder's lock, removes it
        if (folder / "error.txt").exists():
            assert f"train.resume={folder}" in (folder / "error.txt").read_text()
            assert f"train.resume={folder}" in err
            assert not half_written(folder)
        assert not (folder / "summary.json").exists()
        assert_checkpoints_load(folder)

    resumed = run([f"train.resume={sweep / '0'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (sweep / "0" / "error.txt").exists()  # the sweep summary now reads it as finished
    assert not half_written(sweep / "0")
    # the sweep's job 0 is the run left alone (seed 0 is the default): the same summary
    assert results((sweep / "0" / "summary.json").read_text()) == results(alone)


# --- a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted in tmp_path (needs root, or CAP_SYS_ADMIN in a container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small file system")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip() or made.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the file system is full."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_full_disk_mid_run_is_one_line_keeps_the_checkpoint_and_resumes(
    tmp_path: Path, small_disk: Path, alone: str
) -> None:
    run_dir = small_disk / "run"
    proc = popen([*LONGER, f"hydra.run.dir={run_dir}"], tmp_path)
    last = run_dir / "checkpoints" / "teacher_last.pt"
    wait_for(last, proc)
    filler = small_disk / "filler"
    fill(filler)  # the next checkpoint, 25 iterations later, finds no space
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = one_error_line(subprocess.CompletedProcess([], 2, "", err))
    assert line.startswith("metakd-run: error: could not write ") and "No space left on device" in line
    assert "free space" in line and str(run_dir) in line
    assert not half_written(run_dir)
    assert load_checkpoint(last)["iteration"] > 0  # the previous checkpoint is whole

    filler.unlink()
    resumed = run([f"train.resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert results((run_dir / "summary.json").read_text()) == results(alone)


@pytest.mark.slow
def test_full_disk_under_tensorboards_writer_is_one_line(tmp_path: Path, small_disk: Path) -> None:
    """The event file's thread meets the full disk first (a scalar every iteration, a checkpoint every
    100): no thread traceback, one line naming the run folder, and the run resumes."""
    run_dir = small_disk / "run"
    often = [*LONGER, "train.log_every=1", "train.checkpoint_every=100"]
    proc = popen([*often, f"hydra.run.dir={run_dir}"], tmp_path)
    last = run_dir / "checkpoints" / "teacher_last.pt"
    wait_for(last, proc)
    filler = small_disk / "filler"
    fill(filler)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err[-3000:]
    line = one_error_line(subprocess.CompletedProcess([], 2, "", err))
    assert "No space left on device" in line and f"train.resume={run_dir}" in line
    assert not half_written(run_dir)
    assert load_checkpoint(last)["iteration"] == 100

    filler.unlink()
    resumed = run([f"train.resume={run_dir}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run_dir / "summary.json").is_file()


@pytest.mark.slow
def test_full_disk_while_writing_the_results_is_one_line(tmp_path: Path, small_disk: Path) -> None:
    """Every stage done, the disk fills before the meta-test writes summary.json and the figures."""
    run_dir = small_disk / "run"
    first = run([*TINY, f"hydra.run.dir={run_dir}"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = ["summary.json", "per_task.json", "timings.json", "test_tasks.png", "adaptation.png"]
    for name in results:
        (run_dir / name).unlink()
    filler = small_disk / "filler"
    fill(filler)
    proc = run([f"train.resume={run_dir}", f"hydra.run.dir={tmp_path / 'fresh'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert "could not write" in line and "No space left on device" in line
    assert not half_written(run_dir)
    assert_checkpoints_load(run_dir)

    filler.unlink()
    again = run([f"train.resume={run_dir}", f"hydra.run.dir={tmp_path / 'fresh2'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all((run_dir / name).is_file() for name in results)


# --- MLflow ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_that_does_not_answer_fails_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tic = time.perf_counter()
    proc = run([*TINY, "logger=mlflow", f"logger.tracking_uri={uri}", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert f"logger.tracking_uri={uri} does not answer" in line and "Connection refused" in line
    assert not (run_dir / "checkpoints").exists()  # before any training
    assert time.perf_counter() - tic < 120  # MLflow's own retries took 4.5 minutes


@pytest.mark.slow
def test_mlflow_not_installed_names_the_extra(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "mlflow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'mlflow'\", name='mlflow')\n"
    )
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(shim.parent), ENV.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    proc = run([*TINY, "logger=mlflow", f"hydra.run.dir={run_dir}"], tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert 'pip install "metakd-run[mlflow]"' in line and "logger=tensorboard" in line
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_mlflow_logs_a_finished_run_to_a_real_server(tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.communicate()[1][-2000:]
            assert time.time() < deadline, "mlflow server did not answer"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        proc = run(
            [*TINY, "logger=mlflow", f"logger.tracking_uri={uri}", "logger.experiment_name=faults",
             f"hydra.run.dir={run_dir}"],
            tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("faults")
        assert experiment is not None
        (found,) = client.search_runs([experiment.experiment_id])
        assert found.info.status == "FINISHED"
        assert (run_dir / "mlflow_run.txt").read_text().split() == [uri, found.info.run_id]
        metrics, params = found.data.metrics, found.data.params
        assert {"teacher/train/loss", "student_kd/train/kd_loss", "teacher/val/mse"} <= set(metrics)
        assert {"final/teacher/mse_step_3", "final/student_kd/mse_step_3"} <= set(metrics)
        summary = json.loads((run_dir / "summary.json").read_text())
        logged = metrics["final/teacher/mse_step_3"]
        assert logged == pytest.approx(summary["models"]["teacher"]["metrics"]["mse"]["step_3"]["mean"])
        assert params["meta.inner_lr"] == str(summary["hparams"]["meta.inner_lr"])
        assert params["train.iterations"] == "12"
        history = client.get_metric_history(found.info.run_id, "teacher/train/loss")
        assert [m.step for m in history] == [3, 6, 9, 12]
        figures = list((tmp_path / "artifacts").rglob("figures/*.png"))
        assert {p.name for p in figures} >= {"eval_test_tasks.png", "eval_adaptation_curve.png"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# --- damaged data files ------------------------------------------------------------------------
def _load_mini(root: Path, tmp_path: Path) -> None:
    load_miniimagenet(root, "train", cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("damage", ["truncated", "not_hdf5", "empty"])
def test_damaged_hdf5_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    root = make_mini(tmp_path / "m", "hdf5")
    bad = root / "miniimagenet" / "train_data.hdf5"
    data = bad.read_bytes()
    bad.write_bytes(
        {"truncated": data[: len(data) // 2], "not_hdf5": b"<html>404</html>", "empty": b""}[damage]
    )
    with pytest.raises(DataError, match=rf"^{bad} is not a readable HDF5 file .*delete it and rebuild it$"):
        _load_mini(root, tmp_path)

    omni = make_omniglot(tmp_path / "o", "hdf5")
    bad = omni / "omniglot" / "data.hdf5"
    data = bad.read_bytes()
    bad.write_bytes(
        {"truncated": data[: len(data) // 2], "not_hdf5": b"<html>404</html>", "empty": b""}[damage]
    )
    with pytest.raises(DataError, match=rf"^{bad} is not a readable HDF5 file"):
        load_omniglot(omni, "train", splits_dir=make_splits(tmp_path / "splits"), cache_dir=tmp_path / "c")


def test_hdf5_dataset_in_another_layout_is_named(tmp_path: Path) -> None:
    """Readable HDF5 whose class is not [M, H, W(, 3)] of integers: not torchmeta's layout."""
    root = make_mini(tmp_path / "m", "hdf5")
    path = root / "miniimagenet" / "train_data.hdf5"
    with h5py.File(path, "a") as f:
        del f["datasets/n01000002"]
        f["datasets"].create_dataset("n01000002", data=np.zeros((8, 84, 84), np.uint8))  # grey
    with pytest.raises(DataError, match=rf"^{path}: dataset /datasets/n01000002 holds uint8 \(8, 84, 84\)"):
        _load_mini(root, tmp_path)

    omni = make_omniglot(tmp_path / "o", "hdf5")
    path = omni / "omniglot" / "data.hdf5"
    with h5py.File(path, "a") as f:
        del f["images_background/Alpha/character01"]
        f["images_background/Alpha"].create_dataset("character01", data=np.zeros((6, 105), np.float32))
    with pytest.raises(
        DataError, match=rf"^{path}: dataset /images_background/Alpha/character01 holds float32"
    ):
        load_omniglot(omni, "train", splits_dir=make_splits(tmp_path / "splits"), cache_dir=tmp_path / "c")


MALFORMED_CSV = {
    "no_header": ("n0100000100000001.jpg,n01000001\n", r"must start with the header 'filename,label'"),
    "missing_label": ("filename,label\nn0100000100000001.jpg\n", r", line 2: expected 'filename,label'"),
    "empty_label": ("filename,label\nn0100000100000001.jpg,\n", r", line 2: expected 'filename,label'"),
    "extra_field": ("filename,label\nn0100000100000001.jpg,n01000001,x\n", r", line 2: .*,x'"),
    "unclosed_quote": ('filename,label\n"n0100000100000001.jpg,n01000001\n', r", line 2: expected"),
    "not_text": (b"\xff\xfe\x00\x81 binary\n", r" is not a UTF-8 text file \(byte 0"),
    "empty": ("", r"must start with the header"),
}


@pytest.mark.parametrize("damage", list(MALFORMED_CSV))
def test_malformed_split_csv_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    root = make_mini(tmp_path / "m", "zip")
    bad = root / "miniimagenet" / "train.csv"
    content, message = MALFORMED_CSV[damage]
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as err:
        _load_mini(root, tmp_path)
    text = str(err.value)
    assert text.startswith(str(bad)) and "\n" not in text and re.search(message, text), text


def test_split_csv_with_a_byte_order_mark_loads(tmp_path: Path) -> None:
    root = make_mini(tmp_path / "m", "zip")
    csv_path = root / "miniimagenet" / "train.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + csv_path.read_bytes())  # as spreadsheet programs save it
    assert len(load_miniimagenet(root, "train", cache_dir=tmp_path / "cache").classes) == 3


@pytest.mark.parametrize("damage", ["truncated", "empty", "not_a_dict", "garbage"])
def test_damaged_pickle_is_one_line_naming_the_file(tmp_path: Path, damage: str) -> None:
    root = make_mini(tmp_path / "m", "pickle")
    bad = root / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    data = bad.read_bytes()
    bad.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "empty": b"",
            "not_a_dict": pickle.dumps([1, 2, 3]),
            "garbage": b"\x00\xff" * 64,
        }[damage]
    )
    with pytest.raises(DataError, match=rf"^{bad} is not a miniImageNet pickle cache .*download again$"):
        _load_mini(root, tmp_path)


@pytest.mark.slow
def test_a_truncated_pickle_ends_the_cli_with_one_line_and_exit_2(tmp_path: Path) -> None:
    root = make_mini(tmp_path / "data", "pickle")
    bad = root / "miniimagenet" / "mini-imagenet-cache-train.pkl"
    bad.write_bytes(bad.read_bytes()[:1000])
    run_dir = tmp_path / "run"
    proc = run(
        [*TINY, "experiment=miniimagenet_5w1s", "dataset.ways=2", "dataset.queries=2", f"dataset.root={root}",
         f"dataset.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"],
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_error_line(proc)
    assert line.startswith(f"metakd-run: error: {bad} is not a miniImageNet pickle cache")
    assert not run_dir.exists()  # nothing but bookkeeping was written, and that is removed
