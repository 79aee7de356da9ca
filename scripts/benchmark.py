"""Meta-training speed: our strategies against the per-task autograd loop the older libraries use.

For each shape it first checks that every strategy gives the reference meta-gradient, then times
meta-iterations per second (median of ``--repeats`` timed runs after warm-up) for second and first
order at each thread count, and reports peak memory (each measurement runs in a fresh process and
reads its peak RSS on the CPU, or ``max_memory_allocated`` on CUDA). It also times the distillation
step, the episode sampler, and the cost as meta-batch size and inner steps grow. Results go to
``<out>/benchmark.json`` and ``<out>/benchmark.md``.

    python scripts/benchmark.py                        # everything (long on a 2-core CPU)
    python scripts/benchmark.py --shapes sinusoid --threads 1 --repeats 5
    python scripts/benchmark.py --device cuda --threads 0 --shapes omniglot_5w1s miniimagenet_5w1s
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.func import functional_call
from torch.nn import functional as F

from metakd_run.config import MetaConfig
from metakd_run.data.tasks import TaskBatch
from metakd_run.distill.losses import Distiller
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.meta.maml import MAML
from metakd_run.models import feature_shapes
from metakd_run.models.conv4 import Conv4
from metakd_run.models.mlp import MLP


@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # regression | classification
    in_shape: tuple[int, ...]
    ways: int  # output width (1 for regression)
    shots: int  # support points (regression) or per class
    queries: int
    meta_batch: int
    inner_steps: int
    inner_lr: float
    width: int  # MLP hidden width or conv filters
    student_width: int


SHAPES = {
    "sinusoid": Shape("sinusoid", "regression", (1,), 1, 10, 10, 25, 1, 0.01, 40, 10),
    "omniglot_5w1s": Shape("omniglot_5w1s", "classification", (1, 28, 28), 5, 1, 15, 32, 1, 0.4, 64, 16),
    "omniglot_20w1s": Shape("omniglot_20w1s", "classification", (1, 28, 28), 20, 1, 15, 16, 5, 0.1, 64, 16),
    "miniimagenet_5w1s": Shape(
        "miniimagenet_5w1s", "classification", (3, 84, 84), 5, 1, 15, 4, 5, 0.01, 32, 16
    ),
}


def make_model(shape: Shape, width: int) -> torch.nn.Module:
    if shape.kind == "regression":
        return MLP(1, 1, [width, width])
    return Conv4(shape.in_shape, shape.ways, filters=width)


def make_batch(shape: Shape, tasks: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    if shape.kind == "regression":
        x = torch.rand(tasks, shape.shots + shape.queries, 1, generator=g) * 10 - 5
        amp = torch.rand(tasks, 1, 1, generator=g) * 4.9 + 0.1
        y = amp * torch.sin(x - torch.rand(tasks, 1, 1, generator=g) * 3.14)
        k = shape.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
    n, k, q = shape.ways, shape.shots, shape.queries
    sx = torch.rand(tasks, n * k, *shape.in_shape, generator=g)
    qx = torch.rand(tasks, n * q, *shape.in_shape, generator=g)
    return TaskBatch(
        sx,
        torch.arange(n).repeat_interleave(k).repeat(tasks, 1),
        qx,
        torch.arange(n).repeat_interleave(q).repeat(tasks, 1),
    )


def reference_step(
    model: torch.nn.Module, kind: str, batch: TaskBatch, lr: float, steps: int, first_order: bool
) -> None:
    """The older libraries' meta-step: a Python loop over tasks, torch.autograd.grad per task."""
    loss_fn = F.mse_loss if kind == "regression" else F.cross_entropy
    params = dict(model.named_parameters())
    total = 0.0
    for t in range(batch.num_tasks):
        fast = params
        for _ in range(steps):
            out, _ = functional_call(model, fast, (batch.support_x[t],))
            grads = torch.autograd.grad(
                loss_fn(out, batch.support_y[t]), list(fast.values()), create_graph=not first_order
            )
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        out, _ = functional_call(model, fast, (batch.query_x[t],))
        total = total + loss_fn(out, batch.query_y[t])
    (total / batch.num_tasks).backward()


def step_fn(
    shape: Shape,
    strategy: str,
    first_order: bool,
    device: str,
    distill: bool = False,
    meta_batch: int | None = None,
    inner_steps: int | None = None,
):  # noqa: ANN201
    """A zero-argument callable that runs one meta-step (and the model whose grads it fills)."""
    torch.manual_seed(0)
    steps = inner_steps or shape.inner_steps
    batch = make_batch(shape, meta_batch or shape.meta_batch).to(device)
    model = make_model(shape, shape.width).to(device)
    if strategy == "reference":

        def run() -> None:
            model.zero_grad(set_to_none=True)
            reference_step(model, shape.kind, batch, shape.inner_lr, steps, first_order)

        return run, model
    cfg = MetaConfig(inner_lr=shape.inner_lr, inner_steps=steps, first_order=first_order, batching=strategy)
    if not distill:
        learner = MAML(model, shape.kind, cfg)

        def run() -> None:
            model.zero_grad(set_to_none=True)
            learner.meta_backward(batch)

        return run, model
    teacher = MAML(model, shape.kind, cfg)
    student_model = make_model(shape, shape.student_width).to(device)
    student = MAML(student_model, shape.kind, cfg)
    tap = "hidden2" if shape.kind == "regression" else "output"
    distiller = Distiller(
        "cosine" if shape.kind == "regression" else "kl",
        4.0,
        [(tap, tap)],
        feature_shapes(model, shape.in_shape),
        feature_shapes(student_model, shape.in_shape),
    )
    mkd = MetaDistillation(teacher, student, distiller.to(device), 1.0)

    def run_kd() -> None:
        student_model.zero_grad(set_to_none=True)
        mkd.meta_backward(batch)

    return run_kd, student_model


def measure(job: dict) -> dict:
    """Runs in a fresh process: set threads, warm up, time, and read the peak memory."""
    torch.set_num_threads(job["threads"]) if job["threads"] > 0 else None
    shape = SHAPES[job["shape"]]
    device = job["device"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run, _ = step_fn(
        shape,
        job["strategy"],
        job["first_order"],
        device,
        job.get("distill", False),
        job.get("meta_batch"),
        job.get("inner_steps"),
    )
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(job["warmup"]):
        run()
    sync()
    times = []
    for _ in range(job["repeats"]):
        tic = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - tic)
    sec = statistics.median(times)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    )
    return {**job, "seconds": sec, "iters_per_s": 1.0 / sec, "peak_mb": round(peak, 1)}


def run_isolated(job: dict) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(measure, (job,))


def check_gradients(shape: Shape, strategies: list[str], device: str) -> dict[str, float]:
    """Max abs difference of each strategy's meta-gradient from the reference (float64, 3 tasks)."""
    small = Shape(
        **{
            **asdict(shape),
            "meta_batch": 3,
            "width": min(shape.width, 8),
            "student_width": min(shape.student_width, 4),
        }
    )
    errors = {}
    for first_order in (False, True):
        # models and data built in float64, so the comparison is exact up to rounding
        torch.set_default_dtype(torch.float64)
        try:
            ref_run, ref_model = step_fn(small, "reference", first_order, device)
            ref_run()
            ref = torch.cat([p.grad.flatten() for p in ref_model.parameters()])
            for strategy in strategies:
                try:
                    run, model = step_fn(small, strategy, first_order, device)
                except ValueError:
                    continue
                run()
                ours = torch.cat([p.grad.flatten() for p in model.parameters()])
                key = f"{strategy}/{'first' if first_order else 'second'}"
                errors[key] = float((ours - ref).abs().max())
        finally:
            torch.set_default_dtype(torch.float32)
    return errors


def sampling_ratio(shape: Shape, iteration_s: float) -> dict:
    """Episode sampling time against one meta-iteration (the data side must not starve the step)."""
    if shape.kind == "regression":
        from metakd_run.data.sinusoid import SinusoidTasks

        src = SinusoidTasks(shots=shape.shots, queries=shape.queries)
    else:
        from metakd_run.data.episodes import EpisodeSampler

        classes = 4112 if shape.in_shape[0] == 1 else 64
        per_class = 20 if shape.in_shape[0] == 1 else 600
        images = torch.randint(0, 256, (classes, per_class, *shape.in_shape), dtype=torch.uint8)
        src = EpisodeSampler(images, shape.ways, shape.shots, shape.queries)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        src.sample(shape.meta_batch, g)
    times = []
    for _ in range(10):
        tic = time.perf_counter()
        src.sample(shape.meta_batch, g)
        times.append(time.perf_counter() - tic)
    s = statistics.median(times)
    return {"sample_s": s, "fraction_of_iteration": s / iteration_s}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--strategies", nargs="+", default=["vmap", "loop", "batched"])
    ap.add_argument("--orders", nargs="+", default=["second", "first"], choices=["second", "first"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="0: PyTorch's default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument(
        "--scaling", nargs="*", default=["sinusoid"], help="shapes for the meta-batch/steps tables"
    )
    ap.add_argument("--out", default="benchmark_results")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": args.device, "torch": torch.__version__, "shapes": {}}
    if args.device == "cpu":
        import platform

        results["machine"] = f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores"
    else:
        results["machine"] = torch.cuda.get_device_name(args.device)
    md = [f"# Meta-training benchmark ({results['machine']}, torch {torch.__version__})", ""]
    for name in args.shapes:
        shape = SHAPES[name]
        print(f"== {name}: checking meta-gradients", flush=True)
        grads = check_gradients(shape, args.strategies, args.device)
        bad = {k: v for k, v in grads.items() if v > 1e-8}
        if bad:
            sys.exit(f"{name}: meta-gradients differ from the reference: {bad}")
        rows = []
        for threads in args.threads:
            for order in args.orders:
                base = {
                    "shape": name,
                    "device": args.device,
                    "threads": threads,
                    "first_order": order == "first",
                    "repeats": args.repeats,
                    "warmup": args.warmup,
                }
                ref = run_isolated({**base, "strategy": "reference"})
                print(f"   {threads} thr {order:6s} reference {ref['iters_per_s']:.3f} it/s", flush=True)
                for strategy in args.strategies:
                    try:
                        r = run_isolated({**base, "strategy": strategy})
                    except ValueError:
                        continue
                    r["ratio"] = r["iters_per_s"] / ref["iters_per_s"]
                    r["memory_ratio"] = r["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
                    rows.append(r)
                    print(
                        f"   {threads} thr {order:6s} {strategy:9s} {r['iters_per_s']:.3f} it/s "
                        f"= {r['ratio']:.2f}x, peak {r['peak_mb']} MB (ref {ref['peak_mb']} MB)",
                        flush=True,
                    )
                rows.append({**ref, "ratio": 1.0, "memory_ratio": 1.0})
                if not args.no_distill:
                    best = max(
                        (
                            r
                            for r in rows
                            if r["threads"] == threads
                            and r["first_order"] == (order == "first")
                            and r["strategy"] != "reference"
                        ),
                        key=lambda r: r["iters_per_s"],
                    )
                    kd = run_isolated({**base, "strategy": best["strategy"], "distill": True})
                    kd["distill"] = True
                    rows.append(kd)
                    print(
                        f"   {threads} thr {order:6s} distill ({best['strategy']}) "
                        f"{kd['iters_per_s']:.3f} it/s",
                        flush=True,
                    )
        fastest = max(
            (r for r in rows if r["strategy"] != "reference" and not r.get("distill")),
            key=lambda r: r["iters_per_s"],
        )
        entry = {"gradient_check": grads, "rows": rows, "sampling": sampling_ratio(shape, fastest["seconds"])}
        if name in args.scaling:
            entry["scaling"] = scaling(shape, fastest["strategy"], args)
        results["shapes"][name] = entry
        md += markdown(name, shape, entry)
        (out / "benchmark.json").write_text(json.dumps(results, indent=2))
        (out / "benchmark.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")


def scaling(shape: Shape, strategy: str, args: argparse.Namespace) -> dict:
    base = {
        "shape": shape.name,
        "device": args.device,
        "threads": args.threads[0],
        "first_order": False,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    table: dict = {"meta_batch": {}, "inner_steps": {}}
    for mb in (1, 4, 16, 64):
        for strat in (strategy, "reference"):
            r = run_isolated({**base, "strategy": strat, "meta_batch": mb})
            table["meta_batch"].setdefault(mb, {})[strat] = r["seconds"]
    for steps in (1, 2, 5, 10):
        for strat in (strategy, "reference"):
            r = run_isolated({**base, "strategy": strat, "inner_steps": steps})
            table["inner_steps"].setdefault(steps, {})[strat] = r["seconds"]
    table["strategy"] = strategy
    return table


def markdown(name: str, shape: Shape, entry: dict) -> list[str]:
    lines = [
        f"## {name}",
        "",
        f"meta-batch {shape.meta_batch}, {shape.inner_steps} inner step(s), width {shape.width}; "
        f"meta-gradient check (max abs diff vs reference, float64): "
        + ", ".join(f"{k} {v:.1e}" for k, v in entry["gradient_check"].items()),
        "",
        "| threads | order | strategy | meta-it/s | × reference | peak MB | × reference memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in entry["rows"]:
        label = f"distill ({r['strategy']})" if r.get("distill") else r["strategy"]
        ratio = f"{r['ratio']:.2f}" if "ratio" in r else "–"
        mem = f"{r['memory_ratio']:.2f}" if r.get("memory_ratio") else "–"
        lines.append(
            f"| {r['threads']} | {'first' if r['first_order'] else 'second'} | {label} | "
            f"{r['iters_per_s']:.3f} | {ratio} | {r['peak_mb']} | {mem} |"
        )
    s = entry["sampling"]
    lines += [
        "",
        f"episode sampling: {s['sample_s'] * 1000:.2f} ms per meta-batch = "
        f"{100 * s['fraction_of_iteration']:.2f}% of a meta-iteration",
        "",
    ]
    if "scaling" in entry:
        sc = entry["scaling"]
        lines += [
            f"cost in seconds per meta-iteration ({sc['strategy']} vs reference, second order):",
            "",
            "| meta-batch | ours | reference |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {v[sc['strategy']]:.4f} | {v['reference']:.4f} |" for k, v in sc["meta_batch"].items()
        ]
        lines += ["", "| inner steps | ours | reference |", "|---|---|---|"]
        lines += [
            f"| {k} | {v[sc['strategy']]:.4f} | {v['reference']:.4f} |" for k, v in sc["inner_steps"].items()
        ]
        lines.append("")
    return lines


if __name__ == "__main__":
    main()
