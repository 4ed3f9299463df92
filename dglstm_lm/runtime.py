"""What a run needs around it: the time stamp, the code version, the device and the threads, the checks
before it starts, its log file, its shapes in one line, and the record of a run that failed."""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import rundir
from .errors import ConfigError, RunDirRefused, UserError
from .parallel import cpu_cores

log = logging.getLogger("dglstm_lm.train")


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def code_version() -> str:
    """The commit of this checkout (+dirty with local changes), else the package version."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            rev = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            if rev.returncode == 0:
                return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dglstm-lm")
    except PackageNotFoundError:
        return "unknown"


def resolve_device(name: str, what: str = "trainer.device") -> torch.device:
    """The device `name` (auto: CUDA where there is one, else the CPU), or a one-line error naming `what`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}={name}: unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={name}: CUDA is not available on this machine (use auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}={name}: unknown device {name!r} (auto, cpu, cuda, cuda:N)")
    return device


def check_before_run(obj) -> None:
    """What would fail a run before its first step, checked before Hydra makes its folder (a run refused
    here leaves no `failed` folder behind to appear in every report): the output folder, $DGLSTM_MALLOC,
    $DGLSTM_WGRAD, $DGLSTM_LOSS, the device and its precision, the data folder."""
    from .data import check_source

    rundir.check_folder(obj.paths.output_dir, "paths.output_dir")
    from .models.kernels import wgrad_choice
    from .models.loss import loss_choice

    malloc_choice()
    wgrad_choice()
    loss_choice()
    device = resolve_device(obj.trainer.device)
    from .trainer import precision_context

    precision_context(device, obj.trainer.precision)  # bf16 where the device has none: refused here
    check_source(obj.data.dir)


def default_threads() -> int | None:
    """Threads for one job when trainer.threads is null: the CPUs SLURM gave the job (or this machine's
    cores), divided among the parallel jobs of a joblib sweep; otherwise torch's default."""
    parallel = max(1, int(os.environ.get("DGLSTM_PARALLEL_JOBS", "1") or 1))
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]) // parallel)
    if parallel > 1:
        return max(1, cpu_cores() // parallel)
    return None


# glibc's malloc gives memory back to the system as soon as it can: a block above an adaptive threshold (128 KiB
# at first, raised to the size of each such block freed, up to 32 MiB) is a mapping of its own, unmapped when
# freed, and free memory at the top of the heap beyond twice that threshold is trimmed. A training step frees
# and allocates the same large buffers every step (at 2 x 200 the logits, their softmax and gradient are
# 28 MB each), so each step faulted them in again page by page: 5,000-18,000 page faults per step measured
# at 2 x 200 on an AMD EPYC Zen 3, about a fifth of the step. Fixing both thresholds keeps freed memory for
# the next step, as torch's GPU caching allocator does; the process's resident memory then stays at its peak.
# Blocks above MMAP_THRESHOLD stay mappings of their own, faulted in each time (no buffer of the shipped
# recipes is: 20 x 35 x 10,000 floats is the largest).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest that every glibc accepts on 64-bit (older ones: HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = -1  # mallopt(3): -1 disables trimming
MALLOC_ENV = "DGLSTM_MALLOC"  # "system": leave the allocator as it is
# settings of the environment that decide the same thing: then the environment's choice stands
_MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_MALLOC_TUNABLES = ("mmap_threshold", "trim_threshold", "top_pad", "mmap_max")
_malloc_state: str | None = None


def malloc_choice() -> str:
    """$DGLSTM_MALLOC: keep (the default) or system; anything else is a one-line error."""
    choice = os.environ.get(MALLOC_ENV, "").strip().lower() or "keep"
    if choice not in ("keep", "system"):
        raise ConfigError(f"{MALLOC_ENV}={os.environ[MALLOC_ENV]}: expected keep or system")
    return choice


def _glibc() -> bool:
    try:
        import platform

        return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    except (OSError, ValueError):  # libc_ver() reads the interpreter's binary
        return False


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse (see above), once per process; returns what it did,
    for the run's record and bench.json. Left alone: DGLSTM_MALLOC=system; the same settings given by the
    environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_, or those
    tunables in GLIBC_TUNABLES), or another allocator in LD_PRELOAD; a C library other than glibc."""
    global _malloc_state
    if _malloc_state is not None:
        return _malloc_state
    choice = malloc_choice()
    env_set = [k for k in _MALLOC_VARS if k in os.environ]
    if any(f"glibc.malloc.{t}" in os.environ.get("GLIBC_TUNABLES", "") for t in _MALLOC_TUNABLES):
        env_set.append("GLIBC_TUNABLES")
    if "malloc" in os.environ.get("LD_PRELOAD", ""):  # jemalloc, tcmalloc, mimalloc ...
        env_set.append("LD_PRELOAD")
    if choice == "system":
        state = f"system ({MALLOC_ENV}=system)"
    elif env_set:
        state = "system (set by " + ", ".join(env_set) + ")"
    elif not _glibc():
        state = "system (not glibc)"
    else:
        try:
            import ctypes

            mallopt = ctypes.CDLL("libc.so.6").mallopt
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            ok = (
                mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            )
        except (OSError, AttributeError, ImportError):
            ok = False
        state = "keep (glibc: mmap threshold 32 MiB, no trim)" if ok else "system (glibc refused mallopt)"
    _malloc_state = state
    log.debug("malloc: %s", state)
    return state


def _file_log_handler(run_dir: Path) -> logging.Handler | None:
    """Hydra logs to <run dir>/train.log; outside Hydra (tests calling train()) add that handler ourselves."""
    target = (run_dir / rundir.LOG).resolve()
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target:
            return None
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    return handler


def model_shapes(m, vocab_size: int) -> str:
    """The model's shapes in words, for the run's first log line: e.g. `emb 200, hidden 650 × 2, vocab
    10,000, untied` (a hidden_dim that left the embedding at its own width shows here)."""
    dims = m.layer_dims
    hidden = f"{dims[0]} × {len(dims)}" if len(set(dims)) == 1 else " / ".join(map(str, dims))
    return f"emb {m.emb_dim}, hidden {hidden}, vocab {vocab_size:,}, {'tied' if m.tie_weights else 'untied'}"


def record_failure(run_dir: Path, cfg: DictConfig, exc: BaseException) -> None:
    """A job that failed before or during training still leaves a record saying why (not one refused
    because the directory holds another run: that run's record stays as it is)."""
    if isinstance(exc, RunDirRefused):
        return
    previous = rundir.read_metrics(run_dir) or {}
    if previous.get("status") in rundir.ENDED:
        return
    if isinstance(exc, KeyboardInterrupt):
        status, error = rundir.INTERRUPTED, "stopped by a second Ctrl-C (no checkpoint of the current step)"
    else:
        status = rundir.FAILED
        error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    model = OmegaConf.select(cfg, "model.name", default=None)
    previous.update(
        status=status,
        error=error,
        model=previous.get("model", model),
        name=previous.get("name", OmegaConf.select(cfg, "name", default=None)),
        seed=previous.get("seed", OmegaConf.select(cfg, "seed", default=None)),
        run_dir=str(run_dir),
        updated_at=_now(),
    )
    try:
        rundir.write_metrics(run_dir, previous)
    except OSError as write_error:  # e.g. the disk that is full holds the run directory too
        log.error("could not record the failure in %s: %s", run_dir / rundir.METRICS, write_error)
