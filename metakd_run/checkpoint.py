"""The one atomic writer, and checkpoints written with it and loaded with checks.

Every file the package writes (checkpoints, summary.json, the data cache, downloads) goes
through :func:`atomic_file`: a temporary file beside the target, flushed and fsynced, then
renamed over it. A reader therefore sees either the previous complete file or the new complete
file, never a half-written one, whatever kills the process. The file gets the mode an ordinary
``open()`` would give it (``0o666`` less the umask), so colleagues who may read the run folder
or a shared data cache can read these files too. Loading refuses truncated files and
checkpoints whose parameter shapes do not fit the model the config builds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or used: reported as one line."""


def current_umask() -> int:
    """This process's umask, read without changing it.

    Linux reports it in ``/proc/self/status``; elsewhere the only way is to set it and put it
    back, which another thread creating a file at that instant could observe.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: str | Path, *, suffix: str = ".tmp") -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces ``path`` only if the ``with`` block completes.

    The bytes go to a temporary file in the same folder (so the rename is atomic), which is
    flushed, fsynced and given the umask's mode (``mkstemp`` creates it 0600, and a rename
    keeps the mode) before it is renamed over ``path``. If the block raises, or writing fails,
    the temporary file is removed and the error propagates; ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` is never seen half-written."""
    return _write_checkpoint(path, lambda f: torch.save(obj, f))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file (summary.json, tables) so that readers never see half of it."""
    return write_bytes_atomic(text.encode(), path)


def write_bytes_atomic(data: bytes | memoryview, path: str | Path) -> Path:
    """Write ``data`` atomically; a failure (full disk...) is a one-line CheckpointError."""
    return _write_checkpoint(path, lambda f: f.write(data))


def _write_checkpoint(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    path = Path(path)
    try:
        with atomic_file(path) as f:
            write(f)
    except OSError as err:
        raise CheckpointError(
            f"could not write {path}: {err.strerror or err}; free space or point "
            "hydra.run.dir elsewhere, then resume"
        ) from err
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`; corrupt files raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged files
        raise CheckpointError(
            f"checkpoint {path} is damaged or truncated ({type(err).__name__}); delete it and rerun the stage"
        ) from err


def load_state(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that names the mismatch instead of loading a wrong shape silently."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = (
            f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, the config builds "
            f"{tuple(own[wrong[0]].shape)}"
            if wrong
            else f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
        )
        raise CheckpointError(
            f"{what} does not fit the configured model ({detail}): use the config it was trained with"
        )
    module.load_state_dict(state)
