"""scripts/benchmark.py measures the presets' shapes: its SHAPES must be what the presets compose to.

The presets (configs/experiment/) are the one home of each shape; the benchmark states them again so
it can run without composing a config, and this test holds the two together: a preset changed
without the benchmark (or the other way round) fails here, naming the shape and the values.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def shapes() -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METAKD_RUN_MALLOC", "system")
        spec = importlib.util.spec_from_file_location(
            "metakd_benchmark_shapes", ROOT / "scripts" / "benchmark.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    return module.SHAPES


def test_every_benchmark_shape_is_its_preset(shapes: dict, compose) -> None:  # noqa: ANN001
    for name, shape in shapes.items():
        cfg = compose(f"experiment={name}")
        ds, meta = cfg.dataset, cfg.meta
        width = {
            who: cfg[who].hidden[0] if "hidden" in cfg[who] else cfg[who].filters
            for who in ("teacher", "student")
        }
        got = {
            "kind": "regression" if ds.name == "sinusoid" else "classification",
            "in_shape": (1,)
            if ds.name == "sinusoid"
            else (3 if ds.name == "miniimagenet" else 1, ds.image_size, ds.image_size),
            "ways": ds.get("ways", 1),
            "shots": ds.shots,
            "queries": ds.queries,
            "meta_batch": meta.meta_batch,
            "inner_steps": meta.inner_steps,
            "inner_lr": meta.inner_lr,
            "width": width["teacher"],
            "student_width": width["student"],
        }
        want = {k: getattr(shape, k) for k in got}
        assert got == want, f"scripts/benchmark.py SHAPES[{name!r}] differs from experiment={name}"
