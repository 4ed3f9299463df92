"""The recurrence of one (depth-gated) LSTM layer as a single autograd Function.

`scan(gx, gd, m, h0, c0, w_hh, ...)` runs

    z_t = gx_t + W_hh h_{t-1};  i, f, o = σ(z + peepholes);  g = tanh(z_g);  (f = 1 - i when coupled)
    d_t = σ(gd_t + w_cd ⊙ c_{t-1});  c_t = d_t ⊙ m_t + f ⊙ c_{t-1} + i ⊙ g;  h_t = o ⊙ tanh(c_t)

over all T steps and returns (h_all, c_all), both [T, B, H]. Everything that does not depend on h_{t-1}
(gx, gd, m) is computed by the caller for all steps at once, so the loop holds one small GEMM per step.

Two implementations of the same forward and backward:
- ``cpp``: a C++ extension (csrc/scan.cpp) with the elementwise work of a step fused into one loop. CPU only.
  Built once by ``make setup`` (``python -m dglstm_lm.build_kernels``) into ``build/``; loading a
  built module takes no lock, so parallel jobs never wait on each other. Its per-step GEMM has four paths
  (`gemm_path`), chosen per CPU, precision and layer width by measurement: MKL's packed GEMM (a weight
  packed once per window for the batch's row count; at batch 20 re-packing is most of a plain GEMM call's
  time) on Intel, its fast code being Intel's own; elsewhere oneDNN's brgemm micro-kernel per block of
  output columns (no dispatch, no allocation, the plain weight) up to BRGEMM_MAX_HIDDEN units, and oneDNN's
  inner product on a reordered weight above (on AMD 1.4x faster forward and 2.8x backward than MKL at
  20 x 650). Under autocast bf16 (on Intel at any width, elsewhere above BRGEMM_MAX_HIDDEN["bf16"] units)
  the per-step GEMMs take bfloat16 inputs with float32 accumulation (oneDNN's inner product; avx512_bf16 or
  AMX; on a CPU with AMX the brgemm micro-kernel in bfloat16 instead, on a weight packed in VNNI order
  once per window) while the cell state and every elementwise operation stay float32. ``cpp_mkl``,
  ``cpp_onednn`` and ``cpp_brgemm`` force one path (``cpp_onednn`` under autocast bf16: the inner product's
  bfloat16 GEMM; ``cpp_mkl`` and ``cpp_brgemm``: float32 GEMMs whatever the precision), ``cpp_blas`` a plain GEMM per step (torch's BLAS); float64 always uses that. Under no_grad
  the kernel keeps no per-step activations.
- ``python``: the same loops written with torch ops; runs on any device (CUDA included) and is the fallback
  when no compiler is available.
- ``triton`` (triton_scan.py): the GPU backend, one fused Triton kernel per step forward and backward with
  the per-step GEMMs on cuBLAS; ``triton_graph`` is the same with each window's loops captured in CUDA
  graphs. ``auto`` picks the Triton scan for float32 on CUDA when Triton is installed (torch's CUDA builds bring it): the
  eager loop for its first call (a kernel that cannot compile there falls back to ``python``), then ``triton_graph``.
All save the gate activations in the forward pass, so that the backward pass is elementwise work plus
``dh_{t-1} = dz_t W_hh`` per step, with dW_hh as one GEMM over all steps afterwards.

Under autocast (``trainer.precision=bf16``) the recurrence's inputs (the bf16 input projections) are cast up
and autocast is off inside, so the elementwise work and the cell state stay in float32 (fp32 master
weights; the big input and output GEMMs are the bf16 ones). h_{t-1} W_hh is a bfloat16 GEMM with float32
accumulation on the fused kernel's oneDNN paths (see ``cpp`` above) and float32 on every other path.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "scan.cpp"
_EXT_NAME = "dglstm_scan"
# Portable flags: the build directory may be shared by the nodes of a cluster, so no -march=native.
_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fopenmp"]
# OpenMP: without it the kernel's at::parallel_for runs on one thread (torch's parallel helpers are inline
# templates, parallel only where the includer is compiled with OpenMP). Only with GCC, whose libgomp is the
# runtime torch's wheels load (same soname, so one runtime, honouring torch.set_num_threads); another
# compiler (clang would link its own libomp) or one without OpenMP gets a serial build instead.
# -fopenmp-simd (GCC and clang, no runtime): the `omp simd` loops vectorise in either build.
_OPENMP = "-fopenmp"
_OPENMP_PROBE = "#if !defined(__GNUC__) || defined(__clang__)\n#error not GCC\n#endif\n#include <omp.h>\nint main() { return omp_get_max_threads() < 1; }\n"
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


def _gcc_openmp() -> bool:
    """Whether the C++ compiler torch will build with ($CXX, else c++) is GCC and links an OpenMP program."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:
            r = subprocess.run(
                [os.environ.get("CXX", "c++"), "-x", "c++", "-", _OPENMP, "-o", str(Path(tmp) / "probe")],
                input=_OPENMP_PROBE,
                text=True,
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError):
            return False
    return r.returncode == 0


def build(verbose: bool = False):
    """Compile the extension (if it is not built yet) and return the module: with OpenMP where the compiler is
    GCC with OpenMP, else serial (decided before the one build, so the module keeps its name)."""
    from torch.utils.cpp_extension import load

    build_dir = _build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = list(_CFLAGS)
    if not _gcc_openmp():
        flags.remove(_OPENMP)
        log.warning(
            "the C++ compiler is not GCC with OpenMP: the fused CPU kernel is built serial (one thread)"
        )
    return load(
        name=_EXT_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=flags,
        extra_ldflags=[f for f in flags if f == _OPENMP],
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
_onednn_gemm: bool | None = None


def packed_gemm_available() -> bool:
    """Whether the fused CPU kernel can run its per-step GEMMs through MKL's packed GEMM (torch with MKL)."""
    global _packed_gemm
    if _packed_gemm is None:
        ext = cpp_extension()
        if ext is None:
            return False
        _packed_gemm = bool(ext.has_packed_gemm())
    return _packed_gemm


def onednn_gemm_available() -> bool:
    """Whether the fused CPU kernel can run its per-step GEMMs through oneDNN (torch with oneDNN)."""
    global _onednn_gemm
    if _onednn_gemm is None:
        ext = cpp_extension()
        if ext is None:
            return False
        _onednn_gemm = bool(ext.has_onednn_gemm()) and torch.backends.mkldnn.is_available()
    return _onednn_gemm


_brgemm: bool | None = None


def brgemm_available() -> bool:
    """Whether the fused CPU kernel can run its per-step GEMMs on oneDNN's float32 brgemm micro-kernel."""
    global _brgemm
    if _brgemm is None:
        ext = cpp_extension()
        # torch runs its brgemm on oneDNN's x86 micro-kernel only (AVX2 or more, oneDNN enabled); elsewhere it
        # falls back to a plain GEMM per block, which is not what this path is for
        _brgemm = (
            ext is not None
            and bool(ext.has_brgemm())
            and torch.backends.mkldnn.is_available()
            and platform.machine().lower() in ("x86_64", "amd64")
            and ext.row_isa() in ("AVX2", "AVX-512")
        )
    return _brgemm and torch.backends.mkldnn.enabled


_brgemm_bf16: bool | None = None


def brgemm_bf16_available() -> bool:
    """Whether the fused CPU kernel can run its per-step GEMMs on oneDNN's brgemm micro-kernel in bfloat16
    (torch packs the micro-kernel's bfloat16 weight only where the CPU has AMX)."""
    global _brgemm_bf16
    if not brgemm_available():  # (oneDNN disabled included: nothing is cached then)
        return False
    if _brgemm_bf16 is None:
        ext = cpp_extension()
        _brgemm_bf16 = hasattr(ext, "has_brgemm_bf16") and bool(ext.has_brgemm_bf16())
    return _brgemm_bf16


def onednn_bf16_available() -> bool:
    """Whether oneDNN has bfloat16 GEMMs with float32 accumulation on this CPU (avx512_bf16, AMX, ...)."""
    try:
        return onednn_gemm_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@functools.cache  # read once: it was read on every scan and projection (33 us a time, ~1.5% at 2 x 200)
def cpu_vendor() -> str:
    """ "GenuineIntel", "AuthenticAMD", ... from /proc/cpuinfo ("" where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# The per-step GEMM's paths (csrc/scan.cpp's Gemm): mode name -> (kernel's number, weight precision).
GEMM_MODES = {
    "cpp_plain": (0, None),
    "cpp_mkl": (1, torch.float32),
    "cpp_onednn": (2, torch.float32),
    "cpp_onednn_bf16": (2, torch.bfloat16),
    "cpp_brgemm": (3, torch.float32),
    "cpp_brgemm_bf16": (3, torch.bfloat16),
}
GEMM_NAMES = {
    "cpp_plain": "BLAS",
    "cpp_mkl": "MKL packed",
    "cpp_onednn": "oneDNN",
    "cpp_onednn_bf16": "oneDNN bf16",
    "cpp_brgemm": "oneDNN brgemm",
    "cpp_brgemm_bf16": "oneDNN brgemm bf16 (AMX)",
}


# The widest layer (hidden units) for which model.backend=cpp runs the per-step GEMM on oneDNN's brgemm
# micro-kernel rather than its inner product, outside Intel; in float32, and under autocast bf16 (where the
# micro-kernel's GEMM stays float32, against oneDNN's bf16 one). Measured on an AMD EPYC (Zen 4), 2 threads,
# 20 rows, oneDNN / brgemm in µs, forward 20 x H x 4H and backward 20 x 4H x H: fp32 at H = 200 52/34 and
# 53/37, 400 136/120 and 162/146, 500 198/185 and 205/195, 650 332/320 and 373/422; bf16 (with its float32
# <-> bfloat16 copies) against brgemm in fp32 at H = 200 43/34 and 51/38, 300 66/70 and 86/83, 400 96/121.
BRGEMM_MAX_HIDDEN = {"fp32": 512, "bf16": 256}

# Under autocast bf16 on a CPU with AMX, the per-step GEMM as brgemm in bfloat16 (cpp_brgemm_bf16) against
# oneDNN's bf16 inner product (cpp_onednn_bf16, both with their float32 -> bfloat16 copy of X) and MKL's
# float32 packed GEMM, µs per call, 20 rows, 2 threads, forward 20 x H x 4H, on a 2-core Intel Xeon with AMX
# (2026-12-05, the machine otherwise quiet): H = 200 27 / 48-72 / 38, H = 650 228 / 231-325 / 389; whole
# training and evaluation steps in docs/models.md (Speed). Measured at 200 and 650 units only.


# The per-step GEMM paths the fused scan ran in this process since reset_gemm_record(), which train() calls
# at a run's start (a joblib worker runs job after job): a run's record names them, since a run's rounding,
# and so its perplexity to the last digits, is its CPU's and its path's.
_GEMMS_RUN: set[str] = set()


def reset_gemm_record() -> None:
    _GEMMS_RUN.clear()


def gemm_record() -> str:
    """The GEMM paths the fused scan ran since reset_gemm_record(), for a run's record (its `gemm`)."""
    if not _GEMMS_RUN:
        return "none (no fused scan ran)"
    names = {
        **GEMM_NAMES,
        "python": "PyTorch ops",
        "triton": "Triton scan",
        "triton_graph": "Triton, CUDA graphs",
    }
    return ", ".join(f"{m} ({names.get(m, m)})" for m in sorted(_GEMMS_RUN))


def brgemm_limit(low: torch.dtype | None = None) -> int:
    """The widest layer for which model.backend=cpp prefers brgemm, under autocast to `low` (None: none): the
    bf16 limit only where there is a bf16 GEMM to prefer instead."""
    bf16 = low == torch.bfloat16 and onednn_bf16_available()
    return BRGEMM_MAX_HIDDEN["bf16" if bf16 else "fp32"]


def gemm_path(
    dtype: torch.dtype = torch.float32,
    backend: str = "cpp",
    low: torch.dtype | None = None,
    hidden: int | None = None,
) -> str:
    """The per-step GEMM's path (a GEMM_MODES key) that `backend` runs with for inputs of `dtype`, under
    autocast to `low` (None: no autocast), in a layer of `hidden` units (None: a wide one). For
    model.backend=cpp (and auto on the CPU), chosen per CPU, precision and width by what was measured: MKL's
    packed GEMM on Intel (its fast code is Intel's own); on every other CPU oneDNN's brgemm micro-kernel up
    to BRGEMM_MAX_HIDDEN units, oneDNN's inner product above (under autocast bf16 its bfloat16 GEMM). Under
    autocast bf16 on a CPU with AMX, the brgemm micro-kernel in bfloat16 at every even width (measured
    faster than oneDNN's bf16 inner product at 200 and 650 units, above)."""
    if dtype != torch.float32 or backend == "cpp_blas":
        return "cpp_plain"
    mkl, onednn = packed_gemm_available(), onednn_gemm_available()
    bf16 = low == torch.bfloat16 and onednn_bf16_available()
    if backend == "cpp_mkl":
        return "cpp_mkl" if mkl else "cpp_plain"
    if backend == "cpp_brgemm":
        return "cpp_brgemm" if brgemm_available() else "cpp_plain"
    if backend == "cpp_onednn":
        return ("cpp_onednn_bf16" if bf16 else "cpp_onednn") if onednn else "cpp_plain"
    if bf16 and (hidden is None or hidden % 2 == 0) and brgemm_bf16_available():
        return "cpp_brgemm_bf16"
    intel = cpu_vendor() == "GenuineIntel"
    if not intel and hidden is not None and hidden <= brgemm_limit(low) and brgemm_available():
        return "cpp_brgemm"
    if bf16:
        return "cpp_onednn_bf16"
    if mkl and (intel or not onednn):
        return "cpp_mkl"
    return "cpp_onednn" if onednn else "cpp_plain"


def _pack(w: torch.Tensor, rows: int, mode: str) -> torch.Tensor | None:
    """w ([N, K]) packed for products x w^T with x of `rows` rows, for the GEMM path `mode`: by MKL
    (mkl::_mkl_linear's weight), or reordered by oneDNN into its blocked layout (in float32, or rounded to
    bfloat16). The kernel multiplies it by B-row matrices only: every caller packs with rows = B."""
    _, dtype = GEMM_MODES[mode]
    if mode == "cpp_brgemm":  # the micro-kernel's B matrix: plain^T as [K, N], row-major
        return plain_t if (plain_t := w.t()).is_contiguous() else cpp_extension().transpose_weight(w)
    if mode == "cpp_brgemm_bf16":  # plain^T in bfloat16, in blocks of 64 columns packed in VNNI order
        return cpp_extension().pack_brgemm_bf16(w)
    if mode == "cpp_mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
    if dtype is not None:
        return torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), rows)
    return None


# The last packings made, keyed by the weight's identity and version: evaluation multiplies the same W_hh
# window after window, so its packing is made once; a training step's update changes the version, so the
# next window packs anew. The cache holds the weight itself, so its storage cannot be reused under the key.
_PACK_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
_PACK_CACHE_SIZE = 8


def _packed(
    w: torch.Tensor, rows: int, mode: str, transposed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(w or w^T as the kernel needs it, its packing for `mode`), from the cache when w has not changed."""
    key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, rows, mode, transposed)
    hit = _PACK_CACHE.get(key)
    if hit is not None and hit[0] is w:
        return hit[1], hit[2]
    if transposed:  # (brgemm multiplies by plain^T = W_hh as it is: a view will do)
        plain = w.t() if mode in ("cpp_brgemm", "cpp_brgemm_bf16") else cpp_extension().transpose_weight(w)
    else:
        plain = w
    packed = _pack(plain, rows, mode)
    if len(_PACK_CACHE) >= _PACK_CACHE_SIZE:
        _PACK_CACHE.pop(next(iter(_PACK_CACHE)))
    _PACK_CACHE[key] = (w, plain, packed)
    return plain, packed


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled, mode, save):
        # mode: "python", or a GEMM_MODES key (the fused kernel with that per-step GEMM);
        # save=False when no backward can follow (no_grad, nothing requires grad): nothing kept per step
        if mode == "python":
            h_all, c_all, acts, tanh_c = _py_forward(gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled)
        else:
            w_hh = w_hh.contiguous()
            _, packed = _packed(w_hh, gx.shape[1], mode, transposed=False)
            h_all, c_all, acts, tanh_c = cpp_extension().forward(
                gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd, coupled, GEMM_MODES[mode][0], packed, save
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
            w_hh_t = packed_t = None
            if ctx.mode != "cpp_plain":
                w_hh_t, packed_t = _packed(w_hh, h_all.shape[1], ctx.mode, transposed=True)
            wgrad_onednn = wgrad_path(ctx.mode) == "onednn"
            grads = cpp_extension().backward(*args, GEMM_MODES[ctx.mode][0], packed_t, w_hh_t, wgrad_onednn)
        return (*grads, None, None, None)


WGRAD_ENV = "DGLSTM_WGRAD"  # onednn | blas | auto (or unset): where the weight gradients run (wgrad_path)


def wgrad_choice() -> str:
    """$DGLSTM_WGRAD: auto (unset, the default), onednn or blas; anything else is a one-line error."""
    from ..errors import ConfigError

    choice = os.environ.get(WGRAD_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "onednn", "blas"):
        raise ConfigError(
            f"{WGRAD_ENV}={os.environ[WGRAD_ENV]}: expected onednn, blas or auto (chosen per CPU)"
        )
    return choice


@functools.cache
def _avx512() -> bool:
    """Whether torch's kernels run AVX-512 (ATen's capability: the CPU's, or less where ATEN_CPU_CAPABILITY
    limits it, as `make bench isa=avx2` does)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def wgrad_path(step_path: str) -> str:
    """Where a layer's float32 weight gradients (dW_ih, dW_hh and the depth gate's dW_xd: dz^T x over all
    steps) run, given its per-step GEMM's path `step_path` (gemm_path's answer). On the oneDNN paths
    (cpp_onednn, cpp_brgemm): "onednn", its inner product, which first copies the transposed gradient dz^T
    into a contiguous tensor, or "blas", torch.mm (MKL's sgemm), which reads the transposed view as it is.
    BLAS for the layers on brgemm on a CPU without AVX-512, oneDNN on the other oneDNN paths: measured on a
    Zen 3 at 200 units (the whole training step 1.04x faster at 2 x 200, 1.08x at 8 x 200) and 650 (no
    faster: 0.97-1.01x), and on a Zen 4 only per call at a 650-wide layer's shapes (oneDNN ahead); the
    widths between and narrow layers on AVX-512 follow from those, unmeasured (docs/models.md).
    $DGLSTM_WGRAD=onednn|blas forces one on the oneDNN paths. Every other path: "blas" (torch's own GEMM)."""
    if step_path not in ("cpp_onednn", "cpp_brgemm"):
        return "blas"
    choice = wgrad_choice()
    if choice != "auto":
        return choice
    return "blas" if step_path == "cpp_brgemm" and not _avx512() else "onednn"


def wgrad_summary() -> str:
    """What a run records (its record's wgrad): $DGLSTM_WGRAD's choice, or the automatic one for this CPU."""
    choice = wgrad_choice()
    if choice != "auto":
        return f"{choice} ({WGRAD_ENV})"
    return f"auto: {wgrad_path('cpp_brgemm')} where a layer runs brgemm, onednn on oneDNN's inner product"


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b_t^T (+ bias) by oneDNN's inner product; b_t may be a transposed view (read with its strides), a
    transposed `a` is first copied contiguous: on a Zen 4 1.1-1.25x MKL's sgemm at the sizes of a 650-wide
    layer's projections and gradients (see wgrad_path for the weight gradients)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    """x w^T + b with oneDNN's inner product, forward and backward (dx = g w, dw = g^T x, the latter where
    wgrad_path says: `wgrad`): x [N, K], w [M, K], b [M] or None."""

    @staticmethod
    def forward(ctx, x, w, b, wgrad):
        ctx.save_for_backward(x, w)
        ctx.has_bias, ctx.wgrad = b is not None, wgrad
        return _onednn_mm(x, w, b)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        return (
            _onednn_mm(grad, w.t()) if need_x else None,
            (grad.t().mm(x) if ctx.wgrad == "blas" else _onednn_mm(grad.t(), x.t())) if need_w else None,
            grad.sum(0) if ctx.has_bias and need_b else None,
            None,
        )


def input_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    backend: str = "auto",
    hidden: int | None = None,
):
    """F.linear(x, w, b) for the input projections over all steps of a layer of `hidden` units (None: a wide
    layer), on the library the fused kernel's per-step GEMM uses here: where that is oneDNN (model.backend
    cpp/auto on AMD, cpp_onednn), oneDNN's inner product in float32 (its weight gradient where wgrad_path
    says); anywhere else (MKL, autocast, other devices and dtypes) F.linear itself."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and backend in ("auto", "cpp", "cpp_onednn", "cpp_brgemm")
        and not _autocast_enabled("cpu")
        and cpp_extension() is not None
        and gemm_path(torch.float32, "cpp" if backend == "auto" else backend) in ("cpp_onednn", "cpp_brgemm")
    ):
        lead = x.shape[:-1]
        b = None if b is None else b.contiguous()
        step = gemm_path(torch.float32, "cpp" if backend == "auto" else backend, hidden=hidden)
        y = _OneDnnLinear.apply(x.reshape(-1, x.shape[-1]).contiguous(), w.contiguous(), b, wgrad_path(step))
        return y.view(*lead, w.shape[0])
    return F.linear(x, w, b)


TRITON_BACKENDS = ("triton", "triton_graph")
CPP_BACKENDS = ("cpp", "cpp_blas", "cpp_mkl", "cpp_onednn", "cpp_brgemm")


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
    out = triton_scan.scan(*args, coupled=coupled, graphs=graphs)
    _GEMMS_RUN.add(backend)  # the Triton scan's own GEMM (a run's record, gemm_record)
    return out


def scan(
    gx,
    gd,
    m,
    h0,
    c0,
    w_hh,
    wci=None,
    wcf=None,
    wco=None,
    wcd=None,
    *,
    coupled=False,
    backend="auto",
    _low=None,
):
    """Run the recurrence; see the module docstring. backend: "auto" | "cpp" | "cpp_blas" | "cpp_mkl" |
    "cpp_onednn" | "cpp_brgemm" | "python" | "triton" | "triton_graph"."""
    if _autocast_enabled(gx.device.type):
        # the recurrence in float32 (see the module docstring); the casts are differentiable. _low: the
        # autocast precision, which the fused kernel's oneDNN GEMM takes for its inputs
        low = torch.get_autocast_dtype(gx.device.type) if hasattr(torch, "get_autocast_dtype") else None
        with torch.autocast(gx.device.type, enabled=False):
            ups = [_up(t) for t in (gx, gd, m, h0, c0, w_hh, wci, wcf, wco, wcd)]
            return scan(*ups, coupled=coupled, backend=backend, _low=low)
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
            # with CUDA graphs: 1.4-1.6x cuDNN's nn.LSTM at 2 x 200 and 2 x 650 on an H200, 2.5-4.8x the eager
            # Triton loop (make bench-gpu, docs/bench-gpu-h200.md); a shape met once runs the eager loop
            return _triton(*args, coupled=coupled, backend="triton_graph")
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
            f"unknown scan backend {backend!r} (auto, {', '.join(CPP_BACKENDS)}, python, triton, triton_graph)"
        )
    mode = "python" if backend == "python" else gemm_path(gx.dtype, backend, _low, h0.shape[-1])
    _GEMMS_RUN.add(mode)
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
