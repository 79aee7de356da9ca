"""The results ledger: records of finished runs, and the docs' tables rendered from them alone."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from metakd_run import ledger
from metakd_run.evaluation.stats import t_interval
from tests.conftest import ROOT, TINY, metakd_run_exe


def fake_run(folder: Path, seed: int, accuracy: dict[str, list[float]], overrides: list[str]) -> Path:
    """A finished run folder as the pipeline writes it (the files the ledger reads)."""
    (folder / ".hydra").mkdir(parents=True)
    lines = [f"- {o}\n" for o in [*overrides, f"seed={seed}"]]
    (folder / ".hydra" / "overrides.yaml").write_text("".join(lines))
    (folder / ".hydra" / "config.yaml").write_text(f"seed: {seed}\nthreads: 1\n")
    sizes = {"teacher": 1000, "student_kd": 100, "student_base": 100}
    models = {m: {"parameters": p, "metrics": {}} for m, p in sizes.items()}
    environment = {"git_commit": "abc1234", "threads": 1}
    summary = {"task": "classification", "models": models, "environment": environment}
    (folder / "summary.json").write_text(json.dumps(summary))
    per_task = {m: {"accuracy": {"step_0": values}} for m, values in accuracy.items()}
    (folder / "per_task.json").write_text(json.dumps(per_task))
    timings = {m: {"seconds": 60.0 * (3 if m == "teacher" else 1)} for m in accuracy}
    (folder / "timings.json").write_text(json.dumps(timings))
    (folder / "fingerprint.json").write_text(json.dumps({"digest": f"d{seed}" + "0" * 14}))
    return folder


def study(tmp_path: Path) -> Path:
    s = tmp_path / "results" / "demo"
    s.mkdir(parents=True)
    (s / "study.yaml").write_text("title: Demo\ncommand: metakd-run -m seed=0,1,2\nsplit: val\n")
    (tmp_path / "results" / "index.yaml").write_text("studies: [demo]\n")
    return s


SEEDS = {  # per-task accuracies: the distilled student wins seeds 0 and 2, loses seed 1
    0: {"teacher": [0.9, 1.0], "student_kd": [0.8, 0.6], "student_base": [0.6, 0.6]},
    1: {"teacher": [0.9, 0.9], "student_kd": [0.5, 0.5], "student_base": [0.6, 0.6]},
    2: {"teacher": [1.0, 1.0], "student_kd": [0.7, 0.9], "student_base": [0.6, 0.8]},
}


def test_tables_are_recomputed_from_the_per_task_records(tmp_path):
    s = study(tmp_path)
    sweep = tmp_path / "sweep"
    for seed, acc in SEEDS.items():
        fake_run(sweep / str(seed), seed, acc, ["kd.weight=2"])
    written = ledger.add(s, [sweep])
    assert len(written) == 3 and all(p.suffix == ".gz" for p in written)
    first = [p.read_bytes() for p in written]
    assert [p.read_bytes() for p in ledger.add(s, [sweep])] == first  # the same record, the same bytes

    text = ledger.render(tmp_path / "results")
    row = next(line for line in text.splitlines() if line.startswith("| kd.weight=2"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    kd = [sum(a["student_kd"]) / 2 for a in SEEDS.values()]
    base = [sum(a["student_base"]) / 2 for a in SEEDS.values()]
    diff = [k - b for k, b in zip(kd, base)]
    mean, half = t_interval(diff)
    assert cells[1] == "0, 1, 2"
    assert cells[3] == f"{100 * t_interval(kd)[0]:.1f} ± {100 * t_interval(kd)[1]:.1f}"
    assert cells[5] == f"{100 * mean:+.1f} ± {100 * half:.1f}"
    assert cells[6] == "2/3"
    teacher = sum(sum(a["teacher"]) / 2 for a in SEEDS.values()) / 3
    gap = (sum(kd) / 3 - sum(base) / 3) / (teacher - sum(base) / 3)
    assert cells[7] == f"{100 * gap:.0f}%"
    assert cells[8] == "1,000 / 100 / 100" and cells[9] == "3.0 / 1.0 / 1.0"


def test_check_fails_when_a_published_number_drifts(tmp_path):
    s = study(tmp_path)
    for seed, acc in SEEDS.items():
        fake_run(tmp_path / "sweep" / str(seed), seed, acc, [])
    ledger.add(s, [tmp_path / "sweep"])
    docs = tmp_path / "results.md"
    docs.write_text(f"# Results\n\n{ledger.BEGIN}\n{ledger.END}\nafter\n")
    args = ["render", "--results", str(tmp_path / "results"), "--docs", str(docs)]
    assert ledger.main([*args, "--check"]) == 1
    assert ledger.main([*args, "--write"]) == 0
    assert ledger.main([*args, "--check"]) == 0
    assert docs.read_text().endswith(f"{ledger.END}\nafter\n")
    docs.write_text(docs.read_text().replace("2/3", "3/3"))
    assert ledger.main([*args, "--check"]) == 1


def test_a_folder_without_a_finished_run_is_one_line(tmp_path):
    s = study(tmp_path)
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "metakd_run.ledger", "add", str(s), str(tmp_path / "empty")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    empty = tmp_path / "empty"
    assert proc.stderr.strip().splitlines() == [
        f"metakd-run ledger: error: {empty} holds no finished run (no summary.json in it or its jobs)"
    ]


@pytest.mark.slow
def test_a_real_sweep_goes_into_the_ledger(tmp_path):
    args = [*metakd_run_exe(), "-m", *TINY, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sw'}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    s = study(tmp_path)
    paths = ledger.add(s, [tmp_path / "sw"])
    records = [json.loads(gzip.decompress(p.read_bytes())) for p in paths]
    assert sorted(r["seed"] for r in records) == [0, 1]
    for r in records:
        run = tmp_path / "sw" / r["run"].split("/")[1]
        per_task = json.loads((run / "per_task.json").read_text())
        expected = per_task["student_kd"]["mse"]["step_3"]
        assert r["per_task"]["student_kd"]["step_3"] == pytest.approx(expected, rel=1e-5)
        assert r["fingerprint"] == json.loads((run / "fingerprint.json").read_text())["digest"]
        assert r["summary"] == json.loads((run / "summary.json").read_text())
    rows = [line for line in ledger.render(tmp_path / "results").splitlines() if "| 0, 1 |" in line]
    assert len(rows) == 1  # one setting, over its two seeds


@pytest.mark.slow
def test_a_study_of_families_goes_into_the_ledger_one_row_per_cell(tmp_path):
    """The families study (part 15) through the ledger (part 13): two cells, two seeds, the study's
    own sweep folder; each cell is one row over its two seeds, the CNP cell with the CNP's sizes."""
    cells = "study.cell=maml_maml_outer,cnp_cnp_outer"
    tiny = ["train.iterations=4", "train.val_every=2", "train.val_tasks=2", "eval.tasks=6", "eval.steps=1",
            "eval.report_steps=[0,1]", "threads=1", "train.progress=false"]  # fmt: skip
    args = [*metakd_run_exe(), "study=families", cells, "seed=0,1", *tiny]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sweep,) = (tmp_path / "outputs" / "studies" / "sinusoid" / "families").iterdir()
    s = study(tmp_path)
    assert len(ledger.add(s, [sweep])) == 4
    rows = {line.split(" | ")[0]: line for line in ledger.render_study(s) if line.startswith("| study.cell=")}
    assert set(rows) == {"| study.cell=maml_maml_outer", "| study.cell=cnp_cnp_outer"}
    assert all("| 0, 1 |" in row for row in rows.values())
    assert "| 1,761 / 141 / 141 |" in rows["| study.cell=maml_maml_outer"]  # MLP 40-40 into 10-10
    assert "| 1,761 / 141 / 141 |" not in rows["| study.cell=cnp_cnp_outer"]  # an encoder and a decoder


def test_a_resumed_stage_counts_its_whole_cpu_time(tmp_path):
    """A stage resumed at iteration 450 of 600 ran 150 iterations, but its ``seconds`` carry on from
    the checkpoint's (training.py keeps the elapsed time in it): the table takes them as they are,
    not scaled by the iterations run."""
    s = study(tmp_path)
    run = fake_run(tmp_path / "r0", 0, SEEDS[0], ["kd.weight=1"])
    timings = json.loads((run / "timings.json").read_text())
    timings["student_kd"] = {"seconds": 360.0, "iterations": 600, "iterations_run": 150}
    (run / "timings.json").write_text(json.dumps(timings))
    ledger.add(s, [run])
    (row,) = [line for line in ledger.render_study(s) if line.startswith("| kd.weight=1")]
    assert row.rstrip(" |").endswith("| 3.0 / 6.0 / 1.0")  # 360 s: the whole stage's 6 minutes


def test_cpu_minutes_are_the_measured_process_time_where_a_stage_kept_it(tmp_path):
    """A stage that ran 360 wall seconds beside other jobs but used 120 CPU seconds costs 2 CPU
    minutes; a stage trained before the loop measured CPU time (``cpu_seconds`` absent or null, as
    after a resume from such a checkpoint) falls back to wall seconds x threads."""
    s = study(tmp_path)
    run = fake_run(tmp_path / "r0", 0, SEEDS[0], ["kd.weight=1"])
    timings = json.loads((run / "timings.json").read_text())
    timings["student_kd"] = {"seconds": 360.0, "cpu_seconds": 120.0, "iterations": 600}
    timings["student_base"] = {"seconds": 240.0, "cpu_seconds": None, "iterations": 600}
    (run / "timings.json").write_text(json.dumps(timings))
    ledger.add(s, [run])
    (row,) = [line for line in ledger.render_study(s) if line.startswith("| kd.weight=1")]
    assert row.rstrip(" |").endswith("| 3.0 / 2.0 / 4.0")
    # and the table says that its CPU minutes are some measured, some estimated
    assert "measured process CPU time where the run kept it, else wall time x threads" in "\n".join(
        ledger.render_study(s)
    )


def test_the_docs_tables_equal_the_ledger():
    """The published tables (docs/results.md) are exactly what the ledger renders."""
    docs = ROOT / "docs" / "results.md"
    assert ledger.main(["render", "--results", str(ROOT / "results"), "--docs", str(docs), "--check"]) == 0


def test_the_ledger_stays_small():
    size = sum(p.stat().st_size for p in (ROOT / "results").rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_a_run_added_again_under_a_new_digest_replaces_its_record(tmp_path):
    """A run continued after its fingerprint's digest changed is added again: the newer record
    replaces the older, so a seed never counts twice; two records of one seed are refused."""
    s = study(tmp_path)
    run = fake_run(tmp_path / "sweep" / "0", 0, SEEDS[0], ["kd.weight=2"])
    (old,) = ledger.add(s, [run])
    (run / "fingerprint.json").write_text(json.dumps({"digest": "e" * 16}))
    (new,) = ledger.add(s, [run])
    assert new != old and sorted((s / "runs").iterdir()) == [new]
    # another setting's seed 0 stays
    other = fake_run(tmp_path / "sweep" / "1", 0, SEEDS[1], ["kd.weight=0.5"])
    ledger.add(s, [other])
    assert len(list((s / "runs").iterdir())) == 2
    # a duplicate put there by hand is refused when rendering, naming the seed and the setting
    (s / "runs" / "seed0-copy.json.gz").write_bytes(new.read_bytes())
    with pytest.raises(ledger.LedgerError, match="two records of seed 0 for the setting 'kd.weight=2'"):
        ledger.render(tmp_path / "results")


def test_choose_picks_the_largest_mean_paired_difference_on_val_and_refuses_a_test_study(tmp_path, capsys):
    """kd.weight=2 wins by +0.067 on average over seeds 0-2; kd.weight=0.5 (its students swapped
    seed by seed: the undistilled twin ahead) by -0.067; kd.weight=8 is ahead but has one seed."""
    s = study(tmp_path)
    swapped = {
        k: {**a, "student_kd": a["student_base"], "student_base": a["student_kd"]} for k, a in SEEDS.items()
    }  # noqa: E501

    def run(folder: Path, seed: int, acc: dict, weight: str) -> None:  # its own digest per setting
        fake_run(folder, seed, acc, [f"kd.weight={weight}", "eval.split=val"])
        digest = f"{weight}{seed}".replace(".", "") * 4
        (folder / "fingerprint.json").write_text(json.dumps({"digest": digest}))

    for seed in SEEDS:
        run(tmp_path / "w2" / str(seed), seed, SEEDS[seed], "2")
        run(tmp_path / "w05" / str(seed), seed, swapped[seed], "0.5")
    ahead = {"teacher": [1.0, 1.0], "student_kd": [1.0, 1.0], "student_base": [0.1, 0.1]}
    run(tmp_path / "w8" / "0", 0, ahead, "8")
    ledger.add(s, [tmp_path / "w2", tmp_path / "w05", tmp_path / "w8"])
    assert ledger.main(["choose", str(s)]) == 0
    out, err = capsys.readouterr()
    assert out == "kd.weight=2\n"  # the varied override only: what the test-split command takes
    assert err.index("kd.weight=2") < err.index("kd.weight=0.5") and "kd.weight=8" not in err
    assert ledger.main(["choose", str(s), "--min-seeds", "1"]) == 0
    assert capsys.readouterr().out == "kd.weight=8\n"
    # the test split is scored once, never searched
    (s / "study.yaml").write_text("title: Demo\ncommand: metakd-run -m seed=0,1,2\nsplit: test\n")
    assert ledger.main(["choose", str(s)]) == 2
    assert "scored on the test split: choose on a validation study" in capsys.readouterr().err
