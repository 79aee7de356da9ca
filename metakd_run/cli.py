"""The ``metakd-run`` console script: compose and validate the config, run the pipeline.

It returns the validation metric so that Hydra's sweepers (Optuna) can optimise it. A user's
mistake ends in one line on stderr and exit status 2, before any training and with nothing
half-written left behind; a traceback means a bug of ours.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from metakd_run import malloc

malloc.tune()  # before torch and its threads allocate: see metakd_run/malloc.py

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from metakd_run.checkpoint import CheckpointError  # noqa: E402
from metakd_run.config import ConfigError, register_configs, to_typed  # noqa: E402
from metakd_run.training import Interrupted, TrainingDiverged  # noqa: E402

register_configs()


def _config_dir() -> str:
    """``configs/`` of a source checkout, else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "configs"
    if (checkout / "config.yaml").is_file() and (here.parent / "pyproject.toml").is_file():
        return str(checkout)
    return "pkg://metakd_run.configs"


def _user_errors() -> tuple[type[Exception], ...]:
    from metakd_run.data.errors import DataError

    return (ConfigError, CheckpointError, DataError)


class UserError(Exception):
    """Raised to the console entry point with the one line to print and the exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@hydra.main(version_base="1.3", config_path=_config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = str(hc.mode) == "RunMode.MULTIRUN"
    if multirun:  # [sweep] a requeued SLURM job runs again in its folder: drop the last stop's error
        (run_dir / "error.txt").unlink(missing_ok=True)
        from metakd_run.sweep import stamp_job

        stamp_job(Path(str(hc.sweep.dir)), run_dir)
    try:
        return run(cfg, run_dir, keep_finished=multirun)
    except Exception as err:
        signalled = isinstance(err, UserError) and err.status >= 128
        if multirun and not signalled:  # [sweep] one failed cell must not end the sweep
            return _failed_job(run_dir, err)
        if not isinstance(err, UserError):
            raise
        if multirun:  # a signal stops the whole sweep (SystemExit passes through the launcher)
            _write_error(run_dir, str(err))
        # SystemExit passes through Hydra's job wrapper without its "Error executing job" log.
        print(f"metakd-run: error: {err}", file=sys.stderr)
        sys.exit(err.status)


def _failed_job(run_dir: Path, err: Exception) -> None:
    """[sweep] Record a failed sweep job in error.txt and return None, so the launcher and the
    sweeper go on (Optuna marks the trial FAIL) and the sweep summary lists the error."""
    import logging

    message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
    if not isinstance(err, UserError):  # a bug of ours: keep its traceback in the job's log
        logging.getLogger(__name__).exception("job failed")
    _write_error(run_dir, message)
    print(f"metakd-run: job {run_dir.name} failed: {message}", file=sys.stderr)
    return None


def run(cfg: DictConfig, run_dir: Path, keep_finished: bool = False) -> float:
    """Type and check the config, build everything, then run; turn user-facing failures into ``UserError``.

    ``keep_finished`` (a sweep job): a folder that already holds this job's finished result, with
    the same settings, is kept as it is, so that a sweep run again into its folder continues."""
    fresh_dir = run_dir
    _RUNNING["dir"] = run_dir  # named by a Ctrl-C that lands outside the training loop
    try:
        if cfg.train.resume:
            cfg, run_dir = resume_config(cfg)
            _RUNNING["dir"] = run_dir
        typed = to_typed(cfg)
        if typed.threads > 0:
            import torch

            torch.set_num_threads(typed.threads)
        from metakd_run.pipeline import Experiment, finished_summary
        from metakd_run.presentation.table import print_summary

        done = finished_summary(run_dir, typed) if keep_finished else None
        if done is not None:
            print(f"metakd-run: {run_dir} finished earlier with these settings: kept", file=sys.stderr)
            return float(done["objective"])

        experiment = Experiment(typed, run_dir)
        experiment.prepare()  # data, learners, distiller: every mistake before the first iteration
        summary = experiment.run()
        if fresh_dir != run_dir:
            _discard(fresh_dir)
            # a resumed sweep job: the stop's error.txt would keep it "failed" in the sweep summary
            (run_dir / "error.txt").unlink(missing_ok=True)
        if "models" not in summary:  # [distributed] a rank other than 0: rank 0 reports
            return float("nan")
        print_summary(summary, run_dir)
        return float(summary["objective"])
    except _user_errors() as err:
        from metakd_run.pipeline import SettingsMismatch, restore_hydra_files

        if isinstance(err, SettingsMismatch):
            restore_hydra_files(run_dir)
        _discard(fresh_dir)  # only if it holds nothing but bookkeeping: trained stages stay
        raise UserError(str(err)) from err
    except TrainingDiverged as err:
        raise UserError(str(err), status=1) from err
    except OSError as err:  # a full disk under a writer we do not own (TensorBoard's event thread)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _discard(fresh_dir)  # only if it holds nothing but bookkeeping
        raise UserError(
            f"could not write {err.filename or run_dir}: {err.strerror}; free space or point "
            f"hydra.run.dir elsewhere, then resume with: metakd-run train.resume={run_dir}"
        ) from err
    except Interrupted as err:
        raise UserError(
            f"{err}. Resume with: metakd-run train.resume={run_dir}", status=128 + err.signum
        ) from err


_RUNNING: dict[str, Path] = {}  # the run folder of this process's run, once main() has one

# Overrides that a resumed run honours: they change how it runs, not what it computes.
RESUME_HONOURS = ("train.resume", "train.progress", "train.accept_mismatch", "threads", "device")


def resume_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The saved config of the run named by ``train.resume``, so a resumed run is the same run.

    An override that would change what the run computes cannot apply to a run half done: each
    such override is refused by name (start a new run, or use train.teacher_checkpoint instead).
    """
    folder = str(cfg.train.resume)
    run_dir = Path(folder).expanduser()
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(
            f"train.resume={folder} holds no metakd-run run (no .hydra/config.yaml there): name a "
            "run folder such as outputs/<date>/<time>"
        )
    saved = OmegaConf.load(saved_file)
    assert isinstance(saved, DictConfig)
    ignored = []
    for override in _task_overrides():
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or key in RESUME_HONOURS:
            continue
        now = OmegaConf.select(cfg, key, default=None)
        before = OmegaConf.select(saved, key, default=None)
        if now != before:
            shown = OmegaConf.to_container(before) if OmegaConf.is_config(before) else before
            ignored.append(f"{override} (the run has {key}={shown})")
    if ignored:
        raise ConfigError(
            f"train.resume={folder} continues the saved run, so these overrides cannot apply: "
            + "; ".join(ignored)
            + ". Drop them, or start a new run (train.teacher_checkpoint reuses a trained teacher)"
        )
    for key in RESUME_HONOURS[1:]:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    saved.train.resume = None
    return saved, run_dir


def _task_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _discard(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's bookkeeping (and our logs)."""
    if HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN":
        return  # [sweep] a sweep job keeps its folder: the summary reads its overrides and error
    keep = {".hydra", "main.log", "cli.log", "run.lock", ".sweep_id"}
    if run_dir.is_dir() and all(p.name in keep or p.name.startswith("events.out") for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _write_error(run_dir: Path, message: str) -> None:
    if run_dir.is_dir() or run_dir.parent.is_dir():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "error.txt").write_text(message + "\n")


def _compact(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages as one line that still names the key."""
    skip = ("full_key", "object_type", "reference_type", "Set the environment variable")
    parts: list[str] = []
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for line in str(e).splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line.endswith("_schema"):  # our structured-config schemas are not options to pick
                continue
            if line and not line.startswith(skip) and line not in parts:
                parts.append(line)
        e = e.__cause__
    return " ".join(p if p.endswith((".", ":")) else p + ";" for p in parts).rstrip(";")


def register_plugins() -> None:
    """Register our launcher and sweeper with Hydra by hand.

    Hydra finds plugins by listing the ``hydra_plugins`` namespace package with ``pkgutil``, which
    does not see a package served by an editable install's import hook (``pip install -e .``):
    Hydra then says "Unknown plugin class". Registering the classes works for every kind of
    install. A plugin whose optional dependencies (submitit, optuna) are missing is left out, and
    Hydra names it if a config asks for it.
    """
    import importlib

    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()
    for module, name in (("launcher", "SlurmLauncher"), ("optuna_sweeper", "OptunaSweeper")):
        try:
            cls = getattr(importlib.import_module(f"hydra_plugins.metakd_run_plugins.{module}"), name)
        except ImportError:
            continue
        if f"{cls.__module__}.{cls.__name__}" not in plugins.class_name_to_class:
            plugins.register(cls)


def version_text() -> str:
    """``metakd-run --version``: our version, then the torch and Hydra this process imported, since a
    result depends on all three (summary.json records them too)."""
    import torch

    from metakd_run import __version__

    return f"metakd-run {__version__}\ntorch {torch.__version__}\nHydra {hydra.__version__}"


def _thread_excepthook(args: Any) -> None:
    """A full disk in a writer's thread (TensorBoard's event writer) stays quiet there: the writer
    raises it again in the main thread at its next write or close, where ``run`` makes it one line."""
    if isinstance(args.exc_value, OSError) and args.exc_value.errno in (errno.ENOSPC, errno.EDQUOT):
        return
    threading.__excepthook__(args)


def entry() -> Any:
    """Console script: Hydra's errors are re-raised to us (HYDRA_FULL_ERROR) and shown as one line."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    threading.excepthook = _thread_excepthook
    if "--version" in sys.argv[1:]:  # ours, not Hydra's (which would name only itself)
        print(version_text())
        sys.exit(0)
    register_plugins()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from metakd_run import sweep
    from metakd_run.distributed import is_secondary_rank

    if is_secondary_rank():  # [distributed] torchrun's other ranks neither log nor write .hydra/
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    try:
        result = main()
        if sweep.LAST_SWEEP.failed:  # [sweep] every job ran; say which failed, exit status 1
            print(f"metakd-run: error: {sweep.LAST_SWEEP.failure_line()}", file=sys.stderr)
            sys.exit(1)
        return result
    except UserError as err:
        print(f"metakd-run: error: {err}", file=sys.stderr)
        sys.exit(err.status)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"metakd-run: error: {_compact(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # Ctrl-C outside a stage's loop (start-up, meta-test), or in a sweep's parent process while
        # its workers save their checkpoints: one line and 130, as inside the loop, not a traceback.
        print(f"metakd-run: error: interrupted (SIGINT). {_resume_hint()}", file=sys.stderr)
        sys.exit(130)


def _resume_hint() -> str:
    """How to carry on after a Ctrl-C that reached us outside the training loop."""
    if any(a.startswith("hydra/launcher=slurm") for a in sys.argv[1:]):  # the jobs are SLURM's
        return (
            "Only the wait stopped: the SLURM jobs run on and write into the sweep folder "
            "(squeue shows them, scancel stops them, each then resumes with train.resume=<its folder>)"
        )
    if {"-m", "--multirun"} & set(sys.argv[1:]):  # the sweep's parent: each job printed its own line
        return "Resume each interrupted job with: metakd-run train.resume=<sweep folder>/<job>"
    if "dir" in _RUNNING:
        return f"Resume with: metakd-run train.resume={_RUNNING['dir']}"
    return "Nothing was trained yet"


if __name__ == "__main__":
    entry()
