"""The report's figures: learning curves (validation perplexity per epoch) and test perplexity per row.

Drawn from what report.py builds (duck-typed, so this module imports nothing of it): tables, whose rows have
`label`, `n`, `runs`, `published`, `pub_values`, `values()` and `by_seed()`, and groups of runs in progress
(`name`, `rows` as (label, runs), `table`: the index of the table of the same recipe and data, or None,
`published_valid` as (label, value)); runs have `history`, `metrics`, `config` and `status`.

Each figure reads at a glance for one seed or many and one epoch or many:

- curves: a row's completed seeds as their mean with a ± std band (no band, and "n = 1" said, for one seed),
  runs in progress as dashed lines over their finished epochs, integer epoch ticks, published valid results
  as labelled horizontal lines;
- test: a dot per row at its geometric mean with the 95% t-interval of the mean log perplexity as an error
  bar (an interval that never goes below zero; none below two seeds, and "n = 1" in the row's label), its
  seeds as hollow dots beside it, published results as horizontal lines of distinct styles with their values
  in the legend; the y axis spans the data (a dot plot, not bars, so it need not start at 0) and the legend
  sits below the axes, never over the data. Under it, each row's Δ against the table's baseline with the
  95% CI of the table's own test (paired by seed, or Welch's): the figure shows what the table tests. Many
  or long row labels become A, B, ... with the key spelled out under the plot.

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
OWN_FIGURE = re.compile(r".+_(\d+|progress\d+)_(curves|test|gradnorms)\.png")

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
def _draw_mean(ax, s: Series, color, marker: str = "o") -> None:
    per_epoch: dict[int, list[float]] = {}
    for run in s.runs:
        for epoch, val in val_curve(run):
            per_epoch.setdefault(epoch, []).append(val)
    if not per_epoch:
        return
    epochs = sorted(per_epoch)
    mean = [statistics.fmean(per_epoch[e]) for e in epochs]
    ax.plot(
        epochs, mean, marker=marker, ms=3.5, lw=1.6, color=color, label=f"{s.label} ({_n_text(len(s.runs))})"
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
    color_of: dict[str, int] = {}
    markers = "osD^v"  # past the colour cycle (10 rows), the marker tells rows of one colour apart
    for s in series:  # a row's completed and running runs share its colour
        k = color_of.setdefault(s.label, len(color_of))
        color = colors[k % len(colors)]
        if s.running:
            _draw_running(ax, s, color)
        else:
            _draw_mean(ax, s, color, markers[(k // len(colors)) % len(markers)])
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
    text = "dot: geometric mean; bar: 95% t-interval, in log perplexity"
    if ns and min(ns) == 1:
        text += " (none for n = 1)"
    return text + "\nhollow dots: the seeds"


def log_interval(values: list[float]) -> tuple[float, tuple[float, float] | None]:
    """The geometric mean of perplexities and the 95% t-interval of their mean log, mapped back: an interval
    that never goes below zero (a perplexity cannot), where the plain t-interval of two seeds can."""
    from scipy import stats

    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    if not logs:
        return float("nan"), None
    centre = math.exp(statistics.fmean(logs))
    if len(logs) < 2 or statistics.stdev(logs) == 0:
        return centre, None
    ci = stats.ttest_1samp(logs, 0.0).confidence_interval(0.95)
    return centre, (math.exp(ci.low), math.exp(ci.high))


def _draw_row(ax, i: int, r, first: dict, numbers: bool = True) -> list[float]:
    """One row at x = i: its seeds (hollow, to the left), its geometric mean with the log-space CI (n ≥ 2) and
    the numbers (to the right). Returns the y values drawn, for the limits."""
    seeds = list(r.by_seed("test/ppl").values())
    m, ci = log_interval(seeds)
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
    if ci is not None:
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
    if not numbers:  # many rows: the numbers are the table's
        return drawn
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


def row_keys(labels: list[str], width: int = 22, max_rows: int = 6) -> tuple[list[str], str]:
    """Tick labels for the rows, and the key that spells them out: the labels themselves where they are few
    and short, else A, B, ... with "A: <label>" lines (for the axis label below the plot)."""
    if len(labels) <= max_rows and all(len(label) <= 2 * width for label in labels):
        return [textwrap.fill(label, width) for label in labels], ""
    keys = [_letters(i) for i in range(len(labels))]
    entries = [f"{k}: {label}" for k, label in zip(keys, labels, strict=True)]
    lines, line = [], ""
    for e in entries:  # several entries a line, as many as fit in about 110 characters
        if line and len(line) + 4 + len(e) > 110:
            lines.append(line)
            line = ""
        line = f"{line}    {e}" if line else e
    lines.append(line)
    return keys, "\n".join(lines)


def _letters(i: int) -> str:
    out = ""
    i += 1
    while i:
        i, rem = divmod(i - 1, 26)
        out = chr(65 + rem) + out
    return out


def _draw_deltas(ax, rows: list, table, keys: list[str], numbers: bool = True) -> None:
    """Each row's Δ test perplexity against the table's baseline with the 95% CI of the table's test (paired
    by seed, or Welch's): exactly the Δ column's numbers."""
    base = table.baseline
    ax.axhline(0.0, color="0.4", lw=0.9, zorder=1)
    ys = [0.0]
    seen: set[str] = set()

    def once(label: str) -> str:  # one legend entry per kind (the figure's legend gathers every panel's)
        if label in seen:
            return "_nolegend_"
        seen.add(label)
        return label

    for i, r in enumerate(rows):
        if r is table.baseline_for(r):
            ax.plot([i], [0.0], "D", ms=6, color="0.3", label=once(f"baseline: {r.label}"))
            continue
        d = table.diff(r, "test/ppl")
        if d.delta is None:
            continue
        if d.low is not None and d.high is not None:
            ax.errorbar([i], [d.delta], yerr=[[d.delta - d.low], [d.high - d.delta]], fmt="o", ms=6, capsize=5,
                        lw=1.4, color="tab:green", label=once(f"Δ vs baseline, 95% CI ({d.method})"))  # fmt: skip
            ys += [d.low, d.high]
            text = f"{d.delta:+.1f}\np = {d.p:.2g}" if d.p is not None else f"{d.delta:+.1f}"
        else:
            ax.plot(
                [i],
                [d.delta],
                "o",
                ms=6,
                color="tab:green",
                mfc="white",
                label=once(f"Δ vs baseline ({d.method})"),
            )
            text = f"{d.delta:+.1f}"
        ys.append(d.delta)
        if not numbers:  # many rows: the numbers are the table's
            continue
        ax.annotate(text, (i, d.delta), xytext=(8, 0), textcoords="offset points", ha="left", va="center",
                    fontsize=7.5)  # fmt: skip
    lo, hi = min(ys), max(ys)
    pad = max(0.15 * (hi - lo), 0.5)
    ax.set_ylim(lo - pad, hi + pad)
    against = (
        f"{base.variant}\nat the same depth"
        if getattr(table, "by_depth", False)
        else f"{keys[rows.index(base)]}\n(row − baseline)"
    )
    ax.set_ylabel(f"Δ test ppl vs {against}", fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def draw_test(name: str, rows: list, published: list[tuple[str, float]], table=None):
    """Test perplexity per row (geometric mean, log-space CI, seeds, published lines) and, under it, each row's
    Δ against the table's baseline with the CI the table reports."""
    plt = _pyplot()
    ticks, key = row_keys([r.label for r in rows])
    entries = 2 + len(published) + (2 if table is not None and table.baseline is not None else 0)
    key_lines = key.count("\n") + 1 if key else 0
    deltas = table is not None and table.baseline is not None and table.baseline in rows and len(rows) > 1
    width = min(max(6.5, (0.75 if key else 1.5) * len(rows) + 3.0), 16)
    height = 4.3 + LEGEND_ENTRY_IN * entries + 0.16 * key_lines + (2.3 if deltas else 0) + (1.0 if key else 0)
    fig, axes = plt.subplots(2 if deltas else 1, 1, figsize=(width, height + (0.5 if deltas else 0)),
                             layout="constrained", squeeze=False, height_ratios=[2.2, 1.3] if deltas else [1])  # fmt: skip
    ax = axes[0][0]
    first = {"seeds": True, "ci": True, "mean": True}  # one legend entry each
    values = []
    for i, r in enumerate(rows):
        values += _draw_row(ax, i, r, first, numbers=len(rows) <= 8)
    for (label, value), (style, color) in zip(published, PUBLISHED_STYLES * 9):
        ax.axhline(value, ls=style, lw=1.2, color=color, label=f"{label}: {value:g}", zorder=1)
        values.append(value)
    bottom = axes[-1][0]
    for a in (ax, bottom):  # each panel labelled, so that it reads alone
        a.set_xticks(
            range(len(rows)), [f"{t}\nn = {r.n}" for t, r in zip(ticks, rows, strict=True)], fontsize=8
        )
        a.set_xlim(-0.6, len(rows) - 0.2)  # room for the numbers right of the last row
    ax.set_ylim(*data_limits(values))
    ax.set_ylabel("test perplexity\n(axis spans the data, not from 0)")
    ax.set_title(f"{name}: test perplexity\n{points_subtitle([r.n for r in rows])}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if deltas:
        _draw_deltas(bottom, rows, table, ticks if key else [r.label for r in rows], numbers=len(rows) <= 8)
    if key:
        bottom.set_xlabel(key, fontsize=7, loc="left", linespacing=1.4)
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
        yield (ti, "test"), f"{slug}_test.png", draw_test(t.name, rows, test, t)
        if getattr(t, "by_depth", False):
            yield (ti, "depth"), f"{slug}_depth.png", draw_depth(t.name, rows, t)
        norms = {r.label: layer_norms(r.runs) for r in rows}
        norms = {k: v for k, v in norms.items() if v}
        if norms:
            yield (ti, "gradnorms"), f"{slug}_gradnorms.png", draw_grad_norms(t.name, norms)
    for gi, g in enumerate(progress):
        if g.table is None:
            series = [Series(label, runs, True) for label, runs in g.rows]
            fig = draw_curves(g.name, series, g.published_valid)
            yield (gi, "progress"), f"{_slug(g.name)}_progress{gi}_curves.png", fig


def draw_depth(name: str, rows: list, table):
    """Test perplexity against depth (model.num_layers), one line per variant (the row without its depth):
    the mean over seeds with its 95% confidence interval (t over seeds; none for one seed)."""

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    variants: dict[str, list] = {}
    for r in rows:
        if isinstance(r.depth, int):
            variants.setdefault(r.variant, []).append(r)
    for i, (variant, vrows) in enumerate(variants.items()):
        vrows.sort(key=lambda r: r.depth)
        xs = [r.depth for r in vrows]
        vals = [r.values() for r in vrows]
        means = [v["test_mean"] for v in vals]
        lo = [m - (v["test_ci"] or (m, m))[0] for m, v in zip(means, vals, strict=True)]
        hi = [(v["test_ci"] or (m, m))[1] - m for m, v in zip(means, vals, strict=True)]
        ns = sorted({v["n"] for v in vals})
        n = _n_text(ns[0]) if len(ns) == 1 else f"n = {ns[0]}–{ns[-1]}"
        base = " (baseline)" if table.baseline is not None and variant == table.baseline.variant else ""
        ax.errorbar(xs, means, yerr=[lo, hi], marker="o", ms=4, capsize=3, color=f"C{i}",
                    label=f"{variant}{base} ({n})")  # fmt: skip
    ax.set_xticks(sorted({r.depth for vrows in variants.values() for r in vrows}))
    ax.set_xlabel("layers (model.num_layers)")
    ax.set_ylabel("test perplexity")
    ax.set_title(f"{name}: test perplexity by depth (mean over seeds, 95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def layer_norms(runs) -> list[tuple[float, float, int]] | None:
    """Per layer (1…L): (mean, std, n) over the runs of each run's gradient norm at its last recorded epoch
    (history's grad_norm/layer_<i>, the epoch's mean over its steps); None when no run recorded them."""
    per_run = []
    for run in runs:
        last = next((r for r in reversed(run.history) if "grad_norm/layer_1" in r), None)
        if last is None:
            continue
        vals, i = [], 1
        while isinstance(last.get(f"grad_norm/layer_{i}"), (int, float)):
            vals.append(float(last[f"grad_norm/layer_{i}"]))
            i += 1
        per_run.append(vals)
    depth = {len(v) for v in per_run}
    if not per_run or len(depth) != 1:
        return None
    out = []
    for col in zip(*per_run):
        out.append((statistics.fmean(col), statistics.stdev(col) if len(col) > 1 else 0.0, len(col)))
    return out


def draw_grad_norms(name: str, norms: dict):
    """The gradient norm reaching each layer at the final epoch, per row (mean ± std over its seeds), log y."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, rows) in enumerate(norms.items()):
        layers = list(range(1, len(rows) + 1))
        mean = [m for m, _, _ in rows]
        std = [s for _, s, _ in rows]
        n = rows[0][2]
        ax.errorbar(
            layers,
            mean,
            yerr=std,
            marker="o",
            ms=4,
            capsize=3,
            color=f"C{i}",
            label=f"{label} ({_n_text(n)})",
        )
    ax.set_yscale("log")
    ax.set_xlabel("layer (1 = next to the embedding)")
    ax.set_ylabel("gradient norm of the layer's parameters")
    ax.set_title(f"{name}: gradient norm by layer, final epoch (mean over its steps)", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


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


def expected_best_figure(curves: dict[str, list[dict]], path: Path, proxy: str) -> None:
    """make compare: the expected best proxy validation perplexity after n trials, per model, with its 95%
    bootstrap band (rows of tune.expected_best_curve)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (model, rows) in enumerate(curves.items()):
        color = f"C{i}"
        ns = [r["n"] for r in rows]
        ax.plot(ns, [r["expected_best"] for r in rows], marker="o", ms=3, color=color, label=model)
        ax.fill_between(ns, [r["lo"] for r in rows], [r["hi"] for r in rows], color=color, alpha=0.18, lw=0)
    ax.set_xlabel("trials (n)")
    ax.set_ylabel("expected best validation perplexity")
    ax.set_title(f"Expected best of n trials (95% bootstrap band)\n{proxy}", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)
