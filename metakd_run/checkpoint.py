"""Atomic checkpoints: a temporary file, flushed and fsynced, then renamed over the old one.

A reader therefore sees either the previous complete file or the new complete file, never a
half-written one, whatever kills the process. Loading refuses truncated files and checkpoints
whose parameter shapes do not fit the model the config builds.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted or used: reported as one line."""


def save_atomic(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` so that ``path`` is never seen half-written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(buf.getbuffer(), path)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file (summary.json, tables) so that readers never see half of it."""
    return write_bytes_atomic(text.encode(), path)


def write_bytes_atomic(data: bytes | memoryview, path: str | Path) -> Path:
    """Temp file in the same folder, flush, fsync, rename; on failure nothing is left behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write {path}: {err.strerror or err}; free space or point "
            "hydra.run.dir elsewhere, then resume"
        ) from err
    return path


def load(path: str | Path) -> dict[str, Any]:
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
