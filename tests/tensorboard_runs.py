"""Reading a run folder's TensorBoard logs back in tests, under the tags the pipeline logs.

The backend writes one TensorBoard run per model (``tb/teacher``, ``tb/student_kd``,
``tb/student_base``) plus ``tb/run`` for what belongs to no one model; ``teacher/train/loss`` is the tag
``train/loss`` of ``tb/teacher``. This reader joins them again, so a test names a scalar as the
pipeline logged it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metakd_run.tracking import MODEL_RUNS, SHARED_RUN, TB_DIR


class TensorBoardRuns:
    """Every TensorBoard run of one run folder, read in full (no reservoir sampling)."""

    def __init__(self, run_dir: str | Path) -> None:
        root = Path(run_dir) / TB_DIR
        sizes = {"scalars": 0, "images": 0, "tensors": 0}
        self.runs = {
            p.name: EventAccumulator(str(p), size_guidance=sizes).Reload() for p in sorted(root.iterdir())
        }

    def _full(self, run: str, tag: str) -> str:
        return tag if run == SHARED_RUN else f"{run}/{tag}"

    def tags(self, kind: str = "scalars") -> set[str]:
        """``kind`` (scalars, images, tensors) tags, a model's prefixed with its name."""
        return {self._full(run, t) for run, ea in self.runs.items() for t in ea.Tags()[kind]}

    def scalars(self, tag: str) -> list[Any]:
        """The events of ``teacher/train/loss`` (a model's tag) or ``lake_published_error/x`` (shared)."""
        head, _, rest = tag.partition("/")
        if head in MODEL_RUNS and head in self.runs:
            return self.runs[head].Scalars(rest)
        return self.runs[SHARED_RUN].Scalars(tag)
