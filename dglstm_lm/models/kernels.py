"""The recurrence of one (depth-gated) LSTM layer as a single autograd Function.

`scan(gx, gd, m, h0, c0, w_hh, ...)` runs

    z_t = gx_t + W_hh h_{t-1};  i, f, o = σ(z + peepholes);  g = tanh(z_g);  (f = 1 - i when coupled)
    d_t = σ(gd_t + w_cd ⊙ c_{t-1});  c_t = d_t ⊙ m_t + f ⊙ c_{t-1} + i ⊙ g;  h_t = o ⊙ tanh(c_t)

over all T steps and returns (h_all, c_all), both [T, B, H]. Everything that does not depend on h_{t-1}
(gx, gd, m) is computed by the caller for all steps at once, so the loop holds one small GEMM per step.

Two implementations of the same forward and backward:
- ``cpp``: a C++ extension (csrc/scan.cpp) with the elementwise work of a step fused into one loop. CPU only.
  Built once by ``make setup`` (``python -m dglstm_lm.build_kernels``) into ``build/``; loading a
  built module takes no lock, so parallel jobs never wait on each other. In float32 its per-step GEMMs go
  through MKL's packed GEMM (W_hh packed once per window for the batch's row count: at batch 20 re-packing
  the weight is most of a plain GEMM call's time), wherever torch has MKL; ``cpp_blas`` is the same kernel
  with a plain GEMM per step (torch's BLAS), and float64 always uses that. Under no_grad the kernel keeps
  no per-step activations.
- ``python``: the same loops written with torch ops; runs on any device (CUDA included) and is the fallback
  when no compiler is available.
- ``triton`` (triton_scan.py): the GPU backend, one fused Triton kernel per step forward and backward with
  the per-step GEMMs on cuBLAS; ``triton_graph`` is the same with each window's loops captured in CUDA
  graphs. ``auto`` picks ``triton`` for float32 on CUDA when Triton is installed (torch's CUDA builds bring it).
All save the gate activations in the forward pass, so that the backward pass is elementwise work plus
``dh_{t-1} = dz_t W_hh`` per step, with dW_hh as one GEMM over all steps afterwards.

Under autocast (``trainer.precision=bf16``) the recurrence runs in float32 whatever the backend: its inputs
(the bf16 input projections) are cast up and autocast is off inside, so the elementwise work, the cell state
and h_{t-1} W_hh stay in float32 (fp32 master weights; the big input and output GEMMs are the bf16 ones).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "scan.cpp"
_EXT_NAME = "dglstm_scan"
# Portable flags: the build directory may be shared by the nodes of a cluster, so no -march=native.
_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
_ext = None
_ext_error: str | None = None


def _build_dir() -> Path:
    """Where the compiled module lives: $DGLSTM_EXT_DIR, else build/ of the source checkout, else a user cache.

    The folder name carries a hash of the source, the flags and the torch version, so that an edit or a
    torch upgrade builds anew instead of loading a stale module.
    """
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join(_CFLAGS).encode() + torch.__version__.encode() + sys.version.encode()
    ).hexdigest()[:12]
    root = os.environ.get("DGLSTM_EXT_DIR")
    if root:
        base = Path(root)
    elif (Path(__file__).resolve().parents[2] / "pyproject.toml").exists():
        base = Path(__file__).resolve().parents[2] / "build" / "torch_extensions"
    else:
        base = Path.home() / ".cache" / "dglstm_lm" / "torch_extensions"
    return base / f"{_EXT_NAME}_{key}"


def _import_built(build_dir: Path):
    for so in sorted(build_dir.glob(f"{_EXT_NAME}*.so")):
        spec = importlib.util.spec_from_file_location(
            _EXT_NAME, so, loader=importlib.machinery.ExtensionFileLoader(_EXT_NAME, str(so))
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return None


def build(verbose: bool = False):
    """Compile the extension (if it is not built yet) and return the module."""
    from torch.utils.cpp_extension import load

    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    return load(
        name=_EXT_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=_CFLAGS,
        build_directory=str(build_dir),
        verbose=verbose,
    )


def cpp_extension(build_if_missing: bool = True):
    """The compiled module, or None (with the reason in `cpp_unavailable_reason()`) if it cannot be had."""
    global _ext, _ext_error
    if _ext is not None or _ext_error is not None:
        return _ext
    try:
        _ext = _import_built(_build_dir())
        if _ext is None and build_if_missing:
            log.info("compiling the fused CPU kernel (once; `make setup` does this ahead of time)")
            _ext = build()
        if _ext is None:  # only asked whether it is built: a later call may still build it
            return None
    except Exception as exc:  # no compiler, no headers, ...: fall back to the python implementation
        _ext_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        log.warning("fused CPU kernel unavailable (%s); using the python implementation", _ext_error)
    return _ext


_NOT_BUILT = "the fused CPU kernel is not built (run `make setup`)"


def cpp_unavailable_reason() -> str | None:
    if cpp_extension() is None and _ext_error is None:
        return _NOT_BUILT
    return _ext_error


# ----------------------------------------------------------------------------------------------------------
# The same recurrence with torch ops (any device).


def _py_forward(gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled):
    T, B, _ = gx.shape
    H = h0.shape[1]
    depth = gd is not None
    h_all = gx.new_empty(T, B, H)
    c_all = gx.new_empty(T, B, H)
    tanh_c = gx.new_empty(T, B, H)
    acts = gx.new_empty(T, B, (3 if coupled else 4) * H + (H if depth else 0))
    h, c = h0, c0
    w_hh_t = w_hh.t()
    for t in range(T):
        z = torch.addmm(gx[t], h, w_hh_t)  # (B, G*H)
        if coupled:
            zi, zg, zo = z.split(H, dim=1)
        else:
            zi, zf, zg, zo = z.split(H, dim=1)
        if wci is not None:
            zi = zi + wci * c
        i = torch.sigmoid(zi)
        if coupled:
            f = 1 - i
        else:
            f = torch.sigmoid(zf + wcf * c if wci is not None else zf)
        g = torch.tanh(zg)
        c_new = f * c + i * g
        if depth:
            d = torch.sigmoid(gd[t] + wcd * c)
            c_new = c_new + d * m[t]
        if wco is not None:
            zo = zo + wco * c_new
        o = torch.sigmoid(zo)
        tc = torch.tanh(c_new)
        h = o * tc
        gates = [i, g, o] if coupled else [i, f, g, o]
        if depth:
            gates.append(d)
        torch.cat(gates, dim=1, out=acts[t])
        h_all[t], c_all[t], tanh_c[t] = h, c_new, tc
        c = c_new
    return h_all, c_all, acts, tanh_c


def _py_backward(grad_h, grad_c, h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd, coupled):
    T, B, H = h_all.shape
    G = 3 if coupled else 4
    depth = m is not None
    d_gx = h_all.new_empty(T, B, G * H)
    d_gd = h_all.new_empty(T, B, H) if depth else None
    d_m = h_all.new_empty(T, B, H) if depth else None
    dh_rec = h_all.new_zeros(B, H)
    dc = h_all.new_zeros(B, H)
    for t in range(T - 1, -1, -1):
        dh = grad_h[t] + dh_rec
        dc = dc + grad_c[t]
        a = acts[t].split(H, dim=1)
        if coupled:
            i, g, o = a[:3]
            f = 1 - i
        else:
            i, f, g, o = a[:4]
        c_prev = c0 if t == 0 else c_all[t - 1]
        tc = tanh_c[t]
        dzo = dh * tc * o * (1 - o)
        dc = dc + dh * o * (1 - tc * tc)
        if wco is not None:
            dc = dc + dzo * wco
        dcp = dc * f
        if depth:
            d = a[G]
            dzd = dc * m[t] * d * (1 - d)
            d_gd[t] = dzd
            d_m[t] = dc * d
            dcp = dcp + dzd * wcd
        dzg = dc * i * (1 - g * g)
        if coupled:
            dzi = dc * (g - c_prev) * i * (1 - i)
            if wci is not None:
                dcp = dcp + dzi * wci
            torch.cat([dzi, dzg, dzo], dim=1, out=d_gx[t])
        else:
            dzi = dc * g * i * (1 - i)
            dzf = dc * c_prev * f * (1 - f)
            if wci is not None:
                dcp = dcp + dzi * wci + dzf * wcf
            torch.cat([dzi, dzf, dzg, dzo], dim=1, out=d_gx[t])
        dh_rec = d_gx[t] @ w_hh
        dc = dcp
    h_prev = torch.cat([h0.unsqueeze(0), h_all[:-1]], 0).reshape(T * B, H)
    d_w_hh = d_gx.reshape(T * B, G * H).t() @ h_prev
    d_wci = d_wcf = d_wco = d_wcd = None
    if wci is not None or depth:
        c_prev_all = torch.cat([c0.unsqueeze(0), c_all[:-1]], 0).reshape(T * B, H)
        dz = d_gx.reshape(T * B, G * H)
        if wci is not None:
            d_wci = (dz[:, :H] * c_prev_all).sum(0)
            d_wcf = None if coupled else (dz[:, H : 2 * H] * c_prev_all).sum(0)
            d_wco = (dz[:, (G - 1) * H :] * c_all.reshape(T * B, H)).sum(0)
        if depth:
            d_wcd = (d_gd.reshape(T * B, H) * c_prev_all).sum(0)
    return d_gx, d_gd, d_m, dh_rec, dc, d_w_hh, d_wci, d_wcf, d_wco, d_wcd


_packed_gemm: bool | None = None


def packed_gemm_available() -> bool:
    """Whether the fused CPU kernel can run its per-step GEMMs through MKL's packed GEMM (torch with MKL)."""
    global _packed_gemm
    if _packed_gemm is None:
        ext = cpp_extension()
        if ext is None:
            return False
        _packed_gemm = bool(ext.has_packed_gemm())
    return _packed_gemm


def _pack(w: torch.Tensor, rows: int) -> torch.Tensor:
    """w ([N, K]) packed by MKL for products x w^T with x of `rows` rows (mkl::_mkl_linear's weight). The
    kernel multiplies it by B-row matrices only: every caller packs with rows = B of the same call."""
    return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled, mode, save):
        # mode: "python", "cpp" (a plain GEMM per step) or "cpp_packed" (MKL's packed GEMM, float32);
        # save=False when no backward can follow (no_grad, nothing requires grad): nothing kept per step
        if mode == "python":
            h_all, c_all, acts, tanh_c = _py_forward(gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled)
        else:
            w_hh = w_hh.contiguous()
            packed = _pack(w_hh, gx.shape[1]) if mode == "cpp_packed" else None
            h_all, c_all, acts, tanh_c = cpp_extension().forward(
                gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled, packed, save
            )
        if save:
            ctx.save_for_backward(h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd)
        ctx.coupled, ctx.mode = coupled, mode
        return h_all, c_all

    @staticmethod
    def backward(ctx, grad_h, grad_c):
        h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd = ctx.saved_tensors
        grad_h = torch.zeros_like(h_all) if grad_h is None else grad_h.contiguous()
        grad_c = torch.zeros_like(c_all) if grad_c is None else grad_c.contiguous()
        args = (grad_h, grad_c, h0, c0, w_hh, h_all, c_all, acts, tanh_c, m, wci, wcf, wco, wcd, ctx.coupled)
        if ctx.mode == "python":
            grads = _py_backward(*args)
        else:
            w_hh_t = w_hh.t().contiguous() if ctx.mode == "cpp_packed" else None
            packed_t = _pack(w_hh_t, h_all.shape[1]) if w_hh_t is not None else None
            grads = cpp_extension().backward(*args, packed_t, w_hh_t)
        return (*grads, None, None, None)


TRITON_BACKENDS = ("triton", "triton_graph")
CPP_BACKENDS = ("cpp", "cpp_blas")


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _up(t):
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


def triton_available() -> bool:
    from .triton_scan import triton_unavailable_reason

    return triton_unavailable_reason() is None


_auto_triton: str | None = "untried"  # "ok" once it ran, None when it cannot (auto then runs python)


def _triton(*args, coupled, backend):
    from . import triton_scan

    if backend == "triton_graph" and args[0].device.type != "cuda":
        raise ValueError(f"the CUDA-graph scan (triton_graph) needs a CUDA device, not {args[0].device.type}")
    graphs = triton_scan.default_graphs() if backend == "triton_graph" else None
    return triton_scan.scan(*args, coupled=coupled, graphs=graphs)


def scan(gx, gd, m, h0, c0, w_hh, wci=None, wcf=None, wco=None, wcd=None, *, coupled=False, backend="auto"):
    """Run the recurrence; see the module docstring. backend: "auto" | "cpp" | "cpp_blas" | "python" |
    "triton" | "triton_graph"."""
    if _autocast_enabled(gx.device.type):
        # the recurrence in float32 (see the module docstring); the casts are differentiable
        with torch.autocast(gx.device.type, enabled=False):
            ups = [_up(t) for t in (gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd)]
            return scan(*ups, coupled=coupled, backend=backend)
    args = (gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd)
    global _auto_triton
    if backend == "auto" and gx.device.type == "cuda" and gx.dtype == torch.float32 and _auto_triton:
        if _auto_triton == "untried":  # the first call: if the kernels cannot compile here, say so and go on
            if not triton_available():
                _auto_triton = None
            else:
                try:
                    out = _triton(*args, coupled=coupled, backend="triton")
                    _auto_triton = "ok"
                    return out
                except Exception as exc:
                    _auto_triton = None
                    log.warning("the Triton scan failed (%s); model.backend=auto uses the python one", exc)
        else:
            return _triton(*args, coupled=coupled, backend="triton")
    if backend in TRITON_BACKENDS:
        return _triton(*args, coupled=coupled, backend=backend)
    if backend == "auto":
        use_cpp = (
            gx.device.type == "cpu"
            and gx.dtype in (torch.float32, torch.float64)
            and cpp_extension() is not None
        )
        backend = "cpp" if use_cpp else "python"
    elif backend in CPP_BACKENDS:
        if gx.device.type != "cpu":
            raise ValueError(f"the fused C++ kernel runs on the CPU only, not on {gx.device.type}")
        if cpp_extension() is None:
            raise RuntimeError(f"the fused C++ kernel is unavailable: {cpp_unavailable_reason()}")
    elif backend != "python":
        raise ValueError(
            f"unknown scan backend {backend!r} (auto, cpp, cpp_blas, python, triton, triton_graph)"
        )
    mode = backend
    if backend == "cpp":
        mode = "cpp_packed" if gx.dtype == torch.float32 and packed_gemm_available() else "cpp"
    elif backend == "cpp_blas":
        mode = "cpp"
    contig = [None if t is None else t.contiguous() for t in (gx, gd, m, h0, c0)]
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args)
    return _Scan.apply(*contig, w_hh, wci, wcf, wco, wcd, coupled, mode, save)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Build (or check) the fused CPU kernel of the DGLSTM.")
    parser.add_argument("--build", action="store_true", help="compile it now if it is not built")
    args = parser.parse_args(argv)
    if args.build:
        try:
            build(verbose=False)
        except Exception as exc:
            print(
                f"warning: could not build the fused CPU kernel ({exc}); the python implementation will be used"
            )
            return 0
    ext = cpp_extension(build_if_missing=False)
    print(f"fused CPU kernel: {'ready in ' + str(_build_dir()) if ext else (_ext_error or _NOT_BUILT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
