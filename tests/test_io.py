"""The one atomic writer: files come out with the umask's mode, whole or not at all.

Every writer of the package (checkpoints, summary.json, the data cache, downloads) goes through
``checkpoint.atomic_file``; each is checked here under two umasks, set for the test and put back.
"""

from __future__ import annotations

import os
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from metakd_run import checkpoint
from metakd_run.checkpoint import (
    atomic_file,
    current_umask,
    save_atomic,
    write_bytes_atomic,
    write_text_atomic,
)
from metakd_run.data import archive
from metakd_run.data.cache import load_or_build


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_every_writer_gives_the_umask_mode(tmp_path: Path, mask: int, expected: int) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    with umask(mask):
        written = [
            write_text_atomic("{}\n", tmp_path / "summary.json"),
            write_bytes_atomic(b"abc", tmp_path / "raw.bin"),
            save_atomic({"w": torch.ones(2)}, tmp_path / "ckpt" / "teacher.pt"),
            archive.download(src.as_uri(), tmp_path / "data" / "a.bin"),
        ]
        cached = load_or_build(tmp_path / "cache", "stem", {"k": 1}, lambda: _images())
        assert cached.path is not None
        written.append(cached.path)
        with atomic_file(tmp_path / "plain.txt") as f:
            f.write(b"x")
        written.append(tmp_path / "plain.txt")
    for path in written:
        assert mode(path) == expected, path
    assert not [p for p in tmp_path.rglob(".*")], "a temporary file was left behind"


def test_replacing_a_file_also_resets_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    path.write_text("old")
    path.chmod(0o600)
    with umask(0o022):
        write_text_atomic("new", path)
    assert path.read_text() == "new" and mode(path) == 0o644


def test_extracted_folder_gets_the_umask_mode(tmp_path: Path) -> None:
    zip_path = tmp_path / "a.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("d/x.txt", b"hello")
    with umask(0o002):
        out = archive.extract_zip(zip_path, tmp_path / "out")
    assert mode(out) == 0o775


def test_umask_is_read_without_changing_it(monkeypatch) -> None:
    with umask(0o027):
        assert current_umask() == 0o027
        # Without /proc (macOS), the fallback sets the mask and puts it back.
        real_open = open

        def no_proc(file, *args, **kwargs):  # noqa: ANN001
            if str(file).startswith("/proc/"):
                raise FileNotFoundError(file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", no_proc)
        assert checkpoint.current_umask() == 0o027
        monkeypatch.undo()
        assert current_umask() == 0o027


def test_a_failing_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "keep.txt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def _images() -> tuple[torch.Tensor, list[str]]:
    return torch.zeros(2, 3, 1, 4, 4, dtype=torch.uint8), ["a", "b"]
