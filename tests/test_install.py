"""A plain, non-editable ``pip install .`` must carry the configs: the console script finds them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_non_editable_install_finds_its_configs(tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            "outputs", ".git", "*.egg-info", "build", "__pycache__", ".venv", "venv"
        ),
    )
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-compile",
        "--target",
        str(target),
        str(src),
    ]
    built = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (target / "metakd_run" / "configs" / "config.yaml").is_file()
    shutil.rmtree(src)  # the installed copy must not lean on the source tree
    code = "import sys; sys.argv = ['metakd-run', '--cfg', 'job']; from metakd_run.cli import entry; entry()"
    env = {**os.environ, "PYTHONPATH": str(target)}
    job = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert job.returncode == 0, job.stderr[-3000:]
    assert "name: sinusoid" in job.stdout and "inner_lr: 0.01" in job.stdout
    preset = subprocess.run(
        [sys.executable, "-c", code.replace("'job'", "'job', 'kd=cosine'")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert preset.returncode == 0 and "distance: cosine" in preset.stdout
