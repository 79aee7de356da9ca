"""The public Python API: a run's models loaded, adapted and used outside the console script."""

from __future__ import annotations

import pytest
import torch

import metakd_run
from metakd_run.checkpoint import CheckpointError
from metakd_run.config import ConfigError


def test_load_adapt_predict_matches_the_meta_test(tmp_path, run_cli):
    run = tmp_path / "run"
    proc = run_cli(run_dir=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    student = metakd_run.load(run, "student_kd")
    teacher = metakd_run.load(run, "teacher")
    assert sum(p.numel() for p in student.model.parameters()) < sum(
        p.numel() for p in teacher.model.parameters()
    )
    # the same tasks the meta-test used: its per-task MSE after eval.steps is reproduced here
    from metakd_run.data.sinusoid import SinusoidTasks

    cfg = student.config
    ds = cfg.dataset
    source = SinusoidTasks(ds.amplitude, ds.phase, ds.x_range, ds.shots, ds.queries, ds.noise)
    batch = source.sample(cfg.eval.batch, torch.Generator().manual_seed(cfg.eval.seed))
    mse = []
    for i in range(batch.num_tasks):
        fast = student.adapt(batch.support_x[i], batch.support_y[i])
        pred = student.predict(batch.query_x[i], fast)
        mse.append(float(((pred - batch.query_y[i]) ** 2).mean()))
    import json

    per_task = json.loads((run / "per_task.json").read_text())
    expected = per_task["student_kd"]["mse"][f"step_{cfg.eval.steps}"][: batch.num_tasks]
    assert mse == pytest.approx(expected, rel=1e-4, abs=1e-6)
    # adaptation changes the prediction (towards the task: lower query MSE than the initialisation's)
    before = student.predict(batch.query_x[0])
    fast = student.adapt(batch.support_x[0], batch.support_y[0])
    adapted = student.predict(batch.query_x[0], fast)
    assert not torch.allclose(adapted, before)
    assert ((adapted - batch.query_y[0]) ** 2).mean() < ((before - batch.query_y[0]) ** 2).mean()
    initial = per_task["student_kd"]["mse"]["step_0"][0]
    assert float(((before - batch.query_y[0]) ** 2).mean()) == pytest.approx(initial, rel=1e-4, abs=1e-6)
    # ... and the initialisation is untouched by it
    assert torch.equal(before, student.predict(batch.query_x[0]))


def test_load_refuses_what_it_cannot_use(tmp_path):
    with pytest.raises(ConfigError, match="no .hydra/config.yaml"):
        metakd_run.load(tmp_path, "teacher")
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("x: 1\n")
    with pytest.raises(ConfigError, match="model='pupil'"):
        metakd_run.load(tmp_path, "pupil")
    with pytest.raises((ConfigError, CheckpointError)):
        metakd_run.load(tmp_path, "teacher")
