"""Every number a run reports, against a value with a known answer computed here, not by the trainer.

- A model whose decoder is zero predicts the uniform distribution: perplexity = the vocabulary size, exactly,
  on every split, in both batching modes, in evaluate_batches, in `make eval` and in a run's records.
- A model whose logits are a hand-set vector b (decoder weight 0, bias b) on a hand-made corpus: the NLL of a
  target w is logsumexp(b) − b[w], so every perplexity and the training loss follow from word counts taken
  from the corpus files by this test.
- The final numbers come from the best epoch, not the last; learning-rate schedules cross their decay as the
  schedule's definition says, in history.jsonl and in W&B; a resume after the decay started is exact.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from dglstm_lm import checkpoint as ckpt
from dglstm_lm.config import compose, validate
from dglstm_lm.data import make_batches
from dglstm_lm.evaluate import evaluate_checkpoint
from dglstm_lm.models import build_model
from dglstm_lm.train import train
from dglstm_lm.trainer import Interrupted, Trainer, evaluate_batches

from .conftest import write_corpus
from .test_train import _interrupt_at, _wandb_records, read_history, strip_time

TINY_LR = "1e-30"  # SGD steps this small leave every weight where it was (far below an ulp of the bias)
SMALL = ("model.emb_dim=16", "model.hidden_dim=16")


def _cfg(tmp_path, data_dir, data_root, *overrides, checksums=True):
    return compose(
        [
            "experiment=smoke",
            "logger=none",
            "trainer.progress=off",
            f"paths.output_dir={tmp_path / 'out'}",
            f"paths.data_dir={data_root}",
            f"data.dir={data_dir}",
            *([] if checksums else ["data.verify_checksums=false"]),
            *SMALL,
            *overrides,
        ]
    )


def _save_model_with_logits(cfg, vocab_words, bias_of, path: Path) -> Path:
    """A checkpoint of cfg's model whose decoder weight is 0 and whose bias is bias_of(word) per word."""
    model = build_model(len(vocab_words), validate(cfg).model)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.tensor([bias_of(w) for w in vocab_words]))
    ckpt.save({"model": model.state_dict()}, path, keep_previous=False)
    return path


# ------------------------------------------------------------------------------------------ uniform oracle
@pytest.mark.parametrize("batching", ["stream", "sentence"])
def test_uniform_model_perplexity_is_the_vocabulary_size_in_evaluate_batches(batching, ptb_corpus):
    model = build_model(10_000, validate(compose(["model=dglstm", *SMALL])).model)
    with torch.no_grad():
        model.decoder.weight.zero_(), model.decoder.bias.zero_()
    for split in ("valid", "test"):
        batches = make_batches(ptb_corpus, split, batching, 10, 35, shuffle=False)
        nll, ntok = evaluate_batches(model, batches, torch.device("cpu"), limit=8)
        assert math.exp(nll / ntok) == pytest.approx(10_000, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["stream", "sentence"])
def test_uniform_model_run_and_make_eval_report_the_vocabulary_size(
    batching, tmp_path, ptb_dir, ptb_root, ptb_corpus
):
    """Through the whole trainer: every epoch's train ppl, the best val ppl, the test ppl, and make eval."""
    init = _cfg(tmp_path, ptb_dir, ptb_root, "model=stacked_lstm")
    words = ptb_corpus.vocab.words
    start = _save_model_with_logits(init, words, lambda w: 0.0, tmp_path / "uniform.pt")
    cfg = _cfg(
        tmp_path,
        ptb_dir,
        ptb_root,
        "model=stacked_lstm",
        f"data.batching={batching}",
        f"trainer.init_from={start}",
        f"trainer.lr={TINY_LR}",
        "trainer.limit_train_batches=4",
        "trainer.limit_eval_batches=4",
    )
    run_dir = tmp_path / "run"
    m = train(cfg, run_dir)
    history = read_history(run_dir)
    assert len(history) == m["epochs_completed"] >= 1
    for rec in history:
        assert rec["train/ppl"] == pytest.approx(10_000, rel=1e-5)
        assert rec["val/ppl"] == pytest.approx(10_000, rel=1e-5)
    saved = json.loads((run_dir / "metrics.json").read_text())
    for key in ("val/ppl", "test/ppl", "train/ppl"):
        assert m[key] == saved[key] == pytest.approx(10_000, rel=1e-5), key
    ev = evaluate_checkpoint(run_dir)
    assert ev["valid/ppl"] == pytest.approx(10_000, rel=1e-5) and ev["test/ppl"] == pytest.approx(
        10_000, rel=1e-5
    )


# ------------------------------------------------------------------------------------------ hand-set logits
CORPUS = {
    "train": ["the cat sat on the mat", "a dog sat", "the dog and the cat sat on a log", "on the log"],
    "valid": ["the bird sat on the mat", "a cat"],  # 'bird' is not in train: <unk>
    "test": ["a dog on the mat", "the fish sat", "cat"],
}


def _bias(word: str) -> float:
    """Any fixed function of the word will do; this one spreads the logits over about ±1.5."""
    return (sum(map(ord, word)) % 7) * 0.5 - 1.5


def _expected(split: str) -> tuple[float, int]:
    """Mean NLL per target and the number of targets of a split, from the corpus text alone: every word and
    one <eos> per sentence is a target exactly once; words unseen in train are <unk>."""
    known = {w for line in CORPUS["train"] for w in line.split()}
    vocab = known | {"<eos>", "<unk>"}
    lse = math.log(sum(math.exp(_bias(w)) for w in vocab))
    counts = Counter()
    for line in CORPUS[split]:
        counts.update(w if w in known else "<unk>" for w in line.split())
        counts["<eos>"] += 1
    n = sum(counts.values())
    return sum(c * (lse - _bias(w)) for w, c in counts.items()) / n, n


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["stream", "sentence"])
def test_hand_set_logits_give_the_computed_loss_perplexity_and_token_count(batching, tmp_path):
    folder = write_corpus(tmp_path / "corpus", **CORPUS)
    root = tmp_path / "data"
    sizes = ("trainer.batch_size=2", "trainer.eval_batch_size=2", "trainer.bptt=4", "trainer.max_epochs=2")
    base = _cfg(tmp_path, folder, root, "model=dglstm", *sizes, checksums=False)
    from dglstm_lm.data import prepare

    words = prepare(data_dir=str(folder), root=root, verify_checksums=False).vocab.words
    assert set(words) == {w for line in CORPUS["train"] for w in line.split()} | {"<eos>", "<unk>"}
    start = _save_model_with_logits(base, words, _bias, tmp_path / "hand.pt")
    cfg = _cfg(
        tmp_path,
        folder,
        root,
        "model=dglstm",
        *sizes,
        f"data.batching={batching}",
        f"trainer.init_from={start}",
        f"trainer.lr={TINY_LR}",
        "trainer.limit_train_batches=null",
        "trainer.limit_eval_batches=null",
        checksums=False,
    )
    run_dir = tmp_path / "run"
    m = train(cfg, run_dir)
    train_nll, train_n = _expected("train")
    history = read_history(run_dir)
    assert len(history) == m["epochs_completed"] >= 1
    for rec in history:
        assert (
            rec["train/tokens"] == train_n
        )  # real targets only: sentence mode pads, the stream's last row too
        assert rec["train/loss"] == pytest.approx(train_nll, rel=1e-6)
        assert rec["train/ppl"] == pytest.approx(math.exp(train_nll), rel=1e-6)
        assert rec["val/ppl"] == pytest.approx(math.exp(_expected("valid")[0]), rel=1e-6)
    assert m["val/ppl"] == pytest.approx(math.exp(_expected("valid")[0]), rel=1e-6)
    assert m["test/ppl"] == pytest.approx(math.exp(_expected("test")[0]), rel=1e-6)
    ev = evaluate_checkpoint(run_dir)
    for split in ("valid", "test"):
        nll, n = _expected(split)
        assert ev[f"{split}/tokens"] == n
        assert ev[f"{split}/ppl"] == pytest.approx(math.exp(nll), rel=1e-6)


# ------------------------------------------------------------------------------------------ best epoch
@pytest.mark.slow
def test_final_numbers_come_from_the_best_epoch_not_the_last(tmp_path, ptb_dir, ptb_root, monkeypatch):
    """Epoch 2 is made bad on purpose (its every step also adds noise to the decoder bias): the run must
    report epoch 1's validation perplexity, best_epoch 1, and the test perplexity of epoch 1's checkpoint;
    best.pt is that checkpoint (the same file as last-previous.pt, hard-linked)."""
    original = Trainer.train_step

    def bad_second_epoch(self, *args):
        out = original(self, *args)
        if self.pos.epoch == 1:
            with torch.no_grad():
                self.model.decoder.bias.add_(torch.randn_like(self.model.decoder.bias) * 3)
        return out

    monkeypatch.setattr(Trainer, "train_step", bad_second_epoch)
    cfg = _cfg(
        tmp_path,
        ptb_dir,
        ptb_root,
        "model=lstm",
        "trainer.limit_train_batches=6",
        "trainer.limit_eval_batches=4",
    )
    run_dir = tmp_path / "run"
    m = train(cfg, run_dir)
    h = read_history(run_dir)
    assert h[1]["val/ppl"] > h[0]["val/ppl"] * 1.5  # epoch 2 really is worse
    assert m["best_epoch"] == 1
    assert m["val/ppl"] == h[0]["val/ppl"]  # the best checkpoint re-evaluated on the same batches
    best, prev = run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last-previous.pt"
    assert best.stat().st_ino == prev.stat().st_ino
    assert torch.load(best, weights_only=True)["epoch"] == 1
    ev = evaluate_checkpoint(prev)
    assert m["test/ppl"] == pytest.approx(ev["test/ppl"], rel=1e-12)
    assert ev["valid/ppl"] == pytest.approx(h[0]["val/ppl"], rel=1e-12)
    last = evaluate_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["test/ppl"] > m["test/ppl"]


# ------------------------------------------------------------------------------------------ schedules
@pytest.mark.slow
def test_zaremba_schedule_crosses_its_decay_in_history_and_wandb(tmp_path, ptb_dir, ptb_root):
    """lr 2, ×0.5 each epoch after the first: 2, 1, 0.5 — per epoch in history.jsonl, per step in W&B."""
    ov = (
        "model=lstm",
        "trainer.lr=2",
        "trainer.lr_decay=0.5",
        "trainer.lr_decay_start=1",
        "trainer.max_epochs=3",
    )
    cfg = _cfg(
        tmp_path,
        ptb_dir,
        ptb_root,
        *ov,
        "trainer.limit_train_batches=3",
        "trainer.limit_eval_batches=2",
        "logger=wandb",
        "logger.log_every_n_steps=1",
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    assert [r["lr"] for r in read_history(run_dir)] == [2.0, 1.0, 0.5]
    steps = [
        (h["_step"], h["train/lr"]) for _, items in _wandb_records(run_dir) for h in items if "train/lr" in h
    ]
    assert steps == [(s, [2.0, 1.0, 0.5][(s - 1) // 3]) for s in range(1, 10)]


@pytest.mark.slow
def test_plateau_schedule_decays_when_validation_stops_improving(tmp_path, ptb_dir, ptb_root, ptb_corpus):
    """A model that cannot learn (steps of 1e-30) never improves after epoch 1, so with patience 0 the rate
    is multiplied by lr_decay after every later epoch: 1e-30, 1e-30, 5e-31, 2.5e-31."""
    words = ptb_corpus.vocab.words
    start = _save_model_with_logits(
        _cfg(tmp_path, ptb_dir, ptb_root, "model=lstm"), words, _bias, tmp_path / "s.pt"
    )
    ov = ("model=lstm", f"trainer.lr={TINY_LR}", "trainer.lr_schedule=plateau", "trainer.lr_decay=0.5")
    cfg = _cfg(
        tmp_path,
        ptb_dir,
        ptb_root,
        *ov,
        f"trainer.init_from={start}",
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=2",
        "trainer.limit_eval_batches=2",
    )
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    h = read_history(run_dir)
    assert len({r["val/ppl"] for r in h}) == 1  # it did not learn
    assert [r["lr"] for r in h] == pytest.approx([1e-30, 1e-30, 5e-31, 2.5e-31], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [10, 6], ids=["epoch 3, after two decays", "epoch 2, one decay to come"])
def test_resume_after_the_decay_started_equals_the_uninterrupted_run(
    tmp_path, ptb_dir, ptb_root, monkeypatch, stop_at
):
    """Stopped in the run's last epoch the optimizer state already carries the right rate; stopped in an
    earlier epoch only a restored scheduler gives the next decay (a fresh one gives [1.0, 0.5, 0.5])."""
    ov = (
        "model=dglstm",
        "trainer.lr_decay_start=1",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=4",
        "trainer.limit_eval_batches=2",
    )
    full = train(_cfg(tmp_path, ptb_dir, ptb_root, *ov), tmp_path / "full")
    run_dir = tmp_path / "stopped"
    _interrupt_at(monkeypatch, stop_at)  # 4 windows an epoch: step 10 is in epoch 3, step 6 in epoch 2
    with pytest.raises(Interrupted, match="SIGTERM"):
        train(_cfg(tmp_path, ptb_dir, ptb_root, *ov), run_dir)
    monkeypatch.undo()
    resumed = train(_cfg(tmp_path, ptb_dir, ptb_root, *ov, f"trainer.resume={run_dir}"), run_dir)
    assert strip_time(resumed) == strip_time(full)
    hist = [strip_time(r) for r in read_history(run_dir)]
    assert hist == [strip_time(r) for r in read_history(tmp_path / "full")]
    assert [r["lr"] for r in hist] == [1.0, 0.5, 0.25]
