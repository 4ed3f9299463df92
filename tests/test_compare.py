"""`make compare`: equal-budget search per model, the best config × seeds, the report; resumable."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from .conftest import PY, run_cli

# The smoke recipe cut down further: what is tested is the plumbing, not the perplexities.
TINY = ["trainer.limit_train_batches=4", "trainer.limit_eval_batches=2", "trainer.max_epochs=1"]
MODELS = ("stacked_lstm", "dglstm")


def _study(folder: Path, model: str):
    import optuna

    return optuna.load_study(study_name=model, storage=f"sqlite:///{folder / 'optuna' / f'{model}.sqlite'}")


def _complete(study) -> list:
    import optuna

    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


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
    cmd += ["experiment=smoke", f"dir={folder}", *common]
    r = run_cli(cmd, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for m in MODELS:
        assert f"{m}: 1 of 2 trials complete; running 1" in r.stdout
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["trials_per_model"] == 2 and summary["settings"]["proxy"] == "smoke"
    studies = {m: _study(folder, m) for m in MODELS}
    for m, study in studies.items():
        done = _complete(study)
        assert len(done) == 2
        best = min(done, key=lambda t: t.value)
        assert set(best.params) == {"trainer.lr", "model.dropout"}
        assert summary["best"][m]["params"] == best.params and summary["best"][m]["trial"] == best.number
        for seed in (1, 2):
            run = folder / "final" / m / f"seed={seed}"
            metrics = json.loads((run / "metrics.json").read_text())
            config = json.loads((run / "config.json").read_text())
            assert metrics["status"] == "completed" and metrics["model"] == m and metrics["seed"] == seed
            assert config["trainer"]["lr"] == best.params["trainer.lr"]
            assert config["model"]["dropout"] == best.params["model.dropout"]
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
    assert {m: len(_study(folder, m).trials) for m in MODELS} == trials_before
    assert _metrics_files(folder) == before
    assert (folder / "report" / "report.csv").is_file()


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
        (["trainer.lr=2"], "error: trainer.lr is searched (space=compare); it cannot also be fixed"),
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


def test_a_trial_cut_short_is_retried_with_its_parameters(tmp_path):
    """A trial left RUNNING by a killed search is marked failed and its parameters are asked again first
    (so the retry lands in the same run directory and resumes from its checkpoint)."""
    import optuna

    from dglstm_lm.compare import complete_trials, recover_interrupted

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="m", storage=f"sqlite:///{tmp_path / 's.sqlite'}")
    done = study.ask()
    done.suggest_float("trainer.lr", 0.25, 4.0, log=True)
    study.tell(done, 3.0)
    cut = study.ask()
    lr = cut.suggest_float("trainer.lr", 0.25, 4.0, log=True)
    assert recover_interrupted(study, budget_left=1) == [{"trainer.lr": lr}]
    states = {t.number: t.state for t in study.trials}
    assert states[cut.number] == optuna.trial.TrialState.FAIL
    retry = study.ask()
    assert retry.suggest_float("trainer.lr", 0.25, 4.0, log=True) == lr
    assert [t.number for t in complete_trials(study)] == [done.number]
