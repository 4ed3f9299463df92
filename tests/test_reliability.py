"""Faults and bad input lose nothing and explain themselves."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dglstm_lm import checkpoint as ckpt
from dglstm_lm.config import compose
from dglstm_lm.errors import CheckpointError
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
    try:
        while proc.poll() is None and not (tmp_path / "out").exists():
            time.sleep(0.05)
        while proc.poll() is None:
            if (run_dir / "checkpoints" / "last.pt").exists():
                load_model(run_dir / "checkpoints" / "last.pt")  # verified load of a file being replaced
                evals += 1
            build_report(tmp_path / "out", tmp_path / "report", wandb_mode="disabled")
            reads += 1
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert reads >= 2 and evals >= 1


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
]


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


def test_bad_input_table_is_large_enough():
    assert len(BAD_INPUT) >= 20


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
    for p in run_dir.rglob("*.pt"):
        state = ckpt.load(p)
        assert secret not in json.dumps(state["config"])
