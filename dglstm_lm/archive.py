"""`make compare archive=DIR`: a comparison's records kept outside its folder, and brought back from there.

A comparison runs for many hours, and its folder (outputs/ on a scratch disk, a machine handed back) may not
outlive it. With archive=DIR the comparison keeps, beside its folder, a copy of everything that cannot be
recomputed cheaply and is small enough to commit to a repository:

- the studies (optuna/<model>.journal: every trial, its parameters, its per-epoch reports, its state),
- summary.json, tuning.md, the figures and the report,
- for every run that has ended (completed, pruned, diverged, failed): its record, history, config,
  overrides and log (RUN_FILES, rundir.py's names). Not the checkpoints (tens of MB each) nor W&B's files.

It is written after every batch of the search, every stage, and every ten minutes while a stage runs. When
the command starts on a folder that lacks some of these files (a fresh machine, outputs/ deleted) it copies
them back from DIR first, and continues: the finished trials and runs are not redone, the budget and the
reports count them, and a trial or run that was still going when the copy was made starts again from its
beginning (its checkpoints were not kept). A file present in the folder is never replaced from DIR.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

from . import rundir

RUN_FILES = (rundir.METRICS, rundir.HISTORY, rundir.CONFIG, rundir.OVERRIDES, rundir.LOG)
# the runs kept: those whose record is final and will not be trained again (not running, not interrupted)
KEPT = (rundir.COMPLETED, rundir.PRUNED, rundir.DIVERGED, rundir.FAILED)
RUN_STAGES = ("search", "unpruned", "final")
TOP_FILES = ("*.json", "*.md", "*.png", "*.csv")
MAX_FILE_BYTES = 5 * 2**20  # a guard: nothing this big belongs in the archive


def _status(run: Path) -> str | None:
    return (rundir.read_metrics(run) or {}).get("status")


def records(folder: Path) -> Iterator[Path]:
    """The files of `folder` that the archive keeps, relative to it."""
    folder = Path(folder)
    for pattern in TOP_FILES:
        for f in sorted(folder.glob(pattern)):
            if f.is_file():
                yield f.relative_to(folder)
    for f in sorted((folder / "optuna").glob("*.journal")):
        yield f.relative_to(folder)
    for f in sorted((folder / "report").glob("*")):
        if f.is_file():
            yield f.relative_to(folder)
    for stage in RUN_STAGES:
        for metrics in sorted((folder / stage).glob(f"*/*/{rundir.METRICS}")):
            run = metrics.parent
            if _status(run) in KEPT:
                for name in RUN_FILES:
                    if (run / name).is_file():
                        yield (run / name).relative_to(folder)


def _content(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix in (".journal", ".jsonl") and not data.endswith(b"\n"):
        # appended to while being read: up to its last whole line (a torn line would not parse)
        data = data[: data.rfind(b"\n") + 1]
    return data


def keep(folder: Path, archive: Path) -> int:
    """Copy `folder`'s records into `archive` where they differ; the number of files written."""
    from .checkpoint import atomic_write_bytes

    written = 0
    for rel in records(folder):
        src, dst = Path(folder) / rel, Path(archive) / rel
        try:
            if src.stat().st_size > MAX_FILE_BYTES:
                continue
            data = _content(src)
        except OSError:  # gone meanwhile (a run folder moved away)
            continue
        try:
            if dst.read_bytes() == data:
                continue
        except OSError:
            pass
        atomic_write_bytes(dst, data)
        written += 1
    return written


def restore(archive: Path, folder: Path) -> int:
    """Copy into `folder` the archive's files that `folder` lacks (none is replaced); the number copied."""
    from .checkpoint import atomic_write_bytes

    archive, folder = Path(archive), Path(folder)
    if not archive.is_dir():
        return 0
    copied = 0
    wanted = list(records(archive))
    held = {rel.parent for rel in wanted if rel.parts[0] in RUN_STAGES and (folder / rel.parent).exists()}
    for rel in wanted:
        dst = folder / rel
        if dst.exists() or rel.parent in held:
            continue  # a run the folder holds is the folder's, whatever its state: none of it is replaced
        atomic_write_bytes(dst, (archive / rel).read_bytes())
        copied += 1
    return copied


class Keeper:
    """keep() now, and every `every_s` seconds from a thread until stop()."""

    def __init__(self, folder: Path, archive: Path, every_s: float = 600.0):
        self.folder, self.archive, self.every_s = Path(folder), Path(archive), every_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def keep(self) -> int:
        with self._lock:
            return keep(self.folder, self.archive)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.keep()
            except OSError:
                pass  # tried again at the next save point; the comparison itself goes on

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="archive", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
