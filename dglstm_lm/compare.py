"""`make compare`: an equal-budget tuned comparison of models, in one resumable command.

    python -m dglstm_lm.compare --models stacked_lstm,dglstm --trials 24 --seeds 2,3,4 \\
        --proxy tuned_small_proxy --experiment tuned_small --dir outputs/compare/tuned_small [overrides]

Stages:

1. search: for every model, an Optuna study (tune.py) over the same space (conf/space/<space>.yaml), with the
   same sampler seeded the same way, the same pruner and the same number of trials, on the same proxy recipe;
   each model's study in the journal file <dir>/optuna/<model>.journal, its trial runs in
   <dir>/search/<model>/trial=<n>/. The trials are asked in batches of `jobs` and each batch runs as one
   `python -m dglstm_lm.train --multirun tune.trial=...` subprocess, through the configured launcher. `trials`
   is a total per model of finished trials (complete or pruned; a failed trial is drawn again): a re-run
   counts them and runs only the missing ones; a trial cut short (still RUNNING in its study) is run again in
   its folder and resumes from its checkpoint.
2. best: the best complete trial of each model (lowest proxy validation perplexity among its first `trials`
   finished trials) → <dir>/summary.json, with each model's spent budget (trials complete / pruned / failed,
   epochs, CPU-seconds) and its expected best validation perplexity vs the number of trials
   (<dir>/expected_best.png, <dir>/tuning.md, written before the final stage), and the models compared at
   their shared start-up points, paired by point.
3. final: each model's best parameters trained on the full recipe with every seed, a Hydra multirun into
   <dir>/final/<model>/seed=<s>/: a re-run skips completed jobs and resumes unfinished ones.
4. report: `python -m dglstm_lm.report --dir <dir>/final --out <dir>/report`.

Overrides (`key=value`) apply to every stage. Killing the command anywhere and running it again continues it;
a second command on the same folder is refused while the first one runs. `make search model=<m>` is this
command's search stage for one model.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

from .errors import ArgumentParser, ConfigError, UserError, cli
from .parallel import joblib_at_a_time


class CompareError(UserError):
    """A stage did not finish (a search short of its trials, a final run that failed): exit status 1."""

    exit_code = 1


DEFAULT_MODELS = "stacked_lstm,dglstm"
DEFAULT_TRIALS = 24
# the final runs' seeds: not the search trials' (conf/train.yaml's seed, 1), whose luck helped choose the config
DEFAULT_SEEDS = "2,3,4"
DEFAULT_PROXY = "tuned_small_proxy"
DEFAULT_EXPERIMENT = "tuned_small"
DEFAULT_SPACE = "lstm_lm"
STAGES = ("search", "final", "report")
MAX_FAILED = 3  # failed trials (errors, not divergence) per missing trial before the search gives up
# ... and batches in a row of one model in which every trial failed: a cause common to all (a broken
# environment, a config the runs reject) stops the search at once instead of failing trial after trial
MAX_FAILED_BATCHES = 2

# Set by this command itself: given as overrides they would break the equal budget or the folder layout.
RESERVED = {
    "model": "models= (which models), experiment= and proxy= (their sizes and recipes)",
    "experiment": "experiment= (the final recipe) and proxy= (the search's)",
    "seed": "seeds=",
    "trainer.resume": "nothing: re-run the same command to continue",
    "tune": "nothing: make compare sets it on its trials",
    "tune.storage": "dir=",
    "tune.study": "dir=",
    "tune.trial": "trials=",
    "hydra.sweep.dir": "dir=",
    "hydra.sweep.subdir": "dir=",
    "hydra.run.dir": "dir=",
    "hydra/sweeper": "nothing (make compare drives Optuna itself)",
    "hydra.sweeper": "nothing (make compare drives Optuna itself)",
}
# Settings that may change between runs on the same folder without changing what was computed.
_LOCATION_KEYS = ("hydra/launcher", "hydra.launcher")


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _flag(value, name: str) -> bool:
    """A 0/1 option (also true/false, yes/no); anything else is a one-line error naming it."""
    flag = str(value or "0").strip().lower()
    if flag not in ("0", "1", "true", "false", "yes", "no"):
        raise ConfigError(f"{name}={flag}: expected 1 or 0")
    return flag in ("1", "true", "yes")


def _say(msg: str) -> None:
    print(f"compare: {msg}", flush=True)


def _conf_options(group: str) -> list[str]:
    from .config import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _parse_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not s for s in items):
        raise ConfigError(f"{what}={text}: expected a comma-separated list without empty items")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise ConfigError(f"{what}={text}: {', '.join(dup)} given twice")
    return items


def _option(value: str, group: str, what: str) -> str:
    available = _conf_options(group)
    if value not in available:
        raise ConfigError(f"unknown {what} {value!r} (available: {', '.join(available)})")
    return value


_PLAIN = re.compile(r"[A-Za-z0-9_/+.:%@-]*")


def _quote(value) -> str:
    """A path or string as a Hydra override value: as it is when Hydra reads it so, else quoted."""
    s = str(value)
    if _PLAIN.fullmatch(s) and not s[:1].isdigit():
        return s
    if "'" in s or "\\" in s:
        raise ConfigError(f"unsupported character (quote or backslash) in {s!r}")
    return f"'{s}'"


def _shell(arg: str) -> str:
    """An argument as the shell would need it typed, for the commands printed."""
    if shlex.quote(arg) == arg:
        return arg
    if set(arg) & set('"`\\!'):
        return shlex.quote(arg)
    return '"' + arg.replace("$", "\\$") + '"'


def _override_value(v) -> str:
    """A trial's parameter value as Hydra override text (floats at full precision; strings quoted if need be)."""
    from .tune import override_value

    return _quote(v) if isinstance(v, str) else override_value(v)


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ---------------------------------------------------------------------------------------------- settings


class Plan:
    """What one invocation does, checked before any work starts."""

    def __init__(self, args: argparse.Namespace):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.models = _parse_list(args.models, "models")
        for m in self.models:
            _option(m, "model", "model")
        try:
            self.trials = int(str(args.trials))
        except ValueError:
            raise ConfigError(f"trials={args.trials}: expected a whole number ≥ 1") from None
        if self.trials < 1:
            raise ConfigError(f"trials={args.trials}: expected a whole number ≥ 1")
        seeds = _parse_list(args.seeds, "seeds")
        try:
            self.seeds = [int(s) for s in seeds]
        except ValueError:
            raise ConfigError(f"seeds={args.seeds}: expected whole numbers, e.g. seeds=1,2,3") from None
        self.proxy = _option(args.proxy, "experiment", "proxy recipe")
        self.experiment = _option(args.experiment, "experiment", "experiment")
        from .tune import Space

        self.space = Space.load(args.space)
        self.stages = _parse_list(args.stages, "stages")
        self.complete_pruned = _flag(getattr(args, "complete_pruned", None), "complete_pruned")
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"unknown stage {s!r} (available: {', '.join(STAGES)})")

        parser = OverridesParser.create()
        self.common, self.proxy_overrides = [], []
        for given, kind in ((args.overrides, "override"), (args.proxy_override or [], "proxy override")):
            try:
                parsed = parser.parse_overrides(list(given))
            except Exception as exc:
                raise ConfigError(f"cannot parse {kind}s: {str(exc).splitlines()[0]}") from None
            for o in parsed:
                key = o.key_or_group.lstrip("+~")
                if o.is_sweep_override():
                    raise ConfigError(
                        f"{o.input_line}: make compare takes single values (the search space is the "
                        f"space's config, the seeds seeds=)"
                    )
                matches = [r for r in RESERVED if key == r or key.startswith(r + ".")]
                reserved = max(matches, key=len) if matches else None  # the most specific rule
                if reserved is not None:
                    raise ConfigError(f"{o.input_line}: set by make compare; use {RESERVED[reserved]}")
                (self.proxy_overrides if kind == "proxy override" else self.common).append(o.input_line)
        self._jobs(args)
        self._where(args)
        self.logger_off = any(o in ("logger=none", "logger.mode=disabled") for o in self.common)
        self.logger_mode = next(
            (o.split("=", 1)[1] for o in reversed(self.common) if o.startswith("logger.mode=")), "offline"
        )

    def _jobs(self, args) -> None:
        """jobs= (the search's batches) and final_jobs= (the final runs at a time)."""
        n_jobs = self._launcher_n_jobs()  # checked whether or not jobs= is given
        if args.jobs is None:  # the launcher's own: joblib's n_jobs (-1, or unset: one per core), else one
            self.jobs = (
                joblib_at_a_time(n_jobs, math.inf) if self.launcher == "joblib" else max(1, n_jobs or 1)
            )
        else:
            try:
                self.jobs = int(args.jobs)
            except ValueError:
                raise ConfigError(f"jobs={args.jobs}: expected a whole number ≥ 1") from None
            if self.jobs < 1:
                raise ConfigError(f"jobs={args.jobs}: expected a whole number ≥ 1")
        # final_jobs=: the final runs at a time, apart from the search's batches (jobs=): with 2 cores and 3
        # seeds a model's third run would otherwise run alone on one thread, and one run of two threads ends
        # in about 60% of the time of one of one thread (docs/running.md)
        final_jobs = getattr(args, "final_jobs", None)
        self.final_jobs = None
        if final_jobs not in (None, ""):
            try:
                self.final_jobs = int(final_jobs)
            except ValueError:
                raise ConfigError(f"final_jobs={final_jobs}: expected a whole number ≥ 1") from None
            if self.final_jobs < 1:
                raise ConfigError(f"final_jobs={final_jobs}: expected a whole number ≥ 1")
            if "hydra/launcher=joblib" not in self.common:
                raise ConfigError(
                    f"final_jobs={final_jobs}: the final runs at a time of hydra/launcher=joblib; give that "
                    "launcher (another one runs its jobs as its own settings say)"
                )

    def final_at_a_time(self) -> int:
        """How many final runs the launcher runs at a time: final_jobs=, else joblib's n_jobs (one per core
        where it is unset or -1, as the launcher runs them), at most the seeds; one under Hydra's basic
        launcher (it runs jobs one after another), all the seeds under any other (SLURM: every job is queued
        at once)."""
        if self.final_jobs is not None:
            return self.final_jobs
        if self.launcher in (None, "basic"):
            return 1
        if self.launcher == "joblib":
            return joblib_at_a_time(self._launcher_n_jobs(), len(self.seeds))
        return len(self.seeds)

    @property
    def launcher(self) -> str | None:
        """hydra/launcher= as given (None: Hydra's basic launcher)."""
        return next(
            (o.split("=", 1)[1] for o in reversed(self.common) if o.startswith("hydra/launcher=")), None
        )

    def _launcher_n_jobs(self) -> int | None:
        """hydra.launcher.n_jobs= as given (None where unset); 0 or not a whole number: refused in one line
        (joblib refuses 0; a negative n_jobs counts back from the cores)."""
        given = next(
            (o.split("=", 1)[1] for o in reversed(self.common) if o.startswith("hydra.launcher.n_jobs=")),
            None,
        )
        if given is None:
            return None
        try:
            n_jobs = int(given)
        except ValueError:
            n_jobs = 0
        if n_jobs == 0:
            raise ConfigError(
                f"hydra.launcher.n_jobs={given}: expected a whole number other than 0 (-1: one per core)"
            )
        return n_jobs

    def _where(self, args) -> None:
        """The comparison's folder (dir=) and its archive (archive=), both absolute."""
        out_root = next(
            (o.split("=", 1)[1] for o in reversed(self.common) if o.startswith("paths.output_dir=")),
            "outputs",
        )
        # (the search stage alone, `make search`: outputs/search/<models>)
        default = Path(out_root) / (
            Path("search") / "+".join(self.models)
            if self.stages == ["search"]
            else Path("compare") / self.experiment
        )
        self.dir = Path(args.dir or default).resolve()
        _quote(self.dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"dir={args.dir or default} is not a folder")
        # archive=: where the records are kept beside the folder (dglstm_lm/archive.py); where they are kept
        # changes nothing computed, so it is not one of the settings
        archive = getattr(args, "archive", None)
        self.archive = Path(archive).resolve() if archive else None
        if self.archive is not None and self.archive.exists() and not self.archive.is_dir():
            raise ConfigError(f"archive={archive} is not a folder")
        if self.archive is not None and (self.archive == self.dir or self.dir in self.archive.parents):
            raise ConfigError(
                f"archive={archive}: inside the comparison's folder {self.dir}; give one outside it"
            )
        if self.archive is not None and self.archive in self.dir.parents:
            raise ConfigError(
                f"archive={archive}: holds the comparison's folder {self.dir}; give one beside it"
            )

    # ---- composition checks: every config this command will train composes and validates
    def check_configs(self) -> None:
        from .config import compose, flatten, resolved_container, validate
        from .models.kernels import wgrad_choice
        from .models.loss import loss_choice
        from .runtime import malloc_choice

        malloc_choice()  # every run it starts would refuse a bad $DGLSTM_MALLOC: say so before anything is made
        wgrad_choice()  # ... and a bad $DGLSTM_WGRAD
        loss_choice()  # ... and $DGLSTM_LOSS
        given = {o.split("=", 1)[0].lstrip("+~") for o in self.common + self.proxy_overrides}
        searched = sorted(given & set(self.space.params))
        if searched:
            raise ConfigError(f"{searched[0]} is searched (space={self.space.name}); it cannot also be fixed")
        for m in self.models:
            job = compose(self.search_overrides(m))
            validate(job)
            self.search_seed = int(job.seed)  # every trial's (the overrides are the same for every model)
            keys = set(flatten(resolved_container(job)))
            for key in self.space.params:
                if key not in keys:
                    raise ConfigError(f"space={self.space.name}: {key} is not a key of the {m} config")
            validate(compose(self.final_overrides(m, {}, self.seeds[0])))
        self.base_seed = int(self.space.sampler.get("seed", 0) or 0)
        self.metric = self.space.metric

    def check_data(self) -> None:
        """Find, verify and cache the corpus once, as every trial would (data.dir, $PTB_DIR, data/ptb/, a
        download): a comparison without its data stops here with the run's one-line error, instead of
        failing every trial it launches (and leaving failed trials in the studies)."""
        from .config import compose
        from .data import prepare_from_config

        m = self.models[0]
        stage = (
            self.search_overrides(m)
            if "search" in self.stages
            else self.final_overrides(m, {}, self.seeds[0])
        )
        prepare_from_config(compose(stage).data)

    def search_overrides(self, model: str) -> list[str]:
        return [
            f"model={model}",
            f"experiment={self.proxy}",
            *self.proxy_overrides,
            *self.common,
        ]

    def final_overrides(self, model: str, params: dict, seeds) -> list[str]:
        return [
            f"model={model}",
            f"experiment={self.experiment}",
            *self.common,
            *(f"{k}={_override_value(v)}" for k, v in params.items()),
            f"seed={seeds}",
        ]

    def settings(self) -> dict:
        """What decides the numbers: a folder holds one comparison of these (models, trials and seeds may
        grow or change between runs; where and how jobs run may change too)."""
        from .report import OUTPUT_ONLY  # the keys by which runs of one config differ (paths, logger, ...)

        def matters(o: str) -> bool:
            key = o.split("=", 1)[0].lstrip("+~")
            return not any(key == f or key.startswith(f + ".") for f in (*OUTPUT_ONLY, *_LOCATION_KEYS))

        return {
            "proxy": self.proxy,
            "proxy_overrides": sorted(self.proxy_overrides),
            "experiment": self.experiment,
            "overrides": sorted(o for o in self.common if matters(o)),
            "space": self.space.name,
            **self.space.as_dict(),
        }


# ------------------------------------------------------------------------------------------- subprocesses


class Runner:
    """Runs the stages' subprocesses; SIGTERM is handed on to the running one, Ctrl-C (which the terminal
    sends to the whole process group) waits for it to save its checkpoint."""

    def __init__(self, lock_fd: int):
        self.lock_fd = lock_fd
        self.proc: subprocess.Popen | None = None
        self.stopped_by: int | None = None
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, _frame):
        self.stopped_by = signum
        self._forward(signum)

    def _forward(self, signum) -> None:
        """The signal to the stage's process and every process below it (a sweep's joblib workers run the
        trials: each saves a checkpoint after its current step), as a signal to the process group would."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            group = os.getpgid(self.proc.pid)
        except ProcessLookupError:
            return
        for pid in [self.proc.pid, *_descendants(self.proc.pid)]:
            try:  # the stage's process group only: W&B's service processes keep their own, and must live on
                if os.getpgid(pid) == group:  # to close the runs
                    os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def _stop(self, signum) -> None:
        print(
            f"compare: stopped by {signal.Signals(signum).name}; run the same command again to continue",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + signum)

    def run(self, args: list[str]) -> int:
        if self.stopped_by is not None:  # stopped between two stages: start no other
            self._stop(self.stopped_by)
        _say("$ " + " ".join(_shell(a) for a in ["python", *args[1:]]))
        self.proc = subprocess.Popen(args, pass_fds=(self.lock_fd,))
        if self.stopped_by is not None:  # stopped while it started
            self._forward(self.stopped_by)
        interrupted = False
        while True:
            try:
                rc = self.proc.wait()
                break
            except KeyboardInterrupt:  # the job got the same Ctrl-C: let it save its checkpoint and stop
                interrupted = True
        self.proc = None
        if interrupted or self.stopped_by is not None:
            self._stop(self.stopped_by or signal.SIGINT)
        return rc


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux's /proc/<pid>/task/<tid>/children; elsewhere none)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def paired_diff(row: list[float], base: list[float]) -> dict:
    """mean(row − base) over pairs, its 95% CI and paired t-test p, Wilcoxon's signed-rank p, and in how
    many pairs row is lower (better); the tests need two pairs and some spread (else None)."""
    import math
    import statistics

    from scipy import stats

    from .report import compare

    n = len(row)
    d = [r - b for r, b in zip(row, base)]
    out = {"n": n, "delta": statistics.fmean(d) if d else None, "low": None, "high": None}
    out |= {"p_t": None, "p_wilcoxon": None, "lower": sum(x < 0 for x in d)}
    if n >= 2:
        diff = compare(dict(enumerate(row)), dict(enumerate(base)))
        out |= {"low": diff.low, "high": diff.high, "p_t": diff.p}
        if any(x != 0 for x in d):
            p = float(stats.wilcoxon(d).pvalue)
            out["p_wilcoxon"] = p if math.isfinite(p) else None
    return out


def _differ(before: dict, now: dict) -> str:
    """The first two settings that differ, as `key: old → new`."""
    diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    return "; ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in diff[:2])


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dglstm_lm.train", "--multirun", *overrides]


# ------------------------------------------------------------------------------------------------- stages


class Compare:
    def __init__(self, plan: Plan, runner: Runner | None, read_only: bool = False):
        self.plan, self.runner, self.read_only = plan, runner, read_only
        self.dir = plan.dir
        if read_only and not (self.dir / "summary.json").exists() and plan.archive is not None:
            self.dir = plan.archive  # status=1 on a folder that is gone: the records kept in the archive
        self.summary_path = self.dir / "summary.json"
        self.keeper = None
        if (
            plan.archive is not None and not read_only
        ):  # archive=: what the folder lacks comes back first, then is kept there
            from .archive import Keeper, restore, settings_of

            kept = settings_of(plan.archive)
            if kept is not None and kept != plan.settings():
                raise UserError(
                    f"archive={plan.archive} holds a comparison with other settings ({_differ(kept, plan.settings())}); "
                    "use another archive="
                )
            n = restore(plan.archive, self.dir)
            if n:
                _say(f"restored {n} records from {plan.archive}: finished work is not redone")
            self.keeper = Keeper(self.dir, plan.archive)
        self.summary = self._load_summary()

    # ---- summary.json: settings, the best params per model, the budgets, the final runs
    def _load_summary(self) -> dict:
        try:
            old = json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            old = None
        now = self.plan.settings()
        if old and old.get("settings") and old["settings"] != now:
            shown = _differ(old["settings"], now)
            fix = (
                "give status=1 the overrides of the command that runs it"
                if self.read_only
                else "use another dir="
            )
            raise UserError(f"{self.dir} holds a comparison with other settings ({shown}); {fix}")
        p = self.plan
        return {
            "what": (
                "equal-budget tuned comparison: every model was searched over the same space "
                f"({p.space.name}), with the same start-up points (the sampler's start-up trials, drawn once at "
                "random with the space's seed and given to every model's study in the same order), then the same "
                "sampler seeded the same way (the space's seed plus the number of trials already in the study at "
                "each batch), the same pruner and the same number of finished "
                f"trials ({p.trials}: complete or pruned), on the same proxy recipe ({p.proxy}"
                + (f" with {' '.join(p.proxy_overrides)}" if p.proxy_overrides else "")
                + "); each model's best complete trial (lowest proxy "
                f"{p.metric} among its first {p.trials} finished trials) was then trained on {p.experiment} "
                f"with the same seeds ({','.join(map(str, p.seeds))}). Test perplexity played no part in "
                "the selection."
                + (
                    " With complete_pruned=1, every pruned trial of every model was also run to the end without "
                    "the pruner, and each model's best was chosen over all its trials so run."
                    if p.complete_pruned
                    else ""
                )
            ),
            "complete_pruned": p.complete_pruned,
            "settings": now,
            "models": p.models,
            "trials_per_model": p.trials,
            "seeds": p.seeds,
            "overrides": p.common,
            "best": {m: v for m, v in (old or {}).get("best", {}).items() if m in p.models},
            "budget": {m: v for m, v in (old or {}).get("budget", {}).items() if m in p.models},
            "expected_best": {m: v for m, v in (old or {}).get("expected_best", {}).items() if m in p.models},
            "final": {m: v for m, v in (old or {}).get("final", {}).items() if m in p.models},
        }

    def _save_summary(self) -> None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(self.summary_path, (json.dumps(self.summary, indent=2) + "\n").encode())
        if self.keeper is not None:  # after every batch, stage and report: the archive follows
            self.keeper.keep()

    def group(self, stage: str) -> list[str]:
        """One W&B group per stage of this comparison, unless logger.group is given."""
        if any(o.startswith("logger.group=") for o in self.plan.common):
            return []
        return [f"logger.group={_quote(f'compare-{self.dir.name}-{stage}')}"]

    # ---- 1. search
    def study_path(self, model: str) -> Path:
        return self.dir / "optuna" / f"{model}.journal"

    def study(self, model: str, seed: int = 0, create: bool = False):
        from .tune import open_study

        # status=1 loads a study and never creates one: create_study(load_if_exists=True) on an existing journal
        # appends a line to it
        if getattr(self, "read_only", False):
            import optuna

            from .tune import storage

            path = self.study_path(model)
            return optuna.load_study(study_name=model, storage=storage(path)) if path.exists() else None
        return open_study(self.study_path(model), model, self.plan.space, seed=seed, create=create)

    def search(self, i: int, model: str) -> bool:
        """One batch of `model`'s search (the trials cut short first, else `jobs` new ones); False when its
        study already holds the budget's finished trials."""
        from optuna.trial import TrialState

        from .tune import finished, trials_by_state

        p = self.plan
        head = f"[search {i}/{len(p.models)}] {model}"
        search_dir = self.dir / "search" / model
        study = self.study(model, create=True)
        if "space" not in study.user_attrs:  # what the trial jobs read their pruner and metric from
            study.set_user_attr("space", p.space.as_dict())
        by_state = trials_by_state(study)
        done = len(finished(study))
        if done >= p.trials:
            ran = self._failed.get(model) is not None
            _say(f"{head}: {done} of {p.trials} trials finished" + ("" if ran else "; nothing to run"))
            return False
        # trials cut short (RUNNING: this command holds the folder's lock, so none is really running); one
        # stopped while its parameters were being drawn has not all of them: failed, and drawn again
        dists = p.space.distributions()
        for t in by_state["running"]:
            if set(t.params) != set(dists):
                study.tell(t.number, state=TrialState.FAIL)
        by_state = trials_by_state(study)
        batch = [t.number for t in by_state["running"]][: p.jobs]
        if batch:
            _say(
                f"{head}: cut short before, running again in their folders: trials {', '.join(map(str, batch))}"
            )
        seed = p.base_seed + len(study.get_trials(deepcopy=False))
        study = self.study(model, seed=seed)
        left = p.trials - done - len(by_state["running"])
        while len(batch) < p.jobs and left > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant_liar and enqueue_trial are "experimental"
                point = self.next_startup_point(study)
                if point is not None:  # the same start-up points, in the same order, for every model
                    study.enqueue_trial(point)
                batch.append(study.ask(dists).number)
            left -= 1
        _say(
            f"{head}: {done} of {p.trials} trials finished; running trial{'s' if len(batch) > 1 else ''} "
            f"{', '.join(map(str, batch))} on {p.proxy} (sampler seed {seed}) → {search_dir}"
        )
        self._failed.setdefault(model, 0)
        rc = self.runner.run(
            _train_cmd(
                [
                    *p.search_overrides(model),
                    f"tune.storage={_quote(self.study_path(model))}",
                    f"tune.study={model}",
                    "tune.trial=" + ",".join(map(str, batch)),
                    f"hydra.sweep.dir={_quote(search_dir)}",
                    "hydra.sweep.subdir='trial=${tune.trial}'",
                    *self.group("search"),
                ]
            )
        )
        study = self.study(model)
        for n in batch:  # a job that ended without telling its trial (it crashed): the trial failed
            if study.trials[n].state == TrialState.RUNNING:
                study.tell(n, state=TrialState.FAIL)
        self._count_failures(model, [n for n in batch if study.trials[n].state == TrialState.FAIL], batch, rc)
        self.budget(model)
        return True

    def _count_failures(self, model: str, failed: list[int], batch: list[int], rc: int) -> None:
        """Stop the search when its failures say the cause is common to all: every trial of MAX_FAILED_BATCHES
        batches in a row, or more than MAX_FAILED per missing trial in all."""
        p, search_dir = self.plan, self.dir / "search" / model
        self._failed[model] += len(failed)
        streak = self._failed_batches[model] = (
            self._failed_batches.get(model, 0) + 1 if failed == batch else 0
        )
        if streak >= MAX_FAILED_BATCHES:
            from . import rundir

            why = str((rundir.read_metrics(search_dir / f"trial={failed[-1]}") or {}).get("error") or "")
            why = (why.strip().splitlines() or [""])[0][:300]  # one line
            raise CompareError(
                f"search of {model}: every trial of its last {streak} batches failed"
                + (f" ({why})" if why else f" (exit status {rc}; their runs are in {search_dir})")
                + "; fix the cause and run the same command again"
            )
        if self._failed[model] > MAX_FAILED * p.trials:
            raise CompareError(
                f"search of {model}: {self._failed[model]} trials failed (exit status {rc}; their runs are in "
                f"{search_dir}); fix the cause and run the same command again"
            )

    def search_all(self) -> None:
        """The models' searches batch by batch in turn, so that wherever the command is stopped the models
        have spent (nearly) the same budget: the next batch is always the model's with the fewest finished
        trials (then the fewest batches run by this command, then the models' order). A model left behind
        (its batch cut short by a stop while the other's had finished) thus catches up first."""
        from .tune import finished

        self._failed: dict[str, int] = {}
        self._failed_batches: dict[str, int] = {}
        todo = {m: i for i, m in enumerate(self.plan.models, 1)}
        batches = dict.fromkeys(todo, 0)

        def behind(m: str) -> tuple[int, int, int]:
            return len(finished(self.study(m, create=True))), batches[m], todo[m]

        while todo:
            model = min(todo, key=behind)
            batches[model] += 1
            if not self.search(todo[model], model):
                del todo[model]

    def unpruned_dir(self, model: str, number: int) -> Path:
        return self.dir / "unpruned" / model / f"trial={number}"

    def pruned_trials(self, model: str) -> list[int]:
        """The pruned trials among the model's first `trials` finished ones."""
        from optuna.trial import TrialState

        from .tune import finished

        study = self.study(model)
        done = finished(study)[: self.plan.trials] if study is not None else []
        return [t.number for t in done if t.state == TrialState.PRUNED]

    def complete_pruned(self, model: str) -> None:
        """complete_pruned=1: every pruned trial of the model's search trained to the end with its parameters,
        without a pruner, in <dir>/unpruned/<model>/trial=<n>/ (its study is read, never written): what the
        pruner cost, measured, and each model's best chosen over all its trials run to the end."""
        from . import rundir

        pruned = self.pruned_trials(model)
        status = {n: (rundir.read_metrics(self.unpruned_dir(model, n)) or {}).get("status") for n in pruned}
        todo = [n for n in pruned if status[n] not in ("completed", "diverged")]
        head = f"[unpruned] {model}"
        if not todo:
            _say(
                f"{head}: {len(pruned)} pruned trial{'s' if len(pruned) != 1 else ''} run to the end; nothing to run"
            )
            return
        _say(
            f"{head}: running pruned trial{'s' if len(todo) > 1 else ''} {', '.join(map(str, todo))} to the end "
            f"on {self.plan.proxy}, without the pruner → {self.dir / 'unpruned' / model}"
        )
        self.runner.run(
            _train_cmd(
                [
                    *self.plan.search_overrides(model),
                    f"tune.storage={_quote(self.study_path(model))}",
                    f"tune.study={model}",
                    "tune.trial=" + ",".join(map(str, todo)),
                    "tune.complete=true",
                    f"hydra.sweep.dir={_quote(self.dir / 'unpruned' / model)}",
                    "hydra.sweep.subdir='trial=${tune.trial}'",
                    *self.group("unpruned"),
                ]
            )
        )

    def unpruned_scores(self, model: str) -> dict[int, float | None]:
        """complete_pruned=1: each pruned trial's score run to the end (None: diverged); an error names the
        first one not run to the end yet."""
        import math

        from . import rundir

        out = {}
        for n in self.pruned_trials(model):
            m = rundir.read_metrics(self.unpruned_dir(model, n)) or {}
            if m.get("status") == "diverged":
                out[n] = None
            elif m.get("status") == "completed":
                v = m.get(self.plan.metric)
                out[n] = float(v) if v is not None and math.isfinite(v) else None
            else:
                raise CompareError(
                    f"complete_pruned=1: pruned trial {n} of {model} has not run to the end "
                    f"({m.get('status', 'not started')}, {self.unpruned_dir(model, n)}); run the search stage again"
                )
        return out

    def startup_points(self) -> list[dict]:
        """The sampler's start-up points (its n_startup_trials; every trial for the random sampler), drawn
        once at random with the space's seed: every model's study gets these same points first."""
        if getattr(self, "_startup", None) is None:
            import optuna

            p = self.plan
            spec = p.space.sampler
            n = p.trials if spec.get("name", "tpe") == "random" else int(spec.get("n_startup_trials", 10))
            draw = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=p.base_seed))
            dists = p.space.distributions()
            self._startup = [draw.ask(dists).params for _ in range(n)]
        return self._startup

    def next_startup_point(self, study) -> dict | None:
        """The first start-up point that no trial of the study holds or ran (a failed one is drawn again)."""
        from optuna.trial import TrialState

        held = [t.params for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
        return next((pt for pt in self.startup_points() if pt not in held), None)

    def startup_paired(self) -> dict | None:
        """Every model was trained at the same start-up points (drawn at random, in the same order): each
        model's proxy score at each point, and each model against the first, paired by point (a paired
        t-test and Wilcoxon's signed-rank test). n counts configurations with one seed each, not seeds. Only
        points where both models completed with a finite score pair; None below two models."""
        from optuna.trial import TrialState

        from .tune import trial_score

        models = [m for m in self.plan.models if self.study(m) is not None]
        if len(models) < 2:
            return None
        points = self.startup_points()
        values: dict[str, dict[int, float]] = {}
        for m in models:
            values[m] = {}
            for t in sorted(self.study(m).get_trials(deepcopy=False), key=lambda t: t.number):
                if t.state != TrialState.COMPLETE or trial_score(t) is None or t.params not in points:
                    continue
                values[m].setdefault(points.index(t.params), trial_score(t))
        base = models[0]
        out = {
            "baseline": base,
            "points": [{"point": i, **{m: values[m].get(i) for m in models}} for i in range(len(points))],
            "diffs": {},
        }
        for m in models[1:]:
            shared = sorted(set(values[m]) & set(values[base]))
            d = paired_diff([values[m][i] for i in shared], [values[base][i] for i in shared])
            out["diffs"][m] = {"points": shared, **d}
        return out

    def budget(self, model: str) -> dict:
        """What the search of `model` spent: trials by state, epochs trained, CPU- and wall-seconds."""
        from . import rundir
        from .tune import trials_by_state

        study = self.study(model)
        by_state = trials_by_state(study) if study is not None else {}
        epochs = cpu = wall = 0.0
        for run in sorted((self.dir / "search" / model).glob("trial=*")):
            m = rundir.read_metrics(run) or {}
            epochs += m.get("epochs_completed") or 0
            cpu += m.get("cpu_s") or 0.0
            wall += m.get("wall_s") or 0.0
        done = {"trials": 0, "epochs": 0.0, "cpu_s": 0.0, "wall_s": 0.0}
        for run in sorted((self.dir / "unpruned" / model).glob("trial=*")):
            m = rundir.read_metrics(run) or {}
            done["trials"] += m.get("status") in ("completed", "diverged")
            done["epochs"] += m.get("epochs_completed") or 0
            done["cpu_s"] += m.get("cpu_s") or 0.0
            done["wall_s"] += m.get("wall_s") or 0.0
        entry = {
            "trials_complete": len(by_state.get("complete", [])),
            "trials_pruned": len(by_state.get("pruned", [])),
            "trials_failed": len(by_state.get("failed", [])),
            "epochs_trained": int(epochs),
            "cpu_s": round(cpu, 1),
            "wall_s": round(wall, 1),
        }
        if self.plan.complete_pruned or done["trials"]:
            # complete_pruned=1: the pruned trials run to the end, apart from the search's own spend
            entry["pruned_run_to_the_end"] = {
                "trials": done["trials"],
                "epochs": int(done["epochs"]),
                "cpu_s": round(done["cpu_s"], 1),
                "wall_s": round(done["wall_s"], 1),
            }
        self.summary["budget"][model] = entry
        self._save_summary()
        return entry

    # ---- 2. best
    def best(self, model: str) -> dict:
        from optuna.trial import TrialState

        from .tune import expected_best_curve, finished, trial_score

        p = self.plan
        study = self.study(model)
        done = finished(study)[: p.trials] if study is not None else []
        if len(done) < p.trials:
            raise UserError(
                f"the study of {model} has {len(done)} of {p.trials} finished trials; run the search stage first"
            )
        # each finished trial's score at the end of its run: its value; with complete_pruned=1 a pruned
        # trial's is that of its run to the end (None: diverged)
        final = {t.number: t.value if t.state == TrialState.COMPLETE else None for t in done}
        unpruned = self.unpruned_scores(model) if p.complete_pruned else {}
        final.update(unpruned)
        ranked = [t for t in done if final[t.number] is not None and math.isfinite(final[t.number])]
        if not ranked:
            raise CompareError(f"none of the {p.trials} trials of {model} completed with a finite {p.metric}")
        t = min(ranked, key=lambda t: (final[t.number], t.number))
        entry = {
            "params": dict(t.params),
            "trial": t.number,
            f"proxy {p.metric}": final[t.number],
            "pruned_then_run_to_the_end": t.number in unpruned,
            "finished_trials": p.trials,
            "study": str(self.study_path(model)),
            "study_name": model,
            # per finished trial in order: [number, state, score]; a score of null: diverged
            "trials": [[x.number, x.state.name.lower(), trial_score(x)] for x in done],
        }
        if p.complete_pruned:
            entry["unpruned"] = {str(n): v for n, v in unpruned.items()}
        self.summary["best"][model] = entry
        scores = [unpruned[x.number] if x.number in unpruned else trial_score(x) for x in done]
        finite = [v for v in scores if v is not None]
        worst = max(finite)
        # a diverged trial counts as no better than the worst finite one (its perplexity is unbounded)
        self.summary["expected_best"][model] = expected_best_curve(
            [v if v is not None else worst for v in scores]
        )
        self.budget(model)
        _say(
            f"[best] {model}: trial {t.number}, proxy {p.metric} {final[t.number]:.2f}: {_fmt_params(t.params)}"
        )
        return entry

    def _budget_rows(self, models: list[str]) -> list[str]:
        """tuning.md's budget table: the search's spend per model, and with complete_pruned=1 what running its
        pruned trials to the end cost on top (a model that prunes more spends more there)."""
        b, extra = self.summary["budget"], self.plan.complete_pruned
        head = "| model | trials complete | pruned | failed | epochs | CPU hours |"
        rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
        if extra:
            head += " pruned run to the end: trials | their epochs | their CPU hours | CPU hours in all |"
            rule += " ---: | ---: | ---: | ---: |"
        rows = [head + " best proxy val ppl |", rule + " ---: |"]
        for m in models:
            x, best = b.get(m, {}), self.summary["best"][m]
            row = (
                f"| {m} | {x.get('trials_complete')} | {x.get('trials_pruned')} | {x.get('trials_failed')} | "
                f"{x.get('epochs_trained')} | {x.get('cpu_s', 0) / 3600:.2f} |"
            )
            if extra:
                u = x.get("pruned_run_to_the_end") or {}
                row += (
                    f" {u.get('trials', 0)} | {u.get('epochs', 0)} | {u.get('cpu_s', 0) / 3600:.2f} | "
                    f"{(x.get('cpu_s', 0) + u.get('cpu_s', 0)) / 3600:.2f} |"
                )
            rows.append(row + f" {best[f'proxy {self.plan.metric}']:.2f} |")
        return rows

    def tuning_report(self) -> None:
        """<dir>/tuning.md and <dir>/expected_best.png: the budgets side by side, and the expected best proxy
        validation perplexity vs the number of trials per model (with its 95% bootstrap band)."""
        from .checkpoint import atomic_write_bytes
        from .report_figures import expected_best_figure

        models = [m for m in self.plan.models if m in self.summary["expected_best"]]
        if not models:
            return
        e = self.summary["expected_best"]
        lines = [
            f"# Tuning: {', '.join(models)} on {self.plan.proxy}",
            "",
            "## The budget each model's search spent",
            "",
            *self._budget_rows(models),
        ]
        n_max = max(len(e[m]) for m in models)
        shown = sorted({n for n in (1, 2, 4, 8, 12, 16, 24, 32, 48, n_max) if n <= n_max})
        lines += [
            "",
            "## Expected best proxy validation perplexity after n trials (95% bootstrap band)",
            "",
            "Tang et al. (2020)'s unbiased estimator of Dodge et al. (2019)'s curve over the finished trials in "
            + (
                "their order (a pruned trial counts with its run to the end, a diverged one as the worst)."
                if self.plan.complete_pruned
                else "their order (a pruned trial counts with its last reported perplexity, a diverged one as the worst)."
            ),
            "",
            "| n | " + " | ".join(models) + " |",
            "| ---: | " + " | ".join("---:" for _ in models) + " |",
        ]
        for n in shown:
            cells = []
            for m in models:
                r = e[m][n - 1] if n <= len(e[m]) else None
                cells.append(f"{r['expected_best']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]" if r else "")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines += ["", "![expected best vs trials](expected_best.png)", ""]
        lines += _unpruned_lines(self.summary["best"], models, self.plan.metric)
        paired = self.startup_paired()
        if paired:
            self.summary["startup_paired"] = paired
            lines += _paired_lines(paired, models, self.plan.proxy)
        atomic_write_bytes(self.dir / "tuning.md", "\n".join(lines).encode())
        expected_best_figure({m: e[m] for m in models}, self.dir / "expected_best.png", self.plan.proxy)
        self.summary["tuning_report"] = str(self.dir / "tuning.md")
        self._save_summary()

    # ---- 3. final
    def final_all(self, best: dict) -> list[str]:
        """Every model's final runs, seed by seed with the models in turn, as many at a time as the launcher
        runs (final_at_a_time): the first seed of every model, then the second, ... (in groups of that many seeds
        per model), so that wherever the stage stops, the models hold the same seeds and pair."""
        from . import rundir

        p = self.plan
        n = p.final_at_a_time()

        def completed(m: str, seeds: list) -> bool:
            return all(
                (rundir.read_metrics(self.dir / "final" / m / f"seed={sd}") or {}).get("status")
                == "completed"
                for sd in seeds
            )

        todo = []
        for m in p.models:
            if completed(m, p.seeds):  # said once, and its runs' configs checked against its best
                self.final(m, best[m]["params"], p.seeds, record=False)
            else:
                todo.append(m)
        for i in range(0, len(p.seeds), n):
            for m in todo:
                if not completed(m, p.seeds[i : i + n]):
                    self.final(m, best[m]["params"], p.seeds[i : i + n], record=False)
        return [problem for m in p.models for problem in self.final(m, best[m]["params"], [], say=False)]

    def final(self, model: str, params: dict, seeds=None, record: bool = True, say: bool = True) -> list[str]:
        """Trains `seeds` (default: all the plan's) of `model`'s best config where not completed; with
        record, writes every seed's outcome to the summary and returns what is missing."""
        from . import rundir
        from .config import flatten

        p = self.plan
        seeds = p.seeds if seeds is None else seeds
        final_dir = self.dir / "final" / model
        for s in p.seeds:
            run = final_dir / f"seed={s}"
            stored = rundir.read_config(run)
            if stored is None:
                continue
            stored = flatten(stored)
            wrong = {k: stored.get(k) for k, v in params.items() if stored.get(k) != v}
            if wrong:
                raise CompareError(
                    f"{run} was trained with {_fmt_params(wrong)}, not the best trial's {_fmt_params(params)} "
                    "(the search changed since); move it away to train the new best, or use another dir="
                )
        status = {s: (rundir.read_metrics(final_dir / f"seed={s}") or {}).get("status") for s in p.seeds}
        todo = [s for s in seeds if status[s] != "completed"]
        head = f"[final] {model}"
        done = sum(status[s] == "completed" for s in p.seeds)
        if not todo:
            if say:
                _say(f"{head}: seeds {','.join(map(str, seeds))} completed; nothing to run")
        else:
            _say(
                f"{head}: {done} of {len(p.seeds)} seeds completed; training seed{'s' if len(todo) > 1 else ''} "
                f"{','.join(map(str, todo))} on {p.experiment} with {_fmt_params(params)} → {final_dir}"
            )
            overrides = p.final_overrides(model, params, ",".join(map(str, todo)))
            # final_jobs=: each run then gets its share of the cores (runtime.default_threads)
            if p.final_jobs is not None:
                overrides = [o for o in overrides if not o.startswith("hydra.launcher.n_jobs=")]
                overrides.append(f"hydra.launcher.n_jobs={p.final_jobs}")
            self.runner.run(
                _train_cmd(
                    [
                        *overrides,
                        *self.group("final"),
                        f"hydra.sweep.dir={_quote(final_dir)}",
                        "hydra.sweep.subdir='seed=${seed}'",
                    ]
                )
            )
            if self.keeper is not None:  # a final run's record is kept as soon as it ends, not ten minutes on
                self.keeper.keep()
        if not record:
            return []
        runs, problems = {}, []
        for s in p.seeds:
            m = rundir.read_metrics(final_dir / f"seed={s}") or {}
            runs[str(s)] = {
                "status": m.get("status", "missing"),
                "val/ppl": m.get("val/ppl"),
                "test/ppl": m.get("test/ppl"),
                "best_epoch": m.get("best_epoch"),
                "run_dir": str(final_dir / f"seed={s}"),
            }
            if m.get("status") != "completed":
                problems.append(
                    f"{model} seed {s}: {m.get('status', 'missing')} {m.get('error', '')}".strip()
                )
        self.summary["final"][model] = {"params": params, "runs": runs}
        self._save_summary()
        return problems

    # ---- 4. report
    def report(self) -> None:
        final = self.dir / "final"
        if not final.exists():
            raise UserError(f"no final runs in {final} yet; run the final stage first")
        out = self.dir / "report"
        mode = "disabled" if self.plan.logger_off else self.plan.logger_mode
        if mode not in ("offline", "online", "disabled"):
            mode = "offline"
        _say(f"[report] {final} → {out}")
        rc = self.runner.run(
            [
                sys.executable,
                "-m",
                "dglstm_lm.report",
                "--dir",
                str(final),
                "--out",
                str(out),
                "--wandb-mode",
                mode,
            ]
        )
        if rc:
            raise CompareError(f"the report failed (exit status {rc})")
        self.summary["report"] = str(out / "report.md")
        self._save_summary()

    # ---- status=1
    def status(self) -> list[str]:
        """status=1: where the comparison stands, read from its folder (or, where that is gone, its archive)
        without writing anything or taking its lock, so that it can run beside the comparison: each model's
        search, the pruned trials run to the end, the final runs, the shared start-up points paired, whether
        a make compare is running on it now, and what it does next. The models, trials, seeds and
        complete_pruned are the ones its summary.json records (a line says where the command differs)."""
        p = self.plan
        if not self.summary_path.exists():
            where = p.dir if p.archive is None else f"{p.dir} (nor in archive={p.archive})"
            return [f"{where}: no comparison here yet (no summary.json)"]
        notes = self._status_plan(json.loads(self.summary_path.read_text()))
        finals = "final" in p.stages
        busy = _locked(self.dir)
        lines = [
            f"{self.dir}: {', '.join(p.models)}; {p.trials} trials each on {p.proxy} (space {p.space.name})"
            + (f", then {p.experiment} × seeds {','.join(map(str, p.seeds))}" if finals else "")
            + (", pruned trials run to the end" if p.complete_pruned else "")
            + (
                f" (from archive=, as of its last copy; {p.dir} holds no summary.json)"
                if self.dir != p.dir
                else ""
            ),
            "  a make compare is running on it now"
            if busy
            else "  nothing is running on it now (trials and runs it left unfinished resume when it runs again)",
            *notes,
        ]
        left = {"search": 0, "unpruned": 0, "final": 0}
        for m in p.models:
            lines += self._status_search(m, busy, left) + (
                self._status_final(m, busy, left) if finals else []
            )
        paired = self.startup_paired()
        for m, d in (paired or {}).get("diffs", {}).items():
            if d.get("n", 0) >= 2:
                lines.append(
                    f"  start-up points, {m} − {paired['baseline']}: {d['delta']:+.2f} [{d['low']:.2f}, {d['high']:.2f}] "
                    f"over {d['n']} points, t p = {_p(d['p_t'])}, Wilcoxon p = {_p(d['p_wilcoxon'])} "
                    "(configurations with one seed each, not seeds)"
                )
        if finals:
            lines += self._status_final_paired()
        if left["search"]:
            lines.append(f"  next: the search, {left['search']} trials left in all")
        elif left["unpruned"]:
            lines.append(f"  next: the pruned trials run to the end, {left['unpruned']} left")
        elif not finals:
            lines.append("  done: the search")
        elif left["final"]:
            lines.append(
                f"  next: the final runs, {left['final']} of {len(p.models) * len(p.seeds)} left"
                + self._final_time_left()
            )
        else:
            report = self.dir / "report" / "report.md"
            lines.append(f"  done: the report is {report}" if report.exists() else "  next: the report")
        return lines

    def _status_plan(self, recorded: dict) -> list[str]:
        """status=1: the plan's models, trials, seeds and complete_pruned as summary.json records them; a line
        for each the command gave otherwise."""
        p, lines = self.plan, []
        for key, attr in (("models", "models"), ("trials_per_model", "trials"), ("seeds", "seeds")):
            if key in recorded and recorded[key] != getattr(p, attr):
                lines.append(
                    f"  (this comparison has {attr}={recorded[key]}, where the command says {getattr(p, attr)})"
                )
                setattr(p, attr, recorded[key])
        if "complete_pruned" in recorded:
            p.complete_pruned = bool(recorded["complete_pruned"])
        return lines

    def _status_search(self, m: str, busy: bool, left: dict) -> list[str]:
        """status=1: model m's search, and its pruned trials run to the end."""
        from . import rundir
        from .tune import finished, trial_score, trials_by_state

        p = self.plan
        try:
            study = self.study(m)
        except KeyError:  # its journal made, its first line not yet written
            study = None
        if study is None:
            left["search"] += p.trials
            return [f"  search {m}: not started"]
        by = trials_by_state(study)
        done = finished(study)[: p.trials]
        n_complete = sum(t in by["complete"] for t in done)
        score = {t.number: trial_score(t) for t in done if t in by["complete"]}
        ended: list[int] = []
        if p.complete_pruned:  # a pruned trial run to the end counts with that run's score, as best() has it
            for n in self.pruned_trials(m):
                r = rundir.read_metrics(self.unpruned_dir(m, n)) or {}
                if r.get("status") in ("completed", "diverged"):
                    ended.append(n)
                    v = r.get(p.metric) if r.get("status") == "completed" else None
                    score[n] = float(v) if v is not None and math.isfinite(v) else None
        scored = {n: v for n, v in score.items() if v is not None}
        best = min(scored, key=lambda n: (scored[n], n), default=None)
        label = "running or waiting to resume" if busy else "cut short"
        running = [
            f"{t.number} ({_epochs(len(rundir.read_history(self.dir / 'search' / m / f'trial={t.number}')))} done)"
            for t in by["running"]
        ]
        left["search"] += p.trials - len(done)
        lines = [
            f"  search {m}: {len(done)} of {p.trials} trials finished ({n_complete} complete, "
            f"{len(done) - n_complete} pruned); {len(by['failed'])} failed and drawn again"
            + (f"; {label}: trial {', '.join(running)}" if running else "")
            + (f"; best so far trial {best}, {scored[best]:.2f}" if best is not None else "")
        ]
        if p.complete_pruned and len(done) > n_complete:
            pruned = self.pruned_trials(m)
            lines.append(f"  pruned trials of {m} run to the end: {len(ended)} of {len(pruned)}")
            left["unpruned"] += len(pruned) - len(ended)
        return lines

    def _status_final_paired(self) -> list[str]:
        """status=1: each model's final test perplexity against the first model's, paired by the seeds both
        completed (a paired t-test and its 95% interval from two seeds on)."""
        from . import rundir

        p, lines = self.plan, []

        def tests(m: str) -> dict:
            out = {}
            for sd in p.seeds:
                r = rundir.read_metrics(self.dir / "final" / m / f"seed={sd}") or {}
                if r.get("status") == "completed" and r.get("test/ppl") is not None:
                    out[sd] = float(r["test/ppl"])
            return out

        base = tests(p.models[0])
        for m in p.models[1:]:
            other = tests(m)
            seeds = [sd for sd in p.seeds if sd in base and sd in other]
            if not seeds:
                continue
            d = [other[sd] - base[sd] for sd in seeds]
            head = f"  final runs, {m} − {p.models[0]}, test perplexity over seed{'s' if len(d) > 1 else ''} {','.join(map(str, seeds))}: "
            if len(d) == 1:
                lines.append(head + f"{d[0]:+.2f} (one seed: no interval)")
                continue
            from scipy import stats

            t = stats.ttest_rel([other[sd] for sd in seeds], [base[sd] for sd in seeds])
            ci = t.confidence_interval(0.95)
            lines.append(
                head + f"{sum(d) / len(d):+.2f} [{ci.low:.2f}, {ci.high:.2f}], paired t p = {_p(t.pvalue)}"
            )
        return lines

    def _final_time_left(self) -> str:
        """status=1: the final runs' time left, from the epochs they have trained: every run not completed
        trains to the recipe's cap at its model's shortest epoch (the differences of the
        history's elapsed_s: a pause, SIGSTOP or a session's end, only lengthens an epoch, and in a run paused
        more often than not the median would be one), in final_all's order: each
        model's seeds in groups of final_at_a_time() (this command's final_jobs= or launcher), a group
        lasting as long as its longest run."""
        import statistics

        from . import rundir

        p, cap, per_epoch, done = self.plan, None, {}, {}  # done[(m, sd)]: epochs trained, None: completed
        for m in p.models:
            times = []
            for sd in p.seeds:
                run = self.dir / "final" / m / f"seed={sd}"
                r = rundir.read_metrics(run) or {}
                cap = int(r["max_epochs"]) if r.get("max_epochs") else cap
                done[m, sd] = None if r.get("status") == "completed" else (r.get("epochs_completed") or 0)
                prev = 0.0
                for rec in rundir.read_history(run):
                    e = rec.get("elapsed_s")
                    if isinstance(e, (int, float)):
                        times += [e - prev] if e > prev else []
                        prev = e
            per_epoch[m] = min(times) if times else None
        known = [v for v in per_epoch.values() if v is not None]
        if cap is None or not known:
            return ""
        typical, n = statistics.median(known), p.final_at_a_time()

        def left(m: str, sd: int) -> float:
            return 0.0 if done[m, sd] is None else max(cap - done[m, sd], 0) * (per_epoch[m] or typical)

        seconds = sum(
            max(left(m, sd) for sd in p.seeds[i : i + n]) for i in range(0, len(p.seeds), n) for m in p.models
        )
        paces = ", ".join(
            f"{m} {per_epoch[m] / 60:.1f}"
            if per_epoch[m] is not None
            else f"{m} as the others (no epoch yet)"
            for m in p.models
        )
        return (
            f"; about {seconds / 3600:.1f} h more if every run trains to its cap of {cap} epochs at its model's "
            f"fastest epoch so far (min: {paces}); pauses add to it, early stopping ends runs sooner"
        )

    def _status_final(self, m: str, busy: bool, left: dict) -> list[str]:
        """status=1: model m's final runs, seed by seed."""
        from . import rundir

        runs = {sd: rundir.read_metrics(self.dir / "final" / m / f"seed={sd}") for sd in self.plan.seeds}
        left["final"] += sum((r or {}).get("status") != "completed" for r in runs.values())
        if not any(runs.values()):
            return []

        def state(r: dict) -> str:
            return "cut short" if r.get("status") == "running" and not busy else str(r.get("status"))

        cells = [
            f"seed {sd} {state(r)}"
            + (f" (test {r['test/ppl']:.2f})" if r.get("test/ppl") is not None else "")
            + (f" ({_epochs(r.get('epochs_completed') or 0)} done)" if r.get("status") != "completed" else "")
            for sd, r in runs.items()
            if r
        ]
        missing = [str(sd) for sd, r in runs.items() if not r]
        return [
            f"  final {m}: {'; '.join(cells)}"
            + (f"; seeds {','.join(missing)} not started" if missing else "")
        ]

    def run(self) -> int:
        p = self.plan
        _say(
            f"{', '.join(p.models)}: {p.trials} trial{'s' if p.trials > 1 else ''} each over space {p.space.name} "
            f"({len(p.space.params)} parameters), {p.jobs} at a time, on {p.proxy}"
            + (f", then {p.experiment} × seeds {','.join(map(str, p.seeds))}" if "final" in p.stages else "")
            + f" → {self.dir}"
        )
        seed = getattr(p, "search_seed", None)
        if "final" in p.stages and seed in p.seeds:
            _say(
                f"note: seed {seed} is every search trial's seed too: its final runs begin as the trials did (the "
                "same initial weights, the same random stream for its dropout masks), so the luck that helped choose "
                f"each configuration carries into them; final seeds without {seed} avoid that (the default: {DEFAULT_SEEDS})"
            )
        self._save_summary()
        if self.keeper is not None:
            self.keeper.start()  # and every ten minutes while a stage runs
        try:
            return self._stages()
        finally:
            if self.keeper is not None:
                self.keeper.stop()
                self.keeper.keep()

    def _stages(self) -> int:
        p = self.plan
        if "search" in p.stages:
            self.search_all()
            if p.complete_pruned:
                for m in p.models:
                    self.complete_pruned(m)
        problems = []
        if "final" in p.stages:
            best = {m: self.best(m) for m in p.models}
            self.tuning_report()  # the search's report now: the final runs take hours
            problems += self.final_all(best)
        elif "search" in p.stages:
            for m in p.models:
                self.best(m)
        if "search" in p.stages or "final" in p.stages:
            self.tuning_report()
        if "report" in p.stages:
            self.report()
        if problems:
            raise CompareError("final runs not completed: " + "; ".join(problems))
        _say(f"done; summary in {self.summary_path}")
        return 0


def _p(v) -> str:
    return "—" if v is None else f"{v:.2g}" if v < 0.001 else f"{v:.3f}"


def _paired_lines(paired: dict, models: list[str], proxy: str) -> list[str]:
    """tuning.md's section on the shared start-up points."""
    base = paired["baseline"]
    cell = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "## The shared start-up points, paired",
        "",
        f"Every model was trained at the same {len(paired['points'])} random start-up points, in the same order: "
        f"proxy validation perplexity ({proxy}, one seed) at each; – where a model has no completed run of it.",
        "",
        "| point | " + " | ".join(models) + " |",
        "| ---: | " + " | ".join("---:" for _ in models) + " |",
    ]
    lines += [
        f"| {r['point']} | " + " | ".join(cell(r.get(m)) for m in models) + " |" for r in paired["points"]
    ]
    lines.append("")
    for m, d in paired["diffs"].items():
        if d["n"] == 0:
            lines.append(f"- {m} − {base}: no shared point completed by both yet.")
            continue
        ci = "" if d["low"] is None else f" [95% CI {d['low']:+.2f}, {d['high']:+.2f}]"
        lines.append(
            f"- {m} − {base}, paired by point: {d['delta']:+.2f}{ci}, paired t-test p = {_p(d['p_t'])}, "
            f"Wilcoxon signed-rank p = {_p(d['p_wilcoxon'])}; lower at {d['lower']} of {d['n']} points. "
            f"n counts configurations with one seed each, on the proxy: it says whether the difference holds "
            f"across the space, not what the tuned models reach."
        )
    return lines + [""]


def _unpruned_lines(best: dict, models: list[str], metric: str) -> list[str]:
    """tuning.md's section on the pruned trials run to the end (complete_pruned=1)."""
    runs = {m: best[m]["unpruned"] for m in models if "unpruned" in best.get(m, {})}
    if not runs:
        return []
    cell = lambda v: "diverged" if v is None else f"{v:.2f}"  # noqa: E731
    lines = [
        "## The pruned trials, run to the end",
        "",
        f"complete_pruned=1: every pruned trial trained to the end with its parameters, without the pruner; "
        f"its proxy {metric} where the pruner stopped it, and at the end.",
        "",
        "| model | trial | when pruned | at the end | the model's best? |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for m, by_trial in runs.items():
        stopped = {n: v for n, _, v in best[m]["trials"]}
        for n, v in sorted(by_trial.items(), key=lambda kv: int(kv[0])):
            mark = "**yes**" if int(n) == best[m]["trial"] else ""
            lines.append(f"| {m} | {n} | {cell(stopped.get(int(n)))} | {cell(v)} | {mark} |")
    lines.append("")
    for m, by_trial in runs.items():
        b = best[m]
        lines.append(
            f"- {m}: {len(by_trial)} pruned trial{'s' if len(by_trial) != 1 else ''} run to the end; its best is "
            + (
                f"trial {b['trial']}, **one the pruner had stopped**."
                if b.get("pruned_then_run_to_the_end")
                else f"trial {b['trial']}, which ran complete in the search: the pruner stopped none better."
            )
        )
    return lines + [""]


def _lock(folder: Path) -> int:
    from .rundir import check_folder

    check_folder(folder, "dir")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(20):  # a status=1 probing the lock holds it for an instant: try again for a second
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 19:
                os.close(fd)
                raise UserError(
                    f"another make compare is running on {folder} (or one of its jobs is)"
                ) from None
            time.sleep(0.05)
    os.set_inheritable(fd, True)  # the stages' jobs hold it too, should this process be killed
    return fd


def _locked(folder: Path) -> bool:
    """Whether a make compare (or one of its jobs) holds the folder's lock now: tried, and let go at once."""
    lock = folder / ".lock"
    if not lock.exists():
        return False
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing lets go of a lock it took)
    return False


@cli
def main(argv=None) -> int:
    ap = ArgumentParser(prog="make compare", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    ap.add_argument("--trials", default=DEFAULT_TRIALS, help="finished trials per model, in total")
    ap.add_argument(
        "--jobs",
        default=None,
        help="trials run at a time (default: joblib's hydra.launcher.n_jobs, one per core where it is -1 or "
        "unset; 1 under other launchers)",
    )
    ap.add_argument("--seeds", default=DEFAULT_SEEDS, help="seeds of the final runs")
    ap.add_argument("--proxy", default=DEFAULT_PROXY, help="the search's recipe (conf/experiment/)")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="the final recipe (conf/experiment/)")
    ap.add_argument("--space", default=DEFAULT_SPACE, help="the search space (conf/space/)")
    ap.add_argument(
        "--dir", default=None, help="the comparison's folder (default outputs/compare/<experiment>)"
    )
    ap.add_argument("--proxy-override", action="append", help="an override for the search only (repeatable)")
    ap.add_argument("--stages", default=",".join(STAGES), help="which stages to run (default all)")
    ap.add_argument(
        "--complete-pruned",
        "--complete_pruned",
        default="0",
        help="1: after the search, run every pruned trial to the end (no pruner) and choose the best over all",
    )
    ap.add_argument(
        "--final-jobs",
        "--final_jobs",
        default=None,
        help="final runs at a time with hydra/launcher=joblib (default: its n_jobs, else one per core); each run "
        "gets its share of the cores",
    )
    ap.add_argument(
        "--archive",
        default=None,
        help="a folder outside dir= where the records are kept (journals, summaries, ended runs' records, no "
        "checkpoints) and brought back from when dir= lacks them; commit it to outlive dir=",
    )
    ap.add_argument(
        "--status",
        default="0",
        help="1: say where the comparison stands (its folder, else its archive) and run nothing; the other "
        "arguments as for the command it describes",
    )
    ap.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every stage, e.g. logger=none trainer.threads=1"
    )
    args = ap.parse_intermixed_args(argv)
    plan = Plan(args)
    plan.check_configs()
    if _flag(args.status, "status"):
        for line in Compare(plan, None, read_only=True).status():
            print(line)
        return 0
    if {"search", "final"} & set(plan.stages):
        from .rundir import check_folder

        check_folder(plan.dir, "dir")  # a dir= that cannot be a folder is said before the data is looked for
        if plan.archive is not None:
            check_folder(plan.archive, "archive")
        plan.check_data()
    fd = _lock(plan.dir)
    if plan.archive is not None:  # one comparison at a time writes an archive; it must be writable now
        from .rundir import check_writable

        check_writable(plan.archive)
        _lock(plan.archive)
    return Compare(plan, Runner(fd)).run()


if __name__ == "__main__":
    sys.exit(main())
