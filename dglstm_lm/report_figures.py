"""The report's figures: learning curves (validation perplexity per epoch) and test perplexity per row.

Drawn from what report.py builds (duck-typed, so this module imports nothing of it): tables, whose rows have
`label`, `n`, `runs`, `published`, `pub_values`, `values()` and `by_seed()`, and groups of runs in progress
(`name`, `rows` as (label, runs), `table`: the index of the table of the same recipe and data, or None,
`published_valid` as (label, value)); runs have `history`, `metrics`, `config` and `status`.

Each figure reads at a glance for one seed or many and one epoch or many:

- curves: a row's completed seeds as their mean with a ± std band (no band, and "n = 1" said, for one seed),
  runs in progress as dashed lines over their finished epochs, integer epoch ticks, published valid results
  as labelled horizontal lines;
- test: a dot per row at its mean with the 95% t-interval of the mean as an error bar (none below two seeds,
  and "n = 1" in the row's label), its seeds as hollow dots beside it, published results as horizontal lines
  of distinct styles with their values in the legend; the y axis spans the data (a dot plot, not bars, so it
  need not start at 0) and the legend sits below the axes, never over the data.

Figures are written as <slug>_<kind>.png into the report's figures folder; `remove_stale` removes the ones an
earlier report wrote there and this one did not, so the folder never holds a figure of runs gone.
"""

from __future__ import annotations

import io
import math
import re
import statistics
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_bytes

# The names of the figures the report writes (and so may remove): <table>_<index>_curves.png and
# <table>_<index>_test.png per table, <recipe>_progress<index>_curves.png per group of runs in progress
# without a table.
OWN_FIGURE = re.compile(r".+_(\d+|progress\d+)_(curves|test)\.png")

# published results: distinct styles and colours, so that two nearly equal values stay two readable lines
PUBLISHED_STYLES = [("--", "tab:red"), (":", "black"), ("-.", "tab:purple"), ((0, (5, 1, 1, 1)), "tab:brown")]
LEGEND_ENTRY_IN = 0.19  # figure height per legend entry (inches), the legend being below the axes


@dataclass
class Series:
    """One legend entry of the curves figure: a row's completed runs (mean ± std over seeds), or its runs in
    progress (one dashed line per run, finished epochs only)."""

    label: str
    runs: list
    running: bool = False


def val_curve(run) -> list[tuple[int, float]]:
    """The finished epochs' validation perplexity of a run, by epoch (an epoch written twice: the last)."""
    by_epoch = {}
    for rec in run.history:
        epoch, val = rec.get("epoch"), rec.get("val/ppl")
        if isinstance(epoch, int) and isinstance(val, (int, float)) and math.isfinite(val):
            by_epoch[epoch] = float(val)
    return sorted(by_epoch.items())


def max_epochs(run):
    return run.metrics.get("max_epochs") if run.metrics else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _n_text(n: int) -> str:
    return "n = 1, single seed" if n == 1 else f"n = {n} seeds"


# ---------------------------------------------------------------------------------------------- curves
def _draw_mean(ax, s: Series, color) -> None:
    per_epoch: dict[int, list[float]] = {}
    for run in s.runs:
        for epoch, val in val_curve(run):
            per_epoch.setdefault(epoch, []).append(val)
    if not per_epoch:
        return
    epochs = sorted(per_epoch)
    mean = [statistics.fmean(per_epoch[e]) for e in epochs]
    ax.plot(
        epochs, mean, marker="o", ms=3.5, lw=1.6, color=color, label=f"{s.label} ({_n_text(len(s.runs))})"
    )
    spread = [(e, m, statistics.stdev(per_epoch[e])) for e, m in zip(epochs, mean) if len(per_epoch[e]) > 1]
    if spread:  # a band only where there are two seeds or more
        ax.fill_between(
            [e for e, _, _ in spread],
            [m - sd for _, m, sd in spread],
            [m + sd for _, m, sd in spread],
            alpha=0.2,
            color=color,
            lw=0,
        )


def _running_label(s: Series) -> str:
    status = "/".join(sorted({r.status for r in s.runs}))
    done = [(r.config.get("seed"), val_curve(r)[-1][0], max_epochs(r)) for r in s.runs]
    of = {total for _, _, total in done}
    total = f" of {of.pop()}" if len(of) == 1 and None not in of else ""
    if len(done) <= 3:
        at = ", ".join(f"seed {seed} at epoch {e}" for seed, e, _ in done)
    else:
        epochs = [e for _, e, _ in done]
        at = f"{len(done)} seeds at epochs {min(epochs)}–{max(epochs)}"
    return f"{s.label} — {status}: {at}{total}"


def _draw_running(ax, s: Series, color) -> None:
    for i, run in enumerate(s.runs):
        curve = val_curve(run)
        ax.plot(
            [e for e, _ in curve],
            [v for _, v in curve],
            ls="--",
            lw=1.3,
            marker="o",
            ms=3.5,
            mfc="white",
            color=color,
            label=_running_label(s) if i == 0 else "_nolegend_",
        )


def _log_ppl_axis(ax) -> None:
    """Plain numbers on the log axis (not 1.2×10²); within about a decade evenly spaced labelled ticks (log
    spacing would give one or two)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = ax.get_ylim()
    if hi / lo < 10:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
        ax.yaxis.set_minor_locator(NullLocator())
    else:
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def curves_subtitle(series: list[Series]) -> str:
    done = [len(s.runs) for s in series if not s.running]
    parts = []
    if done and max(done) == 1:
        parts.append("single seed per row (n = 1): no spread shown")
    elif done and min(done) == max(done):
        parts.append(f"mean ± std over n = {done[0]} seeds")
    elif done:
        parts.append("mean ± std over seeds (n per row in the legend; no band for n = 1)")
    if any(s.running for s in series):
        parts.append("dashed: runs in progress, their finished epochs")
    return "\n".join(parts)  # a line each: a title never runs off the figure


def _legend_below(fig, entries: int) -> None:
    if entries:
        fig.legend(loc="outside lower center", ncols=1, fontsize=7.5, frameon=False)


def draw_curves(name: str, series: list[Series], published: list[tuple[str, float]]):
    """Validation perplexity per epoch: completed rows as mean ± std, runs in progress dashed."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    entries = len(series) + len(published)
    fig, ax = plt.subplots(figsize=(7.5, 4.3 + LEGEND_ENTRY_IN * entries), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of: dict[str, str] = {}
    for s in series:  # a row's completed and running runs share its colour
        color = color_of.setdefault(s.label, colors[len(color_of) % len(colors)])
        (_draw_running if s.running else _draw_mean)(ax, s, color)
    for (label, value), (style, color) in zip(published, PUBLISHED_STYLES * 9):
        ax.axhline(value, ls=style, lw=1.1, color=color, label=f"{label}: valid {value:g}", zorder=1)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.margins(x=0.04)
    ax.set_ylabel("validation perplexity (log scale)")
    _log_ppl_axis(ax)
    only_running = all(s.running for s in series)
    title = f"{name}: validation perplexity" + (" so far" if only_running else "")
    ax.set_title(f"{title}\n{curves_subtitle(series)}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    _legend_below(fig, entries)
    return fig


# ---------------------------------------------------------------------------------------------- test
def points_subtitle(ns: list[int]) -> str:
    if ns and max(ns) == 1:
        return "single seed per row (n = 1): no interval"
    text = "dot: mean; bar: 95% t-interval of the mean"
    if ns and min(ns) == 1:
        text += " (none for n = 1)"
    return text + "\nhollow dots: the seeds"


def _draw_row(ax, i: int, r, first: dict) -> list[float]:
    """One row at x = i: its seeds (hollow, to the left), its mean with the CI (n ≥ 2) and the numbers (to the
    right). Returns the y values drawn, for the limits."""
    v = r.values()
    m, ci, seeds = v["test_mean"], v["test_ci"], list(r.by_seed("test/ppl").values())
    drawn = [m]
    if r.n > 1:
        xs = [i - 0.22 + 0.08 * (k / max(len(seeds) - 1, 1) - 0.5) for k in range(len(seeds))]
        ax.scatter(
            xs,
            seeds,
            s=16,
            facecolors="none",
            edgecolors="tab:blue",
            alpha=0.8,
            lw=0.9,
            label="seeds" if first.pop("seeds", False) else "_nolegend_",
        )
        drawn += seeds
    if r.n > 1 and ci is not None and ci[1] > ci[0]:
        ax.errorbar(
            [i],
            [m],
            yerr=[[m - ci[0]], [ci[1] - m]],
            fmt="o",
            ms=7,
            capsize=6,
            lw=1.6,
            color="tab:blue",
            label="mean, 95% CI" if first.pop("ci", False) else "_nolegend_",
        )
        drawn += list(ci)
        text = f"{m:.1f}\n[{ci[0]:.1f}, {ci[1]:.1f}]"
    else:  # one seed (or no spread): no interval to draw
        ax.plot(
            [i], [m], "o", ms=7, color="tab:blue", label="mean" if first.pop("mean", False) else "_nolegend_"
        )
        text = f"{m:.1f}" + (" (no spread)" if r.n > 1 else "")
    ax.annotate(
        text,
        (i, m),
        xytext=(9, 0),
        textcoords="offset points",
        ha="left",
        va="center",
        fontsize=8,
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
    )
    return drawn


def data_limits(values: list[float]) -> tuple[float, float]:
    """y limits around the values with a margin: the data fill the axis instead of its top few pixels."""
    lo, hi = min(values), max(values)
    pad = max(0.15 * (hi - lo), 0.01 * hi, 0.5)
    return lo - pad, hi + pad


def draw_test(name: str, rows: list, published: list[tuple[str, float]]):
    """Test perplexity per row: mean and CI as a dot with an error bar, seeds beside it, published lines."""
    plt = _pyplot()
    entries = 2 + len(published)
    width = min(max(6.5, 1.5 * len(rows) + 2.5), 16)
    fig, ax = plt.subplots(figsize=(width, 4.3 + LEGEND_ENTRY_IN * entries), layout="constrained")
    first = {"seeds": True, "ci": True, "mean": True}  # one legend entry each
    values = []
    for i, r in enumerate(rows):
        values += _draw_row(ax, i, r, first)
    for (label, value), (style, color) in zip(published, PUBLISHED_STYLES * 9):
        ax.axhline(value, ls=style, lw=1.2, color=color, label=f"{label}: {value:g}", zorder=1)
        values.append(value)
    ax.set_xticks(range(len(rows)), [textwrap.fill(r.label, 22) + f"\nn = {r.n}" for r in rows], fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.2)  # room for the numbers right of the last row
    ax.set_ylim(*data_limits(values))
    ax.set_ylabel("test perplexity (axis spans the data, not from 0)")
    ax.set_title(f"{name}: test perplexity\n{points_subtitle([r.n for r in rows])}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    _legend_below(fig, entries)
    return fig


# ---------------------------------------------------------------------------------------------- files
def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def figures(tables: list, progress: list = ()) -> Iterator[tuple[tuple, str, object]]:
    """(key, file name, figure) of each figure: (table index, "curves" / "test") per table, (group index,
    "progress") per group of runs in progress without a table of its own."""
    for ti, t in enumerate(tables):
        slug = _slug(f"{t.name}_{ti}")
        rows = [r for r in t.rows if not r.published]
        series = [Series(r.label, r.runs) for r in rows]
        series += [Series(label, runs, True) for g in progress if g.table == ti for label, runs in g.rows]
        valid = [
            (r.label, r.pub_values["val_mean"])
            for r in t.rows
            if r.published and r.pub_values.get("val_mean")
        ]
        test = [
            (r.label, r.pub_values["test_mean"])
            for r in t.rows
            if r.published and r.pub_values.get("test_mean")
        ]
        yield (ti, "curves"), f"{slug}_curves.png", draw_curves(t.name, series, valid)
        yield (ti, "test"), f"{slug}_test.png", draw_test(t.name, rows, test)
    for gi, g in enumerate(progress):
        if g.table is None:
            series = [Series(label, runs, True) for label, runs in g.rows]
            fig = draw_curves(g.name, series, g.published_valid)
            yield (gi, "progress"), f"{_slug(g.name)}_progress{gi}_curves.png", fig


def make_figures(tables: list, fig_dir: Path, progress: list = ()) -> dict:
    """Write the figures into fig_dir; {key: path} (keys as `figures` gives them)."""
    plt = _pyplot()
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, name, fig in figures(tables, progress):
        _save_fig(fig, fig_dir / name)
        plt.close(fig)
        written[key] = fig_dir / name
    return written


def remove_stale(fig_dir: Path, keep) -> list[Path]:
    """Remove the figures an earlier report wrote into fig_dir (by their names) that are not in `keep`."""
    keep = {Path(p).name for p in keep}
    removed = []
    try:
        entries = list(fig_dir.iterdir())
    except OSError:
        return removed
    for p in entries:
        if OWN_FIGURE.fullmatch(p.name) and p.name not in keep and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _save_fig(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
