"""scripts/benchmark.py: a run that succeeded exits 0, and its FLOP rates are counts, not artefacts.

torch's ``FlopCounterMode`` leaves a grouped convolution's groups out of the weight gradient's
count, and ``vmap`` and ``batched`` run a meta-batch's convolutions as one grouped convolution:
the table showed them above the machine's matmul peak. The script counts them with its own
formula and leaves a rate above the peak empty, with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import ROOT, intra_op_threads

SCRIPT = ROOT / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """The script as a module, imported without its allocator set-up (this process is the tests')."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAKD_RUN_MALLOC", "system")
        spec = importlib.util.spec_from_file_location("metakd_benchmark_script", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return module


def test_a_run_that_succeeds_exits_zero_with_every_rate_below_the_peak(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    args = ["--shapes", "sinusoid", "--threads", "1", "--repeats", "1", "--warmup", "0"]
    args += ["--min-time", "0", "--orders", "first", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "benchmark.json").read_text())
    assert (out / "benchmark.md").read_text().startswith("# Meta-training benchmark")
    peak = results["matmul_peak_gflops"]
    rows = results["shapes"]["sinusoid"]["rows"]
    assert {r["label"].split(" ")[0] for r in rows} >= {"reference", "vmap", "loop", "batched"}
    for row in rows:
        if row["gflops"] is None:
            assert row["gflops_note"], row
        else:
            assert 0 < row["gflops"] <= peak, row


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
def test_grouped_convolutions_are_counted_as_the_per_task_arithmetic(bench, first_order: bool) -> None:
    """Every strategy does the reference's arithmetic; the grouped ones must not count more."""
    shape = replace(bench.SHAPES["omniglot_5w1s"], meta_batch=4, width=8, student_width=4)
    with intra_op_threads(1):  # the loop's task threads would hide work from the counter
        counts = {s: bench.flops_of(bench.step_fn(shape, s, first_order, "cpu")[0]) for s in
                  ("reference", "loop", "vmap", "batched")}  # fmt: skip
        plain = FlopCounterMode(display=False)
        with plain:
            bench.step_fn(shape, "vmap", first_order, "cpu")[0]()
    assert counts["reference"] and counts["reference"] > 0
    assert counts == {s: counts["reference"] for s in counts}, counts
    # torch's own formula over-counts this very step (so the test exercises grouped convolutions)
    assert plain.get_total_flops() > counts["reference"]


def test_a_rate_above_the_peak_is_left_empty_with_the_reason(bench) -> None:
    assert bench.flop_rate(3_000_000_000, 1.0, 10.0) == (3.0, None)
    rate, note = bench.flop_rate(30_000_000_000, 1.0, 10.0)
    assert rate is None and "above the measured matmul peak 10.0" in note
    assert bench.flop_rate(None, 1.0, 10.0)[0] is None
    row = {
        "order": "second", "label": "vmap", "iters_per_s": 1.0, "ratio": None, "gflops": rate,
        "gflops_note": note, "peak_fraction": None, "peak_mb": 1.0, "rounds": 1,
    }  # fmt: skip
    entry = {"rows": [row], "sampling": {"sample_s": 0.001, "fraction_of_iteration": 0.01}}
    md = "\n".join(bench.markdown("omniglot_5w1s", bench.SHAPES["omniglot_5w1s"], entry))
    assert "| second | vmap | 1.000 | – | – | – | – |" in md
    assert f"GFLOP/s left empty: second vmap: {note}." in md
