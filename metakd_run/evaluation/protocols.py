"""The evaluation protocols, side by side: a small registry.

A protocol is a module of :mod:`metakd_run.evaluation` (or anywhere on the path) that defines
``PROTOCOL = Protocol(...)``: its name (its key in ``summary.json``), ``enabled(cfg)``,
``check(cfg)`` (run before any training, so a bad setting costs seconds; what it returns is kept
for ``run`` in ``context.prepared[name]``) and ``run(context, learners)``, which returns its
section of the summary (a dict), or a :class:`Section` when it also has records to present.

:data:`MODULES` lists them, one line each, in the order they run; that line is the only place a
protocol is named. Protocols never import each other, and nothing here imports them: they are
imported by name when the pipeline asks for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from metakd_run.config import Config

# The registration lines: one module per protocol, in the order they run.
MODULES: list[str] = [
    "metakd_run.evaluation.meta_test",  # the fixed-task meta-test: every model, the same test tasks
    "metakd_run.evaluation.lake_runs",  # eval.lake_runs: Lake et al.'s 20 one-shot runs
]


@dataclass
class Section:
    """What a protocol returns: its part of ``summary.json``, and records the presentation draws but
    the summary leaves out (per-task values, wall times, example predictions)."""

    summary: dict[str, Any]
    records: dict[str, Any] = field(default_factory=dict)


def _never(cfg: Config) -> None:  # noqa: ARG001 - a protocol with nothing to check
    return None


@dataclass(frozen=True)
class Protocol:
    name: str
    enabled: Callable[[Config], bool]
    run: Callable[..., dict[str, Any] | Section]  # (context, learners) -> section
    check: Callable[[Config], Any] = _never
    # the section is the summary's top level rather than one key of it (the meta-test's models,
    # comparisons, task and eval have always sat there)
    top_level: bool = False


def registered() -> list[Protocol]:
    """Every protocol of :data:`MODULES`, in order."""
    out = []
    for name in MODULES:
        protocol = getattr(importlib.import_module(name), "PROTOCOL", None)
        if not isinstance(protocol, Protocol):
            raise TypeError(f"{name} defines no PROTOCOL = Protocol(...): see docs/extending.md")
        out.append(protocol)
    return out


def enabled(cfg: Config) -> list[Protocol]:
    """The protocols this run's config turns on."""
    return [p for p in registered() if p.enabled(cfg)]


def as_section(result: dict[str, Any] | Section) -> Section:
    return result if isinstance(result, Section) else Section(dict(result))
