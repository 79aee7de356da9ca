"""What SLURM's signals mean to a run, and a submitit launcher that never waits on a dead job.

Signals inside a job that Hydra's submitit launcher started (``hydra/launcher=slurm``):

- ``SIGUSR2`` (submitit asks SLURM for it ``signal_delay_s`` before the time limit; clusters with
  ``PreemptParameters=send_user_signal`` also send it at preemption): the training loop finishes
  its meta-iteration and saves a checkpoint, then submitit's own handler pickles the job again,
  runs ``scontrol requeue`` and exits. The requeued job reruns the same overrides in the same job
  folder, where the pipeline resumes from that checkpoint. A timeout counts against
  ``max_num_timeout``; a preemption is always requeued (submitit tells them apart by the time used).
- ``SIGTERM`` (``scancel``, or a preemption without the user signal): as outside SLURM, a checkpoint
  is saved and the job stops with status 143 and ``train.resume=<job folder>`` in its ``error.txt``.
  If SLURM itself requeues the job (``PreemptMode=REQUEUE``), the rerun resumes from it.

Outside a submitit job nothing here is active: Ctrl-C and SIGTERM behave as they always did.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[int, Any], Any]


def requeue_signal() -> signal.Signals:
    """The signal submitit turns into checkpoint-and-requeue (USR2 unless submitit is told otherwise)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


def requeue_handler() -> Handler | None:
    """submitit's checkpoint-and-requeue handler when this process is a submitit SLURM job, else None.

    Only then is the requeue signal deferred to the end of a meta-iteration: the loop first saves a
    checkpoint, then this handler requeues the job.
    """
    if "SLURM_JOB_ID" not in os.environ or "SUBMITIT_FOLDER" not in os.environ:
        return None
    handler = signal.getsignal(requeue_signal())
    return handler if callable(handler) else None


def hand_over(handler: Handler, signum: int, message: str) -> str:
    """Let submitit requeue the job (it exits the process); return why it did not, if it did not."""
    from submitit.core.utils import UncompletedJobError

    log.warning("%s; handing over to submitit to requeue the job", message)
    try:
        handler(signum, None)  # pickles the job again, runs `scontrol requeue`, exits
    except UncompletedJobError as err:  # e.g. timed out more than max_num_timeout times
        return str(err).rstrip(".")
    return "the job was not requeued"


# --- the launcher process: waiting for the jobs ----------------------------------------------------
def _controller_states(job_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """``scontrol show job`` as submitit's sacct reader would give it: ``{"<id>[_<task>]": {"State": …}}``.

    Clusters without accounting have no working ``sacct``; the controller still knows every job until
    ``MinJobAge`` after it ended (300 s by default), which is long enough for a launcher that polls.
    """
    states: dict[str, dict[str, str]] = {}
    for main_id in sorted(set(job_ids)):
        proc = subprocess.run(
            ["scontrol", "show", "job", "-o", main_id], capture_output=True, text=True, timeout=60
        )
        for line in proc.stdout.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobState" not in fields:
                continue
            info = {"State": fields["JobState"], "NodeList": fields.get("NodeList", "")}
            task = fields.get("ArrayTaskId", "")
            if task and task.isdigit():
                states[f"{fields.get('ArrayJobId', main_id)}_{task}"] = info
            states[fields["JobId"]] = info
    return states


def _watcher_class() -> type:
    from submitit.slurm.slurm import SlurmInfoWatcher

    class ControllerWatcher(SlurmInfoWatcher):
        """submitit's sacct watcher, falling back to the controller when sacct cannot answer.

        Without it submitit would see a job that died without a result as UNKNOWN and wait forever.
        """

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            try:
                output = subprocess.run(command, capture_output=True, timeout=60)
                ok = output.returncode == 0
            except OSError:
                ok = False
            if ok:
                self._info_dict.update(self.read_info(output.stdout))
            else:
                self._info_dict.update(_controller_states([c for c in command[1:] if c[0].isdigit()]))
            self._num_calls += 1
            import time

            self._last_status_check = time.time()
            for job_id in self._registered - self._finished:
                if self.is_done(job_id, mode="cache"):
                    self._finished.add(job_id)

    return ControllerWatcher


_JOB_CLASS: type | None = None


def job_class() -> type:
    """submitit's SlurmJob with the watcher above (polled at least every 15 s)."""
    global _JOB_CLASS
    if _JOB_CLASS is None:
        from submitit.slurm.slurm import SlurmJob

        _JOB_CLASS = type("SlurmJob", (SlurmJob,), {"watcher": _watcher_class()(delay_s=15)})
    return _JOB_CLASS


def last_error_line(text: str | None) -> str:
    """The last informative line of a job's stderr (the exception, "Killed", a segfault)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    noise = ("srun:", "slurmstepd:", "submitit WARNING", "submitit INFO", "submitit ERROR", "raise ")
    for line in reversed(lines):
        if not line.startswith(noise) and not line.startswith("File ") and not line.startswith("^"):
            return line
    return lines[-1] if lines else "nothing on stderr"


def base_queue_conf() -> type:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    return BaseQueueConf
