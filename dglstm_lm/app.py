"""The command-line application around Hydra (`python -m dglstm_lm.train`, `make train`, `make sweep`): the
checks before Hydra starts (preflight: composition, resume overrides; claim_output: the run's folder, its
lock), the job environment of a sweep, Hydra's `.hydra/` writes made atomic and lock-aware, the task each
job runs (a tuning trial's included), and `main`'s exit status."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from . import checkpoint as ckpt
from . import rundir
from .config import compose, resolved_container, validate
from .errors import (
    CheckpointError,
    ConfigError,
    RunDirRefused,
    UserError,
    find_write_error,
    output_error,
    report_and_exit,
    write_error_reason,
)
from .parallel import joblib_at_a_time
from .resume import check_same_run
from .runtime import check_before_run, record_failure
from .sweep import (
    _STOPPED_BY,
    _job_prefix,
    _stops_as_a_grid,
    _SweepStop,
    _worker_stop_handler,
    stops_as_a_grid,
)
from .train import DivergedError, train

log = logging.getLogger("dglstm_lm.train")


def _run_name_and_group():
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    overrides = [
        o for o in hc.overrides.task if not o.startswith(("model=", "trainer.resume", "hydra", "logger"))
    ]
    model = hc.runtime.choices.get("model", "model")
    name = " ".join([model, *overrides])
    group = None
    if hc.mode == RunMode.MULTIRUN:
        sweep = Path(hc.sweep.dir)
        group = f"sweep-{sweep.parent.name}_{sweep.name}"
    return name, group, hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return [o for o in HydraConfig.get().overrides.task if not o.startswith("trainer.resume=")]


def _hydra_task(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    name, group, multirun, run_dir = _run_name_and_group()
    prefix = f"[job {HydraConfig.get().job.num} {run_dir.name}]" if multirun else None
    if multirun and _stops_as_a_grid() and os.getpid() != int(os.environ.get("DGLSTM_SWEEP_PID", "0")):
        # a joblib worker: from now on (its next jobs, the time between them) a signal is noted, not fatal
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _worker_stop_handler)
    try:
        if multirun and _stops_as_a_grid():
            why = rundir.sweep_stopped(HydraConfig.get().sweep.dir)
            if why:  # the sweep was stopped: a job that has not started yet does not start
                print(f"{prefix} not started: the sweep was stopped ({why})", file=sys.stderr, flush=True)
                return None
        with _job_prefix(prefix) if prefix else contextlib.nullcontext():
            return _run_job(cfg, name, group, multirun, run_dir)
    finally:
        # the job is over: its directory is free again (also for a joblib worker's next job)
        rundir.release(run_dir)
        _REFUSED_DIRS.discard(str(run_dir))


def _run_job(cfg: DictConfig, name: str, group: str | None, multirun: bool, run_dir: Path):
    from .trainer import Interrupted

    trial = None  # a tuning trial of make compare (tune.trial): its parameters, pruner and result
    try:
        overrides, on_epoch = _task_overrides(), None
        if OmegaConf.select(cfg, "tune.trial") is not None:
            from .tune import TrialJob

            trial = TrialJob(cfg)
            trial.catch_up(rundir.read_history(run_dir))  # epochs a killed job recorded but did not report
            cfg, overrides, on_epoch = trial.cfg, [*overrides, *trial.overrides], trial.on_epoch
        metrics = train(cfg, run_dir, run_name=name, group=group, overrides=overrides, on_epoch=on_epoch)
        if trial is not None:
            trial.tell(metrics)
    except RunDirRefused as exc:
        # The directory is another run's: nothing goes into its log or its record.
        if not multirun:
            report_and_exit(exc)
        from hydra.core.hydra_config import HydraConfig

        rundir.mark_refused(HydraConfig.get().sweep.dir, run_dir, str(exc))  # the summary lists it as refused
        print(f"error: job refused: {exc}", file=sys.stderr, flush=True)
        return None
    except Interrupted as exc:
        signame = signal.Signals(exc.signum).name
        if multirun and _stops_as_a_grid():
            _STOPPED_BY.append(exc.signum)
            # The sweep stops: the jobs not started yet do not start, and the sweep's summary says how to
            # continue all of them (one command), so this job only says where its checkpoint is.
            from hydra.core.hydra_config import HydraConfig

            rundir.mark_sweep_stopped(HydraConfig.get().sweep.dir, f"{signame} to a job")
            log.warning("stopped by %s; checkpoint saved to %s", signame, exc.checkpoint_path)
            return None
        hint = f"make train trainer.resume={run_dir}"
        log.warning(
            "stopped by %s; checkpoint saved to %s. Resume with: %s", signame, exc.checkpoint_path, hint
        )
        if not multirun:
            print(f"stopped; checkpoint saved. Resume with:  {hint}", file=sys.stderr)
        # Our handlers are gone again: hand the signal on to the one they replaced. Under submitit that is
        # its SIGUSR2 handler (SLURM's pre-timeout signal), which requeues the job and exits.
        rundir.release(run_dir)  # before submitit's handler, which requeues the job and exits
        previous = signal.getsignal(exc.signum)
        if exc.signum == getattr(signal, "SIGUSR2", None) and callable(previous):
            hand_on(previous, exc.signum)
        sys.exit(128 + exc.signum)
    except Exception as exc:
        if trial is not None and isinstance(exc, DivergedError):
            trial.diverged()  # a point of the space all the same (a bad one)
        elif trial is not None:
            trial.failed()  # re-drawn by make compare
        record_failure(run_dir, cfg, exc)
        if not multirun:
            if isinstance(exc, UserError):
                log.error("%s", exc)
                report_and_exit(exc)
            raise
        # A failed job must not stop the sweep: it is recorded, and the sweep summary reports it.
        log.error("job failed: %s", exc, exc_info=not isinstance(exc, UserError))
        if isinstance(exc, DivergedError) and cfg.get("optimized_metric"):
            return float("inf")  # a sweeper (Optuna) learns that this region is bad
        return None
    if cfg.get("optimized_metric"):
        value = metrics.get(cfg.optimized_metric)
        return float(value) if value is not None else float("inf")
    return None


def hand_on(handler, signum: int) -> None:
    """Call the handler our own replaced (submitit's SIGUSR2 handler, which runs `scontrol requeue` and
    exits). SLURM carries out a requeue by sending SIGTERM to every process of the job, and the scontrol
    that asked for it is one of them: when the signal reaches it before it exits, the requeue has been made
    and only its messenger died (CalledProcessError, returncode -SIGTERM). Raised on, that error would be
    this incarnation's result, and the sweep would report the job failed while it runs again. Any other
    failure of the handler is raised."""
    try:
        handler(signum, None)
    except subprocess.CalledProcessError as err:
        if err.returncode != -signal.SIGTERM or "requeue" not in err.cmd:
            raise
        log.warning("scontrol requeue was ended by the SIGTERM of the requeue it asked for; exiting")


def _make_hydra_main():
    import hydra

    return hydra.main(
        config_path=str(Path(__file__).resolve().parent.parent / "conf"),
        config_name="train",
        version_base="1.3",
    )(_hydra_task)


_PASSTHROUGH_FLAGS = {
    "--help",
    "-h",
    "--hydra-help",
    "--version",
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
}


_CONFIG_FLAGS = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def _resume_overrides(parsed) -> list[str]:
    """`trainer.resume=<run>` continues that run as it was started: the overrides it last trained with
    (rundir.overrides_file: written once a run is under way, so a resume that was refused leaves no
    trace; else Hydra's copy), minus those given again now. A run made outside Hydra has none to
    offer; its checkpoint's config is still compared."""
    given = {o.key_or_group for o in parsed}
    value = next((o.value() for o in parsed if o.key_or_group == "trainer.resume"), None)
    if not value or not isinstance(value, str):
        return []
    source = rundir.overrides_file(rundir.of_checkpoint(ckpt.resolve(value)))
    if source is None:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        previous = [str(o) for o in OmegaConf.to_container(OmegaConf.load(source))]
        old = OverridesParser.create().parse_overrides(previous)
    except Exception as exc:
        raise CheckpointError(f"cannot read the overrides of the run to resume, {source}: {exc}") from None
    return [o.input_line for o in old if o.key_or_group not in given and o.key_or_group != "trainer.resume"]


def preflight(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Compose and check what Hydra is about to run. Returns argv (extended where needed) and environment
    variables for the jobs."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import to_object

    if any(a.split("=")[0] in _PASSTHROUGH_FLAGS | _CONFIG_FLAGS for a in argv):
        return argv, {}
    multirun = any(a in ("-m", "--multirun") for a in argv)
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise ConfigError(f"cannot parse overrides: {str(exc).splitlines()[0]}") from None

    if not multirun:
        inherited = _resume_overrides(parsed)
        if inherited:
            # the run's own overrides first, the ones given now after them (and taking precedence)
            argv, overrides = [*inherited, *argv], [*inherited, *overrides]
        cfg = compose(overrides)
        check_before_run(validate(cfg))
        resume = OmegaConf.select(cfg, "trainer.resume")
        if resume and not any(o.startswith("hydra.run.dir=") for o in overrides):
            path = ckpt.resolve(resume)
            if not path.exists() and not ckpt.previous_of(path).exists():
                raise CheckpointError(f"trainer.resume={resume}: no checkpoint at {path}")
            run_dir = rundir.of_checkpoint(path)
            stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
            # Continue in the original directory; keep its .hydra/ and record this invocation beside it.
            argv = [*argv, f"hydra.run.dir={run_dir}", f"hydra.output_subdir=.hydra/resume-{stamp}"]
        return argv, {}

    # Multirun: compose every value of every swept key once (not the whole grid), so that an unknown option
    # or key, or a value of the wrong type, fails before any job starts. Invalid *values* (a negative rate)
    # are left to the jobs: each job that fails is recorded and the others go on.
    fixed = [o for o in parsed if not o.is_sweep_override()]
    sweeps = []
    for o in parsed:
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # interval(...) and other sweeper syntax: the sweeper checks it
                continue
            if len(values) != len(set(values)):
                raise ConfigError(
                    f"{o.input_line}: a value appears twice (two jobs would share one directory)"
                )
            sweeps.append((o.get_key_element(), values))
    firsts = [f"{k}={v[0]}" for k, v in sweeps]
    for idx, (key, values) in enumerate(sweeps):
        for v in values:
            to_object(
                compose([o.input_line for o in fixed] + firsts[:idx] + [f"{key}={v}"] + firsts[idx + 1 :])
            )
    base = compose([o.input_line for o in fixed] + firsts, return_hydra_config=True)
    check_before_run(to_object(compose([o.input_line for o in fixed] + firsts)))
    output_dir = Path(OmegaConf.select(base, "paths.output_dir"))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)  # e.g. Optuna's sqlite
    except OSError as exc:
        raise output_error(exc, output_dir) from None

    if sweeps:
        # Name job directories after what varies: the keys given once stay out of the name
        # (outputs/multirun/<date>/<time>/model=dglstm,seed=2 rather than the whole command line).
        exclude = list(OmegaConf.select(base, "hydra.job.config.override_dirname.exclude_keys"))
        exclude += [o.key_or_group for o in fixed if o.key_or_group not in exclude]
        argv = [
            *argv,
            "hydra.job.config.override_dirname.exclude_keys=[" + ",".join(repr(k) for k in exclude) + "]",
        ]

    env = _job_environment(base, sweeps)
    if "DGLSTM_PARALLEL_JOBS" in env and not any(a.startswith("hydra.launcher.n_jobs=") for a in argv):
        # as many joblib workers as jobs run at once: no worker idles from the start, where a stop signal
        # would find Python's default handler and break the pool (it then kills the jobs still saving)
        argv = [*argv, f"hydra.launcher.n_jobs={env['DGLSTM_PARALLEL_JOBS']}"]
    return argv, env


def _job_environment(base: DictConfig, sweeps: list) -> dict[str, str]:
    """Environment variables for a sweep's jobs: joblib's workers share this machine's cores, so each job
    is told how many jobs run beside it (default_threads gives it its share)."""
    launcher = str(OmegaConf.select(base, "hydra.launcher._target_", default=""))
    sweeper = str(OmegaConf.select(base, "hydra.sweeper._target_", default=""))
    env = {"DGLSTM_LAUNCHER": launcher, "DGLSTM_SWEEPER": sweeper}
    if "joblib" in launcher.lower():
        n_jobs = int(OmegaConf.select(base, "hydra.launcher.n_jobs", default=-1) or -1)
        grid = 1
        for _, values in sweeps:
            grid *= len(values)
        env["DGLSTM_PARALLEL_JOBS"] = str(joblib_at_a_time(n_jobs, grid))
    return env


_REFUSED_DIRS: set[str] = (
    set()
)  # job directories whose .hydra/ is not written: they hold another config's run


_SAFE_PATH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./-+:@%~")


def _override_value(path: str) -> str:
    """A path as the value of a Hydra override: quoted unless it is made of plain characters only."""
    if path and set(path) <= _SAFE_PATH_CHARS:
        return path
    return "'" + path.replace("'", "\\'") + "'"


def claim_output(argv: list[str]) -> list[str]:
    """Before Hydra writes anything (it writes .hydra/ into the run directory before any of our code runs):
    resolve the run's directory (a sweep's, for --multirun), check that it can be written and has room, and
    for a single run take its lock (rundir.py) and refuse a directory that holds a run of another config.
    Returns argv with that directory pinned (`${now:}` and `${unique_dir:}` are resolved once, here)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=")[0] in _PASSTHROUGH_FLAGS | _CONFIG_FLAGS for a in argv):
        return argv
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        chosen = []
        for o in parsed:
            if not o.is_sweep_override():
                chosen.append(o.input_line)
                continue
            try:  # the directory of a sweep never depends on the swept values: any one of them will do
                chosen.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
            except Exception:
                continue
        hcfg = compose(chosen, return_hydra_config=True)
        value = OmegaConf.select(hcfg, key, throw_on_resolution_failure=True)
    except Exception as exc:
        cause = find_write_error(exc)
        if cause is not None:  # e.g. ${unique_dir:...} under a read-only or full paths.output_dir
            raise output_error(cause) from None
        return argv  # an interpolation only Hydra can resolve: the job takes its directory's lock itself
    if not value:
        return argv
    target = Path(str(value))
    if multirun:
        rundir.check_writable(target)
    else:
        rundir.check_writable(target, probe=False)  # the lock file is the probe
        rundir.check_free(target)  # a live holder first: it is what the user needs to know
        try:
            # (a tuning trial's config is complete only once its parameters are read from its study: the
            # job compares it itself)
            if (
                not OmegaConf.select(hcfg, "trainer.resume")
                and OmegaConf.select(hcfg, "trainer.auto_resume")
                and OmegaConf.select(hcfg, "tune.trial") is None
            ):
                task = hcfg.copy()
                with open_dict(task):
                    del task["hydra"]
                check_same_run(target, resolved_container(task))
        except RunDirRefused:
            raise
        except Exception:
            pass  # anything else is for train() to find and report, inside Hydra
        try:
            rundir.acquire(target, log_takeover=False)
        except OSError as exc:
            raise output_error(exc, target) from None
    given = [a for a in argv if a.split("=", 1)[0] == key]
    if given and "${" not in given[-1]:
        return argv  # as given: Hydra resolves it to the same path
    return [a for a in argv if a.split("=", 1)[0] != key] + [f"{key}={_override_value(str(target))}"]


def _patch_hydra_config_writes() -> None:
    """Hydra writes .hydra/{config,hydra,overrides}.yaml into a job's directory before the task runs: in
    place (a disk that fills up leaves them cut short) and whoever else holds the directory. Here they are
    written atomically, after taking the directory's lock; a job whose directory another run holds, or holds
    a run of another config, writes none of them (and is then refused by train()). A file that cannot be
    written is logged, not raised: the job then fails on its own first write, with one line, and the other
    jobs of a sweep go on."""
    try:
        from hydra.core import utils as hydra_utils
    except ImportError:  # pragma: no cover
        return
    original = getattr(hydra_utils, "_save_config", None)
    if original is None or getattr(original, "_dglstm_lm", False):
        return

    def _save_config(cfg, filename: str, output_dir) -> None:
        output_dir = Path(output_dir)
        try:
            from hydra.core.hydra_config import HydraConfig

            run_dir = Path(HydraConfig.get().runtime.output_dir)
        except Exception:
            run_dir = output_dir.parent
        if str(run_dir) in _REFUSED_DIRS:
            return
        try:
            rundir.check_free(run_dir)  # reads only: a refused job changes nothing in the directory
            if filename == "config.yaml":  # the job's own config, written first: is it another run's folder?
                try:
                    if (
                        not OmegaConf.select(cfg, "trainer.resume")
                        and OmegaConf.select(cfg, "trainer.auto_resume")
                        and OmegaConf.select(cfg, "tune.trial")
                        is None  # (complete only in the job: train() checks)
                    ):
                        check_same_run(run_dir, resolved_container(cfg))
                except RunDirRefused:
                    raise
                except Exception:
                    pass
            rundir.acquire(run_dir, log_takeover=False)
        except RunDirRefused:
            _REFUSED_DIRS.add(str(run_dir))  # train() refuses the job, saying why
            return
        except OSError:
            pass
        try:
            ckpt.atomic_write_bytes(output_dir / filename, OmegaConf.to_yaml(cfg).encode())
        except OSError as exc:
            log.error("could not write %s: %s", output_dir / filename, write_error_reason(exc))

    _save_config._dglstm_lm = True
    hydra_utils._save_config = _save_config


_patch_hydra_config_writes()


def main() -> None:
    from . import callbacks

    try:
        argv, env = preflight(sys.argv[1:])
        argv = claim_output(argv)
    except UserError as exc:
        report_and_exit(exc)
    sys.argv = [sys.argv[0], *argv]
    os.environ.update(env)  # inherited by joblib's workers
    multirun = any(a in ("-m", "--multirun") for a in argv)
    grid = stops_as_a_grid(env.get("DGLSTM_LAUNCHER", ""), env.get("DGLSTM_SWEEPER", ""))
    stop = _SweepStop() if multirun and grid else None
    os.environ["DGLSTM_SWEEP_PID"] = str(os.getpid())
    try:
        with stop or contextlib.nullcontext():
            _make_hydra_main()()
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, no traceback
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        rundir.release_all()
    signum = (stop.received if stop is not None else None) or next(iter(_STOPPED_BY), None)
    if signum is not None:
        sys.exit(128 + signum)
    if callbacks.FAILED_JOBS:
        sys.exit(1)
