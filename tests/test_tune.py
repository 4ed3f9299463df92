"""The tuner's parts (dglstm_lm/tune.py): the expected-best estimator against brute force, the search space
(every point of it trains), a trial job's parameters, pruning and result; and the regularisers and the early
stopping that the space and the tuned recipe use."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dglstm_lm import tune

from .conftest import PY, run_cli


# ------------------------------------------------------------------------------- expected best of n trials
def _brute_force(values: list[float], n: int) -> float:
    """The mean, over every n-subset of the N trials, of the subset's best (lowest) value."""
    return statistics.fmean(min(c) for c in itertools.combinations(values, n))


@pytest.mark.parametrize("seed", range(6))
def test_expected_best_equals_brute_force_over_every_subset(seed):
    rng = random.Random(seed)
    big_n = rng.randint(1, 8)
    values = [round(rng.uniform(80, 200), 1) for _ in range(big_n)]
    if seed % 2:  # ties
        values = [float(rng.choice([90, 100, 110])) for _ in range(big_n)]
    for n in range(1, big_n + 1):
        assert tune.expected_best(values, n) == pytest.approx(_brute_force(values, n), rel=1e-12)


def test_expected_best_known_values_and_curve():
    assert tune.expected_best([3.0, 1.0, 2.0], 1) == pytest.approx(2.0)  # the mean
    assert tune.expected_best([3.0, 1.0, 2.0], 3) == 1.0  # the minimum
    assert tune.expected_best([3.0, 1.0, 2.0], 2) == pytest.approx((1 + 1 + 2) / 3)
    with pytest.raises(ValueError):
        tune.expected_best([1.0], 2)
    curve = tune.expected_best_curve([120.0, 95.0, 101.0, 99.0, 130.0], boot=300)
    est = [r["expected_best"] for r in curve]
    assert [r["n"] for r in curve] == [1, 2, 3, 4, 5]
    assert all(a >= b for a, b in zip(est, est[1:]))  # more trials never expect a worse best
    assert all(
        r["lo"] <= r["expected_best"] + 1e-9 and r["expected_best"] <= r["hi"] + 1e-9 for r in curve[:-1]
    )
    assert est[-1] == 95.0


# ---------------------------------------------------------------------------------------------- the space
def test_the_space_holds_the_regularisers_and_the_schedule():
    space = tune.Space.load("lstm_lm")
    assert set(space.params) == {
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
    d = space.distributions()
    assert d["model.dropout_kind"].choices == ("standard", "variational")
    assert d["trainer.lr"].log and d["model.init_range"].log


def test_a_bad_space_is_one_line(tmp_path):
    from dglstm_lm.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  trainer.lr: {low: 1}\n")
    with pytest.raises(ConfigError, match=r"trainer.lr: expected \{low, high\[, log\]\} or \{choices\}"):
        tune.Space.load(str(bad))
    with pytest.raises(ConfigError, match="unknown space 'nope'"):
        tune.Space.load("nope")


@pytest.mark.slow  # trains on real PTB (seconds each)
@pytest.mark.parametrize("model", ["stacked_lstm", "dglstm"])
def test_points_of_the_space_train(model, tmp_path, ptb_dir, ptb_root):
    """A few points drawn at random from the space (both dropout kinds, tied and untied among them), each
    applied to the proxy recipe as make compare applies them, train a few batches and validate."""
    import optuna
    from omegaconf import OmegaConf, open_dict

    from dglstm_lm.config import compose
    from dglstm_lm.train import train

    space = tune.Space.load("lstm_lm")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for i in range(3):
        t = study.ask(space.distributions())
        seen.add((t.params["model.dropout_kind"], t.params["model.tie_weights"]))
        cfg = compose(
            [
                f"model={model}",
                "experiment=tuned_small_proxy",
                "logger=none",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.limit_eval_batches=2",
                f"paths.data_dir={ptb_root}",
                f"data.dir={ptb_dir}",
            ]
        )
        with open_dict(cfg):
            for k, v in t.params.items():
                OmegaConf.update(cfg, k, v, merge=False)
        m = train(cfg, tmp_path / f"p{i}")
        assert m["status"] == "completed" and math.isfinite(m["val/ppl"]), t.params
        stored = json.loads((tmp_path / f"p{i}" / "config.json").read_text())
        assert stored["model"]["dropout_out"] == t.params["model.dropout_out"]
        assert stored["trainer"]["lr"] == t.params["trainer.lr"]
    assert len(seen) >= 2


# ------------------------------------------------------------------------------------ a trial's job, pruned
@pytest.mark.slow  # trains on real PTB (seconds each)
def test_a_trial_job_reads_its_point_reports_and_is_pruned(tmp_path, ptb_dir, ptb_root):
    """The job of trial 1 (parameters drawn by the study) trains with them, reports each epoch, and is
    stopped by the pruner (an earlier trial was far better at every epoch): its run directory says pruned,
    its study says PRUNED, and running the job again trains nothing."""
    import optuna

    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "params:\n  trainer.lr: {low: 0.5, high: 1.0}\n  model.dropout_out: {low: 0.0, high: 0.3}\n"
        "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}\n"
    )
    space = tune.Space.load(str(space_file))
    path = tmp_path / "optuna" / "m.journal"
    study = tune.open_study(path, "m", space)
    study.set_user_attr("space", space.as_dict())
    first = study.ask(space.distributions())
    for epoch in (1, 2):
        first.report(1.0, epoch)  # an impossible perplexity: every later trial is worse than its median
    study.tell(first, 1.0)
    trial = study.ask(space.distributions())
    run = tmp_path / "trial1"
    cmd = [
        PY,
        "-m",
        "dglstm_lm.train",
        "model=stacked_lstm",
        "experiment=smoke",
        "logger=none",
        "trainer.limit_train_batches=3",
        "trainer.limit_eval_batches=2",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
        f"tune.storage={path}",
        "tune.study=m",
        f"tune.trial={trial.number}",
        f"hydra.run.dir={run}",
    ]
    r = run_cli(cmd, env={"PTB_DIR": str(ptb_dir)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert metrics["status"] == "pruned" and metrics["epochs_completed"] == 1 and metrics["test/ppl"] is None
    assert config["trainer"]["lr"] == trial.params["trainer.lr"]
    assert config["model"]["dropout_out"] == trial.params["model.dropout_out"]
    t = tune.open_study(path, "m", space).trials[trial.number]
    assert t.state == optuna.trial.TrialState.PRUNED
    assert t.intermediate_values == {1: pytest.approx(metrics["val/ppl"])}
    before = (run / "metrics.json").read_text()
    r = run_cli(cmd, env={"PTB_DIR": str(ptb_dir)}, timeout=300)
    assert r.returncode == 0 and "was pruned" in r.stderr + r.stdout
    assert (run / "metrics.json").read_text() == before

    # tune.complete=true (make compare complete_pruned=1): the same trial's parameters, run to the end in a
    # folder of its own without the pruner; its study is read, not written
    journal = path.read_bytes()
    done = tmp_path / "trial1-complete"
    cmd = [*cmd[:-1], "tune.complete=true", f"hydra.run.dir={done}"]
    r = run_cli(cmd, env={"PTB_DIR": str(ptb_dir)}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((done / "metrics.json").read_text())
    config = json.loads((done / "config.json").read_text())
    assert (
        metrics["status"] == "completed"
        and metrics["epochs_completed"] == config["trainer"]["max_epochs"] > 1
    )
    assert config["trainer"]["lr"] == trial.params["trainer.lr"]
    assert path.read_bytes() == journal


@pytest.mark.slow  # trains on real PTB (seconds each)
def test_a_trial_job_that_is_not_in_the_study_is_one_line(tmp_path, ptb_dir, ptb_root):
    space = tune.Space.load("lstm_lm")
    path = tmp_path / "s.journal"
    tune.open_study(path, "m", space)
    r = run_cli(
        [
            PY,
            "-m",
            "dglstm_lm.train",
            "experiment=smoke",
            "logger=none",
            f"paths.data_dir={ptb_root}",
            f"data.dir={ptb_dir}",
            f"tune.storage={path}",
            "tune.study=m",
            "tune.trial=7",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env={"PTB_DIR": str(ptb_dir)},
        timeout=300,
    )
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == "error: tune.trial=7: no such trial in study m"


# ------------------------------------------------------------------- the regularisers and early stopping
def test_dropout_per_place():
    from omegaconf import OmegaConf

    from dglstm_lm.config import DGLSTMConfig
    from dglstm_lm.models import build_model

    cfg = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(DGLSTMConfig),
            {"name": "dglstm", "dropout": 0.4, "dropout_emb": 0.1, "dropout_out": 0.3},
        )
    )
    m = build_model(50, cfg)
    assert (m.drop.p, m.core.drop.p, m.drop_out.p) == (0.1, 0.4, 0.3)  # layers: model.dropout
    # only the place given a rate drops: with dropout before the decoder alone, the core's output in
    # training mode equals its output in evaluation mode (nothing dropped before it), the logits do not
    cfg2 = OmegaConf.to_object(
        OmegaConf.merge(
            OmegaConf.structured(DGLSTMConfig),
            {"name": "dglstm", "emb_dim": 8, "hidden_dim": 8, "dropout_out": 0.5, "backend": "python"},
        )
    )
    m2 = build_model(30, cfg2)
    tokens = torch.randint(0, 30, (5, 3))
    seen = {}
    m2.core.register_forward_hook(lambda mod, i, o: seen.__setitem__(mod.training, o[0]))
    torch.manual_seed(0)
    m2.train()
    train_logits, _ = m2(tokens, m2.init_state(3))
    m2.eval()
    eval_logits, _ = m2(tokens, m2.init_state(3))
    torch.testing.assert_close(seen[True], seen[False])
    assert not torch.allclose(train_logits, eval_logits)


def test_early_stopping_decides_from_the_position_and_the_best_epoch():
    from dglstm_lm.trainer import Trainer

    def state(patience, best_epoch, epoch):
        return SimpleNamespace(
            t=SimpleNamespace(early_stop_patience=patience, max_epochs=8),
            best_epoch=best_epoch,
            pos=SimpleNamespace(epoch=epoch),
        )

    assert not Trainer.stopped_early(state(None, 0, 9))
    assert not Trainer.stopped_early(state(2, -1, 0))  # nothing validated yet
    assert not Trainer.stopped_early(state(2, 3, 5))  # epochs 5 (best: index 3 = epoch 4), 1 epoch since
    assert Trainer.stopped_early(state(2, 3, 6))  # 2 epochs without a better one
    assert Trainer.stopped_early(state(1, 0, 2))
    assert not Trainer.stopped_early(state(2, 5, 8))  # at max_epochs: the run ended, not stopped early
    assert Trainer.stopped_early(state(2, 4, 7))  # the same patience one epoch before max_epochs: stopped
    assert not Trainer.stopped_early(state(0, 0, 5))  # patience 0: early stopping off


@pytest.mark.slow  # trains on real PTB (seconds each)
def test_early_stopping_ends_training_and_the_run_says_so(tmp_path, ptb_dir, ptb_root):
    """A rate too small to move the model: validation barely changes; with patience 1 and a learning rate of
    zero-ish the second epoch cannot beat the first by the float's last bit every time, so we force it: a
    rate of 0 (constant schedule) leaves the weights as they are and every epoch ties the first."""
    from dglstm_lm.config import compose
    from dglstm_lm.train import train

    cfg = compose(
        [
            "experiment=smoke",
            "logger=none",
            "trainer.optimizer=adam",
            "trainer.lr=1e-30",
            "trainer.lr_schedule=constant",
            "trainer.max_epochs=5",
            "trainer.early_stop_patience=2",
            "model.backend=python",
            "trainer.limit_train_batches=2",
            "trainer.limit_eval_batches=2",
            f"paths.data_dir={ptb_root}",
            f"data.dir={ptb_dir}",
        ]
    )
    m = train(cfg, tmp_path / "run")
    assert m["status"] == "completed" and m["stopped_early"] is True
    assert m["epochs_completed"] == 1 + 2 < m["max_epochs"]
    history = [json.loads(x) for x in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3


def test_space_dir_is_the_conf_folder():
    assert tune.SPACE_DIR == Path(__file__).resolve().parent.parent / "conf" / "space"


def test_pruner_replay_counts_epochs_and_keeps_the_best():
    good = [300.0, 200.0, 150.0, 130.0, 120.0, 115.0, 112.0, 110.0]
    curves = [[v * f for v in good] for f in (1.3, 1.2, 1.25, 1.15, 1.6, 1.7, 1.0, 1.8)]
    out = tune.replay_pruners(curves)
    assert set(out) == {"median", "successive_halving", "hyperband"}
    med = out["median"]
    assert med["epochs_unpruned"] == 64 and med["epochs"] < 64 and 0 < med["saved"] < 1
    assert 4 in med["pruned_trials"] and 6 not in med["pruned_trials"]  # the worst stopped, the best kept
    assert med["best_pruned"] is False
    assert all(r["epochs"] <= 64 for r in out.values())


def test_the_last_epoch_is_never_pruned(tmp_path):
    """A prune after a trial's last epoch saves nothing and loses its score (the trial would count as pruned,
    and complete_pruned=1 would train it again from the start). Optuna's median pruner compares a trial's
    best value so far with the median of the others' at the same epoch: a trial far worse from the start is
    stopped after epoch 2 of 3; one ahead of the others until they improve at epoch 3 completes. The
    pruners' replay does the same."""
    from dglstm_lm.trainer import Pruned

    space_file = tmp_path / "space.yaml"
    space_file.write_text(
        "params:\n  trainer.lr: {low: 0.5, high: 1.0}\n"
        "pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 2}\n"
    )
    space = tune.Space.load(str(space_file))
    study = tune.open_study(tmp_path / "m.journal", "m", space)
    first = study.ask(space.distributions())
    for epoch, v in ((1, 100.0), (2, 100.0), (3, 50.0)):
        first.report(v, epoch)
    study.tell(first, 50.0)

    def job():
        j = tune.TrialJob.__new__(tune.TrialJob)  # its on_epoch alone: no training
        j.complete, j.metric, j.max_epochs = False, "val/ppl", 3
        j.trial = study.ask(space.distributions())
        j.number = j.trial.number
        return j

    bad = job()
    bad.on_epoch({"val/ppl": 500.0, "epoch": 1})  # (the warm-up)
    with pytest.raises(Pruned, match="after epoch 2 is worse"):
        bad.on_epoch({"val/ppl": 500.0, "epoch": 2})
    late = job()
    for epoch, v in ((1, 90.0), (2, 90.0), (3, 80.0)):  # 80 > 50 at epoch 3: the pruner would stop it there
        late.on_epoch({"val/ppl": v, "epoch": epoch})

    good = [300.0, 200.0, 150.0, 130.0, 120.0, 115.0, 112.0, 110.0]
    curves = [[v * f for v in good] for f in (1.3, 1.2, 1.25, 1.15)]
    # flat at 136: under the others' median (112 × 1.225 = 137.2) up to epoch 7, over it (134.75) at epoch 8
    med = tune.replay_pruners([*curves, [136.0] * 8])["median"]
    assert 4 not in med["pruned_trials"] and med["epochs"] == med["epochs_unpruned"] == 40


def test_opening_a_study_again_loads_it_without_writing_to_its_journal(tmp_path):
    """A study is opened many times over a comparison (every status line, every batch): the first open creates
    it (one creation in the journal); later opens load it with the same sampler and pruner and append
    nothing, while the trials stay as they were."""
    space = tune.Space.load("lstm_lm")
    path = tmp_path / "m.journal"
    study = tune.open_study(path, "m", space)
    study.tell(study.ask(space.distributions()), 150.0)
    size = path.stat().st_size
    for _ in range(3):
        again = tune.open_study(path, "m", space)
    assert path.stat().st_size == size
    assert [t.value for t in again.trials] == [150.0]
    assert type(again.sampler) is type(study.sampler) and type(again.pruner) is type(study.pruner)
    assert tune.open_study(tmp_path / "absent.journal", "m", space, create=False) is None
