"""The Penn Treebank (Mikolov's word-level files): find, verify, tokenise with `datasets`, cache, batch.

Where the text comes from, in order:
  1. a local folder with ptb.train.txt / ptb.valid.txt / ptb.test.txt: `data.dir`, else $PTB_DIR;
  2. a copy downloaded earlier into <data root>/ptb/;
  3. a download (when `data.download` is on): the Hugging Face hub's parquet conversion of `ptb_text_only`,
     else the three raw files from GitHub; written once to <data root>/ptb/ and checked like a local copy.

Tokenisation: split each line on whitespace and append one <eos>; the vocabulary comes from train only
(<eos> is id 0, then by decreasing count, ties by spelling, so ids are the same on every machine); valid and
test words outside it become <unk> and are counted. The result is cached as Arrow files plus vocab.json under
<data root>/cache/<name>-<hash of the three files>/, written to a temporary folder and renamed into place, so a
crash or a second process never leaves or reads a half-written cache.

The cache records what it holds in manifest.json, written last: every file with its size and BLAKE2b digest,
the vocabulary size, and per split the token, sentence and OOV counts and a digest of the token ids. Every
load checks all of it, and that every id lies inside the vocabulary (~0.05 s on PTB). A cache that fails the
check (damaged, cut short, half-copied, with a file missing or one too many) is moved aside to
<name>-<hash>.damaged-<time>/ beside it, never deleted, and rebuilt from the text, with one log line saying so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import faults
from .checkpoint import pid_alive
from .errors import DataError, UserError, cli, find_write_error, write_error_reason

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
FILES = {"train": "ptb.train.txt", "valid": "ptb.valid.txt", "test": "ptb.test.txt"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
EOS, UNK = "<eos>", "<unk>"
CACHE_FORMAT = 2  # bump when tokenisation or the cache layout changes (2: manifest.json)
MANIFEST = "manifest.json"
PAD_TARGET = -100  # ignored by cross_entropy: padding never counts in the loss or the perplexity


# ----------------------------------------------------------------------------------------------------------
# Finding and checking the text


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _not_a_folder(folder: Path, origin: str | None = None) -> str:
    """The one line for a data folder that is not one: missing, or a file."""
    what = "is a file, not a folder" if folder.exists() else "does not exist"
    return f"data folder {folder}" + (f" (from {origin})" if origin else "") + f" {what}"


def check_files(folder: Path, sha256: dict | None) -> dict[str, str]:
    """Check that the three files exist, are non-empty UTF-8 and (if sums are given) match them.
    Returns {split: sha256}."""
    if not folder.is_dir():
        raise DataError(_not_a_folder(folder))
    sums = {}
    for split in SPLITS:
        path = folder / FILES[split]
        if not path.is_file():
            raise DataError(f"{path} is missing (a PTB folder needs {', '.join(FILES.values())})")
        raw = path.read_bytes()
        if not raw.strip():
            raise DataError(f"{path} is empty")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path} is not UTF-8 text (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})"
            ) from None
        sums[split] = hashlib.sha256(raw).hexdigest()
        if sha256 is not None:
            expected = sha256.get(FILES[split])
            if expected is None:
                raise DataError(
                    f"no SHA-256 sum for {FILES[split]} in data.sha256 (set data.verify_checksums=false for your own corpus)"
                )
            if sums[split] != expected:
                raise DataError(
                    f"{path} has SHA-256 {sums[split][:16]}…, expected {expected[:16]}… (a changed or truncated file; "
                    "set data.verify_checksums=false to use your own corpus)"
                )
    return sums


def _download_hub(url_template: str, dest: Path) -> None:
    """The hub's parquet conversion: one row per line, column `sentence` = the line with outer spaces stripped.
    Mikolov's lines are ' w1 ... wn \\n', so writing ' ' + sentence + ' \\n' restores the files byte for byte
    (the checksums prove it)."""
    from datasets import load_dataset

    files = {split: url_template.format(split=HUB_SPLITS[split]) for split in SPLITS}
    with tempfile.TemporaryDirectory(dir=dest.parent) as hf_cache:
        ds = load_dataset("parquet", data_files=files, cache_dir=hf_cache)
        for split in SPLITS:
            with open(dest / FILES[split], "w", encoding="utf-8", newline="\n") as f:
                for sentence in ds[split]["sentence"]:
                    f.write(f" {sentence} \n")


def _download_raw(url_template: str, dest: Path, timeout: float = 30.0) -> None:
    for split in SPLITS:
        url = url_template.format(file=FILES[split], split=split)
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest / FILES[split], "wb") as f:
            shutil.copyfileobj(resp, f)


def download(root: Path, sources: list[str], hub_url: str, raw_url: str, sha256: dict | None) -> Path:
    """Fetch the three files into <root>/ptb/ (atomically: a temporary folder renamed when complete)."""
    final = root / "ptb"
    root.mkdir(parents=True, exist_ok=True)
    errors = []
    for source in sources:
        tmp = Path(tempfile.mkdtemp(prefix=".ptb-download-", dir=root))
        try:
            log.info("downloading PTB from %s", source)
            if source == "hub":
                _download_hub(hub_url, tmp)
            elif source == "github":
                _download_raw(raw_url, tmp)
            else:
                raise DataError(f"unknown download source {source!r} in data.sources (hub, github)")
            check_files(tmp, sha256)
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
            return final
        except DataError as exc:
            errors.append(f"{source}: {exc}")
        except Exception as exc:  # offline, DNS, HTTP errors, ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(f"{source}: {type(exc).__name__} {reason}"[:200])
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    tried = "; ".join(errors) if errors else "downloads are off (data.download=false)"
    raise DataError(
        f"PTB not found: put {', '.join(FILES.values())} in {final}/ or set PTB_DIR=/path/to/them "
        f"(or data.dir=...); download failed ({tried})"
    )


def check_source(data_dir: str | None) -> None:
    """Before a run folder is made: a data folder named by data.dir (or $PTB_DIR) exists and holds the three
    files. (Their contents are checked when the run prepares them; without a folder named, the run finds
    or downloads PTB.)"""
    explicit = data_dir or os.environ.get("PTB_DIR")
    if not explicit:
        return
    folder = Path(explicit).expanduser()
    if not folder.is_dir():
        raise DataError(_not_a_folder(folder, "data.dir" if data_dir else "PTB_DIR"))
    for split in SPLITS:
        if not (folder / FILES[split]).is_file():
            raise DataError(
                f"{folder / FILES[split]} is missing (a PTB folder needs {', '.join(FILES.values())})"
            )


def locate(
    data_dir: str | None, root: Path, download_enabled: bool, sources, hub_url: str, raw_url: str, sha256
) -> tuple[Path, dict[str, str]]:
    """Resolve the folder holding the text and check it. Returns (folder, {split: sha256})."""
    explicit = data_dir or os.environ.get("PTB_DIR")
    if explicit:
        folder = Path(explicit).expanduser()
        if not folder.is_dir():
            raise DataError(_not_a_folder(folder, "data.dir" if data_dir else "PTB_DIR"))
        return folder, check_files(folder, sha256)
    folder = root / "ptb"
    if folder.is_dir():
        return folder, check_files(folder, sha256)
    folder = download(root, list(sources) if download_enabled else [], hub_url, raw_url, sha256)
    return folder, check_files(folder, sha256)


# ----------------------------------------------------------------------------------------------------------
# Tokenising and caching


@dataclass
class Vocab:
    words: list[str]

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @property
    def eos(self) -> int:
        return self.index[EOS]

    @property
    def unk(self) -> int | None:
        return self.index.get(UNK)

    def encode(self, words: list[str]) -> list[int]:
        unk = self.unk
        if unk is None:
            missing = [w for w in words if w not in self.index]
            if missing:
                raise UserError(f"word {missing[0]!r} is not in the vocabulary, which has no {UNK}")
        return [self.index.get(w, unk) for w in words]

    def decode(self, ids) -> list[str]:
        return [self.words[int(i)] for i in ids]


@dataclass
class Split:
    """One split as a flat id array (an <eos> closing every sentence) and sentence boundaries."""

    ids: np.ndarray  # (N,) int64
    offsets: np.ndarray  # (S + 1,) sentence s is ids[offsets[s]:offsets[s + 1]]
    oov: int

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_sentences(self) -> int:
        return int(self.offsets.shape[0] - 1)


@dataclass
class Corpus:
    vocab: Vocab
    splits: dict[str, Split]
    source: Path
    cache: Path
    sha256: dict[str, str]
    check_s: float | None = None  # seconds spent checking the cache against its manifest (None: just built)
    digest: str = ""  # corpus_digest of the files read
    verified: bool = False  # the files' SHA-256 were checked against data.sha256

    def identity(self) -> dict:
        """What a run trained and was evaluated on, for its record (rundir.METRICS, W&B): the digest of the
        files read, whether they were verified (and are then PTB's when data.sha256 is PTB's), their
        SHA-256, the vocabulary size and the token counts."""
        from .config import PTB_SHA256

        return {
            "digest": self.digest,
            "verified": self.verified,
            "ptb": self.sha256 == {s: PTB_SHA256[FILES[s]] for s in SPLITS},  # the files are PTB's
            "source": str(self.source),
            "sha256": dict(self.sha256),
            "vocab_size": len(self.vocab),
            "tokens": {split: s.num_tokens for split, s in self.splits.items()},
        }

    def stats(self) -> dict:
        return {
            "vocab_size": len(self.vocab),
            **{
                split: {"sentences": s.num_sentences, "tokens": s.num_tokens, "oov": s.oov}
                for split, s in self.splits.items()
            },
        }


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


class CacheDamaged(Exception):
    """The cache on disk is not what its manifest says it holds (the message says how)."""


def _digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ids_digest(split: Split) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(split.ids, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(split.offsets, dtype="<i8").tobytes())
    return h.hexdigest()


def _file_sizes(folder: Path) -> dict[str, int]:
    """Every file below `folder` (its manifest excepted) → its size; paths relative, with '/'."""
    sizes = {}
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel != MANIFEST:
                sizes[rel] = path.lstat().st_size
    return sizes


def _write_manifest(folder: Path, source_sums: dict[str, str]) -> None:
    """Record what the cache in `folder` holds, read back from the files just written. Written last, through
    a temporary name: a cache without a manifest is incomplete."""
    vocab, splits = _load_cache(folder)
    manifest = {
        "format": CACHE_FORMAT,
        "source_sha256": source_sums,
        "vocab_size": len(vocab),
        "splits": {
            name: {
                "tokens": s.num_tokens,
                "sentences": s.num_sentences,
                "oov": s.oov,
                "ids_blake2b": _ids_digest(s),
            }
            for name, s in splits.items()
        },
        "files": {
            rel: [size, _digest_file(folder / rel)] for rel, size in sorted(_file_sizes(folder).items())
        },
    }
    tmp = folder / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def check_cache(cache: Path) -> tuple[Vocab, dict[str, Split]]:
    """Load the cache and check it against its manifest: the files (names, sizes, digests), then what they
    decode to (vocabulary size; per split the counts and the digest of the ids), and that every id is inside
    the vocabulary. Raises CacheDamaged naming the first difference."""
    try:
        manifest = json.loads((cache / MANIFEST).read_text())
    except FileNotFoundError:
        raise CacheDamaged(f"it has no {MANIFEST} (an interrupted or incomplete preparation)") from None
    except (OSError, ValueError) as exc:
        raise CacheDamaged(f"its {MANIFEST} is unreadable ({exc})") from None
    try:
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheDamaged(f"its {MANIFEST} is of format {manifest.get('format')!r}, not {CACHE_FORMAT}")
        expected = {rel: (int(size), str(dig)) for rel, (size, dig) in manifest["files"].items()}
        vocab_size = int(manifest["vocab_size"])
        split_info = {name: dict(manifest["splits"][name]) for name in SPLITS}
    except CacheDamaged:
        raise
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CacheDamaged(f"its {MANIFEST} is malformed") from None
    present = _file_sizes(cache)
    missing = sorted(set(expected) - set(present))
    if missing:
        more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
        raise CacheDamaged(f"{missing[0]} is missing{more}")
    extra = sorted(set(present) - set(expected))
    if extra:
        raise CacheDamaged(f"{extra[0]} is not part of it")
    for rel, (size, dig) in expected.items():
        if present[rel] != size:
            raise CacheDamaged(f"{rel} has {present[rel]:,} bytes, the manifest says {size:,}")
        if _digest_file(cache / rel) != dig:
            raise CacheDamaged(f"{rel} has changed since it was written (digest mismatch)")
    try:
        vocab, splits = _load_cache(cache)
    except Exception as exc:  # whatever `datasets` or json make of damaged files
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise CacheDamaged(f"it cannot be read ({type(exc).__name__}: {first})") from None
    if len(vocab) != vocab_size:
        raise CacheDamaged(f"vocab.json holds {len(vocab):,} words, the manifest says {vocab_size:,}")
    for name, split in splits.items():
        info = split_info[name]
        got = {"tokens": split.num_tokens, "sentences": split.num_sentences, "oov": split.oov}
        for key, value in got.items():
            if info.get(key) != value:
                raise CacheDamaged(f"the {name} split has {value:,} {key}, the manifest says {info.get(key)}")
        if _ids_digest(split) != info.get("ids_blake2b"):
            raise CacheDamaged(f"the token ids of the {name} split differ from those recorded")
        if split.num_tokens and (int(split.ids.min()) < 0 or int(split.ids.max()) >= len(vocab)):
            bad = int(split.ids.max()) if int(split.ids.max()) >= len(vocab) else int(split.ids.min())
            raise CacheDamaged(
                f"the {name} split holds token id {bad}, outside the vocabulary of {len(vocab):,} words"
            )
    return vocab, splits


def _check_cache_here(cache: Path) -> tuple[Vocab, dict[str, Split]]:
    """check_cache, where a file that vanishes while it is being checked (another process on the same damaged
    cache moved it aside) makes the cache one to rebuild, as a damaged one is: the rebuild then finds the
    other process's new copy or makes its own (the rename of the first one wins; they are identical)."""
    try:
        return check_cache(cache)
    except FileNotFoundError as exc:
        raise CacheDamaged(f"{exc.filename or cache} vanished while it was being checked") from None


def _tmp_prefix(final: Path) -> str:
    """Temporary folders are named after their writer, so one left by a killed process can be recognised."""
    return f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-"


def _remove_stale_temporaries(final: Path) -> None:
    """Temporary folders of a preparation that was killed (a dead process of this host) are garbage."""
    if not final.parent.is_dir():
        return
    lead, host = f".{final.name}.tmp-", socket.gethostname()
    for p in final.parent.glob(f"{lead}*"):
        try:
            owner, pid, _ = p.name[len(lead) :].rsplit("-", 2)
            pid = int(pid)
        except ValueError:
            continue
        if owner == host and pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            log.info("removed %s, the temporary folder of a preparation that was killed", p)


def _build_cache(source: Path, final: Path, source_sums: dict[str, str] | None = None) -> None:
    """Tokenise the three files with `datasets` into a temporary folder, then rename it to `final`."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would keep the cache from the other users of a cluster
    except OSError as exc:
        raise DataError(f"could not write {final.parent}: {write_error_reason(exc)}") from None
    try:
        _tokenise_into(source, tmp)
        faults.point("cache_write")  # tests: killed with the data written but not the manifest
        _write_manifest(tmp, dict(source_sums or {}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            # Another process built the same cache first; its copy is identical.
    except Exception as exc:
        # `datasets` wraps a full disk in its own DatasetGenerationError (the OSError is its cause) and
        # checks the room itself (an OSError without errno)
        cause = find_write_error(exc)
        if (
            cause is None
            and isinstance(exc, OSError)
            and exc.errno is None
            and "disk space" in str(exc).lower()
        ):
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if cause is not None:
            raise DataError(f"could not write the data cache {final}: {write_error_reason(cause)}") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _tokenise_into(source: Path, tmp: Path) -> None:
    from datasets import DatasetDict, load_dataset

    _quiet_datasets()
    raw = load_dataset(
        "text",
        data_files={split: str(source / FILES[split]) for split in SPLITS},
        cache_dir=str(tmp / "hf"),
    )
    counts = Counter()
    for line in raw["train"]["text"]:
        counts.update(line.split())
    counts[EOS] = raw["train"].num_rows
    words = [EOS] + sorted((w for w in counts if w != EOS), key=lambda w: (-counts[w], w))
    vocab = Vocab(words)
    index, unk = vocab.index, vocab.unk
    if unk is None:
        # A corpus without <unk> (not PTB) still needs an id for valid/test words that train lacks.
        for split in ("valid", "test"):
            if any(w not in index for line in raw[split]["text"] for w in line.split()):
                vocab = Vocab(words + [UNK])
                index, unk = vocab.index, vocab.unk
                break
    eos = vocab.eos

    def tokenise(batch):
        ids, oov = [], []
        for line in batch["text"]:
            toks = line.split()
            ids.append([index.get(w, unk) for w in toks] + [eos])
            oov.append(sum(w not in index for w in toks))
        return {"ids": ids, "oov": oov}

    tokenised = DatasetDict(
        {
            split: raw[split].map(tokenise, batched=True, batch_size=4096, remove_columns=["text"])
            for split in SPLITS
        }
    )
    tokenised.save_to_disk(str(tmp / "arrow"))
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    (tmp / "vocab.json").write_text(
        json.dumps({"format": CACHE_FORMAT, "words": vocab.words}, ensure_ascii=False)
    )


def _load_cache(cache: Path) -> tuple[Vocab, dict[str, Split]]:
    from datasets import load_from_disk

    _quiet_datasets()
    meta = json.loads((cache / "vocab.json").read_text())
    ds = load_from_disk(str(cache / "arrow"))
    splits = {}
    for split in SPLITS:
        table = ds[split].data.table
        col = table.column("ids").combine_chunks()  # ListArray: flat values + offsets, no Python loop
        ids = col.values.to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = col.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        oov = int(np.asarray(table.column("oov").to_numpy()).sum()) if table.num_rows else 0
        splits[split] = Split(ids, offsets, oov)
    return Vocab(meta["words"]), splits


def _set_aside(cache: Path) -> Path | None:
    """Move a damaged cache out of the way (kept for inspection): <cache>.damaged-<time>[-n]. None if it is
    gone already (another process moved it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = cache.with_name(f"{cache.name}.damaged-{stamp}"), 1
    while aside.exists():
        n += 1
        aside = cache.with_name(f"{cache.name}.damaged-{stamp}-{n}")
    os.rename(cache, aside)
    return aside


def prepare(
    data_dir: str | None = None,
    root: str | Path = "data",
    name: str = "ptb",
    verify_checksums: bool = True,
    sha256: dict | None = None,
    download_enabled: bool = True,
    sources=("hub", "github"),
    hub_url: str = "",
    raw_url: str = "",
) -> Corpus:
    """Locate, verify, tokenise (or load from the cache, checked against its manifest) and return the
    corpus. A cache that fails its check is moved aside and rebuilt."""
    root = Path(root)
    sums_expected = dict(sha256) if (verify_checksums and sha256) else None
    if verify_checksums and not sha256:
        raise DataError("data.verify_checksums is on but data.sha256 is empty")
    source, sums = locate(data_dir, root, download_enabled, sources, hub_url, raw_url, sums_expected)
    key = corpus_digest(sums)
    cache = root / "cache" / f"{name}-{key}"
    _remove_stale_temporaries(cache)
    loaded, check_s = None, None
    if os.path.lexists(cache):
        t0 = time.perf_counter()
        try:
            before = os.lstat(cache).st_ino
            loaded = _check_cache_here(cache)
            check_s = time.perf_counter() - t0
        except CacheDamaged as exc:
            reason = str(exc)
            try:
                # only the folder that was checked (not one another process has just put in its place)
                aside = _set_aside(cache) if os.lstat(cache).st_ino == before else None
            except FileNotFoundError:
                aside = None  # another process moved it aside already
            except OSError as err:
                raise DataError(
                    f"the data cache {cache} failed its check ({reason}) and could not be moved aside: "
                    f"{write_error_reason(err)}"
                ) from None
            where = f"moved it to {aside}" if aside else "another process moved it aside"
            log.warning(
                "the data cache %s failed its check (%s); %s; rebuilding it from %s",
                cache,
                reason,
                where,
                source,
            )
            try:
                _build_cache(source, cache, sums)
            except (DataError, OSError) as err:
                why = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
                raise DataError(
                    f"the data cache {cache} failed its check ({reason}; {where}) and cannot be rebuilt "
                    f"from {source}: {why}"
                ) from None
    else:
        log.info("tokenising %s into %s", source, cache)
        _build_cache(source, cache, sums)
    if loaded is None:
        try:
            loaded = check_cache(cache)
        except CacheDamaged as exc:
            raise DataError(
                f"the data cache {cache}, just built from {source}, fails its check: {exc}"
            ) from None
    vocab, splits = loaded
    for split_name, split in splits.items():
        if split.num_tokens == 0:
            raise DataError(f"{source / FILES[split_name]} holds no tokens")
    return Corpus(vocab, splits, source, cache, sums, check_s, digest=key, verified=sums_expected is not None)


def corpus_digest(sums: dict[str, str]) -> str:
    """The identity of a prepared corpus: a digest of its three files' SHA-256 (and of the tokenisation's
    format), 16 hex digits; also the name of its cache folder."""
    return hashlib.sha256(json.dumps([CACHE_FORMAT, [sums[s] for s in SPLITS]]).encode()).hexdigest()[:16]


def prepare_from_config(cfg) -> Corpus:
    """`prepare` with the arguments of a DataConfig."""
    return prepare(
        data_dir=cfg.dir,
        root=cfg.root,
        name=cfg.name,
        verify_checksums=cfg.verify_checksums,
        sha256=dict(cfg.sha256) if cfg.sha256 else None,
        download_enabled=cfg.download,
        sources=list(cfg.sources),
        hub_url=cfg.hub_url,
        raw_url=cfg.raw_url,
    )


# ----------------------------------------------------------------------------------------------------------
# Batching


class StreamBatches:
    """The split as one continuous stream, cut into `batch_size` columns and `bptt`-step windows.

    An <eos> is put in front of the stream as the first context, so every token of the split is a target
    exactly once. The N targets are dealt into B columns of consecutive tokens, the first N mod B columns one
    longer; the shorter columns end in one padded row, which the loss ignores (target PAD_TARGET):

        stream:   <eos> w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11          (N = 11, B = 3 → columns of 4, 4, 3)

                  inputs              targets
        row 0:    <eos> w4  w8        w1  w5  w9
        row 1:    w1    w5  w9        w2  w6  w10
        row 2:    w2    w6  w10       w3  w7  w11
        row 3:    w3    w7  ·         w4  w8  PAD
                  └── window i = rows [i*bptt, (i+1)*bptt), hidden state carried from one window to the next

    Each column is read top to bottom across windows, so the state the model carries at the end of one
    window is the right context for the next (Zaremba et al. 2014; the trainer detaches it between windows).
    """

    def __init__(self, ids: np.ndarray, batch_size: int, bptt: int, eos_id: int):
        n = int(ids.shape[0])
        if n < batch_size:
            raise DataError(f"the split has {n} tokens, fewer than the batch size {batch_size}")
        stream = np.concatenate([[eos_id], ids]).astype(np.int64)
        rows = math.ceil(n / batch_size)
        lengths = np.full(batch_size, n // batch_size, dtype=np.int64)
        lengths[: n % batch_size] += 1
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        inputs = np.full((rows, batch_size), eos_id, dtype=np.int64)
        targets = np.full((rows, batch_size), PAD_TARGET, dtype=np.int64)
        for b in range(batch_size):  # (rows, B): column b holds targets stream[starts[b]+1 : starts[b]+1+len]
            s, length = starts[b], lengths[b]
            inputs[:length, b] = stream[s : s + length]
            targets[:length, b] = stream[s + 1 : s + 1 + length]
        self.inputs, self.targets = torch.from_numpy(inputs), torch.from_numpy(targets)
        self.bptt, self.batch_size, self.rows = bptt, batch_size, rows
        self.num_tokens = n

    def __len__(self) -> int:
        return math.ceil(self.rows / self.bptt)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Window i: inputs and targets, each (T, B) with T = bptt (shorter for the last window)."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        rows = slice(i * self.bptt, (i + 1) * self.bptt)
        return self.inputs[rows], self.targets[rows]


class SentenceBatches:
    """Each sentence its own sequence: input <eos> w1 … wn, target w1 … wn <eos>; right-padded and masked.

    Training batches are drawn with a per-epoch permutation (seeded, so a resumed run sees the same order):
    sentences are shuffled, sorted by length within pools of 50 batches (little padding), cut into batches
    and the batches shuffled. Evaluation batches are sorted by length. Every sentence appears exactly once per
    epoch, and the state starts from zero for every batch.
    """

    POOL = 50

    def __init__(self, split: Split, batch_size: int, eos_id: int, shuffle: bool, seed: int = 0):
        if split.num_sentences < batch_size:
            raise DataError(
                f"the split has {split.num_sentences} sentences, fewer than the batch size {batch_size}"
            )
        self.split, self.batch_size, self.eos_id = split, batch_size, eos_id
        self.shuffle, self.seed = shuffle, seed
        self.lengths = np.diff(split.offsets)
        self.num_tokens = split.num_tokens
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        return math.ceil(self.split.num_sentences / self.batch_size)

    def order(self, epoch: int) -> list[np.ndarray]:
        if self._order_epoch == epoch:
            return self._order
        n, B = self.split.num_sentences, self.batch_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)
            pools = [perm[k : k + self.POOL * B] for k in range(0, n, self.POOL * B)]
            perm = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in pools])
            batches = [perm[k : k + B] for k in range(0, n, B)]
            batches = [batches[k] for k in rng.permutation(len(batches))]
        else:
            perm = np.argsort(self.lengths, kind="stable")
            batches = [perm[k : k + B] for k in range(0, n, B)]
        self._order_epoch, self._order = epoch, batches
        return batches

    def batch(self, sentence_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, B) inputs and targets for these sentences, T = the longest one (with its <eos>)."""
        lengths = self.lengths[sentence_ids]
        T, B = int(lengths.max()), len(sentence_ids)
        inputs = np.full((T, B), self.eos_id, dtype=np.int64)
        targets = np.full((T, B), PAD_TARGET, dtype=np.int64)
        for b, s in enumerate(sentence_ids):
            toks = self.split.ids[self.split.offsets[s] : self.split.offsets[s + 1]]  # w1 … wn <eos>
            inputs[1 : len(toks), b] = toks[:-1]  # row 0 stays <eos>: the sentence's first context
            targets[: len(toks), b] = toks
        return torch.from_numpy(inputs), torch.from_numpy(targets)

    def get(self, epoch: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(self.order(epoch)[i])


def make_batches(
    corpus: Corpus, split: str, mode: str, batch_size: int, bptt: int, shuffle: bool, seed: int = 0
):
    """Batches of one split. mode: stream | sentence. Errors name the split."""
    if batch_size <= 0:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if bptt <= 0:
        raise DataError(f"bptt must be positive, got {bptt}")
    try:
        if mode == "stream":
            return StreamBatches(corpus.splits[split].ids, batch_size, bptt, corpus.vocab.eos)
        if mode == "sentence":
            return SentenceBatches(corpus.splits[split], batch_size, corpus.vocab.eos, shuffle, seed)
    except DataError as exc:
        raise DataError(f"{split} split: {exc}") from None
    raise DataError(f"unknown batching mode {mode!r} (stream, sentence)")


# ----------------------------------------------------------------------------------------------------------
# make data


def format_stats(corpus: Corpus, seconds: float | None = None) -> str:
    lines = [f"source  {corpus.source}", f"cache   {corpus.cache}"]
    lines.append(f"{'split':<6} {'sentences':>10} {'tokens':>10} {'oov':>5}")
    for split in SPLITS:
        s = corpus.splits[split]
        lines.append(f"{split:<6} {s.num_sentences:>10,} {s.num_tokens:>10,} {s.oov:>5,}")
    lines.append(f"vocabulary {len(corpus.vocab):,} (including {EOS})")
    if seconds is not None:
        lines.append(f"prepared in {seconds:.2f} s")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    """`make data [data.dir=...]`: prepare the corpus and print the statistics of each split."""
    from .config import compose

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = compose(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    corpus = prepare_from_config(cfg.data)
    print(format_stats(corpus, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
