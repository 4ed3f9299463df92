"""Sweeps through Hydra's submitit_slurm launcher on a real one-node SLURM cluster (scripts/slurm_local.sh).

The fixture starts slurmctld, slurmd (and munged, if none runs) with their state in a temporary folder, and
stops exactly those daemons by pid at the end. Needs root to install and run them; under CI their absence
is a failure, elsewhere a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dglstm_lm.train import train

from .conftest import CI, PY, ROOT
from .test_train import read_history, smoke_cfg, strip_time

pytestmark = pytest.mark.slow
SCRIPT = ROOT / "scripts" / "slurm_local.sh"


@pytest.fixture(scope="module")
def slurm():
    have = shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()
    if not have and os.geteuid() != 0:
        msg = "SLURM is not installed and installing it needs root"
        if CI:
            pytest.fail(msg)
        pytest.skip(msg)
    # The daemons run as users munge and slurm: their state folder cannot live in pytest's private (0700) tmp.
    state = Path(tempfile.mkdtemp(prefix="dglstm-slurm-test-", dir="/tmp"))
    state.chmod(0o755)
    env = dict(os.environ, SLURM_LOCAL_DIR=str(state))
    start = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stdout + start.stderr
    job_env = {
        "SLURM_LOCAL_DIR": str(state),
        "SLURM_CONF": str(state / "etc" / "slurm.conf"),
        "PATH": f"{ROOT / 'scripts' / 'slurm'}:{os.environ['PATH']}",
    }
    pids_before = {
        p: (state / "run" / f"{p}.pid").read_text().strip()
        for p in ("slurmctld", "slurmd")
        if (state / "run" / f"{p}.pid").exists()
    }
    try:
        yield job_env
    finally:
        stop = subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, text=True, timeout=300)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        for name, pid in pids_before.items():  # the daemons this fixture started are gone
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().split()[2] in ("Z", "X"), (
                f"{name} ({pid}) still running"
            )
        shutil.rmtree(state, ignore_errors=True)


def _env(slurm):
    return dict(os.environ, CI="true", **slurm)


def _sweep_args(tmp_path, ptb_dir, ptb_root, sweep_dir, *overrides):
    return [
        PY,
        "-m",
        "dglstm_lm.train",
        "--multirun",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=15",
        "experiment=smoke",
        "logger=none",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]


def test_smoke_sweep_of_every_variant_on_slurm(slurm, tmp_path, ptb_dir, ptb_root):
    sweep_dir = tmp_path / "sweep"
    args = _sweep_args(
        tmp_path,
        ptb_dir,
        ptb_root,
        sweep_dir,
        "model=rnn,lstm,stacked_lstm,dglstm",
        "trainer.limit_train_batches=6",
        "trainer.limit_eval_batches=2",
    )
    r = subprocess.run(args, cwd=ROOT, env=_env(slurm), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for model in ("rnn", "lstm", "stacked_lstm", "dglstm"):
        m = json.loads((sweep_dir / f"model={model}" / "metrics.json").read_text())
        assert m["status"] == "completed" and m["model"] == model and m["test/ppl"] > 1
        assert m["threads"] == 1  # SLURM_CPUS_PER_TASK, not every core of the node
    logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert len(logs) >= 4


def _job_id(sweep_dir: Path) -> str:
    ids = [p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name[0].isdigit()]
    assert len(ids) == 1, ids
    return ids[0]


def _wait(predicate, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


PREEMPT = [
    "model=dglstm",
    "model.dropout=0.2",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=60",
    "trainer.limit_eval_batches=3",
    "trainer.checkpoint_every_steps=15",
]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ptb_dir, ptb_root):
    """The same run without preemption, one thread like the SLURM job (1 CPU)."""
    tmp = tmp_path_factory.mktemp("ref")
    threads = torch.get_num_threads()
    try:
        cfg = smoke_cfg(
            tmp,
            ptb_dir,
            ptb_root,
            *PREEMPT,
            "trainer.threads=1",
            "trainer.limit_train_batches=60",
            "trainer.limit_eval_batches=3",
        )
        metrics = train(cfg, tmp / "run")
    finally:
        torch.set_num_threads(threads)
    return metrics, read_history(tmp / "run")


@pytest.mark.parametrize("how", ["scontrol requeue", "SIGUSR2 (pre-timeout)"])
def test_preempted_job_resumes_without_losing_or_repeating_epochs(
    how, slurm, tmp_path, ptb_dir, ptb_root, uninterrupted
):
    sweep_dir = tmp_path / "sweep"
    env = _env(slurm)
    # SLURM carries out a requeue by sending SIGTERM to every process of the job, the `scontrol requeue`
    # that submitit's SIGUSR2 handler runs included; now and then it arrives before scontrol exits (seen in
    # CI). Inside the job this scontrol waits for it, so the SIGUSR2 case meets that race every time.
    real = shutil.which("scontrol", path=env["PATH"])
    wrapper = tmp_path / "bin" / "scontrol"
    wrapper.parent.mkdir()
    wrapper.write_text(
        f'#!/bin/bash\n"{real}" "$@" || exit $?\n'
        'if [ -n "$SLURM_JOB_ID" ] && [ "$1" = requeue ]; then sleep 60; fi\n'
    )
    wrapper.chmod(0o755)
    env["PATH"] = f"{wrapper.parent}:{env['PATH']}"
    args = _sweep_args(tmp_path, ptb_dir, ptb_root, sweep_dir, *PREEMPT)
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # the sweep has one job; its directory is whichever one holds a history
        _wait(lambda: list(sweep_dir.glob("*/history.jsonl")), 300, "the job to start")
        job_dir = next(sweep_dir.glob("*/history.jsonl")).parent
        # preempt in the middle of epoch 2, after epoch 1's checkpoint
        _wait(lambda: len(read_history(job_dir)) == 1, 300, "epoch 1")
        time.sleep(0.5)
        job = _job_id(sweep_dir)
        if how == "scontrol requeue":
            subprocess.run(["scontrol", "requeue", job], env=env, check=True)
        else:
            subprocess.run(["scancel", f"--signal={signal.SIGUSR2.name[3:]}", job], env=env, check=True)
        _wait(
            lambda: "resumed from" in (job_dir / "train.log").read_text(), 300, "the requeued job to resume"
        )
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    log = (job_dir / "train.log").read_text()
    if how == "scontrol requeue":
        assert "stopped by SIGTERM" in log
    else:
        assert "stopped by SIGUSR2" in log
        assert "scontrol requeue was ended by the SIGTERM of the requeue it asked for" in log
    history = read_history(job_dir)
    assert [r["epoch"] for r in history] == [1, 2, 3]  # none lost, none repeated
    assert not (job_dir / "run.lock").exists()  # held by each incarnation of the job in turn, then released
    metrics = json.loads((job_dir / "metrics.json").read_text())
    ref_metrics, ref_history = uninterrupted
    assert strip_time(metrics) == strip_time(ref_metrics)
    assert [strip_time(r) for r in history] == [strip_time(r) for r in ref_history]
