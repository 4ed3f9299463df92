"""Recurrent cores: tanh RNN, (stacked) LSTM and the depth-gated LSTM of Yao et al. (2015).

A core maps embeddings x (T, B, E) and a state to outputs (T, B, H_last) and the next state. It is a stack of
single-layer modules (so every layer can have its own width), joined by dropout on h:

    x ──▶ layer 0 ──h──▶ dropout ──▶ layer 1 ──h──▶ dropout ──▶ ... ──▶ output
              │                        ▲
              └──────── c_t ───────────┘   (DGLSTM only: the gated linear path between cells, same step t)

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

from .kernels import scan

State = list[tuple[Tensor, ...]]


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

    def forward(self, x: Tensor, state: tuple[Tensor, ...], lower_c: Tensor | None = None):
        (h0,) = state
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
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

    def forward(self, x: Tensor, state: tuple[Tensor, ...], lower_c: Tensor | None = None):
        h0, c0 = state
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
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
    ):
        super().__init__()
        if lower_dim is not None and gate_input:
            raise ValueError("gate_input applies to the first layer, which has no lower layer")
        H, G = hidden_dim, 3 if coupled else 4
        self.input_dim, self.hidden_dim, self.lower_dim = input_dim, hidden_dim, lower_dim
        self.gate_input, self.peephole, self.coupled, self.backend = gate_input, peephole, coupled, backend
        self.weight_ih = nn.Parameter(torch.empty(G * H, input_dim))
        self.weight_hh = nn.Parameter(torch.empty(G * H, H))
        self.bias_ih = nn.Parameter(torch.empty(G * H))
        self.bias_hh = nn.Parameter(torch.empty(G * H))
        self.has_depth = lower_dim is not None or gate_input
        if self.has_depth:
            self.depth_weight_ih = nn.Parameter(torch.empty(H, input_dim))  # W_xd
            self.depth_bias = nn.Parameter(torch.empty(H))  # b_d
            self.depth_weight_cc = nn.Parameter(torch.empty(H))  # w_cd, on this layer's c_{t-1}
            if gate_input:
                self.depth_proj = nn.Parameter(torch.empty(H, input_dim))  # W_x0
            elif lower_dim == H:
                self.depth_weight_lc = nn.Parameter(torch.empty(H))  # w_ld, on c^L_t
            else:
                self.depth_weight_lc = nn.Parameter(torch.empty(H, lower_dim))  # w_ld as a matrix
                self.depth_proj = nn.Parameter(torch.empty(H, lower_dim))  # P: c^L into this layer's width
        self.use_stabiliser = stabiliser
        if stabiliser:
            self.stabiliser = nn.Parameter(torch.zeros(()))  # s; the input is scaled by exp(s)
        if peephole:
            self.peephole_i = nn.Parameter(torch.empty(H))
            self.peephole_f = None if coupled else nn.Parameter(torch.empty(H))
            self.peephole_o = nn.Parameter(torch.empty(H))

    def forward(self, x: Tensor, state: tuple[Tensor, ...], lower_c: Tensor | None = None):
        h0, c0 = state
        xg = x * self.stabiliser.exp() if self.use_stabiliser else x  # the gates' view of the input
        gx = F.linear(xg, self.weight_ih, self.bias_ih + self.bias_hh)  # (T, B, G*H), all steps in one GEMM
        gd = m = wcd = None
        if self.has_depth:
            gd = F.linear(xg, self.depth_weight_ih, self.depth_bias)  # (T, B, H)
            if self.gate_input:
                m = F.linear(x, self.depth_proj)
            else:
                if lower_c is None:
                    raise ValueError("a DGLSTM layer above the first needs the lower layer's cells")
                if self.depth_weight_lc.dim() == 1:
                    gd = gd + self.depth_weight_lc * lower_c
                    m = lower_c
                else:
                    gd = gd + F.linear(lower_c, self.depth_weight_lc)
                    m = F.linear(lower_c, self.depth_proj)
            wcd = self.depth_weight_cc
        peep = (self.peephole_i, self.peephole_f, self.peephole_o) if self.peephole else (None, None, None)
        h_all, c_all = scan(
            gx, gd, m, h0, c0, self.weight_hh, *peep, wcd, coupled=self.coupled, backend=self.backend
        )
        return h_all, c_all, (h_all[-1], c_all[-1])


class RecurrentStack(nn.Module):
    """Layers joined by dropout on h; the DGLSTM layers also receive the lower layer's cells."""

    def __init__(self, layers: list[nn.Module], dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.drop = nn.Dropout(dropout)
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
        nn.LSTM does: oneDNN / cuDNN process all layers at once), else None."""
        kinds = {type(layer) for layer in self.layers}
        if len({layer.hidden_dim for layer in self.layers}) != 1 or len(kinds) != 1:
            return None
        return {LSTMLayer: "lstm", RNNLayer: "rnn"}.get(kinds.pop())

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        fused = self._fused_kind()
        if fused is not None:
            # one call for all layers; its dropout between layers is nn.LSTM's (training only)
            weights = [
                w
                for layer in self.layers
                for w in (layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh)
            ]
            args = (True, len(self.layers), self.drop.p, self.training, False, False)
            if fused == "lstm":
                h0 = torch.stack([s[0] for s in state])
                c0 = torch.stack([s[1] for s in state])
                out, h, c = torch.lstm(x, (h0, c0), weights, *args)
                return out, [(h[k], c[k]) for k in range(len(self.layers))]
            out, h = torch.rnn_tanh(x, torch.stack([s[0] for s in state]), weights, *args)
            return out, [(h[k],) for k in range(len(self.layers))]
        new_state, lower_c = [], None
        for idx, layer in enumerate(self.layers):
            if idx > 0:
                x = self.drop(x)
            x, lower_c, layer_state = layer(x, state[idx], lower_c)
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
) -> RecurrentStack:
    """kind: rnn | lstm | stacked_lstm | dglstm."""
    dims = [input_dim, *hidden_dims]
    if kind == "rnn":
        layers = [RNNLayer(dims[k], dims[k + 1]) for k in range(len(hidden_dims))]
    elif kind in ("lstm", "stacked_lstm"):
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
            )
            for k in range(len(hidden_dims))
        ]
    else:
        raise ValueError(f"unknown recurrent core {kind!r} (rnn, lstm, stacked_lstm, dglstm)")
    for layer in layers:  # nn.LSTM's default; LanguageModel.reset_parameters applies the configured init
        bound = 1.0 / layer.hidden_dim**0.5
        for name, p in layer.named_parameters():
            if name == "stabiliser":
                nn.init.zeros_(p)  # exp(0) = 1: the plain layer to begin with
            else:
                nn.init.uniform_(p, -bound, bound)
    return RecurrentStack(layers, dropout)
