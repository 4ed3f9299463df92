"""The report, checked against the runs' own metrics.json files, from two tiny real sweeps."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest

from dglstm_lm.report import build_report, distinguishing_keys

from .conftest import PY, run_cli
from .test_sweeps import TINY, jobs, sweep


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory, ptb_dir, ptb_root):
    base = tmp_path_factory.mktemp("report")
    out = base / "outputs"
    # sweep 1: the smoke recipe, two variants × two seeds (one W&B group)
    r1, s1 = sweep(
        base,
        ptb_dir,
        ptb_root,
        "model=lstm,dglstm",
        "seed=1,2",
        sweep_dir=out / "multirun" / "2026-01-01" / "10-00-00",
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    # sweep 2: a sentence-level recipe (another table), one variant with a failing value
    r2, s2 = sweep(
        base,
        ptb_dir,
        ptb_root,
        "logger=none",
        "model=stacked_lstm",
        "trainer.lr=1,-1",
        sweep_dir=out / "multirun" / "2026-01-01" / "11-00-00",
        base=["experiment=yao_sentence", *TINY[1:]],
    )
    assert r2.returncode == 1, r2.stderr[-2000:]
    return out, s1, s2


@pytest.mark.slow
def test_report_numbers_equal_the_runs(two_sweeps):
    out, s1, s2 = two_sweeps
    res = build_report(out, out / "report", wandb_mode="offline")
    assert res["tables"] == 2 and res["problems"] == 1
    rows = list(csv.DictReader((out / "report" / "report.csv").open()))
    ours = [r for r in rows if r["published"] == "0"]
    smoke = {r["model"]: r for r in ours if r["table"] == "smoke"}
    assert set(smoke) == {"lstm", "dglstm"}
    for model, row in smoke.items():
        ms = [m for m in jobs(s1).values() if m["model"] == model]
        assert int(row["n_seeds"]) == 2 and row["seeds"] == "1 2"
        for key, col in (("val/ppl", "val_ppl"), ("test/ppl", "test_ppl")):
            vals = [m[key] for m in ms]
            assert float(row[f"{col}_mean"]) == pytest.approx(statistics.fmean(vals), rel=1e-12)
            assert float(row[f"{col}_std"]) == pytest.approx(statistics.stdev(vals), rel=1e-9)
        assert int(row["params"]) == ms[0]["num_params"]
    sentence = [r for r in ours if r["table"] == "yao_sentence"]
    good = next(m for m in jobs(s2).values() if m["status"] == "completed")
    assert len(sentence) == 1 and float(sentence[0]["test_ppl_mean"]) == pytest.approx(
        good["test/ppl"], rel=1e-12
    )
    md = (out / "report" / "report.md").read_text()
    assert "## smoke" in md and "## yao_sentence" in md and "Runs not in the tables" in md
    assert "trainer.lr: must be positive" in md  # the failed job, listed with its reason


@pytest.mark.slow
def test_report_has_published_reference_rows_for_zaremba_tables(two_sweeps, tmp_path):
    out, s1, _ = two_sweeps
    # relabel one run as the zaremba_small recipe: the published rows appear beside it
    run = next(iter(s1.glob("model=lstm,seed=1")))
    copy = tmp_path / "outputs" / "runs" / "x"
    copy.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["name"] = "zaremba_small"
    (copy / "config.json").write_text(json.dumps(cfg))
    build_report(tmp_path / "outputs", tmp_path / "outputs" / "report", wandb_mode="disabled")
    md = (tmp_path / "outputs" / "report" / "report.md").read_text()
    assert "*Zaremba et al. 2014, small (published)*" in md and "120.70 | 114.50" in md


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_figures_are_valid_pngs(two_sweeps):
    out, _, _ = two_sweeps
    res = build_report(out, out / "report", wandb_mode="disabled")
    figs = [Path(p) for p in res["figures"]]
    assert len(figs) == 6  # curves, test bars and gradient norms by layer for each of the two tables
    for f in figs:
        w, h = _png_size(f)
        assert 400 <= w <= 2000 and 300 <= h <= 1500 and f.stat().st_size > 10_000


@pytest.mark.slow
def test_report_logs_a_wandb_table_in_the_sweeps_group(two_sweeps):
    out, s1, _ = two_sweeps
    res = build_report(s1, out / "report-s1", wandb_mode="offline")
    (offline,) = list((out / "report-s1" / "wandb").glob("offline-run-*"))
    import subprocess

    text = subprocess.run(
        [str(Path(PY).parent / "wandb"), "leet", "inspect", "--json", str(offline)],
        capture_output=True,
        text=True,
    ).stdout
    run = next(json.loads(line)["run"] for line in text.splitlines() if '"type":"run"' in line)
    assert run["run_group"] == "sweep-2026-01-01_10-00-00" and run["job_type"] == "report"
    assert res["wandb_id"] == run["run_id"]
    (table_file,) = list((offline / "files" / "media" / "table").glob("perplexity_*.table.json"))
    logged = json.loads(table_file.read_text())
    rows = list(csv.reader((out / "report-s1" / "report.csv").open()))
    assert logged["columns"] == rows[0]
    for got, want in zip(logged["data"], rows[1:], strict=True):
        assert [("" if v is None else str(v)) for v in got] == want
    images = sorted(p.name for p in (offline / "files" / "media" / "images" / "figures").glob("*.png"))
    assert len(images) == 3 and all(  # curves, test bars, gradient norms by layer
        _png_size(p)[0] > 0 for p in (offline / "files" / "media" / "images" / "figures").glob("*.png")
    )


@pytest.mark.slow
def test_report_on_empty_outputs_and_single_run(tmp_path, two_sweeps):
    r = run_cli(
        [PY, "-m", "dglstm_lm.report", "--dir", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]
    )
    assert r.returncode == 2 and "does not exist" in r.stderr  # a typo in dir= is an error
    (tmp_path / "empty").mkdir()
    r = run_cli(
        [PY, "-m", "dglstm_lm.report", "--dir", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]
    )
    assert r.returncode == 0 and "no runs found" in r.stdout
    out, s1, _ = two_sweeps
    single = next(s1.glob("model=dglstm,seed=2"))
    r = run_cli(
        [
            PY,
            "-m",
            "dglstm_lm.report",
            "--dir",
            str(single),
            "--out",
            str(tmp_path / "rep1"),
            "--wandb-mode",
            "disabled",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = [x for x in csv.DictReader((tmp_path / "rep1" / "report.csv").open()) if x["published"] == "0"]
    assert (
        len(rows) == 1
        and float(rows[0]["test_ppl_mean"]) == json.loads((single / "metrics.json").read_text())["test/ppl"]
    )


@pytest.mark.slow
def test_report_on_a_sweep_in_progress(two_sweeps, tmp_path):
    """A job still running (metrics.json says running, history partly written) is listed as unfinished."""
    out, s1, _ = two_sweeps
    import shutil

    live = tmp_path / "live"
    shutil.copytree(s1, live, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    job = live / "model=lstm,seed=2"
    m = json.loads((job / "metrics.json").read_text())
    m.update(status="running", **{"test/ppl": None})
    (job / "metrics.json").write_text(json.dumps(m))
    with (job / "history.jsonl").open("a") as f:
        f.write('{"epoch": 2, "val/p')  # a line being written
    (live / "model=rnn,seed=9").mkdir()
    (live / "model=rnn,seed=9" / "config.json").write_text(
        (job / "config.json").read_text()
    )  # not started yet
    res = build_report(live, tmp_path / "rep", wandb_mode="disabled")
    assert res["problems"] == 2
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| running |" in md and "| not started |" in md
    lstm = next(r for r in csv.DictReader((tmp_path / "rep" / "report.csv").open()) if r["model"] == "lstm")
    assert lstm["n_seeds"] == "1"


def test_rows_are_labelled_by_what_tells_them_apart():
    """A model's own options do not label rows of other models; keys shared by all rows do when they vary."""
    stacked = {"model.name": '"stacked_lstm"', "trainer.lr": "1"}
    dg = {"model.name": '"dglstm"', "trainer.lr": "1", "model.peephole": "false", "model.gate_input": "false"}
    per_row, union = distinguishing_keys([stacked, dg])
    assert per_row == [[], []] and union == []  # the recipe's own comparison: the model name says it all
    dg_peep = {**dg, "model.peephole": "true"}
    per_row, union = distinguishing_keys([stacked, dg, dg_peep])
    assert per_row == [[], ["model.peephole"], ["model.peephole"]] and union == ["model.peephole"]
    fast = {**stacked, "trainer.lr": "2"}
    per_row, union = distinguishing_keys([stacked, fast, dg])
    assert per_row == [["trainer.lr"]] * 3 and union == ["trainer.lr"]
    # an option present in some rows of one model only is a difference between those rows
    dg_bias = {**dg, "model.depth_gate_bias": "-1"}
    per_row, _ = distinguishing_keys([dg, dg_bias])
    assert per_row == [["model.depth_gate_bias"], ["model.depth_gate_bias"]]


def test_report_in_a_fresh_checkout_says_nothing_has_run(tmp_path, monkeypatch, capsys):
    from dglstm_lm.report import main

    monkeypatch.chdir(tmp_path)  # no outputs/ at all
    assert main([]) == 0
    assert "no runs found under outputs/" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()  # and nothing was written


# ------------------------------------------------------------------------ statistics, from fabricated runs
# Each run is written as the trainer leaves it (config.json + metrics.json), with known perplexities; the
# expected numbers are computed here from the textbook formulas, not by the report's own functions.
T975 = 0.975


def fake_run(root: Path, folder: str, model: str, seed: int, val: float, test: float, **opts) -> Path:
    """A finished run as train.py writes it; `updated_at` (when it completed) orders repeats of a seed."""
    status = opts.pop("status", "completed")
    updated = opts.pop("updated_at", "2026-01-01T10:00:00+00:00")
    name = opts.pop("name", "fake")
    run = root / folder
    run.mkdir(parents=True)
    config = {
        "name": name,
        "seed": seed,
        "model": {"name": model, "num_layers": 2, **opts},
        "data": {"name": "ptb", "batching": "stream"},
        "trainer": {"lr": 1.0, "max_epochs": 2},
    }
    (run / "config.json").write_text(json.dumps(config))
    metrics = {
        "status": status,
        "model": model,
        "name": name,
        "seed": seed,
        "num_params": 1000,
        "epochs_completed": 2,
        "val/ppl": val,
        "test/ppl": test if status == "completed" else None,
        "train/tokens_per_s": 5000.0,
        "wall_s": 60.0,
        "updated_at": updated,
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    history = [{"epoch": 1, "val/ppl": val * 1.5}, {"epoch": 2, "val/ppl": val}]
    (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    return run


# table "fake": {row: {seed: (valid, test)}} of the runs the report should use
STACKED = {1: (105.0, 100.0), 2: (107.0, 102.0), 3: (106.5, 101.0)}
DGLSTM = {1: (99.0, 94.0), 2: (102.5, 97.0), 3: (100.0, 95.5)}  # same seeds as the baseline: paired
LSTM = {1: (116.0, 110.0), 2: (118.0, 113.5)}  # seeds 1 2 against 1 2 3: Welch
PEEP = {4: (101.0, 96.0)}  # one seed: n too small
DG = "dglstm (peephole=False)"  # the rows' labels: the dglstm rows differ in peephole


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats") / "outputs"
    for seed, (v, t) in STACKED.items():
        fake_run(root, f"s{seed}", "stacked_lstm", seed, v, t)
    for seed, (v, t) in DGLSTM.items():
        fake_run(root, f"d{seed}", "dglstm", seed, v, t)
    # dglstm seed 2 once more, earlier and with other numbers, in a folder that sorts after the later run
    fake_run(root, "d2-old", "dglstm", 2, 300.0, 290.0, updated_at="2025-12-01T10:00:00+00:00")
    # lstm: seed 1 twice (the later run in the folder that sorts first), seed 2 once; and a later run of
    # seed 1 that failed, which is no completed run at all
    fake_run(root, "l1-a", "lstm", 1, *LSTM[1], updated_at="2026-01-02T10:00:00+00:00")
    fake_run(root, "l1-b", "lstm", 1, 500.0, 480.0, updated_at="2026-01-01T09:00:00+00:00")
    fake_run(root, "l1-c", "lstm", 1, 700.0, 0.0, status="failed", updated_at="2026-01-03T10:00:00+00:00")
    fake_run(root, "l2", "lstm", 2, *LSTM[2])
    for seed, (v, t) in PEEP.items():
        fake_run(root, f"p{seed}", "dglstm", seed, v, t, peephole=True)
    # another recipe without a stacked LSTM: its first row is the default baseline
    for seed in (1, 2):
        fake_run(root, f"o-lstm{seed}", "lstm", seed, 120.0 + seed, 115.0 + seed, name="other")
        fake_run(root, f"o-dg{seed}", "dglstm", seed, 110.0 + 2 * seed, 105.0 + 3 * seed, name="other")
    return root


def _report(root: Path, name: str, baseline=None) -> dict:
    """report.csv of our (not published) rows as {(table, row): {column: text}}, and report.md."""
    out = root.parent / name  # beside outputs/: the report names the runs as outputs/<run>
    build_report(root, out, wandb_mode="disabled", baseline=baseline)
    rows = csv.DictReader((out / "report.csv").open())
    return {(r["table"], r["row"]): r for r in rows if r["published"] == "0"}, (out / "report.md").read_text()


def _num(text: str) -> float:
    return float(text)


def _paired(a: list[float], b: list[float]):
    from scipy.stats import t

    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    se = d.std(ddof=1) / math.sqrt(n)
    half = t.ppf(T975, n - 1) * se
    return d.mean(), d.mean() - half, d.mean() + half, 2 * t.sf(abs(d.mean() / se), n - 1)


def _welch(a: list[float], b: list[float]):
    from scipy.stats import t

    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    diff = a.mean() - b.mean()
    half = t.ppf(T975, df) * se
    return diff, diff - half, diff + half, 2 * t.sf(abs(diff / se), df)


def _check_diff(row: dict, metric: str, expected, test: str) -> None:
    delta, low, high, p = expected
    assert _num(row[f"{metric}_ppl_delta"]) == pytest.approx(delta, rel=1e-12)
    assert _num(row[f"{metric}_ppl_delta_ci_low"]) == pytest.approx(low, rel=1e-9)
    assert _num(row[f"{metric}_ppl_delta_ci_high"]) == pytest.approx(high, rel=1e-9)
    assert _num(row[f"{metric}_ppl_delta_p"]) == pytest.approx(p, rel=1e-6)
    assert row[f"{metric}_ppl_delta_test"] == test


def test_a_seed_counts_once_by_its_latest_completed_run(fake_runs):
    rows, md = _report(fake_runs, "rep")
    lstm = rows[("fake", "lstm")]
    assert lstm["n_seeds"] == "2" and lstm["seeds"] == "1 2"  # not 3 (seed 1 twice), not 4 (the failed one)
    assert lstm["n_runs"] == "3" and lstm["repeats"] == "1:2"
    for i, metric in enumerate(("val", "test")):
        vals = [LSTM[1][i], LSTM[2][i]]  # the later run of seed 1, not the earlier one
        assert _num(lstm[f"{metric}_ppl_mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
        assert _num(lstm[f"{metric}_ppl_std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-12)
        half = t_ppf(T975, 1) * np.std(vals, ddof=1) / math.sqrt(2)
        assert _num(lstm[f"{metric}_ppl_ci_low"]) == pytest.approx(np.mean(vals) - half, rel=1e-9)
        assert _num(lstm[f"{metric}_ppl_ci_high"]) == pytest.approx(np.mean(vals) + half, rel=1e-9)
    dg = rows[("fake", DG)]
    assert dg["n_seeds"] == "3" and dg["n_runs"] == "4" and dg["repeats"] == "2:2"
    assert _num(dg["test_ppl_mean"]) == pytest.approx(np.mean([t for _, t in DGLSTM.values()]), rel=1e-12)
    stacked = rows[("fake", "stacked_lstm")]
    assert stacked["n_seeds"] == "3" and stacked["n_runs"] == "3" and stacked["repeats"] == ""
    # the markdown says so: the row's distinct seeds and its runs, and which run of a repeated seed is used
    assert "| 2 (3 runs) |" in md and "| 3 (4 runs) |" in md
    assert "latest completed run" in md
    assert "- lstm, seed 1: 2 runs; used `outputs/l1-a`, not `outputs/l1-b`" in md
    assert "- dglstm (peephole=False), seed 2: 2 runs; used `outputs/d2`, not `outputs/d2-old`" in md


def t_ppf(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def test_differences_from_the_baseline_paired_welch_and_n_too_small(fake_runs):
    rows, md = _report(fake_runs, "rep")
    fake = {row: r for (table, row), r in rows.items() if table == "fake"}
    assert {r["baseline"] for r in fake.values()} == {"stacked_lstm"}  # the default
    base = fake["stacked_lstm"]
    assert all(
        base[f"{m}_ppl_{k}"] == "" for m in ("val", "test") for k in ("delta", "delta_p", "delta_test")
    )
    seeds = sorted(STACKED)
    for i, metric in enumerate(("val", "test")):
        # dglstm: the same seeds 1 2 3 as the baseline, paired by seed
        _check_diff(
            fake[DG],
            metric,
            _paired([DGLSTM[s][i] for s in seeds], [STACKED[s][i] for s in seeds]),
            "paired",
        )
        # lstm: seeds 1 2 against 1 2 3, Welch
        _check_diff(
            fake["lstm"],
            metric,
            _welch([v[i] for v in LSTM.values()], [v[i] for v in STACKED.values()]),
            "Welch",
        )
        # one seed: the difference of the means, but no interval and no p-value
        peep = fake["dglstm (peephole=True)"]
        assert _num(peep[f"{metric}_ppl_delta"]) == pytest.approx(
            PEEP[4][i] - np.mean([v[i] for v in STACKED.values()]), rel=1e-12
        )
        assert peep[f"{metric}_ppl_delta_test"] == "n too small"
        assert peep[f"{metric}_ppl_delta_ci_low"] == peep[f"{metric}_ppl_delta_p"] == ""
    # the markdown table: readable columns, the test used, the baseline named
    assert "| Δ valid [95% CI] | p (valid) | Δ test [95% CI] | p (test) | t-test |" in md
    d, lo, hi, p = _paired([DGLSTM[s][1] for s in seeds], [STACKED[s][1] for s in seeds])
    assert f"| {d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {p:.3f} | paired |" in md
    d, lo, hi, p = _welch([v[1] for v in LSTM.values()], [v[1] for v in STACKED.values()])
    assert f"| {d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {p:.3f} | Welch |" in md
    assert "[n too small] | n too small | n too small |" in md
    assert "row − baseline (`stacked_lstm`)" in md and "| baseline |" in md
    # the other table has no stacked LSTM: its first row is the baseline
    other = {row: r for (table, row), r in rows.items() if table == "other"}
    assert {r["baseline"] for r in other.values()} == {"lstm"}
    assert other["dglstm"]["test_ppl_delta_test"] == "paired"


def test_baseline_by_model_name_and_by_row_label(fake_runs):
    # by model name: the first row of that model
    rows, md = _report(fake_runs, "by-model", baseline="dglstm")
    fake = {row: r for (table, row), r in rows.items() if table == "fake"}
    assert {r["baseline"] for r in fake.values()} == {DG}  # the first of the two dglstm rows
    assert fake[DG]["test_ppl_delta"] == ""
    seeds = sorted(STACKED)
    _check_diff(
        fake["stacked_lstm"],
        "test",
        _paired([STACKED[s][1] for s in seeds], [DGLSTM[s][1] for s in seeds]),  # row − baseline
        "paired",
    )
    other = {row: r for (table, row), r in rows.items() if table == "other"}
    assert {r["baseline"] for r in other.values()} == {"dglstm"}
    # by row label: a row whose model has other rows too; a table without it keeps its default, and says so
    rows, md = _report(fake_runs, "by-label", baseline="dglstm (peephole=True)")
    fake = {row: r for (table, row), r in rows.items() if table == "fake"}
    assert {r["baseline"] for r in fake.values()} == {"dglstm (peephole=True)"}
    assert fake[DG]["test_ppl_delta_test"] == "n too small"  # the baseline has one seed
    assert _num(fake[DG]["test_ppl_delta"]) == pytest.approx(
        np.mean([v[1] for v in DGLSTM.values()]) - PEEP[4][1], rel=1e-12
    )
    other = {row: r for (table, row), r in rows.items() if table == "other"}
    assert {r["baseline"] for r in other.values()} == {"lstm"}
    assert "`dglstm (peephole=True)` is not a row of this table" in md


def test_an_unknown_baseline_is_a_one_line_error(fake_runs, tmp_path, capsys):
    from dglstm_lm.report import main

    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as exc:
        main(["--dir", str(fake_runs), "--out", str(out), "--wandb-mode", "disabled", "--baseline", "gru"])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: unknown baseline 'gru'")
    for label in ("'stacked_lstm'", "'lstm'", f"'{DG}'", "'dglstm (peephole=True)'", "other: 'lstm'"):
        assert label in err  # the rows there are to choose from
    assert not out.exists()  # and nothing was written


def test_report_csv_has_the_comparison_columns(fake_runs, tmp_path):
    build_report(fake_runs, tmp_path / "rep", wandb_mode="disabled")
    header = next(csv.reader((tmp_path / "rep" / "report.csv").open()))
    for col in (
        "n_seeds",
        "n_runs",
        "repeats",
        "baseline",
        "test_ppl_ci_low",
        "test_ppl_ci_high",
        *(
            f"{m}_ppl_{k}"
            for m in ("val", "test")
            for k in ("delta", "delta_ci_low", "delta_ci_high", "delta_p", "delta_test")
        ),
    ):
        assert col in header


# ------------------------------------------------------------------------ figures and runs in progress
# Runs written as the trainer leaves them (config.json, metrics.json, history.jsonl), no training: the figures
# are checked through their matplotlib objects, for one seed or many, two epochs or many, runs in progress.
def with_history(
    run: Path, vals: list[float], status: str | None = None, max_epochs: int | None = None
) -> Path:
    """Give a fake run `vals` as its finished epochs' validation perplexity (and a status, e.g. running)."""
    (run / "history.jsonl").write_text(
        "".join(json.dumps({"epoch": e, "val/ppl": v}) + "\n" for e, v in enumerate(vals, 1))
    )
    m = json.loads((run / "metrics.json").read_text())
    m.update(
        epochs_completed=len(vals), max_epochs=max_epochs or len(vals), **{"val/ppl": min(vals, default=None)}
    )
    if status is not None:
        m.update(status=status, **{"test/ppl": None})
    (run / "metrics.json").write_text(json.dumps(m))
    return run


def _curve(first: float, last: float, epochs: int) -> list[float]:
    return [last + (first - last) * 0.6**e for e in range(epochs)]


def _figures(root: Path) -> dict:
    """{key: figure} as the report draws them for the runs under root (the caller closes them)."""
    from dglstm_lm import report, report_figures

    runs = report.find_runs(root)
    tables = report.build_tables(runs)
    report.choose_baselines(tables)
    progress = report.group_in_progress(runs, tables)
    return {key: fig for key, _, fig in report_figures.figures(tables, progress)}


def _close(figs: dict) -> None:
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def _integer_epoch_ticks(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    return ticks


def _legend_clear_of_the_data(fig, ax) -> None:
    """The legend sits outside the axes: it covers no point, bar or line of the data."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer))
    page = fig.bbox
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]  # those drawn
    for text in [ax.title, *ticks, *fig.legends[0].get_texts()]:  # nothing cut off
        ext = text.get_window_extent(renderer)
        assert page.x0 <= ext.x0 and ext.x1 <= page.x1 and page.y0 <= ext.y0 and ext.y1 <= page.y1, text
    points = [xy for line in ax.lines for xy in line.get_xydata()]  # markers, line vertices
    for c in ax.collections:
        if hasattr(c, "get_segments"):  # the error bars' whiskers
            points += [xy for seg in c.get_segments() for xy in seg]
        elif len(c.get_offsets()):  # the seeds' dots
            points += list(c.get_offsets())
    assert points
    for x, y in ax.transData.transform(np.asarray(points, dtype=float)):
        if np.isfinite(x) and np.isfinite(y):  # (a published line spans the axes: x in axes units)
            assert not box.contains(x, y)


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def _errorbars(ax) -> list:
    from matplotlib.container import ErrorbarContainer

    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_figures_for_one_seed_and_two_epochs(tmp_path):
    root = tmp_path / "outputs"
    with_history(fake_run(root, "s1", "stacked_lstm", 1, 140.0, 135.0, name="zaremba_small"), [210.0, 140.0])
    with_history(fake_run(root, "d1", "dglstm", 1, 133.0, 128.0, name="zaremba_small"), [200.0, 133.0])
    figs = _figures(root)
    try:
        fig = figs[(0, "curves")]
        ax = fig.axes[0]
        assert _integer_epoch_ticks(ax) == [1, 2]  # not 1.0 1.2 1.4 …
        title = ax.get_title()
        assert "n = 1" in title and "mean ± std" not in title
        assert not ax.collections  # no ± std band for one seed
        texts = _legend_texts(fig)
        assert "stacked_lstm (n = 1, single seed)" in texts
        assert "Zaremba et al. 2014, small (published): valid 120.7" in texts
        _legend_clear_of_the_data(fig, ax)

        fig = figs[(0, "test")]
        ax = fig.axes[0]
        assert not _errorbars(ax)  # no zero-length error bar for a single seed
        assert [t.get_text() for t in ax.get_xticklabels()] == ["stacked_lstm\nn = 1", "dglstm\nn = 1"]
        lo, hi = ax.get_ylim()
        shown = [135.0, 128.0, 114.5, 115.91]  # the rows and both published results
        assert lo > 100 and hi < 150  # around the data, not from 0
        margin = 0.05 * (hi - lo)
        assert all(lo + margin < v < hi - margin for v in shown)
        assert "n = 1" in ax.get_title() and "interval" in ax.get_title()
        texts = _legend_texts(fig)
        assert "Zaremba et al. 2014, small (published): 114.5" in texts
        assert "TensorFlow PTB tutorial, small (published): 115.91" in texts
        published = [line for line in ax.lines if line.get_label().endswith("(published): 114.5")]
        published += [line for line in ax.lines if line.get_label().endswith("(published): 115.91")]
        assert len(published) == 2
        styles = {(str(line.get_linestyle()), str(line.get_color())) for line in published}
        assert len(styles) == 2  # two nearly equal values, two distinguishable lines
        _legend_clear_of_the_data(fig, ax)
    finally:
        _close(figs)


def test_figures_for_three_seeds_and_thirteen_epochs(tmp_path):
    root = tmp_path / "outputs"
    tests = {"lstm": (88.0, 90.0, 89.0), "stacked_lstm": (84.0, 85.5, 85.0), "dglstm": (80.0, 81.0, 83.0)}
    for model, values in tests.items():
        for seed, test in enumerate(values, 1):
            run = fake_run(root, f"{model}{seed}", model, seed, test + 4, test, name="zaremba_medium")
            with_history(run, _curve(300.0 + seed, test + 4, 13))
    figs = _figures(root)
    try:
        fig = figs[(0, "curves")]
        ax = fig.axes[0]
        ticks = _integer_epoch_ticks(ax)
        assert 1 <= min(ticks) and max(ticks) >= 12
        assert "mean ± std over n = 3 seeds" in ax.get_title()
        assert len(ax.collections) == 3  # a band per row
        assert "dglstm (n = 3 seeds)" in _legend_texts(fig)
        _legend_clear_of_the_data(fig, ax)

        fig = figs[(0, "test")]
        ax = fig.axes[0]
        bars = _errorbars(ax)
        assert len(bars) == 3  # one CI per row
        lo, hi = ax.get_ylim()
        assert lo > 60  # the data are 80–90 (published 82.7, 82.07): no axis from 0
        for bar in bars:  # the whiskers and the mean are inside the axis
            (segments,) = [c.get_segments() for c in bar.lines[2]]
            ys = [y for seg in segments for _, y in seg]
            assert lo < min(ys) and max(ys) < hi
        for line in ax.lines:
            assert all(lo < y < hi for y in line.get_ydata())
        assert "n = 3" in ax.get_xticklabels()[0].get_text()
        assert "95% t-interval" in ax.get_title() and "n = 1" not in ax.get_title()
        assert {"seeds", "mean, 95% CI"} <= set(_legend_texts(fig))
        _legend_clear_of_the_data(fig, ax)
    finally:
        _close(figs)


def test_a_sweep_in_progress_shows_the_curves_of_its_running_jobs(tmp_path):
    """Nothing completed yet: the report shows the finished epochs of the running (and interrupted) jobs as
    curves marked running, and lists them with their epochs and best valid perplexity."""
    sweep_dir = tmp_path / "outputs" / "multirun" / "gate"
    runs = {}
    for gate, seed, epochs, status in (
        ("open", 1, 6, "running"),
        ("open", 2, 7, "running"),
        ("constant", 1, 5, "interrupted"),
    ):
        run = fake_run(sweep_dir, f"gate={gate},seed={seed}", "dglstm", seed, 0, 0, depth_gate=gate)
        runs[(gate, seed)] = with_history(run, _curve(250.0, 100.0 + seed, epochs), status, 13)
    # running, but no epoch finished yet: listed as not in the tables, no curve
    run = fake_run(sweep_dir, "gate=constant,seed=2", "dglstm", 2, 0, 0, depth_gate="constant")
    with_history(run, [], "running", 13)
    out = tmp_path / "outputs" / "report"
    res = build_report(sweep_dir, out, wandb_mode="disabled")
    assert res["tables"] == 0 and res["problems"] == 4 and res["in_progress"] == 3
    md = (out / "report.md").read_text()
    assert md.startswith(f"# Perplexity report: `{sweep_dir}`")  # the directory reported on
    assert "No completed runs yet." in md and "## Runs in progress" in md
    best = min(_curve(250.0, 102.0, 7))
    assert (
        f"| `multirun/gate/gate=open,seed=2` | running | fake (PTB, verified, stream): dglstm (depth_gate=open) | 7 of 13 | {best:.2f} (7) |"
        in md
    )
    assert "| `multirun/gate/gate=constant,seed=1` | interrupted |" in md and "| 5 of 13 |" in md
    assert "gate=constant,seed=2` | running | fake" not in md  # no finished epoch: not in progress
    (fig_path,) = [Path(p) for p in res["figures"]]
    assert fig_path.name == "fake_progress0_curves.png" and f"](figures/{fig_path.name})" in md
    assert _png_size(fig_path)[0] > 400

    figs = _figures(sweep_dir)
    try:
        fig = figs[(0, "progress")]
        ax = fig.axes[0]
        assert "so far" in ax.get_title() and "runs in progress" in ax.get_title()
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert len(dashed) == 3  # one line per running run
        assert max(len(line.get_xdata()) for line in dashed) == 7
        texts = _legend_texts(fig)
        assert "dglstm (depth_gate=open) — running: seed 1 at epoch 6, seed 2 at epoch 7 of 13" in texts
        assert "dglstm (depth_gate=constant) — interrupted: seed 1 at epoch 5 of 13" in texts
        _integer_epoch_ticks(ax)
        _legend_clear_of_the_data(fig, ax)
    finally:
        _close(figs)


def test_running_jobs_join_their_tables_curves(tmp_path):
    """A table with completed runs draws its running jobs (dashed, in the row's colour) in its curves; the
    table itself holds the completed runs only. Many seeds in progress read as one legend entry."""
    root = tmp_path / "outputs"
    for seed in (1, 2):
        with_history(fake_run(root, f"s{seed}", "stacked_lstm", seed, 110.0, 105.0), _curve(260, 110, 6))
    for seed in (3, 4, 5, 6):
        run = fake_run(root, f"s{seed}", "stacked_lstm", seed, 0, 0)
        with_history(run, _curve(260, 112, seed), "running", 6)
    with_history(fake_run(root, "d1", "dglstm", 1, 100.0, 96.0), _curve(250, 100, 6))  # n = 1
    with_history(fake_run(root, "d2", "dglstm", 2, 0, 0), _curve(250, 101, 4), "running", 6)
    out = tmp_path / "report"
    res = build_report(root, out, wandb_mode="disabled")
    rows = [r for r in csv.DictReader((out / "report.csv").open()) if r["published"] == "0"]
    assert [(r["model"], r["n_seeds"]) for r in rows] == [("stacked_lstm", "2"), ("dglstm", "1")]
    assert len(res["figures"]) == 2 and res["in_progress"] == 5
    md = (out / "report.md").read_text()
    assert "are in its table's curves figure above" in md
    figs = _figures(root)
    try:
        ax = figs[(0, "curves")].axes[0]
        solid = {line.get_label(): line for line in ax.lines if line.get_linestyle() == "-"}
        dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert list(solid) == ["stacked_lstm (n = 2 seeds)", "dglstm (n = 1, single seed)"]
        assert len(dashed) == 5
        assert [line.get_color() for line in dashed] == [
            solid["stacked_lstm (n = 2 seeds)"].get_color()
        ] * 4 + [solid["dglstm (n = 1, single seed)"].get_color()]  # a row's runs in progress in its colour
        texts = _legend_texts(figs[(0, "curves")])
        assert "stacked_lstm — running: 4 seeds at epochs 3–6 of 6" in texts
        assert "dglstm — running: seed 2 at epoch 4 of 6" in texts
        title = ax.get_title()
        assert "mean ± std over seeds (n per row in the legend; no band for n = 1)" in title
        assert "runs in progress" in title
        _legend_clear_of_the_data(figs[(0, "curves")], ax)
        ax = figs[(0, "test")].axes[0]  # two seeds of equal test ppl: no zero-length error bar either
        assert not _errorbars(ax) and "105.0 (no spread)" in [t.get_text() for t in ax.texts]
        _legend_clear_of_the_data(figs[(0, "test")], ax)
    finally:
        _close(figs)


def test_a_new_report_removes_the_figures_of_the_previous_one(tmp_path):
    root = tmp_path / "outputs"
    fake_run(root, "a1", "lstm", 1, 110.0, 105.0, name="first")
    out = root / "report"
    res = build_report(root, out, wandb_mode="disabled")
    old = {Path(p).name for p in res["figures"]}
    assert old == {"first_0_curves.png", "first_0_test.png"}
    (out / "figures" / "notes.png").write_bytes(b"not the report's")  # not a name the report writes
    (out / "figures" / "a_test.png").write_bytes(b"nor this")
    # the runs change: another recipe, and so other figures
    cfg = json.loads((root / "a1" / "config.json").read_text())
    (root / "a1" / "config.json").write_text(json.dumps({**cfg, "name": "second"}))
    res = build_report(root, out, wandb_mode="disabled")
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "a_test.png",
        "notes.png",
        "second_0_curves.png",
        "second_0_test.png",
    ]
    # no runs left at all: no figure of the report stays either
    import shutil

    shutil.rmtree(root / "a1")
    build_report(root, out, wandb_mode="disabled")
    assert sorted(p.name for p in (out / "figures").iterdir()) == ["a_test.png", "notes.png"]


def test_the_heading_names_the_directory_reported_on(tmp_path, monkeypatch, capsys):
    from dglstm_lm.report import main

    monkeypatch.chdir(tmp_path)
    fake_run(Path("outputs/multirun/day/time"), "job", "lstm", 1, 110.0, 105.0)
    fake_run(Path("outputs/runs/other"), "job", "dglstm", 1, 100.0, 95.0)
    assert main(["--dir", "outputs/multirun/day/time", "--wandb-mode", "disabled"]) == 0
    md = Path("outputs/report/report.md").read_text()
    assert md.startswith("# Perplexity report: `outputs/multirun/day/time`\n")
    assert "`multirun/day/time/job`" not in md and "dglstm" not in md  # only that sweep
    assert "](figures/fake_0_curves.png)" in md  # links relative to report.md, as before
    assert main(["--wandb-mode", "disabled"]) == 0
    assert Path("outputs/report/report.md").read_text().startswith("# Perplexity report: `outputs`\n")
    capsys.readouterr()


def test_no_function_of_the_report_is_long():
    import ast

    import dglstm_lm.report as report
    import dglstm_lm.report_figures as figures

    for module in (report, figures):
        tree = ast.parse(Path(module.__file__).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{module.__name__}.{node.name}: {length} lines"


def test_runs_on_two_corpora_are_never_pooled(tmp_path, ptb_dir, ptb_root):
    """The same config and seeds trained on two small corpora of one's own (data.dir=... with
    data.verify_checksums=false) and on PTB: three tables, never one row, seed or Δ across corpora; each run
    records its data (digest, vocabulary, token counts) and an unverified run's config claims no sums; the
    recipe's published PTB rows stand only beside PTB."""
    from dglstm_lm.config import compose
    from dglstm_lm.data import corpus_digest
    from dglstm_lm.report import build_tables, find_runs
    from dglstm_lm.train import train

    from .conftest import TINY_TEST, TINY_TRAIN, TINY_VALID, write_corpus

    a = write_corpus(tmp_path / "corpus_a")
    b = write_corpus(
        tmp_path / "corpus_b", train=[*TINY_TRAIN, "a bird and a fish"], valid=TINY_VALID, test=TINY_TEST
    )
    out = tmp_path / "outputs"
    common = [
        "experiment=smoke",
        "name=zaremba_small",  # a recipe with published PTB rows
        "model=stacked_lstm",
        "model.emb_dim=8",
        "model.hidden_dim=8",
        "logger=none",
        "trainer.progress=off",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_eval_batches=2",
        "trainer.batch_size=2",
        "trainer.eval_batch_size=2",
        "trainer.bptt=5",
        f"paths.data_dir={ptb_root}",
    ]
    runs = {}
    for corpus, data in (("a", [f"data.dir={a}", "data.verify_checksums=false"]),
                         ("b", [f"data.dir={b}", "data.verify_checksums=false"]),
                         ("ptb", [f"data.dir={ptb_dir}"])):  # fmt: skip
        for seed in (1, 2):
            run_dir = out / f"{corpus}-{seed}"
            m = train(compose([*common, *data, f"seed={seed}"]), run_dir)
            assert m["status"] == "completed"
            runs[corpus, seed] = (run_dir, m)
    ids = {c: runs[c, 1][1]["data"] for c in ("a", "b", "ptb")}
    assert len({d["digest"] for d in ids.values()}) == 3
    assert ids["a"]["vocab_size"] == ids["b"]["vocab_size"] - 2  # "bird" and "fish" are new in b
    assert ids["a"]["tokens"]["train"] == sum(len(s.split()) + 1 for s in TINY_TRAIN)  # + <eos> per line
    assert ids["ptb"]["tokens"] == {"train": 929_589, "valid": 73_760, "test": 82_430}
    assert ids["ptb"]["ptb"] and ids["ptb"]["verified"] and not ids["a"]["ptb"] and not ids["a"]["verified"]
    assert ids["a"]["digest"] == corpus_digest(ids["a"]["sha256"])
    assert runs["a", 2][1]["data"] == ids["a"]  # the same corpus, the same identity
    config = json.loads((runs["a", 1][0] / "config.json").read_text())
    assert config["data"]["sha256"] is None  # not verified: no sums claimed
    assert json.loads((runs["ptb", 1][0] / "config.json").read_text())["data"]["sha256"]

    tables = build_tables(find_runs(out))
    assert len(tables) == 3
    by_data = {}
    for t in tables:
        ours = [r for r in t.rows if not r.published]
        assert len(ours) == 1 and ours[0].n == 2  # one row of two seeds
        folders = {r.path.name.split("-")[0] for r in ours[0].runs}
        assert len(folders) == 1  # ... all of one corpus
        by_data[folders.pop()] = t
    assert by_data["ptb"].data.startswith("PTB, verified")
    assert [r.label for r in by_data["ptb"].rows if r.published]  # Zaremba's rows beside PTB
    for c in ("a", "b"):
        assert not [r for r in by_data[c].rows if r.published]  # ... and nowhere else
        assert ids[c]["digest"][:8] in by_data[c].data and str(tmp_path / f"corpus_{c}") in by_data[c].data


def _outside_the_canvas(fig) -> list[str]:
    """Every axes (with all it draws: ticks, labels, title, annotations) and legend that reaches beyond the
    figure, with 1 px of tolerance."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    out = []
    for name, ext in [
        *(
            (f"axes {i} ({ax.get_title()[:30]!r})", ax.get_tightbbox(renderer))
            for i, ax in enumerate(fig.axes)
        ),
        *((f"legend {i}", leg.get_window_extent(renderer)) for i, leg in enumerate(fig.legends)),
        *((f"text {t.get_text()[:30]!r}", t.get_window_extent(renderer)) for t in fig.texts),
    ]:
        if ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1:
            out.append(f"{name}: {ext} beyond {box}")
    return out


@pytest.mark.parametrize("n_rows", [1, 2, 20])
def test_figures_keep_everything_on_the_canvas(tmp_path, n_rows):
    """1, 2 and 20 rows, two seeds each, labelled by a searched rate written to 17 digits: no text, tick label,
    legend or axes outside the figure; rows' labels at most 4 significant digits, many rows keyed A, B, ...
    with the key under the plot; the Δ panel draws the table's own Δ and CI."""
    from dglstm_lm.report import build_tables, choose_baselines, find_runs
    from dglstm_lm.report_figures import figures

    root = tmp_path / "outputs"
    for i in range(n_rows):
        lr = 0.25 + i * 0.0123456789012345
        for seed in (1, 2):
            v = 100.0 + 3 * i + seed * (1 + 0.1 * i)  # paired differences that vary by seed
            run = fake_run(root, f"r{i}-{seed}", "dglstm" if i else "stacked_lstm", seed, v, v - 4,
                           name="zaremba_small")  # fmt: skip
            cfg = json.loads((run / "config.json").read_text())
            cfg["trainer"]["lr"] = lr
            (run / "config.json").write_text(json.dumps(cfg))
            with_history(run, _curve(300.0, v, 13))
    tables = build_tables(find_runs(root))
    choose_baselines(tables)
    (t,) = tables
    labels = [r.label for r in t.rows if not r.published]
    assert all(
        len(m) <= 6 for label in labels for m in re.findall(r"\d\.\d+", label)
    )  # 0.2623, not 17 digits
    figs = {key: fig for key, _, fig in figures(tables)}
    try:
        for key, fig in figs.items():
            assert _outside_the_canvas(fig) == [], key
        test_fig = figs[(0, "test")]
        ticks = [x.get_text() for x in test_fig.axes[0].get_xticklabels()]
        if n_rows == 20:
            assert ticks[0] == "A\nn = 2" and ticks[-1] == "T\nn = 2"
            key_text = test_fig.axes[-1].get_xlabel()
            assert f"A: {labels[0]}" in key_text and f"T: {labels[19]}" in key_text
        if n_rows > 1:  # the Δ panel: the table's Δ and CI for each row against the baseline
            delta_ax = test_fig.axes[1]
            (bar, *_) = _errorbars(delta_ax)
            d = t.diff(t.rows[1], "test/ppl")
            (segments,) = [c.get_segments() for c in bar.lines[2]]
            ys = sorted(y for seg in segments for _, y in seg)
            assert ys[0] == pytest.approx(d.low) and ys[-1] == pytest.approx(d.high)
            assert d.method == "paired"
        bars = _errorbars(test_fig.axes[0])
        assert bars  # (the loop below checks something)
        for bar in bars:  # log-space intervals: never below zero
            (segments,) = [c.get_segments() for c in bar.lines[2]]
            assert min(y for seg in segments for _, y in seg) > 0
    finally:
        _close(figs)


def test_an_unknown_baseline_among_many_rows_names_a_few(tmp_path, capsys):
    """The error lists six rows and says how many more there are (it was one line of 3,858 characters)."""
    from dglstm_lm.report import main

    root = tmp_path / "outputs"
    for i in range(20):
        fake_run(root, f"r{i}", "dglstm", 1, 100.0 + i, 95.0 + i, hidden_dim=100 + i)
    with pytest.raises(SystemExit):
        main(
            [
                "--dir",
                str(root),
                "--out",
                str(tmp_path / "rep"),
                "--wandb-mode",
                "disabled",
                "--baseline",
                "gru",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 400, err
    assert err.endswith("and 14 more (see report.md)") and err.count("'dglstm (hidden_dim=") == 6


def test_the_gradient_norms_by_layer_figure_is_the_mean_over_seeds_at_the_final_epoch(tmp_path):
    """grad_norm/layer_<i> from each run's last epoch: one line per row, its points the mean over the seeds,
    its error bars their standard deviation; rows without the norms draw none, and no figure without any."""
    norms = {1: [1e-3, 1e-2, 1e-1], 2: [3e-3, 3e-2, 3e-1]}
    for seed, last in norms.items():
        run = fake_run(tmp_path / "with", f"s{seed}", "stacked_lstm", seed, 100.0 + seed, 95.0)
        hist = [
            {"epoch": 1, "val/ppl": 150.0, **{f"grad_norm/layer_{i}": 9.0 for i in (1, 2, 3)}},
            {"epoch": 2, "val/ppl": 100.0, **{f"grad_norm/layer_{i}": v for i, v in enumerate(last, 1)}},
        ]
        (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist))
    figs = _figures(tmp_path / "with")
    try:
        (ax,) = figs[(0, "gradnorms")].axes
        (line,) = ax.get_lines()[:1]
        assert list(line.get_xdata()) == [1, 2, 3]
        assert list(line.get_ydata()) == pytest.approx([2e-3, 2e-2, 2e-1])
        assert ax.get_yscale() == "log"
    finally:
        _close(figs)
    fake_run(tmp_path / "without", "s1", "stacked_lstm", 1, 100.0, 95.0)
    figs = _figures(tmp_path / "without")
    try:
        assert (0, "gradnorms") not in figs
    finally:
        _close(figs)


# the depth sweep: {(model, depth): {seed: (valid, test)}}; the open gate only at 4 layers and 2 seeds
DEPTH_RUNS = {
    ("stacked_lstm", 2): {1: (105.0, 100.0), 2: (106.0, 101.5), 3: (104.0, 99.0)},
    ("stacked_lstm", 4): {1: (112.0, 108.0), 2: (115.0, 110.5), 3: (113.0, 109.0)},
    ("dglstm", 2): {1: (99.0, 94.0), 2: (100.5, 96.0), 3: (98.0, 93.5)},
    ("dglstm", 4): {1: (101.0, 97.0), 2: (103.5, 98.0), 3: (100.0, 96.5)},
    ("dglstm open", 4): {1: (102.0, 98.5), 2: (104.0, 99.0)},
}


def _depth_runs(root: Path) -> None:
    for (model, depth), seeds in DEPTH_RUNS.items():
        opts = {"num_layers": depth}
        if model == "dglstm open":
            model, opts["depth_gate"] = "dglstm", "open"
        elif model == "dglstm":
            opts["depth_gate"] = "learned"
        for seed, (v, t) in seeds.items():
            fake_run(root, f"{model}-{opts.get('depth_gate', '')}-{depth}-{seed}", model, seed, v, t, **opts)


def _depth_row(rows: dict, model: str, depth: int) -> dict:
    """The csv row of (model, depth), found by what its label must say (not by the report's labelling)."""
    name, _, gate = model.partition(" ")
    found = [
        r
        for (_, label), r in rows.items()
        if r["model"] == name
        and f"num_layers={depth}" in label
        and ("depth_gate=open" in label) == (gate == "open")
    ]
    assert len(found) == 1, (model, depth, list(rows))
    return found[0]


def test_a_depth_sweep_compares_each_row_at_its_own_depth_and_draws_ppl_by_depth(tmp_path):
    """Rows that differ in model.num_layers: each row's Δ is against the baseline's variant (the stacked LSTM)
    at the same depth, paired by seed; a depth the baseline was not run at has no Δ; and a figure draws test
    perplexity against depth, one line per variant, at the mean with its 95% t-interval over seeds."""
    from scipy.stats import t as student

    root = tmp_path / "outputs"
    _depth_runs(root)
    fake_run(root, "dg8", "dglstm", 1, 99.0, 95.0, num_layers=8, depth_gate="learned")  # no stacked LSTM at 8
    rows, md = _report(root, "rep")
    test = {k: {s: vt[1] for s, vt in seeds.items()} for k, seeds in DEPTH_RUNS.items()}
    for model, depth in [("dglstm", 2), ("dglstm", 4), ("dglstm open", 4)]:
        row = _depth_row(rows, model, depth)
        base = test[("stacked_lstm", depth)]
        seeds = sorted(test[(model, depth)])
        ours = [test[(model, depth)][s] for s in seeds]
        if seeds == sorted(base):
            _check_diff(row, "test", _paired(ours, [base[s] for s in seeds]), "paired")
        else:
            _check_diff(row, "test", _welch(ours, list(base.values())), "Welch")
        assert f"num_layers={depth}" in row["baseline"] and row["baseline"].startswith("stacked_lstm")
    assert _depth_row(rows, "stacked_lstm", 4)["test_ppl_delta"] == ""  # the baseline itself
    eight = _depth_row(rows, "dglstm", 8)
    assert eight["test_ppl_delta"] == "" and eight["baseline"] == ""
    assert "row − baseline of the same depth" in md and "_depth.png" in md

    figs = _figures(root)
    try:
        ax = figs[(0, "depth")].axes[0]
        lines = {}
        for c in _errorbars(ax):
            line = c.lines[0]
            lines[c.get_label()] = (list(line.get_xdata()), list(line.get_ydata()), c)
        assert len(lines) == 3  # stacked, dglstm (learned), dglstm (open)
        stacked = next(v for k, v in lines.items() if k.startswith("stacked_lstm"))
        assert stacked[0] == [2, 4]
        for depth, y in zip(stacked[0], stacked[1], strict=True):
            vals = list(test[("stacked_lstm", depth)].values())
            assert y == pytest.approx(np.mean(vals), rel=1e-12)
        # the interval drawn at 4 layers: mean ± t(0.975, n−1) · s / √n
        vals = np.array(list(test[("stacked_lstm", 4)].values()))
        half = student.ppf(T975, len(vals) - 1) * vals.std(ddof=1) / math.sqrt(len(vals))
        segs = stacked[2].lines[2][0].get_segments()
        lo, hi = sorted(segs[1][:, 1])
        assert (lo, hi) == (
            pytest.approx(vals.mean() - half, rel=1e-9),
            pytest.approx(vals.mean() + half, rel=1e-9),
        )
        learned = next(v for k, v in lines.items() if k.startswith("dglstm") and "open" not in k)
        assert learned[0] == [2, 4, 8]
    finally:
        _close(figs)


def test_models_of_different_depths_are_not_a_depth_sweep(tmp_path):
    """lstm (1 layer) beside stacked_lstm and dglstm (2 layers): the rows differ in num_layers, but no variant
    was run at two depths, so every row is compared with the one baseline and no depth figure is drawn."""
    root = tmp_path / "outputs"
    for seed in (1, 2, 3):
        fake_run(root, f"l{seed}", "lstm", seed, 120.0 + seed, 115.0 + seed, num_layers=1)
        fake_run(root, f"s{seed}", "stacked_lstm", seed, *STACKED[seed])
        fake_run(root, f"d{seed}", "dglstm", seed, *DGLSTM[seed])
    rows, md = _report(root, "rep")
    assert {r["baseline"] for r in rows.values()} == {"stacked_lstm (num_layers=2)"}
    lstm = next(r for r in rows.values() if r["model"] == "lstm")
    seeds = sorted(STACKED)
    _check_diff(lstm, "test", _paired([115.0 + s for s in seeds], [STACKED[s][1] for s in seeds]), "paired")
    assert "same depth" not in md and "_depth.png" not in md


def _tex_tables(tex: str) -> list[dict]:
    """Each table environment of report.tex as {caption, label, rows: [[cell, ...]]} (rules left out)."""
    tables = []
    for body in re.findall(r"\\begin\{table\}\[t\]\n(.*?)\\end\{table\}", tex, flags=re.S):
        lines = body.splitlines()
        caption = next(ln for ln in lines if ln.startswith("\\caption{"))[len("\\caption{") : -1]
        label = next(ln for ln in lines if ln.startswith("\\label{"))[len("\\label{") : -1]
        start = lines.index("\\midrule") + 1
        rows = [
            [c.strip() for c in ln.removesuffix(" \\\\").split(" & ")]
            for ln in lines[start:]
            if ln.endswith(" \\\\")
        ]
        tables.append({"caption": caption, "label": label, "rows": rows, "header": lines[start - 2]})
    return tables


def test_report_tex_holds_the_tables_with_the_same_numbers(fake_runs, tmp_path):
    """report.tex: one booktabs table per table of the report, nine cells a row, LaTeX's special characters
    escaped, mean ± sd and Δ [95% CI] with p computed here (paired and Welch t-tests), best means in bold."""
    build_report(fake_runs, tmp_path / "rep", wandb_mode="disabled")
    tex = (tmp_path / "rep" / "report.tex").read_text()
    assert tex.count("\\begin{table}") == tex.count("\\end{table}") == 2
    assert tex.count("\\begin{tabular}{lrrrrrrrr}") == 2 and "booktabs" in tex.splitlines()[0]
    fake, other = sorted(_tex_tables(tex), key=lambda t: "other" in t["caption"])
    assert len({fake["label"], other["label"]}) == 2 and all(" " not in t["label"] for t in (fake, other))
    for t in (fake, other):
        assert all(len(row) == 9 for row in t["rows"]), t["rows"]
        assert not re.search(r"(?<!\\)[_%&#]", " ".join(c for row in t["rows"] for c in row))
    rows = {row[0]: row for row in fake["rows"]}
    assert set(rows) == {"stacked\\_lstm", "lstm", "dglstm (peephole=False)", "dglstm (peephole=True)"}
    seeds = sorted(STACKED)
    base = rows["stacked\\_lstm"]
    assert base[5:] == ["baseline", "", "baseline", ""]
    assert base[1] == "0.00M" and base[4] == "3"
    test = [v[1] for v in STACKED.values()]
    assert base[3] == f"{np.mean(test):.2f} $\\pm$ {np.std(test, ddof=1):.2f}"
    for i, (delta, p) in enumerate(((5, 6), (7, 8))):
        d, lo, hi, pv = _paired([DGLSTM[s][i] for s in seeds], [STACKED[s][i] for s in seeds])
        assert rows["dglstm (peephole=False)"][delta] == f"${d:+.2f}$ [${lo:.2f}$, ${hi:.2f}$]"
        assert rows["dglstm (peephole=False)"][p] == f"{pv:.3f}"
        d, lo, hi, pv = _welch([v[i] for v in LSTM.values()], [v[i] for v in STACKED.values()])
        assert (
            rows["lstm"][delta] == f"${d:+.2f}$ [${lo:.2f}$, ${hi:.2f}$]" and rows["lstm"][p] == f"{pv:.3f}"
        )
        one = PEEP[4][i] - np.mean([v[i] for v in STACKED.values()])
        assert (
            rows["dglstm (peephole=True)"][delta] == f"${one:+.2f}$"
            and rows["dglstm (peephole=True)"][p] == ""
        )
    # the lowest mean of each column in bold (the dglstm's), no other cell
    dg_val = np.mean([v[0] for v in DGLSTM.values()])
    assert rows["dglstm (peephole=False)"][2].startswith(f"\\textbf{{{dg_val:.2f} $\\pm$")
    assert sum(c.startswith("\\textbf") for row in fake["rows"] for c in row) == 2
    assert "$\\Delta$ is row $-$ stacked\\_lstm" in fake["caption"]
    assert "paired by seed where the seeds match, Welch's otherwise" in fake["caption"]
    assert "none under two seeds on a side" in fake["caption"]
    assert "a paired $t$-test by seed" in other["caption"] and "$\\Delta$ is row $-$ lstm" in other["caption"]


def test_tex_escape_covers_latex_special_characters():
    from dglstm_lm.report_latex import tex_escape

    assert tex_escape("a_b & 50% #1 $x {y} ~z ^w \\v") == (
        "a\\_b \\& 50\\% \\#1 \\$x \\{y\\} \\textasciitilde{}z \\textasciicircum{}w \\textbackslash{}v"
    )


def test_tokens_per_s_is_the_median_of_the_epochs_so_a_paused_epoch_moves_it_little(tmp_path):
    """A run paused for a while (SIGSTOP while CI ran, another job on its cores) has one slow epoch and a
    total throughput in metrics.json that carries the pause; the report shows the median of its epochs."""
    root = tmp_path / "outputs"
    for seed, epochs in ((1, [6000.0, 6200.0, 1000.0]), (2, [5000.0, 5400.0, 5200.0])):
        run = fake_run(root, f"s{seed}", "stacked_lstm", seed, 100.0, 95.0)
        history = [{"epoch": i + 1, "val/ppl": 100.0, "train/tokens_per_s": v} for i, v in enumerate(epochs)]
        (run / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    fake_run(root, "o1", "dglstm", 1, 99.0, 94.0)  # history without throughput: metrics.json's total (5000)
    rows, md = _report(root, "report")
    assert _num(rows[("fake", "stacked_lstm")]["tokens_per_s"]) == pytest.approx((6000.0 + 5200.0) / 2)
    assert _num(rows[("fake", "dglstm")]["tokens_per_s"]) == pytest.approx(5000.0)  # fake_run's metrics
    assert "the median of each run's epochs" in md
