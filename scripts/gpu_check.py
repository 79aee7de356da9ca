#!/usr/bin/env python3
"""One short GPU check of metakd-run: exact meta-gradients on CUDA, an end-to-end run, speed.

Where torch comes from: the GPU machine's image (kind ``nvidia-h200``) has ``python3`` =
``/opt/torch/.venv/bin/python3`` with a CUDA torch (2.11+cu130 when last read) and numpy,
tensorboard, matplotlib, pillow, h5py, tqdm, pyyaml and pytest, but not hydra-core, omegaconf or
antlr4, and it cannot reach a package registry. Those three are pure Python and travel with the
working tree in ``.gpu_site/`` (git-ignored; copy them from a checkout's venv,
``cp -r .venv/lib/python3.*/site-packages/{hydra,omegaconf,antlr4} .gpu_site/``, and carry
``.gpu_site``); this script puts that folder and the checkout on ``PYTHONPATH`` for itself and
every child process, so nothing is installed. It stops at once, with one line, where torch sees
no CUDA device.

Steps (each under its own time limit, 45 + 40 + 150 + 45 s: at most 4.7 minutes on an H200):

1. the meta-gradient tests on CUDA (``METAKD_TEST_DEVICE=cuda``: every strategy against a plain
   per-task loop, float64, conv4 with batch norm, second and first order);
2. a tiny miniImageNet-format run of the full pipeline (generated images) with ``device=cuda``;
3. ``scripts/benchmark.py --device cuda`` on the four shapes, few rounds;
4. ``experiment=omniglot_5w1s device=cuda`` (the paper's setting) for a fixed number of teacher
   iterations on generated Omniglot-format data, projected to the preset's 60,000 iterations.

It prints one summary table and writes it to ``$OUT/gpu_summary.md`` (or ``--out``).

    python3 scripts/gpu_check.py                 # on the GPU machine
    python3 scripts/gpu_check.py --dry-run       # the same logic on the CPU, tiny sizes (here)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / ".gpu_site"
ITERATIONS = 300  # teacher iterations timed in step 4
VAL_EVERY = 150


def child_env(device: str) -> dict[str, str]:
    paths = [str(ROOT)] + ([str(SITE)] if SITE.is_dir() else [])
    old = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths + ([old] if old else [])),
        "METAKD_TEST_DEVICE": device,
        "PYTHONUNBUFFERED": "1",
    }


SLOWER = 1  # time limits are multiplied by this (--dry-run: a CPU is slower than the GPU)


def run(cmd: list[str], timeout: int, env: dict[str, str], log: Path) -> tuple[str, float, str]:
    """Run ``cmd``; return (status, seconds, output tail). Output goes to ``log`` too."""
    timeout *= SLOWER
    tic = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {timeout} s"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    log.write_text(out)
    return status, time.perf_counter() - tic, out[-3000:]


def make_omniglot(root: Path, characters: dict[str, int]) -> dict[str, Path]:
    """Generated drawings in the official ``images_background/<Alphabet>/<characterNN>/*.png`` layout.

    ``characters`` maps a split name to how many characters it gets (each under 4 rotations, 20
    drawings each, as in Omniglot); the split files are written beside and returned.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    splits = {}
    for s, (split, count) in enumerate(characters.items()):
        lines = []
        for c in range(count):
            folder = root / "images_background" / f"Alpha{s}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(20):
                rng = np.random.default_rng(s * 100_000 + c * 100 + k)
                img = Image.new("1", (105, 105), 1)
                draw = ImageDraw.Draw(img)
                for _ in range(3):
                    draw.line(tuple(int(v) for v in rng.integers(10, 95, size=4)), fill=0, width=5)
                img.save(folder / f"{c + 1:04d}_{k + 1:02d}.png")
            lines += [f"Alpha{s}/character{c + 1:02d}/rot{r:03d}" for r in (0, 90, 180, 270)]
        splits[split] = root / f"{split}.txt"
        splits[split].write_text("\n".join(lines) + "\n")
    return splits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks this script's logic")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run:
        global SLOWER
        SLOWER = 6
    py = sys.executable
    env = child_env(device)
    sys.path[:0] = env["PYTHONPATH"].split(os.pathsep)

    import torch

    try:
        import hydra  # noqa: F401
        import omegaconf  # noqa: F401
    except ImportError as e:
        sys.exit(f"gpu_check: {e.name} is missing; copy it into {SITE} (see this script's docstring)")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit(
            f"gpu_check: torch {torch.__version__} ({py}) sees no CUDA device; run it on the GPU machine"
        )
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none (dry run on the CPU)"
    print(f"gpu_check: torch {torch.__version__}, device {gpu}", flush=True)
    rows: list[tuple[str, str, float, str]] = []

    # 1. the meta-gradient tests on the device
    select = "cuda or test_auto_chooses"
    if device == "cpu":
        select = "test_auto_chooses or (cpu and conv4_first_order)"
    tests = ["tests/test_maml_gradients.py", "tests/test_models_image.py"]
    cmd = [py, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "not slow", "-k", select]
    status, sec, tail = run([*cmd, *tests], 45, env, out / "tests.log")
    counts = re.findall(r"\d+ (?:passed|failed|skipped|error)\w*", tail)
    rows.append(("meta-gradient tests on " + device, status, sec, ", ".join(counts)))
    print(rows[-1], flush=True)

    # 2. tiny image run end to end (the generated miniImageNet of the tests)
    sys.path.insert(0, str(ROOT))
    from tests.conftest import TINY
    from tests.test_cli_images import TINY_IMAGES
    from tests.test_data_images import make_mini

    mini = make_mini(out / "data_mini")
    cli = [py, "-m", "metakd_run.cli"]
    e2e = out / "run_e2e"
    status, sec, tail = run(
        [
            *cli,
            *TINY,
            *TINY_IMAGES,
            f"dataset.root={mini}",
            f"dataset.cache_dir={out / 'cache_mini'}",
            f"device={device}",
            f"hydra.run.dir={e2e}",
        ],
        40,
        env,
        out / "e2e.log",
    )
    detail = ""
    if (e2e / "summary.json").exists():
        summary = json.loads((e2e / "summary.json").read_text())
        acc = summary["models"]["teacher"]["metrics"]["accuracy"]
        steps = {k: v["mean"] for k, v in acc.items() if k.startswith("step_")}
        detail = "teacher accuracy " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items())
    rows.append((f"image pipeline end to end, device={device}", status, sec, detail))
    print(rows[-1], flush=True)

    # 3. the benchmark on the device, four shapes, few rounds
    shapes = ["sinusoid", "omniglot_5w1s", "omniglot_20w1s", "miniimagenet_5w1s"]
    bench = [py, "scripts/benchmark.py", "--device", device, "--threads", "0", "--no-distill"]
    bench += ["--repeats", "3", "--warmup", "1", "--min-time", "0.05", "--out", str(out / "benchmark")]
    if args.dry_run:
        shapes, bench = ["sinusoid"], [*bench, "--threads", "1", "--repeats", "2"]
    status, sec, tail = run([*bench, "--shapes", *shapes], 150, env, out / "benchmark.log")
    rows.append((f"benchmark on {device} ({', '.join(shapes)})", status, sec, "table below"))
    print(rows[-1], flush=True)

    # 4. the paper's Omniglot setting for a fixed number of teacher iterations, projected
    iters, val_every = (6, 3) if args.dry_run else (ITERATIONS, VAL_EVERY)
    root = out / "data_omniglot"
    splits = make_omniglot(root, {"train": 12, "val": 4, "test": 4})
    run_dir = out / "run_omniglot"
    status, sec, tail = run(
        [
            *cli,
            "experiment=omniglot_5w1s",
            f"device={device}",
            f"dataset.root={root}",
            f"dataset.cache_dir={out / 'cache_omniglot'}",
            *(f"dataset.{s}_split={p}" for s, p in splits.items()),
            f"train.iterations={iters}",
            f"train.val_every={val_every}",
            "train.checkpoint_every=100000",
            "train.stages=[teacher]",
            "train.progress=false",
            "eval.tasks=20",
            "eval.batch=20",
            *(["meta.meta_batch=4", "threads=1", "train.val_tasks=4"] if args.dry_run else []),
            f"hydra.run.dir={run_dir}",
        ],
        45,
        env,
        out / "omniglot.log",
    )
    detail = ""
    if (run_dir / "timings.json").exists():
        training = json.loads((run_dir / "timings.json").read_text())["teacher"]
        validations = max(1, training["iterations"] // val_every)
        per_iter = (training["seconds"] - training["validation_seconds"]) / training["iterations"]
        per_val = training["validation_seconds"] / validations  # at the preset's val_tasks
        projected = 60_000 * per_iter + 60 * per_val  # the preset validates every 1,000 iterations
        detail = (
            f"{1 / per_iter:.1f} it/s over {training['iterations']} iterations (start-up included), "
            f"{per_val:.1f} s per validation; projected teacher stage of 60,000 iterations: "
            f"{projected / 3600:.2f} h"
        )
    rows.append((f"omniglot_5w1s, device={device}, {iters} teacher iterations", status, sec, detail))
    print(rows[-1], flush=True)

    lines = [
        f"# gpu_check: {gpu}, torch {torch.__version__}",
        "",
        "| step | status | seconds | result |",
        "|---|---|---|---|",
        *(f"| {name} | {status} | {sec:.0f} | {detail} |" for name, status, sec, detail in rows),
        "",
    ]
    bench_md = out / "benchmark" / "benchmark.md"
    if bench_md.exists():
        lines += [bench_md.read_text()]
    text = "\n".join(lines)
    (out / "gpu_summary.md").write_text(text)
    print(text)
    print(f"wrote {out / 'gpu_summary.md'} (logs beside it)")
    if any(status != "ok" for _, status, _, _ in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
