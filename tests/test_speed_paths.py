"""The benchmark's measuring tools (scripts/benchmark.py): turn order, pairwise ratios, memory, FLOPs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "benchmark", Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
)
benchmark = importlib.util.module_from_spec(_spec)
sys.modules["benchmark"] = benchmark
_spec.loader.exec_module(benchmark)


def test_candidates_take_turns_in_alternating_order():
    calls: list[str] = []
    cands = [benchmark.Candidate(n, n, lambda n=n: calls.append(n)) for n in "ABC"]
    times = benchmark.interleave(cands, rounds=3, warmup=0, min_time=0.0, device="cpu")
    assert calls[3:] == list("ABCCBAABC")  # after one calibration call each
    assert all(len(t) == 3 for t in times.values())


def test_spread_of_samples():
    s = benchmark.spread([1.0, 2.0, 3.0, 4.0, 100.0])
    assert (s["median"], s["min"], s["max"]) == (3.0, 1.0, 100.0)
    assert s["q1"] == 2.0 and s["q3"] == 4.0


def test_peak_memory_sees_a_short_lived_tensor():
    def step() -> None:
        x = torch.ones(2**20)  # 4 MiB, freed before the step ends
        x.sum()

    assert 3.9 <= benchmark.peak_memory_mb(step, "cpu") < 40


def test_flops_count_a_matrix_product():
    a = torch.randn(32, 16)
    assert benchmark.flops_of(lambda: a @ a.T) == 2 * 32 * 16 * 32
