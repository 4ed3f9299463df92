"""`make runs [dir=outputs]`: every run below a folder, one line each, newest first — where it is, its status,
the overrides it was started with, epochs done, its best validation perplexity (and the test perplexity of a
completed run) and the data it read: "the 650 run" found without opening every run folder.

    make runs                              # everything under outputs/
    make runs dir=outputs/multirun/...     # one sweep
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from . import rundir
from .errors import ArgumentParser, UserError, cli

# overrides that say where and how a run was watched, not what it is
_QUIET = ("paths.", "logger", "trainer.progress", "hydra.", "trainer.threads", "data.dir")


def _overrides(run_dir: Path) -> list[str]:
    path = rundir.overrides_file(run_dir)
    if path is None:
        return []
    try:
        items = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in items if not str(o).lstrip("+~").startswith(_QUIET)]


def _data(metrics: dict) -> str:
    d = metrics.get("data") or {}
    if not d.get("digest"):
        return "?"
    return "PTB" if d.get("ptb") else f"{d.get('source', '?')} ({d['digest'][:8]})"


def _num(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def rows(root: Path) -> list[dict]:
    """One record per run below `root`, newest first (by the time its record was last written)."""
    out = []
    for run_dir in rundir.find(root):
        m = rundir.read_metrics(run_dir) or {}
        out.append(
            {
                "run": run_dir,
                "status": m.get("status", "not started"),
                "overrides": " ".join(_overrides(run_dir)) or "(defaults)",
                "epochs": f"{m.get('epochs_completed', 0)}/{m.get('max_epochs', '?')}",
                "val": m.get("val/ppl"),
                "test": m.get("test/ppl"),
                "data": _data(m),
                "updated": m.get("updated_at") or "",
            }
        )
    out.sort(key=lambda r: (r["updated"], str(r["run"])), reverse=True)
    return out


def render(records: list[dict], root: Path) -> str:
    head = ("run", "status", "epochs", "best val", "test", "data", "overrides")
    lines = [
        (
            str(r["run"].relative_to(root)) if r["run"] != root else ".",
            r["status"],
            r["epochs"],
            _num(r["val"]),
            _num(r["test"]),
            r["data"],
            r["overrides"],
        )
        for r in records
    ]
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(head[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*row) for row in [head, *lines])


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="make runs", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="outputs", help="a folder of runs (default outputs/)")
    args = p.parse_args(argv)
    root = Path(args.dir)
    if not root.exists():
        raise UserError(f"{root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder of runs")
    records = rows(root)
    if not records:
        print(f"no runs under {root}")
        return 0
    print(render(records, root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
