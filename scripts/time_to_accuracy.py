"""Time to accuracy of the pretrain family: what a teacher reaches in a budget of CPU-minutes.

    METAKD_DATA_ROOT=../shared/data python scripts/time_to_accuracy.py \\
        --experiment miniimagenet_5w1s_cpu --minutes 60 [--threads 1] [--split val|test] \\
        [--out outputs/tta] [OVERRIDE ...]

1. Calibrate: a short teacher-only run (``--calibrate`` iterations, default 30) measures the CPU
   seconds of one training iteration (the stage's training seconds, validation left out).
2. Run: a teacher-only run (``train.stages=[teacher]``, ``meta=pretrain``) with as many
   iterations as fit in ``--minutes`` of CPU time, less what validation and the meta-test take
   (``--train-share``, default 0.85), validated ``--points`` times on the same val tasks as every
   family, and meta-tested on ``--split`` (val by default: the test images are not in every copy
   of miniImageNet; Omniglot has them).
3. Print (and write ``time_to_accuracy.json`` in ``--out``): the val accuracy at each validation
   against the CPU-minutes spent by then, and the final meta-test on ``eval.tasks`` tasks, with
   the measured CPU time of the whole run (getrusage of the child process: user + system).

The CPU-minutes are process CPU time (user + system, getrusage): with ``threads=1`` on an idle core
they equal wall minutes; on a shared machine the wall time is longer and the CPU time is what is
comparable. The calibration reads the stage's measured CPU seconds (``timings.json``), and the
curve the training loop's clock at each validation (``validation_clock``); a run resumed from a
checkpoint older than that clock falls back to its wall minutes times the whole run's CPU/wall
ratio (the record's ``curve_cpu`` says which). The final line's CPU time is measured. Extra
arguments are passed to ``metakd-run`` as overrides (e.g. ``meta.pretrain.head=centroid``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Any

from cpu_budget import run, training_cpu_seconds  # scripts/cpu_budget.py: the child run and its CPU time


def stage_result(run_dir: Path) -> dict[str, Any]:
    """The teacher's training record (history, seconds) as the pipeline saved it with the checkpoint."""
    import torch

    state = torch.load(run_dir / "checkpoints" / "teacher.pt", weights_only=False, map_location="cpu")
    return dict(state["result"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", required=True, help="e.g. miniimagenet_5w1s_cpu, omniglot_5w1s_cpu")
    parser.add_argument("--minutes", type=float, required=True, help="the budget in CPU-minutes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calibrate", type=int, default=30, help="iterations of the calibration run")
    parser.add_argument("--train-share", type=float, default=0.85, help="share of the budget for training")
    parser.add_argument("--points", type=int, default=5, help="validations along the run")
    parser.add_argument(
        "--split", choices=("val", "test"), default="val",
        help="the meta-test split (val: this copy of miniImageNet has no test images; Omniglot has them)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("outputs/time_to_accuracy"))
    args, extra = parser.parse_known_args()
    out = args.out / f"{args.experiment}-{args.minutes:g}min"
    if out.exists():
        shutil.rmtree(out)
    base = [
        f"experiment={args.experiment}",
        "meta=pretrain",
        "train.stages=[teacher]",
        f"eval.split={args.split}",
        f"threads={args.threads}",
        "train.progress=false",
        *extra,
    ]
    calib = out / "calibration"
    short = [f"train.iterations={args.calibrate}", f"train.val_every={args.calibrate}", "train.val_tasks=2"]
    calib_cpu, calib_wall = run([*base, *short, "eval.tasks=2", "eval.batch=2"], calib)
    result = stage_result(calib)
    share = min(1.0, calib_cpu / calib_wall)  # of a core (per thread) that the process had
    per_iteration = training_cpu_seconds(result, share) / result["iterations_run"]
    iterations = max(args.points, int(args.minutes * 60 * args.train_share / per_iteration))
    every = -(-iterations // args.points)  # ceil: exactly --points validations, the last at the end
    main_dir = out / "run"
    cpu, wall = run(
        [*base, f"train.iterations={iterations}", f"train.val_every={every}",
         f"train.checkpoint_every={every}"], main_dir
    )  # fmt: skip
    result = stage_result(main_dir)
    summary = json.loads((main_dir / "summary.json").read_text())
    final = summary["models"]["teacher"]["metrics"]["accuracy"]
    last = max((k for k in final if k.startswith("step_")), key=lambda k: int(k.split("_")[-1]))
    train_per_it = (result["seconds"] - result["validation_seconds"]) / result["iterations_run"]
    val_per = result["validation_seconds"] / max(1, len(result["history"]))
    share = cpu / wall
    # the loop's clock at each validation (measured); a stage resumed from a checkpoint written
    # before it kept one has none for its earlier validations: the whole curve is then estimated
    clock = result.get("validation_clock") or []
    measured = len(clock) == len(result["history"]) and all(c["cpu_seconds"] is not None for c in clock)
    curve = []
    for i, h in enumerate(result["history"]):
        if measured:
            wall_min, cpu_min = clock[i]["seconds"] / 60, clock[i]["cpu_seconds"] / 60
        else:
            wall_min = (h["iteration"] * train_per_it + (i + 1) * val_per) / 60
            cpu_min = wall_min * share
        curve.append(
            {
                "iteration": h["iteration"],
                "wall_minutes": wall_min,
                "cpu_minutes": cpu_min,
                "val_accuracy": h["accuracy"],
            }
        )
    record = {
        "experiment": args.experiment,
        "overrides": base[1:],
        "budget_cpu_minutes": args.minutes,
        "iterations": iterations,
        "train_wall_seconds_per_iteration": train_per_it,
        "cpu_per_wall": share,
        "curve": curve,
        "curve_cpu": "measured by the training loop" if measured else "wall minutes x the run's CPU/wall",
        "final": {
            "split": args.split,
            "eval_tasks": summary["eval"]["tasks"],
            "accuracy": final[last]["mean"],
            "ci95": final[last]["ci95"],
        },
        "run_cpu_minutes": cpu / 60,
        "training_cpu_minutes": training_cpu_seconds(result, share) / 60,  # the stage, validation left out
        "run_wall_minutes": wall / 60,
        "run_dir": str(main_dir),
        "threads": args.threads,
        "host_cpus": os.cpu_count(),
    }
    (out / "time_to_accuracy.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.experiment} meta=pretrain, teacher only, {iterations} iterations "
          f"({train_per_it:.3f} wall s each), threads={args.threads}, CPU/wall {share:.2f}")  # fmt: skip
    print(
        f"{'iteration':>10} {'wall-min':>8} {'CPU-min':>8} {'val acc (%)':>12}  (train.val_tasks val tasks)"
    )
    for c in curve:
        print(f"{c['iteration']:>10} {c['wall_minutes']:>8.2f} {c['cpu_minutes']:>8.2f} "
              f"{100 * c['val_accuracy']:>12.2f}")  # fmt: skip
    print(
        f"final: {100 * final[last]['mean']:.2f} ± {100 * final[last]['ci95']:.2f}% on "
        f"{summary['eval']['tasks']} {args.split} tasks; the run took {cpu / 60:.2f} CPU-minutes "
        f"({wall / 60:.2f} wall); {out / 'time_to_accuracy.json'}"
    )


if __name__ == "__main__":
    main()
