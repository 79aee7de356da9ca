"""metakd-run's SLURM launcher (``hydra/launcher=slurm``): Hydra's submitit launcher that never waits
on a dead job. It lives here because Hydra only instantiates plugins from the ``hydra_plugins``
package; the machinery it uses is in ``metakd_run/slurm.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _HydraSlurmLauncher
from omegaconf import open_dict

from metakd_run.slurm import base_queue_conf, job_class, last_error_line

log = logging.getLogger(__name__)


class SlurmLauncher(_HydraSlurmLauncher):
    """Hydra's submitit SLURM launcher, with two changes: a job that dies on its node without a result
    (a crash, a kill, out of memory, a cancellation) becomes a failed cell of the sweep with one line
    naming the SLURM job, the error and the log file, instead of a traceback that ends the sweep; and
    the jobs are watched through ``scontrol`` where ``sacct`` does not work, so nothing waits forever.
    """

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from omegaconf import OmegaConf

        assert self.config is not None and len(job_overrides) > 0
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=params.pop("submitit_folder"),
            slurm_max_num_timeout=params.pop("max_num_timeout"),
        )
        base = set(OmegaConf.structured(base_queue_conf()).keys())
        executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)
        job_params = []
        for n, overrides in enumerate(job_overrides):
            idx = initial_job_idx + n
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            job_params.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        watched = job_class()  # submitit's SlurmJob with a watcher that falls back to scontrol
        jobs = [
            watched(folder=executor.folder, job_id=j.job_id, tasks=(0,))
            for j in executor.map_array(self, *zip(*job_params))
        ]
        return [
            self._collect(job, list(overrides), initial_job_idx + n)
            for n, (job, overrides) in enumerate(zip(jobs, job_overrides))
        ]

    def _job_dir(self, overrides: list[str], idx: int) -> Path:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = idx
        return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)

    def _collect(self, job: Any, overrides: list[str], idx: int) -> JobReturn:
        """The job's JobReturn; a job that left no result is recorded in its folder's error.txt."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            ret = job.results()[0]
            failed_here = None
        except (UncompletedJobError, FailedJobError) as err:
            ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)
            failed_here = err
        job_dir = self._job_dir(overrides, idx)
        error_file = job_dir / "error.txt"
        where = f"SLURM job {job.job_id}, log {job.paths.stderr}"
        if failed_here is not None and not error_file.is_file():
            job_dir.mkdir(parents=True, exist_ok=True)
            state = job.watcher.get_state(job.job_id, mode="cache")
            crashed = isinstance(failed_here, UncompletedJobError)  # else: a traceback in the result
            cause = last_error_line(job.stderr() if crashed else str(failed_here))
            error_file.write_text(f"ended without a result (state {state}): {cause} ({where})\n")
        elif error_file.is_file() and where not in error_file.read_text():
            error_file.write_text(f"{error_file.read_text().strip()} ({where})\n")
        if failed_here is not None:
            log.error("job %d: %s", idx, error_file.read_text().strip())
        return ret
