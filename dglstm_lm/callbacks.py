"""Hydra callbacks: a summary of every job at the end of a sweep."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback

from . import rundir

log = logging.getLogger("dglstm_lm.sweep")

FAILED_JOBS: list[str] = []  # read by train.main() to exit non-zero when a job of the sweep failed


def job_statuses(sweep_dir: Path) -> list[tuple[str, dict]]:
    rows = []
    for job in rundir.find_metrics(sweep_dir):
        rows.append((str(job.relative_to(sweep_dir)), rundir.read_metrics(job) or {"status": "unreadable"}))
    # a job refused because another run holds its directory, before that run wrote any metrics
    for lock in sorted(Path(sweep_dir).glob(f"**/{rundir.LOCK_NAME}")):
        if not (lock.parent / rundir.METRICS).exists():
            try:
                holder = rundir.describe(json.loads(lock.read_text()))
            except (OSError, ValueError, AttributeError):
                holder = "unknown"
            rows.append(
                (str(lock.parent.relative_to(sweep_dir)), {"status": "in use", "error": f"held by {holder}"})
            )
    return sorted(rows, key=lambda r: r[0])


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_statuses(sweep_dir)
        if not rows:
            return
        lines = [f"sweep {sweep_dir}: {len(rows)} jobs"]
        for job, m in rows:
            status = m.get("status", "?")
            ppl = (
                f"val {m['val/ppl']:.2f} test {m['test/ppl']:.2f}"
                if m.get("test/ppl") is not None
                else m.get("error", "")
            )
            lines.append(f"  {status:<11} {job}  {ppl}")
            if status != rundir.COMPLETED:
                FAILED_JOBS.append(job)
        if FAILED_JOBS:
            lines.append(
                f"{len(FAILED_JOBS)} of {len(rows)} jobs did not complete; `make report dir={sweep_dir}` lists them"
            )
        print("\n".join(lines))
