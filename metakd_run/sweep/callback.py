"""The sweep's Hydra callback, registered in ``configs/hydra/default.yaml``: it stamps the sweep
with an id when it starts and tabulates every job (and the study, with a ``study=`` preset) when it
ends; :data:`LAST_SWEEP` tells the console script whether jobs failed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from metakd_run.sweep.groups import collect
from metakd_run.sweep.jobs import start_sweep
from metakd_run.sweep.tables import write_study, write_summary

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    """What the last sweep of this process produced; the console script exits 1 if jobs failed."""

    jobs: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    summary: Path | None = None

    def failure_line(self) -> str:
        job, error = self.failed[0]
        more = f" (and {len(self.failed) - 1} more)" if len(self.failed) > 1 else ""
        return (
            f"{len(self.failed)} of {self.jobs} sweep jobs failed: job {job}: {error}{more}; "
            f"see {self.summary}"
        )


LAST_SWEEP = SweepOutcome()


class SweepSummary(Callback):
    """Registered in ``configs/hydra/default.yaml``; Hydra calls it in the process that launched
    the sweep, after every job has returned."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        command = {
            "overrides": list(OmegaConf.to_container(hydra.overrides.task, resolve=False)),
            "sweeper": OmegaConf.to_container(hydra.sweeper, resolve=False),
        }
        start_sweep(Path(str(hydra.sweep.dir)), command)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        rows = collect(sweep_dir)
        _, md_path = write_summary(sweep_dir, rows)
        failed = [(r.job, r.error or r.status) for r in rows if r.status != "ok"]
        LAST_SWEEP.jobs, LAST_SWEEP.failed, LAST_SWEEP.summary = len(rows), failed, md_path
        print(md_path.read_text())
        study = OmegaConf.select(config, "study", default=None)
        if study is not None and study.get("name"):
            study_md, png = write_study(sweep_dir, rows, study)
            print(study_md.read_text())
            log.info("study: %s%s", study_md, f", {png}" if png else "")
        log.info("sweep summary: %s (%d jobs, %d failed)", md_path, len(rows), len(failed))
