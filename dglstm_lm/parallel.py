"""How many jobs run at once: the CPUs this process may use, and what Hydra's joblib launcher makes of its
n_jobs. Imports nothing of the project, so `make compare status=1` and its refusals stay fast."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """The CPUs this process may run on (its affinity: SLURM's or taskset's share), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def joblib_at_a_time(n_jobs: int | None, jobs: float) -> int:
    """How many of `jobs` jobs Hydra's joblib launcher runs at once: n_jobs; unset, its default -1 (one per
    core); a negative n_jobs counts back from the cores as joblib does (-2: all but one), never more than the
    jobs. joblib refuses n_jobs=0, and so does this."""
    if n_jobs == 0:
        raise ValueError("n_jobs=0 has no meaning for joblib")
    n = -1 if n_jobs is None else n_jobs
    if n < 0:
        n = max(cpu_cores() + 1 + n, 1)
    return max(1, min(n, jobs))
