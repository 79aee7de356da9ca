"""The sweep summary's seed grouping, its noise rule for the star, and the study presets.

Most tests build job folders by hand (overrides.yaml, config.yaml, summary.json) with numbers
whose statistics are worked out below, so no training runs; one end-to-end study sweep checks
the pieces together.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from omegaconf import OmegaConf

from metakd_run import sweep
from metakd_run.sweep import SweepSummary, collect, write_summary
from tests.conftest import CONFIGS, metakd_run_exe

MODELS = ("teacher", "student_kd", "student_base")


def make_job(
    sweep_dir: Path,
    name: str,
    overrides: list[str],
    *,
    seed: int,
    metrics: dict[str, dict[int, float]] | None = None,
    objective: float | None = None,
    task: str = "regression",
    ci: float = 0.1,
    eval_tasks: int = 100,
    val_tasks: int = 100,
    train: dict | None = None,
    teacher_source: str = "trained in this run",
    parameters: dict[str, int] | None = None,
    error: str = "",
) -> None:
    """A job folder as a sweep leaves it; ``metrics``: model -> inner step -> mean of the metric."""
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    config = {
        "seed": seed,
        "train": {"teacher_checkpoint": None, "teacher_cache": None, "val_tasks": val_tasks},
    }
    config["train"].update(train or {})
    (job / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    if error:
        (job / "error.txt").write_text(error + "\n")
        return
    if metrics is None:
        return  # killed: neither summary nor error
    metric = "accuracy" if task == "classification" else "mse"
    models = {}
    for model, by_step in metrics.items():
        steps = sorted(by_step)
        entry: dict = {f"step_{s}": {"mean": by_step[s], "ci95": ci} for s in steps}
        entry["curve"] = {"steps": steps, "mean": [by_step[s] for s in steps], "ci95": [ci] * len(steps)}
        models[model] = {"metrics": {metric: entry}, "parameters": (parameters or {}).get(model, 100)}
    summary = {
        "task": task,
        "objective": objective,
        "eval": {"tasks": eval_tasks},
        "hparams": {"meta.inner_steps": 1},
        "teacher_source": teacher_source,
        "models": models,
    }
    (job / "summary.json").write_text(json.dumps(summary))


def three(kd: float, base: float, teacher: float = 0.5) -> dict[str, dict[int, float]]:
    """Step 0 and step 1 of the three models (step 0 the same for all)."""
    return {"teacher": {0: 2.0, 1: teacher}, "student_kd": {0: 2.0, 1: kd}, "student_base": {0: 2.0, 1: base}}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def seed_sweep(tmp_path: Path, settings: dict[str, list[tuple[float, float, float]]]) -> Path:
    """``{kd.weight: [(objective, kd, base) per seed]}`` as one job per (setting, seed)."""
    n = 0
    for weight, per_seed in settings.items():
        for seed, (objective, kd, base) in enumerate(per_seed):
            make_job(tmp_path, str(n), [f"kd.weight={weight}", f"seed={seed}"], seed=seed,
                     metrics=three(kd, base), objective=objective)  # fmt: skip
            n += 1
    return tmp_path


def summarise(sweep_dir: Path) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    rows = collect(sweep_dir)
    write_summary(sweep_dir, rows)
    return (
        read_csv(sweep_dir / "sweep_groups.csv"),
        read_csv(sweep_dir / "sweep_summary.csv"),
        (sweep_dir / "sweep_summary.md").read_text(),
    )


def test_seeds_of_a_setting_make_one_row_with_t_intervals_and_paired_differences(tmp_path: Path):
    seed_sweep(tmp_path, {
        "1": [(0.9, 1.0, 1.3), (1.1, 1.2, 1.1), (1.0, 0.9, 1.5)],
        "0": [(1.2, 1.4, 1.4), (1.3, 1.5, 1.5), (1.4, 1.6, 1.6)],
    })  # fmt: skip
    groups, jobs, md = summarise(tmp_path)
    assert len(jobs) == 6 and [g["kd.weight"] for g in groups] == ["1", "0"]
    a = groups[0]
    assert (a["n"], a["seeds"], a["failed"]) == ("3", "0 1 2", "0")
    # objective 0.9, 1.1, 1.0: mean 1.0, sd 0.1, t(2) = 4.303 -> 4.303 * 0.1 / sqrt(3) = 0.24844
    assert float(a["objective_mean"]) == pytest.approx(1.0)
    assert float(a["objective_ci95"]) == pytest.approx(0.24844, abs=1e-4)
    # MKD - baseline per seed: -0.3, +0.1, -0.6 -> mean -0.26667; deviations -0.0333, 0.3667, -0.3333,
    # sum of squares 0.24667, sd sqrt(0.24667 / 2) = 0.35119, half-width 4.303 * 0.35119 / sqrt(3) = 0.87247
    col = "paired/student_kd-student_base/mse_step_1"
    assert float(a[f"{col}_mean"]) == pytest.approx(-0.266667, abs=1e-5)
    assert float(a[f"{col}_ci95"]) == pytest.approx(0.87247, abs=1e-4)
    assert a[f"{col}_wins"] == "2"  # lower MSE on seeds 0 and 2
    assert float(a["student_kd/mse_step_1_mean"]) == pytest.approx(1.033333, abs=1e-5)
    # setting 0: the students tie on every seed: no win, zero difference
    assert groups[1][f"{col}_wins"] == "0" and float(groups[1][f"{col}_mean"]) == pytest.approx(0.0)
    assert "| **1** ★ | 3 (0 1 2) | 1 ± 0.25 |" in md  # paired lead +0.3 ± 0.25: ahead
    assert "-0.2667 ± 0.87 (2/3 wins)" in md


def test_accuracy_wins_count_higher_and_show_in_percent(tmp_path: Path):
    for seed, (kd, base) in enumerate([(0.80, 0.78), (0.75, 0.76), (0.90, 0.85)]):
        make_job(tmp_path, str(seed), [f"seed={seed}"], seed=seed, task="classification",
                 metrics=three(kd, base, teacher=0.95), objective=kd)  # fmt: skip
    groups, _, md = summarise(tmp_path)
    col = "paired/student_kd-student_base/accuracy_step_1"
    assert groups[0][f"{col}_wins"] == "2"
    # differences +0.02, -0.01, +0.05: mean +0.02 -> "+2.00" points
    assert float(groups[0][f"{col}_mean"]) == pytest.approx(0.02)
    assert "+2.00 ± " in md and "(2/3 wins)" in md


def test_no_star_when_the_lead_is_inside_the_seed_noise(tmp_path: Path):
    # lowest mean objective: setting 1 (1.0 against 1.0067), but the paired lead per seed is
    # +0.05, -0.10, +0.07: its interval spans zero
    seed_sweep(tmp_path, {
        "1": [(1.0, 1.0, 1.1), (1.1, 1.0, 1.1), (0.9, 1.0, 1.1)],
        "0": [(1.05, 1.0, 1.1), (1.0, 1.0, 1.1), (0.97, 1.0, 1.1)],
    })  # fmt: skip
    groups, jobs, md = summarise(tmp_path)
    assert [g["best"] for g in groups] == ["", ""] and all(j["best"] == "" for j in jobs)
    assert "No setting is ahead of the noise" in md and "★" not in md.split("## Settings, over seeds")[1]
    assert "kd.weight=1" in md.split("No setting is ahead of the noise")[1].splitlines()[0]


def test_star_when_clearly_ahead_and_never_on_a_single_seed(tmp_path: Path):
    seed_sweep(tmp_path, {
        "0": [(1.0, 1.0, 1.1), (1.15, 1.0, 1.1), (1.02, 1.0, 1.1)],
        "1": [(0.5, 1.0, 1.1), (0.6, 1.0, 1.1), (0.55, 1.0, 1.1)],
    })  # fmt: skip
    groups, jobs, md = summarise(tmp_path)
    assert [g["best"] for g in groups] == ["", "*"]
    assert all(j["best"] == "" for j in jobs)  # the seeds of a seed sweep are never starred
    assert "| **1** ★ | 3 (0 1 2) |" in md
    settings, jobs_md = md.split("## Jobs")
    assert "★ **kd.weight=1** is ahead of every other setting beyond the noise" in settings
    assert "★" not in jobs_md


def test_single_runs_star_only_beyond_their_summed_intervals(tmp_path: Path):
    def two_runs(folder: Path, a: float, b: float) -> list[dict[str, str]]:
        # test half-width 0.02 on 400 tasks -> 0.04 on the 100 validation tasks; summed 0.08
        for i, objective in enumerate((a, b)):
            make_job(folder, str(i), [f"kd.weight={i}"], seed=0, task="classification", ci=0.02,
                     eval_tasks=400, val_tasks=100, metrics=three(objective, 0.7),
                     objective=objective)  # fmt: skip
        return summarise(folder)[1]

    # the case: a 0.002 lead on intervals of +-0.04
    jobs = two_runs(tmp_path / "tie", 0.800, 0.802)
    assert [j["best"] for j in jobs] == ["", ""]
    assert "No setting is ahead of the noise" in (tmp_path / "tie" / "sweep_summary.md").read_text()
    # 0.05 is inside the summed 0.08 (it would pass against the unscaled 0.04)
    assert [j["best"] for j in two_runs(tmp_path / "close", 0.70, 0.75)] == ["", ""]
    assert [j["best"] for j in two_runs(tmp_path / "far", 0.70, 0.80)] == ["", "*"]
    md = (tmp_path / "far" / "sweep_summary.md").read_text()
    assert "lead +10.00 against summed 95% half-widths 8.00" in md and "| **1** ★ |" in md


def test_failed_cells_are_reported_and_leave_the_statistics_to_the_finished_seeds(tmp_path: Path):
    make_job(tmp_path, "0", ["kd.weight=1", "seed=0"], seed=0, metrics=three(1.0, 1.2), objective=1.0)
    make_job(tmp_path, "1", ["kd.weight=1", "seed=1"], seed=1, metrics=three(1.2, 1.3), objective=1.2)
    make_job(
        tmp_path, "2", ["kd.weight=1", "seed=2"], seed=2, error="stage student_kd: the meta-loss became nan"
    )
    make_job(tmp_path, "3", ["kd.weight=2", "seed=0"], seed=0, error="kd.weight=2 is invalid: too big")
    make_job(tmp_path, "4", ["kd.weight=2", "seed=1"], seed=1)  # killed: no result
    callback = SweepSummary()
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert sweep.LAST_SWEEP.jobs == 5 and [j for j, _ in sweep.LAST_SWEEP.failed] == ["2", "3", "4"]
    groups = read_csv(tmp_path / "sweep_groups.csv")
    assert [(g["kd.weight"], g["n"], g["failed"]) for g in groups] == [("1", "2", "1"), ("2", "0", "2")]
    assert float(groups[0]["objective_mean"]) == pytest.approx(1.1)
    md = (tmp_path / "sweep_summary.md").read_text()
    assert "2 of 5 jobs finished, 2 failed, 1 left no result" in md
    assert "| **1** ★ | 2 (0 1), 1 failed |" in md and "| 2 | 0, 2 failed |" in md
    assert "the meta-loss became nan" in md and "too big" in md
    # one setting with results among two: it is the only candidate
    assert "★ kd.weight=1: the only setting with a result" in md


@pytest.mark.parametrize(
    ("train", "source", "expected"),
    [
        ({"teacher_checkpoint": "/runs/t/teacher.pt"}, "train.teacher_checkpoint=/runs/t/teacher.pt",
         "one for every seed, train.teacher_checkpoint=/runs/t/teacher.pt"),
        ({"teacher_cache": "${oc.env:METAKD_TEACHER_CACHE,null}"}, "shared: /s/teachers/t.pt",
         "trained once per seed and teacher setting, kept in train.teacher_cache (2 of 2 jobs reused"),
        ({}, "trained in this run", "trained in every job (per seed and setting)"),
    ],
)  # fmt: skip
def test_the_summary_says_how_the_teacher_was_obtained(
    tmp_path: Path, train: dict, source: str, expected: str
):
    for seed in (0, 1):
        make_job(tmp_path, str(seed), [f"seed={seed}"], seed=seed, metrics=three(1.0, 1.1),
                 objective=1.0, train=train, teacher_source=source)  # fmt: skip
    groups, _, md = summarise(tmp_path)
    assert f"Teacher: {expected}" in md and groups[0]["teacher"].startswith(expected)


def _study(tmp_path: Path, study: dict) -> str:
    config = {"hydra": {"sweep": {"dir": str(tmp_path)}}, "study": study}
    SweepSummary().on_multirun_end(OmegaConf.create(config))
    assert (tmp_path / "study.png").stat().st_size > 0
    return (tmp_path / "study.md").read_text()


def test_student_size_study_puts_the_parameter_count_on_x(tmp_path: Path):
    n = 0
    for hidden, params, kd in (("[20,20]", 521, 0.6), ("[5,5]", 46, 1.0)):
        for seed in (0, 1):
            make_job(tmp_path, str(n), [f"student.hidden={hidden}", f"seed={seed}"], seed=seed,
                     metrics=three(kd + 0.1 * seed, kd + 0.2), objective=kd,
                     parameters={"teacher": 1761, "student_kd": params, "student_base": params})  # fmt: skip
            n += 1
    md = _study(
        tmp_path, {"name": "student_size", "x": "student_parameters", "x_label": "student parameters"}
    )
    table = md.split("## After 1 inner step")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "student.hidden" in line]
    # in order of the parameter count, not of the sweep
    assert rows[0].startswith("| 46 | student.hidden=[5,5] | 2 |")
    assert rows[1].startswith("| 521 | student.hidden=[20,20] | 2 |")
    # kd 1.0, 1.1 against 1.2, 1.2: differences -0.2, -0.1 -> -0.15, both seeds won
    assert "| -0.15 ± " in rows[0] and rows[0].endswith("| 2/2 |")
    assert "The teacher has 1761 parameters." in md


def test_layer_study_names_its_cells_and_reports_a_failed_one(tmp_path: Path):
    cells = ("cosine_hidden1", "mmd_hidden2", "sp_hidden2")
    n = 0
    for i, cell in enumerate(cells):
        for seed in (0, 1):
            error = "kd.taps is invalid" if cell == "sp_hidden2" else ""
            make_job(tmp_path, str(n), [f"study.cell={cell}", f"seed={seed}"], seed=seed,
                     metrics=three(1.0 - 0.1 * i, 1.0), objective=1.0, error=error)  # fmt: skip
            n += 1
    md = _study(tmp_path, {"name": "kd_layer", "x": "setting", "x_label": "distilled layer"})
    assert "| cosine_hidden1 | study.cell=cosine_hidden1 | 2 |" in md
    assert "| mmd_hidden2 | study.cell=mmd_hidden2 | 2 |" in md
    assert "2 of 6 jobs left no result" in md and "sp_hidden2 |" not in md


# --- the study presets ---------------------------------------------------------------------------------

STUDIES = ("student_size", "kd_layer", "inner_steps", "families")
EXPERIMENTS = {
    "sinusoid": SimpleNamespace(in_shape=(1,), out_dim=1, task="regression"),
    "omniglot_5w1s_cpu": SimpleNamespace(
        in_shape=(1, 28, 28), out_dim=5, task="classification", num_classes=4112
    ),
    "miniimagenet_5w1s_cpu": SimpleNamespace(
        in_shape=(3, 84, 84), out_dim=5, task="classification", num_classes=64
    ),
}
GRIDS = {  # (study, data set) -> the swept key and its values
    ("student_size", "sinusoid"): ("student.hidden", ["[5,5]", "[10,10]", "[20,20]", "[40,40]"]),
    ("student_size", "omniglot_5w1s_cpu"): ("student.filters", ["4", "8", "16", "32"]),
    ("kd_layer", "sinusoid"): ("study.cell", None),
    ("kd_layer", "omniglot_5w1s_cpu"): ("study.cell", None),
    ("inner_steps", "sinusoid"): ("meta.inner_steps", ["1", "2", "5"]),
    ("inner_steps", "omniglot_5w1s_cpu"): ("meta.inner_steps", ["1", "2", "5"]),
    ("families", "sinusoid"): ("study.cell", None),
    ("families", "omniglot_5w1s_cpu"): ("study.cell", None),
}


@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
@pytest.mark.parametrize("study", STUDIES)
def test_each_study_preset_composes_and_every_cell_builds(study: str, experiment: str, monkeypatch):
    """Every cell of every study, on each data set: the config types, and the teacher, the student
    and the distiller build (taps exist, projections fit), so no cell fails after a teacher trained.
    miniImageNet uses Omniglot's conv4 grids (1x1 or linear projections, whatever the image size):
    there only the composition is checked, to keep the test short."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    import metakd_run.cli  # noqa: F401 - registers the structured configs
    from metakd_run import build
    from metakd_run.config import to_typed

    monkeypatch.setenv("METAKD_TEACHER_CACHE", "/sweep/teachers")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", [f"study={study}", f"experiment={experiment}"], return_hydra_config=True)
        job = compose("config", [f"study={study}", f"experiment={experiment}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.study.name == study
    assert cfg.hydra.sweep.dir.startswith(f"outputs/studies/{cfg.name}/{study}/")
    # the job config reads it back (common.yaml): the sweep folder's teachers/, from the job's folder
    env = OmegaConf.to_container(cfg.hydra.job.env_set, resolve=False)
    assert env["METAKD_TEACHER_CACHE"] == "${hydra.runtime.output_dir}/../teachers"
    params = dict(cfg.hydra.sweeper.params)
    assert list(params)[-1] == "seed" and params["seed"] == "range(0,5)"  # seed varies fastest
    ((key, spec),) = [(k, v) for k, v in params.items() if k != "seed"]
    swept = OverridesParser.create().parse_override(f"{key}={spec}")
    values = list(swept.sweep_iterator())
    key_expected, values_expected = GRIDS.get(
        (study, experiment.replace("miniimagenet", "omniglot")), (key, None)
    )
    assert key == key_expected
    assert values_expected is None or [str(v).replace(" ", "") for v in values] == values_expected
    if key == "study.cell":
        assert set(values) == set(cfg.study.cells)
    if experiment.startswith("miniimagenet"):
        return
    source = EXPERIMENTS[experiment]
    for value in values:  # as the sweep's override would set it
        OmegaConf.update(job, key, value, merge=False)
        typed = to_typed(job)
        assert typed.train.teacher_cache == "/sweep/teachers"
        teacher = build.meta_learner(typed.teacher, "teacher", source, typed.meta, 0)
        student = build.meta_learner(typed.student, "student", source, typed.meta, 1)
        build.distiller(typed.kd, teacher, student, source.in_shape)
        if study == "kd_layer":
            cell = typed.study.cells[value]
            assert (typed.kd.distance, list(typed.kd.taps)) == (cell["distance"], list(cell["taps"]))
        if study == "inner_steps":
            assert typed.meta.inner_steps == value and typed.eval.steps >= 5
        if study == "families":
            cell = typed.study.cells[value]
            assert str(typed.meta.family_of("teacher")) == cell["teacher"]
            assert str(typed.meta.family_of("student")) == cell["student"]
            assert typed.kd.inner == cell["inner"] and typed.kd.learn_weight == cell["learn"]
            assert type(teacher).__name__.lower() == cell["teacher"]
    if study == "families":  # every family pair, every mode a student family can take
        pairs = {(c["teacher"], c["student"]) for c in cfg.study.cells.values()}
        image = ("maml", "protonet", "cnp", "pretrain")
        families = ("maml", "cnp") if source.task == "regression" else image
        assert pairs == {(t, s) for t in families for s in families}
        # only a MAML student has an inner loop, and only MAML and ProtoNet teachers distil into it
        inner = {(c["teacher"], c["student"]) for c in cfg.study.cells.values() if c["inner"]}
        assert inner and all(s == "maml" and t in ("maml", "protonet") for t, s in inner)


def test_no_study_leaves_the_default_config_alone():
    from hydra import compose, initialize_config_dir

    import metakd_run.cli  # noqa: F401
    from metakd_run.config import to_typed

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", [], return_hydra_config=True)
        typed = to_typed(compose("config", []))
    assert str(cfg.hydra.mode) != "RunMode.MULTIRUN" and not cfg.hydra.sweeper.params
    assert typed.study.name is None and typed.train.teacher_cache is None and typed.kd.distance == "sp"


# --- end to end ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_seed_sweep_of_a_study_groups_its_seeds_and_trains_one_teacher_per_seed(tmp_path: Path):
    """``study=student_size`` cut to two widths and two seeds, a few iterations, basic launcher, into
    the study's own sweep folder (outputs/studies/<experiment>/<study>/<time>, as documented)."""
    tiny = [
        "train.iterations=3", "train.val_every=3", "train.val_tasks=4", "train.checkpoint_every=5",
        "train.progress=false", "meta.meta_batch=2", "eval.tasks=4", "eval.steps=1",
        "eval.report_steps=[0,1]", "eval.batch=4", "threads=1",
    ]  # fmt: skip
    args = [*metakd_run_exe(), "study=student_size", "student.hidden=[5,5],[10,10]", "seed=0,1", *tiny]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "outputs" / "studies" / "sinusoid" / "student_size").iterdir()
    groups = read_csv(sweep_dir / "sweep_groups.csv")
    assert [(g["student.hidden"], g["n"], g["seeds"]) for g in groups] == [
        ("[5,5]", "2", "0 1"),
        ("[10,10]", "2", "0 1"),
    ]
    col = "paired/student_kd-student_base/mse_step_1"
    for g in groups:
        assert math.isfinite(float(g[f"{col}_mean"])) and g[f"{col}_wins"] in {"0", "1", "2"}
        assert math.isfinite(float(g["objective_ci95"]))
    # one teacher per seed, trained by the first width and reused by the second
    assert len(list((sweep_dir / "teachers").glob("teacher-seed*.pt"))) == 2
    sources = {j: json.loads((sweep_dir / j / "summary.json").read_text())["teacher_source"] for j in "0123"}
    assert [sources[j].startswith("shared") for j in "0123"] == [False, False, True, True]
    assert "reused a cached one" in groups[0]["teacher"]
    md = (sweep_dir / "sweep_summary.md").read_text()
    # the verdict, recomputed from the jobs' own objectives (lower mse is better): the leader is the
    # setting with the lower mean; it is starred only if its paired lead over the two seeds has a
    # 95% t-interval (1 degree of freedom: 12.706) above zero
    objective = {
        (cfg["student"]["hidden"][0], cfg["seed"]): json.loads((sweep_dir / j / "summary.json").read_text())[
            "objective"
        ]
        for j in "0123"
        for cfg in [yaml.safe_load((sweep_dir / j / ".hydra" / "config.yaml").read_text())]
    }
    mean = {w: (objective[(w, 0)] + objective[(w, 1)]) / 2 for w in (5, 10)}
    leader, other = sorted(mean, key=mean.get)
    lead = [objective[(other, s)] - objective[(leader, s)] for s in (0, 1)]
    half = 12.706204736174707 * abs(lead[0] - lead[1]) / math.sqrt(2) / math.sqrt(2)  # sd of 2 = |a-b|/sqrt2
    label = f"student.hidden=[{leader},{leader}]"
    settings = md.split("## Settings, over seeds")[1].split("## Jobs")[0]
    if sum(lead) / 2 - half > 0:
        assert f"★ **{label}** is ahead of every other setting beyond the noise" in settings, settings
    else:
        assert "★" not in settings, settings
        assert f"No setting is ahead of the noise: the best mean objective ({label}: " in settings, settings
    study = (sweep_dir / "study.md").read_text()
    assert "| 46 | student.hidden=[5,5] | 2 |" in study and "| 141 | student.hidden=[10,10] | 2 |" in study
    assert (sweep_dir / "study.png").stat().st_size > 0
