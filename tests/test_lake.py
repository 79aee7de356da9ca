"""Lake et al.'s 20 one-shot runs: the loader, the splits that do not leak, the scoring, the CLI.

The fixture runs are written per test in the official layout (``runNN/training/classKK.png``,
``runNN/test/itemKK.png``, ``runNN/class_labels.txt``) from the tiny Omniglot drawings of
``test_data_images``, so a run's drawing is also a drawing of the tiny Omniglot. The tests at the
end read the real runs from ``$METAKD_DATA_ROOT``: they skip when it is not set, and fail when it
is set and the runs are not there.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.nn import functional as F

from metakd_run import build
from metakd_run import lake as lake_command
from metakd_run.api import TaskShape
from metakd_run.config import ConfigError, Conv4Config, MetaConfig, to_typed
from metakd_run.data.errors import DataError
from metakd_run.data.omniglot import load_omniglot, read_split
from metakd_run.data.omniglot_runs import LakeRuns, load_lake_runs, locate
from metakd_run.evaluation import lake_runs as lake
from metakd_run.presentation.table import lake_table
from tests.conftest import read_summary
from tests.tensorboard_runs import TensorBoardRuns
from tests.test_data_images import make_omniglot, omniglot_files

WAYS = 4  # the fixture's runs are 4-way (the real ones 20-way)
RUNS = 2


# --- fixture runs in the official layout ----------------------------------------------------------------
def _drawings() -> list[list[tuple[str, bytes]]]:
    """The tiny Omniglot's drawings, per character: [(member name, PNG bytes)]."""
    by_char: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in sorted(omniglot_files().items()):
        by_char.setdefault(name.rsplit("/", 1)[0], []).append((name, data))
    return list(by_char.values())


def _labels(run: int) -> list[int]:
    """Test item j belongs to training class labels[j] (0-based), a permutation per run."""
    return [(3 * j + run) % WAYS for j in range(WAYS)]


def run_files(prefix: str = "") -> dict[str, bytes]:
    """Member name -> bytes: run r's class k is drawing r of character k, its test item drawing r + 3."""
    chars = _drawings()
    files: dict[str, bytes] = {}
    for r in range(RUNS):
        run = f"run{r + 1:02d}"
        lines = []
        for k in range(WAYS):
            files[f"{prefix}{run}/training/class{k + 1:02d}.png"] = chars[k][r][1]
        for j, k in enumerate(_labels(r)):
            files[f"{prefix}{run}/test/item{j + 1:02d}.png"] = chars[k][r + 3][1]
            lines.append(f"{run}/test/item{j + 1:02d}.png {run}/training/class{k + 1:02d}.png")
        files[f"{prefix}{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def write_runs(where: Path, fmt: str = "zip", files: dict[str, bytes] | None = None) -> Path:
    """``where/all_runs.zip`` (fmt zip) or ``where/runNN/...`` (fmt folder); returns what to point at."""
    files = run_files() if files is None else files
    where.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        with zipfile.ZipFile(where / "all_runs.zip", "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return where / "all_runs.zip"
    for name, data in files.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
    return where


# --- the loader -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["zip", "folder"])
def test_loader_reads_the_official_layout(tmp_path: Path, fmt: str) -> None:
    path = write_runs(tmp_path / "runs", fmt)
    runs = load_lake_runs(path, 28)
    assert [r.name for r in runs.runs] == ["run01", "run02"] and runs.ways == WAYS
    for r, run in enumerate(runs.runs):
        assert run.support.shape == (WAYS, 1, 28, 28) and run.query.shape == (WAYS, 1, 28, 28)
        assert run.support.dtype == torch.uint8
        assert run.labels.tolist() == _labels(r)
        assert run.classes == tuple(f"training/class{k + 1:02d}.png" for k in range(WAYS))
    zipped = load_lake_runs(write_runs(tmp_path / "z", "zip"), 28)
    for a, b in zip(runs.runs, zipped.runs):
        assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query)


def test_the_runs_are_found_in_the_usual_places(tmp_path: Path) -> None:
    root = tmp_path / "data"
    zipped = write_runs(root / "omniglot" / "one-shot-classification", "zip")
    assert locate(root) == zipped and locate(zipped) == zipped
    extracted = write_runs(tmp_path / "x" / "all_runs", "folder")
    assert locate(tmp_path / "x") == extracted and locate(extracted) == extracted
    # the zip may hold the runs under a folder of its own
    nested = write_runs(tmp_path / "n", "zip", run_files(prefix="all_runs/"))
    assert [r.name for r in load_lake_runs(nested).runs] == ["run01", "run02"]


def test_drawings_are_preprocessed_as_in_training(tmp_path: Path) -> None:
    """A run's drawing is the tensor the Omniglot loader makes of the same PNG: ink 1, same resize."""
    runs = load_lake_runs(write_runs(tmp_path / "runs"), 28)
    root = make_omniglot(tmp_path / "data", "zip")
    split = tmp_path / "chars.txt"
    split.write_text("Alpha/character01\nAlpha/character02\n")
    omni = load_omniglot(root, str(split), 28)
    # run01's class01 is drawing 0 of the first character, run02's class02 drawing 1 of the second
    assert torch.equal(runs.runs[0].support[0], omni.images[0, 0])
    assert torch.equal(runs.runs[1].support[1], omni.images[1, 1])
    assert runs.runs[0].support.float().mean() < 60 and runs.runs[0].support.max() > 200


def _corrupt(files: dict[str, bytes], what: str) -> dict[str, bytes]:
    files = dict(files)
    labels = "run01/class_labels.txt"
    if what == "no labels":
        del files[labels]
    elif what == "bad line":
        files[labels] = files[labels].replace(b" run01/training/", b" ", 1).replace(b"class", b"klass", 1)
    elif what == "unknown class":
        files[labels] = files[labels].replace(b"class01.png", b"class09.png")
    elif what == "unlabelled item":
        files[labels] = b"\n".join(files[labels].splitlines()[1:]) + b"\n"
    elif what == "bad png":
        files["run02/test/item02.png"] = b"\x89PNG\r\n\x1a\n not an image"
    elif what == "short run":  # run02 loses its class04 drawing and the test item of that class
        lines = files["run02/class_labels.txt"].splitlines()
        gone = next(ln.split()[0].decode() for ln in lines if b"class04" in ln)
        files["run02/class_labels.txt"] = b"\n".join(ln for ln in lines if b"class04" not in ln) + b"\n"
        del files["run02/training/class04.png"], files[gone]
    return files


@pytest.mark.parametrize(
    "what,needle",
    [
        ("no labels", r"run01/class_labels.txt is missing: restore it"),
        ("bad line", r"class_labels.txt.*:1: expected 'run01/test/itemNN.png run01/training/classNN.png'"),
        ("unknown class", r"class_labels.txt.*: run01/training/class09.png does not exist: restore the run"),
        ("unlabelled item", r"class_labels.txt.* gives no training class for run01/test/item01.png"),
        ("bad png", r"image run02/test/item02.png in .*all_runs.zip cannot be decoded"),
        ("short run", r"all_runs.zip: run02 has 3 training drawings where the other runs have 4: restore it"),
    ],
)
def test_bad_files_give_one_line(tmp_path: Path, what: str, needle: str) -> None:
    path = write_runs(tmp_path / "runs", "zip", _corrupt(run_files(), what))
    with pytest.raises(DataError, match=needle) as err:
        load_lake_runs(path, 28)
    assert "\n" not in str(err.value)


def test_missing_or_broken_paths_give_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"eval.lake_runs=.*absent does not exist: point it at all_runs.zip"):
        load_lake_runs(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds none of Lake's runs: expected runNN/ folders, all_runs.zip"):
        load_lake_runs(tmp_path / "empty")
    broken = tmp_path / "all_runs.zip"
    broken.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"all_runs.zip is not a valid zip archive .*download again"):
        load_lake_runs(broken)


# --- the splits do not leak -----------------------------------------------------------------------------
def _preset(compose, *overrides: str):
    return to_typed(compose(*overrides))


@pytest.mark.parametrize("preset", ["omniglot_lake_cpu", "omniglot_lake"])
def test_presets_train_and_validate_on_background_alphabets_only(compose, preset: str) -> None:
    cfg = _preset(compose, f"experiment={preset}")
    assert cfg.dataset.ways == 20 and cfg.dataset.shots == 1 and cfg.eval.lake_runs
    train = read_split(cfg.dataset.train_split)
    val = read_split(cfg.dataset.val_split)
    test = read_split(cfg.dataset.test_split)
    alphabets = {
        role: {lake.alphabet(e.character) for e in s} for role, s in [("train", train), ("val", val)]
    }
    for role in ("train", "val"):
        assert not alphabets[role] & lake.EVALUATION_ALPHABETS, role
    assert not alphabets["train"] & alphabets["val"]  # whole alphabets held out
    assert len(alphabets["train"] | alphabets["val"]) == 30
    assert len({e.character for e in train}) + len({e.character for e in val}) == 964
    assert {e.rotation for e in train} == {0, 90, 180, 270} and {e.rotation for e in val} == {0}
    assert {lake.alphabet(e.character) for e in test} == lake.EVALUATION_ALPHABETS
    assert len(test) == 659 and {e.rotation for e in test} == {0}
    assert lake.leaks(cfg) == {"train": 0, "val": 0}
    # the check that would have caught it: the Vinyals split trains on evaluation characters
    assert lake.leaks(_preset(compose, "experiment=omniglot_20w1s_cpu"))["train"] > 0


def test_real_runs_characters_are_not_in_the_presets_splits(compose) -> None:
    """Each real run's drawing is identified (exactly, at the training size) among the Omniglot
    evaluation drawings: so its preprocessing is the training one, its labels pair drawings of one
    character, each run is within one alphabet, and no character of the runs is trained or validated on."""
    root = _real_root()
    runs = load_lake_runs(root, 28)
    evaluation = load_omniglot(root, "evaluation", 28, cache_dir=_cache(root))
    where: dict[bytes, list[str]] = {}
    for c, name in enumerate(evaluation.classes):
        for image in evaluation.images[c]:
            where.setdefault(image.numpy().tobytes(), []).append(name.rsplit("/", 1)[0])
    used: set[str] = set()
    for run in runs.runs:
        support = [where.get(x.numpy().tobytes(), []) for x in run.support]
        query = [where.get(x.numpy().tobytes(), []) for x in run.query]
        assert all(len(m) == 1 for m in support + query), run.name
        assert [query[j][0] for j in range(len(query))] == [support[int(y)][0] for y in run.labels]
        assert len({lake.alphabet(m[0]) for m in support}) == 1, run.name
        used |= {m[0] for m in support}
    # 20 runs of 20 characters: 10 alphabets, each giving two runs over the same 20 characters
    assert len(runs) == 20 and runs.ways == 20 and len(used) == 200
    assert len({lake.alphabet(c) for c in used}) == 10
    for preset in ("omniglot_lake_cpu", "omniglot_lake"):
        cfg = _preset(compose, f"experiment={preset}")
        for split in (cfg.dataset.train_split, cfg.dataset.val_split):
            assert not used & {e.character for e in read_split(split)}, (preset, split)
    vinyals = {e.character for e in read_split("train")}
    assert used & vinyals  # the Vinyals training split does hold characters of the runs


# --- scoring, checked against a computation by hand -----------------------------------------------------
def _hand_forward(state: dict[str, torch.Tensor], x: torch.Tensor, n_ref: int, blocks: int) -> torch.Tensor:
    """conv4 written out: each batch norm uses the statistics of the first ``n_ref`` rows."""
    h = x
    for i in range(1, blocks + 1):
        h = F.conv2d(h, state[f"block{i}.conv.weight"], state[f"block{i}.conv.bias"], padding=1)
        ref = h[:n_ref]
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)
        var = ref.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5)
        h = h * state[f"block{i}.norm.weight"].view(1, -1, 1, 1) + state[f"block{i}.norm.bias"].view(
            1, -1, 1, 1
        )
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.flatten(1), state["head.weight"], state["head.bias"])


def _hand_score(zip_path: Path, run: str, learner, steps: int, lr: float, blocks: int) -> dict:
    """One run read with PIL, adapted with plain SGD and classified in the three ways, by hand:
    the logits of each mode, the labels, and the drawings."""
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()

        def image(name: str) -> torch.Tensor:
            member = next(n for n in names if n.endswith(name))
            img = ImageOps.invert(Image.open(io.BytesIO(zf.read(member))).convert("L"))
            img = img.resize((28, 28), Image.Resampling.LANCZOS)
            return torch.tensor(np.asarray(img, dtype=np.uint8)).unsqueeze(0)

        labels_member = next(n for n in names if n.endswith(f"{run}/class_labels.txt"))
        pairs = [ln.split() for ln in zf.read(labels_member).decode().splitlines() if ln.strip()]
        classes = sorted(n.rsplit("/", 1)[-1] for n in names if f"{run}/training/class" in n)
        items = sorted(n.rsplit("/", 1)[-1] for n in names if f"{run}/test/item" in n)
        label_of = {a.rsplit("/", 1)[-1]: classes.index(b.rsplit("/", 1)[-1]) for a, b in pairs}
        pixels = {
            "sx": torch.stack([image(f"{run}/training/{c}") for c in classes]),
            "qx": torch.stack([image(f"{run}/test/{i}") for i in items]),
        }
    # as the episode sampler makes inputs: float32 in [0, 1], then the model's dtype
    sx, qx = (pixels[k].float().div(255.0).double() for k in ("sx", "qx"))
    sy = torch.arange(len(classes))
    state = {k: v.detach().clone().double() for k, v in learner.model.state_dict().items()}
    for _ in range(steps):
        leaves = {k: v.requires_grad_(True) for k, v in state.items()}
        loss = F.cross_entropy(_hand_forward(leaves, sx, len(sx), blocks), sy)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        state = {k: (v - lr * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    with torch.no_grad():
        logits = {
            "transductive": _hand_forward(state, qx, len(qx), blocks),
            "alone": torch.cat([_hand_forward(state, qx[i : i + 1], 1, blocks) for i in range(len(qx))]),
            "support": _hand_forward(state, torch.cat([sx, qx]), len(sx), blocks)[len(sx) :],
        }
    return {"logits": logits, "labels": [label_of[i] for i in items], **pixels}


def _learner(ways: int, filters: int = 8, blocks: int = 4, seed: int = 0):
    shape = TaskShape("classification", (1, 28, 28), ways)
    meta = MetaConfig(inner_lr=0.1, inner_steps=5)
    return build.meta_learner(
        Conv4Config(filters=filters, blocks=blocks), "teacher", shape, meta, seed
    ).double()


def _compare_with_hand(zip_path: Path, ways: int, blocks: int) -> None:
    learner = _learner(ways, blocks=blocks)
    loaded = load_lake_runs(zip_path, 28)
    runs = LakeRuns(loaded.runs[:1], loaded.source)  # run 1
    scores = lake.score(learner, runs, steps=5, dtype=torch.float64)
    hand = _hand_score(zip_path, "run01", learner, steps=5, lr=0.1, blocks=blocks)
    run = runs.runs[0]
    sx, qx = run.support_x(torch.float64), run.query_x(torch.float64)
    assert torch.equal(run.support, hand["sx"]) and torch.equal(run.query, hand["qx"])  # PIL's pixels
    assert scores.labels[0] == hand["labels"]
    params, lrs = learner.frozen()
    fast = learner.adapt(params, lrs, sx, run.support_y(), steps=5, create_graph=False)
    for mode in lake.MODES:
        expected = hand["logits"][mode]
        torch.testing.assert_close(lake.classify(learner.model, fast, sx, qx, mode), expected)
        assert scores.predictions[mode][0] == expected.argmax(1).tolist(), mode
        wrong = sum(int(p) != y for p, y in zip(expected.argmax(1), hand["labels"]))
        assert scores.errors(mode)[0] == pytest.approx(wrong / len(hand["labels"]))
    # batching matters: the three modes give different logits for the same drawings
    h = hand["logits"]
    assert not torch.allclose(h["transductive"], h["support"]) and not torch.allclose(
        h["alone"], h["support"]
    )


def test_scoring_matches_a_hand_computation(tmp_path: Path) -> None:
    _compare_with_hand(write_runs(tmp_path / "runs"), WAYS, blocks=2)


def test_real_run_1_scored_by_hand() -> None:
    root = _real_root()
    _compare_with_hand(locate(root), 20, blocks=4)


def test_statistics_over_runs_and_the_paired_difference() -> None:
    labels = [[0, 1, 2, 3]] * 5
    a = lake.Scores(
        {m: [[0, 1, 2, 3], [1, 1, 2, 3], [0, 0, 0, 3], [0, 1, 2, 3], [3, 2, 1, 0]] for m in lake.MODES},
        labels,
    )
    b = lake.Scores(
        {m: [[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 3], [0, 1, 2, 3], [3, 2, 1, 3]] for m in lake.MODES},
        labels,
    )
    fake = type(
        "Runs",
        (),
        {"runs": [type("R", (), {"name": f"run{i:02d}"})() for i in range(5)], "ways": 4, "source": "x"},
    )
    section = lake.summarise_runs({"student_kd": a, "student_base": b}, fake, 5)
    ea = [0.0, 0.25, 0.5, 0.0, 1.0]
    eb = [0.25, 0.0, 0.25, 0.0, 0.75]
    entry = section["models"]["student_kd"]["error"]["support"]
    assert entry["per_run"] == ea
    assert entry["mean"] == pytest.approx(sum(ea) / 5)
    sd = float(np.std(ea, ddof=1))
    assert entry["ci95"] == pytest.approx(2.7764451051977987 * sd / math.sqrt(5))  # Student t, 4 d.o.f.
    d = [x - y for x, y in zip(ea, eb)]
    pair = section["paired"]["student_kd-student_base"]["alone"]
    assert pair["per_run"] == pytest.approx(d) and pair["mean"] == pytest.approx(sum(d) / 5)
    assert pair["ci95"] == pytest.approx(2.7764451051977987 * float(np.std(d, ddof=1)) / math.sqrt(5))
    assert (pair["runs_lower"], pair["runs_higher"]) == (1, 3)
    table = lake_table(section)
    assert "student (MKD) - student (baseline) (paired)" in table and "people 4.5" in table
    assert "support (fair)" in table


# --- refusals and the command line ----------------------------------------------------------------------
def test_a_head_of_other_ways_is_refused(compose, tmp_path: Path) -> None:
    path = write_runs(tmp_path / "runs")
    cfg = _preset(compose, "experiment=omniglot_5w1s", "dataset.ways=5", f"eval.lake_runs={path}")
    with pytest.raises(
        ConfigError, match=rf"dataset.ways=5 is invalid with eval.lake_runs: .* are {WAYS}-way"
    ):
        lake.check(cfg)
    cfg = _preset(compose, "experiment=sinusoid", f"eval.lake_runs={path}")
    with pytest.raises(ConfigError, match=r"Lake's runs are Omniglot drawings"):
        lake.check(cfg)
    cfg = _preset(compose, "experiment=omniglot_lake_cpu", f"dataset.root={tmp_path / 'nowhere'}")
    with pytest.raises(
        DataError, match=r"eval.lake_runs=dataset.root=.*nowhere does not exist: set METAKD_DATA_ROOT"
    ):
        lake.check(cfg)


TINY_OMNIGLOT = [
    "experiment=omniglot_5w1s",
    f"dataset.ways={WAYS}",
    "dataset.queries=2",
    "teacher.filters=4",
    "student.filters=2",
    "teacher.blocks=2",
    "student.blocks=2",
    "meta.inner_steps=1",
    "eval=lake_runs",
]


def _tiny_data(tmp_path: Path) -> tuple[Path, list[str]]:
    """The tiny Omniglot with 8 training, 4 validation and 4 test classes, and the runs under its root."""
    root = make_omniglot(tmp_path / "data", "zip")
    write_runs(root / "omniglot" / "one-shot-classification")
    rot = (0, 90, 180, 270)
    splits = {
        "train": [f"Alpha/character0{c}/rot{r:03d}" for c in (1, 2) for r in rot],
        "val": [f"Beta/character01/rot{r:03d}" for r in rot],
        "test": [f"Gamma/character0{c}/rot{r:03d}" for c in (1, 2) for r in (0, 90)],
    }
    args = [f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'cache'}"]
    for role, lines in splits.items():
        (tmp_path / f"{role}.txt").write_text("\n".join(lines) + "\n")
        args.append(f"dataset.{role}_split={tmp_path / f'{role}.txt'}")
    return root, args


def test_cli_scores_the_three_models_on_the_runs(run_cli, tmp_path: Path, capsys) -> None:
    _, data = _tiny_data(tmp_path)
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY_OMNIGLOT, *data, run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = read_summary(run_dir)["lake_runs"]
    assert section["runs"] == ["run01", "run02"] and section["ways"] == WAYS and section["steps"] == 3
    assert section["leaks"] == {"train": 0, "val": 0}
    for name in ("teacher", "student_kd", "student_base"):
        for mode in lake.MODES:
            entry = section["models"][name]["error"][mode]
            # each run's error is a count of its WAYS test items; mean and t-interval recomputed here
            assert len(entry["per_run"]) == RUNS
            assert all(e * WAYS == pytest.approx(round(e * WAYS)) for e in entry["per_run"]), entry
            assert entry["mean"] == pytest.approx(sum(entry["per_run"]) / RUNS)
            sd = float(np.std(entry["per_run"], ddof=1))
            assert entry["ci95"] == pytest.approx(12.706204736174707 * sd / math.sqrt(RUNS), abs=1e-12)
    assert set(section["paired"]["student_kd-student_base"]) == set(lake.MODES)
    assert "Lake et al.'s 2 one-shot runs (4-way" in proc.stdout and "people 4.5" in proc.stdout
    scalars = TensorBoardRuns(run_dir).tags("scalars")
    assert {"teacher/lake_error/support", "student_kd/lake_error_by_run/transductive"} <= scalars
    assert "paired/student_kd-student_base/lake_error/alone" in scalars
    # the same figures from the finished run, by the module's own command
    # --threads 0: leave the threads of this process alone
    assert lake_command.main([str(run_dir), "--threads", "0"]) == 0
    again = json.loads((run_dir / "lake_runs.json").read_text())
    for name, model in section["models"].items():
        for mode in lake.MODES:
            assert again["models"][name]["error"][mode]["per_run"] == model["error"][mode]["per_run"]
    assert "Lake et al.'s 2 one-shot runs" in capsys.readouterr().out


def test_cli_refuses_other_ways_before_training(run_cli, tmp_path: Path) -> None:
    _, data = _tiny_data(tmp_path)
    args = [a for a in TINY_OMNIGLOT if not a.startswith("dataset.ways=")]
    proc = run_cli(*args, *data, "dataset.ways=3", run_dir=tmp_path / "r")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("metakd-run: error")]
    assert len(lines) == 1 and "dataset.ways=3" in lines[0] and f"{WAYS}-way" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()


# --- the real runs (skipped unless METAKD_DATA_ROOT names them) -----------------------------------------
def _real_root() -> Path:
    """``$METAKD_DATA_ROOT``; unset: the test skips. Set, the runs must be found there: a DataError
    from ``locate`` fails the test instead of hiding behind a skip."""
    value = os.environ.get("METAKD_DATA_ROOT")
    if not value:
        pytest.skip("METAKD_DATA_ROOT is not set")
    assert Path(value).is_dir(), f"METAKD_DATA_ROOT={value} is not a folder"
    locate(value)
    return Path(value)


def _cache(root: Path) -> Path:
    from metakd_run.data.cache import default_cache_dir

    return default_cache_dir(root)
