"""The console script sets glibc's allocator up before torch's threads allocate (metakd_run/malloc.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from metakd_run import malloc

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only"
)

# Imports the console script's module, lets four threads allocate and free 96 MB each (more than a
# non-main arena's heap holds), then counts the arenas in malloc_info's report.
PROBE = r"""
import ctypes, re, sys, tempfile, threading
import metakd_run.cli
from metakd_run import malloc
import torch

def work():
    for _ in range(3):
        x = torch.ones(24 << 20)
        del x

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    report = open(f.name).read()
print(malloc.applied, len(re.findall(r"<heap nr=", report)))
"""


def _probe(**env: str) -> tuple[str, int]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "METAKD_RUN"))
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


@glibc
def test_console_script_keeps_one_arena_and_opt_out_restores_glibcs_defaults() -> None:
    assert _probe() == ("True", 1)
    applied, arenas = _probe(METAKD_RUN_MALLOC="system")
    assert applied == "False" and arenas > 1


class FakeLibc:
    """Records ``mallopt`` calls and answers with ``verdict`` (1: accepted, 0: refused)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.verdict = 1

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.verdict


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    """A fresh process's view: nothing applied, no opt-out or glibc variables, a fake libc."""
    fake = FakeLibc()
    monkeypatch.setattr(malloc, "applied", False)
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda _name: fake)
    for name in (malloc.OPT_OUT, *malloc._USER_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    return fake


@pytest.mark.parametrize(
    "env",
    [
        {"METAKD_RUN_MALLOC": "system"},
        {"MALLOC_ARENA_MAX": "4"},
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
    ],
)
def test_opt_out_and_users_own_settings_leave_the_allocator_alone(
    monkeypatch: pytest.MonkeyPatch, libc: FakeLibc, env: dict[str, str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert malloc.tune() is False
    assert libc.calls == []


@glibc
def test_tune_sets_each_parameter_once_and_reports_failure(
    monkeypatch: pytest.MonkeyPatch, libc: FakeLibc
) -> None:
    assert malloc.tune() is True
    # mallopt(3)'s parameter numbers from glibc's <malloc.h>, and the values the module documents:
    # M_ARENA_MAX (-8) 1 arena, M_MMAP_THRESHOLD (-3) 512 MiB, M_TRIM_THRESHOLD (-1) 4 GiB
    assert sorted(libc.calls) == [(-8, 1), (-3, 536_870_912), (-1, 4_294_967_296)]
    assert malloc.tune() is True and len(libc.calls) == 3  # once per process
    monkeypatch.setattr(malloc, "applied", False)
    libc.verdict = 0  # glibc refused a value
    assert malloc.tune() is False
