"""`make bench`: speed and memory of every recurrent core against PyTorch's fused nn.LSTM, measured in the
same process, plus data preparation and the trainer's own overhead. Writes outputs/bench/bench.json.

Training throughput is tokens/s of a full step (embedding, core, softmax over 10,000 words, backward, SGD
update) at batch 20 × bptt 35; evaluation throughput is the forward pass and loss without gradients. The
cores and the reference are measured in alternating rounds and the median is kept, so that the ratios hold
even on a busy machine; absolute numbers vary run to run. A ratio to nn.LSTM is the median over the rounds of
the two models' times in the same round, with a distribution-free 95% confidence interval. Peak memory is the growth of the peak resident
set of a fresh process over three training steps (CPU), or torch's peak allocation (CUDA).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ArgumentParser, UserError, cli
from .runtime import keep_freed_memory, malloc_choice, resolve_device

V, B, T = 10_000, 20, 35
# "nn.LSTM (control)" is a second, identical nn.LSTM model: its ratio to the first shows the noise floor.
# "dglstm[<backend>]" is the DGLSTM with model.backend=<backend>: [cpp_mkl], [cpp_onednn] and [cpp_brgemm]
# the fused kernel with its per-step GEMM forced to MKL's packed GEMM, oneDNN's inner product or oneDNN's
# brgemm micro-kernel (plain "dglstm" runs the path the kernel chooses for this CPU and width, recorded in
# each DGLSTM row as gemm), [cpp_blas] with a plain BLAS GEMM, [python] the scan
# written with torch ops. A " bf16" suffix: the same model trained and evaluated under
# torch.autocast(bfloat16) (trainer.precision=bf16), its ratio taken to "nn.LSTM bf16";
# "dglstm[cpp_onednn] bf16" forces oneDNN's bf16 inner product, against which plain "dglstm bf16" shows the
# path chosen here (on a CPU with AMX, the brgemm micro-kernel in bfloat16). Every row's step computes its
# loss as a run does (models/loss.py: the fused CPU cross-entropy), except "nn.LSTM (torch loss)", which is
# nn.LSTM with torch's F.cross_entropy: its ratio to nn.LSTM is what the fused loss saves per step.
TORCH_LOSS = "(torch loss)"
CORES = (
    "nn.LSTM",
    "nn.LSTM (control)",
    "nn.LSTM (torch loss)",
    "rnn",
    "stacked_lstm",
    "dglstm",
    "dglstm[cpp_mkl]",
    "dglstm[cpp_onednn]",
    "dglstm[cpp_brgemm]",
    "dglstm[cpp_blas]",
    "dglstm[python]",
    "nn.LSTM bf16",
    "nn.LSTM (torch loss) bf16",
    "stacked_lstm bf16",
    "dglstm bf16",
    "dglstm[cpp_onednn] bf16",
)
BF16 = " bf16"


class _NNLSTMCore(nn.Module):
    """PyTorch's fused multi-layer nn.LSTM behind the core interface: the reference."""

    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.rnn = nn.LSTM(dim, dim, layers)
        self.output_dim = dim

    def init_state(self, batch_size, device=None, dtype=None):
        z = torch.zeros(self.rnn.num_layers, batch_size, self.output_dim, device=device, dtype=dtype)
        return (z, z.clone())

    def forward(self, x, state):
        return self.rnn(x, state)


def make_model(core: str, dim: int, layers: int, device, vocab: int = V):
    from .models import LanguageModel, build_core

    core = core.removesuffix(BF16)  # the precision is the step's (autocast), not the model's
    if core.startswith("nn.LSTM"):
        c = _NNLSTMCore(dim, layers)
    elif core.startswith("dglstm[") and core.endswith("]"):
        c = build_core("dglstm", dim, [dim] * layers, backend=core[len("dglstm[") : -1])
    else:
        c = build_core(core, dim, [dim] * layers)
    model = LanguageModel(vocab, dim, c).to(device)
    model.reset_parameters("uniform", 0.05)
    return model


def _loss_name(device) -> str:
    """What models/loss.py runs for this device's float32 logits (loss_path)."""
    from .models.loss import loss_path

    path = loss_path(torch.empty(1, 1, device=device))
    return "fused CPU cross-entropy" if path == "fused" else "F.cross_entropy"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(models: dict, device, rounds: int, steps: int, train: bool) -> dict[str, float]:
    """tokens/s per model: `rounds` rounds of `steps` steps of every model, in a new (seeded) order each round
    so that no model profits from its place; the median round counts."""
    return tokens_per_s(measure_rounds(models, device, rounds, steps, train))


def tokens_per_s(times: dict[str, list[float]]) -> dict[str, float]:
    """tokens/s per model from its seconds per step in each round: the median round's."""
    return {k: B * T / statistics.median(v) for k, v in times.items()}


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """The median of `values` and a distribution-free confidence interval for it: the order statistics
    x_(k) and x_(n+1-k) with the largest k for which P(Binomial(n, 1/2) < k) <= (1 - level) / 2, so that
    they cover the true median with probability at least `level` whatever the distribution (for 15 values
    at 95%: the 4th and the 12th). (None, None) where n is too small for one (n < 6 at 95%)."""
    xs, n = sorted(values), len(values)
    alpha, below, k = (1 - level) / 2, 0.0, 0
    while k < n and below + math.comb(n, k) / 2**n <= alpha:  # below = P(Binomial(n, 1/2) < k + 1)
        below += math.comb(n, k) / 2**n
        k += 1
    med = statistics.median(xs)
    return (med, xs[k - 1], xs[n - k]) if k >= 1 else (med, None, None)


def paired_ratio(times: dict[str, list[float]], core: str, ref: str) -> dict | None:
    """`core`'s speed relative to `ref`'s, paired by round (the two measured in the same round, under the
    same noise): the median over the rounds of ref's time / core's time, with median_ci's 95% interval."""
    if ref not in times:
        return None
    med, lo, hi = median_ci([r / c for r, c in zip(times[ref], times[core], strict=True)])
    return {"ratio": med, "ci95": None if lo is None else [lo, hi]}


def measure_rounds(models: dict, device, rounds: int, steps: int, train: bool) -> dict[str, list[float]]:
    """Seconds per step of every model in each round (see measure)."""
    from .models.loss import summed_nll

    x = torch.randint(V, (T, B), device=device)
    y = torch.randint(V, (T, B), device=device)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}

    def step(k):
        if k.endswith(BF16):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return step_fp32(k)
        return step_fp32(k)

    def nll(k, logits):
        if TORCH_LOSS in k:
            return F.cross_entropy(logits.view(-1, V), y.view(-1), reduction="sum")
        return summed_nll(logits.view(-1, V), y.view(-1))

    def step_fp32(k):
        m = models[k]
        if train:
            m.train()
            logits, _ = m(x, m.init_state(B, device))
            loss = nll(k, logits) / (B * T)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
        else:
            m.eval()
            with torch.no_grad():
                logits, _ = m(x, m.init_state(B, device))
                nll(k, logits).item()

    for k in models:  # warm-up (allocator, oneDNN primitives, extension load)
        step(k)
        step(k)
    times = {k: [] for k in models}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(models)
        rng.shuffle(order)
        for k in order:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(k)
            _sync(device)
            times[k].append((time.perf_counter() - t0) / steps)
    return times


def peak_memory_mb(core: str, dim: int, layers: int, device: str) -> float:
    """Peak memory of three training steps, in a fresh process (CPU: growth of the peak RSS)."""
    code = (
        "import sys, resource, torch; from dglstm_lm.bench import make_model, measure, _peak_rss_mb;"
        "from dglstm_lm.runtime import keep_freed_memory; keep_freed_memory();"
        f"d = torch.device('{device}'); torch.set_num_threads({torch.get_num_threads()});"
        "base = _peak_rss_mb();"
        f"m = {{{core!r}: make_model({core!r}, {dim}, {layers}, d)}};"  # the name says the precision
        "measure(m, d, 1, 1, True);"
        "print(torch.cuda.max_memory_allocated() / 2**20 if d.type == 'cuda' else _peak_rss_mb() - base)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM belongs to the address space, which exec() replaces; getrusage's
    ru_maxrss would carry the parent's peak over into a child process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_data(ptb_dir: str | None) -> dict | None:
    """Preparing PTB: cold (empty cache) and from the cache, in a fresh process, imports timed apart."""
    from .config import PTB_SHA256

    ptb_dir = ptb_dir or os.environ.get("PTB_DIR")
    if not ptb_dir:
        return None
    with tempfile.TemporaryDirectory() as root:
        code = (
            "import time, json, sys; t0 = time.perf_counter(); import datasets; from dglstm_lm.data import prepare;"
            "t1 = time.perf_counter();"
            f"c = prepare(data_dir={ptb_dir!r}, root={root!r}, sha256={PTB_SHA256!r}); t2 = time.perf_counter();"
            "print(json.dumps({'import_s': t1 - t0, 'prepare_s': t2 - t1, 'check_s': c.check_s}))"
        )
        runs = [
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, check=True
                ).stdout.splitlines()[-1]
            )
            for _ in range(3)
        ]
    return {
        "cold_s": runs[0]["prepare_s"],
        "cached_s": min(r["prepare_s"] for r in runs[1:]),
        # of which: checking the cache against its manifest (files, counts, digests, id range)
        "check_s": min(r["check_s"] for r in runs[1:]),
        "import_s": runs[1]["import_s"],
    }


def bench_trainer(ptb_dir: str | None, model: str, steps: int, device) -> dict | None:
    """The trainer's loop on real PTB against the bare step on the same batches, in the same process; and the
    loop with logger.layer_grad_norms off, which prices the per-layer gradient norms (on by default)."""
    from .config import compose, validate
    from .data import make_batches, prepare_from_config
    from .models import build_model
    from .models.loss import summed_nll
    from .tracking import Tracker
    from .trainer import StopSignals, Trainer

    ptb_dir = ptb_dir or os.environ.get("PTB_DIR")
    if not ptb_dir:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = validate(
            compose(
                [
                    f"model={model}",
                    f"data.dir={ptb_dir}",
                    f"paths.data_dir={tmp}",
                    "trainer.max_epochs=1",
                    f"trainer.limit_train_batches={steps}",
                    "trainer.limit_eval_batches=1",
                    "trainer.progress=off",
                    "logger=none",
                ]
            )
        )
        corpus = prepare_from_config(cfg.data)
        no_norms = copy.deepcopy(cfg)
        no_norms.logger.layer_grad_norms = False
        results = {}
        for rnd in range(3):
            for key, c in (("trainer", cfg), ("trainer_no_layer_norms", no_norms)):
                torch.manual_seed(0)
                m = build_model(len(corpus.vocab), c.model).to(device)
                trainer = Trainer(m, corpus, c, Path(tmp) / f"run{rnd}{key}", device, Tracker(), {}, model, 0)
                with StopSignals() as stop:
                    for record in trainer.fit(stop):
                        results.setdefault(key, []).append(record["train/tokens_per_s"])
            # the bare step on the same windows
            torch.manual_seed(0)
            m = build_model(len(corpus.vocab), cfg.model).to(device)
            opt = torch.optim.SGD(m.parameters(), lr=cfg.trainer.lr)
            batches = make_batches(
                corpus, "train", "stream", cfg.trainer.batch_size, cfg.trainer.bptt, shuffle=False
            )
            state = m.init_state(cfg.trainer.batch_size, device)
            ntok = 0
            _sync(device)
            t0 = time.perf_counter()
            for i in range(steps):
                x, y = (t.to(device) for t in batches[i])
                logits, state = m(x, [tuple(s.detach() for s in layer) for layer in state])
                loss = summed_nll(logits.view(-1, V), y.view(-1)) / y.size(1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
                opt.step()
                ntok += y.numel()
            _sync(device)
            results.setdefault("bare", []).append(ntok / (time.perf_counter() - t0))
    trainer_tps, bare_tps = statistics.median(results["trainer"]), statistics.median(results["bare"])
    off_tps = statistics.median(results["trainer_no_layer_norms"])
    return {
        "model": model,
        "bptt": cfg.trainer.bptt,
        "batch": cfg.trainer.batch_size,
        "trainer_tokens_per_s": trainer_tps,
        "bare_tokens_per_s": bare_tps,
        "ratio": trainer_tps / bare_tps,
        "trainer_no_layer_norms_tokens_per_s": off_tps,
        "layer_norms_ratio": trainer_tps / off_tps,  # 1 - this: what the per-layer norms cost a step
    }


# Settings that make torch, oneDNN and MKL use a smaller instruction set than the CPU has (to measure an AVX2
# machine on an AVX-512 one): recorded with every benchmark, so that an emulated figure says it is one.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def instruction_set() -> dict:
    """What the CPU has (its flags), what torch's kernels use (ATen's capability), and what was asked for."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    has = [f for f in _FLAGS if f in flags]
    cpu_isa = (
        "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE" if flags else "unknown"
    )
    try:
        aten = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        aten = "unknown"
    asked = {v: os.environ[v] for v in ISA_VARIABLES if os.environ.get(v)}
    from .models.kernels import cpp_extension, cpu_vendor

    ext = cpp_extension()  # built now if it is not (what the DGLSTM rows of the bench will run)
    return {
        "cpu_isa": cpu_isa,
        "cpu_vendor": cpu_vendor(),
        "cpu_flags": has,
        "aten_capability": aten,
        "isa_limits": asked,
        # the fused DGLSTM kernel: its elementwise rows' instruction set, and the per-step GEMM that
        # model.backend=cpp (auto) runs with here, in float32 and under autocast bf16
        "fused_rows": ext.row_isa() if ext is not None else "unavailable",
        "fused_gemm": _gemm_choice(None) if ext is not None else "unavailable",
        "fused_gemm_bf16": _gemm_choice(torch.bfloat16) if ext is not None else "unavailable",
        # where the layers' float32 weight gradients run ($DGLSTM_WGRAD, else chosen per CPU and width)
        "fused_wgrad": _wgrad_choice() if ext is not None else "unavailable",
    }


def _gemm_choice(low) -> str:
    """The per-step GEMM model.backend=cpp runs with here, in words: e.g. "oneDNN brgemm up to 512 units,
    oneDNN above" (the choice depends on the layer's width on some CPUs)."""
    from .models.kernels import GEMM_NAMES, brgemm_limit, gemm_path

    limit = brgemm_limit(low)
    narrow = GEMM_NAMES[gemm_path(torch.float32, low=low, hidden=limit)]
    wide = GEMM_NAMES[gemm_path(torch.float32, low=low)]
    return wide if narrow == wide else f"{narrow} up to {limit} units, {wide} above"


def wgrad_name(step_path: str) -> str:
    """The library of the float32 weight gradients of a layer whose per-step GEMM is `step_path`, in words."""
    from .models.kernels import wgrad_path

    return {"onednn": "oneDNN", "blas": "BLAS"}[wgrad_path(step_path)]


def _wgrad_choice() -> str:
    """wgrad_name for model.backend=cpp here, e.g. "BLAS up to 512 units, oneDNN above"."""
    from .models.kernels import WGRAD_ENV, brgemm_limit, gemm_path

    limit = brgemm_limit(None)
    narrow, wide = wgrad_name(gemm_path(hidden=limit)), wgrad_name(gemm_path())
    said = wide if narrow == wide else f"{narrow} up to {limit} units, {wide} above"
    return said + (f" ({WGRAD_ENV}={os.environ[WGRAD_ENV]})" if os.environ.get(WGRAD_ENV) else "")


def row_gemm(core: str, hidden: int) -> str | None:
    """The per-step GEMM a DGLSTM row of the bench ran with (None for the other cores)."""
    from .models.kernels import GEMM_NAMES, cpp_extension, gemm_path

    name = core.removesuffix(BF16)
    if not name.startswith("dglstm") or name == "dglstm[python]" or cpp_extension() is None:
        return None
    backend = name[len("dglstm[") : -1] if name.endswith("]") else "cpp"
    low = torch.bfloat16 if core.endswith(BF16) else None
    return GEMM_NAMES[gemm_path(torch.float32, backend, low, hidden)]


def row_wgrad(core: str, hidden: int) -> str:
    """The library a float32 DGLSTM row's weight gradients ran on (see wgrad_name)."""
    from .models.kernels import gemm_path

    backend = core[len("dglstm[") : -1] if core.endswith("]") else "cpp"
    return wgrad_name(gemm_path(torch.float32, backend, None, hidden))


def describe_isa(info: dict) -> str:
    limits = ", ".join(f"{k}={v}" for k, v in info.get("isa_limits", {}).items())
    fused = f", fused DGLSTM rows {info['fused_rows']}" if "fused_rows" in info else ""
    if "fused_gemm" in info:
        fused += f", GEMM {info['fused_gemm']} (bf16: {info.get('fused_gemm_bf16', '?')})"
    if "fused_wgrad" in info:
        fused += f", weight gradients {info['fused_wgrad']}"
    return f"{info['cpu_isa']} CPU, torch kernels {info['aten_capability']}{fused}" + (
        f" (emulated: {limits})" if limits else ""
    )


CONTROL_TOLERANCE = 0.05  # the control row's ratio beyond 1 ± this: the machine was not quiet


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


LOAD_TAU_S = 60.0  # Linux's one-minute load average is an exponential average with this time constant
LOAD_TOO_EARLY_S = 30.0


def load_while_measuring(start: float | None, readings: list) -> list[float]:
    """The load of the time since the start, from each reading [seconds since the start, one-minute load
    average]. Linux's average is exponential, so a reading t s in still holds e^(-t/60) of the load before
    the start (a job paused just then, say); that share is taken out: (L_t - L_0 e^(-t/60)) / (1 - e^(-t/60)).
    Readings under 30 s in are left out (the division magnifies their noise); without a start reading, a
    reading counts as it is."""
    out = []
    for t, load in readings:
        if load is None or t < LOAD_TOO_EARLY_S:
            continue
        w = math.exp(-t / LOAD_TAU_S)
        out.append(load if start is None else (load - start * w) / (1 - w))
    return out


def quiet_machine_warnings(records: list[dict], loads: list[float], cores: int) -> list[str]:
    """What says the ratios may be noise: a load above the cores while measuring (other work shared them;
    our own threads are at most the cores; see load_while_measuring), or a control row (nn.LSTM against an
    identical nn.LSTM) off 1.0x."""
    out = []
    loads = [x for x in loads if x is not None]
    if loads and max(loads) > cores + 0.75:
        out.append(
            f"load average {max(loads):.1f} on {cores} cores: other work shared the CPU, so these ratios are "
            "not a measurement (stop it, or pause it with SIGSTOP, and measure again)"
        )
    for r in records:
        if r["core"] != "nn.LSTM (control)":
            continue
        for what in ("train", "eval"):
            ratio = r.get(f"{what}_ratio_to_nn_lstm")
            if ratio is not None and abs(ratio - 1) > CONTROL_TOLERANCE:
                out.append(
                    f"the control row ({r['layers']} x {r['hidden']} {what}) is at {ratio:.2f}x where it should be "
                    f"1.00x: the noise of this run is at least {abs(ratio - 1):.0%}"
                )
    return out


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        **instruction_set(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "malloc": keep_freed_memory(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _rows(cores, models, dim, args, device, train_times, eval_times) -> list[dict]:
    """One size's records (each core against nn.LSTM of its precision; bf16 also against fp32), printed. A
    ratio is paired by round (paired_ratio), with its 95% interval."""
    from .models import count_parameters

    records = []
    train_tps, eval_tps = tokens_per_s(train_times), tokens_per_s(eval_times)
    for c in cores:
        # each row's ratio to nn.LSTM in the same precision; bf16 rows also to nn.LSTM in float32
        bf16 = c.endswith(BF16)
        ref = "nn.LSTM bf16" if bf16 else "nn.LSTM"
        rec = {
            "core": c,
            "precision": "bf16" if bf16 else "fp32",
            "layers": args.layers,
            "hidden": dim,
            "params": count_parameters(models[c]),
            "train_tokens_per_s": train_tps[c],
            "eval_tokens_per_s": eval_tps[c],
            "peak_memory_mb": peak_memory_mb(c, dim, args.layers, args.device),
            "device": str(device),
            "threads": args.threads,
        }
        for what, times in (("train", train_times), ("eval", eval_times)):
            refs = [(ref, "")] + ([("nn.LSTM", "_fp32")] if bf16 else [])
            for r, suffix in refs:
                paired = paired_ratio(times, c, r)
                rec[f"{what}_ratio_to_nn_lstm{suffix}"] = paired and paired["ratio"]
                rec[f"{what}_ratio_to_nn_lstm{suffix}_ci95"] = paired and paired["ci95"]
        if device.type == "cpu" and row_gemm(c, dim) is not None:
            rec["gemm"] = row_gemm(c, dim)
            if not bf16:  # (under autocast the projections' weight gradients are autocast's bf16 GEMMs)
                rec["wgrad"] = row_wgrad(c, dim)
        records.append(rec)

        def fmt(r, ci=None):
            return "  -  " if r is None else f"{r:.2f}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

        extra = (
            f"  vs nn.LSTM fp32: train {fmt(rec['train_ratio_to_nn_lstm_fp32'], rec['train_ratio_to_nn_lstm_fp32_ci95'])}"
            f" eval {fmt(rec['eval_ratio_to_nn_lstm_fp32'], rec['eval_ratio_to_nn_lstm_fp32_ci95'])}"
            if bf16
            else ""
        )
        print(
            f"{args.layers}x{dim:<5} {c:<26} {rec['params']:>11,} params  train {rec['train_tokens_per_s']:>8,.0f} tok/s"
            f" ({fmt(rec['train_ratio_to_nn_lstm'], rec['train_ratio_to_nn_lstm_ci95'])})"
            f"  eval {rec['eval_tokens_per_s']:>8,.0f} tok/s"
            f" ({fmt(rec['eval_ratio_to_nn_lstm'], rec['eval_ratio_to_nn_lstm_ci95'])})  peak {rec['peak_memory_mb']:,.0f} MB{extra}",
            flush=True,
        )
    return records


def _whole(text: str, flag: str) -> list[int]:
    """Comma-separated whole numbers ≥ 1 (--sizes), else a one-line error naming the flag."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{flag} {text}: expected whole numbers ≥ 1, comma-separated")
    return values


@cli
def _check_before(args, out: Path) -> None:
    """What would fail the bench, in one line before anything is measured or made: the sizes, layers,
    threads, rounds, device, cores and PTB folder, $DGLSTM_MALLOC, $DGLSTM_WGRAD, and (before minutes of
    measuring) a full disk or a read-only folder; the output folder is not made here."""
    from .models.kernels import wgrad_choice
    from .rundir import check_writable

    args.sizes = _whole(args.sizes, "--sizes")
    for flag, value in (("--layers", args.layers), ("--threads", args.threads), ("--rounds", args.rounds)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected a whole number ≥ 1")
    args.device = str(resolve_device(args.device, "--device"))  # auto: CUDA where there is one, else the CPU
    unknown = [c for c in args.cores.split(",") if c and c not in CORES]
    if unknown or not [c for c in args.cores.split(",") if c]:
        raise UserError(
            f"--cores {args.cores}: unknown {', '.join(unknown) or 'none given'} (available: {', '.join(CORES)})"
        )
    ptb = args.ptb_dir or os.environ.get("PTB_DIR")
    if ptb and not Path(ptb).is_dir():
        source = "--ptb-dir" if args.ptb_dir else "PTB_DIR"
        raise UserError(f"{source}={ptb}: not a folder")
    malloc_choice()
    wgrad_choice()
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file")
    try:  # the nearest folder that exists: room and write access, nothing made
        check_writable(existing)
    except UserError as exc:  # named as the folder asked for
        raise type(exc)(
            str(exc).replace(f"could not write {existing}", f"could not write {out}", 1)
        ) from None


def main(argv=None) -> int:  # long on purpose: the options, then each measurement in the order of the table
    p = ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="200,650", help="hidden sizes (= embedding sizes), comma-separated")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (CUDA where there is one)")
    p.add_argument(
        "--rounds",
        type=int,
        default=15,
        help="alternating rounds: a row's tokens/s is its median round's, its ratio to nn.LSTM the median of the "
        "rounds' ratios (with a 95%% interval from 6 rounds on)",
    )
    p.add_argument("--cores", default=",".join(CORES))
    p.add_argument("--quick", action="store_true", help="one short round of everything (to check the script)")
    p.add_argument("--ptb-dir", default=None)
    p.add_argument("--out", default="outputs/bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    _check_before(args, out)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as a run does (runtime.py): the steps measured are the steps a run takes
    device = torch.device(args.device)
    rounds = 1 if args.quick else args.rounds
    cores = [c for c in args.cores.split(",") if c]
    if device.type == "cuda":  # on CUDA the python scan is the DGLSTM's; the fused C++ kernel is CPU-only
        cores = [c for c in cores if not c.startswith("dglstm[")] + ["dglstm[python]"]
    info = machine()
    left_out = []
    if device.type == "cpu" and any(c.endswith(BF16) for c in cores):
        from .trainer import cpu_bf16_supported

        if not cpu_bf16_supported():  # nn.LSTM cannot run under autocast bf16 here: no bf16 rows to compare
            cores = [c for c in cores if not c.endswith(BF16)]
            left_out.append(
                "the bf16 rows: this CPU has no bfloat16 support in oneDNN (AVX-512 or AMX needed)"
            )
    load_start, t_start, load_readings = _load(), time.monotonic(), []
    print(
        f"machine: {info['cpu']} ({describe_isa(info)}), {info['threads']} threads, torch {info['torch']}"
        + (f", {info['gpu']}" if "gpu" in info else "")
    )
    records = []
    for dim in args.sizes:
        models = {c: make_model(c, dim, args.layers, device) for c in cores}
        steps = (
            1 if args.quick else max(1, round(2 * 200 / dim))
        )  # short rounds: all cores see the same noise
        train_times = measure_rounds(models, device, rounds, steps, train=True)
        eval_times = measure_rounds(models, device, rounds, steps * 3, train=False)
        load_readings.append([round(time.monotonic() - t_start, 1), _load()])  # the rounds just measured
        records += _rows(cores, models, dim, args, device, train_times, eval_times)
        del models
    data = None if args.quick else bench_data(args.ptb_dir)
    if data:
        print(
            f"data: PTB prepared in {data['cold_s']:.2f} s cold, {data['cached_s']:.2f} s from the cache "
            f"(of which {data['check_s']:.3f} s checking it; imports {data['import_s']:.2f} s)"
        )
    trainer = bench_trainer(args.ptb_dir, "dglstm", 20 if args.quick else 150, device)
    if trainer:
        print(
            f"trainer: {trainer['model']} bptt {trainer['bptt']}: {trainer['trainer_tokens_per_s']:,.0f} tok/s in the trainer's loop,"
            f" {trainer['bare_tokens_per_s']:,.0f} bare ({trainer['ratio']:.3f}x);"
            f" per-layer gradient norms on / off {trainer['layer_norms_ratio']:.3f}x"
        )
    out.mkdir(parents=True, exist_ok=True)
    from .checkpoint import atomic_write_bytes

    load_readings.append([round(time.monotonic() - t_start, 1), _load()])
    while_measuring = load_while_measuring(load_start, load_readings)
    warnings_ = quiet_machine_warnings(records, while_measuring, os.cpu_count() or 1)
    for w in warnings_:
        print(f"warning: {w}", flush=True)
    for what in left_out:
        print(f"left out: {what}", flush=True)
    payload = {
        "machine": info,
        # the 1-minute load average at the start and [seconds since, value] after each size's rounds and at
        # the end, the load while measuring drawn from them (load_while_measuring; this process's own threads
        # count too: up to `threads` on an idle machine), and what it and the control rows say about the noise
        "load_average": {"start": load_start, "readings": load_readings, "while_measuring": while_measuring},
        "warnings": warnings_,
        "left_out": left_out,  # rows this machine cannot run, and why
        "batch": B,
        "bptt": T,
        "vocab": V,
        "records": records,
        "loss": _loss_name(device),  # the loss every row but the "(torch loss)" ones computes
        "data": data,
        "trainer": trainer,
    }
    atomic_write_bytes(out / "bench.json", (json.dumps(payload, indent=2) + "\n").encode())
    print(f"wrote {out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
