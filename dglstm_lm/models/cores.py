"""Recurrent cores: tanh RNN, (stacked) LSTM and the depth-gated LSTM of Yao et al. (2015).

A core maps embeddings x (T, B, E) and a state to outputs (T, B, H_last) and the next state. It is a stack of
single-layer modules (so every layer can have its own width), joined by dropout on h:

    x ──▶ layer 0 ──h──▶ dropout ──▶ layer 1 ──h──▶ dropout ──▶ ... ──▶ output
              │                        ▲
              └──────── c_t ───────────┘   (DGLSTM only: the gated linear path between cells, same step t)

Regularisers (all off by default; `Regularisers` below): dropout on h between layers, standard (a new mask
at every step) or variational (one mask per sequence, the same at every step of a window); weight drop
(DropConnect on W_hh, one mask per forward pass, passed to the fused kernels as the recurrent weight).

The state is a list with one tuple per layer: (h,) for the RNN, (h, c) for the LSTMs, each (B, H_layer),
carried between BPTT windows (detached by the trainer) and reset per sentence in sentence mode.

Parameter layout: every LSTM layer has nn.LSTM's per-layer tensors `weight_ih` (4H, I), `weight_hh` (4H, H),
`bias_ih` and `bias_hh` (4H), gates ordered [i, f, g, o]. The DGLSTM layer adds `depth_*` (and `peephole_*`)
tensors and nothing else, so a stacked-LSTM state_dict loads into a DGLSTM of the same sizes with exactly
the depth parameters reported missing (see `LanguageModel.init_from`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import input_linear, scan

State = list[tuple[Tensor, ...]]

DEPTH_GATES = ("learned", "open", "constant")
DEPTH_GATE_INPUTS = ("x", "c_prev", "c_lower")
# d ≡ 1 for depth_gate=open, through the same kernels: σ(OPEN_GATE) is exactly 1.0 in float32 and float64
# (exp(-100) is below half an ulp of 1), so d·(1-d) = 0 in the backward and no gradient leaks into the gate.
OPEN_GATE = 100.0


def sequence_dropout(x: Tensor, p: float, kind: str, training: bool) -> Tensor:
    """Dropout on a (T, B, D) sequence. standard: an independent mask per element (nn.Dropout).
    variational (Gal & Ghahramani 2016, "locked"): one mask per sequence (B, D), the same at every time step
    of the window, drawn anew for every window."""
    if not training or p == 0.0:
        return x
    if kind == "standard":
        return F.dropout(x, p, True)
    if kind != "variational":
        raise ValueError(f"unknown dropout kind {kind!r} (standard, variational)")
    mask = x.new_empty(1, *x.shape[1:]).bernoulli_(1.0 - p).div_(1.0 - p)
    return x * mask


def drop_weight(w: Tensor, p: float, training: bool) -> Tensor:
    """Weight drop (DropConnect on a recurrent matrix, Merity et al. 2017): one mask per forward pass, kept
    entries scaled by 1/(1-p); the identity in eval mode or at p = 0."""
    if not training or p == 0.0:
        return w
    return F.dropout(w, p, True)


class RNNLayer(nn.Module):
    """One tanh RNN layer, run by PyTorch's fused kernel: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    state_size = 1

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.weight_ih = nn.Parameter(torch.empty(hidden_dim, input_dim))
        self.weight_hh = nn.Parameter(torch.empty(hidden_dim, hidden_dim))
        self.bias_ih = nn.Parameter(torch.empty(hidden_dim))
        self.bias_hh = nn.Parameter(torch.empty(hidden_dim))

    def forward(self, x: Tensor, state: tuple[Tensor, ...], lower_c: Tensor | None = None, w_hh=None):
        (h0,) = state
        weights = [self.weight_ih, self.weight_hh if w_hh is None else w_hh, self.bias_ih, self.bias_hh]
        out, h = torch.rnn_tanh(x, h0.unsqueeze(0), weights, True, 1, 0.0, self.training, False, False)
        return out, None, (h.squeeze(0),)


class LSTMLayer(nn.Module):
    """One LSTM layer with nn.LSTM's parameters, run by PyTorch's fused kernel (oneDNN on CPU, cuDNN on CUDA)."""

    state_size = 2

    def __init__(self, input_dim: int, hidden_dim: int):
        super().__init__()
        self.input_dim, self.hidden_dim = input_dim, hidden_dim
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_dim, input_dim))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_dim, hidden_dim))
        self.bias_ih = nn.Parameter(torch.empty(4 * hidden_dim))
        self.bias_hh = nn.Parameter(torch.empty(4 * hidden_dim))

    def forward(self, x: Tensor, state: tuple[Tensor, ...], lower_c: Tensor | None = None, w_hh=None):
        h0, c0 = state
        weights = [self.weight_ih, self.weight_hh if w_hh is None else w_hh, self.bias_ih, self.bias_hh]
        out, h, c = torch.lstm(
            x, (h0.unsqueeze(0), c0.unsqueeze(0)), weights, True, 1, 0.0, self.training, False, False
        )
        return out, None, (h.squeeze(0), c.squeeze(0))


class DGLSTMLayer(nn.Module):
    """One depth-gated LSTM layer (Yao et al. 2015), time loop in `kernels.scan`.

    With lower_dim set (every layer above the first) the layer receives the lower layer's cells c^L_t:

        d_t = σ(b_d + W_xd x_t + w_cd ⊙ c_{t-1} + w_ld ⊙ c^L_t)        (w_ld a matrix when widths differ)
        c_t = d_t ⊙ c^L_t + f_t ⊙ c_{t-1} + i_t ⊙ g_t                  (P c^L_t when widths differ)

    With gate_input (first layer only, as in the author's code) the gated term is a projection of the input:
    d_t = σ(b_d + W_xd x_t + w_cd ⊙ c_{t-1}) and c_t = d_t ⊙ (W_x0 x_t) + f ⊙ c_{t-1} + i ⊙ g.
    Without either the layer is a plain LSTM (optionally with peepholes / coupled gates).

    Ablations of the gate (the carried term, P c^L_t or W_x0 x_t, is unchanged by them):
    depth_gate: learned (the paper's d above) | open (d ≡ 1: an ungated cell path, no gate parameters) |
    constant (d = σ(b_d): a learned per-unit value that does not depend on the input).
    depth_gate_inputs: the terms of a learned d that are present, any subset of x (W_xd x_t), c_prev
    (w_cd ⊙ c_{t-1}) and c_lower (w_ld ⊙ c^L_t); b_d always is. A term left out has no parameters.

    peephole: diagonal peepholes (Graves): w_ci ⊙ c_{t-1} into i, w_cf ⊙ c_{t-1} into f, w_co ⊙ c_t into o.
    coupled: f = 1 − i; the forget gate's rows are dropped (gates [i, g, o]).
    stabiliser: a learned scalar s (initially 0) per layer; the layer input of every gate projection is
    exp(s) · x_t (W_x x_t → W_x (exp(s) x_t) for i, f, g, o and d), as in the author's later code.
    """

    state_size = 2

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        lower_dim: int | None = None,
        gate_input: bool = False,
        peephole: bool = False,
        coupled: bool = False,
        backend: str = "auto",
        stabiliser: bool = False,
        depth_gate: str = "learned",
        depth_gate_inputs=DEPTH_GATE_INPUTS,
    ):
        super().__init__()
        if lower_dim is not None and gate_input:
            raise ValueError("gate_input applies to the first layer, which has no lower layer")
        if depth_gate not in DEPTH_GATES:
            raise ValueError(f"unknown depth_gate {depth_gate!r} ({', '.join(DEPTH_GATES)})")
        unknown = [k for k in depth_gate_inputs if k not in DEPTH_GATE_INPUTS]
        if unknown:
            raise ValueError(f"unknown depth_gate_inputs {unknown} (any of {', '.join(DEPTH_GATE_INPUTS)})")
        H, G = hidden_dim, 3 if coupled else 4
        self.input_dim, self.hidden_dim, self.lower_dim = input_dim, hidden_dim, lower_dim
        self.gate_input, self.peephole, self.coupled, self.backend = gate_input, peephole, coupled, backend
        self.weight_ih = nn.Parameter(torch.empty(G * H, input_dim))
        self.weight_hh = nn.Parameter(torch.empty(G * H, H))
        self.bias_ih = nn.Parameter(torch.empty(G * H))
        self.bias_hh = nn.Parameter(torch.empty(G * H))
        self.has_depth = lower_dim is not None or gate_input
        self.depth_gate = depth_gate
        # the terms of d_t present in this layer (none for open / constant; no c^L_t in the first layer)
        terms = set(depth_gate_inputs) if depth_gate == "learned" else set()
        if lower_dim is None:
            terms.discard("c_lower")
        self.depth_terms = frozenset(terms) if self.has_depth else frozenset()
        if self.has_depth:  # (registration order = init order: kept as it was, so old seeds reproduce)
            if "x" in self.depth_terms:
                self.depth_weight_ih = nn.Parameter(torch.empty(H, input_dim))  # W_xd
            if depth_gate != "open":
                self.depth_bias = nn.Parameter(torch.empty(H))  # b_d
            if "c_prev" in self.depth_terms:
                self.depth_weight_cc = nn.Parameter(torch.empty(H))  # w_cd, on this layer's c_{t-1}
            if "c_lower" in self.depth_terms:  # w_ld, on c^L_t: a vector, or a matrix when widths differ
                shape = (H,) if lower_dim == H else (H, lower_dim)
                self.depth_weight_lc = nn.Parameter(torch.empty(*shape))
            if gate_input:
                self.depth_proj = nn.Parameter(torch.empty(H, input_dim))  # W_x0
            elif lower_dim != H:
                self.depth_proj = nn.Parameter(torch.empty(H, lower_dim))  # P: c^L into this layer's width
        self.use_stabiliser = stabiliser
        if stabiliser:
            self.stabiliser = nn.Parameter(torch.zeros(()))  # s; the input is scaled by exp(s)
        if peephole:
            self.peephole_i = nn.Parameter(torch.empty(H))
            self.peephole_f = None if coupled else nn.Parameter(torch.empty(H))
            self.peephole_o = nn.Parameter(torch.empty(H))

    def _depth_inputs(self, x: Tensor, xg: Tensor, lower_c: Tensor | None):
        """The depth gate's pre-activation for all steps but its c_{t-1} term (gd, (T, B, H)), the carried
        term m (T, B, H) and w_cd (the kernel adds w_cd ⊙ c_{t-1} inside the loop; zeros when absent)."""
        T, B, H = x.shape[0], x.shape[1], self.hidden_dim
        if self.gate_input:
            m = F.linear(x, self.depth_proj)  # W_x0 x_t
        else:
            if lower_c is None:
                raise ValueError("a DGLSTM layer above the first needs the lower layer's cells")
            m = lower_c if self.lower_dim == H else F.linear(lower_c, self.depth_proj)
        if self.depth_gate == "open":
            gd = x.new_full((T, B, H), OPEN_GATE)
        elif "x" in self.depth_terms:
            gd = input_linear(xg, self.depth_weight_ih, self.depth_bias, self.backend, H)
        else:
            gd = self.depth_bias.expand(T, B, H)
        if "c_lower" in self.depth_terms:
            lc = self.depth_weight_lc
            gd = gd + (lc * lower_c if lc.dim() == 1 else F.linear(lower_c, lc))
        wcd = self.depth_weight_cc if "c_prev" in self.depth_terms else x.new_zeros(H)
        return gd, m, wcd

    def forward(self, x: Tensor, state: tuple[Tensor, ...], lower_c: Tensor | None = None, w_hh=None):
        h0, c0 = state
        xg = x * self.stabiliser.exp() if self.use_stabiliser else x  # the gates' view of the input
        # (T, B, G*H), all steps in one GEMM
        gx = input_linear(xg, self.weight_ih, self.bias_ih + self.bias_hh, self.backend, self.hidden_dim)
        gd = m = wcd = None
        if self.has_depth:
            gd, m, wcd = self._depth_inputs(x, xg, lower_c)
        peep = (self.peephole_i, self.peephole_f, self.peephole_o) if self.peephole else (None, None, None)
        w_hh = self.weight_hh if w_hh is None else w_hh
        h_all, c_all = scan(gx, gd, m, h0, c0, w_hh, *peep, wcd, coupled=self.coupled, backend=self.backend)
        return h_all, c_all, (h_all[-1], c_all[-1])


class RecurrentStack(nn.Module):
    """Layers joined by dropout on h; the DGLSTM layers also receive the lower layer's cells.

    dropout_kind: standard | variational (see `sequence_dropout`); weight_drop: DropConnect rate on every
    layer's W_hh; residual: identity shortcuts on h (Wu et al. 2016's GNMT stack) — the input of layer l+1 is
    drop(h^l) + the input of layer l, so every layer must have the input's width; the output is the top h."""

    def __init__(
        self,
        layers: list[nn.Module],
        dropout: float = 0.0,
        dropout_kind: str = "standard",
        weight_drop: float = 0.0,
        residual: bool = False,
    ):
        super().__init__()
        if residual and len({layers[0].input_dim, *(layer.hidden_dim for layer in layers)}) != 1:
            raise ValueError("residual shortcuts need every layer's width equal to the input's (emb_dim)")
        self.layers = nn.ModuleList(layers)
        self.drop = nn.Dropout(dropout)
        self.dropout_kind, self.weight_drop, self.residual = dropout_kind, weight_drop, residual
        self.output_dim = layers[-1].hidden_dim

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return [
            tuple(
                torch.zeros(batch_size, layer.hidden_dim, device=device, dtype=dtype)
                for _ in range(layer.state_size)
            )
            for layer in self.layers
        ]

    def _fused_kind(self):
        """'lstm' / 'rnn' when the whole stack can run as one call of PyTorch's fused multi-layer kernel (as
        nn.LSTM does: oneDNN / cuDNN process all layers at once), else None. Not with shortcuts, nor with
        variational dropout between layers while training (the fused kernel's dropout is per element)."""
        kinds = {type(layer) for layer in self.layers}
        if len({layer.hidden_dim for layer in self.layers}) != 1 or len(kinds) != 1 or self.residual:
            return None
        if self.training and self.dropout_kind != "standard" and self.drop.p > 0 and len(self.layers) > 1:
            return None
        return {LSTMLayer: "lstm", RNNLayer: "rnn"}.get(kinds.pop())

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        # weight drop: one mask per forward pass on each W_hh, handed to the kernels as the recurrent weight
        w_hh = [drop_weight(layer.weight_hh, self.weight_drop, self.training) for layer in self.layers]
        fused = self._fused_kind()
        if fused is not None:
            # one call for all layers; its dropout between layers is nn.LSTM's (training only)
            weights = [
                w
                for layer, whh in zip(self.layers, w_hh)
                for w in (layer.weight_ih, whh, layer.bias_ih, layer.bias_hh)
            ]
            args = (True, len(self.layers), self.drop.p, self.training, False, False)
            if fused == "lstm":
                h0 = torch.stack([s[0] for s in state])
                c0 = torch.stack([s[1] for s in state])
                out, h, c = torch.lstm(x, (h0, c0), weights, *args)
                return out, [(h[k], c[k]) for k in range(len(self.layers))]
            out, h = torch.rnn_tanh(x, torch.stack([s[0] for s in state]), weights, *args)
            return out, [(h[k],) for k in range(len(self.layers))]
        new_state, lower_c, inp = [], None, x
        for idx, layer in enumerate(self.layers):
            if idx > 0:
                dropped = sequence_dropout(x, self.drop.p, self.dropout_kind, self.training)
                inp = dropped + inp if self.residual else dropped
            x, lower_c, layer_state = layer(inp, state[idx], lower_c, w_hh=w_hh[idx])
            new_state.append(layer_state)
        return x, new_state


def build_core(
    kind: str,
    input_dim: int,
    hidden_dims: list[int],
    dropout: float = 0.0,
    gate_input: bool = False,
    peephole: bool = False,
    coupled: bool = False,
    backend: str = "auto",
    stabiliser: bool = False,
    depth_gate: str = "learned",
    depth_gate_inputs=DEPTH_GATE_INPUTS,
    dropout_kind: str = "standard",
    weight_drop: float = 0.0,
) -> RecurrentStack:
    """kind: rnn | lstm | stacked_lstm | residual_lstm | dglstm."""
    dims = [input_dim, *hidden_dims]
    if kind == "rnn":
        layers = [RNNLayer(dims[k], dims[k + 1]) for k in range(len(hidden_dims))]
    elif kind in ("lstm", "stacked_lstm", "residual_lstm"):
        layers = [LSTMLayer(dims[k], dims[k + 1]) for k in range(len(hidden_dims))]
    elif kind == "dglstm":
        layers = [
            DGLSTMLayer(
                dims[k],
                dims[k + 1],
                lower_dim=dims[k] if k > 0 else None,
                gate_input=gate_input and k == 0,
                peephole=peephole,
                coupled=coupled,
                backend=backend,
                stabiliser=stabiliser,
                depth_gate=depth_gate,
                depth_gate_inputs=depth_gate_inputs,
            )
            for k in range(len(hidden_dims))
        ]
    else:
        raise ValueError(f"unknown recurrent core {kind!r} (rnn, lstm, stacked_lstm, residual_lstm, dglstm)")
    for layer in layers:  # nn.LSTM's default; LanguageModel.reset_parameters applies the configured init
        bound = 1.0 / layer.hidden_dim**0.5
        for name, p in layer.named_parameters():
            if name == "stabiliser":
                nn.init.zeros_(p)  # exp(0) = 1: the plain layer to begin with
            else:
                nn.init.uniform_(p, -bound, bound)
    return RecurrentStack(
        layers, dropout, dropout_kind=dropout_kind, weight_drop=weight_drop, residual=kind == "residual_lstm"
    )
