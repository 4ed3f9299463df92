"""`make report [dir=<run or sweep dir>] [baseline=<row>]`: perplexity tables and figures from the runs under outputs/.

Reads every run directory (rundir.find: one holding a run's config, or Hydra's) and writes outputs/report/:
report.md, report.csv and figures/*.png, and logs the same table and figures to a W&B report run (offline
by default). Runs are grouped by their resolved config minus the seed and output-only keys:

- a *table* per recipe and data (same `name`, same data section): rows are the model variants;
- a *row* per distinct config: its seeds are aggregated (mean ± std, n = distinct seeds; a seed run more
  than once counts once, by its latest completed run), and when the rows of a table differ in more than the
  model, the table says in which keys;
- a *baseline* row per table (`--baseline`; default the stacked LSTM): every other row gets its difference
  from it with a 95% confidence interval and a p-value (paired t-test by seed when both rows have the same
  seeds, Welch's t-test otherwise; scipy.stats);
- runs that failed, diverged or have not finished are listed apart, with their reason; runs in progress
  (running or interrupted, with a finished epoch) with their epochs and best valid perplexity so far, their
  curves in their table's figure (dashed), or in one of their own while their recipe has no completed run;
- the figures (report_figures.py) replace those of the previous report: figures/ holds no stale ones.

Files are only read (each one is replaced atomically by its writer), so a report can run beside live runs.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import functools
import io
import json
import logging
import math
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from scipy import stats

from . import rundir
from .checkpoint import atomic_write_bytes
from .config import MODEL_NAMES, flatten, with_defaults
from .errors import ArgumentParser, UserError, cli
from .report_figures import make_figures, remove_stale, val_curve
from .report_latex import render_latex

log = logging.getLogger(__name__)

# Keys that say where or how a run was executed, not what it computed.
OUTPUT_ONLY = (
    "seed",
    "paths",
    "logger",
    "tags",
    "optimized_metric",
    "tune",
    "trainer.resume",
    "trainer.auto_resume",
    "trainer.progress",
    "trainer.device",
    "trainer.threads",
    "trainer.checkpoint_every_min",
    "trainer.checkpoint_every_steps",
    "trainer.diverge_threshold",  # a stop condition: it changes nothing in a run that completed
    "model.backend",
    "data.dir",
    "data.root",
    "data.download",
    "data.sources",
    "data.hub_url",
    "data.raw_url",
    "data.verify_checksums",
)

# Published PTB results (word level, Mikolov's files), per recipe: (label, params, valid, test); the papers
# give no parameter counts.
PUBLISHED = {
    "zaremba_small": [
        ("Zaremba et al. 2014, small (published)", None, 120.7, 114.5),
        ("TensorFlow PTB tutorial, small (published)", None, None, 115.91),
    ],
    "zaremba_medium": [
        ("Zaremba et al. 2014, medium (published)", None, 86.2, 82.7),
        ("TensorFlow PTB tutorial, medium (published)", None, None, 82.07),
    ],
    "zaremba_large": [
        ("Zaremba et al. 2014, large (published)", None, 82.2, 78.4),
        ("TensorFlow PTB tutorial, large (published)", None, None, 78.29),
    ],
}


# Keys that stand for the data a run read: replaced by its data identity (`Run.data`), which a run records
# from the files it read (an unverified run's config holds no sums; older runs' PTB sums were not checked).
DATA_KEYS = ("data.sha256",)


def _output_only(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in (*OUTPUT_ONLY, *DATA_KEYS))


@dataclass(frozen=True)
class DataIdentity:
    """Which data a run trained and was evaluated on: `digest` is the corpus digest of the SHA-256 of the
    three files it read (data.corpus_digest), so it is PTB's exactly when the files are PTB's."""

    digest: str
    source: str

    @property
    def ptb(self) -> bool:
        return self.digest == _ptb_digest()

    @property
    def heading(self) -> str:
        if self.ptb:
            return "PTB, verified"
        return f"{self.source}, digest {self.digest[:8]}, not PTB"


@functools.cache
def _ptb_digest() -> str:
    from .config import PTB_SHA256
    from .data import FILES, SPLITS, corpus_digest

    return corpus_digest({s: PTB_SHA256[FILES[s]] for s in SPLITS})


@dataclass
class Run:
    path: Path
    config: dict  # flattened
    metrics: dict | None
    history: list[dict]

    @property
    def tokens_per_s(self) -> float | None:
        """Training throughput as the median of its epochs' (the run's history): an epoch slowed or paused
        by other work on the machine moves it little, where the run's total (its metrics: tokens over every
        second the loop took, pauses included) would carry it; the total where no epoch recorded one."""
        epochs = [h.get("train/tokens_per_s") for h in self.history]
        epochs = [v for v in epochs if _finite(v)]
        if epochs:
            return statistics.median(epochs)
        return (self.metrics or {}).get("train/tokens_per_s")

    @property
    def status(self) -> str:
        if self.metrics is None:
            return "not started"
        return self.metrics.get("status", "unknown")

    @property
    def data(self) -> DataIdentity:
        """The run's data: as its record (rundir.METRICS) holds it; for a run from before that record, PTB when its
        checksums were verified against PTB's (then it read exactly those files), else its folder."""
        d = (self.metrics or {}).get("data") or {}
        if d.get("digest"):
            return DataIdentity(d["digest"], str(d.get("source", "?")))
        from .config import PTB_SHA256

        where = str(self.config.get("data.dir") or "?")
        prefix = "data.sha256."  # flattened: one key per file
        sums = {k[len(prefix) :]: v for k, v in self.config.items() if k.startswith(prefix)}
        if self.config.get("data.verify_checksums", True) and sums == PTB_SHA256:
            return DataIdentity(_ptb_digest(), where)
        return DataIdentity("unknown:" + where, where)

    @property
    def identity(self) -> tuple:
        return (
            ("data", self.data.digest),
            *sorted((k, json.dumps(v)) for k, v in self.config.items() if not _output_only(k)),
        )

    @property
    def table_key(self) -> tuple:
        return (
            self.config.get("name"),
            ("data", self.data.digest),
            *sorted(
                (k, json.dumps(v))
                for k, v in self.config.items()
                if k.startswith("data.") and not _output_only(k)
            ),
        )


def load_run(path: Path) -> Run | None:
    config = rundir.read_config(path, hydra_fallback=True)
    if config is None:
        return None
    return Run(path, flatten(with_defaults(config)), rundir.read_metrics(path), rundir.read_history(path))


def find_runs(root: Path) -> list[Run]:
    if not root.exists():
        raise UserError(f"{root} does not exist")
    return [r for r in (load_run(p) for p in rundir.find(root)) if r is not None]


# ------------------------------------------------------------------------------------------ aggregation
CONFIDENCE = 0.95
DEPTH_KEY = "model.num_layers"  # rows that differ in it are compared at their own depth, and drawn by it
METRICS = (("val", "val/ppl"), ("test", "test/ppl"))


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if _finite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _seed_order(seed) -> tuple:
    """Seeds sort as numbers where they are numbers (1 2 11, not 1 11 2), anything else after them."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return (0, seed, "")
    return (1, 0, str(seed))


def _finished_at(run: Run) -> tuple:
    """When a run last wrote its metrics (`updated_at`, else the file's mtime), to find the latest one."""
    mtime = rundir.metrics_mtime(run.path)
    try:
        stamp = _dt.datetime.fromisoformat(str(run.metrics.get("updated_at"))).timestamp()
    except (TypeError, ValueError):
        stamp = mtime
    return (stamp, mtime, str(run.path))


def one_run_per_seed(runs: list[Run]) -> tuple[list[Run], dict]:
    """A seed counts once: of the completed runs of one seed the latest is kept. Returns the kept runs (by
    seed) and {seed: [the runs of that seed, latest first]} for the seeds run more than once."""
    by_seed: dict = {}
    for r in runs:
        by_seed.setdefault(r.config.get("seed"), []).append(r)
    kept, repeats = [], {}
    for seed in sorted(by_seed, key=_seed_order):
        latest_first = sorted(by_seed[seed], key=_finished_at, reverse=True)
        kept.append(latest_first[0])
        if len(latest_first) > 1:
            repeats[seed] = latest_first
    return kept, repeats


def mean_ci(values: list[float]) -> tuple[float, float] | None:
    """The 95% t-interval of the mean (None below two values)."""
    values = [v for v in values if _finite(v)]
    if len(values) < 2:
        return None
    with _quiet():
        ci = stats.ttest_1samp(values, 0.0).confidence_interval(CONFIDENCE)
    return (float(ci.low), float(ci.high)) if math.isfinite(ci.low) and math.isfinite(ci.high) else None


@contextlib.contextmanager
def _quiet():
    """Zero variance makes scipy warn and answer nan; the nan is the answer (shown as —)."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@dataclass
class Diff:
    """row − baseline of one metric: the difference of the means, its 95% CI, the p-value, and the test."""

    delta: float | None = None
    low: float | None = None
    high: float | None = None
    p: float | None = None
    method: str = ""  # "paired", "Welch", "n too small"; "" for no comparison


def compare(row: dict, base: dict) -> Diff:
    """Compare {seed: value} of a row with the baseline's: a paired t-test by seed when both have exactly the
    same seeds, Welch's t-test otherwise; below two values on either side (or two pairs) no test."""
    if not row or not base:
        return Diff()
    delta = statistics.fmean(row.values()) - statistics.fmean(base.values())
    paired = set(row) == set(base)
    if len(row) < 2 or len(base) < 2:
        return Diff(delta, method="n too small")
    with _quiet():
        if paired:
            seeds = sorted(row, key=_seed_order)
            res = stats.ttest_rel([row[s] for s in seeds], [base[s] for s in seeds])
        else:
            res = stats.ttest_ind(list(row.values()), list(base.values()), equal_var=False)
        ci = res.confidence_interval(CONFIDENCE)
    low, high, p = (float(x) if math.isfinite(x) else None for x in (ci.low, ci.high, res.pvalue))
    return Diff(delta, low, high, p, "paired" if paired else "Welch")


@dataclass
class Row:
    label: str
    model: str
    runs: list[Run]  # one per seed (the latest completed run of it), by seed
    published: bool = False
    pub_values: dict = field(default_factory=dict)
    repeats: dict = field(default_factory=dict)  # seed -> its completed runs, latest (the one used) first
    variant: str = (
        ""  # the label without the depth (model.num_layers): the rows of one line of a depth figure
    )

    @property
    def depth(self):
        return self.runs[0].config.get(DEPTH_KEY) if self.runs else None

    def stat(self, key: str):
        return _mean_std([r.metrics.get(key) for r in self.runs])

    def by_seed(self, key: str) -> dict:
        return {r.config.get("seed"): r.metrics[key] for r in self.runs if _finite(r.metrics.get(key))}

    @property
    def n(self) -> int:
        return len(self.runs)

    def values(self) -> dict:
        if self.published:
            return self.pub_values
        params = self.runs[0].metrics.get("num_params")
        val_m, val_s = self.stat("val/ppl")
        test_m, test_s = self.stat("test/ppl")
        tps, _ = _mean_std([r.tokens_per_s for r in self.runs])
        wall, _ = self.stat("wall_s")
        epochs, _ = self.stat("epochs_completed")
        return {
            "params": params,
            "epochs": epochs,
            "val_mean": val_m,
            "val_std": val_s,
            "val_ci": mean_ci(list(self.by_seed("val/ppl").values())),
            "test_mean": test_m,
            "test_std": test_s,
            "test_ci": mean_ci(list(self.by_seed("test/ppl").values())),
            "n": self.n,
            "n_runs": self.n + sum(len(rs) - 1 for rs in self.repeats.values()),
            "repeats": {seed: len(rs) for seed, rs in self.repeats.items()},
            "tokens_per_s": tps,
            "wall_s": wall,
            "seeds": [r.config.get("seed") for r in self.runs],
        }


@dataclass
class Table:
    name: str
    data: str
    rows: list[Row]
    differing_keys: list[str]
    baseline: Row | None = None
    baseline_note: str = ""  # how the baseline was chosen, when not as asked
    key: tuple = ()  # the runs' table_key
    # when the rows differ in depth: the baseline's variant at each depth (each row is compared at its own)
    baselines: dict = field(default_factory=dict)

    @property
    def by_depth(self) -> bool:
        """A depth sweep: some variant of the table was run at two depths or more (models of different depths,
        such as lstm and stacked_lstm, are not one)."""
        if DEPTH_KEY not in self.differing_keys:
            return False
        depths: dict[str, set] = {}
        for r in self.rows:
            if not r.published:
                depths.setdefault(r.variant, set()).add(r.depth)
        return any(len(d) > 1 for d in depths.values())

    def baseline_for(self, row: Row) -> Row | None:
        return self.baselines.get(row.depth) if self.by_depth else self.baseline

    def diff(self, row: Row, metric: str) -> Diff:
        base = self.baseline_for(row)
        if base is None or row is base or row.published:
            return Diff()
        return compare(row.by_seed(metric), base.by_seed(metric))


def _matches(row: Row, wanted: str) -> bool:
    return not row.published and wanted in (row.label, row.model)


BASELINES_SHOWN = 6  # rows an unknown baseline's error names (a one-line error of 3,858 characters was seen)


def choose_baselines(tables: list[Table], wanted: str | None = None) -> None:
    """Name each table's baseline row: `wanted` (a row label, else the first row of that model), where the
    table has it; else the stacked LSTM row, else the first row. A `wanted` no table has is an error."""
    if wanted is not None and tables and not any(_matches(r, wanted) for t in tables for r in t.rows):
        rows = [
            (f"{t.name}: " if len(tables) > 1 else "") + f"'{r.label}'"
            for t in tables
            for r in t.rows
            if not r.published
        ]
        shown = ", ".join(rows[:BASELINES_SHOWN]) + (
            f" and {len(rows) - BASELINES_SHOWN} more (see report.md)" if len(rows) > BASELINES_SHOWN else ""
        )
        raise UserError(f"unknown baseline '{wanted}'; the rows are: {shown}")
    for t in tables:
        ours = [r for r in t.rows if not r.published]
        chosen = None
        if wanted is not None:
            chosen = next((r for r in ours if r.label == wanted), None) or next(
                (r for r in ours if r.model == wanted), None
            )
            if chosen is None:
                t.baseline_note = f"`{wanted}` is not a row of this table"
        chosen = (
            chosen or next((r for r in ours if r.model == "stacked_lstm"), None) or next(iter(ours), None)
        )
        t.baseline = chosen
        if chosen is not None and t.by_depth:  # the same variant at every depth it was run at
            t.baselines = {r.depth: r for r in ours if r.variant == chosen.variant}


def distinguishing_keys(configs: list[dict]) -> tuple[list[list[str]], list[str]]:
    """What tells the rows of one table apart, beyond the model name.

    A key every row has and that varies (say `trainer.lr`) is shown on every row; a model's own option
    (`model.peephole` exists for the DGLSTM only) is shown only where it varies between rows of that same
    model, since the model name already says the other rows do not have it. Returns the keys to show per
    row and their union in order.
    """
    common = set.intersection(*(set(c) for c in configs)) if configs else set()
    across = {k for k in common if k != "model.name" and len({c[k] for c in configs}) > 1}
    by_model: dict[str, list[dict]] = {}
    for c in configs:
        by_model.setdefault(c.get("model.name", "?"), []).append(c)
    within = {
        name: {
            k
            for k in set().union(*(set(c) for c in group))
            if k not in common and len({c.get(k, "<absent>") for c in group}) > 1
        }
        for name, group in by_model.items()
    }
    per_row = [sorted(across | within[c.get("model.name", "?")]) for c in configs]
    return per_row, sorted(set().union(*per_row)) if per_row else []


def completed(run: Run) -> bool:
    """A run of the tables: completed, with its test perplexity."""
    return run.status == rundir.COMPLETED and run.metrics.get("test/ppl") is not None


def _short(value) -> str:
    """A value as a row label shows it: floats to 4 significant digits (a searched rate of
    0.2500792911536857 reads 0.2501), everything else as it is."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _row_labels(idents: list[tuple]) -> list[str]:
    """Each row's label: its model, and the keys that tell it from the other rows of its table."""
    shown_per_row, _ = distinguishing_keys([dict(ident) for ident in idents])
    labels = []
    for ident, shown in zip(idents, shown_per_row, strict=True):
        cfg = dict(ident)
        extra = ", ".join(
            f"{k.split('.', 1)[-1] if k.startswith('model.') else k}={_short(json.loads(cfg[k])) if k in cfg else '—'}"
            for k in shown
        )
        model = json.loads(cfg["model.name"]) if "model.name" in cfg else "?"
        labels.append(model + (f" ({extra})" if extra else ""))
    return labels


def _model_order(model: str, label: str) -> tuple:
    return (MODEL_NAMES.index(model) if model in MODEL_NAMES else len(MODEL_NAMES), label)


def _data_of(run: Run) -> str:
    return f"{run.data.heading}, {run.config.get('data.batching', '?')}"


def _published(run: Run, name: str) -> list:
    """The published PTB rows of a recipe: only beside runs on verified PTB."""
    return PUBLISHED.get(name, []) if run.data.ptb else []


def _by(runs: list[Run], key) -> dict:
    groups: dict = {}
    for r in runs:
        groups.setdefault(key(r), []).append(r)
    return groups


def build_tables(runs: list[Run]) -> list[Table]:
    by_table = _by([r for r in runs if completed(r)], lambda r: r.table_key)
    tables = []
    for key, table_runs in sorted(by_table.items(), key=lambda kv: str(kv[0])):
        by_row = _by(table_runs, lambda r: r.identity)
        _, differing = distinguishing_keys([dict(ident) for ident in by_row])
        rows = []
        idents = list(by_row)
        variants = _row_labels([tuple(kv for kv in ident if kv[0] != DEPTH_KEY) for ident in idents])
        for ident, label, variant in zip(idents, _row_labels(idents), variants, strict=True):
            row_runs = by_row[ident]
            model = row_runs[0].config.get("model.name", "?")
            kept, repeats = one_run_per_seed(row_runs)
            rows.append(Row(label, model, kept, repeats=repeats, variant=variant))
        rows.sort(key=lambda r: _model_order(r.model, r.label))
        name = key[0] or "?"
        for label, params, val, test in _published(table_runs[0], name):
            rows.append(
                Row(
                    label,
                    "published",
                    [],
                    published=True,
                    pub_values={"params": params, "val_mean": val, "test_mean": test},
                )
            )
        tables.append(Table(name, _data_of(table_runs[0]), rows, differing, key=key))
    return tables


# ------------------------------------------------------------------------------------------ in progress
IN_PROGRESS = (rundir.RUNNING, rundir.INTERRUPTED)  # a run that may still complete (or resume)


@dataclass
class Progress:
    """The runs in progress of one recipe and data (with at least one finished epoch), by row: their curves so
    far go into the table's curves figure when there is one (`table`), else into a figure of their own."""

    name: str
    data: str
    rows: list[tuple[str, list[Run]]]  # (row label, its runs by seed)
    table: int | None  # index of the table of the same recipe and data
    published_valid: list[tuple[str, float]]


def in_progress(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.status in IN_PROGRESS and val_curve(r)]


def group_in_progress(runs: list[Run], tables: list[Table]) -> list[Progress]:
    """The runs in progress by table and row, a row labelled as in its table (or as it would be there)."""
    groups = []
    table_of = {t.key: ti for ti, t in enumerate(tables)}
    for key, group in sorted(
        _by(in_progress(runs), lambda r: r.table_key).items(), key=lambda kv: str(kv[0])
    ):
        ti = table_of.get(key)
        labelled = {r.runs[0].identity: r.label for r in tables[ti].rows if r.runs} if ti is not None else {}
        by_row = _by(group, lambda r: r.identity)
        idents = list(dict.fromkeys([*labelled, *by_row]))
        labels = dict(zip(idents, _row_labels(idents), strict=True)) | labelled
        rows = [
            (labels[ident], sorted(rs, key=lambda r: _seed_order(r.config.get("seed"))))
            for ident, rs in by_row.items()
        ]
        rows.sort(key=lambda lr: _model_order(lr[1][0].config.get("model.name", "?"), lr[0]))
        name = key[0] or "?"
        published = [(label, val) for label, _, val, _ in _published(group[0], name) if val]
        groups.append(Progress(name, _data_of(group[0]), rows, ti, published))
    return groups


def _epochs_done(run: Run) -> int:
    return max(val_curve(run)[-1][0], (run.metrics or {}).get("epochs_completed") or 0)


def _best_val(run: Run) -> tuple[int, float]:
    return min(val_curve(run), key=lambda ev: ev[1])


# ------------------------------------------------------------------------------------------ output
def _fmt(v, digits=2, thousands=False):
    if v is None:
        return "—"
    if thousands:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"


def _pm(m, s, n):
    if m is None:
        return "—"
    return f"{m:.2f} ± {s:.2f}" if n and n > 1 else f"{m:.2f}"


def _mark(text: str, value, best) -> str:
    """Bold the best value of a column."""
    return f"**{text}**" if value is not None and best is not None and value == best else text


def _best(rows: list[Row], key: str, higher=False):
    vals = [r.values().get(key) for r in rows if not r.published]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return max(vals) if higher else min(vals)


def _signed(v) -> str:
    return "—" if v is None else f"{v:+.2f}"


def _delta_cell(d: Diff) -> str:
    if d.delta is None:
        return ""
    if d.method == "n too small":
        return f"{_signed(d.delta)} [n too small]"
    return f"{_signed(d.delta)} [{_signed(d.low)}, {_signed(d.high)}]"


def _p_cell(d: Diff) -> str:
    if d.method == "n too small":
        return "n too small"
    if d.delta is None:
        return ""
    return "—" if d.p is None else ("< 0.001" if d.p < 0.001 else f"{d.p:.3f}")


def _method_cell(dv: Diff, dt: Diff) -> str:
    if dv.method == dt.method or not dv.method:
        return dt.method
    return f"valid: {dv.method}, test: {dt.method}"


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root) if root in path.parents else path)


TABLE_HEADER = [
    "| model | params | epochs | valid ppl | test ppl | seeds | Δ valid [95% CI] | p (valid) "
    "| Δ test [95% CI] | p (test) | t-test | tokens/s | wall |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
]


def _md_row(t: Table, r: Row, best: dict) -> str:
    v = r.values()
    if r.published:
        return f"| *{r.label}* | {_fmt(v['params'], thousands=True)} | | {_fmt(v['val_mean'])} | {_fmt(v['test_mean'])} | | | | | | | | |"
    wall = f"{v['wall_s'] / 60:.1f} min" if v["wall_s"] is not None else "—"
    dv, dt = t.diff(r, "val/ppl"), t.diff(r, "test/ppl")
    if r is t.baseline_for(r):
        diff_cells = ["baseline", "", "baseline", "", ""]
    else:
        diff_cells = [_delta_cell(dv), _p_cell(dv), _delta_cell(dt), _p_cell(dt), _method_cell(dv, dt)]
    cells = [
        r.label,
        _fmt(v["params"], thousands=True),
        _fmt(v["epochs"], 0),
        _mark(_pm(v["val_mean"], v["val_std"], v["n"]), v["val_mean"], best["val_mean"]),
        _mark(_pm(v["test_mean"], v["test_std"], v["n"]), v["test_mean"], best["test_mean"]),
        str(v["n"]) + (f" ({v['n_runs']} runs)" if v["n_runs"] > v["n"] else ""),
        *diff_cells,
        _mark(_fmt(v["tokens_per_s"], thousands=True), v["tokens_per_s"], best["tokens_per_s"]),
        _mark(wall, v["wall_s"], best["wall_s"]),
    ]
    return "| " + " | ".join(cells) + " |"


def _md_caption(t: Table) -> str:
    caption = (
        "Best value of each column in bold; ± is the standard deviation over seeds; seeds counts distinct "
        "seeds (of a seed run more than once, its latest completed run is used); published rows in italics;"
        " tokens/s: training throughput, the median of each run's epochs (an epoch slowed or paused by other"
        " work moves it little), mean over seeds; wall: each run's whole time, pauses included, mean over seeds."
    )
    if t.baseline is not None and t.by_depth:
        caption += (
            f" Δ is row − baseline of the same depth (`{t.baseline.variant}` at each `{DEPTH_KEY}`; a depth"
            " it was not run at has no Δ) with its 95% confidence interval and the two-sided p-value of a t-test:"
            " paired by seed when both rows have the same seeds, Welch's otherwise; n too small: under two seeds"
            " on a side."
        )
    elif t.baseline is not None:
        caption += (
            f" Δ is row − baseline (`{t.baseline.label}`"
            + (f"; {t.baseline_note}" if t.baseline_note else "")
            + ") with its 95% confidence interval and the two-sided p-value of a t-test: paired by seed "
            "when both rows have the same seeds, Welch's otherwise; n too small: under two seeds on a side."
        )
    return caption


def _md_repeats(t: Table, root: Path) -> list[str]:
    repeated = [(r, seed, rs) for r in t.rows for seed, rs in r.repeats.items()]
    if not repeated:
        return []
    out = ["Seeds run more than once (the latest completed run is used):", ""]
    for r, seed, rs in repeated:
        out.append(
            f"- {r.label}, seed {seed}: {len(rs)} runs; used `{_rel(rs[0].path, root)}`, not "
            + ", ".join(f"`{_rel(x.path, root)}`" for x in rs[1:])
        )
    return [*out, ""]


def _md_figure(kind: str, fig: Path | None, root: Path) -> list[str]:
    if not fig:
        return []
    return [f"![{kind}]({fig.relative_to(root / 'report') if (root / 'report') in fig.parents else fig})", ""]


def _md_table(ti: int, t: Table, root: Path, figures: dict) -> list[str]:
    out = [f"## {t.name} ({t.data})", ""]
    if t.differing_keys:
        out += [f"Rows differ in (besides the model): {', '.join(f'`{k}`' for k in t.differing_keys)}.", ""]
    best = {
        "val_mean": _best(t.rows, "val_mean"),
        "test_mean": _best(t.rows, "test_mean"),
        "tokens_per_s": _best(t.rows, "tokens_per_s", higher=True),
        "wall_s": _best(t.rows, "wall_s"),
    }
    out += [*TABLE_HEADER, *(_md_row(t, r, best) for r in t.rows), ""]
    out += [_md_caption(t), "", *_md_repeats(t, root)]
    for kind in ("curves", "test", "depth", "gradnorms"):
        out += _md_figure(kind, figures.get((ti, kind)), root)
    return out


def _md_progress(progress: list[Progress], root: Path, figures: dict) -> list[str]:
    if not progress:
        return []
    out = [
        "## Runs in progress",
        "",
        "Their finished epochs are in the validation curves (dashed lines, marked running); they join the "
        "tables when they complete.",
        "",
        "| run | status | row | epochs completed | best valid ppl (epoch) |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for g in progress:
        table = f"{g.name} ({g.data})"
        for label, runs in g.rows:
            for r in runs:
                epoch, val = _best_val(r)
                total = f" of {r.metrics['max_epochs']}" if r.metrics.get("max_epochs") else ""
                out.append(
                    f"| `{_rel(r.path, root)}` | {r.status} | {table}: {label} | {_epochs_done(r)}{total} "
                    f"| {val:.2f} ({epoch}) |"
                )
    out.append("")
    for gi, g in enumerate(progress):
        if g.table is None:
            out += [
                f"### {g.name} ({g.data}): curves so far",
                "",
                *_md_figure("curves in progress", figures.get((gi, "progress")), root),
            ]
        else:
            out += [f"The curves of `{g.name} ({g.data})` are in its table's curves figure above.", ""]
    return out


def _md_problems(problems: list[Run], root: Path) -> list[str]:
    if not problems:
        return []
    out = [
        "## Runs not in the tables",
        "",
        "| run | status | epochs | reason |",
        "| --- | --- | ---: | --- |",
    ]
    for r in problems:
        m = r.metrics or {}
        reason = (
            m.get("error")
            or ("still writing, or stopped without a word" if r.status == rundir.RUNNING else "")
        ).replace("|", "\\|")
        out.append(f"| `{_rel(r.path, root)}` | {r.status} | {m.get('epochs_completed', 0)} | {reason} |")
    return [*out, ""]


def render_markdown(
    tables: list[Table],
    problems: list[Run],
    root: Path,
    figures: dict,
    progress: list[Progress] = (),
    reported: Path | None = None,
) -> str:
    """report.md: the heading names `reported` (the directory reported on; default `root`), run paths are
    shown relative to `root`."""
    out = [f"# Perplexity report: `{root if reported is None else reported}`", ""]
    if not tables:
        out += ["No completed runs yet." + (" The runs in progress are below." if progress else ""), ""]
    for ti, t in enumerate(tables):
        out += _md_table(ti, t, root, figures)
    out += _md_progress(progress, root, figures)
    out += _md_problems(problems, root)
    return "\n".join(out)


COLUMNS = [
    "table",
    "data",
    "row",
    "model",
    "published",
    "params",
    "epochs",
    "val_ppl_mean",
    "val_ppl_std",
    "val_ppl_ci_low",
    "val_ppl_ci_high",
    "test_ppl_mean",
    "test_ppl_std",
    "test_ppl_ci_low",
    "test_ppl_ci_high",
    "n_seeds",
    "seeds",
    "n_runs",
    "repeats",
    "tokens_per_s",
    "wall_s",
    "baseline",
    *(
        f"{m}_ppl_{k}"
        for m, _ in METRICS
        for k in ("delta", "delta_ci_low", "delta_ci_high", "delta_p", "delta_test")
    ),
]


def row_record(t: Table, r: Row) -> dict:
    """One row of a table as {column: value}: what report.csv and the W&B table hold."""
    v = r.values()
    rec = {
        "table": t.name,
        "data": t.data,
        "row": r.label,
        "model": r.model,
        "published": int(r.published),
        "params": v.get("params"),
        "epochs": v.get("epochs"),
        "n_seeds": v.get("n"),
        "seeds": " ".join(str(s) for s in v.get("seeds", [])),
        "n_runs": v.get("n_runs"),
        "repeats": " ".join(f"{s}:{k}" for s, k in v.get("repeats", {}).items()),  # seed:runs
        "tokens_per_s": v.get("tokens_per_s"),
        "wall_s": v.get("wall_s"),
        "baseline": t.baseline_for(r).label if t.baseline_for(r) is not None else None,
    }
    for m, key in METRICS:
        ci = v.get(f"{m}_ci") or (None, None)
        d = t.diff(r, key)
        rec.update(
            {
                f"{m}_ppl_mean": v.get(f"{m}_mean"),
                f"{m}_ppl_std": v.get(f"{m}_std"),
                f"{m}_ppl_ci_low": ci[0],
                f"{m}_ppl_ci_high": ci[1],
                f"{m}_ppl_delta": d.delta,
                f"{m}_ppl_delta_ci_low": d.low,
                f"{m}_ppl_delta_ci_high": d.high,
                f"{m}_ppl_delta_p": d.p,
                f"{m}_ppl_delta_test": d.method or None,
            }
        )
    return rec


def table_rows(tables: list[Table]) -> list[list]:
    """One list per row, in COLUMNS order: what report.csv and the W&B table hold."""
    return [[rec[c] for c in COLUMNS] for t in tables for rec in (row_record(t, r) for r in t.rows)]


def write_csv(tables: list[Table]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    w.writerows(table_rows(tables))
    return buf.getvalue().encode()


def log_to_wandb(tables, figures, out_dir: Path, group: str, mode: str) -> str | None:
    if mode == "disabled":
        return None
    import os

    os.environ.setdefault("WANDB_CACHE_DIR", str(out_dir / ".wandb-cache"))
    os.environ.setdefault("WANDB_DATA_DIR", str(out_dir / ".wandb-cache"))
    import wandb

    run = wandb.init(
        project="dglstm-lm",
        name=f"report {group}",
        group=group,
        job_type="report",
        dir=str(out_dir),
        mode=mode,
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True, disable_git=True),
    )
    payload = {"perplexity": wandb.Table(columns=COLUMNS, data=table_rows(tables))}
    for (ti, kind), path in figures.items():
        payload[f"figures/{tables[ti].name}_{ti}_{kind}"] = wandb.Image(str(path))
    run.log(payload)
    run.finish()
    return run.id


def build_report(root: Path, out_dir: Path, wandb_mode: str = "offline", baseline: str | None = None) -> dict:
    runs = find_runs(root)
    if baseline is not None and not runs:
        raise UserError(f"unknown baseline '{baseline}': there are no runs under {root}")
    tables = build_tables(runs)
    choose_baselines(tables, baseline)  # before anything is written: an unknown baseline is an error
    out_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = out_dir / "figures"
    if not runs:
        text = f"# Perplexity report: `{root}`\n\nNo runs found under {root}.\n"
        atomic_write_bytes(out_dir / "report.md", text.encode())
        atomic_write_bytes(out_dir / "report.csv", write_csv([]))
        atomic_write_bytes(out_dir / "report.tex", render_latex([], str(root)).encode())
        remove_stale(fig_dir, keep=())
        return {"runs": 0, "tables": 0, "problems": 0, "message": f"no runs found under {root}"}
    problems = [r for r in runs if not completed(r)]
    progress = group_in_progress(runs, tables)
    figures = make_figures(tables, fig_dir, progress) if tables or progress else {}
    md = render_markdown(
        tables, problems, root if out_dir.parent == root else out_dir.parent, figures, progress, reported=root
    )
    atomic_write_bytes(out_dir / "report.md", md.encode())
    atomic_write_bytes(out_dir / "report.csv", write_csv(tables))
    atomic_write_bytes(out_dir / "report.tex", render_latex(tables, str(root)).encode())
    remove_stale(fig_dir, keep=figures.values())  # after report.md no longer links them
    group = _group_of(root)
    wandb_id = None
    if tables:
        try:
            table_figures = {k: f for k, f in figures.items() if k[1] != "progress"}
            wandb_id = log_to_wandb(tables, table_figures, out_dir, group, wandb_mode)
        except Exception as exc:  # the local report is the record; W&B is a mirror
            log.warning("could not log the report to W&B: %s", exc)
    return {
        "runs": len(runs),
        "tables": len(tables),
        "problems": len(problems),
        "in_progress": sum(len(rs) for g in progress for _, rs in g.rows),
        "figures": [str(p) for p in figures.values()],
        "wandb_id": wandb_id,
    }


def _group_of(root: Path) -> str:
    """The W&B group of a sweep directory (as its jobs use), else 'report'."""
    if root.parent.parent.name == "multirun":
        return f"sweep-{root.parent.name}_{root.name}"
    return "report"


@cli
def main(argv=None) -> int:
    p = ArgumentParser(prog="make report", description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="a run or sweep directory, or the whole outputs/ (default)")
    p.add_argument("--out", default=None, help="where to write (default: outputs/report)")
    p.add_argument("--wandb-mode", default="offline", choices=["offline", "online", "disabled"])
    p.add_argument(
        "--baseline",
        default=None,
        help="the row the others are compared with: a model name or a row label (default: stacked_lstm, "
        "else the first row)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    root = Path(args.dir or "outputs")
    out = Path(args.out) if args.out else (Path("outputs") / "report")
    rundir.check_folder(out, "--out" if args.out else "the report folder")
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a run or sweep folder")
    if args.dir is None and not root.exists():  # a fresh checkout: nothing has run yet
        print(f"no runs found under {root}/ (nothing has been trained yet)")
        return 0
    res = build_report(root, out, args.wandb_mode, args.baseline)
    if res["runs"] == 0:
        print(f"{res['message']}; wrote an empty report to {out}/report.md")
        return 0
    running = f" ({res['in_progress']} in progress)" if res.get("in_progress") else ""
    print(
        f"{res['runs']} runs, {res['tables']} tables, {res['problems']} not completed{running} → {out}/report.md, report.csv, {len(res.get('figures', []))} figures"
    )
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
