"""The experiment, stage by stage: teacher -> distilled student -> baseline student -> each enabled
evaluation protocol (:mod:`metakd_run.evaluation.protocols`) -> :mod:`metakd_run.presentation`.

:meth:`Experiment.prepare` loads every split and builds every learner and the distiller before
any training, so a user's mistake fails in seconds; :meth:`Experiment.run` then reads like the
README. Each stage's result is a checkpoint in ``checkpoints/``: a finished stage is loaded, an
interrupted one continues from its last checkpoint, and either only when the fingerprint it
carries (:mod:`metakd_run.fingerprint`) matches the settings of this run: a folder holding another
setting's models is refused before any training, unless ``train.accept_mismatch=true`` says to
load them anyway (reported in the summary). A lock keeps two processes out of one run folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metakd_run import __version__, build, distributed, fingerprint
from metakd_run.checkpoint import CheckpointError, load_checkpoint, load_state, save_atomic, write_text_atomic
from metakd_run.config import Config, ConfigError, Family, Split, Stage, to_dict
from metakd_run.data import build_task_source
from metakd_run.distill.mkd import MetaDistillation
from metakd_run.evaluation import protocols
from metakd_run.evaluation.context import Context
from metakd_run.evaluation.curves import fixed_tasks
from metakd_run.evaluation.provenance import environment, key_hparams
from metakd_run.evaluation.summary import TRAINING_KEYS, objective_value
from metakd_run.meta.learner import MetaLearner
from metakd_run.presentation.files import write_run
from metakd_run.seeding import derive_seed
from metakd_run.tracking import Tracker
from metakd_run.training import Interrupted, StageSpec, StopFlag, final_path, run_stage

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per process
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


@dataclass
class Sources:
    train: Any
    val: Any
    test: Any


@dataclass
class Trainee:
    """What one stage trains: the learner it evaluates, the module it saves, its meta-step."""

    learner: MetaLearner
    module: nn.Module
    step: Any
    model_cfg: Any


class SettingsMismatch(CheckpointError):
    """The run folder (or a given teacher) holds models trained with other settings."""


LOCK_FILE = "run.lock"
CACHE_POLL_SECONDS = 2.0  # how often a job waiting for a cached teacher looks again
SAVED_HYDRA = "hydra"  # checkpoints/hydra/: the .hydra/ files of the run that trained the checkpoints
FINGERPRINT_FILE = "fingerprint.json"


def restore_hydra_files(run_dir: Path) -> None:
    """Put back the ``.hydra/`` files of the run that trained this folder's checkpoints.

    Hydra writes the new command's config into ``.hydra/`` before the pipeline can refuse it; a
    refused run must leave the folder describing its models, or ``train.resume`` would continue
    them with the refused settings."""
    saved = run_dir / "checkpoints" / SAVED_HYDRA
    if saved.is_dir():
        shutil.copytree(saved, run_dir / ".hydra", dirs_exist_ok=True)


def finished_summary(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """The summary of a run folder that already finished with exactly these settings, else None.

    A sweep run again into the same ``hydra.sweep.dir`` keeps such jobs instead of loading their
    models and meta-testing them again (:mod:`metakd_run.cli`)."""
    try:
        saved = json.loads((run_dir / FINGERPRINT_FILE).read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    settings = saved.get("settings")  # its settings decide, not its digest (older keys, a label, named it)
    if not isinstance(settings, dict) or fingerprint.differences(settings, fingerprint.run_settings(cfg)):
        return None
    return summary if isinstance(summary, dict) and "objective" in summary else None


def equivalent_in_cache(folder: Path, pattern: str, settings: dict[str, Any]) -> Path | None:
    """A file of the cache named by an older digest whose fingerprint holds these settings.

    A file is named by the digest of its stage's settings when it is written; a key that later
    stops counting (a label, an execution key) changes the digest but not the model, and such a
    file must still be found. Its fingerprint is what decides, not its name."""
    for candidate in sorted(folder.glob(pattern)) if folder.is_dir() else ():
        try:
            saved = load_checkpoint(candidate).get("fingerprint")
        except CheckpointError:
            continue  # a damaged file is nobody's model (the exact name still reports it)
        if isinstance(saved, dict) and not fingerprint.differences(saved.get("settings", {}), settings):
            return candidate
    return None


class Experiment:
    """One run: the typed config, the run folder, the device, the data and the learners."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from metakd_run.config import ConfigError

            raise ConfigError(
                f"device={cfg.device} is invalid: no CUDA device is visible; use device=cpu or auto"
            )
        # data-parallel (torchrun): join the group; every rank works in rank 0's run folder
        pretrains = Family.pretrain in {cfg.meta.family_of(role) for role in ("teacher", "student")}
        images = cfg.meta.pretrain.batch if pretrains else 0  # a pretrain mini-batch is split too
        self.dist = distributed.setup(self.device, cfg.meta.meta_batch, cfg.meta.task_shards, images)
        self.run_dir = self.dist.shared_dir(Path(run_dir))
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dtype = getattr(torch, str(cfg.dtype))
        self.src: Sources | None = None
        self.trainees: dict[str, Trainee] = {}
        self.older_cached: dict[str, Path | None] = {}  # stage -> its cache file under an older name
        self.teacher_origin = ""
        self.tracker: Tracker | None = None
        self.fingerprints: dict[str, dict[str, Any]] = {}  # stage -> the settings that shape it
        self.reuse: dict[str, str] = {}  # stage -> how this run obtained it (summary "stages")
        self.accepted: dict[str, list[str]] = {}  # stage -> differing keys accepted by the user
        self.prepared: dict[str, Any] = {}  # protocol -> what its check read before training
        self._lock: Any = None

    # --- before any training -------------------------------------------------------------------
    def prepare(self) -> None:
        """Load every split, build every learner and the distiller, check a given teacher checkpoint."""
        cfg, ds = self.cfg, self.cfg.dataset
        split = getattr(ds, "split_name", lambda role: str(role))
        self.lock()
        # each enabled protocol's check, before any data is loaded (eval.lake_runs: the runs are
        # readable and the heads as wide as they are)
        self.prepared = {p.name: p.check(cfg) for p in protocols.enabled(cfg)}
        val = build_task_source(ds, split(Split.val))
        self.src = Sources(
            train=build_task_source(ds, split(Split.train), transfer=cfg.kd.transfer),
            val=val,
            test=val if cfg.eval.split == Split.val else build_task_source(ds, split(cfg.eval.split)),
        )
        if cfg.eval.split == Split.val and self.dist.is_main and ds.name != "sinusoid":
            log.warning(
                "eval.split=val is also the validation split that picks the best checkpoints: "
                "its accuracies are slightly optimistic (different tasks, same classes)"
            )
        train = self.src.train
        teacher = build.meta_learner(cfg.teacher, "teacher", train, cfg.meta, self.seed("teacher_init"))
        self.trainees["teacher"] = Trainee(teacher, teacher, teacher.meta_backward, cfg.teacher)
        given_teacher = None
        if cfg.train.teacher_checkpoint:
            given = Path(cfg.train.teacher_checkpoint).expanduser()
            given_teacher = self.check_given_teacher(given)
            self.load_finished(given, teacher, self.teacher_what())
        elif (cached := self.cached(Stage.teacher)) is not None and cached.exists():
            pass  # loaded when the teacher's turn comes
        elif Stage.teacher not in cfg.train.stages and not final_path(self.ckpt_dir, "teacher").exists():
            raise CheckpointError(
                "train.stages leaves out 'teacher' but no train.teacher_checkpoint names one"
            )
        for name in (Stage.student_kd, Stage.student_base):
            if name in cfg.train.stages:
                self.trainees[name.value] = self.student(name, teacher)
        self.fingerprints = {
            name: fingerprint.stage_settings(cfg, name, given_teacher) for name in self.trainees
        }
        mismatched = [m for name in self.trainees for m in self.check_reusable(name)]
        if mismatched:  # every reusable checkpoint of this folder is checked before any training
            self.refuse_or_accept(mismatched)
        self.teacher_origin = self.teacher_source()
        # rank 0 alone logs
        self.tracker = Tracker(self.run_dir, enabled=self.dist.is_main, logger=cfg.logger)

    def student(self, name: str, teacher: MetaLearner) -> Trainee:
        """The same student init for both students; the distilled one also trains its projections."""
        cfg = self.cfg
        student = build.meta_learner(
            cfg.student, "student", self.src.train, cfg.meta, self.seed("student_init")
        )
        if name == Stage.student_base:
            return Trainee(student, student, student.meta_backward, cfg.student)
        torch.manual_seed(self.seed("projection_init"))
        distiller = build.distiller(cfg.kd, teacher, student, self.src.train.in_shape)
        mkd = MetaDistillation(teacher, student, distiller, cfg.kd.weight, cfg.kd.source, inner=cfg.kd.inner)
        module = nn.ModuleDict({"learner": student, "distiller": distiller})
        return Trainee(student, module, mkd.meta_backward, cfg.student)

    # --- the stages ----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.release()

    def release(self) -> None:
        """Let go of the run folder's lock (the process's end would too)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _run(self) -> dict[str, Any]:
        if self.src is None:
            self.prepare()
        hydra_dir = self.run_dir / ".hydra"
        if self.dist.is_main and hydra_dir.is_dir():  # see restore_hydra_files
            shutil.copytree(hydra_dir, self.ckpt_dir / SAVED_HYDRA, dirs_exist_ok=True)
        trained: dict[str, dict[str, Any]] = {}
        with StopFlag() as stop:
            for name, trainee in self.trainees.items():
                trained[name] = self.obtain(name, trainee, stop)
        if not self.dist.is_main:  # rank 0 alone runs the meta-test and writes the summary
            return {"objective": float("nan"), "rank": self.dist.rank}
        learners = {name: t.learner for name, t in self.trainees.items()}
        summary = self.evaluate(learners, trained)
        settings = fingerprint.run_settings(self.cfg)
        write_text_atomic(
            json.dumps(fingerprint.record(settings), indent=1, sort_keys=True, default=str) + "\n",
            self.run_dir / FINGERPRINT_FILE,
        )
        return summary

    def evaluate(
        self, learners: dict[str, MetaLearner], trained: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Each enabled protocol in turn, then the presentation; return the summary."""
        cfg = self.cfg
        context = Context(cfg, self.device, self.dtype, self.src.test, trained, self.prepared)
        summary: dict[str, Any] = {"experiment": cfg.name, "dataset": cfg.dataset.name}
        records: dict[str, dict[str, Any]] = {}
        for protocol in protocols.enabled(cfg):
            section = protocols.as_section(protocol.run(context, learners))
            if protocol.top_level:
                summary.update(section.summary)
            else:
                summary[protocol.name] = section.summary
            records[protocol.name] = section.records
        summary["hparams"] = key_hparams(cfg)
        summary["teacher_source"] = self.teacher_origin
        if self.accepted:
            summary["accepted_mismatch"] = self.accepted
        summary["environment"] = environment(self.device)
        summary["objective"] = objective_value(summary)
        # Wall times and resumption facts vary between identical runs: they stay out of summary.json.
        timings: dict[str, Any] = {
            name: {k: v for k, v in r.items() if k not in TRAINING_KEYS} for name, r in trained.items()
        }
        timings["meta_test_seconds"] = records.get("meta_test", {}).get("seconds", {})
        timings["obtained"] = dict(self.reuse)  # trained, resumed, or loaded (and from where)
        write_run(self.run_dir, self.tracker, cfg, summary, timings, records)
        return summary

    def teacher_source(self) -> str:
        """Where the teacher comes from, as the summary reports it (known before any training)."""
        if self.cfg.train.teacher_checkpoint:
            return f"train.teacher_checkpoint={self.cfg.train.teacher_checkpoint}"
        cached = self.cached(Stage.teacher)
        if cached is not None and cached.exists():
            return f"shared: {cached}"
        accepted = self.accepted.get(Stage.teacher)
        if accepted:
            path = final_path(self.ckpt_dir, Stage.teacher)
            return (
                f"checkpoint {path}, trained with other settings ({fingerprint.summarise(accepted)}), "
                "loaded because train.accept_mismatch=true"
            )
        return "trained in this run"

    def cached(self, name: str) -> Path | None:
        """``train.teacher_cache``: one file per stage settings and seed for the stages that do not
        depend on the distillation, the teacher and the undistilled student, so that the cells of a
        study (or a seed sweep) that share them train them once. The distilled student is never
        cached: it is what the cells vary."""
        cfg = self.cfg
        if not cfg.train.teacher_cache or name == Stage.student_kd:
            return None
        folder = Path(os.path.normpath(Path(cfg.train.teacher_cache).expanduser()))  # a study's <job>/..
        settings = fingerprint.stage_settings(cfg, name)
        path = folder / f"{name}-seed{cfg.seed}-{fingerprint.digest(settings)}.pt"
        if path.exists():
            return path
        if name == Stage.teacher:
            legacy = folder / f"teacher-seed{cfg.seed}-{fingerprint.cache_digest(cfg)}.pt"
            if legacy.exists():
                return legacy
        if name not in self.older_cached:  # the scan loads every file of the seed: once per stage
            self.older_cached[name] = equivalent_in_cache(folder, f"{name}-seed{cfg.seed}-*.pt", settings)
        return self.older_cached[name] or path

    # --- what may be reused ----------------------------------------------------------------------
    def lock(self) -> None:
        """Hold an exclusive lock on the run folder for this process's life.

        Two processes writing one folder would interleave checkpoints of different runs. The
        lock is ``flock`` on ``run.lock``: the kernel releases it when the process ends, however
        it ends, so a killed run never leaves a stale lock behind. Under torchrun rank 0 holds it.
        """
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.run_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until the process ends
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"{self.run_dir} is in use by {holder}: wait for it to finish, or give this run its "
                "own folder (hydra.run.dir=... or hydra.sweep.dir=...)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"metakd-run pid {os.getpid()}\n")
        handle.flush()
        self._lock = handle
        # Holding the lock, no other writer is here: an atomic writer's temporary file is what a
        # process killed mid-write (SIGKILL, a joblib abort) left behind; the target is intact.
        for folder in (self.run_dir, self.ckpt_dir):
            for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
                stale.unlink(missing_ok=True)

    def check_given_teacher(self, path: Path) -> dict[str, Any] | None:
        """``train.teacher_checkpoint`` must come from this data set, model and algorithm (its seed,
        budget and validation may differ: reusing a teacher is what the option is for).

        Returns the given teacher's settings, which the distilled student's fingerprint records."""
        saved = load_checkpoint(path).get("fingerprint")
        if not isinstance(saved, dict) or "settings" not in saved:
            return None  # written before fingerprints: only its shapes can be checked
        now = fingerprint.stage_settings(self.cfg, Stage.teacher)
        diffs = fingerprint.differences(saved["settings"], now, fingerprint.GIVEN_TEACHER_IGNORES)
        if diffs:
            self.refuse_or_accept([(Stage.teacher.value, path, diffs)], given=True)
        return dict(saved["settings"])

    def check_reusable(self, name: str) -> list[tuple[str, Path, list[str]]]:
        """A finished or partial checkpoint of ``name`` in this folder is reused only if it was
        trained with this run's settings: the checkpoints whose settings differ, with the keys."""
        if name == Stage.teacher and self.cfg.train.teacher_checkpoint:
            return []
        out = []
        for path in (final_path(self.ckpt_dir, name), self.ckpt_dir / f"{name}_last.pt"):
            if not path.exists():
                continue
            saved = load_checkpoint(path).get("fingerprint")
            if isinstance(saved, dict) and "settings" in saved:
                diffs = fingerprint.differences(saved["settings"], self.fingerprints[name])
            else:
                diffs = ["fingerprint: none (written by a metakd-run before 0.2, or not by it)"]
            if diffs:
                out.append((name, path, diffs))
        return out

    def refuse_or_accept(self, mismatched: list[tuple[str, Path, list[str]]], given: bool = False) -> None:
        """One line naming the differing keys and the two ways on; or, accepted, a record of them."""
        if self.cfg.train.accept_mismatch:
            for name, path, diffs in mismatched:
                self.accepted.setdefault(str(name), []).extend(diffs)
                log.warning("%s: loading %s although its settings differ: %s", name, path, "; ".join(diffs))
            return
        where = (
            "name a teacher trained on this data set, model and algorithm"
            if given
            else "give this run a new folder (hydra.run.dir=... or hydra.sweep.dir=...)"
        )
        held = "; ".join(f"{path} ({fingerprint.summarise(diffs, 3)})" for _, path, diffs in mismatched)
        raise SettingsMismatch(
            f"trained with other settings: {held}. Either {where}, or pass train.accept_mismatch=true "
            "to load them anyway (the summary reports it)"
        )

    def obtain(self, name: str, trainee: Trainee, stop: StopFlag) -> dict[str, Any]:
        """Load the stage's finished checkpoint if there is one, else train it and save it."""
        path = final_path(self.ckpt_dir, name)
        given = self.cfg.train.teacher_checkpoint if name == Stage.teacher else None
        cached = self.cached(name)
        if given:
            self.reuse[name] = f"loaded: train.teacher_checkpoint={given}"
            return self.load_finished(Path(given).expanduser(), trainee.module, self.teacher_what())
        if path.exists():
            self.reuse[name] = "loaded: finished earlier in this run folder"
            return self.load_finished(path, trainee.module, f"checkpoint {path}")
        if cached is None:
            return self.train(name, trainee, stop, cached)
        if cached.exists():
            return self.load_cached(name, trainee, cached)
        # Another job of this study may be training the same model (a parallel sweep's cells of
        # one seed): wait for it and load its file rather than train it twice.
        with self.cache_turn(name, cached, stop):
            if cached.exists():
                return self.load_cached(name, trainee, cached)
            return self.train(name, trainee, stop, cached)

    def load_cached(self, name: str, trainee: Trainee, cached: Path) -> dict[str, Any]:
        """The stage's model from ``train.teacher_cache``, copied into this run folder."""
        self.reuse[name] = f"loaded: train.teacher_cache file {cached}"
        result = self.load_finished(cached, trainee.module, f"train.teacher_cache file {cached}")
        if self.dist.is_main:  # the run folder stays complete (metakd_run.load reads it)
            state = load_checkpoint(cached)
            state.setdefault("fingerprint", fingerprint.record(self.fingerprints[name]))
            save_atomic(state, final_path(self.ckpt_dir, name))
        return result

    @contextlib.contextmanager
    def cache_turn(self, name: str, cached: Path, stop: StopFlag) -> Iterator[None]:
        """Hold ``<cache file>.lock`` while this job trains a cached model, so that a second job
        of the same seed waits for the file instead of training it too. ``flock``: the kernel lets
        go when the holder ends, however it ends. Waiting polls, so Ctrl-C still stops the job.
        Under torchrun every rank trains together and no lock is taken."""
        if self.dist.active:
            yield
            return
        cached.parent.mkdir(parents=True, exist_ok=True)
        with open(cached.parent / f"{cached.name}.lock", "a+") as handle:
            told = False
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if stop.signum is not None:
                        raise Interrupted(
                            f"stopped by signal {stop.signum} while waiting for {cached}", stop.signum
                        ) from None
                    if not told:
                        log.info("%s: another job is training %s; waiting for it", name, cached)
                        told = True
                    time.sleep(CACHE_POLL_SECONDS)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def train(self, name: str, trainee: Trainee, stop: StopFlag, cached: Path | None) -> dict[str, Any]:
        """Meta-train the stage (resuming its last checkpoint), save it, and fill the cache."""
        path = final_path(self.ckpt_dir, name)
        if name not in self.cfg.train.stages:
            raise CheckpointError(f"train.stages leaves out '{name}' but no checkpoint of it exists")
        resumed = (self.ckpt_dir / f"{name}_last.pt").exists()
        self.reuse[name] = "trained: resumed from its last checkpoint" if resumed else "trained"
        result = run_stage(self.stage_spec(name, trainee), self.tracker, stop)
        if self.dist.is_main:  # rank 0 alone writes checkpoints
            finished = {
                "stage": name,
                "state_dict": trainee.module.state_dict(),
                "model": to_dict(trainee.model_cfg),
                "meta": to_dict(self.cfg.meta),
                "dataset": self.cfg.dataset.name,
                "result": result,
                "metakd_run": __version__,
                "fingerprint": fingerprint.record(self.fingerprints[name]),
            }
            save_atomic(finished, path)
            if cached is not None:
                save_atomic(finished, cached)
            (self.ckpt_dir / f"{name}_last.pt").unlink(missing_ok=True)
        return result

    def stage_spec(self, name: str, trainee: Trainee) -> StageSpec:
        cfg, src = self.cfg, self.src
        task_seed = self.seed("teacher_tasks" if name == Stage.teacher else "student_tasks")
        transfer = cfg.kd.transfer if name == Stage.student_kd else 0
        sharded = distributed.task_sampler(
            self.dist, src.train, cfg.meta.meta_batch, transfer, task_seed, cfg.meta.task_shards
        )

        own = getattr(trainee.learner, "batches", None)  # the pretrain family draws mini-batches

        def sample(iteration: int, generator: torch.Generator) -> Any:
            if own is not None:  # under torchrun, this process's share of the mini-batch
                return distributed.minibatch_share(self.dist, own(src.train, generator))
            if sharded is not None:  # data-parallel: this process's shard of the iteration
                return sharded(iteration)
            return src.train.sample(cfg.meta.meta_batch, generator, transfer)

        step = trainee.step
        if own is not None and not self.dist.active and cfg.meta.task_shards > 1:
            step = distributed.sharded_minibatch_step(step, cfg.meta.task_shards, trainee.module)
        return StageSpec(
            name=name,
            module=trainee.module.to(self.device, self.dtype),
            learner=trainee.learner,
            step=self.dist.wrap_step(step),
            sample_tasks=sample,
            val_tasks=fixed_tasks(
                src.val, cfg.train.val_tasks, derive_seed(cfg.eval.seed, "val"), cfg.eval.batch
            ),
            meta=cfg.meta,
            train=cfg.train,
            task_seed=task_seed,
            checkpoint_dir=self.ckpt_dir,
            device=self.device,
            dtype=self.dtype,
            on_gradients=self.dist.all_reduce_gradients if self.dist.active else None,
            is_main=self.dist.is_main,
            fingerprint=fingerprint.record(self.fingerprints[name]),
        )

    # --- helpers -------------------------------------------------------------------------------
    def seed(self, purpose: str) -> int:
        return derive_seed(self.cfg.seed, purpose)

    def teacher_what(self) -> str:
        return f"train.teacher_checkpoint={self.cfg.train.teacher_checkpoint}"

    def load_finished(self, path: Path, module: nn.Module, what: str) -> dict[str, Any]:
        state = load_checkpoint(path)
        if "state_dict" not in state:
            raise CheckpointError(f"{path} is not a finished-stage checkpoint of metakd-run")
        load_state(module, state["state_dict"], what)
        module.to(self.device, self.dtype)
        return state.get("result", {})
