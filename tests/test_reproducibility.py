"""Same config and seed, same machine: byte-identical summary.json, where the docs claim it.

The claim ("Same config + seed → byte-identical file on the same machine", docs/outputs.md) was
tested on the sinusoid only. Here it is tested on tiny generated Omniglot runs for what the image
presets do: the CPU presets' default strategy (``meta.batching=batched``, grouped convolutions),
``vmap``, ProtoNet, image distillation (``kd=kl`` on the logits), a whole three-stage run, and a
sweep job against the same run alone. ``GIT_DIR`` points nowhere, so a commit that lands between
two runs (other work in this checkout) cannot make the files differ; everything else is compared
byte for byte.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import TINY, metakd_run_exe
from tests.test_data_images import make_omniglot, make_splits

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "GIT_DIR": "/nonexistent"}


@pytest.fixture(scope="module")
def omniglot_cpu(tmp_path_factory) -> list[str]:
    """The 2-core CPU preset (``meta.batching=batched``) on a generated Omniglot, 2-way, tiny models.

    The cache is built once here, so the runs below read the same decoded tensor.
    """
    base = tmp_path_factory.mktemp("omniglot")
    root = make_omniglot(base / "data")
    splits = make_splits(base / "splits")
    return [
        "experiment=omniglot_5w1s_cpu",
        f"dataset.root={root}",
        f"dataset.cache_dir={base / 'cache'}",
        f"dataset.train_split={splits / 'train.txt'}",
        f"dataset.val_split={splits / 'val.txt'}",
        f"dataset.test_split={splits / 'test.txt'}",
        "dataset.ways=2",
        "dataset.queries=2",
        "teacher.filters=4",
        "student.filters=2",
        "meta.meta_batch=4",
        "meta.chunk=4",
        *TINY,
        "train.iterations=6",
        "train.student_iterations=6",
        "train.val_every=3",
        "train.val_tasks=4",
        "eval.tasks=6",
        "eval.batch=3",
    ]


def metakd_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*metakd_run_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def twice(tmp_path: Path, *args: str) -> tuple[bytes, bytes, Path]:
    """summary.json of the same command run twice into two folders; and the first folder."""
    first, second = tmp_path / "first", tmp_path / "second"
    metakd_run(tmp_path, *args, f"hydra.run.dir={first}")
    metakd_run(tmp_path, *args, f"hydra.run.dir={second}")
    return (first / "summary.json").read_bytes(), (second / "summary.json").read_bytes(), first


def saved_config(run_dir: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"))  # type: ignore[return-value]


def test_three_stage_image_run_with_distillation_on_the_cpu_default_is_byte_identical(
    tmp_path: Path, omniglot_cpu: list[str]
) -> None:
    """The CPU preset's batched strategy, image distillation (KL on the logits), all three stages."""
    a, b, first = twice(tmp_path, *omniglot_cpu)
    assert a == b
    config = saved_config(first)
    assert config["meta"]["batching"] == "batched" and config["kd"]["distance"] == "kl"
    summary = json.loads(a)
    assert set(summary["models"]) == {"teacher", "student_kd", "student_base"}
    assert summary["environment"]["git_commit"] is None  # GIT_DIR pointed nowhere


@pytest.fixture(scope="module")
def vmap_runs(tmp_path_factory, omniglot_cpu: list[str]) -> tuple[bytes, bytes, Path, list[str]]:
    """The teacher stage with ``vmap``, twice; the sweep test compares a sweep job with it too."""
    args = [*omniglot_cpu, "meta.batching=vmap", "train.stages=[teacher]"]
    return (*twice(tmp_path_factory.mktemp("vmap"), *args), args)


def test_vmap_image_run_is_byte_identical(vmap_runs) -> None:
    a, b, first, _ = vmap_runs
    assert a == b
    assert saved_config(first)["meta"]["batching"] == "vmap"


def test_protonet_image_run_is_byte_identical(tmp_path: Path, omniglot_cpu: list[str]) -> None:
    a, b, _ = twice(tmp_path, *omniglot_cpu, "meta=protonet")
    assert a == b
    assert json.loads(a)["hparams"]["meta"] == "protonet"


def test_a_sweep_job_gives_the_results_of_the_same_run_alone(tmp_path: Path, vmap_runs) -> None:
    """``-m`` with one job against the plain run: the same summary (the folders differ; the
    summary names none of them)."""
    alone, _, _, args = vmap_runs
    sweep = tmp_path / "sweep"
    metakd_run(tmp_path, "-m", *args, f"hydra.sweep.dir={sweep}")
    job = json.loads((sweep / "0" / "summary.json").read_text())
    run = json.loads(alone)
    assert job == run
    assert (sweep / "sweep_summary.md").is_file()  # it did run as a sweep
    assert job["models"]["teacher"]["metrics"]["accuracy"]["step_1"]["mean"] is not None
