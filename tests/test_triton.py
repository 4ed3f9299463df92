"""The GPU backend of the DGLSTM's scan (model.backend=triton / triton_graph), proved on the CPU.

With TRITON_INTERPRET=1 set before the kernels are defined, Triton runs them on CPU tensors through its
interpreter, so the same kernels that run on a GPU are checked here against the Python backend and against the
per-step reference of test_models.py: outputs, final states and every gradient, in float64, for every option
and for equal and unequal widths. The interpreter checks indexing, masks and arithmetic, not speed, so the
sizes are tiny. The CUDA-graph cache runs its copy-in / replay / copy-out logic on the CPU without the
capture (the captured function is the eager loop itself). A slow test compiles the kernels for a real GPU
(sm_90, through the ptxas that Triton's wheel carries) without one. Also here: trainer.precision=bf16 and the
one-line errors of the backend, the precision and `make bench-gpu` where they cannot run.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys

import pytest
import torch

from .conftest import CI, PY, ROOT, run_cli  # noqa: E402

if CI:  # make setup installs the dev extras: under CI a missing Triton is a failure, not a skip
    importlib.import_module("triton")
else:
    pytest.importorskip("triton", reason="Triton is a test extra: pip install -e '.[dev]'")

from dglstm_lm.models import build_core, cores, kernels, triton_scan  # noqa: E402

from .test_models import DIMS, OPTIONS, _check_against_reference, _random_state, reference_dglstm  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def interpret():
    """TRITON_INTERPRET=1 for this module's tests; the kernels are defined under it (at their first import)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    mod = sys.modules.get("dglstm_lm.models.triton_kernels")
    if mod is not None and type(mod.fwd_step).__name__ != "InterpretedFunction":
        importlib.reload(mod)  # defined earlier for a GPU: define them again for the interpreter
    fwd, _ = triton_scan.kernels()
    assert type(fwd).__name__ == "InterpretedFunction"
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _scan_args(T, B, H, peephole, coupled, depth, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = 3 if coupled else 4

    def mk(*shape):
        return (torch.randn(*shape, generator=g, dtype=dtype) * 0.5).requires_grad_()

    return [
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


def _run(fn, args, seed=1):
    """Outputs and the gradient of every input of a loss on both outputs."""
    h, c = fn(*args)
    g = torch.Generator().manual_seed(seed)
    wh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    wc = torch.randn(c.shape, generator=g, dtype=c.dtype)
    loss = (h * wh).sum() + (c * wc).sum() + (h[-1] ** 2).sum()
    leaves = [a for a in args if a is not None]
    return h, c, torch.autograd.grad(loss, leaves)


FLAGS = list(itertools.product([False, True], repeat=3))  # peephole, coupled, depth


@pytest.mark.parametrize("peephole,coupled,depth", FLAGS)
def test_triton_scan_equals_python_backend(peephole, coupled, depth):
    """The scan itself, every combination of its options: h, c and every input's gradient, float64."""
    args = _scan_args(5, 3, 4, peephole, coupled, depth)
    ref = _run(lambda *a: kernels.scan(*a, coupled=coupled, backend="python"), args)
    got = _run(lambda *a: kernels.scan(*a, coupled=coupled, backend="triton"), args)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    for k, (a, b) in enumerate(zip(got[2], ref[2])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m, k=k: f"gradient {k}: {m}")


def test_a_run_records_the_triton_scan_as_its_path():
    """A run's record (metrics.json gemm) names the Triton scan where it ran, not "none"."""
    args = _scan_args(5, 3, 4, True, False, True)
    kernels.reset_gemm_record()
    _run(lambda *a: kernels.scan(*a, backend="triton"), args)
    assert kernels.gemm_record() == "triton (Triton scan)"
    kernels.reset_gemm_record()
    _run(lambda *a: kernels.scan(*a, backend="python"), args)
    assert kernels.gemm_record() == "python (PyTorch ops)"


@pytest.mark.parametrize("dims", DIMS, ids=["equal", "unequal"])
@pytest.mark.parametrize("gate_input,peephole,coupled,stabiliser", OPTIONS)
def test_triton_dglstm_matches_per_step_reference(gate_input, peephole, coupled, stabiliser, dims):
    """The whole core with backend=triton against the per-step equations: every option, both widths."""
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
        backend="triton",
        stabiliser=stabiliser,
    )
    _check_against_reference(core, opts, T=4, B=2)


@pytest.mark.parametrize(
    "depth_gate,inputs,gate_input",
    [
        ("open", ["x", "c_prev", "c_lower"], True),
        ("constant", ["x", "c_prev", "c_lower"], False),
        ("learned", [], True),
        ("learned", ["c_lower"], False),
    ],
)
def test_triton_depth_gate_ablations_match_reference(depth_gate, inputs, gate_input):
    torch.manual_seed(7)
    dims = [4, 6, 3]
    opts = dict(dims=[5, *dims], gate_input=gate_input, depth_gate=depth_gate, depth_gate_inputs=inputs)
    core = build_core(
        "dglstm",
        5,
        dims,
        gate_input=gate_input,
        backend="triton",
        depth_gate=depth_gate,
        depth_gate_inputs=inputs,
    )
    _check_against_reference(core, opts, T=4, B=2)


def test_triton_float32_matches_python_and_reference():
    """float32, the GPU's precision: against the python backend in float32 and the reference in float64."""
    torch.manual_seed(3)
    core = build_core("dglstm", 6, [8, 8], peephole=True, backend="triton")
    x = torch.randn(5, 3, 6)
    state = _random_state(core, 3, torch.float32)
    out, final = core(x, state)
    py = build_core("dglstm", 6, [8, 8], peephole=True, backend="python")
    py.load_state_dict(core.state_dict())
    out_py, _ = py(x, state)
    torch.testing.assert_close(out, out_py, rtol=0, atol=1e-6)
    core64 = build_core("dglstm", 6, [8, 8], peephole=True).double()
    core64.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
    ref, _ = reference_dglstm(
        core64,
        x.double(),
        [tuple(s.double() for s in layer) for layer in state],
        dict(dims=[6, 8, 8], peephole=True),
    )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    args = _scan_args(4, 3, 8, True, False, True, dtype=torch.float32)
    ref = _run(lambda *a: kernels.scan(*a, backend="python"), args)
    got = _run(lambda *a: kernels.scan(*a, backend="triton"), args)
    for a, b in zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_open_gate_is_exactly_one_in_float32():
    """σ(100) = 1 exactly in the kernel too: the open gate carries the lower cell undamped."""
    torch.manual_seed(9)
    T, B, H = 4, 2, 4
    core = build_core("dglstm", H, [H, H], depth_gate="open", backend="triton")
    x = torch.randn(T, B, H)
    zeros = (torch.zeros(B, H), torch.zeros(B, H))
    _, c_low, _ = core.layers[0](x, zeros)
    c_low = c_low.detach().requires_grad_()
    top = core.layers[1]
    with torch.no_grad():
        top.weight_ih.zero_(), top.weight_hh.zero_(), top.bias_ih.fill_(-30.0), top.bias_hh.zero_()
    _, c_top, _ = top(torch.zeros(T, B, H), zeros, c_low)
    torch.testing.assert_close(c_top, c_low, rtol=0, atol=1e-6)
    c_top[-1].sum().backward()
    torch.testing.assert_close(c_low.grad[-1], torch.ones(B, H), rtol=0, atol=1e-6)


def test_triton_scan_gradcheck():
    """Finite differences on the smallest case with every term (peepholes, depth path)."""
    args = _scan_args(2, 1, 2, True, False, True)
    assert torch.autograd.gradcheck(lambda *a: kernels.scan(*a, backend="triton"), tuple(args))


# ------------------------------------------------------------------------------------------ CUDA graphs
def test_graph_cache_equals_eager_loop_across_windows_and_layers(monkeypatch):
    """ScanGraphs without the capture (the CPU stand-in for the replay: the same loop on static buffers, its
    results copied into static outputs): three windows through a 3-layer core whose first two layers share a
    signature, one backward at the end (every replay's outputs still held by autograd), then a shorter window.
    Bit for bit the eager Triton path: outputs, states and every gradient."""
    torch.manual_seed(11)
    graphs = triton_scan.ScanGraphs(capture=False)

    def graphed(*a, coupled=False, backend="auto"):
        return triton_scan.scan(*a, coupled=coupled, graphs=graphs)

    def run(core, windows):
        state = [tuple(s.clone() for s in layer) for layer in init]
        outs = []
        for x in windows:
            out, state = core(x, state)
            outs.append(out)
        loss = sum((o * w).sum() for o, w in zip(outs, weights)) + sum((h**2).sum() for h, _ in state)
        return outs, state, torch.autograd.grad(loss, list(core.parameters()))

    core = build_core("dglstm", 5, [4, 4, 3], gate_input=True, peephole=True, backend="triton").double()
    init = _random_state(core, 2, torch.float64)
    windows = [torch.randn(3, 2, 5, dtype=torch.float64) for _ in range(3)] + [
        torch.randn(2, 2, 5, dtype=torch.float64)
    ]
    weights = [torch.randn(w.shape[0], 2, 3, dtype=torch.float64) for w in windows]
    eager = run(core, windows)
    monkeypatch.setattr(cores, "scan", graphed)
    got = run(core, windows)
    # layers 0 and 1 share a signature (same widths, both with a depth path), layer 2 has its own; each is
    # captured at its second call: (0, 1) at layer 1 of window 1, layer 2 at window 2; in the short last
    # window layers 0 and 1 make a new pair again, layer 2's shape is met once and ran the eager loop
    assert len(graphs.pairs) == 3
    assert [n for sig, n in graphs.seen.items() if sig not in graphs.pairs] == [1]
    for a, b in zip(got[0], eager[0]):
        assert torch.equal(a, b)
    for (h, c), (rh, rc) in zip(got[1], eager[1]):
        assert torch.equal(h, rh) and torch.equal(c, rc)
    for a, b in zip(got[2], eager[2]):
        assert torch.equal(a, b)


def test_graph_outputs_are_copies_of_the_static_buffers():
    """A replay's outputs must outlive the next replay of the same signature (the next layer, window)."""
    graphs = triton_scan.ScanGraphs(capture=False, capture_after=1)
    a = [t.detach() if t is not None else None for t in _scan_args(3, 2, 4, False, False, True, seed=1)]
    b = [t.detach() if t is not None else None for t in _scan_args(3, 2, 4, False, False, True, seed=2)]
    h_a, *_ = graphs.forward(*a, False)
    h_a_again = h_a.clone()
    h_b, *_ = graphs.forward(*b, False)
    assert torch.equal(h_a, h_a_again) and not torch.equal(h_a, h_b)
    (fwd, _bwd) = next(iter(graphs.pairs.values()))
    assert h_a.data_ptr() != fwd.static_out[0].data_ptr()


def test_graph_cache_stops_capturing_at_max_graphs():
    graphs = triton_scan.ScanGraphs(capture=False, capture_after=1, max_graphs=1)
    for T in (2, 3):
        args = [t.detach() if t is not None else None for t in _scan_args(T, 1, 2, False, False, False)]
        *_, bwd = graphs.forward(*args, False)
        assert (bwd is not None) == (T == 2)
    assert len(graphs.pairs) == 1


def test_cuda_graph_backend_on_cpu_is_a_one_line_error():
    from dglstm_lm.config import compose, validate
    from dglstm_lm.errors import ConfigError
    from dglstm_lm.models import check_backend

    m = validate(compose(["model=dglstm", "model.backend=triton_graph"])).model
    with pytest.raises(
        ConfigError, match=r"^model.backend=triton_graph: CUDA graphs need a CUDA device"
    ) as e:
        check_backend(m, "cpu")
    assert "\n" not in str(e.value)
    check_backend(m, "cuda")  # the config check; whether the GPU is there is trainer.device's check
    args = _scan_args(2, 1, 2, False, False, False)
    with pytest.raises(ValueError, match=r"needs a CUDA device, not cpu"):
        kernels.scan(*args, backend="triton_graph")


def test_triton_backend_where_it_cannot_run_is_a_config_error(monkeypatch):
    from dglstm_lm.config import compose, validate
    from dglstm_lm.errors import ConfigError
    from dglstm_lm.models import check_backend

    m = validate(compose(["model=dglstm", "model.backend=triton"])).model
    check_backend(m, "cpu")  # under TRITON_INTERPRET=1 it can (that is how these tests run)
    check_backend(m, "cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match=r"^model.backend=triton: the Triton kernels run on CUDA"):
        check_backend(m, "cpu")
    with pytest.raises(ValueError, match=r"runs on CUDA \(or on the CPU under TRITON_INTERPRET=1"):
        kernels.scan(*_scan_args(2, 1, 2, False, False, False), backend="triton")
    monkeypatch.setattr(
        triton_scan, "triton_unavailable_reason", lambda: "ModuleNotFoundError: No module named 'triton'"
    )
    with pytest.raises(ConfigError, match=r"Triton is unavailable \(ModuleNotFoundError"):
        check_backend(m, "cuda")
    with pytest.raises(
        ConfigError,
        match=r"model.backend: unknown backend 'cuda' \(auto, cpp, cpp_blas, cpp_mkl, cpp_onednn, cpp_brgemm, "
        r"python, triton",
    ):
        validate(compose(["model=dglstm", "model.backend=cuda"]))


def test_auto_on_cpu_never_picks_triton(monkeypatch):
    """auto picks the Triton scan on CUDA only; on the CPU it stays the C++ (or python) one."""
    called = []
    monkeypatch.setattr(kernels, "_triton", lambda *a, **k: called.append(1))
    kernels.scan(*_scan_args(2, 1, 2, False, False, True), backend="auto")
    assert not called


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_one():
    """Every variant of both kernels, float32 and float64, compiled for sm_90 (H100/H200) to a cubin by the
    ptxas that Triton's wheel carries: what the interpreter cannot check (types, lowering) on this CPU."""
    code = r"""
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dglstm_lm.models import triton_kernels as K
n = 0
for kern in (K.fwd_step, K.bwd_step):
    for dt in ("fp32", "fp64"):
        for coupled, peep, depth in itertools.product([False, True], repeat=3):
            sig = {a: ("*" + dt if a.endswith("_ptr") else "i32" if a in ("N", "H") else "constexpr")
                   for a in kern.arg_names}
            const = {"COUPLED": coupled, "PEEP": peep, "DEPTH": depth, "BLOCK": 128}
            compiled = triton.compile(ASTSource(fn=kern, signature=sig, constexprs=const),
                                      target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"], (kern, dt, coupled, peep, depth)
            n += 1
print("compiled", n)
"""
    import triton

    if not (
        __import__("pathlib").Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ).exists():
        pytest.skip("this Triton build carries no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["TRITON_CACHE_DIR"] = str(ROOT / "build" / "triton-cache")
    out = subprocess.run([PY, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "compiled 32" in out.stdout


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.parametrize(
    "backend", ["python", "triton"] + (["cpp_mkl", "cpp_blas"] if kernels.cpp_extension() else [])
)
def test_scan_under_autocast_runs_in_float32(backend):
    """Under bf16 autocast the recurrence takes the bf16 projections cast up and runs in float32: the same
    numbers as float32 inputs rounded to bf16, and float32 outputs. (The fused kernel's oneDNN path, which
    backend=cpp takes under bf16 where the CPU has bf16 GEMMs, runs h W_hh in bf16: test_models.py's
    test_bf16_gemm_is_within_bf16_tolerance_of_float32.)"""
    args = _scan_args(3, 2, 4, True, False, True, dtype=torch.float32)
    bf = [None if a is None else a.detach().bfloat16() for a in args]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, c = kernels.scan(*bf, backend=backend)
    assert h.dtype == c.dtype == torch.float32
    h_ref, c_ref = kernels.scan(*[None if a is None else a.float() for a in bf], backend=backend)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(c, c_ref, rtol=0, atol=1e-6)


def test_unknown_precision_is_a_one_line_error():
    from dglstm_lm.config import compose, validate
    from dglstm_lm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^trainer.precision: unknown precision 'fp16' \(fp32, bf16\)$"):
        validate(compose(["trainer.precision=fp16"]))
    assert validate(compose(["trainer.precision=bf16"])).trainer.precision == "bf16"


@pytest.mark.parametrize("name", ["rnn", "stacked_lstm", "dglstm"])
def test_bf16_autocast_step_keeps_fp32_weights_grads_and_state(name, monkeypatch):
    """The trainer's bf16 step on the CPU: logits in bf16, the loss, every gradient and the carried state
    in float32, the loss close to the fp32 one. The DGLSTM's own kernel (its per-step GEMM in float32 where
    oneDNN has no bfloat16) and PyTorch's tanh RNN run under bf16 autocast on any CPU, so they are checked
    everywhere, past the refusal that nn.LSTM's need sets; PyTorch's fused LSTM needs oneDNN's bfloat16
    (AVX-512 or AMX): without it, "could not create a primitive descriptor for the LSTM forward"."""
    from dglstm_lm import trainer as trainer_mod

    if name in ("dglstm", "rnn"):
        monkeypatch.setattr(trainer_mod, "cpu_bf16_supported", lambda: True)
    elif not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 on this CPU (AVX-512 or AMX needed): bf16 is refused here")
    from dglstm_lm.models import LanguageModel
    from dglstm_lm.trainer import _master_state, precision_context

    torch.manual_seed(12)
    model = LanguageModel(40, 8, build_core(name, 8, [8, 8]))
    x, y = torch.randint(40, (5, 3)), torch.randint(40, (5, 3))
    with precision_context("cpu", "bf16"):
        logits, state = model(x, model.init_state(3))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 40), y.view(-1))
    state = _master_state(model, state)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(s.dtype == torch.float32 for layer in state for s in layer)
    fp32 = torch.nn.functional.cross_entropy(model(x, model.init_state(3))[0].view(-1, 40), y.view(-1))
    assert abs(loss.item() - fp32.item()) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("model", ["stacked_lstm", "dglstm"])
def test_bf16_training_on_cpu(model, tmp_path, ptb_dir, ptb_root, monkeypatch):
    """trainer.precision=bf16 on the CPU (autocast CPU bf16): a smoke run completes, the weights and the
    carried state stay float32, and the numbers are close to (not equal to) the fp32 run's. The DGLSTM on
    any CPU (past the refusal that nn.LSTM's need sets, as above); the stacked LSTM where oneDNN has bf16."""
    from dglstm_lm import trainer as trainer_mod

    if model == "dglstm":
        monkeypatch.setattr(trainer_mod, "cpu_bf16_supported", lambda: True)
    elif not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bfloat16 on this CPU (AVX-512 or AMX needed): bf16 is refused here")
    from dglstm_lm import checkpoint as ckpt
    from dglstm_lm.config import compose
    from dglstm_lm.train import train

    def run(precision):
        cfg = compose(
            [
                "experiment=smoke",
                f"model={model}",
                "logger=none",
                "trainer.progress=off",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=4",
                "trainer.limit_eval_batches=2",
                f"trainer.precision={precision}",
                f"paths.output_dir={tmp_path / 'out'}",
                f"paths.data_dir={ptb_root}",
                f"data.dir={ptb_dir}",
            ]
        )
        run_dir = tmp_path / precision
        return train(cfg, run_dir), run_dir

    bf16, run_dir = run("bf16")
    fp32, _ = run("fp32")
    assert bf16["status"] == "completed" and 1 < bf16["val/ppl"] < 1e5
    assert bf16["val/ppl"] != fp32["val/ppl"]
    assert abs(bf16["val/ppl"] / fp32["val/ppl"] - 1) < 0.05
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------ bench-gpu
def test_bench_gpu_without_cuda_says_so_in_one_line():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: make bench-gpu would measure")
    out = run_cli(["make", "-s", "bench-gpu"])
    assert out.returncode != 0
    assert (
        "error: make bench-gpu needs a CUDA device (torch.cuda.is_available() is False)"
        in out.stderr.splitlines()
    )
    direct = subprocess.run(
        [PY, "-m", "dglstm_lm.bench_gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert direct.returncode == 2
    assert direct.stderr.strip().splitlines() == [
        "error: make bench-gpu needs a CUDA device (torch.cuda.is_available() is False)"
    ]


@pytest.mark.slow
def test_bench_gpu_script_logic_on_cpu(monkeypatch, tmp_path):
    """The script a GPU session runs, checked here so that no device time is lost to a bug in it: its
    measuring, memory, budget and report code on the CPU, torch.cuda's calls stubbed (the numbers mean
    nothing; the Triton cores are left out, the interpreter being too slow for 35 steps)."""
    import json

    from dglstm_lm import bench_gpu

    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 2**20)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "stub")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(bench_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(bench_gpu, "V", 50)  # toy sizes: only the code paths matter here
    monkeypatch.setattr(bench_gpu, "T", 4)
    monkeypatch.setattr(bench_gpu, "_ptb_dir", lambda: None)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # a CPU without bfloat16 (AMD Zen 3): nn.LSTM cannot run bf16 here, so the bf16 rows run without
        # autocast; what is checked is the script's plumbing over both precisions, not their numbers
        import contextlib

        from dglstm_lm import trainer

        real = trainer.precision_context
        monkeypatch.setattr(
            trainer,
            "precision_context",
            lambda device, precision="fp32": (
                contextlib.nullcontext() if precision == "bf16" else real(device, precision)
            ),
        )
    cores = "nn.LSTM,nn.LSTM (control),stacked_lstm,dglstm[python]"
    argv = ["--quick", "--sizes", "8,12", "--cores", cores, "--out", str(tmp_path), "--budget-s", "1e6"]
    assert bench_gpu.main(argv) == 0
    payload = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert len(payload["records"]) == 2 * 2 * 4  # sizes × precisions × cores
    assert {r["precision"] for r in payload["records"]} == {"fp32", "bf16"}
    assert payload["end_to_end"] == {"skipped": "PTB not found (set PTB_DIR)"}
    md = (tmp_path / "bench-gpu.md").read_text()
    assert "| 2 × 12 | bf16 | `dglstm[python]` |" in md and "skipped: PTB not found" in md
    # a budget already spent: every block is recorded as skipped, the report still written
    assert bench_gpu.main([*argv[:-1], "0", "--no-e2e"]) == 0
    payload = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert [r.get("skipped") for r in payload["records"]] == ["time budget"] * 4
