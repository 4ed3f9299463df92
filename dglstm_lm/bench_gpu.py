"""`make bench-gpu`: the GPU measurements, in one process, within a time budget (default 8 minutes).

1. Speed and memory of the cores on CUDA, each measured in the same process as cuDNN's `nn.LSTM` of the same
   size (and a second, identical `nn.LSTM` as the noise control): the stacked LSTM (one fused cuDNN call),
   the DGLSTM with the Triton scan (eager, and with CUDA graphs) and with the PyTorch-ops scan; at 2 × 200,
   2 × 650 and 2 × 1500, batch 20 × bptt 35, vocabulary 10,000; training steps (embedding, core, softmax,
   backward, SGD update) and evaluation (forward and loss, no gradients) in tokens/s, fp32 and bf16 (autocast,
   fp32 master weights: `trainer.precision=bf16`), and the peak memory of three training steps
   (torch.cuda.max_memory_allocated above what was allocated before them).
2. End to end: `make train experiment=smoke trainer.device=cuda model=dglstm` (2 epochs), and the same stopped
   after epoch 1 and resumed on CUDA to epoch 2 (`trainer.resume=`), as subprocesses.

Writes outputs/bench/bench-gpu.json and bench-gpu.md. The models are measured in alternating rounds (a new
order each round, the median round counts). Whatever the budget leaves out is recorded as skipped. Without a
CUDA device it says so in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import rundir
from .errors import ArgumentParser, UserError, cli

V, B, T = 10_000, 20, 35
ROOT = Path(__file__).resolve().parent.parent
CORES = (
    "nn.LSTM",
    "nn.LSTM (control)",
    "stacked_lstm",
    "dglstm[triton]",
    "dglstm[triton_graph]",
    "dglstm[python]",
)
E2E_RESERVE_S = 150  # kept for the end-to-end runs
DEVICE = "cuda"  # (a CPU check of this script's logic swaps it, with torch.cuda's calls stubbed)


def make_model(core: str, dim: int, layers: int, device):
    """The same models as `make bench` builds (its nn.LSTM wrapper, the cores, a forced DGLSTM backend)."""
    from .bench import make_model as bench_model

    return bench_model(core, dim, layers, device, vocab=V)


def _step_fn(models, device, precision, train):
    from .trainer import precision_context

    x = torch.randint(V, (T, B), device=device)
    y = torch.randint(V, (T, B), device=device)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}

    def step(k):
        m = models[k]
        if train:
            m.train()
            with precision_context(device, precision):
                logits, _ = m(x, m.init_state(B, device))
                loss = F.cross_entropy(logits.view(-1, V).float(), y.view(-1))
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            opts[k].step()
        else:
            m.eval()
            with torch.no_grad(), precision_context(device, precision):
                logits, _ = m(x, m.init_state(B, device))
                F.cross_entropy(logits.view(-1, V).float(), y.view(-1))

    return step


def measure(models: dict, device, rounds: int, steps: int, train: bool, precision: str) -> dict[str, float]:
    """tokens/s per model: `rounds` rounds of `steps` steps of every model in a new (seeded) order each round;
    the median round counts."""
    step = _step_fn(models, device, precision, train)
    for k in models:  # warm-up: Triton's compilation, cuDNN's plans, the CUDA graphs' capture (2nd call)
        for _ in range(3):
            step(k)
    torch.cuda.synchronize(device)
    times = {k: [] for k in models}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(models)
        rng.shuffle(order)
        for k in order:
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(k)
            torch.cuda.synchronize(device)
            times[k].append((time.perf_counter() - t0) / steps)
    return {k: B * T / statistics.median(v) for k, v in times.items()}


def peak_memory_mb(models: dict, device, precision: str) -> dict[str, float]:
    """Peak allocation of three training steps of each model alone, above what was allocated before them."""
    step = _step_fn(models, device, precision, True)
    out = {}
    for k in models:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(3):
            step(k)
        torch.cuda.synchronize(device)
        out[k] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return out


def machine(device) -> dict:
    info = {
        "gpu": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "bf16": torch.cuda.is_bf16_supported(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _ptb_dir() -> str | None:
    for c in (
        os.environ.get("PTB_DIR"),
        ROOT / "shared" / "data" / "ptb",
        ROOT.parent / "shared" / "data" / "ptb",
        ROOT / "data" / "ptb",
    ):
        if c and (Path(c) / "ptb.train.txt").is_file():
            return str(c)
    return None


def end_to_end(out: Path, timeout_s: float) -> dict:
    """The smoke recipe on CUDA, whole; then stopped after epoch 1 and resumed to epoch 2."""
    ptb = _ptb_dir()
    if ptb is None:
        return {"skipped": "PTB not found (set PTB_DIR)"}
    base = out / "gpu-smoke"
    env = dict(os.environ, PTB_DIR=ptb, CI="true")
    common = ["experiment=smoke", "trainer.device=cuda", "model=dglstm", f"paths.output_dir={base}"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    full, part = base / f"full-{stamp}", base / f"resumed-{stamp}"
    steps = [
        ("smoke", ["make", "-s", "train", *common, f"hydra.run.dir={full}"], full),
        (
            "smoke, 1 epoch",
            ["make", "-s", "train", *common, "trainer.max_epochs=1", f"hydra.run.dir={part}"],
            part,
        ),
        (
            "resume to epoch 2",
            ["make", "-s", "train", f"trainer.resume={part}", "trainer.max_epochs=2"],
            part,
        ),
    ]
    t_end = time.monotonic() + timeout_s
    result = {"runs": []}
    for name, cmd, run_dir in steps:
        left = t_end - time.monotonic()
        if left < 20:
            result["runs"].append({"step": name, "skipped": "time budget"})
            continue
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=left)
            rc, tail = p.returncode, (p.stdout + p.stderr)[-1500:]
        except subprocess.TimeoutExpired:
            rc, tail = None, "timed out"
        rec = {"step": name, "command": " ".join(cmd), "rc": rc, "wall_s": time.monotonic() - t0}
        m = rundir.read_metrics(run_dir)
        if m is not None:
            rec.update(
                {
                    k: m.get(k)
                    for k in ("status", "val/ppl", "test/ppl", "train/tokens_per_s", "epochs_completed")
                }
            )
        if rc != 0:
            rec["output_tail"] = tail
        result["runs"].append(rec)
        print(
            f"e2e: {name}: rc {rc}, {rec['wall_s']:.0f} s, {rec.get('status')}, val ppl {rec.get('val/ppl')}",
            flush=True,
        )
    full_run, resumed = result["runs"][0], result["runs"][2]
    if full_run.get("status") == "completed" and resumed.get("status") == "completed":
        # equal on CPU to the last bit; on a GPU the sums of some kernels (embedding backward, cuBLAS) may
        # not be deterministic, so this records what happens rather than asserting it
        result["resume_equals_uninterrupted"] = {
            k: full_run[k] == resumed[k] for k in ("val/ppl", "test/ppl")
        }
    return result


def markdown(payload: dict) -> str:
    info = payload["machine"]
    lines = [
        f"# make bench-gpu: {info['gpu']} (sm {info['capability']}), torch {info['torch']}, CUDA {info['cuda']}, "
        f"cuDNN {info['cudnn']}, Triton {info['triton']}",
        "",
        f"batch {B} × bptt {T}, vocabulary {V:,}; tokens/s, median of alternating rounds; ratios to `nn.LSTM` "
        "(cuDNN) of the same size, precision and round.",
        "",
        "| layers × size | precision | core | params | train tok/s | train vs `nn.LSTM` | eval tok/s | eval vs `nn.LSTM` | peak MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in payload["records"]:
        if "skipped" in r:
            lines.append(
                f"| {r['layers']} × {r['hidden']} | {r['precision']} | (skipped: {r['skipped']}) | | | | | | |"
            )
            continue
        lines.append(
            f"| {r['layers']} × {r['hidden']} | {r['precision']} | `{r['core']}` | {r['params']:,} | "
            f"{r['train_tokens_per_s']:,.0f} | **{r['train_ratio_to_nn_lstm']:.2f}×** | {r['eval_tokens_per_s']:,.0f} | "
            f"{r['eval_ratio_to_nn_lstm']:.2f}× | {r['peak_memory_mb']:,.0f} |"
        )
    e2e = payload.get("end_to_end") or {}
    if e2e:
        lines += ["", "End to end (`make train experiment=smoke trainer.device=cuda model=dglstm`):", ""]
        if "skipped" in e2e:
            lines.append(f"- skipped: {e2e['skipped']}")
        for r in e2e.get("runs", []):
            if "skipped" in r:
                lines.append(f"- {r['step']}: skipped ({r['skipped']})")
            else:
                lines.append(
                    f"- {r['step']}: rc {r['rc']}, {r['wall_s']:.0f} s, status {r.get('status')}, "
                    f"val ppl {r.get('val/ppl')}, test ppl {r.get('test/ppl')}"
                )
        if "resume_equals_uninterrupted" in e2e:
            lines.append(f"- resumed run equals the uninterrupted one: {e2e['resume_equals_uninterrupted']}")
    lines.append(f"\nwall {payload['wall_s']:.0f} s of a {payload['budget_s']:.0f} s budget")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="make bench-gpu", description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes", default="200,650,1500", help="hidden sizes (= embedding sizes), comma-separated"
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--cores", default=",".join(CORES))
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median round counts")
    p.add_argument("--steps", type=int, default=8, help="training steps per model per round (eval: twice)")
    p.add_argument(
        "--budget-s", type=float, default=480.0, help="total wall-clock budget, end-to-end included"
    )
    p.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training runs")
    p.add_argument("--quick", action="store_true", help="one short round of everything (to check the script)")
    p.add_argument("--out", default="outputs/bench")
    return p


@cli
def main(argv=None) -> int:  # long on purpose: each measurement in the order of the table
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise UserError("make bench-gpu needs a CUDA device (torch.cuda.is_available() is False)")
    from .models import count_parameters, triton_scan
    from .rundir import check_writable

    t_start = time.monotonic()
    out = Path(args.out)
    check_writable(out)
    device = torch.device(DEVICE)
    info = machine(device)
    print(
        f"machine: {info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, "
        f"Triton {info['triton']}",
        flush=True,
    )
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    cores = [c for c in args.cores.split(",") if c]
    precisions = [x for x in args.precisions.split(",") if x]
    reserve = 0 if args.no_e2e else E2E_RESERVE_S
    records = []
    for dim in (int(s) for s in args.sizes.split(",")):
        triton_scan.reset_graphs()
        models = None
        for precision in precisions:
            if time.monotonic() - t_start > args.budget_s - reserve:
                records.append(
                    {"layers": args.layers, "hidden": dim, "precision": precision, "skipped": "time budget"}
                )
                print(f"{args.layers}x{dim} {precision}: skipped (time budget)", flush=True)
                continue
            if precision == "bf16" and not info["bf16"]:
                records.append(
                    {"layers": args.layers, "hidden": dim, "precision": precision, "skipped": "no bf16"}
                )
                continue
            if models is None:
                torch.manual_seed(0)
                models = {c: make_model(c, dim, args.layers, device) for c in cores}
            train_tps = measure(models, device, rounds, steps, True, precision)
            eval_tps = measure(models, device, rounds, steps * 2, False, precision)
            peak = peak_memory_mb(models, device, precision)
            ref_train, ref_eval = train_tps.get("nn.LSTM"), eval_tps.get("nn.LSTM")
            for c in cores:
                rec = {
                    "core": c,
                    "layers": args.layers,
                    "hidden": dim,
                    "precision": precision,
                    "params": count_parameters(models[c]),
                    "train_tokens_per_s": train_tps[c],
                    "eval_tokens_per_s": eval_tps[c],
                    "train_ratio_to_nn_lstm": train_tps[c] / ref_train if ref_train else None,
                    "eval_ratio_to_nn_lstm": eval_tps[c] / ref_eval if ref_eval else None,
                    "peak_memory_mb": peak[c],
                }
                records.append(rec)
                print(
                    f"{args.layers}x{dim:<5} {precision} {c:<21} train {rec['train_tokens_per_s']:>9,.0f} tok/s"
                    f" ({rec['train_ratio_to_nn_lstm'] or 0:.2f}x)  eval {rec['eval_tokens_per_s']:>9,.0f} tok/s"
                    f" ({rec['eval_ratio_to_nn_lstm'] or 0:.2f}x)  peak {rec['peak_memory_mb']:,.0f} MB",
                    flush=True,
                )
        del models
        torch.cuda.empty_cache()
    triton_scan.reset_graphs()
    left = args.budget_s - (time.monotonic() - t_start)
    e2e = None if args.no_e2e else end_to_end(out, max(left, 0))
    from .checkpoint import atomic_write_bytes

    payload = {
        "machine": info,
        "batch": B,
        "bptt": T,
        "vocab": V,
        "rounds": rounds,
        "steps": steps,
        "records": records,
        "end_to_end": e2e,
        "budget_s": args.budget_s,
        "wall_s": time.monotonic() - t_start,
    }
    atomic_write_bytes(out / "bench-gpu.json", (json.dumps(payload, indent=2) + "\n").encode())
    atomic_write_bytes(out / "bench-gpu.md", markdown(payload).encode())
    print(f"wrote {out / 'bench-gpu.json'} and {out / 'bench-gpu.md'} ({payload['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
