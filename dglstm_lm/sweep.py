"""Sweep control: the job prefix on a sweep's console lines, whether a sweep stops as a grid, and how its
processes take a stop signal (the sweep's own process, and joblib's workers between jobs)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time

from omegaconf import OmegaConf

from . import rundir


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


_WORKER_STOP_AT = [0.0]  # when a joblib worker noted its stop signal


def _worker_stop_handler(signum, frame):
    """A joblib worker between jobs (or building one): note the stop for the next StopSignals and the
    sweep; a second signal stops at once (the same signal again within 2 s is the same stop: the process
    group's and make compare's, which hands it to every process of its stage)."""
    from .trainer import StopSignals

    if StopSignals.pending is not None:
        if signum == StopSignals.pending and time.monotonic() - _WORKER_STOP_AT[0] < 2.0:
            return
        raise KeyboardInterrupt
    StopSignals.pending, _WORKER_STOP_AT[0] = signum, time.monotonic()
    from hydra.core.hydra_config import HydraConfig

    try:
        rundir.mark_sweep_stopped(HydraConfig.get().sweep.dir, f"{signal.Signals(signum).name} to a job")
    except Exception:
        pass


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
