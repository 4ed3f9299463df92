"""Regularisers and the residual stack, proved by their defining properties: where a mask is drawn, what it
is shared by, what it scales, that eval mode ignores it, that gradients flow through it, and that rates of
0 change nothing — for every core (the fused nn.LSTM-backed layers and both DGLSTM backends)."""

from __future__ import annotations

import pytest
import torch

from dglstm_lm.config import DGLSTMConfig, LSTMConfig, ResidualLSTMConfig, RNNConfig, StackedLSTMConfig
from dglstm_lm.models import build_core, build_model
from dglstm_lm.models import cores as cores_module
from dglstm_lm.models.kernels import cpp_extension

CORES = {
    "rnn": lambda **kw: RNNConfig(**kw),
    "lstm": lambda **kw: LSTMConfig(**kw),
    "stacked_lstm": lambda **kw: StackedLSTMConfig(**kw),
    "residual_lstm": lambda **kw: ResidualLSTMConfig(**kw),
    "dglstm[python]": lambda **kw: DGLSTMConfig(backend="python", **kw),
}
if cpp_extension() is not None:
    CORES["dglstm[cpp]"] = lambda **kw: DGLSTMConfig(backend="cpp", **kw)
MULTI_LAYER = [k for k in CORES if k not in ("rnn", "lstm")]
V, E, T, B = 23, 6, 7, 5


def _model(kind, **kw):
    torch.manual_seed(0)
    layers = {} if kind in ("rnn", "lstm") else {"num_layers": 2}
    return build_model(V, CORES[kind](emb_dim=E, hidden_dim=E, **layers, **kw))


def _tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(V, (T, B), generator=g)


# ------------------------------------------------------------------------------------------ rates of 0, eval
@pytest.mark.parametrize("kind", list(CORES))
def test_rates_of_zero_draw_nothing_and_change_nothing(kind):
    """All rates 0 (any dropout kind): a training forward draws no random number and gives exactly the
    default model's output — so the existing recipes reproduce bit for bit."""
    tokens = _tokens()
    base = _model(kind).train()
    zero = _model(kind, dropout_kind="variational", weight_drop=0.0, embed_dropout=0.0).train()
    zero.load_state_dict(base.state_dict())
    rng = torch.get_rng_state()
    out = zero(tokens, zero.init_state(B))[0]
    assert torch.equal(torch.get_rng_state(), rng), "a forward at rate 0 drew random numbers"
    assert torch.equal(out, base(tokens, base.init_state(B))[0])


@pytest.mark.parametrize("kind", list(CORES))
def test_eval_mode_is_deterministic_and_ignores_every_regulariser(kind):
    tokens = _tokens()
    plain = _model(kind).eval()
    reg = _model(kind, dropout=0.5, dropout_kind="variational", weight_drop=0.5, embed_dropout=0.5)
    reg.load_state_dict(plain.state_dict())
    reg.eval()
    first = reg(tokens, reg.init_state(B))[0]
    assert torch.equal(first, reg(tokens, reg.init_state(B))[0])
    assert torch.equal(first, plain(tokens, plain.init_state(B))[0])
    reg.train()  # and in training the regularisers do act
    assert not torch.allclose(reg(tokens, reg.init_state(B))[0], first)


# ------------------------------------------------------------------------------------------ variational dropout
def _capture_inputs(model, kind):
    """Record the tensors entering the core, each layer above the first, and the decoder."""
    seen = {"core": [], "layer1": [], "layer0_out": [], "decoder": []}
    hooks = [
        model.core.register_forward_pre_hook(lambda m, a: seen["core"].append(a[0].detach().clone())),
        model.decoder.register_forward_pre_hook(lambda m, a: seen["decoder"].append(a[0].detach().clone())),
    ]
    if len(model.core.layers) > 1:
        layers = model.core.layers
        hooks.append(layers[1].register_forward_pre_hook(lambda m, a: seen["layer1"].append(a[0].detach())))
        hooks.append(
            layers[0].register_forward_hook(lambda m, a, out: seen["layer0_out"].append(out[0].detach()))
        )
    return seen, hooks


def _mask_of(dropped, before):
    """The multiplicative mask applied to `before` (entries of `before` are almost surely non-zero)."""
    return dropped / before


@pytest.mark.parametrize("kind", list(CORES))
def test_variational_masks_are_per_sequence_shared_over_steps_and_new_per_window(kind):
    p = 0.5
    model = _model(kind, dropout=p, dropout_kind="variational").train()
    with torch.no_grad():
        model.encoder.weight.fill_(1.0)  # the embedding output is all ones: the core's input is the mask
    seen, _ = _capture_inputs(model, kind)
    tokens = _tokens()
    model(tokens, model.init_state(B))
    model(tokens, model.init_state(B))  # a second window
    masks = {"embedding": [seen["core"][0], seen["core"][1]]}
    if kind in MULTI_LAYER:  # each layer ran on its own (not a fused call, whose dropout is per element)
        assert len(seen["layer1"]) == len(seen["layer0_out"]) == 2, kind
    if seen["layer1"]:
        layer1 = seen["layer1"]
        if kind == "residual_lstm":  # the input of layer 1 is drop(h^0) + the input of layer 0
            layer1 = [a - b for a, b in zip(layer1, seen["core"])]
        masks["between layers"] = [_mask_of(a, b) for a, b in zip(layer1, seen["layer0_out"])]
    for place, (m1, m2) in masks.items():
        for m in (m1, m2):
            torch.testing.assert_close(
                m, m[:1].expand_as(m), rtol=0, atol=1e-4, msg=f"{place}: the mask changes between steps"
            )
            values = set(torch.round(m, decimals=3).unique().tolist())
            assert values <= {0.0, 1 / (1 - p)}, f"{place}: mask values {values}"
            assert not torch.equal(m[0, 0], m[0, 1]), f"{place}: two sequences share a mask"
        assert not torch.equal(m1, m2), f"{place}: the same mask in two windows"
    # before the decoder: zeros shared by every step of a sequence
    zeros = seen["decoder"][0] == 0
    assert zeros.any() and torch.equal(zeros, zeros[:1].expand_as(zeros))


def test_standard_dropout_draws_a_new_mask_every_step():
    """The contrast: standard dropout (the default) is not variational."""
    model = _model("stacked_lstm", dropout=0.5).train()
    with torch.no_grad():
        model.encoder.weight.fill_(1.0)
    seen, _ = _capture_inputs(model, "stacked_lstm")
    model(_tokens(), model.init_state(B))
    m = seen["core"][0]
    assert not torch.equal(m[0], m[1])


# ------------------------------------------------------------------------------------------ weight drop
@pytest.fixture
def recorded_w_hh(monkeypatch):
    """Every recurrent weight handed to a kernel (torch.lstm / torch.rnn_tanh weights, or the scan's W_hh)."""
    seen = []
    real_lstm, real_rnn, real_scan = torch.lstm, torch.rnn_tanh, cores_module.scan

    def lstm(x, hx, weights, *args):
        seen.append([w for k, w in enumerate(weights) if k % 4 == 1])
        return real_lstm(x, hx, weights, *args)

    def rnn(x, hx, weights, *args):
        seen.append([w for k, w in enumerate(weights) if k % 4 == 1])
        return real_rnn(x, hx, weights, *args)

    def scan(gx, gd, m, h0, c0, w_hh, *a, **kw):
        seen.append([w_hh])
        return real_scan(gx, gd, m, h0, c0, w_hh, *a, **kw)

    monkeypatch.setattr(torch, "lstm", lstm)
    monkeypatch.setattr(torch, "rnn_tanh", rnn)
    monkeypatch.setattr(cores_module, "scan", scan)
    return seen


@pytest.mark.parametrize("kind", list(CORES))
def test_weight_drop_one_mask_per_forward_on_w_hh_with_gradient(kind, recorded_w_hh):
    p = 0.4
    model = _model(kind, weight_drop=p).train()
    tokens = _tokens()
    out = model(tokens, model.init_state(B))[0]
    used = [w for call in recorded_w_hh for w in call]
    W = [layer.weight_hh for layer in model.core.layers]
    assert len(used) == len(W)  # each layer's kernel got one (masked) matrix for the whole window
    for w_used, w in zip(used, W):
        kept = w_used != 0
        torch.testing.assert_close(w_used[kept], w.detach()[kept] / (1 - p))  # kept entries scaled
        assert 0.2 < (~kept).float().mean() < 0.6  # about p of the entries dropped
    # gradients flow through the mask: dL/dW = dL/dW̃ · mask/(1-p), zero where dropped
    g_out = torch.randn_like(out)
    (out * g_out).sum().backward()
    for k, (w_used, w) in enumerate(zip(used, W)):
        twin = _model(kind).eval()  # the same model, no regulariser, W_hh := the masked matrix as a leaf
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            for j, layer in enumerate(twin.core.layers):
                layer.weight_hh.copy_(used[j])
        (twin(tokens, twin.init_state(B))[0] * g_out).sum().backward()
        expected = twin.core.layers[k].weight_hh.grad * (w_used != 0) / (1 - p)
        torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-6)
        assert torch.all(w.grad[w_used == 0] == 0) and w.grad.abs().sum() > 0
    recorded_w_hh.clear()
    torch.manual_seed(7)  # (_model reseeds the generator)
    model(tokens, model.init_state(B))  # the next window: a new mask
    assert not torch.equal(recorded_w_hh[0][0] != 0, used[0] != 0)


# ------------------------------------------------------------------------------------------ embedding dropout
@pytest.mark.parametrize("kind", ["stacked_lstm", "dglstm[python]"])
def test_embedding_dropout_drops_whole_word_types(kind):
    p = 0.5
    model = _model(kind, embed_dropout=p).train()
    seen, _ = _capture_inputs(model, kind)
    tokens = torch.randint(4, (T, B))  # 4 word types, each many times
    model(tokens, model.init_state(B))
    model(tokens, model.init_state(B))
    emb = model.encoder.weight.detach()
    decisions = []
    for x in seen["core"]:
        kept = {}
        for w in range(4):
            rows = x[tokens == w]
            if rows.shape[0] == 0:
                continue
            if torch.all(rows == 0):
                kept[w] = False
            else:  # kept everywhere, scaled by 1/(1-p)
                torch.testing.assert_close(rows, (emb[w] / (1 - p)).expand_as(rows))
                kept[w] = True
        decisions.append(kept)
    assert any(not k for d in decisions for k in d.values()), "no word type was dropped"
    assert any(k for d in decisions for k in d.values()), "every word type was dropped"
    # gradients reach the kept rows only
    model.zero_grad()
    model(tokens, model.init_state(B))[0].sum().backward()
    assert model.encoder.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ residual stack
def _lstm_steps(x, h, c, w_ih, w_hh, b):
    """One LSTM layer, step by step, from the equations (gates [i, f, g, o])."""
    H, outs = h.shape[1], []
    for t in range(x.shape[0]):
        z = x[t] @ w_ih.T + h @ w_hh.T + b
        i, f, g, o = (z[:, k * H : (k + 1) * H] for k in range(4))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def test_residual_stack_matches_its_equations():
    """u^0 = x, h^l = LSTM_l(u^l), u^{l+1} = h^l + u^l; the output is h^top — forward and gradients."""
    torch.manual_seed(3)
    H, L = 5, 3
    core = build_core("residual_lstm", H, [H] * L).double().eval()
    x = torch.randn(T, B, H, dtype=torch.float64, requires_grad=True)
    state = [
        (torch.randn(B, H, dtype=torch.float64), torch.randn(B, H, dtype=torch.float64)) for _ in range(L)
    ]
    out, final = core(x, state)
    P = dict(core.named_parameters())
    u, ref_final = x, []
    for k in range(L):
        b = P[f"layers.{k}.bias_ih"] + P[f"layers.{k}.bias_hh"]
        hs, h, c = _lstm_steps(u, *state[k], P[f"layers.{k}.weight_ih"], P[f"layers.{k}.weight_hh"], b)
        ref_final.append((h, c))
        ref_out, u = hs, hs + u
    torch.testing.assert_close(out, ref_out)
    for (h, c), (rh, rc) in zip(final, ref_final):
        torch.testing.assert_close(h, rh)
        torch.testing.assert_close(c, rc)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [x, *core.parameters()])
    ref_grads = torch.autograd.grad((ref_out * g).sum(), [x, *core.parameters()])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r)


def test_residual_stack_needs_equal_widths():
    with pytest.raises(ValueError, match="residual shortcuts need every layer's width equal"):
        build_core("residual_lstm", 4, [6, 6])
