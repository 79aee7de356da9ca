"""The command's own face: ``metakd-run --help`` and ``metakd-run --version``, from the real console script.

Hydra's defaults would answer "cli is powered by Hydra." and "Hydra 1.3.8"; a user needs the tool's
name, what it does, the config groups with their options, commands to start from, and the versions
a result depends on.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, metakd_run_exe
from tests.test_readme_commands import _parse, overrides_of, sweep_jobs


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*metakd_run_exe(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )


@pytest.fixture(scope="module")
def help_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    proc = _run("--help", cwd=tmp_path_factory.mktemp("help"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_help_opens_with_the_tool_and_what_it_does(help_text: str):
    first = help_text.splitlines()[0]
    assert first.startswith("metakd-run: ") and "distillation" in first
    assert "powered by Hydra" not in help_text and "cli " not in help_text
    paragraph = help_text.split("\n\n")[1]
    for word in ("teacher", "student_kd", "student_base", "summary", "run folder"):
        assert word in paragraph


def test_help_lists_every_config_group_with_its_options(help_text: str):
    """The group lines come from the config folder itself, so a new option appears without an edit."""
    for group in ("dataset", "meta", "kd", "model", "logger", "experiment"):
        options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
        assert f"{group}: {', '.join(options)}" in help_text.splitlines()
    assert "model@teacher=" in help_text  # how the model group is chosen for each role
    assert "hydra/launcher" not in help_text  # Hydra's own groups stay under --hydra-help


def test_help_examples_compose(help_text: str, compose):
    """Each example the help shows is a command that composes (a sweep: its first job)."""
    examples = help_text.split("== Examples ==")[1].split("\n\n")[0]
    commands = [_parse(line.strip(), n) for n, line in enumerate(examples.splitlines()) if line.strip()]
    assert len(commands) >= 4 and all(c is not None for c in commands), examples
    for cmd in commands:
        overrides, sweep = overrides_of(cmd)
        job = sweep_jobs(overrides)[0] if sweep else overrides
        cfg = compose(*job)
        assert "dataset" in cfg and "meta" in cfg, cmd.text
    assert "--version" in help_text and "--hydra-help" in help_text


def test_version_names_metakd_run_torch_and_hydra(tmp_path: Path):
    proc = _run("--version", "kd=kl", cwd=tmp_path)  # overrides beside it are not run
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines == [
        f"metakd-run {importlib.metadata.version('metakd-run')}",
        f"torch {importlib.metadata.version('torch')}",
        f"Hydra {importlib.metadata.version('hydra-core')}",
    ]
    assert re.fullmatch(r"metakd-run \d+\.\d+\.\d+.*", lines[0])
    assert not any(tmp_path.iterdir())  # no run folder, no .hydra/
