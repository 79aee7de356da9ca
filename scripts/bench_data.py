"""Time the image data layer: one-time preparation, cached loads, and the episode rate.

    python scripts/bench_data.py --root ../shared/data

For each data set's train split it measures (1) the cold preparation (decode every image and
write the cache) into a fresh cache folder, (2) loading from that cache, and (3) sampling
5-way 1-shot 15-query episodes, ``--tasks`` per call. Cached loads and sampling report the
median of ``--repeats`` runs; the cold preparation runs ``--cold-repeats`` times (default
once: it takes a while), each into an empty cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metakd_run.data.episodes import ClassImages, EpisodeSampler
from metakd_run.data.miniimagenet import load_miniimagenet
from metakd_run.data.omniglot import load_omniglot

LOADERS = {"omniglot": (load_omniglot, 28), "miniimagenet": (load_miniimagenet, 84)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="data root (METAKD_DATA_ROOT)")
    parser.add_argument("--datasets", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--split", default="train")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the cold runs write (default: a temporary folder, removed)",
    )
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: CPUs)")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: PyTorch's default)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-repeats", type=int, default=1)
    parser.add_argument("--tasks", type=int, default=32, help="episodes per sample() call")
    parser.add_argument("--calls", type=int, default=20, help="sample() calls per repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def bench_dataset(name: str, args: argparse.Namespace, cache_root: Path) -> dict[str, object]:
    load, size = LOADERS[name]
    cold: list[float] = []
    cache = cache_root / name
    data: ClassImages | None = None
    for _ in range(args.cold_repeats):
        shutil.rmtree(cache, ignore_errors=True)
        seconds, data = timed(load, args.root, args.split, size, cache_dir=cache, workers=args.workers)
        assert data.prepared_s is not None, "expected a cold build"
        cold.append(seconds)
    cached = []
    for _ in range(args.repeats):
        seconds, data = timed(load, args.root, args.split, size, cache_dir=cache)
        assert data.prepared_s is None, "expected a cache hit"
        cached.append(seconds)
    assert data is not None
    sampler = EpisodeSampler.from_class_images(data, ways=5, shots=1, queries=15)
    generator = torch.Generator().manual_seed(0)
    sampler.sample(args.tasks, generator)  # warm-up: first touch of the cached pages
    rates = []
    for _ in range(args.repeats):
        seconds, _ = timed(lambda: [sampler.sample(args.tasks, generator) for _ in range(args.calls)])
        rates.append(args.calls * args.tasks / seconds)
    return {
        "dataset": name,
        "split": args.split,
        "shape": list(data.images.shape),
        "cold_prepare_s": statistics.median(cold),
        "cold_runs_s": cold,
        "cached_load_s": statistics.median(cached),
        "episodes_per_s": statistics.median(rates),
        "tasks_per_call": args.tasks,
    }


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    temporary = args.cache_dir is None
    cache_root = Path(tempfile.mkdtemp(prefix="metakd-bench-")) if temporary else args.cache_dir
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cache in {cache_root}")
    results = []
    try:
        for name in args.datasets:
            result = bench_dataset(name, args, cache_root)
            results.append(result)
            print(
                f"{name:12s} {args.split:6s} {'x'.join(map(str, result['shape'])):22s} "
                f"cold prepare {result['cold_prepare_s']:7.1f} s | cached load "
                f"{result['cached_load_s']:6.2f} s | 5-way 1-shot 15-query: "
                f"{result['episodes_per_s']:8.0f} episodes/s ({args.tasks} per call)"
            )
    finally:
        if temporary:
            shutil.rmtree(cache_root, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
