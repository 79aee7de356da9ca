"""The import rules of docs/architecture.md, drawn from the code with ``ast``: no cycle, no upward
import, and the package rules (evaluation computes, presentation presents, protocols side by side).

Every ``import`` counts, wherever it stands: at the top, inside a function, or under
``TYPE_CHECKING`` (a type-only import still ties the two modules together for a reader).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from metakd_run.evaluation import protocols

ROOT = Path(__file__).resolve().parents[1] / "metakd_run"

# Layers, lowest first: a module may import its own layer's package or any lower layer, never a
# higher one. A module's layer is that of the longest entry that is its name or a package above it.
LAYERS: list[tuple[str, ...]] = [
    # 0: leaves: import nothing of the project (names: config alone)
    ("metakd_run", "config", "seeding", "checkpoint", "malloc", "slurm", "data.errors", "data.tasks"),
    ("names", "models", "data"),  # 1: the data sets and the models; the stage names
    ("data.registry", "data.__init__", "meta"),  # 2: the registry on top of the data sets; the algorithm
    ("distill", "build", "fingerprint", "tracking", "distributed"),  # 3
    ("evaluation", "training", "api"),  # 4: evaluation computes
    ("presentation",),  # 5: presentation presents
    ("pipeline", "sweep", "ledger", "lake"),  # 6: the run, the sweep, the ledger, entry points
    ("cli",),  # 7: the console script
]
LEAVES = {"config", "seeding", "checkpoint", "malloc", "slurm", "data.errors", "data.tasks", "names"}
# What each package must never import (prefixes; ``x`` also forbids ``x.*``).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "meta": (
        "distill",
        "evaluation",
        "presentation",
        "training",
        "tracking",
        "pipeline",
        "build",
        "data.registry",
    ),
    "evaluation": (
        *("presentation", "tracking", "training", "pipeline", "sweep", "cli", "api", "distill", "build"),
    ),
    "presentation": ("meta", "models", "data", "pipeline", "training", "distill", "build", "api", "sweep"),
    "sweep": ("pipeline", "training", "meta", "data"),
    "data": ("data.registry",),  # the registry sits on top: no data set imports it
}
FORBIDDEN_EXCEPT = {"data": ("data.registry", "data.__init__")}  # the registry and the package façade
# presentation reads evaluation's records, never a protocol or anything that computes
OUTPUTS_MAY_READ = ("evaluation.summary", "evaluation.stats")


def module_names() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts)] = path  # data/__init__.py -> "data.__init__"; __init__.py -> "__init__"
    out["metakd_run"] = out.pop("__init__")
    return out


MODULES = module_names()


def resolve(name: str) -> str | None:
    """``metakd_run.x.y`` -> the project module ``x.y`` (``x.__init__`` for a package), else None."""
    if name == "metakd_run":
        return name
    if not name.startswith("metakd_run."):
        return None
    short = name.removeprefix("metakd_run.")
    for candidate in (short, f"{short}.__init__"):
        if candidate in MODULES:
            return candidate
    return None


def imports(module: str) -> set[str]:
    """The project modules ``module`` imports, anywhere in its text."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    here = ["metakd_run", *module.split(".")[:-1]]  # the package ``module`` is in
    out: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # ``from x import y``: the module x.y, else a name of x
                out.add(resolve(f"{base}.{alias.name}") or resolve(base))
    out.discard(None)
    out.discard(module)
    return out  # type: ignore[return-value]


GRAPH = {m: imports(m) for m in MODULES}


def layer(module: str) -> int:
    best, found = -1, 0
    for i, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best:
                best, found = len(name), i
    assert best >= 0, f"{module} has no layer: add it to LAYERS in tests/test_architecture.py"
    return found


def package(module: str) -> str:
    return module.split(".")[0]


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_no_import_cycle() -> None:
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n) :] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_upward_import() -> None:
    upward = [
        f"{m} (layer {layer(m)}) imports {n} (layer {layer(n)})"
        for m, deps in GRAPH.items()
        for n in deps
        if layer(n) > layer(m)
        and not (m == "metakd_run" and n == "api")  # the package's lazy façade
        and package(n) != package(m)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_leaves_import_nothing_of_the_project() -> None:
    wrong = [f"{m} imports {n}" for m in LEAVES for n in GRAPH[m] if not (m == "names" and n == "config")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("owner", sorted(FORBIDDEN))
def test_package_rules(owner: str) -> None:
    exempt = FORBIDDEN_EXCEPT.get(owner, ())
    wrong = [
        f"{m} imports {n}"
        for m, deps in GRAPH.items()
        if under(m, owner) and m not in exempt
        for n in deps
        if any(under(n, f) for f in FORBIDDEN[owner])
        and not (owner == "presentation" and any(under(n, r) for r in OUTPUTS_MAY_READ))
    ]
    assert not wrong, "\n".join(wrong)


def test_presentation_reads_only_the_records_of_evaluation() -> None:
    wrong = [
        f"{m} imports {n}"
        for m, deps in GRAPH.items()
        if under(m, "presentation")
        for n in deps
        if under(n, "evaluation") and n not in OUTPUTS_MAY_READ
    ]
    assert not wrong, "\n".join(wrong)


def test_protocols_never_import_each_other_and_are_named_once() -> None:
    names = [m.removeprefix("metakd_run.") for m in protocols.MODULES]
    assert len(names) >= 2 and all(n in MODULES for n in names)
    # nothing in the project imports a protocol module but a module entry point (``python -m``)
    wrong = [
        f"{m} imports the protocol {n}"
        for m, deps in GRAPH.items()
        for n in deps
        if n in names and "__main__" not in MODULES[m].read_text()
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_entry_points_import_the_pipeline() -> None:
    importers = {m for m, deps in GRAPH.items() if "pipeline" in deps}
    entry = {m for m in importers if "__main__" in MODULES[m].read_text()}
    assert importers - entry <= {"cli"}, f"pipeline imported by {sorted(importers - entry - {'cli'})}"


def test_the_rules_see_a_broken_import(tmp_path: Path) -> None:
    """The checks above are not vacuous: an evaluation module importing the presentation is caught."""
    fake = {**GRAPH, "evaluation.bad": {"presentation.table", "pipeline"}}
    hits = [n for n in fake["evaluation.bad"] if any(under(n, f) for f in FORBIDDEN["evaluation"])]
    assert sorted(hits) == ["pipeline", "presentation.table"]
    assert layer("evaluation.bad") < layer("presentation.table")


def test_each_choice_list_has_one_home_that_its_registry_matches() -> None:
    """The schema (config.py) holds each choice list; a registry that implements the choices must
    cover exactly that list, so adding a choice in one place and not the other fails here."""
    from metakd_run.config import DATASET_SCHEMAS, MODEL_SCHEMAS, Batching
    from metakd_run.data.registry import DATASETS
    from metakd_run.meta.auto import BATCHING
    from metakd_run.meta.strategies import STRATEGIES
    from metakd_run.models import MODELS

    assert set(DATASETS) == set(DATASET_SCHEMAS)
    assert set(MODELS) == set(MODEL_SCHEMAS)
    assert BATCHING == tuple(b.value for b in Batching)
    assert {"auto", *STRATEGIES} == set(BATCHING)


def test_group_files_state_only_what_differs_from_the_schema() -> None:
    """Each default has one home, the schema: a group's YAML file that extends it restates no
    default (a file may name itself: ``name``, ``backend``)."""
    import yaml
    from omegaconf import OmegaConf

    from metakd_run import config

    schemas = {
        "schema_meta": config.MetaConfig,
        "schema_kd": config.KDConfig,
        "schema_logger": config.LoggerConfig,
    }
    schemas |= {f"schema_dataset_{n}": v for n, v in config.DATASET_SCHEMAS.items()}
    schemas |= {f"schema_model_{n}": v for n, v in config.MODEL_SCHEMAS.items()}
    restated = []
    for path in sorted((ROOT.parent / "configs").glob("*/*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        schema = next(
            (e[1:].split("@")[0] for e in raw.get("defaults") or [] if str(e).startswith("/schema_")), None
        )
        if schema is None:
            continue
        base = OmegaConf.to_container(OmegaConf.structured(schemas[schema]), resolve=False, enum_to_str=True)
        restated += [
            f"{path.parent.name}/{path.name}: {k}"
            for k, v in raw.items()
            if k not in ("defaults", "name", "backend") and k in base and base[k] == v
        ]
    assert not restated, "defaults restated in YAML (the schema holds them): " + ", ".join(restated)
