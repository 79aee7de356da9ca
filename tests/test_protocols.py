"""Evaluation protocols side by side: a third one is its own module plus one registration line.

The errand of docs/extending.md ("An evaluation protocol"), done as a contributor would: a module
that defines ``PROTOCOL``, named once in :data:`metakd_run.evaluation.protocols.MODULES`; a tiny
run of the real console script then carries its section in ``summary.json``, and its ``check``
refuses a setting before any training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metakd_run.evaluation import protocols
from tests.conftest import TINY

# A toy with a check: refuses eval.batch=3 before any training.
TOY = '''
"""A toy evaluation protocol with a check."""

from __future__ import annotations

from typing import Any

from metakd_run.config import ConfigError
from metakd_run.evaluation.context import Context
from metakd_run.evaluation.curves import adaptation_curves, fixed_tasks
from metakd_run.evaluation.protocols import Protocol
from metakd_run.evaluation.stats import mean_ci

TASKS = 6


def check(cfg: Any) -> int:
    if cfg.eval.batch == 3:  # a stand-in for "a setting this protocol cannot score"
        raise ConfigError("eval.batch=3 is invalid with the toy protocol: use another batch")
    return TASKS


def run(context: Context, learners: dict[str, Any]) -> dict[str, Any]:
    tasks = fixed_tasks(context.test, context.prepared["toy_zero_shot"], 7, 0)
    section = {"tasks": len(tasks[0].support_x), "models": {}}
    for name, learner in learners.items():
        curves = adaptation_curves(learner, tasks, 0, context.device, context.dtype, [0])
        section["models"][name] = {metric: mean_ci(table[0])[0] for metric, table in curves.items()}
    return section


PROTOCOL = Protocol(name="toy_zero_shot", enabled=lambda cfg: True, check=check, run=run)
'''

DOCS = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def docs_toy() -> str:
    """The toy protocol's module as docs/extending.md prints it (its first code block there)."""
    text = DOCS.read_text().split("## An evaluation protocol", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def _run(
    tmp_path: Path, module: str, code: str, run_dir: Path, *overrides: str
) -> subprocess.CompletedProcess:
    """The console script with ``module`` (in tmp_path, outside the package) registered: the one
    registration line, made in the process the console script runs in."""
    (tmp_path / f"{module}.py").write_text(code)
    launch = (
        f"import sys; from metakd_run.evaluation import protocols; protocols.MODULES.append({module!r}); "
        "from metakd_run.cli import entry; sys.argv[0] = 'metakd-run'; entry()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, "-c", launch, *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)


def test_the_built_in_protocols_are_registered_side_by_side() -> None:
    names = [p.name for p in protocols.registered()]
    assert names == ["meta_test", "lake_runs"]
    assert [p.name for p in protocols.enabled(_cfg(lake_runs=None))] == ["meta_test"]
    assert [p.name for p in protocols.enabled(_cfg(lake_runs="x"))] == ["meta_test", "lake_runs"]


def _cfg(lake_runs: str | None) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(eval=SimpleNamespace(lake_runs=lake_runs))


def test_a_module_without_protocol_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocols, "MODULES", [*protocols.MODULES, "metakd_run.names"])
    with pytest.raises(TypeError, match=r"metakd_run.names defines no PROTOCOL"):
        protocols.registered()


def test_the_docs_toy_protocol_from_its_own_module_lands_in_the_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run(tmp_path, "zero_shot", docs_toy(), run_dir, "experiment=sinusoid")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    toy = summary["zero_shot"]
    assert toy["tasks"] == 6
    assert set(toy["models"]) == {"teacher", "student_kd", "student_base"}
    for metrics in toy["models"].values():  # the sinusoid's query MSE before adaptation: finite, > 0
        assert set(metrics) == {"task_loss"} and 0 < metrics["task_loss"] < 100
    # the built-in protocol is untouched beside it
    assert {"models", "comparisons", "objective"} <= set(summary) and "lake_runs" not in summary


def test_a_toy_protocols_check_refuses_before_any_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _run(tmp_path, "toy_checked", TOY, run_dir, "experiment=sinusoid", "eval.batch=3")
    assert proc.returncode == 2
    assert "metakd-run: error: eval.batch=3 is invalid with the toy protocol" in proc.stderr
    assert not list(run_dir.glob("checkpoints/*.pt"))  # refused in prepare, before the teacher's first step
