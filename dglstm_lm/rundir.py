"""One run per run directory: a lock file that a run holds for as long as it writes there.

`<run dir>/run.lock` is created with O_CREAT | O_EXCL before anything else is written into the directory; it
holds JSON: pid, host, start time, the process's own start time (Linux: /proc/<pid>/stat), the SLURM job id and
restart count when there is one, and the command. It is removed when the run ends: normally, after an
exception, after SIGINT/SIGTERM/SIGUSR2 (train.py turns those into exceptions and exits) and at interpreter
exit. A second run into a held directory is refused with RunDirInUse, naming the holder, and writes nothing.

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

from .errors import OutputError, RunDirInUse, output_error

log = logging.getLogger(__name__)

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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


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
    if info.get("host") == here and isinstance(pid, int):
        if not pid_alive(pid):
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


def check_writable(folder: Path, probe: bool = True) -> None:
    """`folder` exists (made here if need be), is writable and has room: else OutputError, one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, folder) from None
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if free is not None and free < MIN_FREE_BYTES:
        raise OutputError(f"could not write {folder}: {os.strerror(errno.ENOSPC)} (disk full)")
    if probe:
        try:
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            raise output_error(exc, folder) from None
