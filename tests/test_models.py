"""The recurrent cores are proved against references: nn.LSTM, the stacked LSTM (gate shut), a per-step
implementation of the DGLSTM equations written here, gradcheck, and closed-form parameter counts."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dglstm_lm.config import DGLSTMConfig, LSTMConfig, ResidualLSTMConfig, RNNConfig, StackedLSTMConfig
from dglstm_lm.models import DGLSTMLayer, LanguageModel, LSTMLayer, build_core, build_model, count_parameters
from dglstm_lm.models.kernels import cpp_extension, scan

from .conftest import ROW_VARIANTS, run_row_variant

# every path of the fused kernel's per-step GEMM: as chosen for this CPU (cpp), plain BLAS, and MKL's packed
# GEMM and oneDNN forced. The forced ones run with the slow tests (`make test`, CI): cpp already runs one of
# them, and the fast suite forces each in test_every_gemm_path_matches_the_python_scan.
BACKENDS = ["python"]
if cpp_extension() is not None:
    BACKENDS += [
        "cpp",
        "cpp_blas",
        *(pytest.param(b, marks=pytest.mark.slow) for b in ("cpp_mkl", "cpp_onednn")),
    ]


def test_cpp_kernel_is_built():
    """`make setup` builds the fused kernel; without it the DGLSTM silently runs ~2x slower on CPU."""
    from dglstm_lm.models.kernels import cpp_unavailable_reason

    assert cpp_extension() is not None, cpp_unavailable_reason()


# ------------------------------------------------------------------------------------------ reference
def reference_dglstm(core, x, state, opts: dict):
    """The DGLSTM equations of Yao et al. (2015), one time step at a time, plain autograd. Its structure (which
    layers have a depth path, which terms the gate has, peepholes, coupling, stabiliser) comes from `opts`,
    the options the core was built with — never from the module's attributes — and it shares nothing with the
    implementation under test but the parameter tensors, read by name (a missing one is a KeyError).

    opts: dims (input width first), gate_input, peephole, coupled, stabiliser, depth_gate, depth_gate_inputs.
    """
    P = dict(core.named_parameters())
    dims = opts["dims"]
    coupled, peephole = opts.get("coupled", False), opts.get("peephole", False)
    gate = opts.get("depth_gate", "learned")
    terms = set(opts.get("depth_gate_inputs", ("x", "c_prev", "c_lower"))) if gate == "learned" else set()
    outs_c, final, inp = None, [], x
    for k in range(len(dims) - 1):
        H, lower = dims[k + 1], (dims[k] if k > 0 else None)
        gated_input = k == 0 and opts.get("gate_input", False)
        depth = lower is not None or gated_input

        def p(name, k=k):
            return P[f"layers.{k}.{name}"]

        h, c = state[k]
        hs, cs = [], []
        for t in range(inp.shape[0]):
            xt = inp[t]
            xg = xt * torch.exp(p("stabiliser")) if opts.get("stabiliser", False) else xt
            z = xg @ p("weight_ih").T + p("bias_ih") + h @ p("weight_hh").T + p("bias_hh")
            if coupled:
                zi, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H :]
            else:
                zi, zf, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
            if peephole:
                zi = zi + p("peephole_i") * c
            i = torch.sigmoid(zi)
            if coupled:
                f = 1 - i
            else:
                f = torch.sigmoid(zf + p("peephole_f") * c if peephole else zf)
            g = torch.tanh(zg)
            c_new = f * c + i * g
            if depth:
                if gated_input:
                    carried = xt @ p("depth_proj").T  # W_x0 x_t
                else:
                    c_low = outs_c[t]
                    carried = c_low if lower == H else c_low @ p("depth_proj").T  # c^L_t or P c^L_t
                if gate == "open":
                    d = torch.ones_like(c_new)
                else:
                    a = p("depth_bias").expand_as(c_new)  # b_d; the constant gate stops here
                    if "x" in terms:
                        a = a + xg @ p("depth_weight_ih").T
                    if "c_prev" in terms:
                        a = a + p("depth_weight_cc") * c
                    if "c_lower" in terms and not gated_input:
                        w = p("depth_weight_lc")
                        a = a + (w * c_low if lower == H else c_low @ w.T)
                    d = torch.sigmoid(a)
                c_new = c_new + d * carried
            if peephole:
                zo = zo + p("peephole_o") * c_new
            o = torch.sigmoid(zo)
            h = o * torch.tanh(c_new)
            c = c_new
            hs.append(h)
            cs.append(c)
        outs_h, outs_c = torch.stack(hs), torch.stack(cs)
        final.append((h, c))
        inp = outs_h
    return outs_h, final


def _random_state(core, B, dtype):
    return [
        tuple(torch.randn(B, layer.hidden_dim, dtype=dtype) * 0.5 for _ in range(2)) for layer in core.layers
    ]


OPTIONS = list(itertools.product([False, True], repeat=4))  # gate_input, peephole, coupled, stabiliser
DIMS = [[4, 4, 4], [4, 6, 3]]


def _check_against_reference(core, opts, T=6, B=3):
    """Outputs, final states and every gradient (input, initial states, each parameter) in float64."""
    dims = opts["dims"]
    core = core.double()
    with torch.no_grad():
        for p in core.parameters():
            p.uniform_(-0.6, 0.6)
    x = torch.randn(T, B, dims[0], dtype=torch.float64, requires_grad=True)
    state = [tuple(s.requires_grad_() for s in layer) for layer in _random_state(core, B, torch.float64)]
    w_out = torch.randn(T, B, dims[-1], dtype=torch.float64)

    def run(fn):
        out, final = fn(x, state)
        loss = (out * w_out).sum() + sum((h**2).sum() + (c * 0.3).sum() for h, c in final)
        leaves = [x, *[s for layer in state for s in layer], *core.parameters()]
        return out, final, torch.autograd.grad(loss, leaves)

    out, final, grads = run(lambda x, s: core(x, s))
    ref_out, ref_final, ref_grads = run(lambda x, s: reference_dglstm(core, x, s, opts))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    assert len(final) == len(ref_final) == len(dims) - 1  # a state per layer, none left out by zip
    for (h, c), (rh, rc) in zip(final, ref_final):
        torch.testing.assert_close(h, rh, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c, rc, rtol=1e-10, atol=1e-10)
    names = [
        "x",
        *[f"state{i}" for i in range(2 * (len(dims) - 1))],
        *[n for n, _ in core.named_parameters()],
    ]
    assert len(names) == len(grads) == len(ref_grads)
    for name, g, rg in zip(names, grads, ref_grads):
        torch.testing.assert_close(
            g, rg, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"gradient of {name}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", DIMS, ids=["equal", "unequal"])
@pytest.mark.parametrize("gate_input,peephole,coupled,stabiliser", OPTIONS)
def test_dglstm_matches_per_step_reference(backend, gate_input, peephole, coupled, stabiliser, dims):
    torch.manual_seed(hash((gate_input, peephole, coupled, stabiliser, tuple(dims))) % 1000)
    opts = dict(
        dims=[5, *dims], gate_input=gate_input, peephole=peephole, coupled=coupled, stabiliser=stabiliser
    )
    core = build_core(
        "dglstm",
        5,
        dims,
        gate_input=gate_input,
        peephole=peephole,
        coupled=coupled,
        backend=backend,
        stabiliser=stabiliser,
    )
    _check_against_reference(core, opts)


# The ablations of the depth gate: every subset of the learned gate's terms, the open and the constant gate,
# each with and without the first layer's gated input, with peepholes and coupling on in turn.
GATE_VARIANTS = [
    ("learned", list(s)) for n in range(4) for s in itertools.combinations(("x", "c_prev", "c_lower"), n)
]
GATE_VARIANTS += [("open", ["x", "c_prev", "c_lower"]), ("constant", ["x", "c_prev", "c_lower"])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", DIMS, ids=["equal", "unequal"])
@pytest.mark.parametrize("gate_input", [False, True], ids=["", "gate_input"])
@pytest.mark.parametrize(
    "depth_gate,inputs", GATE_VARIANTS, ids=lambda v: v if isinstance(v, str) else "+".join(v) or "none"
)
def test_depth_gate_ablations_match_per_step_reference(backend, dims, gate_input, depth_gate, inputs):
    idx = GATE_VARIANTS.index((depth_gate, inputs))
    torch.manual_seed(100 + idx)
    opts = dict(
        dims=[5, *dims],
        gate_input=gate_input,
        peephole=idx % 2 == 1,
        coupled=idx % 3 == 2,
        depth_gate=depth_gate,
        depth_gate_inputs=inputs,
    )
    core = build_core(
        "dglstm",
        5,
        dims,
        gate_input=gate_input,
        peephole=opts["peephole"],
        coupled=opts["coupled"],
        backend=backend,
        depth_gate=depth_gate,
        depth_gate_inputs=inputs,
    )
    _check_against_reference(core, opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_gate_is_exactly_one_in_float32(backend):
    """d ≡ 1 through the kernels: c_t - (f c_{t-1} + i g) equals the carried lower cell to the last bit in
    float32, and the top cell's gradient reaches the lower cell undamped (no σ' factor)."""
    torch.manual_seed(9)
    T, B, H = 5, 2, 4
    core = build_core("dglstm", H, [H, H], depth_gate="open", backend=backend)
    assert not any("depth" in n for n, _ in core.named_parameters())  # an open path has no gate parameters
    x = torch.randn(T, B, H)
    zeros = (torch.zeros(B, H), torch.zeros(B, H))
    _, c_low, _ = core.layers[0](x, zeros)
    c_low = c_low.detach().requires_grad_()
    top = core.layers[1]
    with torch.no_grad():
        top.weight_ih.zero_(), top.weight_hh.zero_(), top.bias_ih.fill_(-30.0), top.bias_hh.zero_()
    # i = f = o = σ(-30) ≈ 9e-14: the cell is (almost) only the carried term, so c_top ≈ c_low
    _, c_top, _ = top(torch.zeros(T, B, H), zeros, c_low)
    torch.testing.assert_close(c_top, c_low, rtol=0, atol=1e-6)
    c_top[-1].sum().backward()
    g = c_low.grad[-1]
    torch.testing.assert_close(g, torch.ones_like(g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dglstm_float32_matches_reference(backend):
    """The fused float32 path (own vectorised exp) against the reference in float64."""
    torch.manual_seed(3)
    core = build_core("dglstm", 16, [32, 32], peephole=True, backend=backend)
    x = torch.randn(12, 4, 16)
    state = _random_state(core, 4, torch.float32)
    out, _ = core(x, state)
    core64 = build_core("dglstm", 16, [32, 32], peephole=True).double()
    core64.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
    state64 = [tuple(s.double() for s in layer) for layer in state]
    ref, _ = reference_dglstm(core64, x.double(), state64, dict(dims=[16, 32, 32], peephole=True))
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dglstm_float32_gradients_match_reference(backend):
    """The float32 backward (with MKL's packed GEMM under `cpp`) against the reference's gradients in float64."""
    torch.manual_seed(4)
    core = build_core("dglstm", 16, [32, 32], peephole=True, backend=backend)
    x = torch.randn(12, 4, 16, requires_grad=True)
    state = _random_state(core, 4, torch.float32)
    out, _ = core(x, state)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [x, *core.parameters()])
    core64 = build_core("dglstm", 16, [32, 32], peephole=True).double()
    core64.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    state64 = [tuple(s.double() for s in layer) for layer in state]
    ref, _ = reference_dglstm(core64, x64, state64, dict(dims=[16, 32, 32], peephole=True))
    refs = torch.autograd.grad((ref * w.double()).sum(), [x64, *core64.parameters()])
    names = ["x"] + [n for n, _ in core.named_parameters()]
    for name, g, r in zip(names, grads, refs):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


ROW_VARIANT_CHECK = """
import json, torch
from dglstm_lm.models import build_core
from dglstm_lm.models.kernels import cpp_extension
torch.manual_seed(6)
core = build_core("dglstm", 16, [37, 37], peephole=True, backend="cpp")  # 37: a remainder after every width
x = torch.randn(9, 5, 16, requires_grad=True)
out, _ = core(x, core.init_state(5))
w = torch.randn_like(out)
grads = torch.autograd.grad((out * w).sum(), [x, *core.parameters()])
ref = build_core("dglstm", 16, [37, 37], peephole=True, backend="python").double()
ref.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
x64 = x.detach().double().requires_grad_()
out64, _ = ref(x64, ref.init_state(5, dtype=torch.float64))
refs = torch.autograd.grad((out64 * w.double()).sum(), [x64, *ref.parameters()])
dev = max(float(((g.double() - r).abs() / (1e-5 + 1e-4 * r.abs())).max()) for g, r in zip(grads, refs))
cap = torch.backends.cpu.get_cpu_capability()
print(json.dumps([cpp_extension().row_isa(), cap, float((out.double() - out64).abs().max()), dev]))
"""


@pytest.mark.parametrize("capability,rows", ROW_VARIANTS)
def test_every_row_variant_matches_the_python_scan(capability, rows):
    """The fused rows are compiled for AVX-512, AVX2 and baseline x86-64 and chosen per process, following
    ATEN_CPU_CAPABILITY: each variant this CPU can run, forced in a fresh process, against the float64
    python scan (itself proved against the per-step reference above)."""
    if cpp_extension() is None:
        pytest.skip("no fused kernel")
    _, _, out_err, grad_err = run_row_variant(capability, rows, ROW_VARIANT_CHECK)
    assert out_err < 2e-6 and grad_err <= 1, (out_err, grad_err)  # gradients: |g - r| <= 1e-5 + 1e-4 |r|


def test_each_backend_packs_for_its_gemm_path(monkeypatch):
    """model.backend=cpp multiplies by W_hh (forward) and W_hh^T (backward) on a weight packed once per window
    for the path chosen for this CPU and width; cpp_mkl, cpp_onednn and cpp_brgemm force MKL's packed GEMM,
    oneDNN's reordered weight and the brgemm micro-kernel's [K, N] weight; cpp_blas and float64 never pack."""
    from dglstm_lm.models import kernels

    if cpp_extension() is None:
        pytest.skip("no fused kernel")
    if torch.backends.mkl.is_available() and torch.backends.mkldnn.is_available():
        # the x86 wheels: both libraries are there, so both paths can run
        assert kernels.packed_gemm_available() and kernels.onednn_gemm_available()
    if not (kernels.packed_gemm_available() and kernels.onednn_gemm_available()):
        pytest.skip("this torch lacks MKL or oneDNN")
    packed = []
    real = kernels._pack
    monkeypatch.setattr(
        kernels,
        "_pack",
        lambda w, rows, mode: packed.append((tuple(w.shape), rows, mode)) or real(w, rows, mode),
    )

    def run(backend, dtype):
        packed.clear()
        core = build_core("dglstm", 8, [6, 6], backend=backend).to(dtype)
        out, _ = core(torch.randn(5, 3, 8, dtype=dtype), core.init_state(3, dtype=dtype))
        out.sum().backward()
        return packed[:]

    forced = [("cpp_mkl", "cpp_mkl"), ("cpp_onednn", "cpp_onednn"), ("cpp", kernels.gemm_path(hidden=6))]
    if kernels.brgemm_available():
        forced.append(("cpp_brgemm", "cpp_brgemm"))
    for backend, mode in forced:
        # two layers forward, then two backward
        assert run(backend, torch.float32) == [((24, 6), 3, mode)] * 2 + [((6, 24), 3, mode)] * 2
    intel = kernels.cpu_vendor() == "GenuineIntel"
    assert kernels.gemm_path() == ("cpp_mkl" if intel else "cpp_onednn")
    assert kernels.gemm_path(hidden=6) == (
        "cpp_mkl" if intel or not kernels.brgemm_available() else "cpp_brgemm"
    )
    assert {m for *_, m in run("cpp_blas", torch.float32)} == {"cpp_plain"}
    assert {m for *_, m in run("cpp", torch.float64)} == {"cpp_plain"}


def test_the_gemm_path_is_chosen_per_cpu_and_precision(monkeypatch):
    """cpp: MKL's packed GEMM on Intel, oneDNN elsewhere (its brgemm micro-kernel up to BRGEMM_MAX_HIDDEN units,
    its inner product above), the other where one is missing, a plain GEMM in float64 or with neither; under
    autocast bf16 oneDNN's bf16 GEMM wherever the CPU has it, but for narrow layers outside Intel. The forcing
    backends keep their library (cpp_mkl and cpp_brgemm stay float32 under autocast)."""
    from dglstm_lm.models import kernels

    def case(
        vendor,
        mkl=True,
        onednn=True,
        bf16=True,
        dtype=torch.float32,
        backend="cpp",
        low=None,
        hidden=None,
        amx=False,
    ):
        monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(kernels, "packed_gemm_available", lambda: mkl)
        monkeypatch.setattr(kernels, "onednn_gemm_available", lambda: onednn)
        monkeypatch.setattr(kernels, "onednn_bf16_available", lambda: onednn and bf16)
        monkeypatch.setattr(kernels, "brgemm_available", lambda: onednn)
        monkeypatch.setattr(kernels, "brgemm_bf16_available", lambda: onednn and amx)
        return kernels.gemm_path(dtype, backend, low, hidden)

    bf = torch.bfloat16
    narrow, narrow_bf16 = kernels.BRGEMM_MAX_HIDDEN["fp32"], kernels.BRGEMM_MAX_HIDDEN["bf16"]
    assert narrow_bf16 < narrow
    assert case("AuthenticAMD", hidden=200) == case("AuthenticAMD", hidden=narrow) == "cpp_brgemm"
    assert case("AuthenticAMD", hidden=narrow + 1) == "cpp_onednn"
    assert case("AuthenticAMD", hidden=narrow_bf16, low=bf) == "cpp_brgemm"
    assert case("AuthenticAMD", hidden=narrow_bf16 + 1, low=bf) == "cpp_onednn_bf16"
    assert (
        case("AuthenticAMD", hidden=narrow, low=bf, bf16=False) == "cpp_brgemm"
    )  # no bf16 GEMM: fp32's rule
    assert case("GenuineIntel", hidden=200) == "cpp_mkl"  # measured on AMD only
    assert case("AuthenticAMD", hidden=200, onednn=False) == "cpp_mkl"
    assert case("AuthenticAMD", hidden=200, dtype=torch.float64) == "cpp_plain"
    assert case("GenuineIntel", backend="cpp_brgemm", hidden=4096, low=bf) == "cpp_brgemm"
    assert case("AuthenticAMD", backend="cpp_brgemm", onednn=False) == "cpp_plain"

    assert case("GenuineIntel") == "cpp_mkl"
    assert case("AuthenticAMD") == "cpp_onednn"
    assert case("AuthenticAMD", onednn=False) == "cpp_mkl"
    assert case("GenuineIntel", mkl=False) == "cpp_onednn"
    assert case("AuthenticAMD", mkl=False, onednn=False) == "cpp_plain"
    assert case("AuthenticAMD", dtype=torch.float64) == "cpp_plain"
    assert case("GenuineIntel", low=bf) == case("AuthenticAMD", low=bf) == "cpp_onednn_bf16"
    assert case("AuthenticAMD", bf16=False, low=bf) == "cpp_onednn"
    assert case("AuthenticAMD", low=torch.float16) == "cpp_onednn"  # only bf16 has a low-precision path
    assert (
        case("AuthenticAMD", backend="cpp_mkl")
        == case("AuthenticAMD", backend="cpp_mkl", low=bf)
        == "cpp_mkl"
    )
    assert case("GenuineIntel", backend="cpp_onednn") == "cpp_onednn"
    assert case("GenuineIntel", backend="cpp_onednn", low=bf) == "cpp_onednn_bf16"
    assert case("GenuineIntel", backend="cpp_blas", low=bf) == "cpp_plain"
    assert case("", mkl=False, backend="cpp_mkl") == "cpp_plain"

    # AMX: under autocast bf16 the brgemm micro-kernel in bfloat16, at every even width, on any vendor;
    # odd widths (bfloat16 pairs) and float32 keep their paths, and so do the forcing backends
    for vendor in ("GenuineIntel", "AuthenticAMD"):
        for hidden in (200, 650, None):
            assert case(vendor, amx=True, low=bf, hidden=hidden) == "cpp_brgemm_bf16"
    assert case("GenuineIntel", amx=True, low=bf, hidden=201) == "cpp_onednn_bf16"
    assert case("GenuineIntel", amx=True, hidden=200) == "cpp_mkl"
    assert case("GenuineIntel", amx=True, low=bf, hidden=200, bf16=False) == "cpp_mkl"
    assert case("GenuineIntel", amx=True, low=bf, backend="cpp_onednn") == "cpp_onednn_bf16"
    assert case("GenuineIntel", amx=True, low=bf, backend="cpp_brgemm") == "cpp_brgemm"
    assert case("GenuineIntel", amx=True, low=bf, backend="cpp_mkl") == "cpp_mkl"


def test_the_weight_gradients_library_is_chosen_per_cpu_and_path(monkeypatch):
    """wgrad_path: BLAS for the layers on brgemm on a CPU without AVX-512 (measured faster on a Zen 3),
    oneDNN on every other oneDNN path; $DGLSTM_WGRAD forces either, and refuses anything else in one line."""
    from dglstm_lm.errors import ConfigError
    from dglstm_lm.models import kernels

    monkeypatch.delenv("DGLSTM_WGRAD", raising=False)
    for avx512, expected in ((False, "blas"), (True, "onednn")):
        monkeypatch.setattr(kernels, "_avx512", lambda v=avx512: v)
        assert kernels.wgrad_path("cpp_brgemm") == expected
        assert kernels.wgrad_path("cpp_onednn") == "onednn"
        for forced in ("onednn", "blas"):
            monkeypatch.setenv("DGLSTM_WGRAD", forced)
            assert kernels.wgrad_path("cpp_brgemm") == kernels.wgrad_path("cpp_onednn") == forced
        monkeypatch.delenv("DGLSTM_WGRAD")
    for path in ("cpp_mkl", "cpp_plain"):  # the other paths: torch's own GEMM, whatever is asked
        for forced in ("onednn", "blas", "auto"):
            monkeypatch.setenv("DGLSTM_WGRAD", forced)
            assert kernels.wgrad_path(path) == "blas"
    monkeypatch.setenv("DGLSTM_WGRAD", "mkl")
    with pytest.raises(ConfigError, match="DGLSTM_WGRAD=mkl: expected onednn, blas or auto"):
        kernels.wgrad_path("cpp_brgemm")


def _cpu_vendor() -> str:
    """vendor_id from /proc/cpuinfo, read here (not through the kernels module under test)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


GEMM_PATH_CHECK = """
import json, sys, torch
from dglstm_lm.models import build_core, kernels
used = []
real = kernels._pack
kernels._pack = lambda w, rows, mode: used.append(mode) or real(w, rows, mode)
calls = []  # the input projections' oneDNN inner products: is the first operand a transposed view (a dW)?
real_mm = kernels._onednn_mm
kernels._onednn_mm = lambda a, b, bias=None: calls.append(not a.is_contiguous()) or real_mm(a, b, bias)
torch.manual_seed(7)
# 70 units: brgemm runs 5 column blocks forward (4H = 280) and 2 backward (64 + 6), each with a remainder
core = build_core("dglstm", 16, [70, 70], peephole=True, coupled=sys.argv[2] == "coupled", backend=sys.argv[1])
x = torch.randn(9, 5, 16, requires_grad=True)
out, _ = core(x, core.init_state(5))
w = torch.randn_like(out)
with torch.profiler.profile(record_shapes=True) as prof:  # the GEMMs the backward ran, the C++ kernel's too
    grads = torch.autograd.grad((out * w).sum(), [x, *core.parameters()])
G = 3 if sys.argv[2] == "coupled" else 4
# the weight gradients of W_ih (2 layers) and W_hh (2 layers, in the C++ backward): dz^T [G*H, T*B] first
wgrads = {k: sum(e.key == k and list(e.input_shapes[0][:2]) == [G * 70, 45] for e in prof.events())
          for k in ("aten::mm", "mkldnn::_linear_pointwise")}
ref = build_core("dglstm", 16, [70, 70], peephole=True, coupled=sys.argv[2] == "coupled", backend="python").double()
ref.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
x64 = x.detach().double().requires_grad_()
out64, _ = ref(x64, ref.init_state(5, dtype=torch.float64))
refs = torch.autograd.grad((out64 * w.double()).sum(), [x64, *ref.parameters()])
dev = max(float(((g.double() - r).abs() / (1e-5 + 1e-4 * r.abs())).max()) for g, r in zip(grads, refs))
print(json.dumps([sorted(set(used)), float((out.double() - out64).abs().max()), dev, calls, wgrads]))
"""


@pytest.mark.parametrize("coupled", ["plain", "coupled"])
@pytest.mark.parametrize(
    "backend,wgrad",
    [
        ("cpp", ""),
        ("cpp_blas", ""),
        ("cpp_mkl", ""),
        *((b, w) for b in ("cpp_onednn", "cpp_brgemm") for w in ("onednn", "blas")),
    ],
)
def test_every_gemm_path_matches_the_python_scan(backend, wgrad, coupled):
    """Each path of the per-step GEMM forced in a fresh process (its library's state and caches its own)
    against the float64 python scan, forward and gradients, to the float32 tolerances of the tests above;
    the oneDNN paths with their weight gradients forced to each library ($DGLSTM_WGRAD, wgrad_path)."""
    import json

    from .conftest import PY, run_cli

    if cpp_extension() is None:
        pytest.skip("no fused kernel")
    res = run_cli([PY, "-c", GEMM_PATH_CHECK, backend, coupled], env={"DGLSTM_WGRAD": wgrad})
    assert res.returncode == 0, res.stderr
    used, out_err, grad_err, calls, wgrads = json.loads(res.stdout.strip().splitlines()[-1])
    if wgrad:
        # the input projections (2 layers' W_ih, 1 W_xd) ran on oneDNN: forward and dx always, their weight
        # gradients (a transposed first operand) only when asked
        assert sorted(calls) == [False] * 6 + [True] * (3 if wgrad == "onednn" else 0), calls
        # the W_ih and W_hh gradients of both layers ran where asked, W_hh's in the C++ backward: 4 GEMMs
        # with dz^T first, all on oneDNN or all on BLAS
        assert wgrads == (
            {"aten::mm": 0, "mkldnn::_linear_pointwise": 4}
            if wgrad == "onednn"
            else {"aten::mm": 4, "mkldnn::_linear_pointwise": 0}
        ), wgrads
    expected = {
        "cpp_blas": "cpp_plain",
        "cpp_mkl": "cpp_mkl",
        "cpp_onednn": "cpp_onednn",
        "cpp_brgemm": "cpp_brgemm",
        # the CPU's choice at 70 units in fp32 (torch's CPU build has MKL and oneDNN's brgemm): MKL's packed
        # GEMM on Intel, oneDNN's brgemm micro-kernel elsewhere (docs/models.md, Speed)
        "cpp": "cpp_mkl" if _cpu_vendor() == "GenuineIntel" else "cpp_brgemm",
    }[backend]
    assert used == [expected]  # the path asked for (or chosen) is the one that ran
    assert out_err < 2e-6 and grad_err <= 1, (out_err, grad_err)  # gradients: |g - r| <= 1e-5 + 1e-4 |r|


@pytest.mark.parametrize("path", ["cpp_onednn_bf16", "cpp_brgemm_bf16"])
@pytest.mark.parametrize("coupled", [False, True])
def test_bf16_gemm_is_within_bf16_tolerance_of_float32(coupled, path, monkeypatch):
    """Under autocast bf16 the fused kernel's per-step GEMMs (forward h_{t-1} W_hh^T, backward dz_t W_hh, and
    dW_hh) take bfloat16 inputs with float32 accumulation, while the cell state and the gates stay float32:
    on oneDNN's inner product (forced by cpp_onednn), and on the brgemm micro-kernel in bfloat16 (AMX; what
    cpp chooses there). Against the same kernel in float32: outputs within 2e-2 absolute (h and c are O(1);
    one bf16 rounding is 2^-9 relative, and it enters every step's pre-activations), every gradient within
    3% of its largest entry; and it does differ from float32 (the bf16 GEMM ran: h W_hh^T is not computed in
    float32)."""
    from dglstm_lm.models import kernels

    if not kernels.onednn_bf16_available():
        pytest.skip("no bfloat16 GEMM on this CPU")
    if path == "cpp_brgemm_bf16" and not kernels.brgemm_bf16_available():
        pytest.skip("no bfloat16 brgemm on this CPU (AMX)")
    backend = "cpp_onednn" if path == "cpp_onednn_bf16" else "cpp"
    used = []
    real = kernels._pack
    monkeypatch.setattr(kernels, "_pack", lambda w, rows, mode: used.append(mode) or real(w, rows, mode))
    torch.manual_seed(11)
    T, B, H = 12, 4, 48
    G = 3 if coupled else 4
    args = [
        torch.randn(T, B, G * H),  # gx
        torch.randn(T, B, H),  # gd
        torch.randn(T, B, H),  # m
        torch.randn(B, H) * 0.5,  # h0
        torch.randn(B, H) * 0.5,  # c0
        torch.randn(G * H, H) * H**-0.5,  # w_hh
    ]
    wcd = torch.randn(H)

    def run(bf16):
        leaves = [a.clone().requires_grad_() for a in [*args, wcd]]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            h, c = kernels.scan(*leaves[:6], wcd=leaves[6], coupled=coupled, backend=backend)
        assert h.dtype == c.dtype == torch.float32  # the state stays float32
        grads = torch.autograd.grad((h * wh).sum() + (c * wc).sum(), leaves)
        return h, c, grads

    wh, wc = torch.randn(T, B, H), torch.randn(T, B, H)
    h32, c32, g32 = run(False)
    assert set(used) == {kernels.gemm_path(hidden=H, backend=backend)}  # float32
    used.clear()
    h16, c16, g16 = run(True)
    assert set(used) == {path}
    for a, b in ((h16, h32), (c16, c32)):
        err = float((a - b).detach().abs().max())
        assert 1e-5 < err < 2e-2, err
    names = ["gx", "gd", "m", "h0", "c0", "w_hh", "wcd"]
    for name, a, b in zip(names, g16, g32):
        rel = float((a - b).abs().max() / b.abs().max())
        assert rel < 3e-2, (name, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_forward_equals_the_training_forward(backend, monkeypatch):
    """Under no_grad the fused kernel keeps no per-step activations (nothing will run backward): the outputs
    are bit-for-bit those of a forward pass that keeps them."""
    from dglstm_lm.models import kernels

    torch.manual_seed(5)
    core = build_core("dglstm", 16, [32, 32], peephole=True, backend=backend)
    x = torch.randn(12, 4, 16)
    state = _random_state(core, 4, torch.float32)
    out, (hs, cs) = core(x, state)
    saved = []  # (rows of acts kept, of tanh_c kept) per layer, from the C++ forward's own outputs
    ext = cpp_extension()
    if backend.startswith("cpp"):

        class Spy:
            def forward(self, *args):
                res = ext.forward(*args)
                saved.append((res[2].shape[0], res[3].shape[0]))
                return res

        monkeypatch.setattr(kernels, "cpp_extension", lambda *a, **k: Spy())
    with torch.no_grad():
        out_eval, (hs_eval, cs_eval) = core(x, state)
    assert torch.equal(out.detach(), out_eval)
    assert all(torch.equal(a.detach(), b) for a, b in zip([*hs, *cs], [*hs_eval, *cs_eval]))
    if backend.startswith("cpp"):
        assert saved == [(1, 1), (1, 1)]  # one step kept, not 12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("peephole,coupled,depth", list(itertools.product([False, True], repeat=3)))
def test_scan_gradcheck(backend, peephole, coupled, depth):
    torch.manual_seed(0)
    T, B, H = 4, 2, 3
    G = 3 if coupled else 4

    def mk(*shape):
        return (torch.randn(*shape, dtype=torch.float64) * 0.5).requires_grad_()

    args = [
        mk(T, B, G * H),
        mk(T, B, H) if depth else None,
        mk(T, B, H) if depth else None,
        mk(B, H),
        mk(B, H),
        mk(G * H, H),
        mk(H) if peephole else None,
        mk(H) if peephole and not coupled else None,
        mk(H) if peephole else None,
        mk(H) if depth else None,
    ]
    assert torch.autograd.gradcheck(lambda *a: scan(*a, coupled=coupled, backend=backend), tuple(args))


# ------------------------------------------------------------------------------------------ LSTM equivalences
def _copy_into_nn_lstm(layers, nn_lstm):
    with torch.no_grad():
        for k, layer in enumerate(layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(nn_lstm, f"{name}_l{k}").copy_(getattr(layer, name))


@pytest.mark.parametrize("kind", ["stacked_lstm", "dglstm_first_layer"])
def test_own_lstm_layers_match_nn_lstm(kind):
    """LSTMLayer (fused ATen op) and the DGLSTM kernel without a depth path both equal nn.LSTM to 1e-5."""
    torch.manual_seed(1)
    T, B, E, H = 9, 4, 7, 11
    if kind == "stacked_lstm":
        layers = [LSTMLayer(E, H), LSTMLayer(H, H)]
    else:
        layers = [DGLSTMLayer(E, H)]  # first layer, no gate_input: a plain LSTM run by the scan kernel
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.uniform_(p, -0.3, 0.3)
    ref = torch.nn.LSTM(E, H, num_layers=len(layers))
    _copy_into_nn_lstm(layers, ref)
    x = torch.randn(T, B, E)
    h0 = torch.randn(len(layers), B, H)
    c0 = torch.randn(len(layers), B, H)
    ref_out, (ref_h, ref_c) = ref(x, (h0, c0))
    inp = x
    for k, layer in enumerate(layers):
        inp, _, (h, c) = layer(inp, (h0[k], c0[k]))
        torch.testing.assert_close(h, ref_h[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(c, ref_c[k], rtol=0, atol=1e-5)
    torch.testing.assert_close(inp, ref_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dglstm_with_gate_shut_equals_stacked_lstm(backend):
    """d ≡ 0 (depth-gate bias far negative) leaves exactly a stacked LSTM: same weights, same outputs."""
    torch.manual_seed(2)
    V, E, dims, T, B = 50, 8, [10, 10, 10], 12, 3
    stacked = LanguageModel(V, E, build_core("stacked_lstm", E, dims))
    stacked.reset_parameters("uniform", 0.3)
    dg = LanguageModel(V, E, build_core("dglstm", E, dims, backend=backend))
    dg.reset_parameters("uniform", 0.3, depth_gate_bias=-1e4)
    missing = dg.init_from(stacked.state_dict())
    assert missing and all(".depth_" in k for k in missing), missing  # only the depth path is new
    tokens = torch.randint(V, (T, B))
    out_s, st_s = stacked(tokens, stacked.init_state(B))
    out_d, st_d = dg(tokens, dg.init_state(B))
    torch.testing.assert_close(out_d, out_s, rtol=0, atol=1e-5)
    for (hs, cs), (hd, cd) in zip(st_s, st_d):
        torch.testing.assert_close(hd, hs, rtol=0, atol=1e-5)
        torch.testing.assert_close(cd, cs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_reaches_bottom_cell_through_the_depth_path(backend):
    """A loss on the top layer reaches the bottom layer's cells through the gated linear path alone: with the
    h path cut (upper layer blind to its input) the gradient is non-zero when the gate is open, and exactly
    zero when it is shut."""
    torch.manual_seed(4)
    T, B, E, H = 7, 2, 5, 6
    core = build_core("dglstm", E, [H, H], backend=backend)
    for p in core.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)
    bottom, top = core.layers
    with torch.no_grad():
        top.weight_ih.zero_()  # cut the h path: the upper layer no longer sees h^L
        top.depth_weight_ih.zero_()
    x = torch.randn(T, B, E)

    def bottom_cell_grad(depth_bias):
        with torch.no_grad():
            top.depth_bias.fill_(depth_bias)
        h_low, c_low, _ = bottom(x, (torch.zeros(B, H), torch.zeros(B, H)))
        c_low.retain_grad()
        h_top, _, _ = top(h_low, (torch.zeros(B, H), torch.zeros(B, H)), c_low)
        h_top.sum().backward()
        return c_low.grad

    open_grad = bottom_cell_grad(0.0)
    assert open_grad.abs().min() > 0, "every bottom cell should receive gradient through an open gate"
    shut_grad = bottom_cell_grad(-1e4)
    assert torch.equal(shut_grad, torch.zeros_like(shut_grad))


# ------------------------------------------------------------------------------------------ model wrapper
def closed_form_params(
    name,
    V,
    E,
    dims,
    tie=False,
    gate_input=False,
    peephole=False,
    coupled=False,
    stabiliser=False,
    depth_gate="learned",
    depth_gate_inputs=("x", "c_prev", "c_lower"),
):
    """Parameter count from the equations, independently of the modules."""
    n = V * E + V + (0 if tie else V * dims[-1])  # embedding, decoder bias, decoder weight
    inputs = [E, *dims[:-1]]
    terms = set(depth_gate_inputs) if depth_gate == "learned" else set()
    for k, (In, H) in enumerate(zip(inputs, dims)):
        if name == "rnn":
            n += H * In + H * H + 2 * H
            continue
        G = 3 if (name == "dglstm" and coupled) else 4
        n += G * H * (In + H) + 2 * G * H  # W_ih, W_hh, b_ih, b_hh (nn.LSTM's layout); residual: no more
        if name != "dglstm":
            continue
        if peephole:
            n += (2 if coupled else 3) * H
        if stabiliser:
            n += 1  # s
        if k == 0 and not gate_input:
            continue  # the first layer has no depth path
        n += 0 if depth_gate == "open" else H  # b_d
        n += H * In if "x" in terms else 0  # W_xd
        n += H if "c_prev" in terms else 0  # w_cd
        if k == 0:
            n += H * In  # W_x0
        else:
            L = dims[k - 1]
            n += (H if L == H else H * L) if "c_lower" in terms else 0  # w_ld: vector or matrix
            n += 0 if L == H else H * L  # P
    return n


PARAM_CASES = [
    (RNNConfig(), {}),
    (LSTMConfig(), {}),
    (StackedLSTMConfig(), {}),
    (StackedLSTMConfig(num_layers=3, hidden_dims=[30, 40, 20]), {}),
    (ResidualLSTMConfig(num_layers=3), {}),
    (DGLSTMConfig(), {}),
    (DGLSTMConfig(num_layers=3, hidden_dims=[30, 40, 20]), {}),
    (DGLSTMConfig(gate_input=True, peephole=True), {}),
    (DGLSTMConfig(coupled_gates=True, peephole=True), {}),
    (DGLSTMConfig(num_layers=3, stabiliser=True, gate_input=True), {}),
    (DGLSTMConfig(emb_dim=20, hidden_dim=20, tie_weights=True), {}),
    (DGLSTMConfig(depth_gate="open"), {}),
    (DGLSTMConfig(depth_gate="open", num_layers=3, hidden_dims=[30, 40, 20], gate_input=True), {}),
    (DGLSTMConfig(depth_gate="constant", num_layers=3, hidden_dims=[30, 40, 20]), {}),
    (DGLSTMConfig(depth_gate_inputs=["x", "c_lower"]), {}),
    (DGLSTMConfig(depth_gate_inputs=["c_prev"], num_layers=3, hidden_dims=[30, 40, 20], gate_input=True), {}),
    (DGLSTMConfig(depth_gate_inputs=[]), {}),
]


@pytest.mark.parametrize("cfg,_", PARAM_CASES, ids=lambda c: getattr(c, "name", ""))
def test_parameter_count_equals_closed_form(cfg, _, capsys):
    V = 97
    model = build_model(V, cfg)
    expected = closed_form_params(
        cfg.name,
        V,
        cfg.emb_dim,
        cfg.layer_dims,
        tie=cfg.tie_weights,
        gate_input=getattr(cfg, "gate_input", False),
        peephole=getattr(cfg, "peephole", False),
        coupled=getattr(cfg, "coupled_gates", False),
        stabiliser=getattr(cfg, "stabiliser", False),
        depth_gate=getattr(cfg, "depth_gate", "learned"),
        depth_gate_inputs=getattr(cfg, "depth_gate_inputs", ("x", "c_prev", "c_lower")),
    )
    with capsys.disabled():
        print(
            f"\n  {cfg.name:<13} dims {cfg.layer_dims}: {count_parameters(model):,} parameters (closed form {expected:,})"
        )
    assert count_parameters(model) == expected


def test_ptb_sizes_parameter_counts():
    """At PTB sizes the counts are the ones docs/models.md lists."""
    V = 10_000
    counts = {}
    for cfg in (
        LSTMConfig(),
        StackedLSTMConfig(),
        ResidualLSTMConfig(),
        DGLSTMConfig(),
        DGLSTMConfig(depth_gate="open"),
        DGLSTMConfig(depth_gate="constant"),
    ):
        counts[(cfg.name, getattr(cfg, "depth_gate", None))] = n = count_parameters(build_model(V, cfg))
        assert n == closed_form_params(
            cfg.name, V, 200, cfg.layer_dims, depth_gate=getattr(cfg, "depth_gate", "learned")
        )
    # docs/models.md's table
    assert counts[("stacked_lstm", None)] == counts[("residual_lstm", None)] == 4_653_200
    assert counts[("dglstm", "learned")] == 4_693_800
    assert counts[("dglstm", "open")] == 4_653_200
    assert counts[("dglstm", "constant")] == 4_653_400


@pytest.mark.parametrize("name", ["rnn", "lstm", "stacked_lstm", "dglstm"])
def test_state_carried_between_windows_equals_one_long_window(name):
    """Feeding a sequence in two windows with the state carried equals one pass (what BPTT relies on)."""
    torch.manual_seed(5)
    cfg = {"rnn": RNNConfig, "lstm": LSTMConfig, "stacked_lstm": StackedLSTMConfig, "dglstm": DGLSTMConfig}[
        name
    ](emb_dim=8, hidden_dim=8)
    model = build_model(30, cfg).eval()
    tokens = torch.randint(30, (10, 3))
    full, _ = model(tokens, model.init_state(3))
    first, state = model(tokens[:4], model.init_state(3))
    second, _ = model(tokens[4:], [tuple(t.detach() for t in layer) for layer in state])
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=0, atol=1e-6)


def test_weight_tying_shares_the_tensor():
    model = build_model(40, DGLSTMConfig(emb_dim=12, hidden_dim=12, tie_weights=True))
    assert model.decoder.weight is model.encoder.weight
    with pytest.raises(ValueError, match="tie_weights"):
        LanguageModel(40, 12, build_core("lstm", 12, [10]), tie_weights=True)


def test_evaluation_ignores_padding_exactly(tmp_path):
    """Sentence batches are right-padded: the summed NLL and the token count over padded batches of 3 equal
    those of unpadded batches of one sentence."""
    from dglstm_lm.data import make_batches, prepare
    from dglstm_lm.trainer import evaluate_batches

    from .conftest import write_corpus

    torch.manual_seed(6)
    varied = ["a", "a b c d e f", "b c", "c d e f g h i j", "d e f", "a b c d", "e", "f g h i j k l"]
    folder = write_corpus(tmp_path / "c", train=varied, valid=varied[:3], test=varied[3:6])
    corpus = prepare(data_dir=str(folder), root=tmp_path, verify_checksums=False)
    model = build_model(len(corpus.vocab), StackedLSTMConfig(emb_dim=6, hidden_dim=6)).double()
    padded = make_batches(corpus, "train", "sentence", 3, 5, shuffle=False)
    single = make_batches(corpus, "train", "sentence", 1, 5, shuffle=False)
    assert any((padded.get(0, i)[1] == -100).any() for i in range(len(padded)))  # there is padding to ignore
    nll_p, tok_p = evaluate_batches(model.float(), padded, torch.device("cpu"))
    nll_s, tok_s = evaluate_batches(model.float(), single, torch.device("cpu"))
    assert tok_p == tok_s == corpus.splits["train"].num_tokens
    assert nll_p == pytest.approx(nll_s, rel=1e-6)


def test_cpp_backend_where_it_cannot_run_is_a_config_error(monkeypatch):
    """model.backend=cpp names the fused CPU kernel: on a GPU, or without a compiler, say so before training."""
    from dglstm_lm.config import compose, validate
    from dglstm_lm.errors import ConfigError
    from dglstm_lm.models import check_backend, kernels

    m = validate(compose(["model=dglstm", "model.backend=cpp"])).model
    check_backend(m, "cpu")  # here it can
    with pytest.raises(ConfigError, match=r"model.backend=cpp: the fused C\+\+ kernel runs on the CPU only"):
        check_backend(m, "cuda")
    monkeypatch.setattr(kernels, "cpp_extension", lambda *a, **k: None)
    monkeypatch.setattr(kernels, "cpp_unavailable_reason", lambda: "no C++ compiler found")
    with pytest.raises(ConfigError, match=r"unavailable \(no C\+\+ compiler found\); use model.backend=auto"):
        check_backend(m, "cpu")
    check_backend(validate(compose(["model=dglstm"])).model, "cuda")  # auto: always fine


@pytest.mark.parametrize("init", ["uniform", "xavier"])
def test_stabiliser_starts_as_the_plain_layer(init):
    """s = 0 at the start under either init rule, so exp(s) = 1: the same outputs as without the option."""
    torch.manual_seed(8)
    cfg = dict(emb_dim=8, hidden_dim=8, num_layers=3, init=init)
    with_s = build_model(30, DGLSTMConfig(stabiliser=True, **cfg)).eval()
    plain = build_model(30, DGLSTMConfig(**cfg)).eval()
    assert [layer.stabiliser.item() for layer in with_s.core.layers] == [0.0, 0.0, 0.0]
    missing = with_s.init_from(plain.state_dict())  # the same weights; only the stabilisers are its own
    assert missing == [f"core.layers.{k}.stabiliser" for k in range(3)]
    tokens = torch.randint(30, (7, 2))
    torch.testing.assert_close(with_s(tokens, with_s.init_state(2))[0], plain(tokens, plain.init_state(2))[0])


def test_fused_kernel_refuses_mismatched_shapes():
    """A wrong batch in the initial state, or a depth input of another length, is an error, not a read past
    the end of a buffer."""
    if cpp_extension() is None:
        pytest.skip("no fused kernel")
    T, B, H = 3, 2, 4
    gx, w = torch.randn(T, B, 4 * H), torch.randn(4 * H, H)
    ok = dict(gd=torch.randn(T, B, H), m=torch.randn(T, B, H), wcd=torch.randn(H))
    h = torch.zeros(B, H)
    for backend in ("cpp", "cpp_blas"):
        scan(gx, ok["gd"], ok["m"], h, h, w, wcd=ok["wcd"], backend=backend)  # the right shapes run
        with pytest.raises(RuntimeError, match=r"h0 and c0 must be \[B, H\]"):
            scan(gx, None, None, torch.zeros(B + 1, H), torch.zeros(B + 1, H), w, backend=backend)
        with pytest.raises(RuntimeError, match=r"gd and m must be \[T, B, H\]"):
            scan(gx, ok["gd"][:-1], ok["m"][:-1], h, h, w, wcd=ok["wcd"], backend=backend)
