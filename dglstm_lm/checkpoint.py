"""Checkpoints as plain data, written atomically, verified on load.

A checkpoint is a dict of state_dicts, counters, RNG states, the resolved config and the W&B run id, saved
with torch.save (so `torch.load(path, weights_only=True)` reads it anywhere). It carries a SHA-256 digest of
its own contents (`digest`), so a truncated or corrupted file is detected on load, not trusted.

Writing: serialise to memory, write a temporary file in the same folder, fsync, then rename over the old
file. The file it replaces is first hard-linked to `<name>-previous.pt`, so at every instant `last.pt` is
a complete checkpoint and the one before it is kept as a fall-back. A full disk or an unwritable folder
raises CheckpointError and leaves both untouched.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import faults
from .errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "dglstm-lm/1"
DIR = "checkpoints"  # a run directory's checkpoints/ (dglstm_lm/rundir.py shows the whole layout)
LAST, BEST = "last.pt", "best.pt"

# What the code reads from a checkpoint: to build the model and evaluate or sample (MODEL_KEYS), and to
# resume training (RESUME_KEYS). A checkpoint that loads but lacks one is refused on load, naming it.
MODEL_KEYS = ("model", "config", "vocab", "epoch", "step")
RESUME_KEYS = (
    *MODEL_KEYS,
    "optimizer",
    "scheduler",
    "batch",
    "hidden",
    "epoch_sums",
    "best_val",
    "best_epoch",
    "history",
    "wall_s",
    "train_time",
    "rng",
)
_KEY_TYPES = {"model": dict, "config": dict, "vocab": list, "optimizer": dict, "history": list}


def previous_of(path: Path) -> Path:
    return path.with_name(f"{path.stem}-previous{path.suffix}")


def _digest(obj: Any, h) -> None:
    """Feed a canonical serialisation of plain data (dicts sorted by key) into hash h."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for key in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            h.update(repr(key).encode())
            _digest(obj[key], h)
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for item in obj:
            _digest(item, h)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(state: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "digest"}, h)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy_file(src: Path, dst: Path) -> None:
    """dst becomes src's content: a hard link (no copy; files here are never modified in place) or, where the
    file system has no hard links, a copy."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT):
            raise
        shutil.copyfile(src, dst)


def _replace_with(src: Path, dst: Path) -> None:
    """Atomically make dst a link to (or copy of) src, through a temporary name."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already the same file (rename() between two links to one file would do nothing)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    _link_or_copy_file(src, tmp)
    try:
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes, fault_point: str | None = None, also=()) -> None:
    """Write `data` to `path` through a temporary file and a rename; on failure `path` is untouched.
    Each path in `also` is made to point at the new content before `path` is replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            half = len(data) // 2
            f.write(data[:half])
            if fault_point:
                faults.point(fault_point)
            f.write(data[half:])
            f.flush()
            os.fsync(f.fileno())
        for other in also:
            _replace_with(tmp, Path(other))
        if also and fault_point:
            faults.point(f"{fault_point}_linked")
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None:
            exc.filename = str(path)  # a failed write() names no file: say which one
        raise
    _fsync_dir(path.parent)


def save(state: dict, path: Path, keep_previous: bool = True, also=()) -> None:
    """Save `state` atomically at `path` (see the module docstring); `also` (e.g. best.pt) get the same file."""
    path = Path(path)
    state = dict(state, format=FORMAT)
    state["digest"] = digest(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    had_one = path.exists() or previous_of(path).exists()
    try:
        if keep_previous and path.exists():
            _replace_with(path, previous_of(path))
        atomic_write_bytes(path, buf.getbuffer(), fault_point="checkpoint_write", also=also)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        hint = " (disk full)" if exc.errno == errno.ENOSPC else ""
        # what is left: the checkpoint before this one, or (the first save) nothing at all
        left = "the previous checkpoint is intact" if had_one else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}{hint}; {left}") from None


def load(path: Path, map_location="cpu", require=()) -> dict:
    """Load and verify a checkpoint; a missing, truncated or corrupted file is a CheckpointError, and so is
    one without every key in `require` (e.g. MODEL_KEYS)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is unreadable (truncated or corrupt: {_load_reason(exc)})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dglstm-lm checkpoint")
    if state.get("digest") != digest(state):
        raise CheckpointError(f"checkpoint {path} failed its checksum (corrupted)")
    check_keys(state, require, path)
    return state


def check_keys(state: dict, keys, path) -> None:
    """CheckpointError, naming them, if `state` lacks any of `keys` (or holds one of the wrong kind)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(repr(k) for k in missing)}, which this version of dglstm-lm "
            "needs (written by another version, or edited)"
        )
    wrong = [k for k in keys if k in _KEY_TYPES and not isinstance(state[k], _KEY_TYPES[k])]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"checkpoint {path}: {k!r} is a {type(state[k]).__name__}, not a {_KEY_TYPES[k].__name__}"
        )


def _load_reason(exc: Exception) -> str:
    """torch.load's failure in a few words: its first line, cut at a word (its unpickler's advice on
    weights_only, which does not apply to a file that is no checkpoint, left out)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if not first or first.startswith("Weights only load failed") or isinstance(exc, KeyError):
        return f"not a PyTorch checkpoint ({type(exc).__name__})"
    return first if len(first) <= 120 else first[:120].rsplit(" ", 1)[0] + " ..."


def resolve(target: str | Path, prefer: str = LAST) -> Path:
    """A checkpoint file, or a run directory (→ its checkpoints/<prefer>, else checkpoints/last.pt); a
    folder with neither is refused in one line."""
    p = Path(target).expanduser()
    if p.is_dir():
        if (p / DIR / prefer).is_file():
            return p / DIR / prefer
        if not (p / DIR / LAST).is_file() and not previous_of(p / DIR / LAST).is_file():
            raise CheckpointError(
                f"{p} is a folder without {DIR}/{prefer} or {DIR}/{LAST}: not a run's folder"
            )
        return p / DIR / LAST  # (or, where it was lost, the previous one that load_for_resume falls back to)
    return p


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of a writer that was killed (never renamed into place) are garbage."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp-*"):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not pid_alive(pid):
                p.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one another user owns counts; a bad id does not)."""
    if pid <= 0:  # kill(0, ...) and kill(-1, ...) address groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def load_for_resume(target: str | Path) -> tuple[Path, dict]:
    """Load the checkpoint to resume from, falling back to <name>-previous.pt if the newest is unreadable."""
    path = resolve(target)
    try:
        return path, load(path)
    except CheckpointError as first:
        prev = previous_of(path)
        if not prev.is_file():
            raise
        try:
            state = load(prev)
        except CheckpointError:
            raise first from None
        # Set the damaged file aside, so that the next save does not keep it as "previous" over the good one.
        quarantine = path.with_name(f"{path.stem}.corrupt-{int(time.time())}{path.suffix}")
        try:
            os.replace(path, quarantine)
        except OSError:
            quarantine = path
        log.warning(
            "%s; falling back to the previous checkpoint %s (epoch %s, step %s)%s",
            first,
            prev,
            state["epoch"],
            state["step"],
            f"; the damaged file is kept as {quarantine.name}" if quarantine != path else "",
        )
        _repair_best(path.with_name(BEST), prev, state)
        return prev, state


def _repair_best(best: Path, prev: Path, state: dict) -> None:
    """best.pt may be a link to the file that was damaged (or gone with it). If the checkpoint resumed from
    was written at the end of the best epoch, it holds the best weights: best.pt becomes it. Otherwise those
    weights are lost: the best so far is forgotten and the remaining epochs choose it anew (said in the log).
    A kill after forgetting changes nothing: the next resume finds best.pt missing and forgets again."""
    best_epoch = state.get("best_epoch", -1)
    if best_epoch is None or best_epoch < 0:
        return  # no best yet
    if best.exists():
        try:
            load(best)
            return
        except CheckpointError as exc:
            problem = str(exc)
    else:
        problem = f"{best} is missing"
    try:
        if state.get("batch") == 0 and best_epoch == state.get("epoch", 0) - 1:
            _replace_with(prev, best)
            log.warning("%s; %s holds the same best epoch and replaces it", problem, prev.name)
            return
        best.unlink(missing_ok=True)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CheckpointError(f"could not repair {best}: {reason}") from None
    state["best_val"], state["best_epoch"] = float("inf"), -1
    log.warning(
        "%s; the best epoch's weights are lost with it: the best of the remaining epochs will be tested",
        problem,
    )
