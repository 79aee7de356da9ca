"""Shared fixtures: composing the real configs, and running the real console script."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Tiny budgets that still run every stage; used by the end-to-end tests.
TINY = [
    "train.iterations=12",
    "train.val_every=6",
    "train.val_tasks=8",
    "train.log_every=3",
    "train.checkpoint_every=5",
    "train.progress=false",
    "meta.meta_batch=4",
    "eval.tasks=10",
    "eval.steps=3",
    "eval.report_steps=[0,1,3]",
    "eval.batch=5",
    "threads=1",
]


# A suite started as a background job of a script (``cmd &`` without job control) inherits SIGINT
# ignored, and so would every console script it starts: Python raises no KeyboardInterrupt then,
# and the Ctrl-C tests would fail for the launcher's sake. They send SIGINT themselves, so the
# default comes back before anything is started (a handler, unlike "ignored", ends at exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spin-waits crawl on a busy 2-core box.
    A module takes it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with intra_op_threads(1):
        yield


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside, the previous one restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def metakd_run_exe() -> list[str]:
    exe = shutil.which("metakd-run", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "metakd_run.cli"]


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``metakd-run`` in a subprocess with its run folder under tmp_path."""

    def _run(*overrides: str, run_dir: Path | None = None, tiny: bool = True, timeout: int = 240):
        args = [*metakd_run_exe(), *(TINY if tiny else []), *overrides]
        if run_dir is not None:
            args.append(f"hydra.run.dir={run_dir}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=env)

    return _run


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture
def compose():
    """Compose the real configs with overrides, as the CLI would (without running)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import metakd_run.cli  # noqa: F401 - registers the structured configs

    def _compose(*overrides: str, hydra_config: bool = False):
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=hydra_config)

    return _compose
