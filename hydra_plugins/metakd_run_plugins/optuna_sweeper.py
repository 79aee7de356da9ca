"""Hydra's Optuna sweeper with a study that outlives the process (``hparams_search=...`` presets).

With ``hydra.sweeper.storage=sqlite:///<file>`` (or any RDB URL the jobs can reach) and a fixed
``hydra.sweeper.study_name``, starting the same search again continues the stored study:

- ``n_trials`` counts the study's finished trials (complete, failed or pruned), so a search stopped
  after 3 of 20 trials runs the 17 left, and one that had finished runs none;
- new trials get new job folders (numbered after the study's trials), so a rerun in the same
  ``hydra.sweep.dir`` never reuses the folder, and with it the checkpoints, of an earlier trial.

A trial that was running when the search was killed stays RUNNING in the study and is not counted.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as _HydraOptunaSweeper

log = logging.getLogger(__name__)


def stored_trials(storage: Any, study_name: str | None) -> tuple[int, int]:
    """(finished trials, all trials) of the stored study; (0, 0) if it does not exist yet."""
    import optuna

    if not study_name or study_name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return 0, 0
    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    finished = (
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.PRUNED,
    )
    return sum(t.state in finished for t in trials), len(trials)


class OptunaSweeper(_HydraOptunaSweeper):
    """``hydra/sweeper=optuna`` whose ``n_trials`` is the study's total when the study is stored."""

    def sweep(self, arguments: list[str]) -> None:
        impl = self.sweeper
        if impl.storage:
            finished, started = stored_trials(impl.storage, impl.study_name)
            if started:
                log.info(
                    "study %s in %s: %d of %d trials finished, running %d more",
                    impl.study_name, impl.storage, finished, impl.n_trials, max(0, impl.n_trials - finished),
                )  # fmt: skip
            impl.n_trials = max(0, impl.n_trials - finished)
            impl.job_idx = started  # new trials, new folders
        return impl.sweep(arguments)
