"""Experiment tracking: Weights & Biases (offline by default) or nothing.

The run directory's files (its metrics and history, rundir.py) are the source of truth; W&B mirrors them. Its files live in the
run's own directory (<run dir>/wandb/), and `wandb sync <run dir>/wandb` uploads an offline run later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """No tracking (logger=none)."""

    run_id: str | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    def __init__(
        self,
        cfg,
        run_dir: Path,
        config: dict,
        name: str,
        group: str | None,
        resume_id: str | None,
        cache_dir=None,
    ):
        # wandb-core's debug logs and caches go under the output folder, not the user's home.
        if cache_dir is not None:
            os.environ.setdefault("WANDB_CACHE_DIR", str(cache_dir))
            os.environ.setdefault("WANDB_DATA_DIR", str(cache_dir))
        import wandb

        self._wandb = wandb
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True, disable_git=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=name,
            group=group,
            job_type=cfg.job_type,
            tags=list(cfg.tags) or None,
            config=config,
            dir=str(run_dir),
            mode=cfg.mode,
            id=resume_id,
            resume="allow" if resume_id else None,
            reinit="finish_previous",  # jobs of a sweep share a process: never log into the previous job's run
            settings=settings,
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:  # idempotent: the failure paths finish it too
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)


def make_tracker(
    cfg, run_dir: Path, config: dict, name: str, group: str | None, resume_id: str | None, cache_dir=None
) -> Tracker:
    if cfg.name == "none" or cfg.mode == "disabled":
        return Tracker()
    try:
        return WandbTracker(cfg, run_dir, config, name, group, resume_id, cache_dir)
    except Exception as exc:
        # A run never depends on a server: train on, with the local files as the record.
        log.warning(
            "W&B unavailable (%s: %s); continuing without it",
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )
        return Tracker()
