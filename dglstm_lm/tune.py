"""Optuna for `make compare` and `make search`: the search space, the studies, the trial jobs, and the
expected best score as a function of the tuning budget.

The driver (compare.py) asks the study for a batch of trials (`study.ask` with the space's distributions, so
the parameters are drawn and stored before any job starts) and launches them as one Hydra multirun
(`tune.trial=<n1>,<n2>,...`, through whichever launcher is configured: joblib here, submitit on SLURM). Each
job (`trial_job`) reads its parameters back from the study, trains with them, reports its validation
perplexity after every epoch, stops when the study's pruner says so (the run's record says `pruned`), and tells
the study its result. The study lives in a journal file (Optuna's JournalStorage) that processes and nodes on a
shared filesystem can append to at the same time.

A space is a YAML file in conf/space/: `params` (config key → distribution), `sampler`, `pruner`, `metric`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ArgumentParser, ConfigError

SPACE_DIR = Path(__file__).resolve().parent.parent / "conf" / "space"


# ------------------------------------------------------------------------------------------------- space
@dataclass
class Space:
    name: str
    params: dict  # key -> {low, high, log} | {choices}
    sampler: dict
    pruner: dict
    metric: str

    @classmethod
    def load(cls, name: str) -> Space:
        """A space of conf/space/ by name, or a YAML file by path."""
        path = Path(name) if name.endswith((".yaml", ".yml")) else SPACE_DIR / f"{name}.yaml"
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in SPACE_DIR.glob("*.yaml")))
            raise ConfigError(f"unknown space {name!r} (available: {available})")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not YAML ({str(exc).splitlines()[0]})") from None
        params = spec.get("params") or {}
        if not params:
            raise ConfigError(f"{path}: params is empty")
        space = cls(
            name,
            dict(params),
            dict(spec.get("sampler") or {}),
            dict(spec.get("pruner") or {}),
            str(spec.get("metric", "val/ppl")),
        )
        space.distributions()  # every entry is a distribution, or a one-line error
        return space

    def distributions(self) -> dict:
        from optuna.distributions import CategoricalDistribution, FloatDistribution

        out = {}
        for key, d in self.params.items():
            d = dict(d or {})
            try:
                if "choices" in d:
                    out[key] = CategoricalDistribution(list(d["choices"]))
                else:
                    out[key] = FloatDistribution(float(d["low"]), float(d["high"]), log=bool(d.get("log")))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(
                    f"space {self.name}: {key}: expected {{low, high[, log]}} or {{choices}} ({exc})"
                ) from None
        return out

    def as_dict(self) -> dict:
        return {"params": self.params, "sampler": self.sampler, "pruner": self.pruner, "metric": self.metric}


def make_sampler(spec: dict, seed: int):
    """TPE (the default), seeded; `constant_liar` so that trials asked while others run spread out."""
    import optuna

    spec = dict(spec)
    kind = spec.pop("name", "tpe")
    spec.pop("seed", None)
    if kind == "tpe":
        spec.setdefault("constant_liar", True)
        return optuna.samplers.TPESampler(seed=seed, **spec)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"unknown sampler {kind!r} (tpe, random)")


def make_pruner(spec: dict):
    """median (the default) | successive_halving | hyperband | none; the other keys are the pruner's own."""
    import optuna

    spec = dict(spec)
    kind = spec.pop("name", "median")
    try:
        if kind == "median":
            return optuna.pruners.MedianPruner(**spec)
        if kind == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**spec)
        if kind == "hyperband":
            return optuna.pruners.HyperbandPruner(**spec)
        if kind == "none":
            return optuna.pruners.NopPruner()
    except TypeError as exc:
        raise ConfigError(f"pruner {kind}: {exc}") from None
    raise ConfigError(f"unknown pruner {kind!r} (median, successive_halving, hyperband, none)")


# ----------------------------------------------------------------------------------------------- studies
def storage(path: str | Path):
    """The journal storage in `path` (created with its folder): an append-only log with a file lock, safe for
    several processes, and for several nodes on a shared filesystem (JournalFileOpenLock: no symlinks)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(
        JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    )


def open_study(path: str | Path, name: str, space: Space, seed: int = 0, create: bool = True):
    import optuna

    if not create and not Path(path).exists():
        return None
    st, sampler, pruner = storage(path), make_sampler(space.sampler, seed), make_pruner(space.pruner)
    try:  # a study the journal holds is loaded: create_study would append another creation to the journal
        return optuna.load_study(study_name=name, storage=st, sampler=sampler, pruner=pruner)
    except KeyError:  # not there yet (load_if_exists: another process may create it meanwhile)
        return optuna.create_study(
            study_name=name,
            storage=st,
            direction="minimize",
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )


def trials_by_state(study) -> dict[str, list]:
    from optuna.trial import TrialState

    out = {"complete": [], "pruned": [], "failed": [], "running": [], "waiting": []}
    names = {
        TrialState.COMPLETE: "complete",
        TrialState.PRUNED: "pruned",
        TrialState.FAIL: "failed",
        TrialState.RUNNING: "running",
        TrialState.WAITING: "waiting",
    }
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        out[names[t.state]].append(t)
    return out


def finished(study) -> list:
    """The trials that count against the budget, in order: complete or pruned (a failed one is re-drawn)."""
    s = trials_by_state(study)
    return sorted(s["complete"] + s["pruned"], key=lambda t: t.number)


def trial_score(t) -> float | None:
    """A finished trial's score: its value (a pruned trial's is its last reported perplexity, its best
    being no lower than that region's); None when not finite (diverged)."""
    v = t.value
    if v is None and t.intermediate_values:
        v = min(t.intermediate_values.values())
    return v if v is not None and math.isfinite(v) else None


# ------------------------------------------------------------------------------------------ a trial's job
def override_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    return str(v)


class TrialJob:
    """The tuning side of one training job: its trial's parameters applied to the config, its pruner asked
    after each epoch, its result told to the study."""

    def __init__(self, cfg):
        import optuna
        from omegaconf import OmegaConf, open_dict

        t = cfg.tune
        if not t.storage or not t.study:
            raise ConfigError("tune.trial is set: tune.storage and tune.study must be set too")
        if not Path(t.storage).is_file():
            raise ConfigError(f"tune.storage={t.storage}: no study there")
        self.storage = storage(t.storage)
        spec = None
        try:
            study = optuna.load_study(study_name=t.study, storage=self.storage)
            spec = study.user_attrs.get("space")
        except KeyError:
            raise ConfigError(f"tune.study={t.study}: no such study in {t.storage}") from None
        self.study = optuna.load_study(
            study_name=t.study, storage=self.storage, pruner=make_pruner((spec or {}).get("pruner", {}))
        )
        try:
            self.trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.study._study_id, t.trial
            )
        except KeyError:
            raise ConfigError(f"tune.trial={t.trial}: no such trial in study {t.study}") from None
        frozen = self.storage.get_trial(self.trial_id)
        self.number = t.trial
        self.params = dict(frozen.params)
        self.overrides = [f"{k}={override_value(v)}" for k, v in self.params.items()]
        with open_dict(cfg):
            for key, value in self.params.items():
                OmegaConf.update(cfg, key, value, merge=False)
        self.cfg = cfg
        self.max_epochs = int(cfg.trainer.max_epochs)
        # tune.complete: the parameters only (a pruned trial run to the end): the study is read, never written
        self.complete = bool(t.get("complete", False))
        self.trial = None if self.complete else optuna.trial.Trial(self.study, self.trial_id)
        self.metric = (spec or {}).get("metric", "val/ppl")

    def catch_up(self, history: list[dict]) -> None:
        """Report the epochs of a resumed trial's history that its study has not seen (a job killed between
        an epoch's checkpoint and its report)."""
        if self.complete:
            return
        seen = self.storage.get_trial(self.trial_id).intermediate_values
        for record in history:
            value, epoch = record.get(self.metric), record.get("epoch")
            if isinstance(epoch, int) and epoch not in seen and value is not None and math.isfinite(value):
                self.trial.report(float(value), epoch)

    def on_epoch(self, record: dict) -> None:
        from .trainer import Pruned

        value = record.get(self.metric)
        if self.complete or value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), int(record["epoch"]))
        # after the last epoch a prune saves nothing and loses the trial's score (it would count as pruned,
        # and complete_pruned=1 would train it again from the start): the trial completes
        if int(record["epoch"]) < self.max_epochs and self.trial.should_prune():
            raise Pruned(
                f"trial {self.number}: {self.metric} {value:.2f} after epoch {record['epoch']} is worse than "
                "the pruner's threshold"
            )

    def _state(self):
        from optuna.trial import TrialState

        # a completion run tells nothing: as if its trial were finished already
        return TrialState.COMPLETE if self.complete else self.storage.get_trial(self.trial_id).state

    def tell(self, metrics: dict) -> None:
        from optuna.trial import TrialState

        if self._state() != TrialState.RUNNING:
            return  # told already (a re-run of a finished job)
        if metrics.get("status") == "pruned":
            self.study.tell(self.number, state=TrialState.PRUNED)
        else:
            v = metrics.get(self.metric)
            self.study.tell(self.number, float(v) if v is not None and math.isfinite(v) else math.inf)

    def diverged(self) -> None:
        from optuna.trial import TrialState

        if self._state() == TrialState.RUNNING:
            self.study.tell(self.number, math.inf)  # a point of the space all the same: a bad one

    def failed(self) -> None:
        from optuna.trial import TrialState

        if self._state() == TrialState.RUNNING:
            self.study.tell(self.number, state=TrialState.FAIL)


# --------------------------------------------------------------------------- expected best vs the budget
def expected_best(values: list[float], n: int) -> float:
    """E[min of n trials drawn without replacement from the N observed] (Tang et al. 2020; the curve of Dodge
    et al. 2019): sum_i v_(i) · C(N−i, n−1) / C(N, n) over the values sorted ascending (i = 1…N)."""
    v = sorted(values)
    big_n = len(v)
    if not 1 <= n <= big_n:
        raise ValueError(f"n={n} outside 1..{big_n}")
    total = math.comb(big_n, n)
    return sum(x * math.comb(big_n - i, n - 1) for i, x in enumerate(v, 1)) / total


def expected_best_curve(values: list[float], boot: int = 1000, seed: int = 0) -> list[dict]:
    """n = 1…N: the estimate and a 95% bootstrap band (the trials resampled with replacement)."""
    rng = random.Random(seed)
    n_all = len(values)
    rows = []
    samples = [[rng.choice(values) for _ in values] for _ in range(boot)] if n_all > 1 else []
    for n in range(1, n_all + 1):
        est = expected_best(values, n)
        bs = sorted(expected_best(s, n) for s in samples)
        lo = bs[int(0.025 * (len(bs) - 1))] if bs else est
        hi = bs[int(math.ceil(0.975 * (len(bs) - 1)))] if bs else est
        rows.append({"n": n, "expected_best": est, "lo": lo, "hi": hi})
    return rows


# ------------------------------------------------------------------------------- pruners, replayed
PRUNERS = {
    "median": {"name": "median", "n_startup_trials": 4, "n_warmup_steps": 2},
    "successive_halving": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 3},
    "hyperband": {"name": "hyperband", "min_resource": 1, "max_resource": 8, "reduction_factor": 3},
}


def replay_pruners(curves: list[list[float]], pruners: dict | None = None) -> dict:
    """Each pruner replayed on learning curves that ran to the end (validation perplexity per epoch, in the
    order the trials ran): the epochs it would have trained, and whether it would have stopped the trial with
    the best final perplexity. A measurement on the project's own curves, not a simulation of the sampler."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = min(range(len(curves)), key=lambda i: min(curves[i]))
    out = {}
    for name, spec in (pruners or PRUNERS).items():
        study = optuna.create_study(pruner=make_pruner(spec), sampler=optuna.samplers.RandomSampler(seed=0))
        epochs, pruned = 0, []
        for i, curve in enumerate(curves):
            trial = study.ask()
            for epoch, v in enumerate(curve, 1):
                epochs += 1
                trial.report(v, epoch)
                if epoch < len(curve) and trial.should_prune():  # as TrialJob.on_epoch: never after the last
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    pruned.append(i)
                    break
            else:
                study.tell(trial, min(curve))
        full = sum(len(c) for c in curves)
        out[name] = {
            "epochs": epochs,
            "epochs_unpruned": full,
            "saved": 1 - epochs / full if full else 0.0,
            "pruned_trials": pruned,
            "best_pruned": best in pruned,
        }
    return out


def _curves(search_dir: Path) -> dict[str, list[list[float]]]:
    """Per model (a study each, as in the search), the validation curves of its trials that were not pruned
    (completed: every epoch, or until early stopping), in trial order."""
    from . import rundir

    out = {}
    for model_dir in sorted(p for p in search_dir.iterdir() if p.is_dir()) if search_dir.is_dir() else []:
        rows = []
        for run in model_dir.glob("trial=*"):
            m = rundir.read_metrics(run) or {}
            hist = rundir.read_history(run)
            if m.get("status") == "completed" and hist:
                rows.append((int(run.name.split("=", 1)[1]), [h["val/ppl"] for h in hist]))
        out[model_dir.name] = [c for _, c in sorted(rows)]
    return out


def main(argv=None) -> int:
    """`python -m dglstm_lm.tune <compare dir>`: the pruners replayed on its trials that ran to the end."""
    import json

    ap = ArgumentParser(prog="python -m dglstm_lm.tune", description=main.__doc__)
    ap.add_argument("dir", help="a make compare folder (its search/<model>/trial=<n>/ runs)")
    args = ap.parse_args(argv)
    curves = {m: c for m, c in _curves(Path(args.dir) / "search").items() if len(c) >= 3}
    if not curves:
        print(f"error: {args.dir}: no model has 3 trials that ran to the end; the replay needs them")
        return 2
    out = {m: {"trials": len(c), "pruners": replay_pruners(c)} for m, c in curves.items()}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
