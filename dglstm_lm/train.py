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
import logging
import signal
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import checkpoint as ckpt
from . import rundir
from .config import resolved_container, validate
from .errors import (
    CheckpointError,
    UserError,
    find_write_error,
    output_error,
)
from .resume import ResumePoint, check_same_run, resume_point
from .runtime import (
    _file_log_handler,
    _now,
    code_version,
    default_threads,
    keep_freed_memory,
    model_shapes,
    record_failure,
    resolve_device,
)

log = logging.getLogger("dglstm_lm.train")


def _gemm_record() -> str:
    """The per-step GEMM paths the DGLSTM's fused scan ran in this run (kernels.gemm_record)."""
    from .models.kernels import gemm_record

    return gemm_record()


def _reset_gemm_record() -> None:
    """Forget the GEMM and loss paths that earlier runs in this process ran."""
    from .models.kernels import reset_gemm_record
    from .models.loss import reset_loss_record

    reset_gemm_record()
    reset_loss_record()


def _loss_record() -> str:
    """The cross-entropy paths this run ran (loss.loss_record)."""
    from .models.loss import loss_record

    return loss_record()


def _wgrad_summary() -> str:
    """Where the DGLSTM's weight gradients run here (kernels.wgrad_path), for the run's record."""
    from .models.kernels import wgrad_summary

    return wgrad_summary()


class DivergedError(UserError):
    exit_code = 3


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
            point = resume_point(obj, run_dir, config_dict)
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


class _Run:
    """The objects of one run between its steps (build → start → fit → finish), and its record (rundir.METRICS)."""

    def __init__(self, cfg: DictConfig, obj, run_dir: Path, config_dict: dict):
        self.cfg, self.obj, self.run_dir, self.config_dict = cfg, obj, run_dir, config_dict
        self.on_epoch = None  # called with each epoch's record (a tuning trial's pruner)
        self.tracker = self.trainer = None

    def build(self, point: ResumePoint, name: str, group: str | None) -> None:
        """Seed, device, threads, corpus, model (initialised from another run's weights if asked), the
        tracker and the trainer, in the order that makes a run reproducible from its seed."""
        from .data import prepare_from_config
        from .models import build_model, check_backend, count_parameters
        from .tracking import make_tracker
        from .trainer import Trainer, precision_context, seed_everything

        obj, t = self.obj, self.obj.trainer
        seed_everything(obj.seed)
        self.device = resolve_device(t.device)
        precision_context(self.device, t.precision)  # a precision the device lacks: one line, before the data
        threads = t.threads or default_threads()
        if threads:
            torch.set_num_threads(threads)
        keep_freed_memory()  # no page faults for the buffers every step frees and allocates again
        _reset_gemm_record()  # this run's GEMM and loss paths only, in a worker that ran another job before
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

    def start(self, point: ResumePoint) -> None:
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
            "malloc": keep_freed_memory(),
            "gemm": _gemm_record(),
            "wgrad": _wgrad_summary(),
            "loss": _loss_record(),
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
            record_failure(self.run_dir, self.cfg, exc)
        if self.tracker is not None:
            self.tracker.finish(exit_code=1)  # never leave a W&B run open for the next job of a sweep
        return exc


# ----------------------------------------------------------------------------------------------------------
# The Hydra application


# ----------------------------------------------------------------------------------------------------------
# Checks before Hydra starts: one-line errors instead of Hydra's multi-line reports


def main() -> None:
    """`python -m dglstm_lm.train` and the dglstm-train script: the Hydra application (app.py)."""
    from .app import main as app_main

    app_main()


if __name__ == "__main__":
    # The task Hydra runs is `dglstm_lm.app._hydra_task`, not a function of `__main__`: a sweep's workers
    # (joblib, submitit) import that module by name when they unpickle it, and so run with the atomic,
    # lock-aware writes of Hydra's .hydra/ files (app._patch_hydra_config_writes) before the job's first write.
    from dglstm_lm.app import main as _main

    _main()
