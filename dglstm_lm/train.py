"""`make train` / `make sweep`: compose the config with Hydra, train, test, write the run's files.

    python -m dglstm_lm.train model=dglstm experiment=zaremba_small seed=7
    python -m dglstm_lm.train --multirun model=lstm,stacked_lstm,dglstm seed=1,2,3

Every run writes into its own directory, laid out in dglstm_lm/rundir.py (which also writes and reads each
file); what a resumed run may change is dglstm_lm/resume.py's table. A run holds its directory's lock file
from before the first file is written until it ends: a second run into the same directory is refused and
writes nothing there.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from . import checkpoint as ckpt
from . import resume as policy
from . import rundir
from .config import compose, resolved_container, validate
from .errors import (
    CheckpointError,
    ConfigError,
    RunDirRefused,
    UserError,
    find_write_error,
    output_error,
    report_and_exit,
    write_error_reason,
)

log = logging.getLogger("dglstm_lm.train")


class DivergedError(UserError):
    exit_code = 3


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def check_same_run(run_dir: Path, config_dict: dict) -> None:
    """A directory that holds a run (a stored config beside a checkpoint or a record) may only be
    continued on its own by the same job (a requeued job, a re-run sweep): else RunDirRefused, naming the keys."""
    stored = rundir.read_config(run_dir)
    if stored is not None and (rundir.has_checkpoint(run_dir) or rundir.read_metrics(run_dir)):
        policy.check_job_folder(run_dir, stored, config_dict)


def code_version() -> str:
    """The commit of this checkout (+dirty with local changes), else the package version."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            rev = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if rev.returncode == 0:
                return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dglstm-lm")
    except PackageNotFoundError:
        return "unknown"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name}: CUDA is not available on this machine (use auto or cpu)")
    return torch.device(name)


def check_before_run(obj) -> None:
    """What would fail a run before its first step, checked before Hydra makes its folder (a run refused
    here leaves no `failed` folder behind to appear in every report): the output folder, the device, the
    data folder."""
    from .data import check_source

    rundir.check_folder(obj.paths.output_dir, "paths.output_dir")
    resolve_device(obj.trainer.device)
    check_source(obj.data.dir)


def default_threads() -> int | None:
    """Threads for one job when trainer.threads is null: the CPUs SLURM gave the job (or this machine's
    cores), divided among the parallel jobs of a joblib sweep; otherwise torch's default."""
    parallel = max(1, int(os.environ.get("DGLSTM_PARALLEL_JOBS", "1") or 1))
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]) // parallel)
    if parallel > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // parallel)
    return None


def _file_log_handler(run_dir: Path) -> logging.Handler | None:
    """Hydra logs to <run dir>/train.log; outside Hydra (tests calling train()) add that handler ourselves."""
    target = (run_dir / rundir.LOG).resolve()
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target:
            return None
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    return handler


# ----------------------------------------------------------------------------------------------------------
# One run: train() and its steps


def train(
    cfg: DictConfig,
    run_dir: str | Path,
    run_name: str | None = None,
    group: str | None = None,
    overrides: list[str] | None = None,
    on_epoch=None,
) -> dict:
    """Train and test one model in `run_dir`; return the final metrics (also the run's record).

    `on_epoch(record)`, if given, is called after each epoch's record is written; raising trainer.Pruned
    there ends the run as `pruned` (a tuning trial stopped by its pruner): no test, the record is final.

    `overrides` (the command line's, under Hydra) are recorded in the run directory once the run is
    under way: what `trainer.resume=<run_dir>` composes the run from again.

    Raises ConfigError/DataError/CheckpointError for user mistakes, DivergedError when the loss stops being
    finite, trainer.Interrupted after SIGINT/SIGTERM/SIGUSR2 (a checkpoint is saved first).
    """
    from . import data, models, tracking, trainer  # noqa: F401  (an import that fails does so before the claim)

    obj = validate(cfg)
    run_dir = Path(run_dir)
    config_dict = resolved_container(cfg)
    config_dict.pop("hydra", None)
    if (
        not obj.data.verify_checksums
    ):  # the record never claims sums that were not checked (PTB's, by default)
        config_dict["data"]["sha256"] = None
    with _claim(run_dir, obj, config_dict):
        run = _Run(cfg, obj, run_dir, config_dict)
        run.on_epoch = on_epoch
        try:
            point = _resume_point(obj, run_dir, config_dict)
            if point.completed is not None:
                return point.completed
            run.build(point, run_name or obj.model.name, group)
            if overrides is not None:  # every check has passed: these are the overrides the run trains with
                rundir.write_overrides(run_dir, overrides)
            run.start(point)
            if run.fit() == rundir.PRUNED:
                return run.metrics(rundir.PRUNED)
            return run.finish()
        except BaseException as exc:
            replacement = run.failed(exc)
            if replacement is not exc:
                raise replacement from None
            raise


@contextlib.contextmanager
def _claim(run_dir: Path, obj, config_dict: dict):
    """Hold the run directory (its lock and train.log) for the run. Whose directory is it? Asked before
    anything is written there, the lock included: a run refused here (another live run holds it, or it holds
    a run of another config) changes nothing in it."""
    rundir.check_free(run_dir)
    if not obj.trainer.resume and obj.trainer.auto_resume:
        check_same_run(run_dir, config_dict)
    locked_here = not rundir.holds(run_dir)
    handler = None
    try:
        try:
            rundir.acquire(run_dir, log_takeover=False)
            handler = _file_log_handler(run_dir)
        except OSError as exc:
            raise output_error(exc, run_dir) from None
        note = rundir.take_note(run_dir)
        if note:
            log.warning("%s", note)
        yield
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if locked_here:
            rundir.release(run_dir)


@dataclass
class _ResumePoint:
    path: Path | None = None  # the checkpoint resumed from
    state: dict | None = None  # its content
    completed: dict | None = None  # the metrics of a job folder that is already done: nothing to train


def _resume_point(obj, run_dir: Path, config_dict: dict) -> _ResumePoint:
    """Where the run starts: a checkpoint to resume (explicit, or this directory's own when it holds an
    unfinished run: a requeued job, a re-run sweep), nothing (a new run), or a finished job. The resume
    policy (resume.py) is applied here, before anything is built or written."""
    t = obj.trainer
    point = _ResumePoint()
    if t.resume:
        point.path, point.state = ckpt.load_for_resume(t.resume)
    elif t.auto_resume:
        previous = rundir.read_metrics(run_dir)
        stored = rundir.read_config(run_dir)
        # continuing on its own is only right for the same computation (asked again under the lock)
        check_same_run(run_dir, config_dict)
        if previous is not None and previous.get("status") == rundir.PRUNED:
            log.info("%s was pruned (a tuning trial stopped early); nothing to do", run_dir)
            point.completed = previous
            return point
        done = previous is not None and previous.get("status") == rundir.COMPLETED
        if done and (stored is None or stored.get("trainer", {}).get("max_epochs") == t.max_epochs):
            log.info(
                "%s already completed (test ppl %.2f); nothing to do",
                run_dir,
                previous.get("test/ppl") or float("nan"),
            )
            point.completed = previous
            return point
        if rundir.has_checkpoint(run_dir):  # unfinished, or finished with fewer epochs than now asked for
            point.path, point.state = ckpt.load_for_resume(rundir.last_checkpoint(run_dir))
    if point.state is not None:
        s = point.state
        ckpt.check_keys(s, ckpt.RESUME_KEYS, point.path)
        warned = policy.check_resume(s["config"], config_dict, point.path, s["epoch"], s.get("batch", 0))
        if warned:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(warned))
    return point


def model_shapes(m, vocab_size: int) -> str:
    """The model's shapes in words, for the run's first log line: e.g. `emb 200, hidden 650 × 2, vocab
    10,000, untied` (a hidden_dim that left the embedding at its own width shows here)."""
    dims = m.layer_dims
    hidden = f"{dims[0]} × {len(dims)}" if len(set(dims)) == 1 else " / ".join(map(str, dims))
    return f"emb {m.emb_dim}, hidden {hidden}, vocab {vocab_size:,}, {'tied' if m.tie_weights else 'untied'}"


class _Run:
    """The objects of one run between its steps (build → start → fit → finish), and its record (rundir.METRICS)."""

    def __init__(self, cfg: DictConfig, obj, run_dir: Path, config_dict: dict):
        self.cfg, self.obj, self.run_dir, self.config_dict = cfg, obj, run_dir, config_dict
        self.on_epoch = None  # called with each epoch's record (a tuning trial's pruner)
        self.tracker = self.trainer = None

    def build(self, point: _ResumePoint, name: str, group: str | None) -> None:
        """Seed, device, threads, corpus, model (initialised from another run's weights if asked), the
        tracker and the trainer, in the order that makes a run reproducible from its seed."""
        from .data import prepare_from_config
        from .models import build_model, check_backend, count_parameters
        from .tracking import make_tracker
        from .trainer import Trainer, seed_everything

        obj, t = self.obj, self.obj.trainer
        seed_everything(obj.seed)
        self.device = resolve_device(t.device)
        threads = t.threads or default_threads()
        if threads:
            torch.set_num_threads(threads)
        corpus = prepare_from_config(obj.data)
        if point.state is not None and list(point.state.get("vocab") or []) != list(corpus.vocab.words):
            raise CheckpointError(
                f"cannot resume {point.path}: the corpus at {corpus.source} has another vocabulary than "
                "the one the checkpoint was trained on"
            )
        self.data_identity = corpus.identity()  # in the run record and W&B: what the run trained on
        check_backend(obj.model, self.device)
        model = build_model(len(corpus.vocab), obj.model).to(self.device)
        self.num_params = count_parameters(model)
        n = (
            torch.get_num_threads()
        )  # said now, before the tracker's start (W&B takes seconds on a busy machine)
        log.info(
            "%s (%s): %s parameters (%s), %s, %s, %s; run dir %s",
            obj.model.name,
            obj.name,
            f"{self.num_params:,}",
            model_shapes(obj.model, len(corpus.vocab)),
            t.precision,
            self.device,
            "1 thread" if n == 1 else f"{n} threads",
            self.run_dir,
        )
        if t.init_from and point.state is None:  # resuming, the checkpoint's weights replace these anyway
            init_state = ckpt.load(ckpt.resolve(t.init_from, prefer=ckpt.BEST), require=("model",))
            try:
                missing = model.init_from(init_state["model"])
            except ValueError as exc:
                raise CheckpointError(f"trainer.init_from={t.init_from}: {exc}") from None
            log.info(
                "initialised from %s; left as initialised: %s", t.init_from, ", ".join(missing) or "nothing"
            )
        self.tracker = make_tracker(
            obj.logger,
            self.run_dir,
            self.config_dict,
            name,
            obj.logger.group or group,
            point.state.get("wandb_id") if point.state else None,
            cache_dir=Path(obj.paths.output_dir) / ".wandb-cache",
        )
        self.trainer = Trainer(
            model, corpus, obj, self.run_dir, self.device, self.tracker, self.config_dict, obj.model.name,
            self.num_params,
        )  # fmt: skip

    def start(self, point: _ResumePoint) -> None:
        """Load the checkpoint's state (when resuming), write the run's first records."""
        self.started, self.code = _now(), code_version()
        tr = self.trainer
        if point.state is not None:
            from .trainer import DamagedState

            try:
                tr.load_state_dict(point.state)
            except DamagedState as exc:
                raise CheckpointError(f"cannot resume {point.path}: {exc}") from None
            log.info(
                "resumed from %s: epoch %d, batch %d/%d, step %d",
                point.path,
                tr.pos.epoch + 1,
                tr.pos.batch,
                tr.n_train,
                tr.pos.step,
            )
            self.started = (rundir.read_metrics(self.run_dir) or {}).get("started_at", self.started)
        rundir.write_config(self.run_dir, self.config_dict)  # resolved; what reports group runs by
        self.record(rundir.RUNNING)
        self.tracker.summary({"data": self.data_identity, "code": self.code})

    def fit(self) -> str | None:
        """The epochs, then the test of the best epoch's weights; history and metrics after each epoch. A
        divergence or a stop signal is recorded as the run's status before it is raised on; a pruned trial
        is recorded as such and returns PRUNED."""
        from .trainer import Diverged, Interrupted, Pruned, StopSignals

        try:
            with StopSignals() as stop:
                for record in self.trainer.fit(stop):
                    self.record(rundir.RUNNING)
                    if self.on_epoch is not None:
                        self.on_epoch(record)
                self.final = self.trainer.test(stop)
        except Pruned as exc:
            self.trainer._update_wall()
            self.record(rundir.PRUNED, error=str(exc))
            self.tracker.summary({"status": rundir.PRUNED})
            self.tracker.finish()
            log.info("pruned: %s", exc)
            return rundir.PRUNED
        except Diverged as exc:
            self.record(rundir.DIVERGED, error=str(exc))
            self.tracker.summary({"status": rundir.DIVERGED})
            self.tracker.finish(exit_code=1)
            last = rundir.last_checkpoint(self.run_dir)
            keep = f"; last good checkpoint: {last}" if last.exists() else ""
            raise DivergedError(f"{exc}{keep}") from None
        except Interrupted as exc:
            self.record(rundir.INTERRUPTED, error=f"stopped by {signal.Signals(exc.signum).name}")
            self.tracker.finish(exit_code=1)
            raise

    def finish(self) -> dict:
        """The final record: the best epoch's valid and the test perplexity, in the run's record and W&B."""
        final = self.final
        result = self.metrics(
            rundir.COMPLETED, **{"val/ppl": final["val/ppl"], "test/ppl": final["test/ppl"]}
        )
        rundir.write_metrics(self.run_dir, result)
        self.tracker.summary(
            {
                "val/ppl": result["val/ppl"],
                "test/ppl": result["test/ppl"],
                "best_epoch": result["best_epoch"],
                "num_params": self.num_params,
                "train/tokens_per_s": result["train/tokens_per_s"],
                "status": rundir.COMPLETED,
            }
        )
        self.tracker.finish()
        log.info(
            "done: best val ppl %.2f (epoch %d), test ppl %.2f, %.0f tok/s, %.0f s; run dir %s",
            result["val/ppl"],
            result["best_epoch"],
            result["test/ppl"],
            result["train/tokens_per_s"] or 0,
            result["wall_s"],
            self.run_dir,
        )
        return result

    def record(self, status: str, **extra) -> None:
        rundir.write_history(self.run_dir, self.trainer.history)
        rundir.write_metrics(self.run_dir, self.metrics(status, **extra))

    def metrics(self, status: str, **extra) -> dict:
        """The run's record: what the run is, where it stands, its numbers so far."""
        tr, t = self.trainer, self.obj.trainer
        tt, hist = tr.train_time, tr.history
        m = {
            "status": status,
            "model": self.obj.model.name,
            "name": self.obj.name,
            "seed": self.obj.seed,
            "num_params": self.num_params,
            "epochs_completed": len(hist),
            "max_epochs": t.max_epochs,
            "val/ppl": tr.best_val if tr.best_epoch >= 0 else None,
            "best_epoch": tr.best_epoch + 1 if tr.best_epoch >= 0 else None,
            "test/ppl": None,
            "train/ppl": hist[-1]["train/ppl"] if hist else None,
            "train/tokens_per_s": tt["tokens"] / tt["seconds"] if tt["seconds"] else None,
            "wall_s": tr.wall_s,
            "cpu_s": tr.cpu_s,
            "stopped_early": tr.stopped_early(),
            "step": tr.pos.step,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "run_dir": str(self.run_dir),
            "wandb_id": self.tracker.run_id,
            "code": self.code,
            "data": self.data_identity,
            "started_at": self.started,
            "updated_at": _now(),
        }
        m.update(extra)
        return m

    def failed(self, exc: BaseException) -> BaseException:
        """What to raise for `exc`: a write error deep in a library becomes one line naming the file. The
        failure is recorded in the run's record (a divergence and a stop are already), and W&B's run closed."""
        from .trainer import Diverged, Interrupted

        plain = isinstance(exc, Exception) and not isinstance(exc, (UserError, Interrupted, Diverged))
        cause = find_write_error(exc) if plain else None
        if cause is not None:  # a full disk or an unwritable folder: one line that names the file
            exc = output_error(cause)
        if not isinstance(exc, (Interrupted, DivergedError)):
            _record_failure(self.run_dir, self.cfg, exc)
        if self.tracker is not None:
            self.tracker.finish(exit_code=1)  # never leave a W&B run open for the next job of a sweep
        return exc


def _record_failure(run_dir: Path, cfg: DictConfig, exc: BaseException) -> None:
    """A job that failed before or during training still leaves a record saying why (not one refused
    because the directory holds another run: that run's record stays as it is)."""
    if isinstance(exc, RunDirRefused):
        return
    previous = rundir.read_metrics(run_dir) or {}
    if previous.get("status") in rundir.ENDED:
        return
    if isinstance(exc, KeyboardInterrupt):
        status, error = rundir.INTERRUPTED, "stopped by a second Ctrl-C (no checkpoint of the current step)"
    else:
        status = rundir.FAILED
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    model = OmegaConf.select(cfg, "model.name", default=None)
    previous.update(
        status=status,
        error=error,
        model=previous.get("model", model),
        name=previous.get("name", OmegaConf.select(cfg, "name", default=None)),
        seed=previous.get("seed", OmegaConf.select(cfg, "seed", default=None)),
        run_dir=str(run_dir),
        updated_at=_now(),
    )
    try:
        rundir.write_metrics(run_dir, previous)
    except OSError as write_error:  # e.g. the disk that is full holds the run directory too
        log.error("could not record the failure in %s: %s", run_dir / rundir.METRICS, write_error)


# ----------------------------------------------------------------------------------------------------------
# The Hydra application


def _run_name_and_group():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    overrides = [
        o for o in hc.overrides.task if not o.startswith(("model=", "trainer.resume", "hydra", "logger"))
    ]
    model = hc.runtime.choices.get("model", "model")
    name = " ".join([model, *overrides])
    group = None
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        group = f"sweep-{sweep.parent.name}_{sweep.name}"
    return name, group, hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not o.startswith("trainer.resume=")]


class _JobPrefix(logging.Formatter):
    """A sweep's console lines start with the job's name, so that parallel jobs' lines can be told apart
    (the job's own train.log is left as it is)."""

    def __init__(self, inner: logging.Formatter | None, prefix: str):
        super().__init__()
        self.inner, self.prefix = inner or logging.Formatter(), prefix

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.prefix} {self.inner.format(record)}"


@contextlib.contextmanager
def _job_prefix(prefix: str):
    consoles = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    saved = [h.formatter for h in consoles]
    for h in consoles:
        h.setFormatter(_JobPrefix(h.formatter, prefix))
    try:
        yield
    finally:
        for h, f in zip(consoles, saved):
            h.setFormatter(f)


def stops_as_a_grid(launcher: str, sweeper: str) -> bool:
    """Whether a stopped sweep stops as a whole (its running jobs checkpoint and return, the others do not
    start, the summary prints the command that continues it): a grid (Hydra's basic sweeper) whose jobs run
    in the sweep's own process or its joblib workers. A submitit job is a process of its own (requeued by
    SLURM); a sweeper that chooses its points (Optuna) keeps a stopped trial open, to be resumed by re-running
    it, so its job exits with the signal as a single run does."""
    return "submitit" not in launcher and "BasicSweeper" in sweeper


def _stops_as_a_grid() -> bool:
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return stops_as_a_grid(
        str(OmegaConf.select(hc, "launcher._target_", default="")),
        str(OmegaConf.select(hc, "sweeper._target_", default="")),
    )


_STOPPED_BY: list[int] = []  # the signal that stopped a job of this process (for main's exit status)


def _worker_stop_handler(signum, frame):
    """A joblib worker between jobs (or building one): note the stop for the next StopSignals and the
    sweep; a second signal stops at once."""
    from .trainer import StopSignals

    if StopSignals.pending is not None:
        raise KeyboardInterrupt
    StopSignals.pending = signum
    from hydra.core.hydra_config import HydraConfig

    try:
        rundir.mark_sweep_stopped(HydraConfig.get().sweep.dir, f"{signal.Signals(signum).name} to a job")
    except Exception:
        pass


def _hydra_task(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    name, group, multirun, run_dir = _run_name_and_group()
    prefix = f"[job {HydraConfig.get().job.num} {run_dir.name}]" if multirun else None
    if multirun and _stops_as_a_grid() and os.getpid() != int(os.environ.get("DGLSTM_SWEEP_PID", "0")):
        # a joblib worker: from now on (its next jobs, the time between them) a signal is noted, not fatal
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _worker_stop_handler)
    try:
        if multirun and _stops_as_a_grid():
            why = rundir.sweep_stopped(HydraConfig.get().sweep.dir)
            if why:  # the sweep was stopped: a job that has not started yet does not start
                print(f"{prefix} not started: the sweep was stopped ({why})", file=sys.stderr, flush=True)
                return None
        with _job_prefix(prefix) if prefix else contextlib.nullcontext():
            return _run_job(cfg, name, group, multirun, run_dir)
    finally:
        # the job is over: its directory is free again (also for a joblib worker's next job)
        rundir.release(run_dir)
        _REFUSED_DIRS.discard(str(run_dir))


def _run_job(cfg: DictConfig, name: str, group: str | None, multirun: bool, run_dir: Path):
    from .trainer import Interrupted

    trial = None  # a tuning trial of make compare (tune.trial): its parameters, pruner and result
    try:
        overrides, on_epoch = _task_overrides(), None
        if OmegaConf.select(cfg, "tune.trial") is not None:
            from .tune import TrialJob

            trial = TrialJob(cfg)
            cfg, overrides, on_epoch = trial.cfg, [*overrides, *trial.overrides], trial.on_epoch
        metrics = train(cfg, run_dir, run_name=name, group=group, overrides=overrides, on_epoch=on_epoch)
        if trial is not None:
            trial.tell(metrics)
    except RunDirRefused as exc:
        # The directory is another run's: nothing goes into its log or its record.
        if not multirun:
            report_and_exit(exc)
        from hydra.core.hydra_config import HydraConfig

        rundir.mark_refused(HydraConfig.get().sweep.dir, run_dir, str(exc))  # the summary lists it as refused
        print(f"error: job refused: {exc}", file=sys.stderr, flush=True)
        return None
    except Interrupted as exc:
        signame = signal.Signals(exc.signum).name
        if multirun and _stops_as_a_grid():
            _STOPPED_BY.append(exc.signum)
            # The sweep stops: the jobs not started yet do not start, and the sweep's summary says how to
            # continue all of them (one command), so this job only says where its checkpoint is.
            from hydra.core.hydra_config import HydraConfig

            rundir.mark_sweep_stopped(HydraConfig.get().sweep.dir, f"{signame} to a job")
            log.warning("stopped by %s; checkpoint saved to %s", signame, exc.checkpoint_path)
            return None
        hint = f"make train trainer.resume={run_dir}"
        log.warning(
            "stopped by %s; checkpoint saved to %s. Resume with: %s", signame, exc.checkpoint_path, hint
        )
        if not multirun:
            print(f"stopped; checkpoint saved. Resume with:  {hint}", file=sys.stderr)
        # Our handlers are gone again: hand the signal on to the one they replaced. Under submitit that is
        # its SIGUSR2 handler (SLURM's pre-timeout signal), which requeues the job and exits.
        rundir.release(run_dir)  # before submitit's handler, which requeues the job and exits
        previous = signal.getsignal(exc.signum)
        if exc.signum == getattr(signal, "SIGUSR2", None) and callable(previous):
            previous(exc.signum, None)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if trial is not None and isinstance(exc, DivergedError):
            trial.diverged()  # a point of the space all the same (a bad one)
        elif trial is not None:
            trial.failed()  # re-drawn by make compare
        _record_failure(run_dir, cfg, exc)
        if not multirun:
            if isinstance(exc, UserError):
                log.error("%s", exc)
                report_and_exit(exc)
            raise
        # A failed job must not stop the sweep: it is recorded, and the sweep summary reports it.
        log.error("job failed: %s", exc, exc_info=not isinstance(exc, UserError))
        if isinstance(exc, DivergedError) and cfg.get("optimized_metric"):
            return float("inf")  # a sweeper (Optuna) learns that this region is bad
        return None
    if cfg.get("optimized_metric"):
        value = metrics.get(cfg.optimized_metric)
        return float(value) if value is not None else float("inf")
    return None


def _make_hydra_main():
    import hydra

    return hydra.main(
        config_path=str(Path(__file__).resolve().parent.parent / "conf"),
        config_name="train",
        version_base="1.3",
    )(_hydra_task)


# ----------------------------------------------------------------------------------------------------------
# Checks before Hydra starts: one-line errors instead of Hydra's multi-line reports

_PASSTHROUGH_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
}
_CONFIG_FLAGS = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def _resume_overrides(parsed) -> list[str]:
    """`trainer.resume=<run>` continues that run as it was started: the overrides it last trained with
    (rundir.overrides_file: written once a run is under way, so a resume that was refused leaves no
    trace; else Hydra's copy), minus those given again now. A run made outside Hydra has none to
    offer; its checkpoint's config is still compared."""
    given = {o.key_or_group for o in parsed}
    value = next((o.value() for o in parsed if o.key_or_group == "trainer.resume"), None)
    if not value or not isinstance(value, str):
        return []
    source = rundir.overrides_file(rundir.of_checkpoint(ckpt.resolve(value)))
    if source is None:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        previous = [str(o) for o in OmegaConf.to_container(OmegaConf.load(source))]
        old = OverridesParser.create().parse_overrides(previous)
    except Exception as exc:
        raise CheckpointError(f"cannot read the overrides of the run to resume, {source}: {exc}") from None
    return [o.input_line for o in old if o.key_or_group not in given and o.key_or_group != "trainer.resume"]


def preflight(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Compose and check what Hydra is about to run. Returns argv (extended where needed) and environment
    variables for the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import to_object

    if any(a.split("=")[0] in _PASSTHROUGH_FLAGS | _CONFIG_FLAGS for a in argv):
        return argv, {}
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides: {str(exc).splitlines()[0]}") from None

    if not multirun:
        inherited = _resume_overrides(parsed)
        if inherited:
            # the run's own overrides first, the ones given now after them (and taking precedence)
            argv, overrides = [*inherited, *argv], [*inherited, *overrides]
        cfg = compose(overrides)
        check_before_run(validate(cfg))
        resume = OmegaConf.select(cfg, "trainer.resume")
        if resume and not any(o.startswith("hydra.run.dir=") for o in overrides):
            path = ckpt.resolve(resume)
            if not path.exists() and not ckpt.previous_of(path).exists():
                raise CheckpointError(f"trainer.resume={resume}: no checkpoint at {path}")
            run_dir = rundir.of_checkpoint(path)
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
            # Continue in the original directory; keep its .hydra/ and record this invocation beside it.
            argv = [*argv, f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
        return argv, {}

    # Multirun: compose every value of every swept key once (not the whole grid), so that an unknown option
    # or key, or a value of the wrong type, fails before any job starts. Invalid *values* (a negative rate)
    # are left to the jobs: each job that fails is recorded and the others go on.
    fixed = [o for o in parsed if not o.is_sweep_override()]
    sweeps = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval(...) and other sweeper syntax: the sweeper checks it
                continue
            if len(values) != len(set(values)):
                raise ConfigError(
                    f"{o.input_line}: a value appears twice (two jobs would share one directory)"
                )
            sweeps.append((o.get_key_element(), values))
    firsts = [f"{k}={v[0]}" for k, v in sweeps]
    for idx, (key, values) in enumerate(sweeps):
        for v in values:
            to_object(
                compose([o.input_line for o in fixed] + firsts[:idx] + [f"{key}={v}"] + firsts[idx + 1 :])
            )
    base = compose([o.input_line for o in fixed] + firsts, return_hydra_config=True)
    check_before_run(to_object(compose([o.input_line for o in fixed] + firsts)))
    output_dir = Path(OmegaConf.select(base, "paths.output_dir"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)  # e.g. Optuna's sqlite
    except OSError as exc:
        raise output_error(exc, output_dir) from None

    if sweeps:
        # Name job directories after what varies: the keys given once stay out of the name
        # (outputs/multirun/<date>/<time>/model=dglstm,seed=2 rather than the whole command line).
        exclude = list(OmegaConf.select(base, "hydra.job.config.override_dirname.exclude_keys"))
        exclude += [o.key_or_group for o in fixed if o.key_or_group not in exclude]
        argv = [
            *argv,
            "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(repr(k) for k in exclude) + "]",
        ]

    env = _job_environment(base, sweeps)
    if "DGLSTM_PARALLEL_JOBS" in env and not any(a.startswith("hydra.launcher.n_jobs=") for a in argv):
        # as many joblib workers as jobs run at once: no worker idles from the start, where a stop signal
        # would find Python's default handler and break the pool (it then kills the jobs still saving)
        argv = [*argv, f"hydra.launcher.n_jobs={env['DGLSTM_PARALLEL_JOBS']}"]
    return argv, env


def _job_environment(base: DictConfig, sweeps: list) -> dict[str, str]:
    """Environment variables for a sweep's jobs: joblib's workers share this machine's cores, so each job
    is told how many jobs run beside it (default_threads gives it its share)."""
    launcher = str(OmegaConf.select(base, "hydra.launcher._target_", default=""))
    sweeper = str(OmegaConf.select(base, "hydra.sweeper._target_", default=""))
    env = {"DGLSTM_LAUNCHER": launcher, "DGLSTM_SWEEPER": sweeper}
    if "joblib" in launcher.lower():
        n_jobs = int(OmegaConf.select(base, "hydra.launcher.n_jobs", default=-1) or -1)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        grid = 1
        for _, values in sweeps:
            grid *= len(values)
        parallel = min(cores if n_jobs <= 0 else n_jobs, grid)
        env["DGLSTM_PARALLEL_JOBS"] = str(max(1, parallel))
    return env


_REFUSED_DIRS: set[str] = (
    set()
)  # job directories whose .hydra/ is not written: they hold another config's run
_SAFE_PATH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-+:@%~")


def _override_value(path: str) -> str:
    """A path as the value of a Hydra override: quoted unless it is made of plain characters only."""
    if path and set(path) <= _SAFE_PATH_CHARS:
        return path
    return "'" + path.replace("'", "\\'") + "'"


def claim_output(argv: list[str]) -> list[str]:
    """Before Hydra writes anything (it writes .hydra/ into the run directory before any of our code runs):
    resolve the run's directory (a sweep's, for --multirun), check that it can be written and has room, and
    for a single run take its lock (rundir.py) and refuse a directory that holds a run of another config.
    Returns argv with that directory pinned (`${now:}` and `${unique_dir:}` are resolved once, here)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=")[0] in _PASSTHROUGH_FLAGS | _CONFIG_FLAGS for a in argv):
        return argv
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        chosen = []
        for o in parsed:
            if not o.is_sweep_override():
                chosen.append(o.input_line)
                continue
            try:  # the directory of a sweep never depends on the swept values: any one of them will do
                chosen.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
            except Exception:
                continue
        hcfg = compose(chosen, return_hydra_config=True)
        value = OmegaConf.select(hcfg, key, throw_on_resolution_failure=True)
    except Exception as exc:
        cause = find_write_error(exc)
        if cause is not None:  # e.g. ${unique_dir:...} under a read-only or full paths.output_dir
            raise output_error(cause) from None
        return argv  # an interpolation only Hydra can resolve: the job takes its directory's lock itself
    if not value:
        return argv
    target = Path(str(value))
    if multirun:
        rundir.check_writable(target)
    else:
        rundir.check_writable(target, probe=False)  # the lock file is the probe
        rundir.check_free(target)  # a live holder first: it is what the user needs to know
        try:
            # (a tuning trial's config is complete only once its parameters are read from its study: the
            # job compares it itself)
            if (
                not OmegaConf.select(hcfg, "trainer.resume")
                and OmegaConf.select(hcfg, "trainer.auto_resume")
                and OmegaConf.select(hcfg, "tune.trial") is None
            ):
                task = hcfg.copy()
                with open_dict(task):
                    del task["hydra"]
                check_same_run(target, resolved_container(task))
        except RunDirRefused:
            raise
        except Exception:
            pass  # anything else is for train() to find and report, inside Hydra
        try:
            rundir.acquire(target, log_takeover=False)
        except OSError as exc:
            raise output_error(exc, target) from None
    given = [a for a in argv if a.split("=", 1)[0] == key]
    if given and "${" not in given[-1]:
        return argv  # as given: Hydra resolves it to the same path
    return [a for a in argv if a.split("=", 1)[0] != key] + [f"{key}={_override_value(str(target))}"]


def _patch_hydra_config_writes() -> None:
    """Hydra writes .hydra/{config,hydra,overrides}.yaml into a job's directory before the task runs: in
    place (a disk that fills up leaves them cut short) and whoever else holds the directory. Here they are
    written atomically, after taking the directory's lock; a job whose directory another run holds, or holds
    a run of another config, writes none of them (and is then refused by train()). A file that cannot be
    written is logged, not raised: the job then fails on its own first write, with one line, and the other
    jobs of a sweep go on."""
    try:
        from hydra.core import utils as hydra_utils
    except ImportError:  # pragma: no cover
        return
    original = getattr(hydra_utils, "_save_config", None)
    if original is None or getattr(original, "_dglstm_lm", False):
        return

    def _save_config(cfg, filename: str, output_dir) -> None:
        output_dir = Path(output_dir)
        try:
            from hydra.core.hydra_config import HydraConfig

            run_dir = Path(HydraConfig.get().runtime.output_dir)
        except Exception:
            run_dir = output_dir.parent
        if str(run_dir) in _REFUSED_DIRS:
            return
        try:
            rundir.check_free(run_dir)  # reads only: a refused job changes nothing in the directory
            if filename == "config.yaml":  # the job's own config, written first: is it another run's folder?
                try:
                    if not OmegaConf.select(cfg, "trainer.resume") and OmegaConf.select(
                        cfg, "trainer.auto_resume"
                    ):
                        check_same_run(run_dir, resolved_container(cfg))
                except RunDirRefused:
                    raise
                except Exception:
                    pass
            rundir.acquire(run_dir, log_takeover=False)
        except RunDirRefused:
            _REFUSED_DIRS.add(str(run_dir))  # train() refuses the job, saying why
            return
        except OSError:
            pass
        try:
            ckpt.atomic_write_bytes(output_dir / filename, OmegaConf.to_yaml(cfg).encode())
        except OSError as exc:
            log.error("could not write %s: %s", output_dir / filename, write_error_reason(exc))

    _save_config._dglstm_lm = True
    hydra_utils._save_config = _save_config


_patch_hydra_config_writes()


def main() -> None:
    from . import callbacks

    try:
        argv, env = preflight(sys.argv[1:])
        argv = claim_output(argv)
    except UserError as exc:
        report_and_exit(exc)
    sys.argv = [sys.argv[0], *argv]
    os.environ.update(env)  # inherited by joblib's workers
    multirun = any(a in ("-m", "--multirun") for a in argv)
    grid = stops_as_a_grid(env.get("DGLSTM_LAUNCHER", ""), env.get("DGLSTM_SWEEPER", ""))
    stop = _SweepStop() if multirun and grid else None
    os.environ["DGLSTM_SWEEP_PID"] = str(os.getpid())
    try:
        with stop or contextlib.nullcontext():
            _make_hydra_main()()
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        rundir.release_all()
    signum = (stop.received if stop is not None else None) or next(iter(_STOPPED_BY), None)
    if signum is not None:
        sys.exit(128 + signum)
    if callbacks.FAILED_JOBS:
        sys.exit(1)


class _SweepStop:
    """The sweep's own process on SIGINT / SIGTERM: the running jobs get the signal too (a terminal's Ctrl-C,
    SLURM and `kill -- -<pgid>` signal the whole process group), save a checkpoint after their current step
    and return; the jobs not started yet do not start (rundir.SWEEP_STOPPED); the sweep's summary then lists
    every job and prints the one command that continues them all. A second signal stops at once (the same
    signal again within 2 s is the same stop: the process group's and a parent's, as make compare forwards it)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._at = 0.0
        self._previous: dict = {}

    def __enter__(self):
        # imported here, not in the handler: a signal that arrives while the handler imports would find a
        # half-initialised module
        from . import callbacks
        from .trainer import StopSignals

        self._callbacks, self._stop_signals = callbacks, StopSignals
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        # joblib's workers and their resource tracker: a stopped sweep is not a leak worth a warning
        os.environ["PYTHONWARNINGS"] = ",".join(
            w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:resource_tracker:UserWarning") if w
        )
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == self.received and time.monotonic() - self._at < 2.0:
                return  # the same stop twice (the process group's signal and a parent's, e.g. make compare)
            raise KeyboardInterrupt
        self.received, self._at = signum, time.monotonic()
        self._stop_signals.pending = signum  # the basic launcher's job, if it is between its loop's handlers
        if self._callbacks.SWEEP_DIR is not None:  # the sweep's folder, as Hydra resolved it
            rundir.mark_sweep_stopped(
                self._callbacks.SWEEP_DIR, f"{signal.Signals(signum).name} to the sweep"
            )

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        return False


if __name__ == "__main__":
    # The task Hydra runs is then `dglstm_lm.train._hydra_task`, not a function of `__main__`: a sweep's
    # workers (joblib, submitit) import this module by name when they unpickle it, and so run with the atomic,
    # lock-aware writes of Hydra's .hydra/ files (_patch_hydra_config_writes) before the job's first write.
    from dglstm_lm.train import main as _main

    _main()
