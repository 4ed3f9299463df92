"""The run directory: what a run writes where, how each file is written and read back, and its lock.

One run per directory (`make train`'s outputs/runs/<date>/<time>, a sweep job's <sweep dir>/<job>):

    <run dir>/
      run.lock          held while a run writes here (below); absent when no run is going
      config.json       the resolved config the run trains with: what reports group runs by
      overrides.yaml    the command line's overrides, written once every check has passed: what
                        `trainer.resume=<run dir>` composes the run from again
      metrics.json      the run's record, rewritten after every epoch; `status` is one of STATUSES
      history.jsonl     one JSON line per finished epoch (train/valid numbers, lr, tokens, time)
      checkpoints/      last.pt (+ last-previous.pt) and best.pt, a hard link to the best epoch's file
      train.log         the log (Hydra's file handler, or train()'s own outside Hydra)
      .hydra/           Hydra's config.yaml, overrides.yaml (+ resume-<stamp>/ for each resume)
      wandb/            with logger=wandb: the W&B run's files (offline or synced)

Every file is replaced atomically (written to a temporary file, fsynced, renamed into place): a reader sees
the previous version or the new one, never half of one. Readers tolerate a run in progress (a missing file,
a history line being written) and a run of an older version (a config without newer keys: see
config.with_defaults); they return None (or []) for what is not there or not readable.

The lock: `<run dir>/run.lock` is created with O_CREAT | O_EXCL before anything else is written into the
directory; it holds JSON: pid, host, start time, the process's own start time (Linux: /proc/<pid>/stat), the
SLURM job id and restart count when there is one, and the command. It is removed when the run ends: normally,
after an exception, after SIGINT/SIGTERM/SIGUSR2 (train.py turns those into exceptions and exits) and at
interpreter exit. A second run into a held directory is refused with RunDirInUse, naming the holder, and
writes nothing.

A lock whose holder is gone is stale and taken over, with a log line: a pid of this host that no longer runs
(or now belongs to another process, started later), or an earlier incarnation of the same SLURM job (a
requeued job runs again with the same job id and a higher SLURM_RESTART_COUNT). A lock from another host is
otherwise held: whether that process lives cannot be known from here; the error says so and names the file.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

from . import checkpoint as ckpt
from .errors import OutputError, RunDirInUse, output_error

log = logging.getLogger(__name__)

# ---- the files of a run directory
CONFIG = "config.json"
OVERRIDES = "overrides.yaml"
METRICS = "metrics.json"
HISTORY = "history.jsonl"
CHECKPOINTS = ckpt.DIR
LOG = "train.log"
HYDRA_CONFIG = ".hydra/config.yaml"
HYDRA_OVERRIDES = ".hydra/overrides.yaml"

# metrics.json's `status`
RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED, PRUNED = (
    "running",
    "completed",
    "diverged",
    "interrupted",
    "failed",
    "pruned",  # a tuning trial stopped early by the study's pruner (make compare): final, not a failure
)
STATUSES = (RUNNING, COMPLETED, DIVERGED, INTERRUPTED, FAILED, PRUNED)
ENDED = (COMPLETED, DIVERGED, INTERRUPTED, PRUNED)  # a run that stopped on its own terms: its record is final

# A sweep's folder (above its jobs' run directories): a stopped sweep's marker, so that the jobs not yet started
# do not start (written by the sweep's process or a job that was stopped; removed when the sweep is re-run)
SWEEP_STOPPED = ".sweep-stopped"

# Folders below an outputs tree that hold no runs (the report's own output, benchmarks, W&B's and submitit's)
NOT_RUNS = ("report", "bench", ".submitit", "wandb")


def write_json(path: Path, obj) -> None:
    ckpt.atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=str) + "\n").encode())


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_config(run_dir: str | Path, config: dict) -> None:
    write_json(Path(run_dir) / CONFIG, config)


def write_metrics(run_dir: str | Path, metrics: dict) -> None:
    write_json(Path(run_dir) / METRICS, metrics)


def write_history(run_dir: str | Path, records: list[dict]) -> None:
    ckpt.atomic_write_bytes(Path(run_dir) / HISTORY, "".join(json.dumps(r) + "\n" for r in records).encode())


def write_overrides(run_dir: str | Path, overrides: list[str]) -> None:
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create([str(o) for o in overrides]))
    ckpt.atomic_write_bytes(Path(run_dir) / OVERRIDES, text.encode())


def read_config(run_dir: str | Path, hydra_fallback: bool = False) -> dict | None:
    """config.json; with hydra_fallback, Hydra's .hydra/config.yaml for a run that never got as far."""
    config = _read_json(Path(run_dir) / CONFIG)
    if config is None and hydra_fallback and (Path(run_dir) / HYDRA_CONFIG).is_file():
        import yaml

        try:
            config = yaml.safe_load((Path(run_dir) / HYDRA_CONFIG).read_text())
        except (OSError, yaml.YAMLError):
            config = None
    return config if isinstance(config, dict) else None


def read_metrics(run_dir: str | Path) -> dict | None:
    m = _read_json(Path(run_dir) / METRICS)
    return m if isinstance(m, dict) else None


def metrics_mtime(run_dir: str | Path) -> float:
    try:
        return (Path(run_dir) / METRICS).stat().st_mtime
    except OSError:
        return 0.0


def read_history(run_dir: str | Path) -> list[dict]:
    """The finished epochs' records; a line still being written ends the list (never half a record)."""
    records = []
    try:
        lines = (Path(run_dir) / HISTORY).read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def overrides_file(run_dir: str | Path) -> Path | None:
    """Where a run's overrides are: overrides.yaml (a run under way), else Hydra's copy, else None."""
    for name in (OVERRIDES, HYDRA_OVERRIDES):
        if (Path(run_dir) / name).is_file():
            return Path(run_dir) / name
    return None


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def last_checkpoint(run_dir: str | Path) -> Path:
    return checkpoint_dir(run_dir) / ckpt.LAST


def has_checkpoint(run_dir: str | Path) -> bool:
    last = last_checkpoint(run_dir)
    return last.exists() or ckpt.previous_of(last).exists()


def of_checkpoint(path: str | Path) -> Path:
    """The run directory a checkpoint file (checkpoint.resolve's answer) belongs to."""
    path = Path(path)
    return path.parent.parent if path.parent.name == CHECKPOINTS else path.parent


def holds_run(run_dir: str | Path) -> bool:
    """A directory that a run has written its config into (or Hydra its own)."""
    return (Path(run_dir) / CONFIG).is_file() or (Path(run_dir) / HYDRA_CONFIG).is_file()


def find(root: str | Path) -> list[Path]:
    """Every run directory at or below `root` (sorted), skipping the folders in NOT_RUNS."""
    root = Path(root)
    found = set()
    for marker in (CONFIG, HYDRA_CONFIG):
        for p in root.glob(f"**/{marker}"):
            run_dir = p.parent if marker == CONFIG else p.parent.parent
            if not any(part in NOT_RUNS for part in run_dir.relative_to(root).parts):
                found.add(run_dir)
    if holds_run(root):
        found.add(root)
    return sorted(found)


def mark_sweep_stopped(sweep_dir: str | Path, why: str) -> None:
    try:
        ckpt.atomic_write_bytes(Path(sweep_dir) / SWEEP_STOPPED, (why + "\n").encode())
    except OSError:
        pass  # the jobs then start and are stopped by the signal they get themselves


def sweep_stopped(sweep_dir: str | Path) -> str | None:
    try:
        return (Path(sweep_dir) / SWEEP_STOPPED).read_text().strip() or "stopped"
    except OSError:
        return None


def clear_sweep_stopped(sweep_dir: str | Path) -> None:
    (Path(sweep_dir) / SWEEP_STOPPED).unlink(missing_ok=True)


# A job of a sweep refused its directory (it holds another run: a live one, or one of another config) leaves
# its reason here, in the sweep's folder, never in the job's: the summary then lists it as refused.
REFUSED_DIR = ".refused"


def mark_refused(sweep_dir: str | Path, job_dir: str | Path, why: str) -> None:
    folder = Path(sweep_dir) / REFUSED_DIR
    rel = Path(job_dir).resolve().relative_to(Path(sweep_dir).resolve())
    try:
        folder.mkdir(exist_ok=True)
        write_json(folder / (str(rel).replace("/", "%2F") + ".json"), {"job": str(rel), "why": why})
    except OSError:
        pass  # the job said why on its console already


def refused_jobs(sweep_dir: str | Path) -> dict[str, str]:
    """{job folder (relative to the sweep's): why it was refused} of the sweep's last run."""
    out = {}
    for p in sorted((Path(sweep_dir) / REFUSED_DIR).glob("*.json")):
        rec = _read_json(p) or {}
        if rec.get("job"):
            out[rec["job"]] = str(rec.get("why", ""))
    return out


def clear_refused(sweep_dir: str | Path) -> None:
    for p in (Path(sweep_dir) / REFUSED_DIR).glob("*.json"):
        p.unlink(missing_ok=True)


def find_metrics(root: str | Path) -> list[Path]:
    """Every run directory below `root` with a metrics.json (a sweep's jobs), sorted."""
    return sorted(p.parent for p in Path(root).glob(f"**/{METRICS}"))


# ---- the lock
LOCK_NAME = "run.lock"  # (make compare's own flock file, in its folder, is .lock)
_EMPTY_LOCK_GRACE_S = (
    5.0  # a lock file still empty after this long was left by a process killed as it started
)

_held: dict[str, dict] = {}  # realpath of the run dir → {"path", "token", "note"}
_atexit_registered = False


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _key(run_dir: str | Path) -> str:
    return os.path.realpath(run_dir)


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _read(path: Path) -> dict | None:
    """The lock's content; None while it is being written (or if it is empty or not ours)."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def describe(info: dict) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started_at')}"


def stale_reason(info: dict) -> str | None:
    """Why the holder recorded in `info` is gone, or None if it may still run."""
    here = socket.gethostname()
    pid = info.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:  # no process could hold it
        return f"it is damaged (no valid pid: {json.dumps(info)[:80]})"
    if info.get("host") == here:
        if not ckpt.pid_alive(pid):
            return f"its holder ({describe(info)}) is no longer running"
        started = info.get("pid_start")
        now = process_start(pid)
        if started and now and started != now:
            return f"its holder ({describe(info)}) is no longer running (pid {pid} is another process now)"
        return None
    job = os.environ.get("SLURM_JOB_ID")
    if job and str(info.get("slurm_job_id")) == job:
        try:
            ours = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
            theirs = int(info.get("slurm_restart_count") or 0)
        except ValueError:
            return None
        if ours > theirs:
            return f"its holder ({describe(info)}) was an earlier run of SLURM job {job}, requeued since"
    return None


def _refusal(run_dir: Path, info: dict) -> RunDirInUse:
    lock = lock_path(run_dir)
    if info.get("host") != socket.gethostname():
        return RunDirInUse(
            f"{run_dir} is in use by another run ({describe(info)}, another host: whether it still runs "
            f"cannot be checked from here); wait for it to end or use another hydra.run.dir / hydra.sweep.dir "
            f"(if that run is gone, delete {lock})"
        )
    return RunDirInUse(
        f"{run_dir} is in use by another run ({describe(info)}); wait for it to end or use another "
        "hydra.run.dir / hydra.sweep.dir"
    )


def _remove_if_unchanged(lock: Path, seen: dict | None) -> bool:
    """Remove the stale lock `seen`, unless another process has replaced it meanwhile. Moving it to a private
    name first makes this safe against a second process taking over the same stale lock at the same time."""
    private = lock.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
    try:
        os.rename(lock, private)
    except FileNotFoundError:
        return True  # someone else removed it: try to create ours
    moved = _read(private)
    if seen is not None and (moved is None or moved.get("token") != seen.get("token")):
        # not the lock we judged stale: a live one, taken in between. Put it back.
        try:
            os.link(private, lock)
        except OSError:
            pass
        private.unlink(missing_ok=True)
        return False
    private.unlink(missing_ok=True)
    return True


def check_free(run_dir: str | Path) -> None:
    """RunDirInUse if another live run holds `run_dir`; reads only (a refused run writes nothing)."""
    run_dir = Path(run_dir)
    if holds(run_dir):
        return
    current = _read(lock_path(run_dir))
    if current is not None and stale_reason(current) is None:
        raise _refusal(run_dir, current)


def holds(run_dir: str | Path) -> bool:
    """Whether this process holds the lock of `run_dir`."""
    return _key(run_dir) in _held


def acquire(run_dir: str | Path, log_takeover: bool = True) -> str | None:
    """Take the lock of `run_dir` (creating the directory). Re-entrant within one process. Returns the note
    of a stale lock taken over (also logged, with `log_takeover`), else None. Raises RunDirInUse when another
    run holds it, OSError when it cannot be written."""
    global _atexit_registered
    run_dir = Path(run_dir)
    key = _key(run_dir)
    if key in _held:
        return None
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_path(run_dir)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "pid_start": process_start(os.getpid()),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT"),
        "argv": sys.argv[1:],
        "token": uuid.uuid4().hex,
    }
    data = (json.dumps(info) + "\n").encode()
    note = None
    deadline = time.monotonic() + 10.0
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            current = _read(lock)
            if current is None:  # being written this instant, or left empty by a process killed as it started
                try:
                    age = time.time() - lock.stat().st_mtime
                except FileNotFoundError:
                    continue
                if age < _EMPTY_LOCK_GRACE_S and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                reason = "it is empty or unreadable (left by a process killed as it started)"
            else:
                reason = stale_reason(current)
                if reason is None:
                    raise _refusal(run_dir, current) from None
            if _remove_if_unchanged(lock, current):
                note = f"took over the lock of {run_dir}: {reason}"
            elif time.monotonic() > deadline:
                raise RunDirInUse(f"{run_dir}: could not take its lock {lock} (contended)") from None
            continue
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            lock.unlink(missing_ok=True)
            raise
        os.close(fd)
        break
    _held[key] = {"path": lock, "token": info["token"], "note": note}
    if not _atexit_registered:
        atexit.register(release_all)
        _atexit_registered = True
    if note and log_takeover:
        log.warning("%s", note)
    return note


def take_note(run_dir: str | Path) -> str | None:
    """The takeover note of an acquisition that did not log it (made before logging was set up), once."""
    entry = _held.get(_key(run_dir))
    if not entry:
        return None
    note, entry["note"] = entry["note"], None
    return note


def release(run_dir: str | Path) -> None:
    """Remove the lock of `run_dir` if this process holds it (and it is still the same file)."""
    entry = _held.pop(_key(run_dir), None)
    if entry is None:
        return
    lock = entry["path"]
    current = _read(lock)
    if current is not None and current.get("token") == entry["token"]:
        try:
            lock.unlink()
        except OSError as exc:
            log.warning("could not remove the lock %s: %s", lock, exc)


def release_all() -> None:
    for key in list(_held):
        release(key)


# Less free space than this where a run or sweep is to write, and it does not start: Hydra's own files
# (.hydra/*.yaml, multirun.yaml) would be the first to be cut short.
MIN_FREE_BYTES = 1 << 20


def check_folder(folder: str | Path, what: str) -> None:
    """`folder` is a folder or can be made one: not a regular file, and no file where one of its parents
    should be. Else OutputError, one line naming the setting (`what`) and the file."""
    folder = Path(folder)
    for p in (folder, *folder.parents):
        if p.exists() and not p.is_dir():
            where = "" if p == folder else f" ({p} is a file)"
            raise OutputError(f"{what}={folder} is not a folder{where}: give a folder")
        if p.is_dir():
            return


MIN_FREE_INODES = 64  # a run makes a few dozen files (checkpoints, W&B's, temporaries)


def check_writable(folder: Path, probe: bool = True) -> None:
    """`folder` exists (made here if need be), is writable and has room: else OutputError, one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, folder) from None
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        # files that can still be made (0 files in all: a file system that does not count them)
        inodes = st.f_favail if st.f_files else None
    except OSError:
        free = inodes = None
    if free is not None and free < MIN_FREE_BYTES:
        raise OutputError(f"could not write {folder}: {os.strerror(errno.ENOSPC)} (disk full)")
    if inodes is not None and inodes < MIN_FREE_INODES:
        raise OutputError(
            f"could not write {folder}: {os.strerror(errno.ENOSPC)} (no inodes left: {inodes} free)"
        )
    if probe:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise output_error(exc, folder) from None
