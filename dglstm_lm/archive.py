"""`make compare archive=DIR`: a comparison's records kept outside its folder, and brought back from there.

A comparison runs for many hours, and its folder (outputs/ on a scratch disk, a machine handed back) may not
outlive it. With archive=DIR the comparison keeps a copy in DIR of everything that cannot be recomputed
cheaply and is small enough to commit to a repository:

- for every run that has ended (completed, pruned, diverged, failed): its record, history, config,
  overrides and log (RUN_FILES, rundir.py's names). Not the checkpoints (tens of MB each) nor W&B's files;
- the report (its tables and figures), the studies (optuna/<model>.journal: every trial, its parameters,
  its per-epoch reports, its state), then summary.json, tuning.md and the figures at the top.

It is written in that order (a copy cut short never holds a finished trial without its run's record) after
every batch of the search, every stage, and every ten minutes while a stage runs; a failure to write it is
a warning, not the end of the comparison. An archive holds one comparison: a comparison of other settings
is refused it, and one comparison at a time writes it (DIR/.lock). When the command starts on a folder that
lacks some of these files (a fresh machine, outputs/ deleted) it copies them back from DIR first, each run
whole or not at all, and continues: the finished trials and runs are not redone, the budget and the reports
count them, and a trial or run that was still going when the copy was made starts again from its beginning
(its checkpoints were not kept). A file or run folder present in the folder is never replaced from DIR; the
folder's records always replace DIR's.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from . import rundir

RUN_FILES = (rundir.METRICS, rundir.HISTORY, rundir.CONFIG, rundir.OVERRIDES, rundir.LOG)
# the runs kept: those whose record is final and will not be trained again (not running, not interrupted)
KEPT = (rundir.COMPLETED, rundir.PRUNED, rundir.DIVERGED, rundir.FAILED)
RUN_STAGES = ("search", "unpruned", "final")
TOP_FILES = ("*.json", "*.md", "*.png", "*.csv")


def _status(run: Path) -> str | None:
    return (rundir.read_metrics(run) or {}).get("status")


def _runs(folder: Path) -> Iterator[Path]:
    """The run folders of `folder` whose records are kept (relative to it)."""
    for stage in RUN_STAGES:
        for metrics in sorted((folder / stage).glob(f"*/*/{rundir.METRICS}")):
            if _status(metrics.parent) in KEPT:
                yield metrics.parent.relative_to(folder)


def records(folder: Path) -> Iterator[Path]:
    """The files of `folder` that the archive keeps, relative to it, in the order they are written: the runs'
    records, the report, the studies, then summary.json and the other files at the top. A copy cut short thus
    never holds a study whose finished trial has no record, and summary.json comes last."""
    folder = Path(folder)
    for run in _runs(folder):
        for name in RUN_FILES:
            if (folder / run / name).is_file():
                yield run / name
    for f in sorted((folder / "report").rglob("*")):  # report.md, .csv, .tex, figures/*.png
        # not W&B's run folder (wandb/) nor its cache (.wandb-cache/), which the report's W&B run writes
        parts = f.relative_to(folder / "report").parts
        if f.is_file() and not any(p.startswith(".") or p == "wandb" for p in parts):
            yield f.relative_to(folder)
    for f in sorted((folder / "optuna").glob("*.journal")):
        yield f.relative_to(folder)
    top = sorted({f for pattern in TOP_FILES for f in folder.glob(pattern) if f.is_file()})
    for f in sorted(top, key=lambda f: f.name == "summary.json"):
        yield f.relative_to(folder)


def _content(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix in (".journal", ".jsonl") and not data.endswith(b"\n"):
        # appended to while being read: up to its last whole line (a torn line would not parse)
        data = data[: data.rfind(b"\n") + 1]
    return data


def keep(folder: Path, archive: Path) -> int:
    """Copy `folder`'s records into `archive` where they differ; the number of files written.

    The studies are read first and written after the runs' records: a trial that ends meanwhile is then at
    worst kept as finished in its run's record and still running in its study, which the comparison mends
    when it runs the trial again (the run, complete, trains nothing and tells its study)."""
    from .checkpoint import atomic_write_bytes

    folder, archive = Path(folder), Path(archive)
    studies = {}
    for f in sorted((folder / "optuna").glob("*.journal")):
        try:
            studies[f.relative_to(folder)] = _content(f)
        except OSError:
            pass
    written = 0
    for rel in records(folder):
        try:
            data = studies[rel] if rel in studies else _content(folder / rel)
        except (OSError, KeyError):  # gone meanwhile (a run folder moved away)
            continue
        try:
            if (archive / rel).read_bytes() == data:
                continue
        except OSError:
            pass
        atomic_write_bytes(archive / rel, data)
        written += 1
    return written


def settings_of(archive: Path) -> dict | None:
    """The settings of the comparison an archive holds (its summary.json's), if any."""
    import json

    try:
        return json.loads((Path(archive) / "summary.json").read_text()).get("settings")
    except (OSError, ValueError, AttributeError):
        return None


def restore(archive: Path, folder: Path) -> int:
    """Copy into `folder` the archive's files that `folder` lacks (none is replaced); the number copied.
    A run comes back whole or not at all (its files gathered in a temporary folder, then renamed into
    place), the runs before the studies, summary.json last; a run folder that `folder` holds, in whatever
    state, is left as it is."""
    import shutil

    from .checkpoint import atomic_write_bytes

    archive, folder = Path(archive), Path(folder)
    if not archive.is_dir():
        return 0
    copied = 0
    for run in _runs(archive):
        dst = folder / run
        if dst.exists():
            continue
        tmp = dst.with_name(f".{dst.name}.restore-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        names = [n for n in RUN_FILES if (archive / run / n).is_file()]
        for name in names:
            shutil.copyfile(archive / run / name, tmp / name)
        tmp.rename(dst)
        copied += len(names)
    for rel in records(archive):
        if rel.parts[0] in RUN_STAGES or (folder / rel).exists():
            continue
        atomic_write_bytes(folder / rel, (archive / rel).read_bytes())
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
        """keep(); a failure (a full disk, a folder made read-only) is one line on stderr, not the end of a
        comparison of many hours: the next save point tries again."""
        with self._lock:
            try:
                return keep(self.folder, self.archive)
            except OSError as exc:
                print(
                    f"compare: warning: could not keep the records in {self.archive}: {exc}", file=sys.stderr
                )
                return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.keep()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="archive", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
