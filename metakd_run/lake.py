"""``python -m metakd_run.lake RUN_DIR``: score a finished run's models on Lake et al.'s 20 one-shot
runs, print the table and write ``RUN_DIR/lake_runs.json``.

A module entry point only: the scoring is the evaluation protocol
:mod:`metakd_run.evaluation.lake_runs` (the same functions a run with ``eval.lake_runs`` uses), the
table is :func:`metakd_run.presentation.table.lake_table`, and the runs' files are read by
:mod:`metakd_run.data.omniglot_runs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from metakd_run.config import ConfigError, Stage
from metakd_run.data.errors import DataError
from metakd_run.evaluation.lake_runs import check, score_all
from metakd_run.presentation.table import lake_table


def main(argv: list[str] | None = None) -> int:
    """``python -m metakd_run.lake RUN_DIR [--runs PATH] [--steps N]``: score a finished run's
    models on the runs, print the table and write ``RUN_DIR/lake_runs.json``."""
    from metakd_run.api import load
    from metakd_run.checkpoint import CheckpointError, write_text_atomic

    parser = argparse.ArgumentParser(prog="python -m metakd_run.lake", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--runs",
        default=None,
        help="all_runs.zip or its folder (default: the run's eval.lake_runs, else its dataset.root)",
    )
    parser.add_argument("--steps", type=int, default=None, help="inner steps (default: the run's eval.steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the job is small)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        learners, cfg = {}, None
        for name in (s.value for s in Stage):
            if (args.run_dir / "checkpoints" / f"{name}.pt").is_file():
                loaded = load(args.run_dir, name, args.device)
                learners[name], cfg = loaded.maml, loaded.config
        if cfg is None:
            raise CheckpointError(f"{args.run_dir}/checkpoints holds no finished model (teacher.pt, ...)")
        cfg.eval.lake_runs = args.runs or cfg.eval.lake_runs or cfg.dataset.root
        prepared = check(cfg)
        assert prepared is not None
        steps = cfg.eval.steps if args.steps is None else args.steps
        dtype = getattr(torch, str(cfg.dtype))
        section = score_all(learners, prepared, steps, args.device, dtype)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"metakd_run.lake: error: {err}", file=sys.stderr)
        return 2
    print(lake_table(section))
    write_text_atomic(json.dumps(section, indent=2) + "\n", args.run_dir / "lake_runs.json")
    print(f"\nwritten: {args.run_dir / 'lake_runs.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
