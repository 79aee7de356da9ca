"""The results ledger: the single source of every published figure.

``results/`` in the repository holds one small record per run that a published table uses (the way
pytorch-image-models keeps its measured results beside the code): the overrides, the fingerprint of
the resolved settings, the commit, the machine, the wall and CPU time, the summary and the per-task
test metric of every model. The docs' result tables are rendered from these records alone, and a
test renders them again and compares, so a published number cannot drift from the data behind it.

    python -m metakd_run.ledger add results/<study> <run or sweep folder>...   # record finished runs
    python -m metakd_run.ledger render --write                                # docs' tables from the ledger
    python -m metakd_run.ledger render --check                                # exit 1 if the docs differ

A study is a folder ``results/<study>/`` with ``study.yaml`` (its title, the command that produced
its runs, the split it was scored on, the claim it tests) and ``runs/*.json.gz``. Seeds are the
unit of a claim: each record is one seed of one setting; a table row is a setting over its seeds
(Student-t 95% intervals, the paired distilled-minus-baseline difference seed by seed, its wins).
The per-seed means are recomputed from the per-task records, not copied from the summaries.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metakd_run.evaluation.stats import t_interval
from metakd_run.names import primary_metric, scale

SCHEMA = 1
BEGIN, END = "<!-- ledger:begin -->", "<!-- ledger:end -->"
REPO = Path(__file__).resolve().parent.parent
# Overrides that say how a run was executed, not which setting it is: not part of a row's name.
EXECUTION_PREFIXES = (
    "threads",
    "hydra",
    "train.teacher_cache",
    "train.progress",
    "train.accept_mismatch",
    "device",
    "meta.batching",
    "meta.chunk",
)
MODELS = ("teacher", "student_kd", "student_base")


class LedgerError(ValueError):
    """A folder that holds no finished run, or a study folder without its description."""


# --- records ---------------------------------------------------------------------------------
def finished_runs(folder: Path) -> list[Path]:
    """``folder`` itself if it is a finished run, else its finished sweep jobs (sorted)."""
    if (folder / "summary.json").is_file():
        return [folder]
    jobs = [d for d in folder.iterdir() if d.is_dir() and (d / "summary.json").is_file()]
    return sorted(jobs, key=lambda d: (0, int(d.name), "") if d.name.isdigit() else (1, 0, d.name))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LedgerError(f"{path} cannot be read as JSON ({err})") from err


def _round(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") if math.isfinite(v) else v for v in values]


def make_record(run: Path) -> dict[str, Any]:
    """The ledger's record of one finished run folder."""
    summary = _read_json(run / "summary.json")
    per_task = _read_json(run / "per_task.json") if (run / "per_task.json").is_file() else {}
    timings = _read_json(run / "timings.json") if (run / "timings.json").is_file() else {}
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = []
    if overrides_file.is_file():
        overrides = [str(o) for o in yaml.safe_load(overrides_file.read_text()) or []]
    config_file = run / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    fingerprint_file = run / "fingerprint.json"
    if fingerprint_file.is_file():
        fingerprint = _read_json(fingerprint_file).get("digest")
    else:  # a run from before fingerprints: the resolved config's hash names it
        import hashlib

        fingerprint = "config-" + hashlib.sha256(config_file.read_bytes()).hexdigest()[:16]
    metric, _ = primary_metric(summary.get("task") or "regression")
    threads = int(config.get("threads") or 0) or int(summary.get("environment", {}).get("threads", 1))
    return {
        "schema": SCHEMA,
        "run": f"{run.parent.name}/{run.name}",
        "overrides": overrides,
        "seed": int(config.get("seed", summary.get("hparams", {}).get("seed", 0))),
        "fingerprint": fingerprint,
        "commit": summary.get("environment", {}).get("git_commit"),
        # the summary's environment (device, versions) and the machine that adds the record
        "machine": {**summary.get("environment", {}), "threads": threads, "host": platform.machine()},
        "timings": timings,
        "summary": summary,
        "per_task": {
            model: {step: _round(values) for step, values in metrics.get(metric, {}).items()}
            for model, metrics in per_task.items()
        },
    }


def record_path(study: Path, record: dict[str, Any]) -> Path:
    return study / "runs" / f"seed{record['seed']}-{record['fingerprint']}.json.gz"


def write_record(study: Path, record: dict[str, Any]) -> Path:
    """gzip with no timestamp or name inside: the same record gives the same bytes."""
    path = record_path(study, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    return path


def read_records(study: Path) -> list[dict[str, Any]]:
    runs = sorted((study / "runs").glob("*.json.gz")) if (study / "runs").is_dir() else []
    return [json.loads(gzip.decompress(p.read_bytes())) for p in runs]


def add(study: Path, folders: list[Path]) -> list[Path]:
    """Record every finished run of ``folders`` in ``study`` (a folder with ``study.yaml``)."""
    if not (study / "study.yaml").is_file():
        raise LedgerError(f"{study} has no study.yaml: create it first (title, command, split, claim)")
    written = []
    for folder in folders:
        runs = finished_runs(folder)
        if not runs:
            raise LedgerError(f"{folder} holds no finished run (no summary.json in it or its jobs)")
        for run in runs:
            record = make_record(run)
            for stale in same_setting_and_seed(study, record):
                stale.unlink()  # the same seed of the same setting, recorded again: the newer one stands
            written.append(write_record(study, record))
    return written


def same_setting_and_seed(study: Path, record: dict[str, Any]) -> list[Path]:
    """Records of ``study`` other than ``record``'s own file with its seed and setting: the same run
    added again after its fingerprint's digest changed (a settings key that later became an execution
    key, say), which would otherwise count one seed twice."""
    name, own = setting_name(record["overrides"]), record_path(study, record)
    runs = sorted((study / "runs").glob("*.json.gz")) if (study / "runs").is_dir() else []
    out = []
    for path in runs:
        other = json.loads(gzip.decompress(path.read_bytes()))
        if path != own and other["seed"] == record["seed"] and setting_name(other["overrides"]) == name:
            out.append(path)
    return out


# --- statistics over seeds -------------------------------------------------------------------
@dataclass
class Setting:
    """One row: the records of one setting (the same overrides but for the seed)."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def metric(self) -> tuple[str, bool, float]:
        """The primary metric, whether higher is better, and its display scale (percent)."""
        metric, higher = primary_metric(self.records[0]["summary"].get("task") or "regression")
        return metric, higher, scale(metric)

    def step(self) -> str:
        """The reported inner step a row shows: the last of eval.report_steps."""
        steps = [int(k.split("_")[1]) for k in self.records[0]["per_task"].get("student_kd", {})]
        return f"step_{max(steps)}" if steps else "step_0"

    def seed_means(self, model: str) -> dict[int, float]:
        """Each seed's mean over its test tasks, recomputed from the per-task records."""
        step = self.step()
        out = {}
        for r in self.records:
            values = r["per_task"].get(model, {}).get(step)
            if values:
                out[r["seed"]] = sum(values) / len(values)
        return out

    def parameters(self, model: str) -> int | None:
        entry = self.records[0]["summary"]["models"].get(model, {})
        return entry.get("parameters")

    def cpu_minutes(self, model: str) -> float | None:
        """Mean over seeds of the stage's training CPU time (the teacher's too when it was loaded
        from the cache: its checkpoint keeps what it cost)."""
        times = [m for r in self.records if (m := stage_cpu_minutes(r, model)) is not None]
        return sum(times) / len(times) if times else None


def stage_cpu_minutes(record: dict[str, Any], model: str) -> float | None:
    """A stage's CPU minutes: the process CPU time the training loop measured, or, for a stage
    trained before it measured that (or resumed from such a checkpoint), its wall time x threads,
    which counts the other jobs' share of the cores on a shared machine."""
    stage = record.get("timings", {}).get(model)
    if not isinstance(stage, dict) or "seconds" not in stage:
        return None
    if stage.get("cpu_seconds") is not None:
        return stage["cpu_seconds"] / 60.0
    return stage["seconds"] * record["machine"]["threads"] / 60.0


def cpu_basis(records: list[dict[str, Any]]) -> str:
    """What a table's CPU minutes are: measured, estimated from wall time, or some of each."""
    stages = [
        stage
        for r in records
        for m in MODELS
        if isinstance(stage := r.get("timings", {}).get(m), dict) and "seconds" in stage
    ]
    measured = sum(1 for stage in stages if stage.get("cpu_seconds") is not None)
    if measured == len(stages):
        return "as the process CPU time the training loop measured"
    estimate = "wall time x threads (which on a shared machine also counts the other jobs' share)"
    if measured == 0:
        return f"estimated as {estimate}: these runs predate the loop's CPU clock"
    return f"measured process CPU time where the run kept it, else {estimate}"


def setting_name(overrides: list[str]) -> str:
    skip = ("seed", *EXECUTION_PREFIXES)
    kept = [o for o in overrides if not o.split("=", 1)[0].lstrip("+~").startswith(skip)]
    return " ".join(sorted(kept))


def settings_of(records: list[dict[str, Any]]) -> list[Setting]:
    groups: dict[str, Setting] = {}
    for r in sorted(records, key=lambda r: r["seed"]):
        name = setting_name(r["overrides"])
        group = groups.setdefault(name, Setting(name))
        if any(o["seed"] == r["seed"] for o in group.records):
            raise LedgerError(
                f"two records of seed {r['seed']} for the setting '{name}' ({r['run']}): add the run "
                "again with `python -m metakd_run.ledger add` (the newer record replaces the older) "
                "or delete one of its files under runs/"
            )
        group.records.append(r)
    return list(groups.values())


def _stat(values: list[float], scale: float, signed: bool = False) -> str:
    """``mean ± half-width`` over seeds (percent points for accuracies, 3 digits for losses)."""
    if not values:
        return "—"
    mean, ci = t_interval(values)
    sign = "+" if signed else ""
    text = f"{mean * scale:{sign}.1f}" if scale != 1 else f"{mean:{sign}.3g}"
    if math.isnan(ci):
        return text
    return f"{text} ± {ci * scale:.1f}" if scale != 1 else f"{text} ± {ci:.2g}"


def setting_row(s: Setting, shown: list[str]) -> list[str]:
    """The row's cells: the distinguishing overrides, then the three models, the paired
    difference, wins, gap closed, parameters and CPU minutes."""
    metric, higher, scale = s.metric()
    means = {m: s.seed_means(m) for m in MODELS}
    seeds, diffs = paired_differences(s)
    wins = sum(1 for d in diffs if (d > 0 if higher else d < 0))
    t, kd, base = (sum(means[m].values()) / len(means[m]) if means[m] else math.nan for m in MODELS)
    gap = (kd - base) / (t - base) * 100 if t == t and t != base else math.nan
    cpu = [s.cpu_minutes(m) for m in MODELS]
    params = [s.parameters(m) for m in MODELS]
    cells = [s.records[0]["overrides"] and _shown(s, shown) or "(preset)", ", ".join(map(str, seeds))]
    cells += [_stat(list(means[m].values()), scale) for m in MODELS]
    cells += [_stat(diffs, scale, signed=True), f"{wins}/{len(diffs)}", "—" if gap != gap else f"{gap:.0f}%"]
    cells += [" / ".join(f"{p:,}" if p else "—" for p in params)]
    cells += [" / ".join("—" if c is None else f"{c:.1f}" if c < 10 else f"{c:.0f}" for c in cpu)]
    return cells


def paired_differences(s: Setting) -> tuple[list[int], list[float]]:
    """The seeds with both students, and distilled minus undistilled on each (its test-task mean)."""
    kd, base = s.seed_means("student_kd"), s.seed_means("student_base")
    seeds = sorted(set(kd) & set(base))
    return seeds, [kd[k] - base[k] for k in seeds]


def choose(study: Path, min_seeds: int = 3) -> tuple[list[str], list[str]]:
    """The setting a search picks: the largest mean paired difference (distilled better than its
    undistilled twin), among the settings with at least ``min_seeds`` seeds. A search is made on
    validation: a study whose split is ``test`` is refused (the test split is scored once). Returns
    the chosen setting's overrides that the search varied, and a line per setting, best first."""
    info = yaml.safe_load((study / "study.yaml").read_text())
    if info.get("split") == "test":
        raise LedgerError(f"{study} is scored on the test split: choose on a validation study")
    settings = settings_of(read_records(study))
    ranked = []
    for s in settings:
        seeds, diffs = paired_differences(s)
        if len(seeds) >= min_seeds:
            _, higher, scale = s.metric()
            mean = sum(diffs) / len(diffs)
            ranked.append((mean if higher else -mean, s, f"{s.name}: {_stat(diffs, scale, signed=True)} "
                           f"over seeds {', '.join(map(str, seeds))}"))  # fmt: skip
    if not ranked:
        raise LedgerError(f"{study}: no setting has {min_seeds} seeds with both students yet")
    ranked.sort(key=lambda r: r[0], reverse=True)
    varied = varying_keys(settings)
    chosen = [o for o in ranked[0][1].name.split() if o.partition("=")[0] in varied]
    return chosen, [line for _, _, line in ranked]


def _shown(s: Setting, shown: list[str]) -> str:
    kv = dict(o.split("=", 1) for o in s.name.split() if "=" in o)
    text = ", ".join(f"{k}={kv[k]}" for k in shown if k in kv)
    return text or "(shared overrides only)"


def varying_keys(settings: list[Setting]) -> list[str]:
    """The override keys whose values differ between the settings of a study (its rows' names)."""
    values: dict[str, set[str]] = {}
    for s in settings:
        for o in s.name.split():
            key, _, value = o.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or any(k not in s.name for s in settings)]
    return sorted(keys) or sorted(values)


def _all(settings: list[Setting], keys: list[str]) -> list[str]:
    """The overrides of ``keys`` that some row names (its distinguishing ones)."""
    return [o for s in settings for o in s.name.split() if o.partition("=")[0] in keys]


def render_study(study: Path) -> list[str]:
    """The markdown of one study: heading, command, split, the table, the claim's verdict."""
    info = yaml.safe_load((study / "study.yaml").read_text())
    records = read_records(study)
    lines = [f"### {info['title']}", ""]
    if info.get("about"):
        lines += [info["about"].strip(), ""]
    lines += ["```bash", info["command"].strip(), "```", ""]
    if not records:
        return lines + ["No finished run is recorded yet.", ""]
    settings = settings_of(records)
    metric, higher, scale = settings[0].metric()
    step = settings[0].step().replace("step_", "")
    shown = varying_keys(settings)
    unit = " (%)" if scale != 1 else ""
    header = [
        "setting", "seeds", f"teacher{unit}", f"distilled{unit}", f"baseline{unit}",
        f"distilled − baseline{unit}", "wins", "gap closed", "parameters (t / d / b)", "CPU min (t / d / b)",
    ]  # fmt: skip
    lines += [
        f"Split: **{info['split']}**; {metric} after {step} inner steps on "
        f"{len(records[0]['per_task']['student_kd'][f'step_{step}'])} tasks per seed; mean ± Student-t 95% "
        "interval over seeds; the difference is paired seed by seed. CPU min: each stage's training "
        f"time (its validations included), mean over seeds, {cpu_basis(records)}.",
        "",
    ]
    shared = sorted({o for s in settings for o in s.name.split()} - {o for o in _all(settings, shown)})
    if shared and len(settings) > 1:
        lines += ["Every row also has: `" + " ".join(shared) + "`.", ""]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(setting_row(s, shown)) + " |" for s in settings]
    where = study.relative_to(REPO) if study.is_relative_to(REPO) else study
    commits = ", ".join(sorted({str(r["commit"])[:7] for r in records}))
    lines += ["", f"Records: `{where}/runs/` ({len(records)} runs; commits {commits})."]
    return lines + [""]


def render(results: Path) -> str:
    """Every study of ``results/`` in the order of ``results/index.yaml``."""
    order = yaml.safe_load((results / "index.yaml").read_text()).get("studies", [])
    lines: list[str] = [
        "<!-- generated by `python -m metakd_run.ledger render --write` from results/; do not edit -->",
        "",
    ]
    for name in order:
        lines += render_study(results / name)
    return "\n".join(lines).rstrip() + "\n"


def replace_block(text: str, block: str, path: Path) -> str:
    if BEGIN not in text or END not in text:
        raise LedgerError(f"{path} has no {BEGIN} ... {END} block for the ledger's tables")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metakd_run.ledger", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("add", help="record finished runs (a run folder or a sweep folder) in a study")
    a.add_argument("study", type=Path, help="results/<study> (holding study.yaml)")
    a.add_argument("folders", type=Path, nargs="+")
    c = sub.add_parser("choose", help="the setting a search on val picks (largest mean paired difference)")
    c.add_argument("study", type=Path, help="results/<study> of a search (split: val)")
    c.add_argument("--min-seeds", type=int, default=3, help="only settings with this many seeds")
    r = sub.add_parser("render", help="render the docs' result tables from the ledger")
    r.add_argument("--results", type=Path, default=REPO / "results")
    r.add_argument("--docs", type=Path, default=REPO / "docs" / "results.md")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="replace the docs' ledger block")
    mode.add_argument("--check", action="store_true", help="exit 1 if the docs' block differs")
    args = parser.parse_args(argv)
    try:
        if args.command == "add":
            for path in add(args.study, args.folders):
                print(path)
            return 0
        if args.command == "choose":
            chosen, lines = choose(args.study, args.min_seeds)
            print(" ".join(chosen))  # the overrides to score on the test split
            for line in lines:
                print(f"  {line}", file=sys.stderr)
            return 0
        block = render(args.results)
        if not (args.write or args.check):
            print(block, end="")
            return 0
        text = args.docs.read_text()
        new = replace_block(text, block, args.docs)
        if args.check:
            if new != text:
                fix = "python -m metakd_run.ledger render --write"
                print(f"{args.docs}: the ledger's tables differ; run {fix}", file=sys.stderr)
                return 1
            return 0
        args.docs.write_text(new)
        return 0
    except LedgerError as err:
        print(f"metakd-run ledger: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
