"""`make report`'s tables as LaTeX (`report.tex`): one booktabs `table` per table of report.md, with the
same numbers (mean ± standard deviation over seeds, Δ from the baseline with its 95% confidence interval and
p), ready for `\\input{}` into a paper. Needs only `\\usepackage{booktabs}`."""

from __future__ import annotations

import re

TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
COLUMNS = "lrrrrrrrr"
HEADER = (
    r"Model & Params & Valid ppl & Test ppl & Seeds & $\Delta$ valid [95\% CI] & $p$ & $\Delta$ test [95\% CI]"
    r" & $p$ \\"
)


def tex_escape(text: str) -> str:
    """Text with LaTeX's special characters escaped (an underscore in a model's name, say)."""
    return "".join(TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _num(v: float, plus: bool = False) -> str:
    """A number in math mode, where "-" is a true minus sign; with plus=True a "+" on the positive ones."""
    return f"${'+' if plus and v >= 0 else ''}{v:.2f}$"


def _pm(mean, std, n: int, bold: bool) -> str:
    if mean is None:
        return "--"
    text = f"{mean:.2f} $\\pm$ {std:.2f}" if n > 1 and std is not None else f"{mean:.2f}"
    return f"\\textbf{{{text}}}" if bold else text


def _params(n) -> str:
    return "--" if n is None else f"{n / 1e6:.2f}M"


def _delta(d) -> str:
    if d.delta is None:
        return ""
    if d.method == "n too small" or d.low is None or d.high is None:
        return _num(d.delta, plus=True)
    return f"{_num(d.delta, plus=True)} [{_num(d.low)}, {_num(d.high)}]"


def _p(d) -> str:
    if d.delta is None or d.method == "n too small":
        return ""
    if d.p is None:
        return "--"
    return "$<0.001$" if d.p < 0.001 else f"{d.p:.3f}"


def _row(t, r, best: dict) -> str:
    v = r.values()
    if r.published:
        cells = [f"\\textit{{{tex_escape(r.label)}}}", _params(v.get("params"))]
        cells += [_pm(v.get("val_mean"), None, 1, False), _pm(v.get("test_mean"), None, 1, False)]
        return " & ".join(cells + [""] * 5) + r" \\"
    dv, dt = t.diff(r, "val/ppl"), t.diff(r, "test/ppl")
    if r is t.baseline_for(r):
        diffs = ["baseline", "", "baseline", ""]
    else:
        diffs = [_delta(dv), _p(dv), _delta(dt), _p(dt)]
    cells = [
        tex_escape(r.label),
        _params(v["params"]),
        _pm(v["val_mean"], v["val_std"], v["n"], v["val_mean"] is not None and v["val_mean"] == best["val"]),
        _pm(
            v["test_mean"],
            v["test_std"],
            v["n"],
            v["test_mean"] is not None and v["test_mean"] == best["test"],
        ),
        str(v["n"]),
        *diffs,
    ]
    return " & ".join(cells) + r" \\"


def _caption(t) -> str:
    methods = {t.diff(r, k).method for r in t.rows for k in ("val/ppl", "test/ppl")} - {""}
    text = (
        f"Perplexity, {tex_escape(t.data)} ({tex_escape(t.name)}): mean $\\pm$ standard deviation over seeds, "
        "the lowest perplexity of each column in bold"
    )
    if t.baseline is not None:
        of = " of the same depth" if t.by_depth else ""
        test = {
            frozenset({"paired"}): "a paired $t$-test by seed",
            frozenset({"Welch"}): "Welch's $t$-test",
        }.get(
            frozenset(methods - {"n too small"}),
            "a $t$-test, paired by seed where the seeds match, Welch's otherwise",
        )
        text += (
            f"; $\\Delta$ is row $-$ {tex_escape(t.baseline.variant if t.by_depth else t.baseline.label)}{of}, "
            f"with its 95\\% confidence interval and the two-sided $p$ of {test}"
        )
        if "n too small" in methods:
            text += " (none under two seeds on a side)"
    return text + "."


def _label(t, i: int) -> str:
    return "tab:ppl-" + (re.sub(r"[^a-z0-9]+", "-", f"{t.name}-{t.data}".lower()).strip("-") or str(i))


def render_latex(tables: list, source: str) -> str:
    """Every table as a booktabs `table` environment; published rows in italics below a rule."""
    out = [
        f"% make report's perplexity tables from {source}; needs \\usepackage{{booktabs}}",
        "% (report.md and report.csv hold the same numbers, with tokens/s, wall time and the runs' paths)",
        "",
    ]
    labels: set[str] = set()
    for i, t in enumerate(tables):
        ours = [r for r in t.rows if not r.published]
        published = [r for r in t.rows if r.published]
        means = {k: [r.values()[f"{k}_mean"] for r in ours] for k in ("val", "test")}
        best = {k: min((m for m in ms if m is not None), default=None) for k, ms in means.items()}
        label = _label(t, i)
        while label in labels:
            label += "-b"
        labels.add(label)
        out += [
            r"\begin{table}[t]",
            r"\centering",
            f"\\caption{{{_caption(t)}}}",
            f"\\label{{{label}}}",
            f"\\begin{{tabular}}{{{COLUMNS}}}",
            r"\toprule",
            HEADER,
            r"\midrule",
            *(_row(t, r, best) for r in ours),
        ]
        if published:
            out += [r"\midrule", *(_row(t, r, best) for r in published)]
        out += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(out)
