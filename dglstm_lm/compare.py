"""`make compare`: an equal-budget tuned comparison of models, in one resumable command.

    python -m dglstm_lm.compare --models stacked_lstm,dglstm --trials 20 --seeds 1,2,3 \\
        --proxy zaremba_small_proxy --experiment zaremba_small --dir outputs/compare/zaremba_small [overrides]

Stages, each one a `python -m dglstm_lm.train --multirun ...` subprocess (so Hydra, Optuna and the launchers
run exactly as in `make search` and `make sweep`):

1. search: for every model, an Optuna search over the same space (conf/hparams_search/<space>.yaml), with the
   same number of trials, on the same proxy recipe; each model's study in <dir>/optuna/<model>.sqlite, its
   trial runs in <dir>/search/<model>/<params>/. `trials` is a total per model: a re-run counts the COMPLETE
   trials of the study and runs only the missing ones. A trial cut short (still RUNNING in the study) is
   marked failed and its parameters are tried again first, in the same run directory, so the run resumes
   from its checkpoint.
2. best: the best trial of each model (lowest proxy validation perplexity among its first `trials` complete
   trials) read from its study → <dir>/summary.json.
3. final: each model's best parameters trained on the full recipe with every seed, a Hydra multirun into
   <dir>/final/<model>/seed=<s>/: a re-run skips completed jobs and resumes unfinished ones.
4. report: `python -m dglstm_lm.report --dir <dir>/final --out <dir>/report`.

Overrides (`key=value`) apply to every stage; those under `hydra.sweeper.` to the search only. Killing the
command anywhere and running it again continues it; a second command on the same folder is refused while the
first one runs.
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
import warnings
from pathlib import Path

from .errors import ConfigError, UserError, cli


class CompareError(UserError):
    """A stage did not finish (a search short of its trials, a final run that failed): exit status 1."""

    exit_code = 1


DEFAULT_MODELS = "stacked_lstm,dglstm"
DEFAULT_TRIALS = 20
DEFAULT_SEEDS = "1,2,3"
DEFAULT_PROXY = "zaremba_small_proxy"
DEFAULT_EXPERIMENT = "zaremba_small"
DEFAULT_SPACE = "compare"
STAGES = ("search", "final", "report")

# Set by this command itself: given as overrides they would break the equal budget or the folder layout.
RESERVED = {
    "model": "models=",
    "experiment": "experiment= (the final recipe) and proxy= (the search's)",
    "hparams_search": "space=",
    "seed": "seeds=",
    "optimized_metric": "the space's config",
    "trainer.resume": "nothing: re-run the same command to continue",
    "hydra.sweep.dir": "dir=",
    "hydra.sweep.subdir": "dir=",
    "hydra.run.dir": "dir=",
    "hydra.sweeper.n_trials": "trials=",
    "hydra.sweeper.storage": "dir=",
    "hydra.sweeper.study_name": "dir=",
    "hydra.sweeper.sampler.seed": "the space's config (sampler.seed)",
    "hydra.sweeper.direction": "the space's config",
    "hydra/sweeper": "the space's config",
    "hydra.job.config.override_dirname.exclude_keys": "nothing",
}
# Settings that may change between runs on the same folder without changing what was computed.
_LOCATION_KEYS = ("hydra/launcher", "hydra.launcher", "hydra.sweeper.n_jobs")


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
    """A trial's parameter value as Hydra override text (floats at full precision)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    return _quote(v)


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
        self.space = _option(args.space, "hparams_search", "space")
        self.stages = _parse_list(args.stages, "stages")
        for s in self.stages:
            if s not in STAGES:
                raise ConfigError(f"unknown stage {s!r} (available: {', '.join(STAGES)})")

        parser = OverridesParser.create()
        self.common, self.search_only, self.proxy_overrides = [], [], []
        for given, kind in ((args.overrides, "override"), (args.proxy_override or [], "proxy override")):
            try:
                parsed = parser.parse_overrides(list(given))
            except Exception as exc:
                raise ConfigError(f"cannot parse {kind}s: {str(exc).splitlines()[0]}") from None
            for o in parsed:
                key = o.key_or_group
                if o.is_sweep_override():
                    raise ConfigError(
                        f"{o.input_line}: make compare takes single values (the search space is the "
                        f"space's config, the seeds seeds=)"
                    )
                if key in RESERVED:
                    raise ConfigError(f"{o.input_line}: set by make compare; use {RESERVED[key]}")
                if kind == "proxy override":
                    self.proxy_overrides.append(o.input_line)
                elif key.startswith("hydra.sweeper."):
                    self.search_only.append(o.input_line)
                else:
                    self.common.append(o.input_line)

        out_root = next(
            (o.split("=", 1)[1] for o in reversed(self.common) if o.startswith("paths.output_dir=")),
            "outputs",
        )
        self.dir = Path(args.dir or Path(out_root) / "compare" / self.experiment).resolve()
        _quote(self.dir)
        self.logger_off = any(o in ("logger=none", "logger.mode=disabled") for o in self.common)
        self.logger_mode = next(
            (o.split("=", 1)[1] for o in reversed(self.common) if o.startswith("logger.mode=")), "offline"
        )

    # ---- composition checks: every config this command will train composes and validates
    def check_configs(self) -> None:
        from omegaconf import OmegaConf

        from .config import compose, flatten, resolved_container, validate

        for m in self.models:
            cfg = compose(self.search_overrides(m), return_hydra_config=True)
            sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
            space = dict(sweeper.get("params") or {})
            if not space:
                raise ConfigError(f"space={self.space}: hydra.sweeper.params is empty")
            given = {o.split("=", 1)[0].lstrip("+~") for o in self.common + self.proxy_overrides}
            searched = sorted(given & set(space))
            if searched:
                raise ConfigError(f"{searched[0]} is searched (space={self.space}); it cannot also be fixed")
            job = compose(self.search_overrides(m))
            validate(job)
            keys = set(flatten(resolved_container(job)))
            for key in space:
                if key not in keys:
                    raise ConfigError(f"space={self.space}: {key} is not a key of the {m} config")
            self.space_params = {k: str(v) for k, v in space.items()}
            sampler = dict(sweeper.get("sampler") or {})
            self.base_seed = int(sampler.pop("seed", None) or 0)
            self.sampler = sampler
            self.direction = str(sweeper.get("direction"))
            self.metric = OmegaConf.select(cfg, "optimized_metric")
            self.exclude_keys = list(OmegaConf.select(cfg, "hydra.job.config.override_dirname.exclude_keys"))
            validate(compose(self.final_overrides(m, {}, self.seeds[0])))

    def search_overrides(self, model: str) -> list[str]:
        return [
            f"hparams_search={self.space}",
            f"model={model}",
            f"experiment={self.proxy}",
            *self.proxy_overrides,
            *self.common,
            *self.search_only,
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
            "search_overrides": sorted(o for o in self.search_only if matters(o)),
            "space": self.space,
            "params": self.space_params,
            "sampler": self.sampler,
            "sampler_seed": self.base_seed,
            "direction": self.direction,
            "metric": self.metric,
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self, args: list[str]) -> int:
        _say("$ " + " ".join(_shell(a) for a in ["python", *args[1:]]))
        env = dict(os.environ)
        env.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
        self.proc = subprocess.Popen(args, env=env, pass_fds=(self.lock_fd,))
        interrupted = False
        while True:
            try:
                rc = self.proc.wait()
                break
            except KeyboardInterrupt:  # the job got the same Ctrl-C: let it save its checkpoint and stop
                interrupted = True
        self.proc = None
        if interrupted or self.stopped_by is not None:
            signum = self.stopped_by or signal.SIGINT
            print(
                f"compare: stopped by {signal.Signals(signum).name}; run the same command again to continue",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + signum)
        return rc


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "dglstm_lm.train", "--multirun", *overrides]


# ------------------------------------------------------------------------------------------------ studies


def _study(path: Path, name: str, direction: str, create: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{path}"
    if not create and not path.exists():
        return None
    return optuna.create_study(study_name=name, storage=storage, direction=direction, load_if_exists=True)


def complete_trials(study) -> list:
    from optuna.trial import TrialState

    return sorted(
        (t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE),
        key=lambda t: t.number,
    )


def best_of(study, budget: int):
    """The best of the first `budget` complete trials (so every model is judged on the same budget even if
    a study holds more), or None."""
    done = complete_trials(study)[:budget]
    scored = [t for t in done if t.value is not None and math.isfinite(t.value)]
    return min(scored, key=lambda t: (t.value, t.number)) if scored else None


def recover_interrupted(study, budget_left: int) -> list[dict]:
    """Trials left RUNNING by a killed search (this command holds the folder's lock, so none is really
    running): mark them failed and enqueue their parameters again, so that the next trials retry them,
    in the same run directory (named after the parameters), resuming from its checkpoint."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.trial import TrialState

    retried = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if len(retried) < budget_left and t.params:
            with warnings.catch_warnings():  # "enqueue_trial is experimental" (it is stable in optuna 2.10)
                warnings.simplefilter("ignore", ExperimentalWarning)
                study.enqueue_trial(dict(t.params))
            retried.append(dict(t.params))
    return retried


# ------------------------------------------------------------------------------------------------- stages


class Compare:
    def __init__(self, plan: Plan, runner: Runner):
        self.plan, self.runner = plan, runner
        self.dir = plan.dir
        self.summary_path = self.dir / "summary.json"
        self.summary = self._load_summary()

    # ---- summary.json: settings, the best params per model, the final runs
    def _load_summary(self) -> dict:
        try:
            old = json.loads(self.summary_path.read_text())
        except (OSError, ValueError):
            old = None
        now = self.plan.settings()
        if old and old.get("settings") and old["settings"] != now:
            before = old["settings"]
            diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
            shown = "; ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in diff[:2])
            raise UserError(f"{self.dir} holds a comparison with other settings ({shown}); use another dir=")
        p = self.plan
        return {
            "what": (
                "equal-budget tuned comparison: every model was searched over the same space, with the same "
                f"number of complete trials ({p.trials}), on the same proxy recipe ({p.proxy}"
                + (f" with {' '.join(p.proxy_overrides)}" if p.proxy_overrides else "")
                + "), with the same sampler seeded the same way (the space's seed plus the number of trials "
                "already in the study at each start, so that uninterrupted searches draw the same first points "
                "for every model); each model's best trial (lowest proxy "
                f"{p.metric} among its first {p.trials} complete trials) was then trained on {p.experiment} "
                f"with the same seeds ({','.join(map(str, p.seeds))}). Test perplexity played no part in "
                "the selection."
            ),
            "settings": now,
            "models": p.models,
            "trials_per_model": p.trials,
            "seeds": p.seeds,
            "overrides": p.common,
            "best": {m: v for m, v in (old or {}).get("best", {}).items() if m in p.models},
            "final": {m: v for m, v in (old or {}).get("final", {}).items() if m in p.models},
        }

    def _save_summary(self) -> None:
        from .checkpoint import atomic_write_bytes

        atomic_write_bytes(self.summary_path, (json.dumps(self.summary, indent=2) + "\n").encode())

    def group(self, stage: str) -> list[str]:
        """One W&B group per stage of this comparison, unless logger.group is given."""
        if any(o.startswith("logger.group=") for o in self.plan.common):
            return []
        return [f"logger.group={_quote(f'compare-{self.dir.name}-{stage}')}"]

    # ---- 1. search
    def study_path(self, model: str) -> Path:
        return self.dir / "optuna" / f"{model}.sqlite"

    def search(self, i: int, model: str) -> None:
        p = self.plan
        head = f"[search {i}/{len(p.models)}] {model}"
        path = self.study_path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        study = _study(path, model, p.direction, create=True)
        done = len(complete_trials(study))
        left = p.trials - done
        retried = recover_interrupted(study, max(left, 0))
        if left <= 0:
            _say(f"{head}: {done} of {p.trials} trials complete; nothing to run")
            return
        for params in retried:
            _say(f"{head}: a trial was cut short; trying its parameters again first ({_fmt_params(params)})")
        search_dir = self.dir / "search" / model
        seed = p.base_seed + len(study.get_trials(deepcopy=False))
        _say(
            f"{head}: {done} of {p.trials} trials complete; running {left} on {p.proxy} "
            f"(sampler seed {seed}) → {search_dir}"
        )
        fixed = p.search_overrides(model)
        from hydra.core.override_parser.overrides_parser import OverridesParser

        exclude = p.exclude_keys + [o.key_or_group for o in OverridesParser.create().parse_overrides(fixed)]
        rc = self.runner.run(
            _train_cmd(
                [
                    *fixed,
                    f"hydra.sweeper.n_trials={left}",
                    f"hydra.sweeper.storage={_quote(f'sqlite:///{path}')}",
                    f"hydra.sweeper.study_name={model}",
                    f"hydra.sweeper.sampler.seed={seed}",
                    f"hydra.sweep.dir={_quote(search_dir)}",
                    *self.group("search"),
                    "hydra.job.config.override_dirname.exclude_keys=["
                    + ",".join(_quote(k) for k in dict.fromkeys(exclude))
                    + "]",
                ]
            )
        )
        study = _study(path, model, p.direction, create=False)
        done = len(complete_trials(study)) if study is not None else 0
        if done < p.trials:
            raise CompareError(
                f"search of {model} stopped with {done} of {p.trials} trials complete (exit status {rc}; "
                f"the trials' runs are in {search_dir}); run the same command again to add the missing ones"
            )
        note = f" (exit status {rc}: some trial runs did not complete; see above)" if rc else ""
        _say(f"{head}: {done} of {p.trials} trials complete{note}")

    # ---- 2. best
    def best(self, model: str) -> dict:
        p = self.plan
        study = _study(self.study_path(model), model, p.direction, create=False)
        n = len(complete_trials(study)) if study is not None else 0
        if n < p.trials:
            raise UserError(
                f"the study of {model} has {n} of {p.trials} complete trials; run the search stage first"
            )
        t = best_of(study, p.trials)
        if t is None:
            raise CompareError(
                f"none of the {p.trials} trials of {model} has a finite {p.metric} (all diverged?)"
            )
        entry = {
            "params": dict(t.params),
            "trial": t.number,
            f"proxy {p.metric}": t.value,
            "complete_trials": p.trials,
            "study": str(self.study_path(model)),
            "study_name": model,
            # per trial in order; null: diverged (a trial all the same)
            "trial_values": [
                x.value if math.isfinite(x.value) else None for x in complete_trials(study)[: p.trials]
            ],
        }
        self.summary["best"][model] = entry
        self._save_summary()
        _say(f"[best] {model}: trial {t.number}, proxy {p.metric} {t.value:.2f}: {_fmt_params(t.params)}")
        return entry

    # ---- 3. final
    def final(self, model: str, params: dict) -> list[str]:
        from . import rundir
        from .config import flatten

        p = self.plan
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
        todo = [s for s in p.seeds if status[s] != "completed"]
        head = f"[final] {model}"
        if not todo:
            _say(f"{head}: seeds {','.join(map(str, p.seeds))} completed; nothing to run")
        else:
            _say(
                f"{head}: {len(p.seeds) - len(todo)} of {len(p.seeds)} seeds completed; training seeds "
                f"{','.join(map(str, todo))} on {p.experiment} with {_fmt_params(params)} → {final_dir}"
            )
            self.runner.run(
                _train_cmd(
                    [
                        *p.final_overrides(model, params, ",".join(map(str, p.seeds))),
                        *self.group("final"),
                        f"hydra.sweep.dir={_quote(final_dir)}",
                        "hydra.sweep.subdir='seed=${seed}'",
                    ]
                )
            )
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

    def run(self) -> int:
        p = self.plan
        _say(
            f"{', '.join(p.models)}: {p.trials} trial{'s' if p.trials > 1 else ''} each over {', '.join(f'{k} {v}' for k, v in p.space_params.items())} "
            f"on {p.proxy}, then {p.experiment} × seeds {','.join(map(str, p.seeds))} → {self.dir}"
        )
        self._save_summary()
        if "search" in p.stages:
            for i, m in enumerate(p.models, 1):
                self.search(i, m)
        problems = []
        if "final" in p.stages:
            best = {m: self.best(m) for m in p.models}
            for m in p.models:
                problems += self.final(m, best[m]["params"])
        elif "search" in p.stages:
            for m in p.models:
                self.best(m)
        if "report" in p.stages:
            self.report()
        if problems:
            raise CompareError("final runs not completed: " + "; ".join(problems))
        _say(f"done; summary in {self.summary_path}")
        return 0


def _lock(folder: Path) -> int:
    from .rundir import check_folder

    check_folder(folder, "dir")
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another make compare is running on {folder} (or one of its jobs is)") from None
    os.set_inheritable(fd, True)  # the stages' jobs hold it too, should this process be killed
    return fd


@cli
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="make compare", description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated (default {DEFAULT_MODELS})")
    ap.add_argument("--trials", default=DEFAULT_TRIALS, help="complete trials per model, in total")
    ap.add_argument("--seeds", default=DEFAULT_SEEDS, help="seeds of the final runs")
    ap.add_argument("--proxy", default=DEFAULT_PROXY, help="the search's recipe (conf/experiment/)")
    ap.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="the final recipe (conf/experiment/)")
    ap.add_argument("--space", default=DEFAULT_SPACE, help="the search space (conf/hparams_search/)")
    ap.add_argument(
        "--dir", default=None, help="the comparison's folder (default outputs/compare/<experiment>)"
    )
    ap.add_argument("--proxy-override", action="append", help="an override for the search only (repeatable)")
    ap.add_argument("--stages", default=",".join(STAGES), help="which stages to run (default all)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every stage, e.g. model.hidden_dim=400")
    args = ap.parse_intermixed_args(argv)
    os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
    plan = Plan(args)
    plan.check_configs()
    fd = _lock(plan.dir)
    return Compare(plan, Runner(fd)).run()


if __name__ == "__main__":
    sys.exit(main())
