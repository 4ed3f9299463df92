"""The DGLSTM's time loop on the GPU: one fused Triton kernel per step forward and backward, cuBLAS for the GEMMs.

The same recurrence as `kernels.scan` (see its docstring), structured as haste and cuDNN structure a fused LSTM
step: everything that does not depend on h_{t-1} (gx, gd, m) was computed by the caller for all steps at once,
so a forward step is

    z = gx_t + h_{t-1} W_hh^T                 torch.addmm (cuBLAS)
    fwd_step: gates, depth gate, cell, output in one kernel; writes h_t, c_t, the gate activations, tanh(c_t)

and a backward step (t = T-1 ... 0) is

    bwd_step: dz_t (and dc_{t-1}, dgd_t, dm_t) from dh = grad_h_t + dh_rec and dc, in one kernel
    dh_rec = dz_t W_hh                          torch.mm (cuBLAS)

with dW_hh = dz^T [h_{-1} .. h_{T-2}] as one GEMM over all steps afterwards, and the peephole and w_cd
gradients as reductions over all steps (as in the Python and C++ backends).

Launch overhead (two launches per step, each ~5-20 µs from Python) is what a small layer is bound by on a GPU.
`ScanGraphs` captures a window's whole forward loop and backward loop in CUDA graphs (one pair per signature:
shapes, dtype, options) and replays them; the captured function is the eager loop itself (`forward_loop`,
`backward_loop`), so the eager path's tests cover the numerics of the graphed one. A signature is captured at
its second call, so that a shape met once (a last, shorter window whose layers all differ in width) costs no
capture and runs the eager loop; at most `max_graphs` signatures are held, beyond them the loop runs eagerly.

Triton is imported on first use. With TRITON_INTERPRET=1 set before that, the kernels run on CPU tensors
through Triton's interpreter (NumPy): that is how the tests prove this backend on a machine without a GPU.
"""

from __future__ import annotations

import collections
import functools
import os

import torch

BLOCK = 128  # elements of (B, H) per program


def interpreted() -> bool:
    """True when Triton would run its interpreter (TRITON_INTERPRET=1): kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=1)
def triton_unavailable_reason() -> str | None:
    """None if Triton can be imported here, else why not (one line); asked once per process."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".strip()
    return None


def kernels():
    """(fwd_step, bwd_step), defined at the first call (triton_kernels.py)."""
    # Triton 3.9 warns when this is unset; 1 is what it does then (fused multiply-adds)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from .triton_kernels import bwd_step, fwd_step

    return fwd_step, bwd_step


def check_device(t: torch.Tensor) -> None:
    """The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter; say so in one line."""
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and interpreted():
        return
    raise ValueError(
        f"the Triton scan runs on CUDA (or on the CPU under TRITON_INTERPRET=1, for tests), not on {t.device.type}"
    )


# ----------------------------------------------------------------------------------------------------------
# The loops: plain functions of tensors (no autograd), the same for the eager path and the CUDA graphs.


def forward_loop(gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled):
    """→ h_all, c_all, acts, tanh_c (the layout of kernels._py_forward)."""
    fwd_step, _ = kernels()
    T, B, GH = gx.shape
    H = h0.shape[1]
    depth, peep = gd is not None, wci is not None
    h_all = gx.new_empty(T, B, H)
    c_all = gx.new_empty(T, B, H)
    tanh_c = gx.new_empty(T, B, H)
    acts = gx.new_empty(T, B, GH + (H if depth else 0))
    z = gx.new_empty(B, GH)
    w_t = w_hh.t()
    N = B * H
    grid = (triton_cdiv(N, BLOCK),)
    dummy = z  # any tensor for the pointers of absent inputs (never read: constexpr branches)
    h, c = h0, c0
    for t in range(T):
        torch.addmm(gx[t], h, w_t, out=z)
        fwd_step[grid](
            z,
            c,
            gd[t] if depth else dummy,
            m[t] if depth else dummy,
            wci if peep else dummy,
            wcf if peep and not coupled else dummy,
            wco if peep else dummy,
            wcd if depth else dummy,
            h_all[t],
            c_all[t],
            acts[t],
            tanh_c[t],
            N,
            H,
            COUPLED=coupled,
            PEEP=peep,
            DEPTH=depth,
            BLOCK=BLOCK,
        )
        h, c = h_all[t], c_all[t]
    return h_all, c_all, acts, tanh_c


def backward_loop(grad_h, grad_c, h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd, coupled):
    """→ d_gx, d_gd, d_m, dh0, dc0, d_w_hh, d_wci, d_wcf, d_wco, d_wcd (as kernels._py_backward)."""
    _, bwd_step = kernels()
    T, B, H = h_all.shape
    G = 3 if coupled else 4
    depth, peep = m is not None, wci is not None
    d_gx = h_all.new_empty(T, B, G * H)
    d_gd = h_all.new_empty(T, B, H) if depth else None
    d_m = h_all.new_empty(T, B, H) if depth else None
    dh_rec = h_all.new_zeros(B, H)
    dc = h_all.new_zeros(B, H)
    N = B * H
    grid = (triton_cdiv(N, BLOCK),)
    dummy = dc
    for t in range(T - 1, -1, -1):
        bwd_step[grid](
            grad_h[t],
            dh_rec,
            dc,
            grad_c[t],
            acts[t],
            tanh_c[t],
            c0 if t == 0 else c_all[t - 1],
            m[t] if depth else dummy,
            wci if peep else dummy,
            wcf if peep and not coupled else dummy,
            wco if peep else dummy,
            wcd if depth else dummy,
            d_gx[t],
            d_gd[t] if depth else dummy,
            d_m[t] if depth else dummy,
            N,
            H,
            COUPLED=coupled,
            PEEP=peep,
            DEPTH=depth,
            BLOCK=BLOCK,
        )
        torch.mm(d_gx[t], w_hh, out=dh_rec)
    h_prev = torch.cat([h0.unsqueeze(0), h_all[:-1]], 0).reshape(T * B, H)
    dz = d_gx.reshape(T * B, G * H)
    d_w_hh = dz.t() @ h_prev
    d_wci = d_wcf = d_wco = d_wcd = None
    if peep or depth:
        c_prev_all = torch.cat([c0.unsqueeze(0), c_all[:-1]], 0).reshape(T * B, H)
        if peep:
            d_wci = (dz[:, :H] * c_prev_all).sum(0)
            d_wcf = None if coupled else (dz[:, H : 2 * H] * c_prev_all).sum(0)
            d_wco = (dz[:, (G - 1) * H :] * c_all.reshape(T * B, H)).sum(0)
        if depth:
            d_wcd = (d_gd.reshape(T * B, H) * c_prev_all).sum(0)
    return d_gx, d_gd, d_m, dh_rec, dc, d_w_hh, d_wci, d_wcf, d_wco, d_wcd


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------------------------
# CUDA graphs of the loops


class _Captured:
    """One loop function on static input buffers: copy the inputs in, replay, hand out copies of the outputs.

    capture=True records the function in a CUDA graph (after two warm-up runs on a side stream: Triton's
    compilation and cuBLAS's handles happen there, not during the capture) and replays it. capture=False runs
    the function on the static buffers and writes its results into static output buffers, as a replay does:
    the same copy-in / copy-out on the CPU, so that the buffer handling is tested where no GPU is. The outputs
    handed out are always copies: the static ones are overwritten by the next call of this signature (another
    layer of the same width, the next window) while autograd still holds the earlier ones.
    """

    def __init__(self, fn, example: tuple, capture: bool):
        self.fn, self.capture = fn, capture
        self.static_in = [None if a is None else a.detach().clone() for a in example]
        self.device = example[0].device
        self.graph = None
        with torch.no_grad():
            if capture:
                with torch.cuda.device(self.device):
                    self._capture(fn)
            else:
                self.static_out = fn(*self.static_in)

    def _capture(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.static_in)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = fn(*self.static_in)

    def __call__(self, *args):
        with torch.no_grad():
            for s, a in zip(self.static_in, args):
                if s is not None:
                    s.copy_(a)
            if self.graph is not None:
                with torch.cuda.device(self.device):
                    self.graph.replay()
            else:
                for s, o in zip(self.static_out, self.fn(*self.static_in)):
                    if s is not None:
                        s.copy_(o)
            return tuple(None if o is None else o.clone() for o in self.static_out)


class ScanGraphs:
    """A cache of captured (forward, backward) loop pairs, one per signature (device, dtype, shapes, options).

    `forward(...)` returns (h_all, c_all, acts, tanh_c, backward) where backward is the captured backward loop
    of the same signature (to be called with backward_loop's arguments), or None when this call ran the eager
    loop: the first time a signature is seen, and once `max_graphs` signatures are held (sentence batching,
    where every length is a new shape). capture=False (CPU, tests): the same logic without the CUDA graph.
    """

    def __init__(self, capture: bool = True, max_graphs: int = 8, capture_after: int = 2):
        self.capture, self.max_graphs, self.capture_after = capture, max_graphs, capture_after
        self.seen: collections.Counter = collections.Counter()
        self.pairs: dict = {}

    @staticmethod
    def signature(args: tuple, coupled: bool) -> tuple:
        return (coupled,) + tuple(
            None if a is None else (tuple(a.shape), a.dtype, str(a.device)) for a in args
        )

    def forward(self, gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled):
        args = (gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd)
        sig = self.signature(args, coupled)
        pair = self.pairs.get(sig)
        if pair is None:
            self.seen[sig] += 1
            if self.seen[sig] < self.capture_after or len(self.pairs) >= self.max_graphs:
                return (*forward_loop(*args, coupled), None)
            pair = self.pairs[sig] = self._capture(args, coupled)
        fwd, bwd = pair
        return (*fwd(*args), bwd)

    def _capture(self, args, coupled):
        fwd = _Captured(functools.partial(forward_loop, coupled=coupled), args, self.capture)
        h_all, c_all, acts, tanh_c = fwd.static_out
        gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd = args
        example = (
            torch.zeros_like(h_all),
            torch.zeros_like(c_all),
            h0,
            c0,
            w_hh,
            h_all,
            c_all,
            acts,
            tanh_c,
            m,
            wci,
            wcf,
            wco,
            wcd,
        )
        bwd = _Captured(functools.partial(backward_loop, coupled=coupled), example, self.capture)
        return fwd, bwd


_graphs: ScanGraphs | None = None


def default_graphs() -> ScanGraphs:
    """The process's cache of CUDA graphs (model.backend=triton_graph)."""
    global _graphs
    if _graphs is None:
        _graphs = ScanGraphs(capture=True)
    return _graphs


def reset_graphs() -> None:
    """Drop every captured graph (and the memory its pool holds)."""
    global _graphs
    _graphs = None


# ----------------------------------------------------------------------------------------------------------
# The autograd Function


class TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled, graphs):
        args = (gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd)
        if graphs is None:
            h_all, c_all, acts, tanh_c = forward_loop(*args, coupled)
            bwd = None
        else:
            h_all, c_all, acts, tanh_c, bwd = graphs.forward(*args, coupled)
        ctx.save_for_backward(h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd)
        ctx.coupled, ctx.bwd = coupled, bwd
        return h_all, c_all

    @staticmethod
    def backward(ctx, grad_h, grad_c):
        h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd = ctx.saved_tensors
        grad_h = torch.zeros_like(h_all) if grad_h is None else grad_h.contiguous()
        grad_c = torch.zeros_like(c_all) if grad_c is None else grad_c.contiguous()
        args = (grad_h, grad_c, h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd)
        grads = ctx.bwd(*args) if ctx.bwd is not None else backward_loop(*args, ctx.coupled)
        return (*grads, None, None)


def scan(gx, gd, m, h0, c0, w_hh, wci=None, wcf=None, wco=None, wcd=None, *, coupled=False, graphs=None):
    """The recurrence through the Triton kernels; inputs as kernels.scan's (made contiguous here).

    graphs: None (the eager loop) or a ScanGraphs (CUDA graphs; `default_graphs()` on CUDA)."""
    check_device(gx)
    if gx.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the Triton scan runs in float32 or float64, not {gx.dtype}")
    contig = [None if t is None else t.contiguous() for t in (gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd)]
    return TritonScan.apply(*contig, coupled, graphs)
