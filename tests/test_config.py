"""Configuration: every recipe composes with every model; mistakes fail at composition, naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dglstm_lm.config import CONF_DIR, MODEL_NAMES, compose, validate
from dglstm_lm.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_expected_recipes_exist():
    assert {"smoke", "zaremba_small", "zaremba_medium", "zaremba_large", "yao_sentence"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_recipe_composes_with_every_model(model, experiment):
    cfg = validate(compose([f"model={model}", f"experiment={experiment}"]))
    assert cfg.model.name == model and cfg.name == experiment


def test_default_is_zaremba_small():
    """`make train model=dglstm` trains exactly the zaremba_small recipe (the README reports one run for both)."""
    default = validate(compose(["model=dglstm"]))
    recipe = validate(compose(["model=dglstm", "experiment=zaremba_small"]))
    for section in ("model", "data", "trainer"):
        assert getattr(default, section) == getattr(recipe, section), section


@pytest.mark.parametrize(
    "experiment,expect",
    [
        (
            "zaremba_small",
            dict(hidden=200, dropout=0.0, epochs=13, bptt=20, decay=0.5, start=4, clip=5.0, init=0.1),
        ),
        (
            "zaremba_medium",
            dict(hidden=650, dropout=0.5, epochs=39, bptt=35, decay=0.8, start=6, clip=5.0, init=0.05),
        ),
        (
            "zaremba_large",
            dict(
                hidden=1500, dropout=0.65, epochs=55, bptt=35, decay=1 / 1.15, start=14, clip=10.0, init=0.04
            ),
        ),
    ],
)
def test_zaremba_recipes_match_the_paper(experiment, expect):
    c = validate(compose(["model=stacked_lstm", f"experiment={experiment}"]))
    assert c.model.layer_dims == [expect["hidden"]] * 2 and c.model.emb_dim == expect["hidden"]
    assert c.model.dropout == expect["dropout"] and c.model.init_range == expect["init"]
    t = c.trainer
    assert (t.max_epochs, t.bptt, t.batch_size, t.lr, t.optimizer) == (
        expect["epochs"],
        expect["bptt"],
        20,
        1.0,
        "sgd",
    )
    assert t.lr_decay == pytest.approx(expect["decay"]) and t.lr_decay_start == expect["start"]
    assert t.clip_grad_norm == expect["clip"] and c.data.batching == "stream"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model=gru"],
            "unknown option model=gru (available: dglstm, lstm, residual_lstm, rnn, stacked_lstm)",
        ),
        (["model.hidden_dim=0"], "model.hidden_dim: must be positive, got 0"),
        (["model.emb_dim=-5"], "model.emb_dim: must be positive, got -5"),
        (["model.num_layers=0"], "model.num_layers: must be positive, got 0"),
        (["model.hidden_dims=[200,200,200]"], "model.hidden_dims: has 3 sizes but model.num_layers=2"),
        (["model.hidden_dims=[200,0]"], "model.hidden_dims: sizes must be positive"),
        (
            ["model.tie_weights=true", "model.hidden_dims=[200,300]"],
            "model.tie_weights: needs the last hidden size (300)",
        ),
        (["model=lstm", "model.num_layers=2"], "model.num_layers: model=lstm has one layer"),
        (["model=stacked_lstm", "model.peephole=true"], "unknown key 'model.peephole'"),
        (["model.backend=cuda"], "model.backend: unknown backend 'cuda'"),
        (["model.depth_gate=shut"], "model.depth_gate: unknown depth gate 'shut' (learned, open, constant)"),
        (["model.depth_gate_inputs=[x,h_prev]"], "model.depth_gate_inputs: unknown term 'h_prev'"),
        (["model.depth_gate_inputs=[x,x]"], "model.depth_gate_inputs: lists a term twice"),
        (
            ["model.depth_gate=open", "model.depth_gate_inputs=[x]"],
            "model.depth_gate_inputs: the terms of a learned gate; depth_gate=open has none",
        ),
        (
            ["model.depth_gate=constant", "model.depth_gate_inputs=[]"],
            "model.depth_gate_inputs: the terms of a learned gate; depth_gate=constant has none",
        ),
        (["model=stacked_lstm", "model.depth_gate=open"], "unknown key 'model.depth_gate'"),
        (["model.dropout_kind=locked"], "model.dropout_kind: unknown kind 'locked' (standard, variational)"),
        (["model.weight_drop=1.0"], "model.weight_drop: must be in [0, 1), got 1.0"),
        (["model.embed_dropout=-0.1"], "model.embed_dropout: must be in [0, 1), got -0.1"),
        (
            ["model=residual_lstm", "model.hidden_dim=300"],
            "model.hidden_dim: residual_lstm's identity shortcuts need every layer as wide as model.emb_dim (200)",
        ),
        (
            ["model=residual_lstm", "model.hidden_dims=[200,300]"],
            "model.hidden_dims: residual_lstm's identity shortcuts need every layer as wide as model.emb_dim",
        ),
        (["trainer.lr=-0.1"], "trainer.lr: must be positive"),
        (["trainer.max_epochs=0"], "trainer.max_epochs: must be positive"),
        (["trainer.bptt=0"], "trainer.bptt: must be positive"),
        (["trainer.batch_size=-1"], "trainer.batch_size: must be positive"),
        (
            ["trainer.max_epochs=ten"],
            "trainer.max_epochs: Value 'ten' of type 'str' could not be converted to Integer",
        ),
        (["trainer.optimizer=rmsprop"], "trainer.optimizer: unknown optimizer 'rmsprop'"),
        (
            ["trainer.optimizer=adam", "trainer.momentum=0.9"],
            "trainer.momentum: applies to optimizer=sgd only",
        ),
        (
            ["trainer.resume=a", "trainer.init_from=b"],
            "trainer.init_from: cannot be combined with trainer.resume",
        ),
        (["trainer.device=tpu"], "trainer.device: unknown device 'tpu'"),
        (["trainer.nonsense=1"], "unknown key 'trainer.nonsense'"),
        (["+trainer.nonsense=1"], "unknown key 'trainer.nonsense'"),
        # one typo away from a field: the field is suggested
        (
            ["model.num_layer=3"],
            "unknown key 'model.num_layer' (not in DGLSTMConfig), did you mean model.num_layers?",
        ),
        (
            ["+model.num_layer=3"],
            "(not in the schema; see dglstm_lm/config.py), did you mean model.num_layers?",
        ),
        (
            ["trainer.max_epoch=3"],
            "unknown key 'trainer.max_epoch' (not in TrainerConfig), did you mean trainer.max_epochs?",
        ),
        (["data.batching=tokens"], "data.batching: unknown mode 'tokens'"),
        (["logger=mlflow"], "unknown option logger=mlflow"),
        (["logger.mode=cloud"], "logger.mode: unknown mode 'cloud'"),
        (["experiment=huge"], "unknown option experiment=huge"),
        (["seed=-1"], "seed: must be non-negative"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        validate(compose(overrides))
    assert "\n" not in str(exc.value)
    if "nonsense" in message:
        assert "did you mean" not in str(exc.value)  # nothing close: no guess


def test_yaml_files_only_set_values():
    """Schemas live in config.py; YAML files never introduce keys (struct mode would reject them anyway)."""
    paths = list(Path(CONF_DIR).rglob("*.yaml"))
    assert len(paths) > 10, CONF_DIR
    for path in paths:
        text = path.read_text()
        assert "_target_" not in text or path.parent.name in ("hydra", "launcher"), path


def _lrs(scheduler, optimizer, epochs, vals=None):
    out = []
    for e in range(epochs):
        out.append(optimizer.param_groups[0]["lr"])  # the rate epoch e trains at
        optimizer.step()  # (no gradients: changes nothing, but keeps the order torch expects)
        if vals is None:
            scheduler.step()
        else:
            scheduler.step(vals[e])
    return out


@pytest.mark.parametrize(
    "experiment, first",
    [
        ("zaremba_small", [1, 1, 1, 1, 0.5, 0.25, 0.125, 0.0625]),  # halved after epoch 4
        ("zaremba_medium", [1] * 6 + [0.8, 0.64, 0.512]),  # × 0.8 after epoch 6
        ("zaremba_large", [1] * 14 + [1 / 1.15, 1 / 1.15**2]),  # ÷ 1.15 after epoch 14
    ],
)
def test_zaremba_learning_rate_schedules(experiment, first):
    import torch

    from dglstm_lm.trainer import make_scheduler

    t = validate(compose([f"experiment={experiment}", "model=dglstm"])).trainer
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    lrs = _lrs(make_scheduler(opt, t), opt, t.max_epochs)
    assert lrs[: len(first)] == pytest.approx(first, rel=1e-12)
    assert len(lrs) == t.max_epochs and lrs[-1] == pytest.approx(
        t.lr * t.lr_decay ** (t.max_epochs - t.lr_decay_start), rel=1e-12
    )


def test_plateau_schedule_decays_after_patience_epochs_without_improvement():
    import torch

    from dglstm_lm.trainer import make_scheduler

    t = validate(
        compose(
            ["experiment=yao_sentence", "model=dglstm", "trainer.plateau_patience=1", "trainer.min_lr=0.2"]
        )
    ).trainer
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    vals = [100, 90, 95, 96, 80, 85, 86, 87, 88, 89]  # no improvement in epochs 3-4 and 6-10
    lrs = _lrs(make_scheduler(opt, t), opt, len(vals), vals)
    # × lr_decay after every second epoch in a row without improvement (patience 1), never below min_lr
    assert lrs == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.2], rel=1e-12)
    assert min(_lrs(make_scheduler(opt, t), opt, 12, [100] * 12)) >= t.min_lr


def test_a_config_from_before_a_new_option_compares_as_its_default():
    """Runs and checkpoints made before an option existed group and resume with runs that leave it at its
    default, and differ from runs that set it."""
    import copy

    from dglstm_lm.config import resolved_container
    from dglstm_lm.resume import differences as config_differences

    new = resolved_container(compose(["model=dglstm"]))
    old = copy.deepcopy(new)
    del old["model"]["stabiliser"], old["trainer"]["diverge_threshold"]
    assert config_differences(old, new) == []
    changed = resolved_container(compose(["model=dglstm", "model.stabiliser=true"]))
    assert config_differences(old, changed) == ["model.stabiliser"]


def _stopped_run(tmp_path: Path, hydra_overrides=None, effective=None) -> Path:
    """A run directory as a stopped run leaves it (the checkpoint's content does not matter here)."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    if hydra_overrides is not None:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in hydra_overrides))
    if effective is not None:
        (run / "overrides.yaml").write_text("".join(f"- {o}\n" for o in effective))
    return run


def test_resume_composes_the_run_from_its_own_overrides(tmp_path):
    from dglstm_lm.app import preflight

    run = _stopped_run(tmp_path, ["experiment=smoke", "model=lstm", "trainer.lr=0.5", "+tags=[a b]"])
    argv, _ = preflight([f"trainer.resume={run}", "trainer.max_epochs=5"])
    assert argv[:4] == ["experiment=smoke", "model=lstm", "trainer.lr=0.5", "+tags=[a b]"]
    assert argv[4:6] == [f"trainer.resume={run}", "trainer.max_epochs=5"]
    assert f"hydra.run.dir={run}" in argv
    # what is given now replaces the inherited value of the same key or group
    argv, _ = preflight([f"trainer.resume={run}/checkpoints/last.pt", "model=dglstm", "trainer.lr=1"])
    assert "model=lstm" not in argv and "trainer.lr=0.5" not in argv and argv[0] == "experiment=smoke"


def test_resume_inherits_what_the_run_last_trained_with_not_a_refused_attempt(tmp_path):
    from dglstm_lm.app import preflight

    run = _stopped_run(
        tmp_path, ["experiment=smoke", "model=lstm"], effective=["experiment=smoke", "model=lstm", "seed=3"]
    )
    refused = run / ".hydra" / "resume-2026-01-01_00-00-00"
    refused.mkdir()
    (refused / "overrides.yaml").write_text("- experiment=smoke\n- model=lstm\n- trainer.optimizer=adam\n")
    argv, _ = preflight([f"trainer.resume={run}"])
    assert argv[:3] == ["experiment=smoke", "model=lstm", "seed=3"] and "trainer.optimizer=adam" not in argv


def test_resume_of_a_run_made_outside_hydra_inherits_nothing(tmp_path):
    from dglstm_lm.app import preflight

    run = _stopped_run(tmp_path)
    argv, _ = preflight([f"trainer.resume={run}", "model=lstm"])
    assert argv[:2] == [f"trainer.resume={run}", "model=lstm"]
