"""Hydra callbacks: a summary of every job at the end of a sweep."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.experimental.callback import Callback

from . import rundir

log = logging.getLogger("dglstm_lm.sweep")

FAILED_JOBS: list[str] = []  # read by train.main() to exit non-zero when a job of the sweep failed
SWEEP_DIR: Path | None = None  # the running sweep's folder, as Hydra resolved it (sweep._SweepStop marks it)


def job_statuses(sweep_dir: Path) -> list[tuple[str, dict]]:
    # this run's refused jobs: their folders hold other runs' records, which are not theirs to report
    refused = rundir.refused_jobs(sweep_dir)
    rows = []
    for job in rundir.find_metrics(sweep_dir):
        rel = str(job.relative_to(sweep_dir))
        if rel in refused:
            rows.append((rel, {"status": "refused", "error": refused.pop(rel)}))
            continue
        rows.append((rel, rundir.read_metrics(job) or {"status": "unreadable"}))
    # a job refused because another run holds its directory, before that run wrote any metrics: in use
    listed = {rel for rel, _ in rows}
    for lock in sorted(Path(sweep_dir).glob(f"**/{rundir.LOCK_NAME}")):
        rel = str(lock.parent.relative_to(sweep_dir))
        if (lock.parent / rundir.METRICS).exists() or rel in listed:
            continue
        refused.pop(rel, None)
        try:
            holder = rundir.describe(json.loads(lock.read_text()))
        except (OSError, ValueError, AttributeError):
            holder = "unknown"
        rows.append((rel, {"status": "in use", "error": f"held by {holder}"}))
    rows += [(rel, {"status": "refused", "error": why}) for rel, why in refused.items()]
    return sorted(rows, key=lambda r: r[0])


def grid_size(task_overrides: list[str]) -> int | None:
    """The number of jobs of a grid sweep (the product of its swept values' counts); None when a sweeper
    chooses the points (Optuna's intervals)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
        n = 1
        for o in parsed:
            if o.is_sweep_override():
                n *= len(list(o.sweep_string_iterator()))
        return n
    except Exception:
        return None


def continue_command(task_overrides: list[str], sweep_dir: Path) -> str:
    """The one command that continues a sweep: its overrides as given, into the same folder (finished jobs
    are skipped, the others resume from their checkpoints)."""
    import shlex

    given = [str(o) for o in task_overrides if not str(o).startswith(("hydra.sweep.dir=", "hydra.mode="))]
    return " ".join(["make sweep", *map(shlex.quote, given), shlex.quote(f"hydra.sweep.dir={sweep_dir}")])


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        global SWEEP_DIR
        SWEEP_DIR = Path(config.hydra.sweep.dir)
        rundir.clear_sweep_stopped(SWEEP_DIR)  # a re-run continues a stopped sweep
        rundir.clear_refused(SWEEP_DIR)  # ... and says afresh which of its jobs are refused

    def on_multirun_end(self, config, **kwargs) -> None:
        from omegaconf import OmegaConf

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = job_statuses(sweep_dir)
        # the overrides as typed: iterating the ListConfig would resolve `hydra.sweep.subdir='seed=${seed}'`
        # to the last job's `seed=1`, and the printed command would send every job into that one folder
        given = OmegaConf.to_container(config.hydra.overrides, resolve=False)
        task = [str(o) for o in given["task"]]
        total = grid_size(task)
        # the launcher and its settings (hydra/launcher=joblib, hydra.launcher.n_jobs=...) are Hydra's overrides
        task = [*(str(o) for o in given["hydra"]), *task]
        if not rows:
            return
        counts: dict[str, int] = {}
        lines = [f"sweep {sweep_dir}: {len(rows)} jobs"]
        for job, m in rows:
            status = m.get("status", "?")
            counts[status] = counts.get(status, 0) + 1
            ppl = (
                f"val {m['val/ppl']:.2f} test {m['test/ppl']:.2f}"
                if m.get("test/ppl") is not None
                else m.get("error", "")
            )
            lines.append(f"  {status:<11} {job}  {ppl}")
            if status not in (rundir.COMPLETED, rundir.PRUNED):  # a pruned trial ended as its study asked
                FAILED_JOBS.append(job)
        total = max(total or 0, len(rows))
        done = counts.get(rundir.COMPLETED, 0)
        parts = [f"{n} {status}" for status, n in sorted(counts.items()) if status != rundir.COMPLETED]
        done += counts.get(rundir.PRUNED, 0)  # ended, as their study asked
        if total > len(rows):
            parts.append(f"{total - len(rows)} not started")
        lines.append(f"{done} of {total} jobs completed" + (f" ({', '.join(parts)})" if parts else ""))
        stopped = rundir.sweep_stopped(sweep_dir)
        if done < total:
            if stopped or counts.get(rundir.INTERRUPTED) or counts.get(rundir.RUNNING):
                lines.append(
                    f"the sweep was stopped; continue all of it with:\n  {continue_command(task, sweep_dir)}"
                )
            lines.append(f"`make report dir={sweep_dir}` lists every job")
        print("\n".join(lines))
