"""A one-node SLURM cluster for the tests (scripts/slurm_local.sh), started once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_local.sh"


@dataclass
class LocalCluster:
    folder: Path
    conf: Path
    startup_s: float

    def run(self, *args: str, timeout: float = 60) -> str:
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        return subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, env=env, check=True
        ).stdout

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return next(f.split("=", 1)[1] for f in out.split() if f.startswith("JobState="))


def _installed() -> bool:
    return all(shutil.which(x) for x in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo"))


def _install() -> str:
    """Try ``slurm_local.sh install`` (root and apt-get only); return why SLURM is unavailable, or ''."""
    if _installed():
        return ""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be here (needs root and apt-get): apt-get install slurm-wlm"
    proc = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not _installed():
        why = proc.stderr.strip()[-300:]
        return f"SLURM is not installed and 'scripts/slurm_local.sh install' failed: {why}"
    return ""


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[LocalCluster]:
    """Start the cluster (in a short /tmp folder of its own), export SLURM_CONF for the subprocesses
    the tests start, stop it at the end."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="mkslurm-", dir="/tmp"))
    tic = time.perf_counter()
    proc = subprocess.run([str(SCRIPT), "start", str(folder)], capture_output=True, text=True, timeout=120)
    startup = time.perf_counter() - tic
    if proc.returncode != 0:
        subprocess.run([str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=60)
        pytest.fail(f"the local SLURM cluster did not start: {proc.stderr.strip()}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield LocalCluster(folder, folder / "slurm.conf", startup)
    finally:
        subprocess.run([str(SCRIPT), "stop", str(folder)], capture_output=True, timeout=60)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(folder, ignore_errors=True)
