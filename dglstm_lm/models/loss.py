"""The language model's loss: the summed negative log-likelihood of the targets under softmax(logits).

`summed_nll(logits, target)` is what the trainer, the evaluation and `make bench` call. On the CPU it runs the
fused kernel's cross-entropy (csrc/scan.cpp, `cross_entropy_forward` / `_backward`): two passes over each row
of the logits forward, keeping two floats per row (its maximum and log-sum-exp), and one pass backward that writes softmax minus the
one-hot target in the logits' own type. torch's F.cross_entropy makes five passes over the N x V float32
values (log_softmax's output, nll_loss's zero-filled gradient, log_softmax's backward) and, under autocast
bf16, two more for its casts; at a 10,000-word vocabulary that is the largest elementwise work of a step (see
docs/models.md, Speed). Everything is computed in float32 (bfloat16 logits are read as they are, so autocast
makes no float32 copy of them); the rows' losses are summed in double in row order, so the result does not
depend on the thread count (it may in its last bits on the instruction set: the AVX-512, AVX2 and baseline
builds of the rows may round differently). Where the kernel is not built yet, the first call builds it, as
the DGLSTM's scan does (`make setup` builds it ahead of time).

Elsewhere (CUDA, float64, no compiler) and with $DGLSTM_LOSS=torch it is F.cross_entropy(reduction="sum").
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

LOSS_ENV = "DGLSTM_LOSS"  # torch | auto (or unset): which cross-entropy runs (loss_path)
FUSED_DTYPES = (torch.float32, torch.bfloat16)

# The loss paths run in this process since reset_loss_record() (train() calls it at a run's start, as it
# does reset_gemm_record): a run's record names them.
_LOSSES_RUN: set[str] = set()


def loss_choice() -> str:
    """$DGLSTM_LOSS: auto (unset, the default) or torch; anything else is a one-line error."""
    from ..errors import ConfigError

    choice = os.environ.get(LOSS_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "torch"):
        raise ConfigError(
            f"{LOSS_ENV}={os.environ[LOSS_ENV]}: expected torch (F.cross_entropy) or auto (the fused CPU loss)"
        )
    return choice


def loss_path(logits: torch.Tensor) -> str:
    """ "fused" for float32 or bfloat16 logits on the CPU where the fused kernel is built, unless $DGLSTM_LOSS
    is torch; "torch" (F.cross_entropy) otherwise."""
    if logits.device.type != "cpu" or logits.dtype not in FUSED_DTYPES or loss_choice() == "torch":
        return "torch"
    from .kernels import cpp_extension

    ext = cpp_extension()
    return "fused" if ext is not None and hasattr(ext, "cross_entropy_forward") else "torch"


class _FusedCrossEntropy(torch.autograd.Function):
    """The summed NLL of `target` (ignore_index rows excluded) under softmax(logits), logits [N, V]."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index):
        from .kernels import cpp_extension

        nll, stats = cpp_extension().cross_entropy_forward(logits, target, ignore_index)
        ctx.save_for_backward(logits, target, stats)
        ctx.ignore_index = ignore_index
        return nll

    @staticmethod
    @once_differentiable  # no second derivative: create_graph=True through it is an error, not a silent 0
    def backward(ctx, grad):
        from .kernels import cpp_extension

        logits, target, stats = ctx.saved_tensors
        g = cpp_extension().cross_entropy_backward(logits, target, stats, grad.float(), ctx.ignore_index)
        return g, None, None


def summed_nll(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """sum over the rows of -log softmax(logits)[target], rows whose target is ignore_index left out, as a 0-D
    tensor: float32 on the fused path (and from F.cross_entropy under autocast), else the logits' dtype.
    logits [N, V], target [N] (integers)."""
    path = loss_path(logits)
    _LOSSES_RUN.add(path)
    if path == "torch":
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return _FusedCrossEntropy.apply(logits.contiguous(), target.long().contiguous(), ignore_index)


def reset_loss_record() -> None:
    _LOSSES_RUN.clear()


def loss_record() -> str:
    """The loss paths run since reset_loss_record(), for a run's record (its `loss`)."""
    if not _LOSSES_RUN:
        return "none"
    names = {"fused": "fused CPU cross-entropy", "torch": "F.cross_entropy"}
    return ", ".join(f"{p} ({names[p]})" for p in sorted(_LOSSES_RUN))
