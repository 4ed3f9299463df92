"""The resume policy: which config changes a resumed run accepts, which it refuses, and which it only warns of.

A run is resumed explicitly (`trainer.resume=<run dir or checkpoint>`) or on its own (`trainer.auto_resume`: a
requeued SLURM job, a sweep re-run with its `hydra.sweep.dir`, whose jobs find their folders again). The
config it resumes with is compared key by key with the checkpoint's (for a job folder: with the config
stored there); each differing key is judged by the first rule of POLICY that covers it:

- free: not part of what the run computes (where it is stored, how it is watched); accepted silently;
- warn: applied from the resumed step on, and logged as a warning;
- refuse: the checkpoint cannot continue with the new value; refused with a one-line error naming the keys
  and both values, before anything is written;
- refuse mid-epoch: refused only when the checkpoint was taken inside an epoch.

A sweep's job folder re-entered on its own accepts only the keys whose rule says so (`in_job_folder`): any
other difference means the folder holds another job, and the job is refused (RunDirRefused).

The "A different config on resume" table of docs/outputs.md is `python -m dglstm_lm.resume`'s output (a test keeps
them the same). Beyond the config, a checkpoint trained on another vocabulary is refused too (train.py checks
it once the corpus is loaded).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from . import checkpoint as ckpt
from . import rundir
from .config import flatten, with_defaults
from .errors import CheckpointError, RunDirRefused

log = logging.getLogger("dglstm_lm.train")

FREE, WARN, REFUSE, REFUSE_MID_EPOCH = "free", "warn", "refuse", "refuse mid-epoch"
ANY = "*"  # the last rule's key: every key no earlier rule covers


@dataclass(frozen=True)
class Rule:
    keys: tuple[str, ...]  # config keys or groups: a group ("model") covers every key below it
    action: str  # FREE, WARN, REFUSE or REFUSE_MID_EPOCH, on an explicit or automatic resume
    in_job_folder: bool  # may differ when a sweep job continues in its folder on its own
    why: str
    only_if_plateau: bool = False  # applies only when the checkpoint's schedule is plateau
    refusal: str = ""  # the error, with {path}, {shown} (keys and values) and {epoch}

    def covers(self, key: str) -> bool:
        return any(k == ANY or key == k or key.startswith(k + ".") for k in self.keys)


_STATE_REFUSAL = (
    "cannot resume {path}: the optimizer and its schedule continue from their saved state, which would ignore "
    "the new values ({shown}); to train with them start a new run with trainer.init_from={path}"
)

POLICY: tuple[Rule, ...] = (
    Rule(
        (
            "trainer.resume",
            "trainer.auto_resume",
            "trainer.progress",
            "trainer.device",
            "trainer.checkpoint_every_min",
            "trainer.checkpoint_every_steps",
            "trainer.diverge_threshold",
            "model.backend",
            "logger",
            "paths",
            "data.dir",
            "data.root",
            "data.verify_checksums",
            "data.download",
            "data.sources",
            "tags",
            "tune.storage",  # where the study is (a comparison restored elsewhere from its archive)
        ),
        FREE,
        True,
        "where the run is stored and found, how it is watched and saved: not what it computes",
    ),
    Rule(
        ("trainer.max_epochs",),
        WARN,
        True,
        "a longer run continues from the checkpoint; a re-run sweep with a larger value continues its finished jobs",
    ),
    Rule(
        ("model",),
        REFUSE,
        False,
        "the weights fit only the model they were trained as",
        refusal="cannot resume {path}: the model config differs ({shown})",
    ),
    Rule(
        (
            "trainer.optimizer",
            "trainer.lr_schedule",
            "trainer.lr",
            "trainer.momentum",
            "trainer.weight_decay",
        ),
        REFUSE,
        False,
        "the optimizer and the schedule continue from their saved state, which would ignore the new value; "
        "start a new run with `trainer.init_from=<checkpoint>` instead",
        refusal=_STATE_REFUSAL,
    ),
    Rule(
        ("trainer.lr_decay", "trainer.plateau_patience", "trainer.min_lr"),
        REFUSE,
        False,
        "with the plateau schedule: ReduceLROnPlateau keeps its factor, patience and floor in its saved state",
        only_if_plateau=True,
        refusal=_STATE_REFUSAL,
    ),
    Rule(
        (
            "seed",
            "trainer.batch_size",
            "trainer.bptt",
            "trainer.limit_train_batches",
            "data.name",
            "data.batching",
        ),
        REFUSE_MID_EPOCH,
        False,
        "a mid-epoch checkpoint holds a position in that epoch's sequence of batches and a hidden state of "
        "batch_size columns, valid only for the same data layout",
        refusal=(
            "cannot resume {path} in the middle of epoch {epoch} with another data layout ({shown}); keep these "
            "values, or resume from a checkpoint taken at an epoch's end"
        ),
    ),
    Rule((ANY,), WARN, False, "applied from the resumed step on (e.g. `trainer.clip_grad_norm`)"),
)


def check_same_run(run_dir: Path, config_dict: dict) -> None:
    """A directory that holds a run (a stored config beside a checkpoint or a record) may only be
    continued on its own by the same job (a requeued job, a re-run sweep): else RunDirRefused, naming the keys."""
    stored = rundir.read_config(run_dir)
    if stored is not None and (rundir.has_checkpoint(run_dir) or rundir.read_metrics(run_dir)):
        check_job_folder(run_dir, stored, config_dict)


@dataclass
class ResumePoint:
    path: Path | None = None  # the checkpoint resumed from
    state: dict | None = None  # its content
    completed: dict | None = None  # the metrics of a job folder that is already done: nothing to train


def resume_point(obj, run_dir: Path, config_dict: dict) -> ResumePoint:
    """Where the run starts: a checkpoint to resume (explicit, or this directory's own when it holds an
    unfinished run: a requeued job, a re-run sweep), nothing (a new run), or a finished job. The resume
    policy (resume.py) is applied here, before anything is built or written."""
    t = obj.trainer
    point = ResumePoint()
    if t.resume:
        point.path, point.state = ckpt.load_for_resume(t.resume)
    elif t.auto_resume:
        previous = rundir.read_metrics(run_dir)
        stored = rundir.read_config(run_dir)
        # continuing on its own is only right for the same computation (asked again under the lock)
        check_same_run(run_dir, config_dict)
        if previous is not None and previous.get("status") == rundir.PRUNED:
            log.info("%s was pruned (a tuning trial stopped early); nothing to do", run_dir)
            point.completed = previous
            return point
        done = previous is not None and previous.get("status") == rundir.COMPLETED
        if done and (stored is None or stored.get("trainer", {}).get("max_epochs") == t.max_epochs):
            log.info(
                "%s already completed (test ppl %.2f); nothing to do",
                run_dir,
                previous.get("test/ppl") or float("nan"),
            )
            point.completed = previous
            return point
        if rundir.has_checkpoint(run_dir):  # unfinished, or finished with fewer epochs than now asked for
            point.path, point.state = ckpt.load_for_resume(rundir.last_checkpoint(run_dir))
    if point.state is not None:
        s = point.state
        ckpt.check_keys(s, ckpt.RESUME_KEYS, point.path)
        warned = check_resume(s["config"], config_dict, point.path, s["epoch"], s.get("batch", 0))
        if warned:
            log.warning("resuming with a config that differs from the checkpoint's in: %s", ", ".join(warned))
    return point


def rule_for(key: str, old: dict) -> Rule:
    """The first rule of POLICY that covers `key` (in a flattened config), given the checkpoint's config."""
    plateau = old.get("trainer.lr_schedule") == "plateau"
    return next(r for r in POLICY if r.covers(key) and (plateau or not r.only_if_plateau))


def differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ; an option the older config predates counts as at its default."""
    a, b = flatten(with_defaults(old)), flatten(with_defaults(new))
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def check_resume(old_config: dict, new_config: dict, path: str | Path, epoch: int, batch: int) -> list[str]:
    """Judge resuming the checkpoint at `path` (taken at `batch` of 0-based `epoch`, with `old_config`) with
    `new_config`. Raises CheckpointError for the first refused rule; returns the keys to warn of."""
    old, new = flatten(with_defaults(old_config)), flatten(with_defaults(new_config))
    diffs = differences(old_config, new_config)
    warned = []
    by_rule: dict[Rule, list[str]] = {}
    for key in diffs:
        by_rule.setdefault(rule_for(key, old), []).append(key)

    def refused(rule: Rule) -> bool:
        return rule.action == REFUSE or (rule.action == REFUSE_MID_EPOCH and batch > 0)

    for rule in POLICY:  # refusals in the table's order: the model first, then the optimizer, the layout
        keys = by_rule.get(rule, [])
        if not keys:
            continue
        if refused(rule):
            # rules that share a refusal (the optimizer's and the plateau schedule's) name all their keys
            keys = sorted(
                k for r in POLICY if r.refusal == rule.refusal and refused(r) for k in by_rule.get(r, [])
            )
            if rule.covers("model.name") and "model.name" in keys:
                keys = ["model.name"]  # another kind of model: its other keys differ by definition
            shown = ", ".join(f"{k}: {old.get(k, 'absent')} → {new.get(k, 'absent')}" for k in keys[:4])
            raise CheckpointError(rule.refusal.format(path=path, shown=shown, epoch=epoch + 1))
        if rule.action != FREE:
            warned += keys
    return sorted(warned)


def check_job_folder(run_dir: Path, stored_config: dict, new_config: dict) -> None:
    """A folder that holds a run may only be continued on its own by the same job: RunDirRefused otherwise,
    naming the keys that differ."""
    old = flatten(with_defaults(stored_config))
    diffs = [k for k in differences(stored_config, new_config) if not rule_for(k, old).in_job_folder]
    if diffs:
        raise RunDirRefused(
            f"{run_dir} already holds a run with another config (differs in {', '.join(diffs[:5])}); "
            "use another hydra.sweep.dir / hydra.run.dir"
        )


def markdown() -> str:
    """POLICY as docs/outputs.md's table."""
    rows = ["| config keys | on resume | in a sweep's job folder | why |", "| --- | --- | --- | --- |"]
    for r in POLICY:
        keys = "any other key" if r.keys == (ANY,) else ", ".join(f"`{k}`" for k in r.keys)
        if r.only_if_plateau:
            keys += " (plateau schedule)"
        folder = "accepted" if r.in_job_folder else "refused (another job)"
        rows.append(f"| {keys} | {r.action} | {folder} | {r.why} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
