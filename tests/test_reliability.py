"""Faults and bad input lose nothing and explain themselves."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dglstm_lm import checkpoint as ckpt
from dglstm_lm import rundir
from dglstm_lm.config import compose
from dglstm_lm.errors import CheckpointError, UserError
from dglstm_lm.train import train

from .conftest import CI, PY, ROOT, run_cli
from .test_train import read_history, smoke_cfg, strip_time

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _needs_root():
    if not IS_ROOT:
        if CI:
            pytest.fail("this test mounts a small tmpfs and needs root")
        pytest.skip("needs root (mounts a small tmpfs)")


# ------------------------------------------------------------------------------------------ SIGKILL anywhere
KILL_RUN = [
    "experiment=smoke",
    "model=dglstm",
    "model.dropout=0.2",
    "logger=none",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=12",
    "trainer.limit_eval_batches=4",
    "trainer.checkpoint_every_steps=5",
]


@pytest.mark.slow
def test_sigkill_at_five_random_points_then_resume_equals_uninterrupted(tmp_path, ptb_dir, ptb_root):
    common = [
        *KILL_RUN,
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
    ]
    ref = run_cli([PY, "-m", "dglstm_lm.train", *common, f"hydra.run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = json.loads((tmp_path / "ref" / "metrics.json").read_text())

    rng = random.Random(int(os.environ.get("KILL_TEST_SEED", "1234")))
    epochs, per_epoch, every = 3, 12, 5  # as in KILL_RUN
    run_dir = tmp_path / "killed"

    def random_fault(kind: str) -> str:
        """A random pass of `kind`, chosen within the work left after the current checkpoint (the count
        restarts in every resumed process)."""
        last = run_dir / "checkpoints" / "last.pt"
        step = ckpt.load(last)["step"] if last.exists() else 0
        epoch = ckpt.load(last)["epoch"] if last.exists() else 0
        left_steps, left_epochs = epochs * per_epoch - step, epochs - epoch
        if kind == "epoch_end" and left_epochs >= 2:
            return f"epoch_end:{rng.randint(1, left_epochs - 1)}"
        if kind == "checkpoint_write" and left_steps >= every:
            return f"checkpoint_write:{rng.randint(1, max(1, left_steps // every))}"
        if kind == "best_link" and left_epochs >= 1:  # between best.pt's link and last.pt's replacement
            return f"checkpoint_write_linked:{rng.randint(1, left_epochs)}"
        if kind == "eval_batch" and left_epochs >= 1:
            return f"eval_batch:{rng.randint(1, 4 * left_epochs)}"  # 4 validation batches per epoch
        return f"step:{rng.randint(1, max(1, left_steps - 1))}"

    kinds = ["epoch_end", "step", "checkpoint_write", "eval_batch", "best_link"]
    history_of_kills = []
    for kind in kinds:
        fault = random_fault(kind)
        r = run_cli(
            [PY, "-m", "dglstm_lm.train", *common, f"hydra.run.dir={run_dir}"], env={"DGLSTM_FAULT": fault}
        )
        history_of_kills.append((fault, r.returncode))
        assert r.returncode == -9, (fault, r.returncode, r.stderr[-2000:])
        # no checkpoint is ever unreadable, whatever the moment of the kill
        for name in ("last.pt", "last-previous.pt", "best.pt"):
            path = run_dir / "checkpoints" / name
            if path.exists():
                ckpt.load(path)
    assert {f.split(":")[0] for f, _ in history_of_kills} == {
        "step",
        "checkpoint_write",
        "checkpoint_write_linked",
        "eval_batch",
        "epoch_end",
    }
    final = run_cli([PY, "-m", "dglstm_lm.train", *common, f"hydra.run.dir={run_dir}"])
    assert final.returncode == 0, final.stderr[-2000:]
    got = json.loads((run_dir / "metrics.json").read_text())
    assert strip_time(got) == strip_time(expected), history_of_kills
    assert [strip_time(r) for r in read_history(run_dir)] == [
        strip_time(r) for r in read_history(tmp_path / "ref")
    ]
    assert not list(
        (run_dir / "checkpoints").glob(".*.tmp-*")
    )  # a killed writer's temporary file is cleaned up


# ------------------------------------------------------------------------------------------ corrupt checkpoints
def _first_epoch_then(tmp_path, ptb_dir, ptb_root, *ov):
    run_dir = tmp_path / "run"
    train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.checkpoint_every_steps=4", *ov), run_dir)
    return run_dir


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, ptb_dir, ptb_root, damage, caplog):
    full = train(
        smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.checkpoint_every_steps=4"), tmp_path / "full"
    )
    run_dir = tmp_path / "run"
    cfg = smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.checkpoint_every_steps=4", "trainer.max_epochs=1")
    train(cfg, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # zero a block inside the weights
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="unreadable|failed its checksum"):
        ckpt.load(last)
    m = json.loads((run_dir / "metrics.json").read_text())
    m["status"] = "running"  # pretend the process died here
    (run_dir / "metrics.json").write_text(json.dumps(m))
    import logging

    with caplog.at_level(logging.WARNING):
        resumed = train(
            smoke_cfg(
                tmp_path, ptb_dir, ptb_root, "trainer.checkpoint_every_steps=4", f"trainer.resume={run_dir}"
            ),
            run_dir,
        )
    assert "falling back to the previous checkpoint" in caplog.text
    assert strip_time(resumed) == strip_time(full)


def test_corrupt_checkpoint_without_previous_is_a_clear_error(tmp_path):
    bad = tmp_path / "checkpoints" / "last.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match=r"last.pt is unreadable \(truncated or corrupt"):
        ckpt.load_for_resume(tmp_path)


def _states(tmp_path: Path, first: dict, second: dict) -> Path:
    """checkpoints/ holding last-previous.pt = first, last.pt = second, best.pt linked to second."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for state in (first, second):
        ckpt.save(
            {"model": {"w": torch.arange(3.0)}, "step": 0, **state}, ck / "last.pt", also=[ck / "best.pt"]
        )
    with (ck / "last.pt").open("r+b") as f:  # damaged in place: best.pt, the same file, with it
        f.truncate(100)
    return ck


def test_fallback_relinks_best_when_the_previous_checkpoint_is_the_best_epoch(tmp_path):
    ck = _states(
        tmp_path,
        {"epoch": 1, "batch": 0, "best_epoch": 0, "best_val": 9.0},  # written at the end of the best epoch
        {"epoch": 2, "batch": 0, "best_epoch": 1, "best_val": 8.0},
    )
    path, state = ckpt.load_for_resume(tmp_path)
    assert path.name == "last-previous.pt" and state["epoch"] == 1
    assert ckpt.load(ck / "best.pt")["epoch"] == 1 and state["best_val"] == 9.0


def test_fallback_forgets_a_best_that_is_lost(tmp_path, caplog):
    _states(
        tmp_path,
        {"epoch": 1, "batch": 4, "best_epoch": 0, "best_val": 9.0},  # mid-epoch: not the best weights
        {"epoch": 2, "batch": 0, "best_epoch": 1, "best_val": 8.0},
    )
    _, state = ckpt.load_for_resume(tmp_path)
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert state["best_val"] == float("inf") and state["best_epoch"] == -1
    assert "the best epoch's weights are lost" in caplog.text
    # killed before the next save: the next resume falls back to the same checkpoint and forgets again
    _, again = ckpt.load_for_resume(tmp_path)
    assert again["best_val"] == float("inf") and again["best_epoch"] == -1
    assert "best.pt is missing" in caplog.text


@pytest.mark.slow
def test_resume_refuses_changes_that_would_silently_alter_the_run(tmp_path, ptb_dir, ptb_root):
    """Mid-epoch, the data position and the hidden state fit only the same data layout; the optimizer's
    state only the same optimizer; the weights only the same vocabulary. After the refusals the run resumes
    untouched and ends exactly like an uninterrupted one."""

    def cfg(*extra, data_dir=ptb_dir):
        paths = [f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={ptb_root}", f"data.dir={data_dir}"]
        return [*KILL_RUN, *paths, *extra]

    run_dir = tmp_path / "mid"
    r = run_cli(
        [PY, "-m", "dglstm_lm.train", *cfg(), f"hydra.run.dir={run_dir}"], env={"DGLSTM_FAULT": "step:7"}
    )
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL at the 7th step; the checkpoint of step 5 remains
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch"]) == (0, 5)

    def resume(*extra, **kw):
        return train(compose(cfg(f"trainer.resume={run_dir}", *extra, **kw)), run_dir)

    refusals = [
        (
            "trainer.batch_size=10",
            r"in the middle of epoch 1 with another data layout \(trainer.batch_size: 20 → 10\)",
        ),
        ("trainer.bptt=10", r"another data layout \(trainer.bptt: 20 → 10\)"),
        (
            "trainer.optimizer=adam",
            r"continue from their saved state, which would ignore the new values \(trainer.optimizer: sgd → adam\)",
        ),
        ("trainer.lr=2", r"would ignore the new values \(trainer.lr: 1.0 → 2.0\)"),
    ]
    for override, message in refusals:
        with pytest.raises(CheckpointError, match=message):
            resume(override)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for split in ("train", "valid", "test"):
        (tiny / f"ptb.{split}.txt").write_text(" the cat sat on the mat \n" * 50)
    with pytest.raises(CheckpointError, match=r"the corpus at .*tiny has another vocabulary"):
        resume("data.verify_checksums=false", data_dir=tiny)

    assert ckpt.load(run_dir / "checkpoints" / "last.pt")["step"] == 5  # the refusals wrote nothing
    resumed = resume()
    full = train(compose(cfg()), tmp_path / "full")
    assert strip_time(resumed) == strip_time(full)


# ------------------------------------------------------------------------------------------ full / read-only disk
def _mount_tmpfs(path: Path, size: str, ro=False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], check=True)


def _umount(path: Path):
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, ptb_dir, ptb_root):
    """Checkpoints on a tmpfs with room for one checkpoint only: the second save hits ENOSPC."""
    _needs_root()
    run_dir = tmp_path / "run"
    ck = run_dir / "checkpoints"
    # the smoke dglstm checkpoint is ~19 MB: the first fits, a second temporary copy does not
    _mount_tmpfs(ck, "30m")
    try:
        with pytest.raises(
            CheckpointError,
            match=r"could not write checkpoint .*last.pt: No space left on device \(disk full\); the previous checkpoint is intact",
        ):
            train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.checkpoint_every_steps=3"), run_dir)
        state = ckpt.load(ck / "last.pt")
        assert state["step"] == 3
        assert not list(ck.glob(".*.tmp-*"))
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["status"] == "failed" and "No space left on device" in m["error"]
    finally:
        _umount(ck)


def test_unwritable_checkpoint_folder_stops_with_a_clear_message(tmp_path, ptb_dir, ptb_root):
    _needs_root()
    run_dir = tmp_path / "run"
    train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.max_epochs=1"), run_dir)
    ck = run_dir / "checkpoints"
    before = (ck / "last.pt").read_bytes()
    subprocess.run(["mount", "--bind", str(ck), str(ck)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ck)], check=True)
    try:
        with pytest.raises(
            CheckpointError,
            match="could not write checkpoint .*Read-only file system; the previous checkpoint is intact",
        ):
            train(
                smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.max_epochs=2", f"trainer.resume={run_dir}"),
                run_dir,
            )
    finally:
        _umount(ck)
    assert (ck / "last.pt").read_bytes() == before


# ------------------------------------------------------------------------------------------ concurrency
@pytest.mark.slow
def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path, ptb_dir, ptb_root):
    """Both processes resolve the same run directory name (as two runs started in the same second do, the name
    being <date>/<time>_<model>): the second gets <name>-2, and both complete."""
    same_second = tmp_path / "runs" / "2026-01-01" / "12-00-00_lstm"
    args = [
        PY,
        "-m",
        "dglstm_lm.train",
        "experiment=smoke",
        "model=lstm",
        "logger=none",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_eval_batches=2",
        f"paths.output_dir={tmp_path}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
        f"hydra.run.dir=${{unique_dir:{same_second}}}",
    ]
    env = dict(os.environ, CI="true")
    procs = [
        subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    dirs = sorted(d.name for d in same_second.parent.iterdir())
    assert dirs == ["12-00-00_lstm", "12-00-00_lstm-2"]
    for d in dirs:
        m = json.loads((same_second.parent / d / "metrics.json").read_text())
        assert m["status"] == "completed" and m["run_dir"].endswith(d)


@pytest.mark.slow
def test_report_and_eval_while_a_run_is_writing(tmp_path, ptb_dir, ptb_root):
    """Readers never crash on, or read half of, files a live run is replacing."""
    run_dir = tmp_path / "out" / "runs" / "live"
    args = [
        PY,
        "-m",
        "dglstm_lm.train",
        "experiment=smoke",
        "model=dglstm",
        "logger=none",
        "trainer.max_epochs=4",
        "trainer.limit_train_batches=25",
        "trainer.checkpoint_every_steps=2",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, env=dict(os.environ, CI="true"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    from dglstm_lm.evaluate import load_model
    from dglstm_lm.report import build_report

    reads = evals = 0
    seen_metrics, seen_steps = [], []
    try:
        while proc.poll() is None and not (tmp_path / "out").exists():
            time.sleep(0.05)
        while proc.poll() is None:
            if (run_dir / "checkpoints" / "last.pt").exists():
                # a verified load of a file being replaced: a whole checkpoint of some step, never a part
                model, _, state = load_model(run_dir / "checkpoints" / "last.pt")
                assert set(model.state_dict()) and state["step"] > 0
                seen_steps.append(state["step"])
                evals += 1
            if (run_dir / "metrics.json").exists():
                seen_metrics.append(json.loads((run_dir / "metrics.json").read_text()))  # a complete file
            if (run_dir / "history.jsonl").exists():
                epochs = [
                    json.loads(line)["epoch"] for line in (run_dir / "history.jsonl").read_text().splitlines()
                ]
                assert epochs == list(range(1, len(epochs) + 1))  # whole lines, in order, none half-written
            build_report(tmp_path / "out", tmp_path / "report", wandb_mode="disabled")
            reads += 1
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert reads >= 2 and evals >= 1
    final = json.loads((run_dir / "metrics.json").read_text())
    assert all(m["status"] in ("running", "completed") and m["max_epochs"] == 4 for m in seen_metrics)
    assert (
        seen_steps == sorted(seen_steps) and seen_steps[-1] <= final["step"]
    )  # the checkpoints moved forward


# ------------------------------------------------------------------------------------------ bad input, table-driven
def _tiny_run(tmp_path, ptb_dir, ptb_root) -> Path:
    run_dir = tmp_path / "good"
    train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "trainer.max_epochs=1", "model=lstm"), run_dir)
    return run_dir


def _bad_data(tmp_path: Path, name: str, content: bytes | None) -> Path:
    d = tmp_path / f"data-{abs(hash((name, content)))}"
    shutil.copytree(Path(os.environ.get("PTB_DIR", ROOT.parent / "shared" / "data" / "ptb")), d)
    if content is None:
        (d / name).unlink()
    else:
        (d / name).write_bytes(content)
    return d


BAD_INPUT = [
    # (id, command builder (tmp, ptb_dir, ptb_root, good_run) -> argv, expected message fragment)
    (
        "unknown group option",
        lambda t, p, r, g: ["train", "model=transformer"],
        "unknown option model=transformer",
    ),
    ("unknown experiment", lambda t, p, r, g: ["train", "experiment=nope"], "unknown option experiment=nope"),
    ("unknown key", lambda t, p, r, g: ["train", "trainer.epochz=3"], "unknown key 'trainer.epochz'"),
    ("new top-level key", lambda t, p, r, g: ["train", "+lr=3"], "unknown key 'lr'"),
    (
        "wrong type",
        lambda t, p, r, g: ["train", "trainer.max_epochs=many"],
        "trainer.max_epochs: Value 'many'",
    ),
    (
        "wrong type (bool)",
        lambda t, p, r, g: ["train", "model.tie_weights=maybe"],
        "model.tie_weights: Value 'maybe'",
    ),
    ("negative lr", lambda t, p, r, g: ["train", "trainer.lr=-1"], "trainer.lr: must be positive"),
    (
        "zero epochs",
        lambda t, p, r, g: ["train", "trainer.max_epochs=0"],
        "trainer.max_epochs: must be positive",
    ),
    (
        "zero hidden size",
        lambda t, p, r, g: ["train", "model.hidden_dim=0"],
        "model.hidden_dim: must be positive",
    ),
    (
        "layer list mismatch",
        lambda t, p, r, g: ["train", "model.hidden_dims=[10]"],
        "model.hidden_dims: has 1 sizes but model.num_layers=2",
    ),
    (
        "tied weights, sizes differ",
        lambda t, p, r, g: ["train", "model.tie_weights=true", "model.emb_dim=100"],
        "model.tie_weights: needs the last hidden size",
    ),
    (
        "conflicting options",
        lambda t, p, r, g: ["train", "trainer.optimizer=adam", "trainer.momentum=0.9"],
        "trainer.momentum: applies to optimizer=sgd only",
    ),
    (
        "resume + init_from",
        lambda t, p, r, g: ["train", f"trainer.resume={g}", f"trainer.init_from={g}"],
        "cannot be combined",
    ),
    ("unparsable override", lambda t, p, r, g: ["train", "trainer.lr=[1,"], "cannot parse override"),
    (
        "bptt larger than the data",
        lambda t, p, r, g: ["train", "trainer.bptt=1000000", f"data.dir={p}"],
        "trainer.bptt=1000000 is larger than the data",
    ),
    (
        "cuda on a CPU machine",
        lambda t, p, r, g: ["train", "trainer.device=cuda", f"data.dir={p}"],
        "CUDA is not available",
    ),
    (
        "missing data folder",
        lambda t, p, r, g: ["train", f"data.dir={t}/nowhere"],
        "nowhere (from data.dir) does not exist",
    ),
    (
        "missing split file",
        lambda t, p, r, g: ["train", f"data.dir={_bad_data(t, 'ptb.valid.txt', None)}"],
        "ptb.valid.txt is missing",
    ),
    (
        "empty data file",
        lambda t, p, r, g: ["train", f"data.dir={_bad_data(t, 'ptb.test.txt', b'')}"],
        "ptb.test.txt is empty",
    ),
    (
        "data not UTF-8",
        lambda t, p, r, g: ["train", f"data.dir={_bad_data(t, 'ptb.train.txt', bytes([0xFF, 0xFE, 0x41]))}"],
        "ptb.train.txt is not UTF-8",
    ),
    (
        "data checksum",
        lambda t, p, r, g: ["train", f"data.dir={_bad_data(t, 'ptb.valid.txt', b' a b c ' + bytes([10]))}"],
        "ptb.valid.txt has SHA-256",
    ),
    (
        "missing checkpoint (resume)",
        lambda t, p, r, g: ["train", f"trainer.resume={t}/none.pt"],
        "no checkpoint at",
    ),
    ("missing checkpoint (eval)", lambda t, p, r, g: ["eval", f"ckpt={t}/none.pt"], "does not exist"),
    (
        "corrupt checkpoint (eval)",
        lambda t, p, r, g: ["eval", f"ckpt={_corrupt(t, g)}"],
        "is unreadable (truncated or corrupt",
    ),
    (
        "checkpoint of another model",
        lambda t, p, r, g: ["train", "model=dglstm", f"trainer.resume={g}", f"data.dir={p}"],
        "the model config differs (model.name: lstm → dglstm",
    ),
    (
        "not a checkpoint (generate)",
        lambda t, p, r, g: ["generate", f"ckpt={g}/metrics.json"],
        "is unreadable",
    ),
    (
        "bad temperature",
        lambda t, p, r, g: ["generate", f"ckpt={g}", "temperature=-1"],
        "temperature must be positive",
    ),
    (
        "sweep with an unknown value",
        lambda t, p, r, g: ["sweep", "model=lstm,gru"],
        "unknown option model=gru",
    ),
    ("report of a missing dir", lambda t, p, r, g: ["report", f"dir={t}/nowhere"], "does not exist"),
    (
        "checkpoint without its vocabulary (eval)",
        lambda t, p, r, g: ["eval", f"ckpt={_without(t, g, 'vocab')}"],
        "lacks 'vocab', which this version of dglstm-lm needs",
    ),
    (
        "checkpoint without its optimizer state (resume)",
        lambda t, p, r, g: [
            "train",
            "model=lstm",
            f"trainer.resume={_without(t, g, 'optimizer')}",
            f"data.dir={p}",
        ],
        "lacks 'optimizer'",
    ),
]


def _without(tmp: Path, good: Path, key: str) -> Path:
    """A checkpoint that loads and passes its checksum, but lacks `key`."""
    state = ckpt.load(good / "checkpoints" / "last.pt")
    del state[key], state["digest"]
    path = tmp / f"without-{key}" / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True)
    ckpt.save(state, path, keep_previous=False)
    return path


def _corrupt(tmp: Path, good: Path) -> Path:
    bad = tmp / "corrupt.pt"
    data = (good / "checkpoints" / "last.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, ptb_dir, ptb_root):
    return _tiny_run(tmp_path_factory.mktemp("good"), ptb_dir, ptb_root)


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_clear_line(case, tmp_path, ptb_dir, ptb_root, good_run):
    _, build, expected = case
    argv = build(tmp_path, ptb_dir, ptb_root, good_run)
    target, overrides = argv[0], argv[1:]
    extra = (
        [f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={ptb_root}"]
        if target in ("train", "sweep")
        else []
    )
    r = run_cli(["make", "-s", target, *overrides, *extra], env={"PTB_DIR": str(ptb_dir)})
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1, r.stderr[-3000:]
    assert expected in ours[0], ours[0]
    assert "Traceback" not in r.stderr
    # nothing half-written: no temporary files, and no run left claiming to be running
    for p in (tmp_path / "out").rglob("*") if (tmp_path / "out").exists() else []:
        assert ".tmp-" not in p.name, p
        if p.name == "metrics.json":
            assert json.loads(p.read_text())["status"] in ("failed",), p


# ------------------------------------------------------------------------------------------ secrets
@pytest.mark.slow
def test_wandb_api_key_never_written(tmp_path, ptb_dir, ptb_root):
    secret = "dglstmtest" + "9" * 30  # 40 characters, shaped like a W&B key
    r = run_cli(
        [
            PY,
            "-m",
            "dglstm_lm.train",
            "experiment=smoke",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            f"paths.output_dir={tmp_path}",
            f"paths.data_dir={ptb_root}",
            f"data.dir={ptb_dir}",
        ],
        env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert secret not in r.stdout + r.stderr
    hits = [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert hits == []
    (run_dir,) = list((tmp_path / "runs").glob("*/*"))
    assert (run_dir / "wandb").is_dir()  # W&B did run: the check above looked at real files
    checkpoints = list(run_dir.rglob("*.pt"))
    assert checkpoints  # the run wrote some: the loop below looks at real ones
    for p in checkpoints:
        state = ckpt.load(p)
        assert secret not in json.dumps(state["config"])


# ------------------------------------------------------------------------------------------ one run per directory
def _snapshot(folder: Path) -> dict:
    """Every file and folder below `folder` (itself included): content digest, size, mtime."""
    import hashlib

    snap = {}
    for p in sorted([folder, *folder.rglob("*")]):
        st = p.lstat()
        if p.is_file():
            snap[str(p.relative_to(folder))] = (
                st.st_size,
                st.st_mtime_ns,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
        else:
            snap[str(p.relative_to(folder)) + "/"] = st.st_mtime_ns
    return snap


def _live_process():
    """A live process of this host that is not a run: a lock naming it is held."""
    return subprocess.Popen(["sleep", "600"])


def _dead_pid() -> int:
    r = subprocess.run([PY, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(r.stdout)


def _write_lock(run_dir: Path, **info) -> Path:
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    info = {
        "pid": 1,
        "host": socket.gethostname(),
        "started_at": "2026-01-01T00:00:00+00:00",
        "token": "t",
        **info,
    }
    lock = run_dir / rundir.LOCK_NAME
    lock.write_text(json.dumps(info))
    return lock


def test_lock_is_exclusive_reentrant_and_released(tmp_path):
    run_dir = tmp_path / "run"
    assert rundir.acquire(run_dir) is None
    lock = run_dir / "run.lock"
    info = json.loads(lock.read_text())
    assert info["pid"] == os.getpid() and info["host"] and info["started_at"]
    assert rundir.acquire(run_dir) is None and rundir.holds(run_dir)  # the same process: re-entrant
    rundir.release(run_dir)
    assert not lock.exists() and not rundir.holds(run_dir)
    # a lock that is no longer ours (replaced by another run's) is left alone on release
    rundir.acquire(run_dir)
    lock.write_text(json.dumps(dict(info, token="someone else")))
    rundir.release(run_dir)
    assert lock.exists()


def test_lock_of_a_live_process_refuses_and_writes_nothing(tmp_path):
    holder = _live_process()
    try:
        run_dir = tmp_path / "run"
        _write_lock(run_dir, pid=holder.pid)
        before = _snapshot(run_dir)
        with pytest.raises(
            rundir.RunDirInUse, match=rf"{run_dir} is in use by another run \(pid {holder.pid} on "
        ):
            rundir.acquire(run_dir)
        assert _snapshot(run_dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_another_host_is_held_and_the_error_says_so(tmp_path):
    run_dir = tmp_path / "run"
    lock = _write_lock(run_dir, pid=_dead_pid(), host="elsewhere-node-7")
    with pytest.raises(rundir.RunDirInUse) as exc:
        rundir.acquire(run_dir)
    msg = str(exc.value)
    assert "pid" in msg and "on elsewhere-node-7" in msg and "another host" in msg and str(lock) in msg


@pytest.mark.parametrize(
    "case",
    [
        "dead pid",
        "pid reused by a later process",
        "empty (killed as it started)",
        "earlier run of a requeued SLURM job",
        "damaged: {}",
        "damaged: pid 0",
        "damaged: a string pid",
    ],
)
def test_stale_lock_is_taken_over_with_a_log_line(case, tmp_path, caplog, monkeypatch):
    run_dir = tmp_path / "run"
    holder = None
    if case.startswith("damaged"):  # no process can hold these: taken over, not refused forever
        run_dir.mkdir()
        content = {"damaged: {}": {}, "damaged: pid 0": {"pid": 0}, "damaged: a string pid": {"pid": "12"}}[
            case
        ]
        (run_dir / "run.lock").write_text(json.dumps(content))
    elif case == "dead pid":
        _write_lock(run_dir, pid=_dead_pid())
    elif case == "pid reused by a later process":
        holder = _live_process()
        _write_lock(run_dir, pid=holder.pid, pid_start="1")  # the pid's process started at another time
    elif case == "empty (killed as it started)":
        run_dir.mkdir()
        (run_dir / "run.lock").write_bytes(b"")
        os.utime(run_dir / "run.lock", (time.time() - 60, time.time() - 60))
    else:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        _write_lock(run_dir, pid=_dead_pid(), host="node-a", slurm_job_id="4242", slurm_restart_count="0")
    try:
        with caplog.at_level("WARNING", logger="dglstm_lm.rundir"):
            note = rundir.acquire(run_dir)
        assert note and note.startswith(f"took over the lock of {run_dir}:") and note in caplog.text
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
        assert [p.name for p in run_dir.iterdir()] == ["run.lock"]
    finally:
        rundir.release(run_dir)
        if holder is not None:
            holder.kill()
            holder.wait()


def test_same_slurm_job_without_a_requeue_is_not_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=123, host="node-a", slurm_job_id="4242", slurm_restart_count="0")
    with pytest.raises(rundir.RunDirInUse, match="another host"):
        rundir.acquire(run_dir)


@pytest.mark.parametrize(
    "returncode, cmd, handed_on",
    [
        (-signal.SIGTERM, ["scontrol", "requeue", "7"], True),  # the requeue's own SIGTERM: it was made
        (-signal.SIGKILL, ["scontrol", "requeue", "7"], False),
        (1, ["scontrol", "requeue", "7"], False),  # refused by slurmctld: nothing was requeued
        (-signal.SIGTERM, ["scontrol", "show", "job"], False),
    ],
)
def test_a_requeue_that_ends_its_own_scontrol_is_not_a_failure(returncode, cmd, handed_on):
    """The race tests/test_slurm.py forces on a real cluster, here as the unit it is: only an `scontrol
    requeue` ended by SIGTERM counts as requeued; every other failure of the handler is raised."""
    from dglstm_lm.app import hand_on

    seen = []

    def handler(signum, frame):
        seen.append(signum)
        raise subprocess.CalledProcessError(returncode, cmd)

    if handed_on:
        hand_on(handler, signal.SIGUSR2)
    else:
        with pytest.raises(subprocess.CalledProcessError):
            hand_on(handler, signal.SIGUSR2)
    assert seen == [signal.SIGUSR2]


def test_train_releases_its_lock_on_success_and_on_failure(tmp_path, ptb_dir, ptb_root, caplog):
    run_dir = tmp_path / "run"
    _write_lock(run_dir, pid=_dead_pid())  # left by a run that was killed
    with pytest.raises(UserError, match="larger than the data"):
        train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "model=lstm", "trainer.bptt=1000000"), run_dir)
    assert "took over the lock" in (run_dir / "train.log").read_text()
    assert not (run_dir / "run.lock").exists()
    m = train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "model=lstm", "trainer.max_epochs=1"), run_dir)
    assert m["status"] == "completed" and not (run_dir / "run.lock").exists()


def test_train_into_a_held_directory_is_refused_and_records_nothing(tmp_path, ptb_dir, ptb_root):
    holder = _live_process()
    try:
        run_dir = tmp_path / "run"
        _write_lock(run_dir, pid=holder.pid)
        (run_dir / "metrics.json").write_text(json.dumps({"status": "running", "step": 7}))
        before = _snapshot(run_dir)
        with pytest.raises(rundir.RunDirInUse, match="is in use by another run"):
            train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "model=lstm"), run_dir)
        assert _snapshot(run_dir) == before  # the live run's metrics.json is not rewritten as failed
    finally:
        holder.kill()
        holder.wait()


def _train_argv(tmp_path, ptb_dir, ptb_root, run_dir, *extra):
    return [
        PY,
        "-m",
        "dglstm_lm.train",
        "experiment=smoke",
        "model=dglstm",
        "logger=none",
        "trainer.checkpoint_every_steps=5",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _one_error_line(r) -> str:
    ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode != 0 and len(ours) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return ours[0]


@pytest.mark.slow
def test_two_runs_started_one_second_apart_into_one_folder(tmp_path, ptb_dir, ptb_root):
    """The first run holds the folder from before its first file until it ends; the second (seed=2), started
    a second later, is refused with the holder's pid, again mid-epoch (first run frozen, so that the folder
    can be compared file by file: nothing changed), and so is a resume from a second terminal. The first run
    ends with its own results; a run of another config after it is refused too, and writes nothing."""
    run_dir = tmp_path / "X"
    env = dict(os.environ, CI="true")
    first = subprocess.Popen(
        _train_argv(tmp_path, ptb_dir, ptb_root, run_dir),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        second = run_cli(_train_argv(tmp_path, ptb_dir, ptb_root, run_dir, "seed=2"))
        line = _one_error_line(second)
        assert f"{run_dir} is in use by another run (pid {first.pid} on " in line, line

        def mid_epoch():
            m = _read(run_dir / "metrics.json")
            return (
                m is not None and m["status"] == "running" and (run_dir / "checkpoints" / "last.pt").exists()
            )

        deadline = time.monotonic() + 300
        while not mid_epoch() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before it could be frozen mid-epoch"
        first.send_signal(signal.SIGSTOP)
        try:
            before = _snapshot(run_dir)
            for extra in (["seed=2"], [f"trainer.resume={run_dir}"]):
                again = run_cli(_train_argv(tmp_path, ptb_dir, ptb_root, run_dir, *extra))
                assert "is in use by another run" in _one_error_line(again)
                assert _snapshot(run_dir) == before
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["status"] == "completed" and m["seed"] == 1 and m["epochs_completed"] == 2
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 1
    assert "seed: 1" in (run_dir / ".hydra" / "config.yaml").read_text()
    for name in ("last.pt", "best.pt", "last-previous.pt"):
        assert ckpt.load(run_dir / "checkpoints" / name)["config"]["seed"] == 1, name
    assert "error" not in (run_dir / "train.log").read_text().lower()
    assert not (run_dir / "run.lock").exists()

    # finished: a run of another config into it is refused on its config, and writes nothing either
    before = _snapshot(run_dir)
    after_it = run_cli(_train_argv(tmp_path, ptb_dir, ptb_root, run_dir, "seed=2"))
    assert "already holds a run with another config (differs in seed)" in _one_error_line(after_it)
    assert _snapshot(run_dir) == before


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_sweep_job_whose_directory_is_held_is_refused_and_writes_nothing(
    launcher, tmp_path, ptb_dir, ptb_root
):
    sweep_dir = tmp_path / "sweep"
    held = sweep_dir / "model=lstm"
    holder = _live_process()
    try:
        _write_lock(held, pid=holder.pid)
        (held / "train.log").write_text("the holder's log\n")
        before = _snapshot(held)
        r = run_cli(
            [
                PY,
                "-m",
                "dglstm_lm.train",
                "--multirun",
                *([f"hydra/launcher={launcher}"] if launcher != "basic" else []),
                "experiment=smoke",
                "logger=none",
                "model=lstm,rnn",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.limit_eval_batches=2",
                f"paths.output_dir={tmp_path / 'out'}",
                f"paths.data_dir={ptb_root}",
                f"data.dir={ptb_dir}",
                f"hydra.sweep.dir={sweep_dir}",
            ]
        )
        assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"job refused: {held} is in use by another run (pid {holder.pid}" in r.stderr
        assert "in use      model=lstm" in r.stdout and "1 of 2 jobs completed (1 in use)" in r.stdout
        assert _snapshot(held) == before  # not even Hydra's .hydra/ went in
    finally:
        holder.kill()
        holder.wait()
    m = json.loads((sweep_dir / "model=rnn" / "metrics.json").read_text())
    assert m["status"] == "completed"
    assert not (sweep_dir / "model=rnn" / "run.lock").exists()  # a job's lock goes with it


# ------------------------------------------------------------------------------------------ bad state, table-driven
# Damage to what a run starts from, and outputs that cannot be written: each row ends as the issue asks:
# a rebuilt cache and a correct run, or one line of error (never a traceback, never a half-written file).
TINY_TRAIN = ["experiment=smoke", "model=lstm", "logger=none", "trainer.max_epochs=1"]
TINY_TRAIN += ["trainer.limit_train_batches=3", "trainer.limit_eval_batches=2"]


def _cache_of(root: Path) -> Path:
    """The real PTB's cache (the session's data root also holds the caches of corpora other tests made)."""
    (cache,) = [
        c
        for c in (root / "cache").iterdir()
        if c.name.startswith("ptb-")
        and "." not in c.name
        and json.loads((c / "manifest.json").read_text())["vocab_size"] == 10_000
    ]
    return cache


def _data_copy(t: Path, ptb_root: Path) -> Path:
    """A private copy of the session's data root, without caches that earlier tests had moved aside."""
    root = t / "data"
    shutil.copytree(ptb_root, root, ignore=shutil.ignore_patterns("*.damaged-*"))
    return root


def _damage_vocab(cache: Path):
    meta = json.loads((cache / "vocab.json").read_text())
    meta["words"] = meta["words"][:5000]  # a valid JSON list with fewer words
    (cache / "vocab.json").write_text(json.dumps(meta))


def _damage_bytes(cache: Path):
    (arrow,) = (cache / "arrow" / "valid").glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(8)
    arrow.write_bytes(bytes(data))


def _killed_make_data(t: Path, ptb_dir: Path) -> Path:
    root = t / "data"
    r = run_cli(
        [PY, "-m", "dglstm_lm.data", f"paths.data_dir={root}"],
        env={"PTB_DIR": str(ptb_dir), "DGLSTM_FAULT": "cache_write:1"},
    )
    assert r.returncode == -9, r.stderr[-2000:]
    assert [p.name for p in (root / "cache").iterdir() if ".tmp-" in p.name]  # the half-written folder
    return root


DAMAGED = [
    # (id, damage (cache) or None, reason in the log line, command)
    ("vocab.json cut short", _damage_vocab, "vocab.json has 5", "train"),
    ("bytes of an Arrow file changed", _damage_bytes, "has changed since it was written", "train"),
    ("arrow/ deleted", lambda c: shutil.rmtree(c / "arrow"), "is missing", "data"),
    (
        "an extra file",
        lambda c: (c / "arrow" / "stray.arrow").write_bytes(b"x"),
        "stray.arrow is not part",
        "train",
    ),
    ("no manifest", lambda c: (c / "manifest.json").unlink(), "has no manifest.json", "train"),
    (
        "half-written folder of a killed make data",
        None,
        "the temporary folder of a preparation that was killed",
        "train",
    ),
]


def _tiny_train_cli(t: Path, ptb_dir: Path, data_root: Path, run_dir: Path):
    return run_cli(
        [
            "make",
            "-s",
            "train",
            *TINY_TRAIN,
            f"paths.output_dir={t / 'out'}",
            f"paths.data_dir={data_root}",
            f"data.dir={ptb_dir}",
            f"hydra.run.dir={run_dir}",
        ]
    )


@pytest.fixture(scope="module")
def intact_run(tmp_path_factory, ptb_dir, ptb_root):
    t = tmp_path_factory.mktemp("intact")
    r = _tiny_train_cli(t, ptb_dir, _data_copy(t, ptb_root), t / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((t / "run" / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("case", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_cache_is_rebuilt_and_the_run_is_correct(case, tmp_path, ptb_dir, ptb_root, intact_run):
    _, damage, reason, command = case
    if damage is None:
        root = _killed_make_data(tmp_path, ptb_dir)
    else:
        root = _data_copy(tmp_path, ptb_root)
        damage(_cache_of(root))
    if command == "data":
        r = run_cli(["make", "-s", "data", f"paths.data_dir={root}"], env={"PTB_DIR": str(ptb_dir)})
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "929,589" in r.stdout and "vocabulary 10,000" in r.stdout
        log = r.stderr
    else:
        run_dir = tmp_path / "run"
        r = _tiny_train_cli(tmp_path, ptb_dir, root, run_dir)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert strip_time(json.loads((run_dir / "metrics.json").read_text())) == strip_time(intact_run)
        log = (run_dir / "train.log").read_text()
    lines = [line for line in log.splitlines() if reason in line]
    assert len(lines) == 1, log[-3000:]
    if damage is not None:  # moved aside (kept), and the log line says where
        (aside,) = [p for p in (root / "cache").iterdir() if ".damaged-" in p.name]
        assert "failed its check" in lines[0] and f"moved it to {aside}" in lines[0]
    assert not [p for p in (root / "cache").iterdir() if ".tmp-" in p.name]
    from dglstm_lm.data import check_cache

    check_cache(_cache_of(root))  # what is there now passes


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory):
    """A read-only folder (a read-only bind mount) and a full disk (a small tmpfs, filled up)."""
    _needs_root()
    base = tmp_path_factory.mktemp("unwritable")
    ro, full = base / "ro", base / "full"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
    _mount_tmpfs(full, "512k")
    try:
        with open(full / "filler", "wb") as f:
            while True:
                f.write(bytes(4096))
                f.flush()
    except OSError:
        pass
    try:
        yield ro, full
    finally:
        _umount(ro)
        _umount(full)


def _with_data_root(t: Path, good: Path, root: Path) -> Path:
    """The good run's checkpoint, its data cache to be found (built) under `root`."""
    state = ckpt.load(good / "checkpoints" / "best.pt")
    state["config"]["data"]["root"] = str(root)
    del state["digest"]
    path = t / "moved" / "checkpoints" / "best.pt"
    path.parent.mkdir(parents=True)
    ckpt.save(state, path, keep_previous=False)
    return path


RO, FULL = "Read-only file system", "No space left on device (disk full)"
UNWRITABLE = [
    # (id, argv builder (tmp, ptb_root, good_run, ro, full), expected fragments ({ro}, {f}: the two folders)
    (
        "train: read-only hydra.run.dir",
        lambda t, r, g, ro, f: ["train", f"hydra.run.dir={ro}/run"],
        ["{ro}/run: {RO}"],
    ),
    (
        "train: read-only paths.output_dir",
        lambda t, r, g, ro, f: ["train", f"paths.output_dir={ro}/out"],
        ["{ro}/out", RO],
    ),
    (
        "train: disk full at the start",
        lambda t, r, g, ro, f: ["train", f"paths.output_dir={f}/out"],
        ["{f}/out/runs/", FULL],
    ),
    (
        "train: hydra.run.dir on a full disk",
        lambda t, r, g, ro, f: ["train", f"hydra.run.dir={f}/run"],
        ["{f}/run: {FULL}"],
    ),
    (
        "train: data cache on a full disk",
        lambda t, r, g, ro, f: ["train", f"paths.data_dir={f}/data", f"hydra.run.dir={t}/run"],
        ["could not write the data cache {f}/data/cache/ptb-", FULL],
    ),
    (
        "sweep: read-only paths.output_dir",
        lambda t, r, g, ro, f: ["sweep", "model=lstm,rnn", f"paths.output_dir={ro}/out"],
        ["{ro}/out", RO],
    ),
    (
        "sweep: read-only hydra.sweep.dir",
        lambda t, r, g, ro, f: ["sweep", "model=lstm,rnn", f"hydra.sweep.dir={ro}/sweep"],
        ["{ro}/sweep: {RO}"],
    ),
    (
        "sweep: disk full at the start",
        lambda t, r, g, ro, f: ["sweep", "model=lstm,rnn", f"paths.output_dir={f}/out"],
        ["{f}/out/multirun/", FULL],
    ),
    (
        "report: read-only output folder",
        lambda t, r, g, ro, f: ["report", f"dir={g}", f"ARGS=--out {ro}/report --wandb-mode disabled"],
        ["{ro}/report", RO],
    ),
    (
        "report: disk full",
        lambda t, r, g, ro, f: ["report", f"dir={g}", f"ARGS=--out {f}/report --wandb-mode disabled"],
        ["{f}/report", FULL],
    ),
    (
        "bench: read-only output folder",
        lambda t, r, g, ro, f: ["bench", f"ARGS=--quick --out {ro}/bench"],
        ["{ro}/bench: {RO}"],
    ),
    (
        "bench: disk full",
        lambda t, r, g, ro, f: ["bench", f"ARGS=--quick --out {f}/bench"],
        ["{f}/bench: {FULL}"],
    ),
    (
        "eval: data cache on a read-only disk",
        lambda t, r, g, ro, f: ["eval", f"ckpt={_with_data_root(t, g, ro / 'data')}"],
        ["{ro}/data/cache: {RO}"],
    ),
    (
        "eval: data cache on a full disk",
        lambda t, r, g, ro, f: ["eval", f"ckpt={_with_data_root(t, g, f / 'data')}"],
        ["the data cache {f}/data/cache/ptb-", FULL],
    ),
    (
        "data: read-only data folder",
        lambda t, r, g, ro, f: ["data", f"paths.data_dir={ro}/data"],
        ["{ro}/data/cache: {RO}"],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", UNWRITABLE, ids=[c[0] for c in UNWRITABLE])
def test_unwritable_output_is_one_line_and_leaves_no_half_written_file(
    case, tmp_path, ptb_dir, ptb_root, good_run, unwritable
):
    _, build, expected = case
    ro, full = unwritable
    argv = build(tmp_path, ptb_root, good_run, ro, full)
    target, overrides = argv[0], argv[1:]
    if target in ("train", "sweep"):
        given = {o.split("=", 1)[0] for o in overrides}
        defaults = {
            "paths.output_dir": tmp_path / "out",
            "paths.data_dir": ptb_root,
            "data.dir": ptb_dir,
        }
        overrides = [
            *TINY_TRAIN[:1],
            "logger=none",
            *[f"{k}={v}" for k, v in defaults.items() if k not in given],
            *overrides,
        ]
    r = run_cli(["make", "-s", target, *overrides], env={"PTB_DIR": str(ptb_dir)})
    line = _one_error_line(r)
    assert line.startswith("error: could not write "), line
    for fragment in expected:
        assert fragment.format(ro=ro, f=full, RO=RO, FULL=FULL) in line, line
    # nothing half-written: the full disk holds its filler and (empty) folders only
    assert [p.name for p in full.rglob("*") if not p.is_dir()] == ["filler"]


def test_a_write_that_fails_inside_a_run_is_one_line_naming_the_file(
    tmp_path, ptb_dir, ptb_root, monkeypatch
):
    import errno

    from dglstm_lm import rundir as rundir_module

    def full(run_dir, history):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run_dir / "history.jsonl"))

    monkeypatch.setattr(rundir_module, "write_history", full)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError) as exc:
        train(smoke_cfg(tmp_path, ptb_dir, ptb_root, "model=lstm"), run_dir)
    assert (
        str(exc.value) == f"could not write {run_dir / 'history.jsonl'}: No space left on device (disk full)"
    )
    assert not (run_dir / "run.lock").exists()


@pytest.mark.slow
def test_sweep_rerun_with_another_config_changes_nothing_in_its_jobs(tmp_path, ptb_dir, ptb_root):
    """A sweep re-run into its directory with a fixed value changed: every job is refused, naming the key,
    and none of its directories is touched (not even Hydra's .hydra/ files)."""
    sweep_dir = tmp_path / "sweep"

    def sweep(*extra):
        return run_cli(
            [
                PY,
                "-m",
                "dglstm_lm.train",
                "--multirun",
                "experiment=smoke",
                "logger=none",
                "model=lstm,rnn",
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=3",
                "trainer.limit_eval_batches=2",
                f"paths.output_dir={tmp_path / 'out'}",
                f"paths.data_dir={ptb_root}",
                f"data.dir={ptb_dir}",
                f"hydra.sweep.dir={sweep_dir}",
                *extra,
            ]
        )

    first = sweep()
    assert first.returncode == 0, first.stderr[-2000:]
    before = {job: _snapshot(sweep_dir / job) for job in ("model=lstm", "model=rnn")}
    again = sweep("seed=2")
    for job in before:
        assert (
            f"job refused: {sweep_dir / job} already holds a run with another config (differs in seed)"
            in again.stderr
        )
        assert _snapshot(sweep_dir / job) == before[job], job


@pytest.mark.slow
def test_data_cache_that_runs_out_of_room_midway_is_one_line(tmp_path, ptb_dir):
    """The cache (9 MB) built on a 5 MiB tmpfs: `datasets` runs out of room inside its Arrow writer and wraps
    ENOSPC in its own DatasetGenerationError (a 35-line traceback before). One line, exit 2, no half-built
    cache or temporary left. Then a damaged cache on a disk without room to rebuild it: the promised
    `cannot be rebuilt` line."""
    _needs_root()
    small = tmp_path / "small"
    _mount_tmpfs(small, "5m")
    try:
        r = run_cli(["make", "-s", "data", f"paths.data_dir={small}"], env={"PTB_DIR": str(ptb_dir)})
        assert r.returncode == 2
        ours = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert ours == [
            f"error: could not write the data cache {small}/cache/{_cache_name()}: No space left on device (disk full)"
        ], r.stderr[-2000:]
        assert "Traceback" not in r.stderr and list((small / "cache").iterdir()) == []
    finally:
        _umount(small)
    room = tmp_path / "room"
    _mount_tmpfs(room, "24m")
    try:
        assert (
            run_cli(
                ["make", "-s", "data", f"paths.data_dir={room}"], env={"PTB_DIR": str(ptb_dir)}
            ).returncode
            == 0
        )
        (room / "cache" / _cache_name() / "vocab.json").write_text("garbled")
        with open(room / "filler", "wb") as f:  # no room left for a second copy
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError:
                pass
        r = run_cli(["make", "-s", "data", f"paths.data_dir={room}"], env={"PTB_DIR": str(ptb_dir)})
        assert r.returncode == 2
        (line,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert (
            "failed its check" in line and "cannot be rebuilt" in line and "No space left on device" in line
        ), line
        assert "Traceback" not in r.stderr
    finally:
        _umount(room)


def _cache_name() -> str:
    from dglstm_lm.config import PTB_SHA256
    from dglstm_lm.data import FILES, SPLITS, corpus_digest

    return "ptb-" + corpus_digest({s: PTB_SHA256[FILES[s]] for s in SPLITS})


def test_a_failed_first_save_does_not_promise_a_previous_checkpoint(tmp_path, monkeypatch):
    """The full-disk message said "the previous checkpoint is intact" also when there was none."""
    import errno as _errno

    def full(*a, **k):
        raise OSError(_errno.ENOSPC, os.strerror(_errno.ENOSPC))

    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    monkeypatch.setattr(ckpt, "atomic_write_bytes", full)
    with pytest.raises(CheckpointError, match=r"\(disk full\); no earlier checkpoint exists$"):
        ckpt.save({"step": 1}, path)
    monkeypatch.undo()
    ckpt.save({"step": 1}, path)
    monkeypatch.setattr(ckpt, "atomic_write_bytes", full)
    with pytest.raises(CheckpointError, match=r"\(disk full\); the previous checkpoint is intact$"):
        ckpt.save({"step": 2}, path)


def test_a_folder_without_inodes_left_is_refused_before_the_run(tmp_path):
    """Room in bytes but (almost) no inodes: the pre-check says so in one line before anything is written
    (it looked at bytes only, and the run died later with ERROR lines)."""
    _needs_root()
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m,nr_inodes=50", "tmpfs", str(fs)], check=True)
    try:
        for i in range(36):
            (fs / f"f{i}").touch()
        r = run_cli(
            [PY, "-m", "dglstm_lm.train", "experiment=smoke", f"paths.output_dir={fs}/out", "logger=none"]
        )
        assert r.returncode == 2
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"error: could not write {fs}/out/runs/") and "(no inodes left:" in line, line
    finally:
        _umount(fs)


# ------------------------------------------------------------------------------------------ one line, in process
def _refused_in_one_line(capsys, main, argv) -> str:
    """main(argv) refuses with exit status 2 and exactly one `error: ` line on stderr (no usage, no traceback)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "abc"], "error: --sizes abc: expected whole numbers ≥ 1, comma-separated"),
        (["--sizes", "200,0"], "error: --sizes 200,0: expected whole numbers ≥ 1"),
        (["--cores", "nosuch"], "error: --cores nosuch: unknown nosuch (available: nn.LSTM,"),
        (["--layers", "0"], "error: --layers 0: expected a whole number ≥ 1"),
        (["--threads", "0"], "error: --threads 0: expected a whole number ≥ 1"),
        (["--rounds", "0"], "error: --rounds 0: expected a whole number ≥ 1"),
        (["--device", "nosuch"], "error: --device=nosuch: unknown device 'nosuch' (auto, cpu, cuda, cuda:N)"),
        (["--device", "mps"], "error: --device=mps: unknown device 'mps' (auto, cpu, cuda, cuda:N)"),
        (["--rounds", "abc"], "error: make bench: argument --rounds: invalid int value: 'abc' (--help"),
        (["--ptb-dir", "/nonexistent/ptb"], "error: --ptb-dir=/nonexistent/ptb: not a folder"),
    ],
)
def test_make_bench_refuses_bad_options_before_it_measures_or_makes_anything(tmp_path, capsys, argv, message):
    from dglstm_lm.bench import main

    out = tmp_path / "bench" / "deeper"
    line = _refused_in_one_line(capsys, main, [*argv, "--out", str(out)])
    assert line.startswith(message), line
    assert not (
        tmp_path / "bench"
    ).exists()  # the output folder is made only when there is something to write


def test_make_bench_refuses_an_output_under_a_file(tmp_path, capsys):
    from dglstm_lm.bench import main

    (tmp_path / "f").write_text("x")
    line = _refused_in_one_line(capsys, main, ["--out", str(tmp_path / "f" / "bench")])
    assert line == f"error: --out {tmp_path / 'f' / 'bench'}: {tmp_path / 'f'} is a file"


def test_eval_and_generate_refuse_bad_options_in_one_line(tmp_path, capsys):
    from dglstm_lm.evaluate import main as eval_main
    from dglstm_lm.generate import main as generate_main

    fake = tmp_path / "x.pt"
    fake.write_text("not a checkpoint")
    line = _refused_in_one_line(capsys, eval_main, ["--ckpt", str(fake), "--device", "nosuch"])
    assert line == "error: --device=nosuch: unknown device 'nosuch' (auto, cpu, cuda, cuda:N)"
    line = _refused_in_one_line(capsys, eval_main, ["--ckpt", str(fake), "--split", ","])
    assert line == "error: --split ',': no split named (train, valid, test)"
    line = _refused_in_one_line(capsys, eval_main, ["--ckpt", str(fake)])
    assert line.startswith(
        f"error: checkpoint {fake} is unreadable (truncated or corrupt: not a PyTorch checkpoint ("
    )
    (tmp_path / "run").mkdir()
    line = _refused_in_one_line(capsys, eval_main, ["--ckpt", str(tmp_path / "run")])
    assert (
        line
        == f"error: {tmp_path / 'run'} is a folder without checkpoints/best.pt or checkpoints/last.pt: not a run's folder"
    )
    for t in ("inf", "nan", "0"):
        line = _refused_in_one_line(capsys, generate_main, ["--ckpt", str(fake), "--temperature", t])
        assert line.startswith("error: temperature must be positive and finite, got "), line
    line = _refused_in_one_line(capsys, generate_main, ["--ckpt", str(fake), "--length", "abc"])
    assert (
        line == "error: make generate: argument --length: invalid int value: 'abc' (--help lists the options)"
    )


def test_other_folders_that_are_files_or_empty_are_named(tmp_path, capsys, monkeypatch):
    from dglstm_lm.compare import main as compare_main
    from dglstm_lm.data import check_source
    from dglstm_lm.report import main as report_main

    (tmp_path / "f").write_text("x")
    line = _refused_in_one_line(capsys, compare_main, ["--status", "1", "--dir", str(tmp_path / "f")])
    assert line == f"error: dir={tmp_path / 'f'} is not a folder"
    (tmp_path / "empty").mkdir()
    line = _refused_in_one_line(
        capsys,
        report_main,
        ["--dir", str(tmp_path / "empty"), "--baseline", "nosuch", "--out", str(tmp_path / "r")],
    )
    assert line == f"error: unknown baseline 'nosuch': there are no runs under {tmp_path / 'empty'}"
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("PTB_DIR", str(tmp_path / "f"))
    with pytest.raises(UserError, match=r"^data folder .*/f \(from PTB_DIR\) is a file, not a folder$"):
        check_source(None)
