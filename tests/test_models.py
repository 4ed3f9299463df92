"""The recurrent cores are proved against references: nn.LSTM, the stacked LSTM (gate shut), a per-step
implementation of the DGLSTM equations written here, gradcheck, and closed-form parameter counts."""

from __future__ import annotations

import itertools

import pytest
import torch

from dglstm_lm.config import DGLSTMConfig, LSTMConfig, RNNConfig, StackedLSTMConfig
from dglstm_lm.models import DGLSTMLayer, LanguageModel, LSTMLayer, build_core, build_model, count_parameters
from dglstm_lm.models.kernels import cpp_extension, scan

BACKENDS = ["python"] + (["cpp"] if cpp_extension() is not None else [])


def test_cpp_kernel_is_built():
    """`make setup` builds the fused kernel; without it the DGLSTM silently runs ~2x slower on CPU."""
    from dglstm_lm.models.kernels import cpp_unavailable_reason

    assert cpp_extension() is not None, cpp_unavailable_reason()


# ------------------------------------------------------------------------------------------ reference
def reference_dglstm(core, x, state):
    """The DGLSTM equations of Yao et al. (2015), one time step at a time, plain autograd, nothing shared with
    the implementation under test but the parameter tensors (read by name)."""
    outs_h, outs_c = None, None
    final = []
    inp = x
    for layer_idx, layer in enumerate(core.layers):
        H, coupled = layer.hidden_dim, layer.coupled
        h, c = state[layer_idx]
        hs, cs = [], []
        for t in range(inp.shape[0]):
            xt = inp[t]
            xg = xt * torch.exp(layer.stabiliser) if layer.use_stabiliser else xt  # exp(s) x_t into the gates
            z = xg @ layer.weight_ih.T + layer.bias_ih + h @ layer.weight_hh.T + layer.bias_hh
            if coupled:
                zi, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H :]
            else:
                zi, zf, zg, zo = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
            if layer.peephole:
                zi = zi + layer.peephole_i * c
            i = torch.sigmoid(zi)
            if coupled:
                f = 1 - i
            else:
                f = torch.sigmoid(zf + layer.peephole_f * c if layer.peephole else zf)
            g = torch.tanh(zg)
            c_new = f * c + i * g
            if layer.has_depth:
                a = layer.depth_bias + xg @ layer.depth_weight_ih.T + layer.depth_weight_cc * c
                if layer.gate_input:
                    carried = xt @ layer.depth_proj.T  # W_x0 x_t
                else:
                    c_low = outs_c[t]
                    if layer.depth_weight_lc.dim() == 1:
                        a = a + layer.depth_weight_lc * c_low
                        carried = c_low
                    else:
                        a = a + c_low @ layer.depth_weight_lc.T
                        carried = c_low @ layer.depth_proj.T
                d = torch.sigmoid(a)
                c_new = c_new + d * carried
            if layer.peephole:
                zo = zo + layer.peephole_o * c_new
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dims", DIMS, ids=["equal", "unequal"])
@pytest.mark.parametrize("gate_input,peephole,coupled,stabiliser", OPTIONS)
def test_dglstm_matches_per_step_reference(backend, gate_input, peephole, coupled, stabiliser, dims):
    torch.manual_seed(hash((gate_input, peephole, coupled, stabiliser, tuple(dims))) % 1000)
    T, B, E = 6, 3, 5
    core = build_core(
        "dglstm",
        E,
        dims,
        gate_input=gate_input,
        peephole=peephole,
        coupled=coupled,
        backend=backend,
        stabiliser=stabiliser,
    ).double()
    with torch.no_grad():
        for p in core.parameters():
            p.uniform_(-0.6, 0.6)
    x = torch.randn(T, B, E, dtype=torch.float64, requires_grad=True)
    state = [tuple(s.requires_grad_() for s in layer) for layer in _random_state(core, B, torch.float64)]
    w_out = torch.randn(T, B, dims[-1], dtype=torch.float64)

    def run(fn):
        out, final = fn(core, x, state)
        loss = (out * w_out).sum() + sum((h**2).sum() + (c * 0.3).sum() for h, c in final)
        leaves = [x, *[s for layer in state for s in layer], *core.parameters()]
        return out, final, torch.autograd.grad(loss, leaves)

    out, final, grads = run(lambda core, x, s: core(x, s))
    ref_out, ref_final, ref_grads = run(reference_dglstm)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for (h, c), (rh, rc) in zip(final, ref_final):
        torch.testing.assert_close(h, rh, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(c, rc, rtol=1e-10, atol=1e-10)
    names = ["x", *[f"state{i}" for i in range(2 * len(dims))], *[n for n, _ in core.named_parameters()]]
    for name, g, rg in zip(names, grads, ref_grads):
        torch.testing.assert_close(
            g, rg, rtol=1e-9, atol=1e-10, msg=lambda m, name=name: f"gradient of {name}: {m}"
        )


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
    ref, _ = reference_dglstm(core64, x.double(), [tuple(s.double() for s in layer) for layer in state])
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)


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
    name, V, E, dims, tie=False, gate_input=False, peephole=False, coupled=False, stabiliser=False
):
    """Parameter count from the equations, independently of the modules."""
    n = V * E + V + (0 if tie else V * dims[-1])  # embedding, decoder bias, decoder weight
    inputs = [E, *dims[:-1]]
    for k, (In, H) in enumerate(zip(inputs, dims)):
        if name == "rnn":
            n += H * In + H * H + 2 * H
            continue
        G = 3 if (name == "dglstm" and coupled) else 4
        n += G * H * (In + H) + 2 * G * H  # W_ih, W_hh, b_ih, b_hh (nn.LSTM's layout)
        if name != "dglstm":
            continue
        if peephole:
            n += (2 if coupled else 3) * H
        if stabiliser:
            n += 1  # s
        if k == 0 and gate_input:
            n += H * In + H + H + H * In  # W_xd, b_d, w_cd, W_x0
        elif k > 0:
            n += H * In + H + H  # W_xd, b_d, w_cd
            n += H if dims[k - 1] == H else 2 * H * dims[k - 1]  # w_ld (vector) or w_ld and P (matrices)
    return n


PARAM_CASES = [
    (RNNConfig(), {}),
    (LSTMConfig(), {}),
    (StackedLSTMConfig(), {}),
    (StackedLSTMConfig(num_layers=3, hidden_dims=[30, 40, 20]), {}),
    (DGLSTMConfig(), {}),
    (DGLSTMConfig(num_layers=3, hidden_dims=[30, 40, 20]), {}),
    (DGLSTMConfig(gate_input=True, peephole=True), {}),
    (DGLSTMConfig(coupled_gates=True, peephole=True), {}),
    (DGLSTMConfig(num_layers=3, stabiliser=True, gate_input=True), {}),
    (DGLSTMConfig(emb_dim=20, hidden_dim=20, tie_weights=True), {}),
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
    )
    with capsys.disabled():
        print(
            f"\n  {cfg.name:<13} dims {cfg.layer_dims}: {count_parameters(model):,} parameters (closed form {expected:,})"
        )
    assert count_parameters(model) == expected


def test_ptb_sizes_parameter_counts():
    """At PTB sizes the counts are the ones the README lists."""
    V = 10_000
    for cfg in (LSTMConfig(), StackedLSTMConfig(), DGLSTMConfig()):
        assert count_parameters(build_model(V, cfg)) == closed_form_params(cfg.name, V, 200, cfg.layer_dims)


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
