"""Every user mistake that part 6 names, tried as a new user would: the real ``metakd-run``.

A mistake must end in one line on stderr, ``metakd-run: error: ...``, that names the offending
value, with exit status 2, before any training and with no run folder left behind. "Before any
training" is checked without timing: these runs keep the progress bars on (the default), so a
stage that started would have written its bar (``teacher: ...it/s``) to stderr beside the error
line; and the run folder, where checkpoints and TensorBoard events would land, must not exist.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import CONFIGS, metakd_run_exe, read_summary
from tests.test_data_images import make_omniglot, make_splits

# Small enough that a mistake that is caught too late still ends in seconds. The progress bars
# stay on: they are what shows that training started.
BUDGET = ["train.iterations=2", "eval.tasks=4", "train.val_tasks=2", "eval.batch=4", "threads=1"]
QUIET = [*BUDGET, "train.progress=false"]


def metakd_run(cwd: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [*metakd_run_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def refused(proc: subprocess.CompletedProcess, run_dir: Path) -> str:
    """The one error line of a run refused before training (asserting everything around it)."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]  # a progress bar adds lines (\r)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr[-3000:]}"
    assert lines[0].startswith("metakd-run: error: "), lines[0]
    assert "it/s" not in proc.stderr + proc.stdout, "a stage started before the mistake was reported"
    assert not run_dir.exists(), f"a run folder was left behind: {sorted(p.name for p in run_dir.iterdir())}"
    return lines[0]


def _refuse(tmp_path: Path, *overrides: str) -> str:
    run_dir = tmp_path / "run"
    return refused(metakd_run(tmp_path, *BUDGET, *overrides, f"hydra.run.dir={run_dir}"), run_dir)


# --- sinusoid (the default experiment) ----------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,names",
    [
        (["kd.taps=[hidden9]"], r"hidden9"),
        (["kd=kl", "kd.taps=[hidden1]"], r"hidden1|\bkl\b"),
        (["kd.taps=[hidden2]", "kd.student_taps=[hidden7]"], r"hidden7"),
        (["kd.distance=euclid"], r"kd\.distance.*euclid|euclid.*kd\.distance"),
        (["kd=kd_schema"], r"kd_schema"),
    ],
    ids=[
        "unknown-tap",
        "kl-on-a-hidden-layer",
        "unknown-student-tap",
        "unknown-distance",
        "kd-schema",
    ],
)
def test_sinusoid_mistakes_are_refused_before_training(tmp_path: Path, overrides: list[str], names: str):
    line = _refuse(tmp_path, *overrides)
    assert re.search(names, line), line


def test_kl_on_regression_is_refused_with_the_fix(tmp_path: Path):
    """KL compares class distributions: on the sinusoid's real-valued outputs it means nothing."""
    line = _refuse(tmp_path, "kd=kl")
    assert re.search(r"\bkl\b", line), line
    assert re.search(r"kd(=|\.distance=)(mse|cosine)", line), f"the line names no distance to use: {line}"


@pytest.mark.slow  # it trains all three stages
def test_attention_on_the_sinusoid_projects_the_student_and_trains(tmp_path: Path):
    """``kd=attention`` on the sinusoid takes the head's inputs (hidden2: the teacher's 40 units, the
    student's 10); a flat feature's attention is its squared vector, so a learned linear projection
    bridges the widths and the run trains all three models, never a shape error after the teacher."""
    run_dir = tmp_path / "run"
    proc = metakd_run(tmp_path, *QUIET, "kd=attention", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)
    assert set(summary["models"]) == {"teacher", "student_kd", "student_base"}
    assert summary["hparams"]["kd.distance"] == "attention"
    for name in summary["models"]:
        assert all(math.isfinite(v["mean"]) for k, v in summary["models"][name]["metrics"]["mse"].items()
                   if k.startswith("step_")), name  # fmt: skip
    state = torch.load(run_dir / "checkpoints" / "student_kd.pt", weights_only=True)["state_dict"]
    assert state["distiller.projections.hidden2__to__hidden2.weight"].shape == (40, 10)


# --- images: the tiny Omniglot of test_data_images, official archives --------------------------
@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> list[str]:
    """Overrides that run the Omniglot preset on a generated Omniglot (2-way, tiny models)."""
    base = tmp_path_factory.mktemp("omniglot")
    root = make_omniglot(base / "data")
    splits = make_splits(base / "splits")
    return [
        "experiment=omniglot_5w1s",
        f"dataset.root={root}",
        f"dataset.cache_dir={base / 'cache'}",
        f"dataset.train_split={splits / 'train.txt'}",
        f"dataset.val_split={splits / 'val.txt'}",
        f"dataset.test_split={splits / 'test.txt'}",
        "dataset.ways=2",
        "dataset.queries=2",
        "teacher.filters=4",
        "student.filters=2",
        "meta.meta_batch=2",
        "eval.steps=1",
        "eval.report_steps=[0,1]",
    ]


@pytest.mark.slow
def test_the_omniglot_fixture_runs_without_a_mistake(tmp_path: Path, omniglot: list[str]):
    """The control for the cases below: the same overrides, minus the mistake, train and test."""
    run_dir = tmp_path / "run"
    proc = metakd_run(tmp_path, *QUIET, *omniglot, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_summary(run_dir)["task"] == "classification"


@pytest.mark.parametrize(
    "overrides,names",
    [
        (["student.blocks=6"], r"student\.blocks"),  # 28 px cannot take six 2x2 pools
        (["teacher.blocks=6"], r"teacher\.blocks"),
        (["kd=mse", "kd.taps=[block1]", "kd.student_taps=[block2]"], r"block2|kd\.student_taps"),
    ],
    ids=["student-too-deep", "teacher-too-deep", "taps-of-different-sizes"],
)
def test_image_mistakes_are_refused_before_training(
    tmp_path: Path, omniglot: list[str], overrides: list[str], names: str
):
    line = _refuse(tmp_path, *omniglot, *overrides)
    assert re.search(names, line), line


def test_the_test_split_setting_is_the_one_meta_tested(tmp_path: Path, omniglot: list[str]):
    """``dataset.test_split`` decides what the meta-test reads (it was once ignored): a split file
    that does not exist is refused before training, by name."""
    missing = tmp_path / "no_such_split.txt"
    line = _refuse(tmp_path, *omniglot, f"dataset.test_split={missing}")
    assert "no_such_split.txt" in line, line


def test_a_missing_data_root_names_the_folder(tmp_path: Path):
    missing = tmp_path / "no_such_data"
    line = _refuse(tmp_path, "experiment=omniglot_5w1s", f"dataset.root={missing}")
    assert str(missing) in line, line


# --- the config groups: schemas are not options ---------------------------------------------------
def test_help_lists_exactly_the_option_files():
    """``--help`` offers the YAML options of each group and nothing else: no schema (``kd_schema``,
    or a ``schema/...`` group), since choosing one composes a config that means nothing."""
    proc = metakd_run(CONFIGS.parent, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "schema" not in proc.stdout, [ln for ln in proc.stdout.splitlines() if "schema" in ln]
    # the help template's groups section, up to the next section ("== Examples ==")
    listing = re.split(r"^== Config groups.*==$", proc.stdout, maxsplit=1, flags=re.M)[1]
    listing = re.split(r"^== ", listing, maxsplit=1, flags=re.M)[0]
    shown = {}
    for line in listing.splitlines():
        if re.match(r"^[\w/@]+: ", line):
            group, options = line.split(": ", 1)
            shown[group] = {o.strip() for o in options.split(",")}
    on_disk = {  # every folder of YAML options, nested groups (a/b) included; Hydra's own aside
        d.relative_to(CONFIGS).as_posix(): {p.stem for p in d.glob("*.yaml")}
        for d in CONFIGS.rglob("*")
        if d.is_dir() and d.relative_to(CONFIGS).parts[0] != "hydra" and list(d.glob("*.yaml"))
    }
    assert shown == on_disk


# --- resuming ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real tiny run, to resume."""
    base = tmp_path_factory.mktemp("resume")
    run_dir = base / "run"
    proc = metakd_run(base, *QUIET, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_resume_names_each_override_it_ignores(tmp_path: Path, finished_run: Path):
    """Resuming uses the run's saved config: a new value must not vanish silently."""
    before = (finished_run / "summary.json").read_text()
    proc = metakd_run(
        tmp_path,
        f"train.resume={finished_run}",
        "train.iterations=4000",
        "seed=5",
        f"hydra.run.dir={tmp_path / 'fresh'}",
    )
    # refused before anything runs: the one-line contract, each override and its saved value named
    line = refused(proc, tmp_path / "fresh")
    assert "train.iterations=4000 (the run has train.iterations=2)" in line, line
    assert "seed=5 (the run has seed=0)" in line, line
    assert (finished_run / "summary.json").read_text() == before


# --- non-finite results -----------------------------------------------------------------------------
def _strict_json(text: str) -> dict:
    def bare(constant: str) -> None:
        raise AssertionError(f"summary.json holds a bare {constant}: not JSON, and not reported")

    return json.loads(text, parse_constant=bare)


@pytest.mark.slow
def test_metasgd_summary_is_strict_json(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = metakd_run(tmp_path, *QUIET, "meta=metasgd", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _strict_json((run_dir / "summary.json").read_text())
    assert "nan" not in proc.stdout.lower(), proc.stdout


@pytest.mark.slow
def test_a_diverging_meta_test_is_reported_not_written_as_nan(tmp_path: Path):
    """Meta-SGD's rates started at 2 blow up over the 10 test steps (inf, then nan, without the fix
    of part 6): the summary must stay valid JSON and the run must say that the metric diverged."""
    run_dir = tmp_path / "run"
    proc = metakd_run(tmp_path, *QUIET, "meta=metasgd", "meta.inner_lr=2", f"hydra.run.dir={run_dir}")
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]  # a diverging meta-test is a result, not a failure
    assert "Traceback" not in said
    summary = _strict_json((run_dir / "summary.json").read_text())
    assert "nan ± nan" not in proc.stdout
    mse = summary["models"]["teacher"]["metrics"]["mse"]
    assert mse["diverged_at_step"] == 3 and mse["step_10"] == {"mean": None, "ci95": None}
    assert math.isfinite(mse["step_1"]["mean"])  # before it diverged, the numbers are there
    assert "teacher: the test mse is not finite from inner step 3 on" in said, said[-3000:]
    assert "diverged (step 3)" in proc.stdout, proc.stdout
