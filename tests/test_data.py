"""The data module: PTB counts, exact round trips, batching coverage, downloads (offline fixtures), bad input."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dglstm_lm.config import PTB_SHA256
from dglstm_lm.data import (
    EOS,
    FILES,
    PAD_TARGET,
    SentenceBatches,
    StreamBatches,
    make_batches,
    prepare,
)
from dglstm_lm.errors import DataError

from .conftest import PY, ROOT, TINY_TRAIN, run_cli, write_corpus


def sums_of(folder: Path) -> dict:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES.values()}


def cache_entries(root: Path) -> list[str]:
    cache = root / "cache"
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ------------------------------------------------------------------------------------------ tiny corpus
def test_tiny_vocab_ids_and_oov(tiny_dir, tmp_path):
    corpus = prepare(data_dir=str(tiny_dir), root=tmp_path / "root", verify_checksums=False)
    words = corpus.vocab.words
    assert words[0] == EOS
    counts = {}
    for line in TINY_TRAIN:
        for w in line.split():
            counts[w] = counts.get(w, 0) + 1
    assert words[1:] == sorted(counts, key=lambda w: (-counts[w], w))  # by count, ties by spelling
    assert len(corpus.vocab) == len(counts) + 1  # <unk> occurs in train already
    # 'bird' (valid) and 'fish' (test) are not in train: they become <unk> and are counted
    assert corpus.splits["valid"].oov == 1 and corpus.splits["test"].oov == 1
    unk = corpus.vocab.unk
    assert (corpus.splits["valid"].ids == unk).sum() == 1
    meta = json.loads((corpus.cache / "vocab.json").read_text())
    assert meta["words"] == words


def test_ids_are_stable_across_preparations(tiny_dir, tmp_path):
    a = prepare(data_dir=str(tiny_dir), root=tmp_path / "a", verify_checksums=False)
    b = prepare(data_dir=str(tiny_dir), root=tmp_path / "b", verify_checksums=False)
    assert (a.cache / "vocab.json").read_bytes() == (b.cache / "vocab.json").read_bytes()
    for s in ("train", "valid", "test"):
        assert np.array_equal(a.splits[s].ids, b.splits[s].ids)


def test_second_prepare_reads_the_cache(tiny_dir, tmp_path, monkeypatch):
    root = tmp_path / "root"
    first = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    import dglstm_lm.data as data

    monkeypatch.setattr(data, "_build_cache", lambda *a: pytest.fail("the cache should have been used"))
    second = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    assert second.cache == first.cache and np.array_equal(
        second.splits["train"].ids, first.splits["train"].ids
    )


# ------------------------------------------------------------------------------------------ real PTB
def test_ptb_counts(ptb_corpus):
    s = ptb_corpus.stats()
    assert s["vocab_size"] == 10_000
    assert [s[k]["sentences"] for k in ("train", "valid", "test")] == [42_068, 3_370, 3_761]
    assert [s[k]["tokens"] for k in ("train", "valid", "test")] == [929_589, 73_760, 82_430]
    assert [s[k]["oov"] for k in ("train", "valid", "test")] == [0, 0, 0]
    assert ptb_corpus.vocab.unk is not None


def test_ptb_ids_words_ids_round_trip_is_exact(ptb_corpus, ptb_dir):
    """ids → words → ids is the identity, and the words rebuild each file byte for byte."""
    vocab = ptb_corpus.vocab
    for split, name in FILES.items():
        sp = ptb_corpus.splits[split]
        words = vocab.decode(sp.ids)
        assert np.array_equal(np.array(vocab.encode(words)), sp.ids)
        lines = []
        for s in range(sp.num_sentences):
            sentence = words[sp.offsets[s] : sp.offsets[s + 1]]
            assert sentence[-1] == EOS
            lines.append(" " + " ".join(sentence[:-1]) + " \n")
        assert hashlib.sha256("".join(lines).encode()).hexdigest() == PTB_SHA256[name]


def _stream_targets(batches: StreamBatches) -> np.ndarray:
    """Every target the windows hold, read column by column (the order the model sees them), padding dropped."""
    cols = [[] for _ in range(batches.batch_size)]
    for i in range(len(batches)):
        x, y = batches[i]
        assert x.shape == y.shape and x.shape[0] <= batches.bptt
        for b in range(batches.batch_size):
            cols[b].extend(int(t) for t in y[:, b] if int(t) != PAD_TARGET)
    return np.array([t for col in cols for t in col])


@pytest.mark.parametrize("split,batch_size,bptt", [("train", 20, 35), ("valid", 10, 20), ("test", 7, 13)])
def test_ptb_stream_covers_every_token_once(ptb_corpus, split, batch_size, bptt):
    ids = ptb_corpus.splits[split].ids
    batches = make_batches(ptb_corpus, split, "stream", batch_size, bptt, shuffle=False)
    assert np.array_equal(_stream_targets(batches), ids)
    # inputs are the stream one step behind the targets: within a column, input row k+1 is target row k, and
    # each column starts from the token before its first target (<eos> for the first column)
    x, y = batches.inputs.numpy(), batches.targets.numpy()
    mask = y != PAD_TARGET
    assert mask.sum() == len(ids) and (~mask).sum() == batches.rows * batch_size - len(ids)
    assert ((x[1:] == y[:-1]) | ~mask[1:]).all()
    lengths = mask.sum(0)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    stream = np.concatenate([[ptb_corpus.vocab.eos], ids])
    assert np.array_equal(x[0], stream[starts]) and np.array_equal(y[0], stream[starts + 1])
    assert (np.diff(lengths) <= 0).all() and lengths.max() - lengths.min() <= 1  # padding: last row only


def test_ptb_sentence_mode_covers_every_sentence_once(ptb_corpus):
    sp = ptb_corpus.splits["train"]
    batches = make_batches(ptb_corpus, "train", "sentence", 20, 35, shuffle=True, seed=3)
    for epoch in (0, 1):
        order = batches.order(epoch)
        seen = np.concatenate(order)
        assert np.array_equal(np.sort(seen), np.arange(sp.num_sentences))
    assert not all(np.array_equal(a, b) for a, b in zip(batches.order(0), batches.order(1)))
    again = make_batches(ptb_corpus, "train", "sentence", 20, 35, shuffle=True, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again.order(1), batches.order(1)))  # resumable order
    # each batch: targets are the sentences' tokens, inputs the same shifted behind <eos>, the rest padding
    total = 0
    for i in range(0, len(batches), 97):
        ids = batches.order(0)[i]
        x, y = batches.get(0, i)
        for b, s in enumerate(ids):
            toks = sp.ids[sp.offsets[s] : sp.offsets[s + 1]]
            n = len(toks)
            assert y[:n, b].tolist() == toks.tolist() and (y[n:, b] == PAD_TARGET).all()
            assert x[0, b] == ptb_corpus.vocab.eos and x[1:n, b].tolist() == toks[:-1].tolist()
            total += n
    assert total > 0
    # all batches together hold every token exactly once
    assert sum(int((batches.get(0, i)[1] != PAD_TARGET).sum()) for i in range(len(batches))) == sp.num_tokens


def test_eval_sentence_batches_are_sorted_and_complete(ptb_corpus):
    batches = make_batches(ptb_corpus, "valid", "sentence", 10, 35, shuffle=False)
    order = np.concatenate(batches.order(0))
    assert np.array_equal(np.sort(order), np.arange(3_370))
    lengths = batches.lengths[order]
    assert (np.diff(lengths) >= 0).all()


def test_stream_layout_small_example():
    """The docstring's picture: 11 tokens, 3 columns of 4, 4 and 3 targets."""
    ids = np.arange(1, 12)
    b = StreamBatches(ids, batch_size=3, bptt=2, eos_id=0)
    assert b.targets.tolist() == [[1, 5, 9], [2, 6, 10], [3, 7, 11], [4, 8, PAD_TARGET]]
    assert b.inputs[:3].tolist() == [[0, 4, 8], [1, 5, 9], [2, 6, 10]]
    assert len(b) == 2 and b[1][1].tolist() == [[3, 7, 11], [4, 8, PAD_TARGET]]


# ------------------------------------------------------------------------------------------ downloads (offline)
def _write_parquet_fixture(folder: Path, corpus_dir: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for split, hub in (("train", "train"), ("valid", "validation"), ("test", "test")):
        lines = (corpus_dir / FILES[split]).read_text().splitlines()
        out = folder / hub / "0000.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"sentence": [line.strip() for line in lines]}), out)
    return str(folder / "{split}" / "0000.parquet")


def test_download_from_hub_parquet_restores_the_files(tiny_dir, tmp_path, monkeypatch):
    """The hub path (parquet → text) through the real code on a local parquet fixture: the files come back
    byte for byte, proved by their checksums."""
    monkeypatch.delenv("PTB_DIR", raising=False)
    hub_url = _write_parquet_fixture(tmp_path / "hub", tiny_dir)
    root = tmp_path / "root"
    corpus = prepare(root=root, sha256=sums_of(tiny_dir), sources=["hub"], hub_url=hub_url, raw_url="")
    assert corpus.source == root / "ptb"
    assert sums_of(root / "ptb") == sums_of(tiny_dir)
    assert not [p for p in root.iterdir() if p.name.startswith(".ptb-download")]


def test_download_falls_back_to_raw_files(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("PTB_DIR", raising=False)
    root = tmp_path / "root"
    corpus = prepare(
        root=root,
        sha256=sums_of(tiny_dir),
        sources=["hub", "github"],
        hub_url=str(tmp_path / "nowhere" / "{split}.parquet"),
        raw_url=f"file://{tiny_dir}/{{file}}",
    )
    assert sums_of(corpus.source) == sums_of(tiny_dir)


def test_download_with_wrong_checksum_keeps_nothing(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("PTB_DIR", raising=False)
    root = tmp_path / "root"
    bad = dict(sums_of(tiny_dir), **{"ptb.valid.txt": "0" * 64})
    with pytest.raises(DataError, match="ptb.valid.txt has SHA-256"):
        prepare(root=root, sha256=bad, sources=["github"], hub_url="", raw_url=f"file://{tiny_dir}/{{file}}")
    assert not (root / "ptb").exists() and list(root.iterdir()) == []


def test_offline_without_a_copy_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("PTB_DIR", raising=False)
    with pytest.raises(DataError) as exc:
        prepare(
            root=tmp_path / "root",
            sha256=PTB_SHA256,
            sources=["hub", "github"],
            hub_url=str(tmp_path / "none" / "{split}.parquet"),
            raw_url="file:///nonexistent/{file}",
        )
    msg = str(exc.value)
    assert "PTB not found" in msg and "PTB_DIR" in msg and "ptb.train.txt" in msg and "\n" not in msg


def test_make_data_offline_is_a_one_line_error(tmp_path):
    env = {"PTB_DIR": "", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = run_cli(
        [
            PY,
            "-m",
            "dglstm_lm.data",
            f"paths.data_dir={tmp_path}",
            "data.raw_url='file:///nonexistent/{file}'",
        ],
        env=env,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: PTB not found") and "Traceback" not in r.stderr


def test_make_data_prints_the_ptb_statistics(ptb_dir, tmp_path):
    r = run_cli(["make", "-s", "data", f"paths.data_dir={tmp_path}"], env={"PTB_DIR": str(ptb_dir)})
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for expected in ("42,068", "929,589", "3,370", "73,760", "3,761", "82,430", "vocabulary 10,000"):
        assert expected in out, out


# ------------------------------------------------------------------------------------------ bad input
def _copy_tiny(tiny_dir: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in FILES.values():
        (dest / f).write_bytes((tiny_dir / f).read_bytes())
    return dest


def _write(name: str, content: bytes):
    def mutate(folder: Path) -> Path:
        (folder / name).write_bytes(content)
        return folder

    return mutate


def _remove(name: str):
    def mutate(folder: Path) -> Path:
        (folder / name).unlink()
        return folder

    return mutate


BAD_DATA = {
    "missing folder": (lambda d: d / "absent", "does not exist"),
    "missing split file": (_remove("ptb.test.txt"), "ptb.test.txt is missing"),
    "empty file": (_write("ptb.valid.txt", b""), "ptb.valid.txt is empty"),
    "whitespace only": (_write("ptb.valid.txt", b" \n \n"), "ptb.valid.txt is empty"),
    "not UTF-8": (_write("ptb.train.txt", b" caf\xe9 au lait \n"), "ptb.train.txt is not UTF-8"),
    "truncated (checksum)": (_write("ptb.train.txt", b" the cat \n"), "ptb.train.txt has SHA-256"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_a_clear_error_and_leaves_no_cache(case, tiny_dir, tmp_path):
    mutate, expected = BAD_DATA[case]
    folder = mutate(_copy_tiny(tiny_dir, tmp_path / "corpus"))
    root = tmp_path / "root"
    sums = sums_of(tiny_dir) if "checksum" in case else None
    with pytest.raises(DataError, match=expected) as exc:
        prepare(data_dir=str(folder), root=root, verify_checksums=sums is not None, sha256=sums)
    assert "\n" not in str(exc.value)
    assert cache_entries(root) == []


@pytest.mark.parametrize(
    "mode,batch_size,bptt,expected",
    [
        ("stream", 0, 20, "batch size must be positive"),
        ("stream", -3, 20, "batch size must be positive"),
        ("stream", 4, 0, "bptt must be positive"),
        ("stream", 500, 5, "valid split: the split has 21 tokens, fewer than the batch size 500"),
        ("sentence", 10, 5, "valid split: the split has 3 sentences, fewer than the batch size 10"),
    ],
)
def test_bad_batching_arguments(tiny_dir, tmp_path, mode, batch_size, bptt, expected):
    corpus = prepare(data_dir=str(tiny_dir), root=tmp_path, verify_checksums=False)
    with pytest.raises(DataError, match=expected):
        make_batches(corpus, "valid", mode, batch_size, bptt, shuffle=False)


def test_interrupted_preparation_leaves_no_half_written_cache(tiny_dir, tmp_path, monkeypatch):
    import datasets

    root = tmp_path / "root"

    def boom(self, *a, **k):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", boom)
    with pytest.raises(RuntimeError, match="disk went away"):
        prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    assert cache_entries(root) == []
    monkeypatch.undo()
    corpus = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    assert cache_entries(root) == [corpus.cache.name]


def _prepare_in_process(args):
    folder, root = args
    from dglstm_lm.data import prepare as prep

    c = prep(data_dir=folder, root=root, verify_checksums=False)
    return c.cache.name, c.splits["train"].ids.tolist()


def test_two_processes_preparing_at_once_share_one_cache(tiny_dir, tmp_path):
    root = tmp_path / "root"
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        (name_a, ids_a), (name_b, ids_b) = pool.map(_prepare_in_process, [(str(tiny_dir), str(root))] * 2)
    assert name_a == name_b and ids_a == ids_b
    assert cache_entries(root) == [name_a]  # one complete cache, no temporary folder left


def test_sentence_batches_respect_padding(tiny_dir, tmp_path):
    corpus = prepare(data_dir=str(write_corpus(tmp_path / "c")), root=tmp_path / "r", verify_checksums=False)
    b = make_batches(corpus, "train", "sentence", 3, 5, shuffle=False)
    assert isinstance(b, SentenceBatches)
    n = sum(int((b.get(0, i)[1] != PAD_TARGET).sum()) for i in range(len(b)))
    assert n == corpus.splits["train"].num_tokens


def test_project_root_has_no_ptb_copy():
    """The PTB files are read where they are; the repository never holds them."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert not any(Path(p).name in FILES.values() for p in tracked)


# ------------------------------------------------------------------------------------------ a damaged cache
def _vocab_cut_short(cache: Path) -> None:
    meta = json.loads((cache / "vocab.json").read_text())
    meta["words"] = meta["words"][: len(meta["words"]) // 2]  # still valid JSON, fewer words
    (cache / "vocab.json").write_text(json.dumps(meta))


def _arrow_file(cache: Path, split: str = "train") -> Path:
    (path,) = (cache / "arrow" / split).glob("*.arrow")
    return path


def _bytes_changed(cache: Path) -> None:
    path = _arrow_file(cache)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A  # same size, one byte different
    path.write_bytes(bytes(data))


def _ids_out_of_range(cache: Path) -> None:
    """A vocabulary cut short with a manifest rewritten to match it: only the range check is left to see
    that the ids point past the end of the vocabulary."""
    import dglstm_lm.data as data

    _vocab_cut_short(cache)
    manifest = json.loads((cache / data.MANIFEST).read_text())
    manifest["vocab_size"] = len(json.loads((cache / "vocab.json").read_text())["words"])
    size = (cache / "vocab.json").stat().st_size
    manifest["files"]["vocab.json"] = [size, data._digest_file(cache / "vocab.json")]
    (cache / data.MANIFEST).write_text(json.dumps(manifest))


def _half_copied(cache: Path) -> None:
    """A cache folder without its manifest: a copy cut short, or one made by a preparation that was killed."""
    (cache / "manifest.json").unlink()
    _arrow_file(cache, "test").unlink()


DAMAGED_CACHE = {
    "vocab.json cut short": (_vocab_cut_short, "vocab.json has"),
    "bytes of an Arrow file changed": (_bytes_changed, "has changed since it was written"),
    "arrow/ deleted": (lambda c: shutil.rmtree(c / "arrow"), "arrow/dataset_dict.json is missing"),
    "an extra file": (
        lambda c: (c / "arrow" / "train" / "notes.txt").write_text("x"),
        "notes.txt is not part",
    ),
    "no manifest (half-copied)": (_half_copied, "has no manifest.json"),
    "manifest not JSON": (lambda c: (c / "manifest.json").write_text("{"), "manifest.json is unreadable"),
    "ids outside the vocabulary": (_ids_out_of_range, "outside the vocabulary"),
}


@pytest.mark.parametrize("case", list(DAMAGED_CACHE))
def test_damaged_cache_is_moved_aside_and_rebuilt(case, tiny_dir, tmp_path, caplog):
    damage, reason = DAMAGED_CACHE[case]
    root = tmp_path / "root"
    good = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    assert good.check_s is None  # just built: checked once, as it is written
    damage(good.cache)
    with caplog.at_level("WARNING", logger="dglstm_lm.data"):
        again = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    lines = [r.getMessage() for r in caplog.records if "failed its check" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], caplog.text  # one log line, saying what and where
    (aside,) = [p for p in (root / "cache").iterdir() if ".damaged-" in p.name]
    assert f"moved it to {aside}" in lines[0]
    assert aside.name.startswith(good.cache.name) and any(aside.rglob("*"))  # kept, not deleted
    assert again.cache == good.cache and again.vocab.words == good.vocab.words
    for s in ("train", "valid", "test"):
        assert np.array_equal(again.splits[s].ids, good.splits[s].ids)
    checked = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)  # the rebuilt one passes
    assert checked.check_s is not None and checked.vocab.words == good.vocab.words


def test_a_preparation_killed_half_way_leaves_a_folder_that_is_cleaned_up(tiny_dir, tmp_path, caplog):
    root = tmp_path / "root"
    code = (
        "import sys; from dglstm_lm.data import prepare;"
        "prepare(data_dir=sys.argv[1], root=sys.argv[2], verify_checksums=False)"
    )
    r = subprocess.run(
        [PY, "-c", code, str(tiny_dir), str(root)],
        cwd=ROOT,
        env=dict(os.environ, DGLSTM_FAULT="cache_write:1"),
        capture_output=True,
        text=True,
    )
    assert r.returncode == -9, r.stderr[-2000:]  # killed with the Arrow files written, not the manifest
    (half,) = (root / "cache").iterdir()
    assert half.name.startswith(".") and ".tmp-" in half.name and (half / "arrow").is_dir()
    with caplog.at_level("INFO", logger="dglstm_lm.data"):
        corpus = prepare(data_dir=str(tiny_dir), root=root, verify_checksums=False)
    assert f"removed {half}, the temporary folder of a preparation that was killed" in caplog.text
    assert cache_entries(root) == [corpus.cache.name]
    assert corpus.splits["train"].num_tokens == sum(len(s.split()) + 1 for s in TINY_TRAIN)


def test_a_damaged_cache_without_its_source_is_one_line_naming_both(tiny_dir, tmp_path, monkeypatch):
    import dglstm_lm.data as data

    root = tmp_path / "root"
    corpus = prepare(
        data_dir=str(_copy_tiny(tiny_dir, tmp_path / "corpus")), root=root, verify_checksums=False
    )
    _bytes_changed(corpus.cache)
    # the text is gone by the time the cache has to be rebuilt from it
    found = data.locate(str(tmp_path / "corpus"), root, False, [], "", "", None)
    shutil.rmtree(tmp_path / "corpus")
    monkeypatch.setattr(data, "locate", lambda *a, **k: found)
    with pytest.raises(DataError) as exc:
        prepare(data_dir=str(tmp_path / "corpus"), root=root, verify_checksums=False)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"the data cache {corpus.cache} failed its check" in msg and "moved it to" in msg
    assert f"cannot be rebuilt from {tmp_path / 'corpus'}" in msg


def test_cache_check_reads_the_manifest_written_last(tiny_dir, tmp_path):
    import dglstm_lm.data as data

    corpus = prepare(data_dir=str(tiny_dir), root=tmp_path, verify_checksums=False)
    manifest = json.loads((corpus.cache / data.MANIFEST).read_text())
    assert manifest["vocab_size"] == len(corpus.vocab)
    assert {s: manifest["splits"][s]["tokens"] for s in ("train", "valid", "test")} == {
        s: corpus.splits[s].num_tokens for s in ("train", "valid", "test")
    }
    assert set(manifest["files"]) >= {"vocab.json", "arrow/dataset_dict.json"}
    vocab, splits = data.check_cache(corpus.cache)
    assert vocab.words == corpus.vocab.words


def test_the_cache_folder_takes_the_umask_like_any_other(tmp_path):
    """mkdtemp makes 0700 folders: renamed into place as is, a cache shared by a cluster's users or jobs
    under other accounts could not be read by them."""
    import os

    from dglstm_lm.data import prepare

    from .conftest import write_corpus

    old = os.umask(0o022)
    try:
        corpus = prepare(
            data_dir=str(write_corpus(tmp_path / "c")), root=tmp_path / "root", verify_checksums=False
        )
    finally:
        os.umask(old)
    assert corpus.cache.stat().st_mode & 0o777 == 0o755


def test_a_cache_moved_aside_by_another_process_while_checked_is_rebuilt(tmp_path, monkeypatch, caplog):
    """Two processes on a damaged cache: one moves it aside while the other is still checking it (a
    FileNotFoundError from check_cache, 2 of 9 tries of two `make data` 0.05 s apart). The checking one looks
    again, rebuilds, and gets the same corpus, no traceback."""
    from dglstm_lm import data

    from .conftest import write_corpus

    src = write_corpus(tmp_path / "c")
    root = tmp_path / "root"
    first = data.prepare(data_dir=str(src), root=root, verify_checksums=False)
    real = data._digest_file
    calls = []

    def other_process_moves_it(path):
        calls.append(path)
        if len(calls) == 1:  # the other process: the cache moved aside after our check read its manifest
            cache = first.cache
            os.rename(cache, cache.with_name(cache.name + ".damaged-elsewhere"))
        return real(path)

    monkeypatch.setattr(data, "_digest_file", other_process_moves_it)
    with caplog.at_level("WARNING", logger="dglstm_lm.data"):
        again = data.prepare(data_dir=str(src), root=root, verify_checksums=False)
    assert again.vocab.words == first.vocab.words and again.digest == first.digest
    assert again.cache == first.cache and (again.cache / "manifest.json").is_file()
    assert (
        "vanished while it was being checked" in caplog.text
        and "another process moved it aside" in caplog.text
    )
