"""Measure a preset's meta-training throughput and project its full wall time from a short probe.

    python scripts/preset_budget.py experiment=omniglot_20w1s_cpu --probe 20
    python scripts/preset_budget.py experiment=miniimagenet_5w1s_cpu threads=2 --probe 10

A full run of a CPU preset takes up to half an hour; this runs the real console script with
every stage cut to ``--probe`` meta-iterations (one validation each) and the preset's full
meta-test, then reads ``timings.json``: seconds per training iteration and per validation of
each stage, and the meta-test seconds of each model. The projection is
``start-up + sum over stages (s/it x iterations + validations x s/validation) + meta-test``
with the preset's own iterations and validation interval. It is a projection, not a measurement:
report it as one, and time a full run (``/usr/bin/time metakd-run experiment=...``) to confirm.
Overrides after the script's options are passed to ``metakd-run`` as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("teacher", "student_kd", "student_base")


def compose(overrides: list[str]):  # noqa: ANN201
    """The preset's config as the CLI would compose it (its iterations and validation interval)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import metakd_run.cli  # noqa: F401 - registers the structured configs

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        from metakd_run.config import to_typed

        return to_typed(hydra_compose("config", overrides=overrides))


def metakd_run_exe() -> list[str]:
    exe = shutil.which("metakd-run", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "metakd_run.cli"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probe", type=int, default=20, help="meta-iterations per stage in the probe")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", type=Path, default=None, help="keep the probe's run folder here")
    args, overrides = parser.parse_known_args()

    cfg = compose(overrides)
    run_dir = args.keep or Path(tempfile.mkdtemp(prefix="preset_budget_")) / "run"
    probe = [
        f"train.iterations={args.probe}",
        f"train.student_iterations={args.probe}",
        f"train.val_every={args.probe}",
        f"train.checkpoint_every={args.probe + 1}",
        "train.progress=false",
        f"hydra.run.dir={run_dir}",
    ]
    tic = time.perf_counter()
    proc = subprocess.run([*metakd_run_exe(), *overrides, *probe], capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        return proc.returncode
    timings = json.loads((run_dir / "timings.json").read_text())
    test_seconds = timings["meta_test_seconds"]

    rows, projected = [], 0.0
    for stage in STAGES:
        t = timings[stage]
        per_it = (t["seconds"] - t["validation_seconds"]) / args.probe
        its = cfg.train.stage_iterations(stage)
        vals = math.ceil(its / cfg.train.val_every)
        stage_total = per_it * its + vals * t["validation_seconds"]
        projected += stage_total
        rows.append(
            {
                "stage": stage,
                "rate": t.get("tasks_per_second", t.get("images_per_second", 0.0)),  # pretrain: images
                "seconds_per_iteration": per_it,
                "seconds_per_validation": t["validation_seconds"],
                "iterations": its,
                "projected_seconds": stage_total,
            }
        )
    startup = wall - sum(timings[s]["seconds"] for s in STAGES) - sum(test_seconds.values())
    projected += sum(test_seconds.values()) + startup
    result = {
        "overrides": overrides,
        "probe_iterations": args.probe,
        "threads": int(cfg.threads),
        "stages": rows,
        "meta_test_seconds": test_seconds,
        "startup_seconds": startup,
        "probe_wall_seconds": wall,
        "projected_wall_seconds": projected,
    }
    print(f"{' '.join(overrides)}: probe of {args.probe} iterations per stage, {wall:.0f} s")
    print("| stage | tasks/s (pretrain: images/s) | s/iteration | s/validation | iterations | projected s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['rate']:.1f} | {r['seconds_per_iteration']:.3f} | "
            f"{r['seconds_per_validation']:.1f} | {r['iterations']} | {r['projected_seconds']:.0f} |"
        )
    tests = ", ".join(f"{k} {v:.0f} s" for k, v in test_seconds.items())
    print(f"meta-test: {tests}; start-up {startup:.0f} s")
    print(f"projected full run: {projected:.0f} s ({projected / 60:.1f} min)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.keep is None:
        shutil.rmtree(run_dir.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
