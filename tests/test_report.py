"""The report, checked against the runs' own metrics.json files, from two tiny real sweeps."""

from __future__ import annotations

import csv
import json
import statistics
import struct
from pathlib import Path

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
    assert len(figs) == 4  # curves + test bars for each of the two tables
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
    assert len(images) == 2 and all(
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
