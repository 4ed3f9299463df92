"""`make compare`: equal-budget search per model, the best config × seeds, the report; resumable."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from .conftest import PY, run_cli

# The smoke recipe cut down further: what is tested is the plumbing, not the perplexities.
TINY = ["trainer.limit_train_batches=4", "trainer.limit_eval_batches=2", "trainer.max_epochs=1"]
MODELS = ("stacked_lstm", "dglstm")


def _study(folder: Path, model: str):
    import optuna

    from dglstm_lm.tune import storage

    return optuna.load_study(study_name=model, storage=storage(folder / "optuna" / f"{model}.journal"))


def _complete(study) -> list:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def _compare(folder, models: str, trials: str, stages: str, jobs=None, runner=None, archive=None):
    """A Compare on the smoke recipes for tests that drive its stages by hand (no training)."""
    import argparse

    from dglstm_lm.compare import Compare, Plan

    args = argparse.Namespace(
        models=models, trials=trials, seeds="1", proxy="smoke", experiment="smoke", space="lstm_lm",
        stages=stages, overrides=["logger=none"], proxy_override=None, dir=str(folder), jobs=jobs,
        archive=archive,
    )  # fmt: skip
    plan = Plan(args)
    plan.metric, plan.base_seed = "val/ppl", 1
    return Compare(plan, runner=runner)


SPACE_KEYS = {
    "trainer.lr",
    "trainer.lr_decay",
    "model.dropout_emb",
    "model.dropout_layers",
    "model.dropout_out",
    "model.dropout_kind",
    "model.weight_drop",
    "model.embed_dropout",
    "model.tie_weights",
    "model.init_range",
}


def _metrics_files(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (p.read_text(), p.stat().st_mtime_ns)
        for p in folder.glob("**/metrics.json")
    }


@pytest.mark.slow
def test_compare_end_to_end_tops_up_and_skips_finished_work(tmp_path, ptb_dir, ptb_root):
    folder = tmp_path / "cmp"
    common = [
        "logger=none",
        *TINY,
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
    ]
    env = {"PTB_DIR": str(ptb_dir)}

    # A partial state: one trial per model, searched only (as if stopped after the first trial).
    partial = [PY, "-m", "dglstm_lm.compare", "--models", ",".join(MODELS), "--trials", "1", "--seeds", "1,2"]
    partial += [
        "--proxy",
        "smoke",
        "--experiment",
        "smoke",
        "--dir",
        str(folder),
        "--stages",
        "search",
        *common,
    ]
    r = run_cli(partial, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert all(len(_complete(_study(folder, m))) == 1 for m in MODELS)
    assert not (folder / "final").exists()

    # The full command: the studies are topped up to exactly 2 trials, then the finals, then the report.
    cmd = ["make", "-s", "compare", f"models={','.join(MODELS)}", "trials=2", "seeds=1,2", "proxy=smoke"]
    cmd += ["experiment=smoke", f"dir={folder}", f"archive={tmp_path / 'keep'}", *common]
    r = run_cli(cmd, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for m in MODELS:
        assert f"{m}: 1 of 2 trials finished; running trial 1 on smoke" in r.stdout
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["trials_per_model"] == 2 and summary["settings"]["proxy"] == "smoke"
    studies = {m: _study(folder, m) for m in MODELS}
    for m, study in studies.items():
        done = _complete(study)
        assert len(done) == 2
        best = min(done, key=lambda t: t.value)
        assert set(best.params) == SPACE_KEYS
        assert summary["best"][m]["params"] == best.params and summary["best"][m]["trial"] == best.number
        for seed in (1, 2):
            run = folder / "final" / m / f"seed={seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            config = json.loads((run / "config.json").read_text())
            assert metrics["status"] == "completed" and metrics["model"] == m and metrics["seed"] == seed
            assert config["trainer"]["lr"] == best.params["trainer.lr"]
            assert config["model"]["dropout_layers"] == best.params["model.dropout_layers"]
            assert config["model"]["tie_weights"] == best.params["model.tie_weights"]
            assert config["name"] == "smoke" and config["trainer"]["max_epochs"] == 1
    # the same budget, drawn the same way: both studies tried the same points in the same order
    assert [t.params for t in studies["stacked_lstm"].trials] == [t.params for t in studies["dglstm"].trials]
    assert (folder / "report" / "report.md").is_file()
    with (folder / "report" / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["model"] for row in rows) == sorted(MODELS)

    # The same command again: nothing is trained, no run is touched, the report is rebuilt.
    before = _metrics_files(folder)
    trials_before = {m: len(_study(folder, m).trials) for m in MODELS}
    r = run_cli(cmd, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dglstm_lm.train" not in r.stdout  # no training subprocess was started
    assert r.stdout.count("nothing to run") == 2 * len(MODELS)
    # the budget each model spent, and the expected-best curve
    assert set(summary["budget"]) == set(MODELS)
    for m in MODELS:
        b = summary["budget"][m]
        assert b["trials_complete"] + b["trials_pruned"] == 2 and b["trials_failed"] == 0
        assert b["epochs_trained"] == 2 and b["cpu_s"] > 0
        assert [r["n"] for r in summary["expected_best"][m]] == [1, 2]
    assert (folder / "expected_best.png").stat().st_size > 0 and (folder / "tuning.md").is_file()
    assert {m: len(_study(folder, m).trials) for m in MODELS} == trials_before
    assert _metrics_files(folder) == before
    assert (folder / "report" / "report.csv").is_file()

    # The folder lost (a machine handed back): the same command brings the records back from archive= and
    # trains nothing; the studies, the choice, the budgets and the final runs' records are the same.
    import shutil

    kept = {k: v[0] for k, v in before.items()}
    shutil.rmtree(folder)
    r = run_cli(cmd, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "compare: restored " in r.stdout and "dglstm_lm.train" not in r.stdout
    assert r.stdout.count("nothing to run") == 2 * len(MODELS)
    assert {k: v[0] for k, v in _metrics_files(folder).items()} == kept
    again = json.loads((folder / "summary.json").read_text())
    assert again["best"] == summary["best"] and again["budget"] == summary["budget"]
    assert {m: len(_study(folder, m).trials) for m in MODELS} == trials_before
    assert (folder / "report" / "report.md").is_file() and (folder / "tuning.md").is_file()


# ---------------------------------------------------------------------------------------- fast checks


@pytest.mark.parametrize(
    "args,message",
    [
        (["--models", "stacked_lstm,gru"], "error: unknown model 'gru' (available: "),
        (["--models", "dglstm,dglstm"], "error: models=dglstm,dglstm: dglstm given twice"),
        (["--trials", "0"], "error: trials=0: expected a whole number ≥ 1"),
        (["--seeds", "1,x"], "error: seeds=1,x: expected whole numbers"),
        (["--proxy", "tiny"], "error: unknown proxy recipe 'tiny' (available: "),
        (["seed=3"], "error: seed=3: set by make compare; use seeds="),
        (["trainer.lr=2"], "error: trainer.lr is searched (space=lstm_lm); it cannot also be fixed"),
        (["tune.trial=3"], "error: tune.trial=3: set by make compare; use trials="),
        (["hydra.sweeper.n_trials=3"], "error: hydra.sweeper.n_trials=3: set by make compare; use nothing"),
        (["--space", "nope"], "error: unknown space 'nope' (available: lstm_lm"),
        (["--jobs", "0"], "error: jobs=0: expected a whole number ≥ 1"),
        (
            ["hydra.launcher.n_jobs=two"],
            "error: hydra.launcher.n_jobs=two: expected a whole number other than 0",
        ),
        (
            ["--jobs", "2", "hydra.launcher.n_jobs=0"],
            "error: hydra.launcher.n_jobs=0: expected a whole number other",
        ),
        (["--final_jobs", "0", "hydra/launcher=joblib"], "error: final_jobs=0: expected a whole number ≥ 1"),
        (
            ["--final_jobs", "1"],
            "error: final_jobs=1: the final runs at a time of hydra/launcher=joblib; give",
        ),
        (["model.hidden_dim=100,200"], "error: model.hidden_dim=100,200: make compare takes single values"),
        (["trainer.bptt=-1"], "error: trainer.bptt"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(tmp_path, capsys, args, message):
    from dglstm_lm.compare import main

    with pytest.raises(SystemExit) as exc:
        main(["--dir", str(tmp_path / "cmp"), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("where", ["nowhere", "named", "final only"])
def test_a_comparison_without_its_data_stops_before_any_trial(tmp_path, capsys, monkeypatch, where):
    """No PTB (none named, none in the data root, downloads off), or a data.dir that does not exist: the
    run's one-line data error, before the folder, a study or a trial exists (each trial failing on its own
    left failed trials in the studies)."""
    from dglstm_lm.compare import main

    monkeypatch.delenv("PTB_DIR", raising=False)
    data = ["data.download=false", f"data.root={tmp_path / 'root'}"]
    if where == "named":
        data.append(f"data.dir={tmp_path / 'no-ptb'}")
    stages = ["--stages", "final"] if where == "final only" else []
    with pytest.raises(SystemExit) as exc:
        main(["--dir", str(tmp_path / "cmp"), "--proxy", "smoke", "--experiment", "smoke", *stages, *data])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = (
        f"error: data folder {tmp_path / 'no-ptb'}" if where == "named" else "error: PTB not found: put "
    )
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "cmp").exists()


def test_a_folder_holds_one_comparison(tmp_path, capsys):
    from dglstm_lm.compare import main

    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"settings": {"proxy": "zaremba_small"}}))
    with pytest.raises(SystemExit) as exc:
        main(["--dir", str(folder), "--proxy", "smoke", "--stages", "report"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: {folder} holds a comparison with other settings")
        and "use another dir=" in err
    )


@pytest.mark.slow
def test_the_acceptance_command_writes_budgets_and_the_expected_best_figure(tmp_path, ptb_dir, ptb_root):
    """`make compare proxy=smoke experiment=smoke trials=4 seeds=1,2 logger=none`, as typed (plus where its
    data and outputs are): every model's budget in summary.json, the same for both, and the figure."""
    folder = tmp_path / "out" / "compare" / "smoke"
    cmd = ["make", "-s", "compare", "proxy=smoke", "experiment=smoke", "trials=4", "seeds=1,2", "logger=none"]
    cmd += [f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={ptb_root}", f"data.dir={ptb_dir}"]
    r = run_cli(cmd, env={"PTB_DIR": str(ptb_dir)}, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # seed 1 is also the search trials' seed (conf/train.yaml): said once, the runs go ahead
    assert (r.stdout + r.stderr).count("note: seed 1 is every search trial's seed too") == 1
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["budget"]) == set(MODELS)
    for m in MODELS:
        b = summary["budget"][m]
        assert set(b) == {
            "trials_complete",
            "trials_pruned",
            "trials_failed",
            "epochs_trained",
            "cpu_s",
            "wall_s",
        }
        assert b["trials_complete"] + b["trials_pruned"] == 4
        assert len(summary["expected_best"][m]) == 4
        assert summary["final"][m]["runs"]["1"]["status"] == "completed"
    # the same sampler, seeded the same: the same points, in the same order, for both models
    studies = [_study(folder, m) for m in MODELS]
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]
    assert summary["settings"]["pruner"] == {"name": "median", "n_startup_trials": 8, "n_warmup_steps": 2}
    assert (folder / "expected_best.png").stat().st_size > 10_000
    assert "| stacked_lstm |" in (folder / "tuning.md").read_text()


def test_the_best_trial_is_chosen_by_validation_not_test_perplexity(tmp_path):
    """Three complete trials whose validation and test orderings differ (their runs' metrics say so): the
    best is the lowest validation perplexity (trial 1), never the lowest test perplexity (trial 2)."""

    from dglstm_lm import tune

    folder = tmp_path / "cmp"
    cmp = _compare(str(folder), models="stacked_lstm", trials="3", stages="search,final", runner=None)
    plan = cmp.plan
    study = cmp.study("stacked_lstm", create=True)
    dists = plan.space.distributions()
    for n, (val, test) in enumerate([(120.0, 115.0), (100.0, 118.0), (110.0, 90.0)]):
        t = study.ask(dists)
        t.report(val + 5, 1)
        study.tell(t, val)
        run = folder / "search" / "stacked_lstm" / f"trial={n}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(
            json.dumps({"status": "completed", "val/ppl": val, "test/ppl": test, "epochs_completed": 1})
        )
    entry = cmp.best("stacked_lstm")
    assert entry["trial"] == 1 and entry["proxy val/ppl"] == 100.0
    assert entry["params"] == study.trials[1].params
    assert [s for _, _, s in entry["trials"]] == [120.0, 100.0, 110.0]
    assert tune.expected_best([120.0, 100.0, 110.0], 3) == 100.0
    assert cmp.summary["expected_best"]["stacked_lstm"][-1]["expected_best"] == 100.0


@pytest.mark.slow
def test_make_search_is_the_search_stage_for_one_model_and_tops_up(tmp_path, ptb_dir, ptb_root):
    folder = tmp_path / "search"
    common = ["model=lstm", "proxy=smoke", f"dir={folder}", "logger=none", *TINY]
    common += [f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={ptb_root}", f"data.dir={ptb_dir}"]
    env = {"PTB_DIR": str(ptb_dir)}
    r = run_cli(["make", "-s", "search", "trials=1", *common], env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[search 1/1] lstm: 0 of 1 trials finished; running trial 0 on smoke" in r.stdout
    r = run_cli(["make", "-s", "search", "trials=2", *common], env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "lstm: 1 of 2 trials finished; running trial 1 on smoke" in r.stdout
    assert not (folder / "final").exists()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["budget"]["lstm"]["trials_complete"] + summary["budget"]["lstm"]["trials_pruned"] == 2
    assert len(_complete(_study(folder, "lstm"))) + summary["budget"]["lstm"]["trials_pruned"] == 2


def test_every_model_gets_the_same_start_up_points_even_after_a_failed_trial(tmp_path):
    """The sampler's start-up points are drawn once and given to every study in order; a point whose trial
    failed in one study is given to it again, so the models stay paired point by point."""

    from optuna.trial import TrialState

    cmp = _compare(
        str(tmp_path / "cmp"), models="stacked_lstm,dglstm", trials="4", stages="search", runner=None
    )
    plan = cmp.plan
    points = cmp.startup_points()
    assert len(points) == 8 and len({str(p) for p in points}) == 8
    dists = plan.space.distributions()
    studies = {m: cmp.study(m, create=True) for m in ("stacked_lstm", "dglstm")}
    for m, study in studies.items():
        for _ in range(3):
            study.enqueue_trial(cmp.next_startup_point(study))
            t = study.ask(dists)
            study.tell(t, state=TrialState.FAIL) if (m, t.number) == ("dglstm", 1) else study.tell(t, 100.0)
    assert [t.params for t in studies["stacked_lstm"].trials] == points[:3]
    assert cmp.next_startup_point(studies["stacked_lstm"]) == points[3]
    # the point whose trial failed was given again at once; the studies then go on in step
    assert [t.params for t in studies["dglstm"].trials] == [points[0], points[1], points[1]]
    assert cmp.next_startup_point(studies["dglstm"]) == points[2]


def test_a_search_whose_every_trial_fails_stops_after_two_batches(tmp_path):
    """A cause common to every trial (here: jobs that exit without training, as a broken environment does)
    stops the search after two batches of one model in which every trial failed, naming the error a trial
    recorded, instead of failing trial after trial up to MAX_FAILED per missing trial (72 for 24 trials)."""

    from dglstm_lm.compare import MAX_FAILED_BATCHES, CompareError

    class Broken:  # every batch's jobs fail before they tell their trials anything
        calls = 0

        def run(self, cmd):
            Broken.calls += 1
            trials = next(a for a in cmd if a.startswith("tune.trial=")).split("=", 1)[1].split(",")
            for n in trials:
                run = tmp_path / "cmp" / "search" / model_of(cmd) / f"trial={n}"
                run.mkdir(parents=True)
                (run / "metrics.json").write_text(
                    json.dumps({"status": "failed", "error": "PTB not found: ..."})
                )
            return 1

    def model_of(cmd):
        return next(a for a in cmd if a.startswith("model=")).split("=", 1)[1]

    cmp = _compare(
        str(tmp_path / "cmp"),
        models="stacked_lstm,dglstm",
        trials="24",
        stages="search",
        jobs="2",
        runner=Broken(),
    )
    with pytest.raises(CompareError, match=r"search of stacked_lstm: every trial of its last 2 batches failed "
                       r"\(PTB not found: \.\.\.\); fix the cause"):  # fmt: skip
        cmp.search_all()
    # the models take turns: stacked, dglstm, stacked
    assert MAX_FAILED_BATCHES == 2 and Broken.calls == 3
    assert [len(cmp.study(m).trials) for m in ("stacked_lstm", "dglstm")] == [4, 2]


def test_a_model_left_behind_catches_up_first_then_the_models_take_turns(tmp_path):
    """The stacked LSTM holds 4 finished trials and the DGLSTM none (its batch was cut short by a stop while
    the other's had finished): the DGLSTM runs its batches until it has caught up, then the two take turns,
    and neither is run past the budget."""
    from optuna.trial import TrialState

    class Fake:  # each job tells its trial a value, as a training job does
        order: list = []

        def run(self, cmd):
            model = next(a for a in cmd if a.startswith("model=")).split("=", 1)[1]
            Fake.order.append(model)
            trials = next(a for a in cmd if a.startswith("tune.trial=")).split("=", 1)[1].split(",")
            study = cmp.study(model)
            for n in trials:
                study.tell(int(n), 150.0 + int(n))
            return 0

    cmp = _compare(
        str(tmp_path / "cmp"),
        models="stacked_lstm,dglstm",
        trials="6",
        stages="search",
        jobs="2",
        runner=Fake(),
    )
    ahead = cmp.study("stacked_lstm", create=True)
    for _ in range(4):
        ahead.tell(ahead.ask(cmp.plan.space.distributions()), 160.0)
    cmp.search_all()
    assert Fake.order == ["dglstm", "dglstm", "stacked_lstm", "dglstm"]
    for model in MODELS:
        states = [t.state for t in cmp.study(model).trials]
        assert states == [TrialState.COMPLETE] * 6, (model, states)


def test_the_shared_start_up_points_are_paired_by_point_in_tuning_md(tmp_path):
    """Both studies hold the start-up points in different orders, with a failed and a pruned trial and a
    TPE trial that is no start-up point: only points both completed are paired, by point (not by trial
    number), and the difference, its CI and both tests equal those computed here from the values."""

    import numpy as np
    from optuna.trial import TrialState
    from scipy import stats

    cmp = _compare(
        str(tmp_path / "cmp"), models="stacked_lstm,dglstm", trials="6", stages="search", runner=None
    )
    plan = cmp.plan
    points, dists = cmp.startup_points(), plan.space.distributions()
    base = {0: 200.0, 1: 210.0, 2: 180.0, 3: 230.0, 4: 190.0}
    other = {1: 195.0, 0: 199.0, 3: 205.0, 2: 183.0, 5: 170.0}  # point 4 pruned here, point 5 not in base
    for model, vals, extra in (("stacked_lstm", base, None), ("dglstm", other, 4)):
        study = cmp.study(model, create=True)
        if model == "dglstm":  # a failed trial first: trial numbers no longer match the points
            study.enqueue_trial(points[0])
            study.tell(study.ask(dists), state=TrialState.FAIL)
        for i, v in vals.items():
            study.enqueue_trial(points[i])
            study.tell(study.ask(dists), v)
        if extra is not None:
            study.enqueue_trial(points[extra])
            t = study.ask(dists)
            t.report(300.0, 1)
            study.tell(t, state=TrialState.PRUNED)
        study.tell(study.ask(dists), 150.0)  # a sampled point: no start-up point, never paired
    for m in MODELS:
        cmp.best(m)
    cmp.tuning_report()
    paired = cmp.summary["startup_paired"]
    assert paired["baseline"] == "stacked_lstm"
    d = paired["diffs"]["dglstm"]
    assert d["points"] == [0, 1, 2, 3]
    diffs = np.array([other[i] - base[i] for i in range(4)])  # -1, -15, +3, -25
    t = stats.ttest_rel([other[i] for i in range(4)], [base[i] for i in range(4)])
    half = stats.t.ppf(0.975, 3) * diffs.std(ddof=1) / 2
    assert d["n"] == 4 and d["lower"] == 3
    assert d["delta"] == pytest.approx(-9.5) and d["p_t"] == pytest.approx(t.pvalue)
    assert (d["low"], d["high"]) == (pytest.approx(-9.5 - half), pytest.approx(-9.5 + half))
    assert d["p_wilcoxon"] == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert paired["points"][4] == {"point": 4, "stacked_lstm": 190.0, "dglstm": None}
    assert paired["points"][5] == {"point": 5, "stacked_lstm": None, "dglstm": 170.0}
    md = (tmp_path / "cmp" / "tuning.md").read_text()
    assert "| 4 | 190.00 | – |" in md and "| 5 | – | 170.00 |" in md
    assert (
        f"dglstm − stacked_lstm, paired by point: -9.50 [95% CI {-9.5 - half:+.2f}, {-9.5 + half:+.2f}]" in md
    )
    assert "lower at 3 of 4 points" in md


def test_complete_pruned_runs_the_pruned_trials_to_the_end_and_chooses_over_all(tmp_path):
    """complete_pruned=1: the pruned trial (and only it) is run once, to the end, with tune.complete=true in
    unpruned/<model>/trial=<n>; the best is chosen over the complete trials and that run (here: the pruned
    trial, 100 against 110), the expected-best curve uses its final value, and the budget shows its spend
    apart. Without its run the choice is refused with a one-line error naming the trial."""
    from optuna.trial import TrialState

    from dglstm_lm.compare import CompareError

    class Fake:
        cmds: list = []

        def run(self, cmd):
            Fake.cmds.append(cmd)
            run = tmp_path / "cmp" / "unpruned" / "stacked_lstm" / "trial=1"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(
                json.dumps({"status": "completed", "val/ppl": 100.0, "epochs_completed": 8, "cpu_s": 50.0})
            )
            return 0

    cmp = _compare(tmp_path / "cmp", models="stacked_lstm", trials="3", stages="search,final", runner=Fake())
    cmp.plan.complete_pruned = True
    study = cmp.study("stacked_lstm", create=True)
    dists = cmp.plan.space.distributions()
    for value in [120.0, None, 110.0]:
        t = study.ask(dists)
        t.report(300.0 if value is None else value + 50, 2)
        study.tell(t, state=TrialState.PRUNED) if value is None else study.tell(t, value)
    with pytest.raises(CompareError, match=r"pruned trial 1 of stacked_lstm has not run to the end"):
        cmp.best("stacked_lstm")
    cmp.complete_pruned("stacked_lstm")
    cmp.complete_pruned("stacked_lstm")  # done: nothing runs again
    assert len(Fake.cmds) == 1
    cmd = Fake.cmds[0]
    assert "tune.trial=1" in cmd and "tune.complete=true" in cmd
    assert f"hydra.sweep.dir={tmp_path / 'cmp' / 'unpruned' / 'stacked_lstm'}" in cmd
    entry = cmp.best("stacked_lstm")
    assert entry["trial"] == 1 and entry["proxy val/ppl"] == 100.0 and entry["pruned_then_run_to_the_end"]
    assert entry["params"] == study.trials[1].params and entry["unpruned"] == {"1": 100.0}
    assert cmp.summary["expected_best"]["stacked_lstm"][-1]["expected_best"] == 100.0
    assert cmp.summary["budget"]["stacked_lstm"]["pruned_run_to_the_end"]["epochs"] == 8
    cmp.tuning_report()
    md = (tmp_path / "cmp" / "tuning.md").read_text()
    assert "| stacked_lstm | 1 | 300.00 | 100.00 | **yes** |" in md
    assert "its best is trial 1, **one the pruner had stopped**" in md
    # the budget table shows what running the pruned trial to the end cost, beside the search's own spend
    assert "| stacked_lstm | 2 | 1 | 0 | 0 | 0.00 | 1 | 8 | 0.01 | 0.01 | 100.00 |" in md
    assert "a pruned trial counts with its run to the end" in md


@pytest.mark.parametrize("final_jobs", [None, "1"])
def test_final_jobs_sets_the_final_runs_at_a_time_and_nothing_else(tmp_path, final_jobs):
    """final_jobs=1 with jobs=2: the search's batches stay 2 trials, the final runs go one at a time (each on
    all the cores, runtime.default_threads): the final command says n_jobs=1, once, in place of the user's 2;
    without final_jobs the final runs keep the user's. It is not one of the comparison's settings."""
    import argparse

    from dglstm_lm.compare import Compare, Plan

    class Fake:
        cmds: list = []

        def run(self, cmd):
            Fake.cmds.append(cmd)
            return 0

    overrides = ["logger=none", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    args = argparse.Namespace(
        models="stacked_lstm", trials="2", seeds="1,2,3", proxy="smoke", experiment="smoke", space="lstm_lm",
        stages="final", overrides=overrides, proxy_override=None, dir=str(tmp_path / "cmp"), jobs="2",
        archive=None, final_jobs=final_jobs,
    )  # fmt: skip
    plan = Plan(args)
    plan.metric, plan.base_seed = "val/ppl", 1
    assert plan.jobs == 2
    cmp = Compare(plan, runner=Fake())
    problems = cmp.final("stacked_lstm", {"trainer.lr": 1.5})
    assert len(problems) == 3  # nothing ran: every seed is missing
    (cmd,) = Fake.cmds
    n_jobs = [a for a in cmd if a.startswith("hydra.launcher.n_jobs=")]
    assert n_jobs == (["hydra.launcher.n_jobs=1"] if final_jobs else ["hydra.launcher.n_jobs=2"])
    assert "seed=1,2,3" in cmd and "trainer.lr=1.5" in cmd
    without = Plan(argparse.Namespace(**{**vars(args), "final_jobs": None}))
    assert plan.settings() == without.settings()


def test_a_final_run_is_archived_as_soon_as_it_ends(tmp_path):
    """Final runs one seed at a time (the interleaved order, record=False) last hours each: the record of one
    that ended goes to archive= at once, not at the archive's next ten-minute save, which a machine handed
    back in between would lose."""
    folder, keep = tmp_path / "cmp", tmp_path / "keep"
    cmp = _compare(folder, models="stacked_lstm", trials="2", stages="final", archive=str(keep))
    run = folder / "final" / "stacked_lstm" / "seed=1"

    class Fake:
        def run(self, cmd):  # the run ends: its record, as train writes it
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"status": "completed", "val/ppl": 90.0}))
            (run / "history.jsonl").write_text(json.dumps({"epoch": 1, "val/ppl": 90.0}) + "\n")
            return 0

    cmp.runner = Fake()
    assert cmp.final("stacked_lstm", {"trainer.lr": 1.5}, [1], record=False) == []
    kept = keep / "final" / "stacked_lstm" / "seed=1"
    assert json.loads((kept / "metrics.json").read_text())["status"] == "completed"
    assert (kept / "history.jsonl").read_text() == (run / "history.jsonl").read_text()


def test_the_archive_keeps_the_records_and_a_fresh_folder_continues_from_it(tmp_path):
    """archive=: the study, the summary and the records of the runs that ended are copied out (not their
    checkpoints or W&B files, not a run still going); with the folder gone, the same comparison brings them
    back and continues where it was: the same trials, the same budget, only the trial that was going runs
    again. A file the folder holds is never replaced from the archive, and a journal caught mid-append is
    kept up to its last whole line."""
    import shutil

    import optuna
    from optuna.trial import TrialState

    folder, keep = tmp_path / "cmp", tmp_path / "keep"
    cmp = _compare(folder, models="stacked_lstm", trials="3", stages="search", jobs=2, archive=str(keep))
    study = cmp.study("stacked_lstm", create=True)
    dists = cmp.plan.space.distributions()
    for n, (state, status) in enumerate([("complete", "completed"), ("pruned", "pruned"), (None, "running")]):
        t = study.ask(dists)
        t.report(150.0 + n, 1)
        if state == "complete":
            study.tell(t, 120.0)
        elif state == "pruned":
            study.tell(t, state=TrialState.PRUNED)
        run = folder / "search" / "stacked_lstm" / f"trial={n}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.pt").write_bytes(b"\0" * 1000)
        (run / "wandb").mkdir()
        (run / "wandb" / "run.wandb").write_bytes(b"\0" * 10)
        metrics = {"status": status, "epochs_completed": 2 - (n == 1), "cpu_s": 10.0 * (n + 1), "wall_s": 5.0}
        (run / "metrics.json").write_text(json.dumps(metrics))
        (run / "history.jsonl").write_text(json.dumps({"epoch": 1, "val/ppl": 150.0 + n}) + "\n")
        (run / "config.json").write_text("{}")
    (folder / "report" / "figures").mkdir(parents=True)
    (folder / "report" / "figures" / "curves.png").write_bytes(b"png")
    # the report's W&B run and cache (make report logs one), which the archive does not keep
    (folder / "report" / "wandb" / "offline-run-1").mkdir(parents=True)
    (folder / "report" / "wandb" / "offline-run-1" / "run-1.wandb").write_bytes(b"\0" * 10)
    (folder / "report" / ".wandb-cache" / "artifacts").mkdir(parents=True)
    (folder / "report" / ".wandb-cache" / "artifacts" / "media.png").write_bytes(b"png")
    budget = cmp.budget("stacked_lstm")  # a save point: the archive follows
    kept = {str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file()}
    for n in (0, 1):
        assert {
            f"search/stacked_lstm/trial={n}/{f}" for f in ("metrics.json", "history.jsonl", "config.json")
        } <= kept
    assert {"summary.json", "optuna/stacked_lstm.journal", "report/figures/curves.png"} <= kept
    assert not [k for k in kept if "trial=2" in k or "checkpoints" in k or "wandb" in k], kept
    assert {k for k in kept if k.startswith("report/")} == {"report/figures/curves.png"}

    shutil.rmtree(folder)

    class Fake:
        cmds: list = []

        def run(self, cmd):
            Fake.cmds.append(cmd)
            return 0

    again = _compare(
        folder, models="stacked_lstm", trials="3", stages="search", jobs=2, runner=Fake(), archive=str(keep)
    )
    back = again.study("stacked_lstm")
    assert [(t.number, t.state, t.params, t.value) for t in back.trials] == [
        (t.number, t.state, t.params, t.value) for t in study.trials
    ]
    assert (folder / "search" / "stacked_lstm" / "trial=0" / "metrics.json").is_file()
    assert not (folder / "search" / "stacked_lstm" / "trial=2").exists()  # its run starts again
    assert not list(folder.rglob(".*restore-*")) and (folder / "report" / "figures" / "curves.png").is_file()
    # the same budget but for the spend of the run that was going (lost with its folder; counted when it ends)
    assert again.budget("stacked_lstm") == {
        **budget, "epochs_trained": budget["epochs_trained"] - 2, "cpu_s": budget["cpu_s"] - 30.0,
        "wall_s": budget["wall_s"] - 5.0,
    }  # fmt: skip
    again._failed, again._failed_batches = {}, {}  # (what search_all sets up)
    again.search(1, "stacked_lstm")  # only the trial that was going runs, in its (new) folder
    assert len(Fake.cmds) == 1 and "tune.trial=2" in Fake.cmds[0]

    # the folder's own files are never replaced: not a changed file, not a run it holds in part
    (folder / "search" / "stacked_lstm" / "trial=0" / "metrics.json").write_text('{"status": "completed"}')
    (folder / "search" / "stacked_lstm" / "trial=1" / "history.jsonl").unlink()
    from dglstm_lm.archive import keep as keep_now
    from dglstm_lm.archive import restore

    assert restore(keep, folder) == 0
    assert (
        folder / "search" / "stacked_lstm" / "trial=0" / "metrics.json"
    ).read_text() == '{"status": "completed"}'
    # a journal read while a trial appends to it: kept up to its last whole line, and it loads
    journal = folder / "optuna" / "stacked_lstm.journal"
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id"')
    keep_now(folder, keep)
    assert (keep / "optuna" / "stacked_lstm.journal").read_bytes() == whole
    from dglstm_lm.tune import storage

    optuna.load_study(study_name="stacked_lstm", storage=storage(keep / "optuna" / "stacked_lstm.journal"))


def test_an_archive_of_another_comparison_is_refused_before_anything_is_copied(tmp_path):
    """An archive holds one comparison: given to a comparison of other settings, it is refused in one line
    naming archive=, and nothing of it is copied into the folder."""
    from dglstm_lm.errors import UserError

    keep = tmp_path / "keep"
    other = _compare(tmp_path / "a", models="stacked_lstm", trials="2", stages="search", archive=str(keep))
    other.study("stacked_lstm", create=True)
    other._save_summary()  # keeps summary.json and the study there
    assert (keep / "summary.json").is_file() and (keep / "optuna" / "stacked_lstm.journal").is_file()
    settings = json.loads((keep / "summary.json").read_text())
    settings["settings"]["proxy"] = "another_proxy"
    (keep / "summary.json").write_text(json.dumps(settings))
    with pytest.raises(
        UserError,
        match=r"^archive=.* holds a comparison with other settings \(proxy: 'another_proxy' → 'smoke'\); use another archive=$",
    ):
        _compare(tmp_path / "b", models="stacked_lstm", trials="2", stages="search", archive=str(keep))
    assert not (tmp_path / "b" / "optuna").exists()


def test_an_archive_inside_the_folder_is_refused_in_one_line(tmp_path):
    from dglstm_lm.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"^archive=.*: inside the comparison's folder .*; give one outside it$"
    ):
        _compare(
            tmp_path / "cmp",
            models="dglstm",
            trials="2",
            stages="search",
            archive=str(tmp_path / "cmp" / "a"),
        )
    with pytest.raises(
        ConfigError, match=r"^archive=.*: holds the comparison's folder .*; give one beside it$"
    ):
        _compare(tmp_path / "cmp", models="dglstm", trials="2", stages="search", archive=str(tmp_path))


def _tree_digest(folder: Path) -> dict:
    import hashlib

    return {
        str(f.relative_to(folder)): hashlib.md5(f.read_bytes()).hexdigest()
        for f in folder.rglob("*")
        if f.is_file()
    }


def _part_way(folder: Path, trials: str = "3", stages: str = "search,final"):
    """A comparison part-way, on the smoke recipes: stacked LSTM 2 trials complete (150, 140) and one pruned,
    DGLSTM 2 complete (145, 130) and one cut short after 2 epochs, all at the shared start-up points; the
    stacked LSTM's seed 1 final run completed (test 99.5)."""
    from optuna.trial import TrialState

    cmp = _compare(str(folder), models="stacked_lstm,dglstm", trials=trials, stages=stages, runner=None)
    dists, points = cmp.plan.space.distributions(), cmp.startup_points()
    for model, values in {
        "stacked_lstm": [150.0, 140.0, "pruned"],
        "dglstm": [145.0, 130.0, "running"],
    }.items():
        study = cmp.study(model, create=True)
        for point, v in zip(points, values, strict=False):
            study.enqueue_trial(point)
            t = study.ask(dists)
            if v == "pruned":
                t.report(300.0, 2)
                study.tell(t, state=TrialState.PRUNED)
            elif v != "running":
                study.tell(t, v)
    run = folder / "search" / "dglstm" / "trial=2"
    run.mkdir(parents=True)
    (run / "history.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    seed1 = folder / "final" / "stacked_lstm" / "seed=1"
    seed1.mkdir(parents=True)
    (seed1 / "metrics.json").write_text(json.dumps({"status": "completed", "test/ppl": 99.5}))
    cmp._save_summary()
    return cmp


def test_status_says_where_it_stands_and_writes_nothing(tmp_path):
    """status=1 on a comparison part-way: each model's finished trials and best so far, a trial cut short
    with its epochs, the final runs seed by seed, the shared start-up points paired, whether a make compare
    holds the folder, and what comes next — all read without writing a byte (the journals included: opening
    a study to create it would append to them)."""
    from dglstm_lm.compare import Compare, _lock

    folder = tmp_path / "cmp"
    cmp = _part_way(folder)
    before = _tree_digest(folder)

    lines = Compare(cmp.plan, None, read_only=True).status()
    assert lines[0].startswith(f"{folder}: stacked_lstm, dglstm; 3 trials each on smoke")
    assert lines[1].startswith("  nothing is running on it now")
    assert (
        "  search stacked_lstm: 3 of 3 trials finished (2 complete, 1 pruned); 0 failed and drawn again; "
        "best so far trial 1, 140.00"
    ) in lines
    assert "  final stacked_lstm: seed 1 completed (test 99.50)" in lines
    assert (
        "  search dglstm: 2 of 3 trials finished (2 complete, 0 pruned); 0 failed and drawn again; "
        "cut short: trial 2 (2 epochs done); best so far trial 1, 130.00"
    ) in lines
    (paired,) = [ln for ln in lines if ln.startswith("  start-up points")]
    assert (
        paired.startswith("  start-up points, dglstm − stacked_lstm: -7.50 [") and "over 2 points" in paired
    )
    assert lines[-1] == "  next: the search, 1 trials left in all"
    assert _tree_digest(folder) == before

    fd = _lock(folder)  # a make compare running on it
    try:
        lines = Compare(cmp.plan, None, read_only=True).status()
    finally:
        os.close(fd)
    assert lines[1] == "  a make compare is running on it now"
    assert any("; running or waiting to resume: trial 2 (2 epochs done)" in ln for ln in lines)


def test_status_follows_the_comparison_to_its_end_and_its_archive(tmp_path):
    """The stages after the search: the pruned trial run to the end (complete_pruned=1, as summary.json
    records it even when the command leaves it out) counts toward the best; then the final runs; then the
    report. Only the search asked for (make search): no final runs. The folder gone: its archive is read."""
    import shutil

    from dglstm_lm.compare import Compare

    folder = tmp_path / "cmp"
    cmp = _part_way(folder)
    cmp.study("dglstm").tell(2, 128.0)  # the DGLSTM's trial 2 completes
    summary = json.loads((folder / "summary.json").read_text())
    (folder / "summary.json").write_text(json.dumps({**summary, "complete_pruned": True}))

    def status(stages="search,final", archive=None):
        import argparse

        from dglstm_lm.compare import Plan

        args = argparse.Namespace(
            models="stacked_lstm,dglstm", trials="3", seeds="1", proxy="smoke", experiment="smoke",
            space="lstm_lm", stages=stages, overrides=["logger=none"], proxy_override=None, dir=str(folder),
            jobs=None, archive=archive,
        )  # fmt: skip
        plan = Plan(args)  # (a Compare that may write, as _compare makes, would restore the archive)
        plan.metric, plan.base_seed = "val/ppl", 1
        return Compare(plan, None, read_only=True).status()

    lines = status()
    assert "  pruned trials of stacked_lstm run to the end: 0 of 1" in lines
    assert lines[-1] == "  next: the pruned trials run to the end, 1 left"
    unpruned = folder / "unpruned" / "stacked_lstm" / "trial=2"
    unpruned.mkdir(parents=True)
    (unpruned / "metrics.json").write_text(json.dumps({"status": "completed", "val/ppl": 120.0}))
    lines = status()
    assert any(
        ln.startswith("  search stacked_lstm:") and ln.endswith("best so far trial 2, 120.00") for ln in lines
    )
    assert lines[-1] == "  next: the final runs, 1 of 2 left"
    # a final run part-way: the time left is every unfinished run trained to the cap at the epoch time its
    # history shows (its shortest epoch, from elapsed_s: the pauses, here two 360 s epochs of 4, do not count), one at a time
    going = folder / "final" / "stacked_lstm" / "seed=1"
    going.mkdir(parents=True, exist_ok=True)
    (going / "metrics.json").write_text(
        json.dumps({"status": "running", "epochs_completed": 4, "max_epochs": 10})
    )
    (going / "history.jsonl").write_text(
        "".join(
            json.dumps({"epoch": e + 1, "elapsed_s": t}) + "\n" for e, t in enumerate([60, 420, 780, 840])
        )
    )
    assert status()[-1] == (
        "  next: the final runs, 2 of 2 left; about 0.3 h more if every run trains to its cap of 10 epochs at its "
        "model's fastest epoch so far (min: stacked_lstm 1.0, dglstm as the others (no epoch yet)); pauses add "
        "to it, early stopping ends runs sooner"
    )  # (10 − 4) × 60 s for the stacked LSTM, 10 × 60 s for the DGLSTM: 960 s
    for model in MODELS:
        run = folder / "final" / model / "seed=1"
        run.mkdir(parents=True, exist_ok=True)
        (run / "metrics.json").write_text(json.dumps({"status": "completed", "test/ppl": 99.5}))
    lines = status()
    assert lines[-1] == "  next: the report"
    assert (
        "  final runs, dglstm − stacked_lstm, test perplexity over seed 1: +0.00 (one seed: no interval)"
        in lines
    )
    (folder / "report").mkdir()
    (folder / "report" / "report.md").write_text("# report\n")
    assert status()[-1] == f"  done: the report is {folder / 'report' / 'report.md'}"
    lines = status(stages="search")
    assert lines[-1] == "  done: the search" and not any(ln.startswith("  final ") for ln in lines)
    assert "then smoke" not in lines[0]

    archive = tmp_path / "archive"
    shutil.copytree(folder, archive)
    shutil.rmtree(folder)
    lines = status(archive=str(archive))
    assert lines[0].startswith(f"{archive}: ") and "(from archive=, as of its last copy" in lines[0]
    assert lines[-1] == f"  done: the report is {archive / 'report' / 'report.md'}"
    assert not folder.exists()


def test_status_of_a_folder_that_holds_nothing_makes_nothing(tmp_path):
    r = run_cli(
        [
            PY,
            "-m",
            "dglstm_lm.compare",
            "--status",
            "1",
            "--dir",
            str(tmp_path / "none"),
            "--trials",
            "3",
            "logger=none",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{tmp_path / 'none'}: no comparison here yet (no summary.json)"
    assert not (tmp_path / "none").exists()
    bad = run_cli([PY, "-m", "dglstm_lm.compare", "--status", "maybe", "--dir", str(tmp_path / "none")])
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: status=maybe: expected 1 or 0"]


@pytest.mark.parametrize(
    "launcher, expected",
    [
        (
            ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "final_jobs=1"],
            [[1], [1], [2], [2], [3], [3]],
        ),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], [[1, 2], [1, 2], [3], [3]]),
        # joblib's own default (and -1): one per core, 2 here (the test's cpu_cores)
        (["hydra/launcher=joblib"], [[1, 2], [1, 2], [3], [3]]),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"], [[1, 2], [1, 2], [3], [3]]),
        # n_jobs above the seeds: at most the seeds, all at once
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=5"], [[1, 2, 3], [1, 2, 3]]),
        ([], [[1], [1], [2], [2], [3], [3]]),  # Hydra's basic launcher: one job after another
        (["hydra/launcher=slurm"], [[1, 2, 3], [1, 2, 3]]),  # every job queued at once
    ],
)
def test_final_runs_go_seed_by_seed_with_the_models_in_turn(tmp_path, monkeypatch, launcher, expected):
    """The final runs go as many at a time as the launcher runs, seed by seed with the models in turn, so
    that wherever the stage stops both models hold the same seeds (the models' first seeds pair hours before
    the last run ends); a seed already completed is not run again, and the summary records every seed."""
    import argparse

    from dglstm_lm.compare import Compare, Plan

    monkeypatch.setattr("dglstm_lm.parallel.cpu_cores", lambda: 2)

    class Fake:
        runs: list = []

        def run(self, cmd):
            model = next(a for a in cmd if a.startswith("model=")).split("=", 1)[1]
            seeds = [
                int(x) for x in next(a for a in cmd if a.startswith("seed=")).split("=", 1)[1].split(",")
            ]
            Fake.runs.append((model, seeds))
            for sd in seeds:
                run = tmp_path / "cmp" / "final" / model / f"seed={sd}"
                run.mkdir(parents=True, exist_ok=True)
                test = 100.0 + sd if model == "stacked_lstm" else 94.0 + 1.1 * sd
                (run / "metrics.json").write_text(json.dumps({"status": "completed", "test/ppl": test}))
            return 0

    final_jobs = next((o.split("=")[1] for o in launcher if o.startswith("final_jobs=")), None)
    overrides = ["logger=none", *[o for o in launcher if not o.startswith("final_jobs=")]]
    args = argparse.Namespace(
        models="stacked_lstm,dglstm", trials="2", seeds="1,2,3", proxy="smoke", experiment="smoke",
        space="lstm_lm", stages="final", overrides=overrides, proxy_override=None, dir=str(tmp_path / "cmp"),
        jobs="2", archive=None, final_jobs=final_jobs,
    )  # fmt: skip
    plan = Plan(args)
    plan.metric, plan.base_seed = "val/ppl", 1
    cmp = Compare(plan, runner=Fake())
    best = {m: {"params": {"trainer.lr": 1.5}} for m in MODELS}
    assert cmp.final_all(best) == []
    assert [seeds for _, seeds in Fake.runs] == expected
    assert [m for m, _ in Fake.runs] == [MODELS[i % 2] for i in range(len(expected))]
    assert all(
        cmp.summary["final"]["stacked_lstm"]["runs"][str(sd)]["test/ppl"] == 100.0 + sd for sd in (1, 2, 3)
    )
    # status=1 pairs the seeds both models completed: differences -5.9, -5.8, -5.7, a t interval with 2 df
    (line,) = [ln for ln in Compare(plan, None, read_only=True).status() if ln.startswith("  final runs, ")]
    half = 4.302652729911275 * 0.1 / 3**0.5  # t(0.975, 2) × sd / √n
    assert line.startswith("  final runs, dglstm − stacked_lstm, test perplexity over seeds 1,2,3: -5.80 [")
    assert f"[{-5.8 - half:.2f}, {-5.8 + half:.2f}]" in line
    Fake.runs = []
    assert cmp.final_all(best) == [] and Fake.runs == []  # done: nothing runs again


def test_the_final_runs_time_left_follows_their_groups(tmp_path):
    """status=1's bound on the final runs' time left follows final_all's order: each model's seeds in groups
    of final_jobs, a group as long as its longest run. Seeds 2, 3 done at 1 min an epoch, a cap of 40:
    seed 4 of each model runs alone (a group of one), 40 + 40 min, not the 80 min halved."""
    import argparse

    from dglstm_lm.compare import Compare, Plan

    args = argparse.Namespace(
        models="stacked_lstm,dglstm", trials="2", seeds="2,3,4", proxy="smoke", experiment="smoke",
        space="lstm_lm", stages="final", overrides=["logger=none", "hydra/launcher=joblib"], proxy_override=None,
        dir=str(tmp_path / "cmp"), jobs="2", archive=None, final_jobs="2",
    )  # fmt: skip
    plan = Plan(args)
    plan.metric, plan.base_seed = "val/ppl", 1
    for m in MODELS:
        for sd in (2, 3):
            run = tmp_path / "cmp" / "final" / m / f"seed={sd}"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"status": "completed", "max_epochs": 40}))
            (run / "history.jsonl").write_text(
                "".join(json.dumps({"epoch": e, "elapsed_s": 60.0 * e}) + "\n" for e in range(1, 41))
            )
    assert (
        Compare(plan, None, read_only=True)
        ._final_time_left()
        .startswith("; about 1.3 h more if every run trains to its cap of 40 ")
    )


@pytest.mark.parametrize(
    "overrides, jobs, expected",
    [
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"], None, 2),  # joblib's -1: one per core
        (["hydra/launcher=joblib"], None, 2),  # the launcher's default, -1
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"], None, 3),
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-2"], None, 1),  # joblib's -2: all cores but one
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"], "1", 1),  # jobs= wins
        ([], None, 1),  # Hydra's basic launcher runs one job at a time
    ],
)
def test_the_search_batches_follow_the_launcher_when_jobs_is_not_given(
    tmp_path, monkeypatch, overrides, jobs, expected
):
    """jobs= (the search's trials at a time) defaults to what the launcher runs at once: joblib's n_jobs, one
    per core where it is -1 or unset (it was refused with 'jobs=None' for -1, the value running.md
    documents as one per core)."""
    import argparse

    from dglstm_lm.compare import Plan

    monkeypatch.setattr("dglstm_lm.parallel.cpu_cores", lambda: 2)
    args = argparse.Namespace(
        models="stacked_lstm", trials="2", seeds="2,3", proxy="smoke", experiment="smoke", space="lstm_lm",
        stages="search", overrides=["logger=none", *overrides], proxy_override=None, dir=str(tmp_path / "c"),
        jobs=jobs, archive=None, final_jobs=None,
    )  # fmt: skip
    assert Plan(args).jobs == expected
