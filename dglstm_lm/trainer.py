"""The training loop: truncated BPTT (stream) or per-sentence training, evaluation, checkpoints, resume.

The loop is written so that a run stopped anywhere and resumed from a checkpoint ends with exactly the numbers
of an uninterrupted run on CPU: a checkpoint holds the position in the data (epoch, next batch), the carried
hidden state, the epoch's running sums, the optimizer and scheduler states and every RNG state, and nothing
between two checkpoints draws random numbers except the training steps themselves.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import faults, rundir
from .data import PAD_TARGET, SentenceBatches
from .errors import UserError
from .models.loss import summed_nll

log = logging.getLogger(__name__)

# Without a progress bar (a sweep's jobs, a log file, CI): a progress line this often, so that a job says how
# it is doing long before its first epoch ends. The machine's load is looked at with the first one.
PROGRESS_EVERY_S = 60.0


def load_warning(load_1min: float, cores: int, threads: int) -> str | None:
    """Why throughput may be far below what this machine gives, or None. More runnable work than cores
    (the 1-minute load average, which counts this job's own threads) means every thread waits its turn; torch
    threads that wait for each other at every step then lose more than one thread would."""
    if load_1min <= cores + 0.75:  # (cores: the node's, as the load average is the node's)
        return None
    advice = "trainer.threads=1, or " if threads > 1 else ""
    return (
        f"this machine is busy: load average {load_1min:.1f} on {cores} cores, so this run gets a share of "
        f"them and its tokens/s is below what the machine gives; with {threads} torch "
        f"thread{'s' if threads != 1 else ''} per job, try {advice}fewer jobs at a time"
    )


def _machine_load() -> tuple[float, int] | None:
    try:
        # the load average is the whole node's: compare it with the node's cores, not this job's share
        return os.getloadavg()[0], os.cpu_count() or 1
    except OSError:
        return None


class Diverged(Exception):
    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch, self.step = epoch, step


class Pruned(Exception):
    """Raised by an epoch hook (a tuning trial's pruner): stop training here; the run's record says pruned."""


class Interrupted(Exception):
    def __init__(self, signum: int, checkpoint_path: Path):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.checkpoint_path = signum, checkpoint_path


def ppl(nll_per_token: float) -> float:
    return math.exp(nll_per_token) if nll_per_token < 700 else float("inf")


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, t):
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(optimizer, t):
    """Stepped once per epoch, after validation."""
    if t.lr_schedule == "zaremba":
        # epoch e (0-based) trains at lr · decay^max(e + 1 - decay_start, 0): decay_start epochs at full rate
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: max(t.lr_decay ** max(e + 1 - t.lr_decay_start, 0), t.min_lr / t.lr)
        )
    if t.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=t.lr_decay, patience=t.plateau_patience, min_lr=t.min_lr
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


class _StopDuringEvaluation(Exception):
    pass


def precision_context(device, precision: str = "fp32"):
    """trainer.precision: fp32, no context; bf16, the forward pass and the loss under
    torch.autocast(bfloat16) on CPU or CUDA: the master weights and their gradients stay fp32 (bf16 needs no
    loss scaling). One line when the device cannot do it."""
    if precision != "bf16":
        return contextlib.nullcontext()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"trainer.precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support "
            "(use trainer.precision=fp32)"
        )
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"trainer.precision=bf16 runs on cpu or cuda, not {device.type}")
    if device.type == "cpu" and not cpu_bf16_supported():
        # e.g. AMD Zen 3 (AVX2 only): oneDNN has no bf16 LSTM there and nn.LSTM fails at its first step
        from .models.kernels import cpu_vendor

        raise UserError(
            f"trainer.precision=bf16: this CPU ({cpu_vendor() or 'unknown vendor'}, "
            f"{torch.backends.cpu.get_cpu_capability()}) has no bfloat16 support in oneDNN "
            "(it needs AVX-512 or AMX); use trainer.precision=fp32"
        )
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU (AVX-512, avx512_bf16, AMX): nn.LSTM under CPU autocast
    bf16 needs it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _master_state(model, state):
    """The carried state back in the weights' dtype after an autocast forward (nn.LSTM's layers return
    bf16 states there): fp32 between windows and in checkpoints, whatever the precision."""
    dtype = model.encoder.weight.dtype
    return [tuple(s.to(dtype) for s in layer) for layer in state]


class DamagedState(Exception):
    """A checkpoint's state that cannot be restored (train.py names the file)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__


@torch.no_grad()
def evaluate_batches(
    model,
    batches,
    device,
    limit: int | None = None,
    progress: bool = False,
    desc: str = "eval",
    stop=None,
    precision: str = "fp32",
):
    """(summed NLL, target tokens) over a split: every target token once, <eos> included, padding excluded.
    The state is carried across windows in stream mode and starts from zero for every batch in sentence mode.
    A stop signal (`stop.received`) ends it early with _StopDuringEvaluation. precision: as trainer.precision
    (the forward pass under bf16 autocast or not)."""
    was_training = model.training
    model.eval()
    n = len(batches) if not limit else min(len(batches), limit)
    nll, ntok = 0.0, 0
    state = model.init_state(batches.batch_size, device)
    bar = tqdm(range(n), desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    try:
        for i in bar:
            if stop is not None and stop.received is not None:
                raise _StopDuringEvaluation
            if isinstance(batches, SentenceBatches):
                x, y = batches.get(0, i)
            else:
                x, y = batches[i]
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if isinstance(batches, SentenceBatches):
                state = model.init_state(x.size(1), device)
            with precision_context(device, precision):
                logits, state = model(x, state)
            if precision != "fp32":
                state = _master_state(model, state)
            faults.point("eval_batch")
            with precision_context(device, precision):
                nll += summed_nll(logits.view(-1, logits.size(-1)), y.view(-1), PAD_TARGET).item()
            ntok += int((y != PAD_TARGET).sum())
            if i % 20 == 0:
                bar.set_postfix(ppl=f"{ppl(nll / max(ntok, 1)):.2f}")
    finally:
        bar.close()
        model.train(was_training)
    return nll, ntok


class StopSignals:
    """SIGINT / SIGTERM / SIGUSR2 (SLURM's pre-timeout signal) ask the loop to stop after the current step.

    A second SIGINT stops at once. The handlers they replace (submitit's, under SLURM) are restored on exit.
    """

    SIGNALS = tuple(
        s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR2", None)) if s is not None
    )

    # A stop signal that arrived while no StopSignals was active (a sweep job building its model, a joblib
    # worker between jobs): the next StopSignals starts from it, so the job stops after its first step.
    pending: int | None = None

    def __init__(self):
        self.received: int | None = StopSignals.pending
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        # Only set the flag here (the loop logs it): writing from a signal handler can re-enter a stream.
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for s, prev in self._previous.items():
            signal.signal(s, prev)
        return False


@dataclass
class Position:
    epoch: int = 0  # the epoch being trained (0-based)
    batch: int = 0  # the next batch of that epoch; == number of batches: train done, validation pending
    step: int = 0  # optimizer steps so far


class Trainer:
    def __init__(
        self,
        model,
        corpus,
        cfg,
        run_dir: Path,
        device: torch.device,
        tracker,
        config_dict: dict,
        model_name: str,
        num_params: int,
    ):
        self.model, self.corpus, self.cfg, self.t = model, corpus, cfg, cfg.trainer
        self.run_dir, self.device, self.tracker = Path(run_dir), device, tracker
        self.config_dict, self.model_name, self.num_params = config_dict, model_name, num_params
        self.ckpt_dir = rundir.checkpoint_dir(self.run_dir)
        ckpt.remove_stale_temporaries(self.ckpt_dir)
        t, mode = self.t, cfg.data.batching
        from .data import make_batches

        self.mode = mode
        self.train_batches = make_batches(
            corpus, "train", mode, t.batch_size, t.bptt, shuffle=True, seed=cfg.seed
        )
        self.valid_batches = make_batches(corpus, "valid", mode, t.eval_batch_size, t.bptt, shuffle=False)
        self.test_batches = make_batches(corpus, "test", mode, t.eval_batch_size, t.bptt, shuffle=False)
        if mode == "stream" and t.bptt > self.train_batches.rows:
            raise UserError(
                f"trainer.bptt={t.bptt} is larger than the data: the train split gives columns of "
                f"{self.train_batches.rows} tokens at trainer.batch_size={t.batch_size}"
            )
        self.n_train = len(self.train_batches)
        if t.limit_train_batches:
            self.n_train = min(self.n_train, t.limit_train_batches)
        self.optimizer = make_optimizer(model.parameters(), t)
        self.scheduler = make_scheduler(self.optimizer, t)
        self.pos = Position()
        # logger.layer_grad_norms: each recurrent layer's parameters, for the norms of their gradients
        self.layer_params = (
            [list(layer.parameters()) for layer in model.core.layers]
            if getattr(cfg.logger, "layer_grad_norms", False)
            and hasattr(getattr(model, "core", None), "layers")
            else []
        )
        self._step_layer_norms: list[float] = []
        self.hidden = None  # carried state (stream mode)
        self.epoch_sums = self._new_epoch_sums()
        self.best_val, self.best_epoch = float("inf"), -1
        self.history: list[dict] = []
        self.wall_s = 0.0  # over every process of this run
        self.cpu_s = 0.0  # CPU time (every thread of the process) over every process of this run
        self.train_time = {"seconds": 0.0, "tokens": 0}  # over every process: train/tokens_per_s
        self.progress = t.progress == "on" or (t.progress == "auto" and sys.stderr.isatty() and not _ci())
        self._last_ckpt_time = time.monotonic()
        self._load_checked = False
        self.precision = getattr(t, "precision", "fp32")
        precision_context(device, self.precision)  # a device that cannot do it: one line, before training

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.pos.epoch,
            "batch": self.pos.batch,
            "step": self.pos.step,
            "hidden": None if self.hidden is None else [list(layer) for layer in self.hidden],
            "epoch_sums": dict(self.epoch_sums),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "history": list(self.history),
            "rng": rng_state(),
            "config": self.config_dict,
            "wandb_id": self.tracker.run_id,
            "vocab": list(self.corpus.vocab.words),
            "model_name": self.model_name,
            "num_params": self.num_params,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "train_time": dict(self.train_time),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint's state; a part that does not fit (a hand-edited or damaged file whose digest
        was recomputed) is a DamagedState naming the part, before anything runs with it."""
        for key in ("epoch", "batch", "step"):
            v = state.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise DamagedState(f"its {key} is {v!r}, not a count")
        for part, restore in (
            ("model", lambda: self.model.load_state_dict(state["model"])),
            ("optimizer state", lambda: self.optimizer.load_state_dict(state["optimizer"])),
            ("scheduler state", lambda: self.scheduler.load_state_dict(state["scheduler"])),
        ):
            try:
                restore()
            except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
                raise DamagedState(f"its {part} does not fit ({_first_line(exc)})") from None
        self.pos = Position(state["epoch"], state["batch"], state["step"])
        self.hidden = (
            None
            if state["hidden"] is None
            else [tuple(t.to(self.device) for t in layer) for layer in state["hidden"]]
        )
        self.epoch_sums = {**self._new_epoch_sums(), **state["epoch_sums"]}  # (older checkpoints: no norms)
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.history = list(state["history"])
        self.wall_s = state["wall_s"]
        self.cpu_s = float(state.get("cpu_s", 0.0))  # (checkpoints before it was recorded: from here on)
        self.train_time = dict(state["train_time"])
        try:
            set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise DamagedState(f"its RNG state does not fit ({_first_line(exc)})") from None

    def save_checkpoint(self, best: bool = False) -> Path:
        path = self.ckpt_dir / ckpt.LAST
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        # best.pt is linked to the new file before last.pt is replaced by it: a kill in between leaves an
        # older last.pt, whose resumed run reaches (and links) the same best epoch again.
        ckpt.save(self.state_dict(), path, also=[self.ckpt_dir / ckpt.BEST] if best else ())
        self._last_ckpt_time = time.monotonic()
        return path

    # ------------------------------------------------------------------ steps
    def _batch(self, batches, epoch: int, i: int):
        if isinstance(batches, SentenceBatches):
            x, y = batches.get(epoch, i)
        else:
            x, y = batches[i]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _new_epoch_sums(self) -> dict:
        n = len(self.layer_params)
        return {"nll": 0.0, "tokens": 0, "seconds": 0.0, "layer_grad_norms": [0.0] * n, "grad_norm_steps": 0}

    def layer_grad_norms(self) -> list[float]:
        """The L2 norm of each recurrent layer's parameter gradient (all its tensors together), as it is after
        backward and before clipping."""
        out = []
        for params in self.layer_params:
            grads = [p.grad for p in params if p.grad is not None]
            out.append(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                if grads
                else None
            )
        if not out or any(v is None for v in out):
            return [0.0 if v is None else float(v) for v in out]
        return torch.stack(out).tolist()

    def train_step(self, x, y, state):
        """One optimizer step on a (T, B) window. Returns (summed NLL, target tokens, grad norm, state)."""
        with precision_context(self.device, self.precision):  # trainer.precision=bf16: autocast
            logits, state = self.model(x, state)  # (T, B, V)
            nll = summed_nll(logits.view(-1, logits.size(-1)), y.view(-1), PAD_TARGET)
        if self.precision != "fp32":
            state = _master_state(self.model, state)
        ntok = int((y != PAD_TARGET).sum())
        # per_sequence: sum over time, mean over the batch (the loss Zaremba et al.'s lr=1 is meant for)
        loss = nll / (y.size(1) if self.t.loss == "per_sequence" else max(ntok, 1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        faults.point("step")
        if self.layer_params:
            self._step_layer_norms = self.layer_grad_norms()
            sums = self.epoch_sums
            sums["layer_grad_norms"] = [
                a + b for a, b in zip(sums["layer_grad_norms"], self._step_layer_norms)
            ]
            sums["grad_norm_steps"] += 1
        # global norm of the whole gradient (TensorFlow's clip_by_global_norm); an infinite bound only measures it
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.t.clip_grad_norm or float("inf"))
        self.optimizer.step()
        return nll.item(), ntok, gnorm, state

    def evaluate(self, batches, desc: str, stop=None) -> tuple[float, int]:
        return evaluate_batches(
            self.model,
            batches,
            self.device,
            self.t.limit_eval_batches,
            self.progress,
            desc,
            stop,
            precision=self.precision,
        )

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ loop
    def fit(self, stop: StopSignals):
        """Train from the current position to max_epochs, yielding each epoch's record (a line of the run's history).
        A stop signal checkpoints the position and raises Interrupted; a divergence raises Diverged."""
        self.model.train()
        self._wall0, self._wall_base = time.monotonic(), self.wall_s
        self._cpu0, self._cpu_base = time.process_time(), self.cpu_s
        while self.pos.epoch < self.t.max_epochs and not self.stopped_early():
            self._train_epoch(stop)
            yield self._end_epoch(stop)
        self._update_wall()

    def stopped_early(self) -> bool:
        """trainer.early_stop_patience epochs have passed since the best validation perplexity (decided from
        the position and the best epoch alone, so that a resumed run decides the same)."""
        patience = getattr(self.t, "early_stop_patience", None)
        return (
            bool(patience)
            and self.best_epoch >= 0
            and self.pos.epoch < self.t.max_epochs  # a run that reached max_epochs did not stop early
            and self.pos.epoch - 1 - self.best_epoch >= patience
        )

    def _update_wall(self) -> None:
        self.wall_s = self._wall_base + time.monotonic() - self._wall0
        self.cpu_s = self._cpu_base + time.process_time() - self._cpu0

    def _interrupt(self, stop: StopSignals, message: str, *args):
        """Checkpoint where we are; the Interrupted to raise (the resumed run continues from there)."""
        log.warning(message, signal.Signals(stop.received).name, *args)
        self._update_wall()
        return Interrupted(stop.received, self.save_checkpoint())

    def _train_epoch(self, stop: StopSignals) -> None:
        """The remaining training windows of the current epoch (all of them, or those after a resume point)."""
        epoch = self.pos.epoch
        if self.pos.batch == 0:
            self.epoch_sums = self._new_epoch_sums()
            self.hidden = None
        bar = tqdm(
            total=self.n_train,
            initial=self.pos.batch,
            desc=f"epoch {epoch + 1}/{self.t.max_epochs}",
            disable=not self.progress,
            dynamic_ncols=True,
            leave=False,
        )
        self._window = {"tokens": 0, "t0": time.perf_counter()}  # throughput between two log lines
        self._since = {"t0": time.monotonic(), "batch": self.pos.batch, "tokens": 0, "last": time.monotonic()}
        # Throughput counts the whole loop (batching, the step, logging, the progress bar, checkpoints),
        # not only the model: the clock runs from iteration to iteration.
        mark = time.perf_counter()
        try:
            while self.pos.batch < self.n_train:
                x, y = self._batch(self.train_batches, epoch, self.pos.batch)
                if self.mode == "sentence" or self.hidden is None:
                    state = self.model.init_state(x.size(1), self.device)
                else:
                    state = self.hidden  # carried from the previous window, already detached
                nll, ntok, gnorm, state = self.train_step(x, y, state)
                now = time.perf_counter()
                dt, mark = now - mark, now
                self._account_step(nll, ntok, dt, state)
                self._log_step(nll / max(ntok, 1), gnorm, ntok, bar)
                bar.update(1)
                self._since["tokens"] += ntok
                self._report_progress()
                if stop.received is not None:
                    raise self._interrupt(stop, "received %s: stopping after step %d", self.pos.step)
                self._periodic_checkpoint()
        finally:
            bar.close()
        tail = time.perf_counter() - mark
        self.epoch_sums["seconds"] += tail
        self.train_time["seconds"] += tail

    def _account_step(self, nll: float, ntok: int, dt: float, state) -> None:
        """Check the step's loss, carry the state, advance the position and the epoch's sums."""
        t, loss = self.t, nll / max(ntok, 1)
        if not math.isfinite(loss) or (t.diverge_threshold is not None and loss > t.diverge_threshold):
            raise Diverged(
                f"training diverged at epoch {self.pos.epoch + 1}, step {self.pos.step + 1} (loss {loss})",
                self.pos.epoch,
                self.pos.step + 1,
            )
        # detached copies: no graph, and not views that would keep (and checkpoint) whole (T, B, H) tensors
        self.hidden = (
            [tuple(s.detach().clone() for s in layer) for layer in state] if self.mode == "stream" else None
        )
        self.pos.batch += 1
        self.pos.step += 1
        self.epoch_sums["nll"] += nll
        self.epoch_sums["tokens"] += ntok
        self.epoch_sums["seconds"] += dt
        self.train_time["seconds"] += dt
        self.train_time["tokens"] += ntok
        self._window["tokens"] += ntok

    def _report_progress(self) -> None:
        """Every PROGRESS_EVERY_S: without a bar, a line with the epoch's progress, speed and time left; once,
        a warning when the machine is busier than it has cores."""
        now = time.monotonic()
        since = self._since
        if now - since["last"] < PROGRESS_EVERY_S:
            return
        since["last"] = now
        elapsed = now - since["t0"]
        done = self.pos.batch - since["batch"]
        if not self._load_checked:
            self._load_checked = True
            load = _machine_load()
            warning = load and load_warning(load[0], load[1], torch.get_num_threads())
            if warning:
                log.warning("%s", warning)
        if self.progress or done <= 0:
            return
        left = (self.n_train - self.pos.batch) * elapsed / done
        sums = self.epoch_sums  # the epoch's running training loss so far (a resumed epoch's included)
        loss = sums["nll"] / max(sums["tokens"], 1)
        log.info(
            "epoch %d/%d  %d%% (%d/%d windows)  train loss %.3f (ppl %.2f)  %.0f tok/s  epoch ends in %s",
            self.pos.epoch + 1,
            self.t.max_epochs,
            100 * self.pos.batch // self.n_train,
            self.pos.batch,
            self.n_train,
            loss,
            ppl(loss),
            since["tokens"] / max(elapsed, 1e-9),
            _duration(left),
        )

    def _log_step(self, loss: float, gnorm, ntok: int, bar) -> None:
        """Every log_every_n_steps steps and at the end of the epoch: the step's numbers to the tracker."""
        if not (self.pos.step % self.cfg.logger.log_every_n_steps == 0 or self.pos.batch == self.n_train):
            return
        now = time.perf_counter()
        tps = self._window["tokens"] / max(now - self._window["t0"], 1e-9)
        self._window = {"tokens": 0, "t0": now}
        lr = self.current_lr()
        self.tracker.log(
            {
                "train/loss": loss,
                "train/ppl": ppl(loss),
                "train/lr": lr,
                "train/grad_norm": float(gnorm),
                **{f"grad_norm/layer_{i}": v for i, v in enumerate(self._step_layer_norms, 1)},
                "train/tokens_per_s": tps,
                "epoch": self.pos.epoch + (self.pos.batch - 1) / self.n_train,
            },
            step=self.pos.step,
        )
        bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{ppl(loss):.1f}", lr=f"{lr:.3g}", tok_s=f"{tps:,.0f}")

    def _periodic_checkpoint(self) -> None:
        t = self.t
        every_s = t.checkpoint_every_min * 60 if t.checkpoint_every_min else None
        if (t.checkpoint_every_steps and self.pos.step % t.checkpoint_every_steps == 0) or (
            every_s and time.monotonic() - self._last_ckpt_time > every_s
        ):
            self._update_wall()
            self.save_checkpoint()

    def _end_epoch(self, stop: StopSignals) -> dict:
        """Validate, step the schedule, record the epoch, checkpoint (best.pt if it improved)."""
        epoch = self.pos.epoch
        try:
            val_nll, val_tok = self.evaluate(self.valid_batches, "valid", stop)
        except _StopDuringEvaluation:
            # the checkpoint's position (batch == number of batches) makes the resumed run validate first
            raise self._interrupt(stop, "received %s during validation: stopping") from None
        val_ppl = ppl(val_nll / val_tok)
        lr = self.current_lr()
        with warnings.catch_warnings():
            # resumed between the last step of an epoch and its validation: no optimizer.step() yet in
            # this process, which torch warns about; the schedule is per epoch and stays right
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(val_ppl)
            else:
                self.scheduler.step()
        improved = val_ppl < self.best_val
        if improved:
            self.best_val, self.best_epoch = val_ppl, epoch
        train_loss = self.epoch_sums["nll"] / max(self.epoch_sums["tokens"], 1)
        self._update_wall()
        record = {
            "epoch": epoch + 1,
            "step": self.pos.step,
            "train/loss": train_loss,
            "train/ppl": ppl(train_loss),
            "train/tokens": self.epoch_sums["tokens"],  # the epoch's real (unpadded) targets
            "val/ppl": val_ppl,
            "lr": lr,
            "train/tokens_per_s": self.epoch_sums["tokens"] / max(self.epoch_sums["seconds"], 1e-9),
            "elapsed_s": self.wall_s,
        }
        steps = self.epoch_sums.get("grad_norm_steps", 0)
        for i, total in enumerate(self.epoch_sums.get("layer_grad_norms", []), 1):
            record[f"grad_norm/layer_{i}"] = total / steps if steps else None  # the epoch's mean
        self.history.append(record)
        self.tracker.log(
            {"val/ppl": val_ppl, "train/epoch_ppl": record["train/ppl"], "epoch": epoch + 1},
            step=self.pos.step,
        )
        self.pos = Position(epoch + 1, 0, self.pos.step)
        self.hidden = None
        self.save_checkpoint(best=improved)
        faults.point("epoch_end")
        log.info(
            "epoch %d/%d  train ppl %.2f  val ppl %.2f%s  lr %.4g  %.0f tok/s  %.0f s",
            epoch + 1,
            self.t.max_epochs,
            record["train/ppl"],
            val_ppl,
            " (best)" if improved else "",
            lr,
            record["train/tokens_per_s"],
            self.wall_s,
        )
        return record

    def test(self, stop=None) -> dict:
        """Evaluate the best-valid checkpoint on valid and test. Stopped by a signal, the run resumes from its
        last checkpoint (training is complete there) straight into this evaluation."""
        best = self.ckpt_dir / ckpt.BEST
        if best.is_file():
            self.model.load_state_dict(ckpt.load(best, map_location=self.device)["model"])
        try:
            val_nll, val_tok = self.evaluate(self.valid_batches, "valid (best)", stop)
            test_nll, test_tok = self.evaluate(self.test_batches, "test", stop)
        except _StopDuringEvaluation:
            log.warning(
                "received %s during the final evaluation: stopping", signal.Signals(stop.received).name
            )
            raise Interrupted(stop.received, self.ckpt_dir / ckpt.LAST) from None
        return {
            "val/ppl": ppl(val_nll / val_tok),
            "test/ppl": ppl(test_nll / test_tok),
            "test/tokens": test_tok,
        }


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
