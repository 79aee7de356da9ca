"""Independent, reproducible seeds per purpose, so adding a stage or a shard never shifts another's
random stream."""

from __future__ import annotations

import zlib


def derive_seed(seed: int, *purpose: object) -> int:
    """A seed for ``purpose`` (e.g. ``"teacher_tasks"``, or an iteration and a shard) under ``seed``."""
    name = "/".join(str(p) for p in purpose)
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
