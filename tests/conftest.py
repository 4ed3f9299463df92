"""Shared fixtures: the real PTB (via PTB_DIR), tiny corpora written by the tests, isolated output folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")

# W&B and the hub must never reach for the network from the tests.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def _ptb_dir() -> Path | None:
    candidates = [os.environ.get("PTB_DIR"), ROOT.parent / "shared" / "data" / "ptb", ROOT / "data" / "ptb"]
    for c in candidates:
        if c and (Path(c) / "ptb.train.txt").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    """The real PTB. Under CI its absence is a failure, not a skip."""
    d = _ptb_dir()
    if d is None:
        msg = "PTB not found: set PTB_DIR to the folder with ptb.{train,valid,test}.txt"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def ptb_root(tmp_path_factory, ptb_dir) -> Path:
    """A data root (cache folder) shared by the tests of one session, prepared once."""
    root = tmp_path_factory.mktemp("data")
    from dglstm_lm.data import prepare

    prepare(data_dir=str(ptb_dir), root=root, sha256=_sums(), verify_checksums=True)
    return root


def _sums():
    from dglstm_lm.config import PTB_SHA256

    return PTB_SHA256


@pytest.fixture(scope="session")
def ptb_corpus(ptb_dir, ptb_root):
    from dglstm_lm.data import prepare

    return prepare(data_dir=str(ptb_dir), root=ptb_root, sha256=_sums())


TINY_TRAIN = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "a cat and a dog",
    "<unk> sat on a mat",
    "the mat is on the log",
    "a dog is a dog",
    "the cat is on the mat",
    "on the log a cat sat",
]
TINY_VALID = ["the cat sat on the log", "a bird sat on the mat", "the dog is on the mat"]
TINY_TEST = ["a dog sat on the cat", "the log is a mat", "a fish and a cat"]


def write_corpus(folder: Path, train=TINY_TRAIN, valid=TINY_VALID, test=TINY_TEST) -> Path:
    """Mikolov's format: ' w1 … wn \\n' per sentence."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (("ptb.train.txt", train), ("ptb.valid.txt", valid), ("ptb.test.txt", test)):
        (folder / name).write_text("".join(f" {line} \n" for line in lines), encoding="utf-8")
    return folder


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "tiny")


def run_cli(args: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: float = 600, **kw):
    """Run a command line the way a user would; returns the CompletedProcess (text mode)."""
    full_env = dict(os.environ)
    # a `make test ARGS=...` around pytest must not leak its variables into the tests' own make calls
    for var in ("PYTEST_CURRENT_TEST", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "ARGS"):
        full_env.pop(var, None)
    full_env.setdefault("CI", "true")  # no progress bars
    if env:
        full_env.update(env)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout, **kw)


def train_overrides(out: Path, data_root: Path, ptb_dir: Path | None = None, **extra) -> list[str]:
    """Overrides that keep a test's runs in its own folders."""
    ov = [f"paths.output_dir={out}", f"paths.data_dir={data_root}", "trainer.progress=off"]
    if ptb_dir is not None:
        ov.append(f"data.dir={ptb_dir}")
    ov += [f"{k}={v}" for k, v in extra.items()]
    return ov


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


ROW_VARIANTS = [("default", "baseline"), ("avx2", "AVX2"), ("avx512", "AVX-512")]  # ATEN_CPU_CAPABILITY, rows


def run_row_variant(capability: str, rows: str, code: str) -> list:
    """Run `code` in a fresh process with ATEN_CPU_CAPABILITY=capability, which picks the fused kernel's row
    variant (AVX-512, AVX2, baseline), and return the JSON list its last line prints, whose first two items
    must be the kernel's row_isa() and torch's capability. Skips where this CPU cannot run the variant: torch
    2.13 takes ATEN_CPU_CAPABILITY at its word, and its own AVX-512 kernels die with SIGILL on an AVX2 CPU."""
    import json

    import pytest

    with open("/proc/cpuinfo") as f:
        flags = next((set(ln.split(":", 1)[1].split()) for ln in f if ln.startswith("flags")), set())
    needs = {"avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}, "avx2": {"avx2", "fma"}}.get(
        capability
    )
    if needs and not needs <= flags:
        pytest.skip(f"this CPU cannot run {rows} (no {' '.join(sorted(needs - flags))})")
    res = run_cli([PY, "-c", code], env={"ATEN_CPU_CAPABILITY": capability})
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    isa, cap = out[0], out[1]
    if cap != capability.upper():  # asked for more than the CPU has: torch falls back to what it has
        assert capability != "default" and isa != rows
        pytest.skip(f"this CPU cannot run {rows} rows")
    assert isa == rows  # the kernel follows torch's capability
    return out
