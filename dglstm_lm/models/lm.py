"""The language model: embedding → dropout → recurrent core → dropout → decoder over the vocabulary.

Regularisers, all off by default: `dropout` on the embedding output, between layers (in the core) and before
the decoder (a place may have a rate of its own: `dropout_emb`, `dropout_layers`, `dropout_out`), either
standard or variational (`dropout_kind`); `embed_dropout` drops whole word types (a row of the embedding, the
same for every occurrence of the word in the window, Merity et al. 2017); the core's `weight_drop` is
DropConnect on W_hh."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .cores import DEPTH_GATE_INPUTS, RecurrentStack, State, build_core, sequence_dropout


class LanguageModel(nn.Module):
    """Word-level LM around an interchangeable recurrent core; the variants differ only in `core`."""

    def __init__(
        self,
        vocab_size: int,
        emb_dim: int,
        core: RecurrentStack,
        dropout: float = 0.0,
        tie_weights=False,
        dropout_kind: str = "standard",
        embed_dropout: float = 0.0,
        dropout_out: float | None = None,
    ):
        super().__init__()
        self.vocab_size, self.emb_dim = vocab_size, emb_dim
        self.encoder = nn.Embedding(vocab_size, emb_dim)
        self.drop = nn.Dropout(dropout)  # on the embedding's output
        self.drop_out = nn.Dropout(dropout if dropout_out is None else dropout_out)  # before the decoder
        self.dropout_kind, self.embed_dropout = dropout_kind, embed_dropout
        self.core = core
        self.decoder = nn.Linear(core.output_dim, vocab_size)
        self.tie_weights = tie_weights
        if tie_weights:
            if core.output_dim != emb_dim:
                raise ValueError(
                    f"tie_weights needs the last hidden size ({core.output_dim}) == emb_dim ({emb_dim})"
                )
            self.decoder.weight = self.encoder.weight

    def init_state(self, batch_size: int, device=None) -> State:
        return self.core.init_state(batch_size, device=device, dtype=self.encoder.weight.dtype)

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens (T, B) -> logits (T, B, V) and the state after the last step."""
        x = self.encoder(tokens)  # (T, B, E)
        if self.training and self.embed_dropout > 0:
            # one keep/drop draw per word type for this window, scaled by 1/(1-p): the same as looking the
            # tokens up in a row-masked embedding matrix, without building the masked copy
            p = self.embed_dropout
            keep = x.new_empty(self.vocab_size).bernoulli_(1.0 - p).div_(1.0 - p)
            x = x * keep[tokens].unsqueeze(-1)
        x = sequence_dropout(x, self.drop.p, self.dropout_kind, self.training)
        out, state = self.core(x, state)  # (T, B, H_last)
        return self.decoder(sequence_dropout(out, self.drop_out.p, self.dropout_kind, self.training)), state

    def reset_parameters(
        self, init: str = "uniform", init_range: float = 0.1, depth_gate_bias: float | None = None
    ):
        """uniform: every parameter ~ U(-r, r) (Zaremba et al.). xavier: U(±sqrt(6 / (fan_in + fan_out))) for
        every parameter, biases included, with fan_out = 1 for vectors (the `cnn` library's rule).
        depth_gate_bias, when given, then sets every depth-gate bias b_d to that constant; the self-stabilisers'
        s start at 0 whatever the rule."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".stabiliser"):
                    p.zero_()  # s = 0: exp(s) = 1, the plain layer to begin with
                    continue
                if init == "uniform":
                    p.uniform_(-init_range, init_range)
                elif init == "xavier":
                    fan_out, fan_in = (p.shape[0], p.shape[1]) if p.dim() == 2 else (p.shape[0], 1)
                    bound = math.sqrt(6.0 / (fan_in + fan_out))
                    p.uniform_(-bound, bound)
                else:
                    raise ValueError(f"unknown init {init!r} (uniform, xavier)")
                if depth_gate_bias is not None and name.endswith("depth_bias"):
                    p.fill_(depth_gate_bias)

    def init_from(self, state_dict: dict[str, Tensor]) -> list[str]:
        """Copy every tensor of `state_dict` whose name and shape match (e.g. a stacked LSTM into a DGLSTM);
        return the names of this model's parameters that were left as initialised."""
        own = self.state_dict()
        bad = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
        if bad:
            rows = {own[k].shape[0] / state_dict[k].shape[0] for k in bad if ".layers." in k}
            why = (
                " (this model has 3 gate blocks per layer, f = 1 − i with coupled_gates, where the checkpoint "
                "has an LSTM's 4: no tensor maps onto the other; train without init_from or set "
                "model.coupled_gates=false)"
                if rows == {0.75}
                else " (the sizes of the two models differ)"
            )
            raise ValueError(
                "shapes differ for "
                + ", ".join(f"{k} {tuple(state_dict[k].shape)}→{tuple(own[k].shape)}" for k in bad[:3])
                + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                + why
            )
        unknown = [k for k in state_dict if k not in own]
        if unknown:
            raise ValueError("the checkpoint has tensors this model lacks: " + ", ".join(unknown[:5]))
        self.load_state_dict(state_dict, strict=False)
        return [k for k in own if k not in state_dict]


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_backend(cfg, device) -> None:
    """model.backend=cpp (and cpp_blas, cpp_mkl, cpp_onednn) names the fused CPU kernel, triton and triton_graph the GPU ones: say
    at once when the one named cannot run here, not mid-training."""
    backend = getattr(cfg, "backend", "auto")
    if backend in ("triton", "triton_graph"):
        _check_triton_backend(backend, device)
        return
    if backend not in ("cpp", "cpp_blas", "cpp_mkl", "cpp_onednn", "cpp_brgemm"):
        return
    from ..errors import ConfigError
    from .kernels import cpp_extension, cpp_unavailable_reason

    if torch.device(device).type != "cpu":
        raise ConfigError(
            f"model.backend={backend}: the fused C++ kernel runs on the CPU only, and the run is on {device} "
            "(use model.backend=auto)"
        )
    if cpp_extension() is None:
        raise ConfigError(
            f"model.backend={backend}: the fused C++ kernel is unavailable ({cpp_unavailable_reason()}); "
            "use model.backend=auto or python"
        )


def _check_triton_backend(backend: str, device) -> None:
    from ..errors import ConfigError
    from .triton_scan import interpreted, triton_unavailable_reason

    kind = torch.device(device).type
    if backend == "triton_graph" and kind != "cuda":
        raise ConfigError(
            f"model.backend=triton_graph: CUDA graphs need a CUDA device, and the run is on {device} "
            "(use model.backend=auto)"
        )
    if kind != "cuda" and not (kind == "cpu" and interpreted()):
        raise ConfigError(
            f"model.backend=triton: the Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1, "
            f"for tests), and the run is on {device} (use model.backend=auto)"
        )
    reason = triton_unavailable_reason()
    if reason is not None:
        raise ConfigError(
            f"model.backend={backend}: Triton is unavailable ({reason}); torch's CUDA builds bring it, "
            "else pip install triton, or use model.backend=auto"
        )


def _place(cfg, key: str) -> float:
    """The dropout rate at one place: its own key where set, else model.dropout."""
    v = getattr(cfg, key, None)
    return cfg.dropout if v is None else v


def build_model(vocab_size: int, cfg) -> LanguageModel:
    """Build the LM described by a model config (see `dglstm_lm.config`: RNNConfig ... DGLSTMConfig)."""
    core = build_core(
        cfg.name,
        cfg.emb_dim,
        list(cfg.layer_dims),
        dropout=_place(cfg, "dropout_layers"),
        gate_input=getattr(cfg, "gate_input", False),
        peephole=getattr(cfg, "peephole", False),
        coupled=getattr(cfg, "coupled_gates", False),
        backend=getattr(cfg, "backend", "auto"),
        stabiliser=getattr(cfg, "stabiliser", False),
        depth_gate=getattr(cfg, "depth_gate", "learned"),
        depth_gate_inputs=tuple(getattr(cfg, "depth_gate_inputs", DEPTH_GATE_INPUTS)),
        dropout_kind=cfg.dropout_kind,
        weight_drop=cfg.weight_drop,
    )
    model = LanguageModel(
        vocab_size,
        cfg.emb_dim,
        core,
        dropout=_place(cfg, "dropout_emb"),
        tie_weights=cfg.tie_weights,
        dropout_kind=cfg.dropout_kind,
        embed_dropout=cfg.embed_dropout,
        dropout_out=_place(cfg, "dropout_out"),
    )
    model.reset_parameters(cfg.init, cfg.init_range, getattr(cfg, "depth_gate_bias", None))
    return model
