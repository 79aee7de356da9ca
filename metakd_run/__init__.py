"""metakd-run: config-driven MAML and meta knowledge distillation experiments.

``metakd_run.load(run_dir, "student_kd")`` gives a trained model to adapt and predict with
(:mod:`metakd_run.api`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    if name == "load":  # imported on first use: `import metakd_run` stays light for the console script
        from metakd_run.api import load

        return load
    raise AttributeError(f"module 'metakd_run' has no attribute {name!r}")
