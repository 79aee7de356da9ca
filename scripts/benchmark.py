"""Meta-training speed: our strategies against the per-task autograd loop the older libraries use.

The reference is written independently of ``metakd_run``: the same architecture built from plain
``torch.nn`` layers (``nn.BatchNorm2d`` without running statistics, as higher's and learn2learn's
examples build it) with the same parameter values, and a per-task loop over ``functional_call``
and ``torch.autograd.grad``. For each shape it first checks that every strategy gives the
reference meta-gradient (float64),
then times second- and first-order meta-steps of the reference, every strategy and ``auto``'s
choice (and the distillation step) in ONE process, taking turns: round 1 runs A B C, round 2
C B A, and so on. Each strategy's speed-up is the ratio to the reference within each round,
reported as the median and the spread over the rounds, so drift of a shared machine hits both
sides of a ratio alike. Per row it also reports the dense FLOP rate (``FlopCounterMode`` on one
step, against a large fp32 matmul on the same device and threads) and the step's peak memory
(``max_memory_allocated`` on CUDA; on the CPU, the profiler's allocator events). It also times the
episode sampler and, with ``--scaling``, the cost as meta-batch size and inner steps grow.
Results go to ``<out>/benchmark.json`` and ``<out>/benchmark.md``.

    python scripts/benchmark.py --shapes sinusoid --threads 1
    python scripts/benchmark.py --shapes omniglot_5w1s --threads 2 --no-distill
    python scripts/benchmark.py --device cuda --threads 0 --repeats 3 --no-distill

On convolutional shapes two more rows: ``loop, previous version`` (the loop as it was before this
version: batch norm from primitive ops, the whole meta-batch in one graph; see ``models/norm.py``),
and, with ``--bf16``, ``auto``'s strategy under ``torch.autocast(dtype=torch.bfloat16)``.

Like the console script, it sets glibc's allocator up for large buffers (``metakd_run/malloc.py``),
so the reference runs in the same allocator state as our strategies; ``METAKD_RUN_MALLOC=system``
keeps glibc's defaults for both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from metakd_run import malloc

malloc.tune()  # the allocator state the console script runs in (metakd_run/malloc.py)

import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from metakd_run.build import task_pixels  # noqa: E402
from metakd_run.config import MetaConfig  # noqa: E402
from metakd_run.data.tasks import TaskBatch  # noqa: E402
from metakd_run.distill.losses import Distiller  # noqa: E402
from metakd_run.distill.mkd import MetaDistillation  # noqa: E402
from metakd_run.meta.auto import resolve_batching  # noqa: E402
from metakd_run.meta.maml import MAML  # noqa: E402
from metakd_run.models import feature_shapes  # noqa: E402
from metakd_run.models.conv4 import Conv4  # noqa: E402
from metakd_run.models.mlp import MLP  # noqa: E402
from metakd_run.models.norm import primitive_batch_norm  # noqa: E402

T = TypeVar("T")


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


def reference_model(shape: Shape, width: int) -> torch.nn.Module:
    """``make_model``'s architecture in plain ``torch.nn`` layers, as users of the older libraries write it.

    Its parameters come in the same order as ours (``copy_parameters``).
    """
    nn = torch.nn
    if shape.kind == "regression":
        return nn.Sequential(
            nn.Linear(1, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
        )
    layers: list[nn.Module] = []
    channels, size = shape.in_shape[0], shape.in_shape[1]
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
        channels, size = width, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * size * size, shape.ways))


def copy_parameters(src: torch.nn.Module, dst: torch.nn.Module) -> torch.nn.Module:
    """``dst`` with ``src``'s parameter values, matched by order (and checked by shape)."""
    pairs = list(zip(src.parameters(), dst.parameters(), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            if a.shape != b.shape:
                raise ValueError(f"reference parameter shape {tuple(b.shape)} != ours {tuple(a.shape)}")
            b.copy_(a)
    return dst


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
            out = functional_call(model, fast, (batch.support_x[t],))
            grads = torch.autograd.grad(
                loss_fn(out, batch.support_y[t]), list(fast.values()), create_graph=not first_order
            )
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
        out = functional_call(model, fast, (batch.query_x[t],))
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
        model = copy_parameters(model, reference_model(shape, shape.width).to(device))

        def run() -> None:
            model.zero_grad(set_to_none=True)
            reference_step(model, shape.kind, batch, shape.inner_lr, steps, first_order)

        return run, model
    previous = strategy == "previous"  # the loop before this version: primitive norm, one graph
    cfg = MetaConfig(
        inner_lr=shape.inner_lr,
        inner_steps=steps,
        first_order=first_order,
        batching="loop" if previous else strategy,
        chunk=batch.num_tasks if previous else 0,
    )
    if previous:
        learner = MAML(model, shape.kind, cfg)

        def run_previous() -> None:
            model.zero_grad(set_to_none=True)
            with primitive_batch_norm():
                learner.meta_backward(batch)

        return run_previous, model
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


@dataclass
class Candidate:
    """One row of a timing table: a zero-argument meta-step and what it is."""

    label: str  # "reference", "loop", "batched (auto)", "distill (batched)"
    strategy: str
    run: Callable[[], None]
    distill: bool = False


def build_candidates(
    shape: Shape,
    strategies: list[str],
    first_order: bool,
    device: str,
    distill: bool,
    meta_batch: int | None = None,
    inner_steps: int | None = None,
    bf16: bool = False,
) -> list[Candidate]:
    """The reference, each strategy (``auto``'s choice marked, added if not listed), and the KD step.

    Convolutional shapes add the previous version's loop and, with ``bf16``, ``auto`` under autocast.
    """
    auto = auto_choice(shape, device)
    cands = [Candidate("reference", "reference", step_fn(shape, "reference", first_order, device)[0])]
    for strategy in dict.fromkeys([*strategies, auto]):
        try:
            run, _ = step_fn(shape, strategy, first_order, device, False, meta_batch, inner_steps)
        except ValueError:  # batched without batched_forward
            continue
        cands.append(Candidate(strategy + (" (auto)" if strategy == auto else ""), strategy, run))
    if meta_batch is not None or inner_steps is not None:
        ref_run, _ = step_fn(shape, "reference", first_order, device, False, meta_batch, inner_steps)
        cands[0] = Candidate("reference", "reference", ref_run)
    elif shape.kind == "classification":
        cands.append(
            Candidate(
                "loop, previous version", "previous", step_fn(shape, "previous", first_order, device)[0]
            )
        )
        if bf16:
            cands.append(
                Candidate(
                    f"{auto} (auto), bf16 autocast",
                    auto,
                    autocast(step_fn(shape, auto, first_order, device)[0], device),
                )
            )
    if distill:
        run, _ = step_fn(shape, auto, first_order, device, True)
        cands.append(Candidate(f"distill ({auto})", auto, run, distill=True))
    return cands


def auto_choice(shape: Shape, device: str) -> str:
    """What ``meta.batching=auto`` runs for this shape in the pipeline (by model, device, task size)."""
    model = make_model(shape, shape.width).to(device)
    return resolve_batching("auto", model, device, task_pixels(shape))


def autocast(run: Callable[[], None], device: str) -> Callable[[], None]:
    """``run`` under bf16 autocast: convolutions and matrix products in bfloat16, the rest in float32."""

    def run_bf16() -> None:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            run()

    return run_bf16


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def interleave(cands: list[Candidate], rounds: int, warmup: int, min_time: float, device: str) -> dict:
    """Seconds per meta-step of every candidate, ``rounds`` times, candidates taking turns.

    Round ``r`` runs A B C ..., round ``r+1`` ... C B A, so that a machine's drift (other jobs, clock
    changes) hits every candidate alike and the ratio of two samples of one round is fair. A sample
    runs a candidate ``k`` times in a row, ``k`` chosen so that a sample lasts at least ``min_time``
    (timer resolution and per-call noise matter for the 1-10 ms sinusoid steps).
    """
    sync = _sync(device)
    reps = {}
    for c in cands:
        for _ in range(warmup):
            c.run()
        sync()
        tic = time.perf_counter()
        c.run()
        sync()
        reps[c.label] = max(1, math.ceil(min_time / max(time.perf_counter() - tic, 1e-6)))
    times: dict[str, list[float]] = {c.label: [] for c in cands}
    for r in range(rounds):
        for c in cands if r % 2 == 0 else cands[::-1]:
            k = reps[c.label]
            tic = time.perf_counter()
            for _ in range(k):
                c.run()
            sync()
            times[c.label].append((time.perf_counter() - tic) / k)
    return times


def spread(values: list[float]) -> dict[str, float]:
    """Median, quartiles and range of a list of samples."""
    q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": med, "q1": q1, "q3": q3, "min": min(values), "max": max(values)}


def flops_of(run: Callable[[], None]) -> int | None:
    """Floating-point operations of one meta-step, as ``FlopCounterMode`` counts them.

    It counts matrix products and convolutions (forward, backward and double backward), not the
    elementwise ops, so GFLOP/s below is the rate of the dense arithmetic. A convolution's backward
    is counted with :func:`conv_backward_flop`: torch's own formula leaves a grouped convolution's
    groups out of the weight gradient, and ``vmap`` and ``batched`` run a meta-batch's convolutions
    as ONE convolution with a group per task, so torch's count grew with the meta-batch (vmap on
    omniglot_5w1s showed 180% of the measured matmul peak).
    """
    try:
        with FlopCounterMode(
            display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
        ) as counter:
            run()
    except Exception:  # noqa: BLE001 - a transform the counter cannot see through: report none
        return None
    return int(counter.get_total_flops())


def conv_backward_flop(
    grad_out_shape: Any,
    x_shape: Any,
    w_shape: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    transposed: bool,
    output_padding: Any,
    groups: int,
    output_mask: list[bool],
    out_shape: Any,
    **kwargs: Any,
) -> int:
    """torch's count for ``aten.convolution_backward`` with the weight gradient divided by ``groups``.

    The input gradient's count is right for any groups (it reads the weight's ``in/groups`` width);
    the weight gradient's treats the input and output channels as all connected, ``groups`` times
    the products a grouped convolution makes.
    """
    from torch.utils.flop_counter import conv_backward_flop as torch_formula

    args = (grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed, output_padding)
    grad_input = torch_formula(*args, groups, [output_mask[0], False], out_val=out_shape)
    grad_weight = torch_formula(*args, groups, [False, output_mask[1]], out_val=out_shape)
    return int(grad_input) + int(grad_weight) // max(int(groups), 1)


def flop_rate(flops: int | None, seconds: float, peak: float) -> tuple[float | None, str | None]:
    """GFLOP/s of a step, or None with the reason when the count cannot be right.

    A rate above the machine's measured matmul peak is not a result but a counting error (an op
    the counter over-counts): the cell stays empty and the reason goes into the JSON and the notes.
    """
    if flops is None:
        return None, "FlopCounterMode cannot count this step"
    rate = flops / seconds / 1e9
    if rate > peak:
        return None, f"counted {rate:.1f} GFLOP/s, above the measured matmul peak {peak:.1f}: a miscount"
    return rate, None


def serially(measure: Callable[..., T], *args: Any) -> T:
    """``measure(*args)`` with one intra-op thread (then restored): no task runs in another thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(*args)
    finally:
        torch.set_num_threads(threads)


def peak_memory_mb(run: Callable[[], None], device: str) -> float:
    """Peak memory one meta-step allocates beyond what was held before it, in MB.

    CUDA: ``torch.cuda.max_memory_allocated`` over the step. CPU: the allocation and free events that
    ``torch.profiler`` records for the CPU allocator (``profile_memory=True``), summed in time
    order; the largest running total is the step's peak (parameters, data and the optimiser state
    held before the step are not counted; short steps are measured as well as long ones, unlike
    the peak RSS of a process).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    total = peak = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak / 2**20


def matmul_peak_gflops(device: str, n: int = 2048, repeats: int = 5) -> float:
    """The machine's dense fp32 rate at the current thread count: the best of a few n x n products."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    sync = _sync(device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync()
        tic = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best / 1e9


def measure_order(shape: Shape, order: str, args: argparse.Namespace, peak: float) -> list[dict]:
    """Interleaved timings, pairwise ratios, FLOP rate and peak memory of every candidate of one order."""
    first_order = order == "first"
    cands = build_candidates(
        shape, args.strategies, first_order, args.device, not args.no_distill, bf16=args.bf16
    )
    rounds = args.repeats or DEFAULT_ROUNDS[shape.kind]
    times = interleave(cands, rounds, args.warmup, args.min_time, args.device)
    ref = times["reference"]
    rows = []
    for c in cands:
        t = times[c.label]
        # FLOPs and memory with one thread: the profiler and FlopCounterMode see only this thread,
        # and the loop's task threads (LoopStrategy.backward) do the same arithmetic one task at a
        # time then. With N threads the loop holds up to N tasks' graphs at once.
        flops = serially(flops_of, c.run)
        sec = statistics.median(t)
        rate, note = flop_rate(flops, sec, peak)
        row = {
            "shape": shape.name,
            "order": order,
            "label": c.label,
            "strategy": c.strategy,
            "distill": c.distill,
            "rounds": rounds,
            "seconds": sec,
            "iters_per_s": 1.0 / sec,
            "ratio": None if c.distill else spread([a / b for a, b in zip(ref, t)]),
            "flops": flops,
            "gflops": rate,
            "gflops_note": note,
            "peak_fraction": None if rate is None else rate / peak,
            "peak_mb": serially(peak_memory_mb, c.run, args.device),
        }
        rows.append(row)
        ratio = row["ratio"]
        print(
            f"   {order:6s} {c.label:22s} {row['iters_per_s']:9.3f} it/s"
            + (f"  x{ratio['median']:.2f} [{ratio['q1']:.2f}-{ratio['q3']:.2f}]" if ratio else "")
            + (f"  {row['gflops']:.1f} GFLOP/s" if row["gflops"] is not None else "")
            + f"  {row['peak_mb']:.1f} MB",
            flush=True,
        )
    return rows


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
            for strategy in [*strategies, *(["previous"] if shape.kind == "classification" else [])]:
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


DEFAULT_ROUNDS = {"regression": 30, "classification": 7}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--strategies", nargs="+", default=["vmap", "loop", "batched"])
    ap.add_argument("--orders", nargs="+", default=["second", "first"], choices=["second", "first"])
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 0: PyTorch's default")
    ap.add_argument(
        "--repeats", type=int, default=0, help="interleaved rounds (0: 30 for the sinusoid, 7 for images)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample (at least)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument(
        "--bf16", action="store_true", help="image shapes: add auto's strategy under bf16 autocast"
    )
    ap.add_argument("--no-check", action="store_true", help="skip the float64 meta-gradient check")
    ap.add_argument(
        "--scaling", nargs="*", default=[], help="shapes for the meta-batch/inner-steps tables (slow)"
    )
    ap.add_argument("--out", default="benchmark_results")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name(args.device)
    else:
        import platform

        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    peak = matmul_peak_gflops(args.device, n=8192 if args.device.startswith("cuda") else 2048)
    results: dict = {
        "device": args.device,
        "machine": machine,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "malloc": "tuned" if malloc.applied else "system",
        "matmul_peak_gflops": peak,
        "argv": sys.argv[1:] if argv is None else argv,
        "shapes": {},
    }
    print(
        f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{results['malloc']} malloc: fp32 matmul peak {peak:.1f} GFLOP/s",
        flush=True,
    )
    md = [
        f"# Meta-training benchmark ({machine}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {results['malloc']} malloc; fp32 matmul peak {peak:.1f} GFLOP/s)",
        "",
    ]
    for name in args.shapes:
        shape = SHAPES[name]
        entry: dict = {}
        if not args.no_check:
            print(f"== {name}: checking meta-gradients", flush=True)
            grads = check_gradients(shape, args.strategies, args.device)
            bad = {k: v for k, v in grads.items() if v > 1e-8}
            if bad:
                sys.exit(f"{name}: meta-gradients differ from the reference: {bad}")
            entry["gradient_check"] = grads
        print(f"== {name}: timing, strategies interleaved", flush=True)
        rows = [r for order in args.orders for r in measure_order(shape, order, args, peak)]
        entry["rows"] = rows
        fastest = min(
            (r for r in rows if r["strategy"] != "reference" and not r["distill"]), key=lambda r: r["seconds"]
        )
        entry["sampling"] = sampling_ratio(shape, fastest["seconds"])
        if name in args.scaling:
            entry["scaling"] = scaling(shape, args)
        results["shapes"][name] = entry
        md += markdown(name, shape, entry)
        (out / "benchmark.json").write_text(json.dumps(results, indent=2))
        (out / "benchmark.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}", flush=True)
    finish()
    return 0


def finish() -> None:
    """Stop the loop's task threads while torch is whole, before the interpreter tears it down.

    The threads hold autograd state and model replicas in thread-locals; left to the interpreter's
    exit they are joined while modules are being finalised, and a failure there would turn a run
    whose tables are written into a non-zero exit status.
    """
    from metakd_run.meta import threads

    for pool in threads.POOLS.values():
        pool.shutdown(wait=True)
    threads.POOLS.clear()


def scaling(shape: Shape, args: argparse.Namespace) -> dict:
    """Seconds per second-order meta-step of ``auto``'s strategy and the reference, interleaved."""
    auto = auto_choice(shape, args.device)
    rounds = max(3, (args.repeats or DEFAULT_ROUNDS[shape.kind]) // 3)
    table: dict = {"strategy": auto, "meta_batch": {}, "inner_steps": {}}
    for key, values in (("meta_batch", (1, 4, 16, 64)), ("inner_steps", (1, 2, 5, 10))):
        for v in values:
            size = {key: v}
            cands = [
                Candidate(s, s, step_fn(shape, s, False, args.device, False, **size)[0])
                for s in (auto, "reference")
            ]
            times = interleave(cands, rounds, 1, args.min_time, args.device)
            table[key][v] = {s: statistics.median(t) for s, t in times.items()}
    return table


def _fmt_ratio(r: dict | None) -> tuple[str, str]:
    if r is None:
        return "–", "–"
    return f"{r['median']:.2f}", f"{r['q1']:.2f}–{r['q3']:.2f} ({r['min']:.2f}–{r['max']:.2f})"


def markdown(name: str, shape: Shape, entry: dict) -> list[str]:
    lines = [
        f"## {name}",
        "",
        f"meta-batch {shape.meta_batch}, {shape.inner_steps} inner step(s), width {shape.width}; "
        f"{entry['rows'][0]['rounds']} interleaved rounds.",
        "",
    ]
    if "gradient_check" in entry:
        lines += [
            "meta-gradient check (max abs diff vs reference, float64): "
            + ", ".join(f"{k} {v:.1e}" for k, v in entry["gradient_check"].items()),
            "",
        ]
    lines += [
        "| order | strategy | meta-it/s | × reference (median) | IQR (min–max) | GFLOP/s | % of matmul peak "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in entry["rows"]:
        ratio, spread_ = _fmt_ratio(r["ratio"])
        gf = "–" if r["gflops"] is None else f"{r['gflops']:.2f}"
        pf = "–" if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.1f}"
        lines.append(
            f"| {r['order']} | {r['label']} | {r['iters_per_s']:.3f} | {ratio} | {spread_} | {gf} | {pf} | "
            f"{r['peak_mb']:.1f} |"
        )
    s = entry["sampling"]
    notes = [f"{r['order']} {r['label']}: {r['gflops_note']}" for r in entry["rows"] if r.get("gflops_note")]
    lines += [
        "",
        *(["GFLOP/s left empty: " + "; ".join(notes) + ".", ""] if notes else []),
        "GFLOP/s and peak MB are measured with one thread (the loop then runs one task at a time; "
        "with N threads it runs N tasks at once, holding up to N tasks' graphs).",
        "",
        f"episode sampling: {s['sample_s'] * 1000:.2f} ms per meta-batch = "
        f"{100 * s['fraction_of_iteration']:.2f}% of a meta-iteration of the fastest strategy",
        "",
    ]
    if "scaling" in entry:
        sc = entry["scaling"]
        for key in ("meta_batch", "inner_steps"):
            lines += [
                f"seconds per second-order meta-iteration against {key.replace('_', ' ')} "
                f"({sc['strategy']} vs reference, interleaved):",
                "",
                f"| {key.replace('_', ' ')} | {sc['strategy']} | reference |",
                "|---|---|---|",
            ]
            lines += [f"| {k} | {v[sc['strategy']]:.4f} | {v['reference']:.4f} |" for k, v in sc[key].items()]
            lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
