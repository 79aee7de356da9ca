"""Ordinary distillation against meta-distillation (MKD) at the same budget in CPU-minutes.

    METAKD_DATA_ROOT=../shared/data python scripts/kd_vs_mkd.py --experiment miniimagenet_5w1s_cpu \\
        --seeds 0 1 2 3 4 [--mkd-family protonet] [--threads 1] [--out outputs/kd_vs_mkd] [OVERRIDE ...]

The question a reviewer asks first: does distilling per task (a meta-learned teacher adapted to
each task, into a meta-learned student) beat plain knowledge distillation of a pretrained network
(Hinton's KL on the logits over the training classes, no tasks), with the same teacher and student
architectures, the same data and the same compute? Iterations are not the same compute: a pretrain
step is one mini-batch, a meta-step a meta-batch of episodes. So:

1. The MKD arm: the experiment's three stages with ``meta=<--mkd-family>`` (teacher, distilled
   student, undistilled student), once per seed, with the preset's iterations.
2. Its budget: the mean over seeds of each stage's training CPU seconds (the teacher's, and the
   distilled student's, which is the dearer student stage), validation left out. It is fixed the
   first time (``<out>/<experiment>/kd/plan.json``): rerunning with more seeds keeps it.
3. Calibration: a short ``meta=pretrain`` run measures the CPU seconds of one pretrain iteration of
   the teacher and of the distilled student.
4. The KD arm: ``meta=pretrain`` with the iterations that spend the MKD arm's budget, the same
   number of validations, once per seed. Both students of an arm share their iteration count.
5. The table (``kd_vs_mkd.md``, ``kd_vs_mkd.json`` in ``--out``): per arm the teacher, distilled and
   undistilled accuracy (mean ± Student-t 95% over seeds), distilled minus undistilled (paired seed
   by seed), and between the arms KD minus MKD for the distilled and the undistilled students (the
   meta-test tasks depend on ``eval.seed`` only, so both arms score the same tasks); the CPU-minutes
   each stage took, measured, so the match of the budgets can be read.

Rerunning the same command continues: a run folder that holds ``summary.json`` is kept (its
measured CPU/wall ratio is in its ``budget.json``). Extra arguments go to every run as overrides
(``train.teacher_cache=...``, ``eval.split=val``, ``dataset.train_split=...``). CPU time is measured
as in ``scripts/cpu_budget.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from cpu_budget import run, stage_timings, training_seconds_per_iteration

from metakd_run.evaluation.stats import t_interval

MODELS = ("teacher", "student_kd", "student_base")
LABELS = {"teacher": "teacher", "student_kd": "distilled", "student_base": "undistilled"}


def ensure_run(overrides: list[str], run_dir: Path) -> float:
    """Run unless ``run_dir`` is finished; return the run's CPU/wall ratio (kept in budget.json)."""
    record = run_dir / "budget.json"
    if (run_dir / "summary.json").is_file() and record.is_file():
        return float(json.loads(record.read_text())["cpu_per_wall"])
    cpu, wall = run(overrides, run_dir)
    share = min(1.0, cpu / wall)
    record.write_text(json.dumps({"cpu_seconds": cpu, "wall_seconds": wall, "cpu_per_wall": share}))
    return share


def accuracy(run_dir: Path) -> dict[str, float]:
    """Each model's mean meta-test accuracy at its last reported step."""
    summary = json.loads((run_dir / "summary.json").read_text())
    out = {}
    for model in MODELS:
        curve = summary["models"][model]["metrics"]["accuracy"]
        last = max((k for k in curve if k.startswith("step_")), key=lambda k: int(k.split("_")[1]))
        out[model] = 100.0 * curve[last]["mean"]
    return out


def cpu_minutes(run_dir: Path, share: float) -> dict[str, float]:
    """Each stage's training CPU-minutes (validation and meta-test left out), resumed or not."""
    timings = stage_timings(run_dir)
    return {
        m: training_seconds_per_iteration(timings[m], share) * timings[m]["iterations"] / 60 for m in MODELS
    }


def config_value(run_dir: Path, *keys: str) -> Any:
    """A value of the run's resolved config (``.hydra/config.yaml``)."""
    import yaml

    node = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    for key in keys:
        node = node[key]
    return node


def interval(values: list[float]) -> str:
    mean, half = t_interval(values)
    return f"{mean:.1f} ± {half:.1f}" if math.isfinite(half) else f"{mean:.1f}"


def signed(values: list[float]) -> str:
    mean, half = t_interval(values)
    text = f"{mean:+.1f} ± {half:.1f}" if math.isfinite(half) else f"{mean:+.1f}"
    return f"{text} ({sum(v > 0 for v in values)}/{len(values)})"


def kd_plan(
    args: argparse.Namespace,
    base: list[str],
    mkd: dict[int, Path],
    mkd_minutes: dict[int, dict[str, float]],
    calib: Path,
) -> dict[str, Any]:
    """The KD arm's iterations: the MKD arm's mean training CPU-minutes per stage (teacher, distilled
    student) divided by a calibrated pretrain iteration's CPU seconds; as many validations."""
    budget = {m: statistics.mean(mkd_minutes[s][m] for s in mkd) for m in ("teacher", "student_kd")}
    first = mkd[min(mkd)]
    its, val_every = (int(config_value(first, "train", k)) for k in ("iterations", "val_every"))
    validations = max(1, its // val_every)
    c = args.calibrate
    short = [f"train.iterations={c}", f"train.student_iterations={c}", f"train.val_every={c}",
             "train.val_tasks=2", "eval.tasks=2", "eval.batch=2", f"seed={min(mkd)}"]  # fmt: skip
    share = ensure_run([*base, "meta=pretrain", *short], calib)
    timings = stage_timings(calib)
    per_it = {m: training_seconds_per_iteration(timings[m], share) for m in ("teacher", "student_kd")}
    teacher_its = max(validations, round(budget["teacher"] * 60 / per_it["teacher"]))
    student_its = max(validations, round(budget["student_kd"] * 60 / per_it["student_kd"]))
    return {
        "budget_seeds": sorted(mkd),
        "budget_cpu_minutes": budget,
        "pretrain_cpu_seconds_per_iteration": per_it,
        "teacher_iterations": teacher_its,
        "student_iterations": student_its,
        "val_every": max(1, min(teacher_its, student_its) // validations),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", required=True, help="an image preset, e.g. miniimagenet_5w1s_cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--mkd-family", default="protonet", help="the meta-learned family: protonet, maml, cnp"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibrate", type=int, default=20, help="iterations of each calibration stage")
    parser.add_argument("--out", type=Path, default=Path("outputs/kd_vs_mkd"))
    args, extra = parser.parse_known_args()
    if args.mkd_family == "pretrain":
        sys.exit(
            "kd_vs_mkd.py: --mkd-family=pretrain is invalid: the MKD arm is meta-learned (protonet/maml/cnp)"
        )
    out = args.out / args.experiment
    base = [f"experiment={args.experiment}", f"threads={args.threads}", "train.progress=false", *extra]

    # 1-2: the MKD arm and its budget
    mkd = {s: out / "mkd" / f"seed{s}" for s in args.seeds}
    shares = {s: ensure_run([*base, f"meta={args.mkd_family}", f"seed={s}"], d) for s, d in mkd.items()}
    mkd_minutes = {s: cpu_minutes(d, shares[s]) for s, d in mkd.items()}
    plan_file = out / "kd" / "plan.json"  # the KD arm's budget, fixed once (more seeds later keep it)
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())
    else:
        plan = kd_plan(args, base, mkd, mkd_minutes, out / "kd" / "calibration")
        plan_file.write_text(json.dumps(plan, indent=2))
    budget, teacher_its, student_its, every = (
        plan["budget_cpu_minutes"],
        plan["teacher_iterations"],
        plan["student_iterations"],
        plan["val_every"],
    )

    # 4: the KD arm at that budget
    kd_overrides = ["meta=pretrain", f"train.iterations={teacher_its}",
                    f"train.student_iterations={student_its}", f"train.val_every={every}",
                    f"train.checkpoint_every={every}"]  # fmt: skip
    kd = {s: out / "kd" / f"seed{s}" for s in args.seeds}
    kd_shares = {s: ensure_run([*base, *kd_overrides, f"seed={s}"], d) for s, d in kd.items()}
    kd_minutes = {s: cpu_minutes(d, kd_shares[s]) for s, d in kd.items()}

    # 5: the table
    acc = {"mkd": {s: accuracy(d) for s, d in mkd.items()}, "kd": {s: accuracy(d) for s, d in kd.items()}}
    minutes = {"mkd": mkd_minutes, "kd": kd_minutes}
    names = {"mkd": f"MKD ({args.mkd_family})", "kd": "ordinary KD (pretrain)"}
    seeds = args.seeds
    rows = []
    for arm in ("mkd", "kd"):
        a = acc[arm]
        cells = [interval([a[s][m] for s in seeds]) for m in MODELS]
        diff = signed([a[s]["student_kd"] - a[s]["student_base"] for s in seeds])
        cpu = " / ".join(f"{statistics.mean(minutes[arm][s][m] for s in seeds):.1f}" for m in MODELS)
        rows.append(f"| {names[arm]} | {' | '.join(cells)} | {diff} | {cpu} |")
    across = {m: [acc["kd"][s][m] - acc["mkd"][s][m] for s in seeds] for m in MODELS}
    lines = [
        f"# Ordinary KD against MKD at the same CPU budget: {args.experiment}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; accuracy (%) at each model's last meta-test step, mean ± "
        "Student-t 95% over seeds; differences paired seed by seed (seeds where positive). The KD arm's "
        f"iterations ({teacher_its} teacher, {student_its} per student) spend the MKD arm's mean training "
        f"CPU-minutes ({budget['teacher']:.1f} teacher, {budget['student_kd']:.1f} distilled student, "
        f"seeds {', '.join(map(str, plan['budget_seeds']))}).",
        "",
        "| arm | teacher | distilled | undistilled | distilled − undistilled | CPU min (t / d / u) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "| KD − MKD | teacher | distilled | undistilled |",
        "|---|---|---|---|",
        f"| points | {' | '.join(signed(across[m]) for m in MODELS)} |",
        "",
        f"Overrides given to every run: {' '.join(extra) or '(none)'}.",
    ]
    (out / "kd_vs_mkd.md").write_text("\n".join(lines) + "\n")
    (out / "kd_vs_mkd.json").write_text(
        json.dumps(
            {
                "experiment": args.experiment,
                "mkd_family": args.mkd_family,
                "seeds": seeds,
                "overrides": extra,
                "budget_cpu_minutes": budget,
                "kd_iterations": {"teacher": teacher_its, "students": student_its, "val_every": every},
                "plan": plan,
                "accuracy": {arm: {str(s): v for s, v in a.items()} for arm, a in acc.items()},
                "cpu_minutes": {arm: {str(s): v for s, v in m.items()} for arm, m in minutes.items()},
            },
            indent=2,
        )
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
