"""Fast oracles of the training step on a tiny corpus and model (seconds): what the step does to the weights
and what it reports, against values computed here from the model's own gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dglstm_lm.config import compose, validate
from dglstm_lm.data import PAD_TARGET, make_batches, prepare_from_config
from dglstm_lm.models import build_model
from dglstm_lm.tracking import Tracker
from dglstm_lm.trainer import Trainer

from .conftest import write_corpus


def _trainer(tmp_path, *overrides):
    corpus_dir = write_corpus(tmp_path / "corpus")
    cfg = validate(
        compose(
            [
                "experiment=smoke",
                "model=dglstm",
                "model.emb_dim=6",
                "model.hidden_dim=8",
                "logger=none",
                "trainer.progress=off",
                "trainer.batch_size=2",
                "trainer.bptt=4",
                f"data.dir={corpus_dir}",
                "data.verify_checksums=false",
                f"paths.data_dir={tmp_path / 'data'}",
                *overrides,
            ]
        )
    )
    corpus = prepare_from_config(cfg.data)
    torch.manual_seed(0)
    model = build_model(len(corpus.vocab), cfg.model)
    trainer = Trainer(model, corpus, cfg, tmp_path / "run", torch.device("cpu"), Tracker(), {}, "dglstm", 0)
    return trainer, corpus, cfg


@pytest.mark.parametrize("clip", [0.01, 1e6])
def test_clipping_is_by_the_global_norm_and_the_logged_norm_is_before_it(tmp_path, clip):
    """Plain SGD (lr 1) with clip_grad_norm=c: the step moves the weights by -lr * g * min(1, c / |g|) with |g|
    the norm of the whole gradient (TensorFlow's clip_by_global_norm), so the move's global norm is at most
    lr * c, every tensor scaled by the same factor; the norm the step returns (and logs) is |g| before the
    clip. The gradient is computed here from a copy of the model."""
    trainer, corpus, cfg = _trainer(tmp_path, "trainer.lr=1.0", f"trainer.clip_grad_norm={clip}")
    model = trainer.model
    x, y = make_batches(corpus, "train", "stream", 2, 4, shuffle=False)[0]
    state = model.init_state(2)
    twin = copy.deepcopy(model)
    logits, _ = twin(x, state)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum") / y.size(1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in twin.named_parameters()}
    g = torch.sqrt(sum((v.double() ** 2).sum() for v in grads.values())).item()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    _, _, gnorm, _ = trainer.train_step(x, y, state)

    assert float(gnorm) == pytest.approx(g, rel=1e-5)  # the pre-clip global norm
    scale = min(1.0, clip / g)
    moved = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for n, d in moved.items():
        torch.testing.assert_close(d, -scale * grads[n], rtol=1e-4, atol=1e-7, msg=n)
    total = torch.sqrt(sum((d.double() ** 2).sum() for d in moved.values())).item()
    assert total == pytest.approx(min(g, clip), rel=1e-4)
    if clip < g:
        assert total <= clip * (1 + 1e-4) and g > 10 * clip  # the clip was active, by a wide margin


def test_training_carries_the_hidden_state_between_windows(tmp_path):
    """With the weights frozen (SGD at lr 1e-30 moves nothing), an epoch's training loss is the loss of the
    same windows evaluated with the state carried from one window to the next (evaluate_batches): equal to
    float noise. The model's weights are large (init ±1) so that the state matters: evaluated with a state
    reset at every window, the loss differs by far more than that noise."""
    from dglstm_lm.trainer import StopSignals, evaluate_batches

    trainer, corpus, cfg = _trainer(
        tmp_path,
        "trainer.lr=1e-30",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=null",
        "trainer.limit_eval_batches=null",
        "model.init_range=1.0",
        "trainer.lr_schedule=constant",
    )
    model = trainer.model
    windows = trainer.train_batches
    assert len(windows) >= 3  # several windows: a state to carry
    nll, ntok = evaluate_batches(model, windows, torch.device("cpu"))
    carried = nll / ntok
    reset_nll = 0.0
    with torch.no_grad():
        for i in range(len(windows)):
            x, y = windows[i]
            logits, _ = model(x, model.init_state(x.size(1)))
            reset_nll += F.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=PAD_TARGET, reduction="sum"
            ).item()
    with StopSignals() as stop:
        (record,) = list(trainer.fit(stop))
    assert record["train/loss"] == pytest.approx(carried, rel=1e-6)
    assert abs(reset_nll / ntok - carried) > 1e-3 * carried  # the state matters here


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda s: s.update(epoch="1"), "its epoch is '1', not a count"),
        (lambda s: s.update(step=-3), "its step is -3, not a count"),
        (lambda s: s.update(optimizer={}), "its optimizer state does not fit"),
        (lambda s: s["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), "its RNG state does not fit"),
    ],
    ids=["string epoch", "negative step", "empty optimizer state", "RNG state of the wrong size"],
)
def test_a_hand_edited_checkpoint_is_one_line_on_resume(tmp_path, edit, message):
    """A checkpoint edited by hand (its digest recomputed, so it loads): each part that does not fit is one
    line naming the file and the part, not a traceback, and the run is not started."""
    from dglstm_lm import checkpoint as ckpt
    from dglstm_lm.errors import CheckpointError
    from dglstm_lm.train import train

    corpus_dir = write_corpus(tmp_path / "corpus")
    ov = [
        "experiment=smoke", "model=lstm", "model.emb_dim=6", "model.hidden_dim=8", "logger=none",
        "trainer.progress=off", "trainer.batch_size=2", "trainer.bptt=4", "trainer.max_epochs=1",
        "trainer.limit_train_batches=null", f"data.dir={corpus_dir}", "data.verify_checksums=false",
        f"paths.data_dir={tmp_path / 'data'}",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    train(compose(ov), run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state.pop("digest")
    edit(state)
    ckpt.save(state, last, keep_previous=False)
    with pytest.raises(CheckpointError) as exc:
        train(compose([*ov, "trainer.max_epochs=2", f"trainer.resume={run_dir}"]), run_dir)
    text = str(exc.value)
    assert text.startswith(f"cannot resume {last}: {message}") and "\n" not in text, text


def test_a_uniform_model_run_reports_the_vocabulary_size_everywhere(tmp_path):
    """The fast twin of test_oracles' uniform oracle (which trains on PTB and runs with the slow tests): a
    model with a zero decoder predicts the uniform distribution over the tiny corpus's 12 words, and frozen
    (lr 1e-30) it keeps doing so, so every perplexity a run reports — each epoch's train ppl and val ppl in
    history.jsonl, the best val, the test and the final train ppl in metrics.json — is exactly 12."""
    import json

    from dglstm_lm import checkpoint as ckpt
    from dglstm_lm.train import train

    corpus_dir = write_corpus(tmp_path / "corpus")
    ov = [
        "experiment=smoke", "model=stacked_lstm", "model.emb_dim=6", "model.hidden_dim=8", "logger=none",
        "trainer.progress=off", "trainer.batch_size=2", "trainer.eval_batch_size=2", "trainer.bptt=4",
        "trainer.max_epochs=2", "trainer.limit_train_batches=null", "trainer.limit_eval_batches=null",
        f"data.dir={corpus_dir}", "data.verify_checksums=false", f"paths.data_dir={tmp_path / 'data'}",
    ]  # fmt: skip
    cfg = validate(compose(ov))
    model = build_model(12, cfg.model)
    with torch.no_grad():
        model.decoder.weight.zero_(), model.decoder.bias.zero_()
    start = tmp_path / "uniform.pt"
    ckpt.save({"model": model.state_dict()}, start, keep_previous=False)
    run_dir = tmp_path / "run"
    m = train(compose([*ov, f"trainer.init_from={start}", "trainer.lr=1e-30"]), run_dir)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for rec in history:
        assert rec["train/ppl"] == pytest.approx(12, rel=1e-6) and rec["val/ppl"] == pytest.approx(
            12, rel=1e-6
        )
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/ppl", "test/ppl", "train/ppl"):
        assert m[key] == saved[key] == pytest.approx(12, rel=1e-6), key


@pytest.mark.parametrize("model", ["stacked_lstm", "residual_lstm", "dglstm"])
def test_layer_gradient_norms_are_each_layers_own_before_clipping(tmp_path, model):
    """8 layers: the norm the step records for layer i is the L2 norm of layer i's parameter gradients, from
    a copy of the model here (names core.layers.<i-1>.*), before clipping (a clip far below them)."""
    trainer, corpus, cfg = _trainer(
        tmp_path, f"model={model}", "model.num_layers=8", "model.hidden_dim=6", "trainer.clip_grad_norm=1e-4"
    )
    m = trainer.model
    x, y = make_batches(corpus, "train", "stream", 2, 4, shuffle=False)[0]
    state = m.init_state(2)
    twin = copy.deepcopy(m)
    logits, _ = twin(x, state)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), reduction="sum") / y.size(1)
    loss.backward()
    expected = []
    for i in range(8):
        sq = sum(
            (p.grad.double() ** 2).sum()
            for n, p in twin.named_parameters()
            if n.startswith(f"core.layers.{i}.") and p.grad is not None
        )
        expected.append(float(torch.sqrt(sq)))
    trainer.train_step(x, y, state)
    assert trainer._step_layer_norms == pytest.approx(expected, rel=1e-5)
    assert trainer.epoch_sums["grad_norm_steps"] == 1
    assert trainer.epoch_sums["layer_grad_norms"] == pytest.approx(expected, rel=1e-5)
    assert max(expected) > 1e-4  # the clip (1e-4, global) was active: the norms are from before it


def test_layer_gradient_norms_off(tmp_path):
    trainer, corpus, _ = _trainer(tmp_path, "logger.layer_grad_norms=false")
    x, y = make_batches(corpus, "train", "stream", 2, 4, shuffle=False)[0]
    trainer.train_step(x, y, trainer.model.init_state(2))
    assert trainer._step_layer_norms == [] and trainer.epoch_sums["grad_norm_steps"] == 0
