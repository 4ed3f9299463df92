"""The resume policy (dglstm_lm/resume.py): every change docs/outputs.md lists, judged as it says.

The expected outcomes below are written from that list and the issue that asked for it, not read from
POLICY; a test then checks that every rule of POLICY is reached by one of them, and that its table is
POLICY's own rendering. The end-to-end refusals (a real checkpoint, nothing written) are in
test_reliability.py; a finished sweep job continued by a larger max_epochs is at the end of this file.
"""

from __future__ import annotations

import re

import pytest

from dglstm_lm import resume as policy
from dglstm_lm.config import compose, flatten, resolved_container
from dglstm_lm.errors import CheckpointError, RunDirRefused

from .conftest import ROOT


def config(*overrides) -> dict:
    cfg = resolved_container(compose(["experiment=smoke", "logger=none", *overrides]))
    cfg.pop("hydra", None)
    return cfg


# (overrides of the checkpoint's run, overrides of the resumed one, mid-epoch?, expected)
# expected: "free" (accepted silently), "warn" (accepted, the key is named in the warning), or a regex of the
# refusal's message.
STATE = r"continue from their saved state, which would ignore the new values \({}\)"
LAYOUT = r"in the middle of epoch 3 with another data layout \({}\)"
CASES = [
    # where and how the run is watched: free
    ((), ("trainer.progress=off",), True, "free"),
    ((), ("trainer.checkpoint_every_steps=7",), True, "free"),
    ((), ("trainer.diverge_threshold=1000",), True, "free"),
    ((), ("model.backend=python",), True, "free"),
    ((), ("logger=wandb",), True, "free"),
    ((), ("data.verify_checksums=false",), True, "free"),
    # applied and logged as a warning
    ((), ("trainer.max_epochs=5",), True, "warn"),
    ((), ("trainer.clip_grad_norm=1.0",), True, "warn"),
    ((), ("trainer.lr_decay=0.7",), True, "warn"),  # zaremba's schedule is rebuilt from the config
    # another model
    ((), ("model.hidden_dim=100",), False, r"model config differs \(model.hidden_dim: 200 → 100\)"),
    (("model=lstm",), ("model=dglstm",), False, r"model config differs \(model.name: lstm → dglstm\)$"),
    # the optimizer and the schedule continue from their saved state
    ((), ("trainer.optimizer=adam",), False, STATE.format("trainer.optimizer: sgd → adam")),
    ((), ("trainer.lr=2",), False, STATE.format("trainer.lr: 1.0 → 2.0")),
    ((), ("trainer.momentum=0.9",), False, STATE.format("trainer.momentum: 0.0 → 0.9")),
    ((), ("trainer.weight_decay=0.01",), False, STATE.format("trainer.weight_decay: 0.0 → 0.01")),
    ((), ("trainer.lr_schedule=plateau",), False, STATE.format("trainer.lr_schedule: zaremba → plateau")),
    # the plateau schedule's own keys, only with that schedule
    (
        ("trainer.lr_schedule=plateau",),
        ("trainer.lr_schedule=plateau", "trainer.lr_decay=0.25"),
        False,
        STATE.format("trainer.lr_decay: 0.5 → 0.25"),
    ),
    (
        ("trainer.lr_schedule=plateau",),
        ("trainer.lr_schedule=plateau", "trainer.plateau_patience=3"),
        False,
        STATE.format("trainer.plateau_patience: 0 → 3"),
    ),
    (
        ("trainer.lr_schedule=plateau",),
        ("trainer.lr_schedule=plateau", "trainer.min_lr=0.01"),
        False,
        STATE.format("trainer.min_lr: 0.0 → 0.01"),
    ),
    # the data layout: refused mid-epoch, applied at an epoch's end
    ((), ("seed=7",), True, LAYOUT.format("seed: 1 → 7")),
    ((), ("trainer.batch_size=10",), True, LAYOUT.format("trainer.batch_size: 20 → 10")),
    ((), ("trainer.bptt=10",), True, LAYOUT.format("trainer.bptt: 20 → 10")),
    ((), ("trainer.limit_train_batches=20",), True, LAYOUT.format("trainer.limit_train_batches: 30 → 20")),
    ((), ("data.name=ptb-copy",), True, LAYOUT.format("data.name: ptb → ptb-copy")),
    ((), ("data.batching=sentence",), True, LAYOUT.format("data.batching: stream → sentence")),
    ((), ("seed=7",), False, "warn"),
    ((), ("trainer.batch_size=10",), False, "warn"),
    ((), ("data.batching=sentence",), False, "warn"),
]


def _id(case):
    return " ".join(case[1]) + (" mid-epoch" if case[2] else "")


@pytest.mark.parametrize("before, after, mid_epoch, expected", CASES, ids=[_id(c) for c in CASES])
def test_each_change_is_judged_as_the_readme_says(before, after, mid_epoch, expected):
    old, new = config(*before), config(*after)
    assert policy.differences(old, new), "the case must change something"
    batch = 5 if mid_epoch else 0
    if expected in ("free", "warn"):
        warned = policy.check_resume(old, new, "ckpt.pt", epoch=2, batch=batch)
        changed = {o.split("=", 1)[0] for o in after if o not in before}  # the keys the case overrides
        assert set(warned) == (changed if expected == "warn" else set())
    else:
        with pytest.raises(CheckpointError, match=expected):
            policy.check_resume(old, new, "ckpt.pt", epoch=2, batch=batch)


def test_every_rule_of_the_policy_is_walked_by_a_case():
    reached = set()
    for before, after, _mid, _expected in CASES:
        old = config(*before)
        for key in policy.differences(old, config(*after)):
            reached.add(policy.rule_for(key, flatten(old)))
    assert reached == set(policy.POLICY)


def test_a_refusal_is_mid_epoch_only_for_the_data_layout():
    """At an epoch's end the layout may change; the model and the optimizer may not, at any point."""
    old = config()
    for override in ("model.hidden_dim=100", "trainer.momentum=0.9"):
        with pytest.raises(CheckpointError, match="cannot resume ckpt.pt"):
            policy.check_resume(old, config(override), "ckpt.pt", epoch=0, batch=0)


def test_the_readme_table_is_the_policy():
    readme = (ROOT / "docs" / "outputs.md").read_text()  # the README's reference pages
    header = policy.markdown().splitlines()[0]
    assert header in readme, "docs/outputs.md shows the resume policy's table"
    start = readme.index(header)
    shown = readme[start:].split("\n\n", 1)[0].rstrip("\n") + "\n"
    assert shown == policy.markdown()


def test_a_job_folder_of_another_config_is_refused_naming_the_keys(tmp_path):
    stored = config("model=lstm", "seed=1")
    with pytest.raises(
        RunDirRefused,
        match=re.escape(f"{tmp_path} already holds a run with another config (differs in seed, trainer.lr)"),
    ):
        policy.check_job_folder(tmp_path, stored, config("model=lstm", "seed=2", "trainer.lr=2"))
    # what only changes where and how a job is watched, or how long it trains, is the same job
    policy.check_job_folder(
        tmp_path, stored, config("model=lstm", "seed=1", "trainer.max_epochs=9", "trainer.progress=off")
    )


@pytest.mark.slow
def test_a_larger_max_epochs_continues_a_finished_sweep_job(tmp_path, ptb_dir, ptb_root):
    """A re-run sweep asks its finished jobs for more epochs: each continues from its last checkpoint (no
    epoch is trained twice) and ends as a run trained for that many epochs from the start does."""
    from dglstm_lm.train import train

    from .test_train import smoke_cfg, strip_time

    def cfg(epochs):
        return smoke_cfg(tmp_path, ptb_dir, ptb_root, "model=lstm", f"trainer.max_epochs={epochs}")

    job = tmp_path / "job"
    first = train(cfg(1), job)
    assert first["status"] == "completed" and first["epochs_completed"] == 1
    longer = train(cfg(2), job)  # auto_resume: the folder's own checkpoint, not a new run
    assert longer["status"] == "completed" and longer["epochs_completed"] == 2
    assert longer["step"] == 2 * first["step"]
    assert "resumed from" in (job / "train.log").read_text()
    assert strip_time(longer) == strip_time(train(cfg(2), tmp_path / "fresh"))


def test_refusals_that_share_a_reason_name_all_their_keys():
    """The optimizer's keys and the plateau schedule's are refused for the same reason: one message, both."""
    old = config("trainer.lr_schedule=plateau")
    new = config("trainer.lr_schedule=plateau", "trainer.lr=2", "trainer.min_lr=0.01")
    with pytest.raises(
        CheckpointError, match=STATE.format("trainer.lr: 1.0 → 2.0, trainer.min_lr: 0.0 → 0.01")
    ):
        policy.check_resume(old, new, "ckpt.pt", epoch=2, batch=0)


def test_where_the_study_is_may_change_when_a_run_is_entered_again(tmp_path):
    """A comparison brought back from its archive= into another folder enters its runs with another
    tune.storage (the journal's new path): a location, accepted on resume and in a job's folder."""
    stored = config("seed=1")
    moved = config("seed=1")
    stored["tune"]["storage"], moved["tune"]["storage"] = "/a/optuna/m.journal", "/b/optuna/m.journal"
    rule = policy.rule_for("tune.storage", flatten(stored))
    assert rule.in_job_folder and rule.action == policy.FREE
    policy.check_job_folder(tmp_path, stored, moved)  # no refusal
    assert policy.check_resume(stored, moved, "ckpt.pt", epoch=0, batch=0) == []  # nor a warning
