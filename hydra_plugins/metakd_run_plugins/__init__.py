"""metakd-run's Hydra plugins: the SLURM launcher (launcher.py) and the resumable Optuna sweeper
(optuna_sweeper.py). Hydra instantiates plugins only from the ``hydra_plugins`` package."""
