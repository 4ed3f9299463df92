"""Hydra multirun for real: basic and joblib launchers, failing jobs, re-running a sweep, Optuna search."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from .conftest import PY, ROOT, run_cli

pytestmark = pytest.mark.slow

TINY = [
    "experiment=smoke",
    "trainer.limit_train_batches=4",
    "trainer.limit_eval_batches=2",
    "trainer.max_epochs=1",
]


def sweep(tmp_path, ptb_dir, ptb_root, *overrides, sweep_dir=None, env=None, timeout=900, base=TINY):
    sweep_dir = sweep_dir or tmp_path / "sweep"
    args = [
        PY,
        "-m",
        "dglstm_lm.train",
        "--multirun",
        *base,
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}",
        f"data.dir={ptb_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        *overrides,
    ]
    return run_cli(args, env=env, timeout=timeout), sweep_dir


def jobs(sweep_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}


def wandb_groups(job_dir: Path) -> set[str]:
    groups = set()
    for offline in (job_dir / "wandb").glob("offline-run-*"):
        out = subprocess.run(
            [str(Path(PY).parent / "wandb"), "leet", "inspect", "--json", str(offline)],
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            if '"type":"run"' in line:
                groups.add(json.loads(line)["run"].get("run_group"))
    return groups


def test_basic_launcher_grid_with_one_wandb_group(tmp_path, ptb_dir, ptb_root):
    r, sweep_dir = sweep(tmp_path, ptb_dir, ptb_root, "model=lstm,dglstm", "seed=1,2")
    assert r.returncode == 0, r.stderr[-3000:]
    found = jobs(sweep_dir)
    assert set(found) == {f"model={m},seed={s}" for m in ("lstm", "dglstm") for s in (1, 2)}
    for name, m in found.items():
        model, seed = name.split(",")
        assert (
            m["status"] == "completed"
            and m["model"] == model.split("=")[1]
            and m["seed"] == int(seed.split("=")[1])
        )
        assert (sweep_dir / name / ".hydra" / "overrides.yaml").is_file() and (
            sweep_dir / name / "checkpoints" / "best.pt"
        ).is_file()
    groups = set().union(*(wandb_groups(sweep_dir / n) for n in found))
    assert groups == {f"sweep-{sweep_dir.parent.name}_{sweep_dir.name}"}
    assert "4 jobs" in r.stdout and "completed" in r.stdout
    assert not list(sweep_dir.rglob("run.lock"))  # each job held its directory while it ran, and let go


def test_joblib_launcher_runs_jobs_in_parallel_with_split_threads(tmp_path, ptb_dir, ptb_root):
    r, sweep_dir = sweep(
        tmp_path,
        ptb_dir,
        ptb_root,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model=rnn,stacked_lstm",
        "logger=none",
        "trainer.limit_train_batches=40",  # a few seconds each: long enough to overlap visibly
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = jobs(sweep_dir)
    assert set(found) == {"model=rnn", "model=stacked_lstm"}
    assert all(m["status"] == "completed" for m in found.values())
    assert not list(sweep_dir.rglob("run.lock"))  # released by the workers, which live on after their jobs
    import os

    cores = len(os.sched_getaffinity(0))
    assert all(m["threads"] == max(1, cores // 2) for m in found.values())  # no oversubscription
    # and they did run at the same time: each started before the other ended (the logs' millisecond
    # stamps: the line that says what runs where, and the final "done:" line)
    from datetime import datetime

    def stamp(line: str) -> datetime:
        return datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")

    spans = []
    for job in found:
        lines = (sweep_dir / job / "train.log").read_text().splitlines()
        spans.append(
            (
                stamp(next(ln for ln in lines if " parameters (" in ln)),
                stamp(next(ln for ln in lines if "][INFO] done: " in ln)),
            )
        )
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the jobs ran one after the other: {spans}"


def test_failing_jobs_are_recorded_and_do_not_stop_the_others(tmp_path, ptb_dir, ptb_root):
    """A bad value for one job, and a job whose loss turns to NaN: both recorded, the good job completes,
    the sweep exits non-zero with a summary, and a re-run with the same sweep dir reuses finished work."""
    ov = ["logger=none", "model=lstm", "trainer.clip_grad_norm=null", "trainer.lr=1,-1,1e30"]
    r, sweep_dir = sweep(tmp_path, ptb_dir, ptb_root, *ov)
    assert r.returncode == 1, r.stderr[-3000:]
    found = jobs(sweep_dir)
    assert found["trainer.lr=1"]["status"] == "completed"
    assert (
        found["trainer.lr=-1"]["status"] == "failed"
        and "trainer.lr: must be positive" in found["trainer.lr=-1"]["error"]
    )
    assert (
        found[f"trainer.lr={1e30}"]["status"] == "diverged"
        and "diverged at epoch 1, step" in found[f"trainer.lr={1e30}"]["error"]
    )
    assert "1 of 3 jobs completed (1 diverged, 1 failed)" in r.stdout
    assert "Traceback" not in r.stderr

    before = (sweep_dir / "trainer.lr=1" / "metrics.json").read_text()
    again, _ = sweep(tmp_path, ptb_dir, ptb_root, *ov, sweep_dir=sweep_dir)
    assert again.returncode == 1
    assert (sweep_dir / "trainer.lr=1" / "metrics.json").read_text() == before  # finished job reused as is
    assert "already completed" in (sweep_dir / "trainer.lr=1" / "train.log").read_text()


def test_unknown_option_in_a_sweep_fails_before_any_job(tmp_path, ptb_dir, ptb_root):
    r, sweep_dir = sweep(tmp_path, ptb_dir, ptb_root, "model=lstm,gru")
    assert r.returncode == 2
    assert (
        r.stderr.strip().splitlines()[-1]
        == "error: unknown option model=gru (available: dglstm, lstm, residual_lstm, rnn, stacked_lstm)"
    )
    assert not sweep_dir.exists()


def test_make_sweep_target(tmp_path, ptb_dir, ptb_root):
    r = run_cli(
        [
            "make",
            "-s",
            "sweep",
            *TINY,
            "model=lstm,rnn",
            "logger=none",
            f"paths.output_dir={tmp_path}",
            f"paths.data_dir={ptb_root}",
        ],
        env={"PTB_DIR": str(ptb_dir)},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep_dir,) = list((tmp_path / "multirun").glob("*/*"))
    assert set(jobs(sweep_dir)) == {"model=lstm", "model=rnn"}


def test_sweep_dirs_started_in_the_same_second_differ(tmp_path):
    """`unique_dir` makes the sweep/run directory exclusively: a second one at the same second gets -2."""
    code = (
        "from dglstm_lm.config import _unique_dir as u, _unique_dirs as m; import sys;"
        "a = u(sys.argv[1]); m.clear(); b = u(sys.argv[1]); print(a); print(b)"
    )
    out = subprocess.run(
        [PY, "-c", code, str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    assert out == [str(tmp_path / "x"), str(tmp_path / "x") + "-2"]


def test_a_stopped_sweep_says_the_one_command_that_continues_it(tmp_path, ptb_dir, ptb_root):
    """Ctrl-C to a joblib sweep (the whole process group, as a terminal sends it): the two running jobs save
    a checkpoint and stop, the third does not start, every line of a job names it, the summary counts the
    jobs and prints one command; that command, run as printed, finishes all three (the stopped ones resume)."""
    import os
    import signal
    import time

    sweep_dir = tmp_path / "sweep"
    args = [
        PY, "-m", "dglstm_lm.train", "--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        "experiment=smoke", "logger=none", "trainer.max_epochs=1", "trainer.limit_train_batches=300",
        "trainer.limit_eval_batches=2", "model=lstm,rnn,stacked_lstm", f"paths.output_dir={tmp_path / 'out'}",
        f"paths.data_dir={ptb_root}", f"data.dir={ptb_dir}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    env = {**os.environ, "CI": "true"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        logs = [sweep_dir / "model=lstm" / "train.log", sweep_dir / "model=rnn" / "train.log"]
        while not all(p.is_file() and "parameters" in p.read_text() for p in logs):
            assert time.monotonic() < deadline and proc.poll() is None, "the jobs did not start"
            time.sleep(0.5)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    found = jobs(sweep_dir)
    assert {k: v["status"] for k, v in found.items()} == {
        "model=lstm": "interrupted",
        "model=rnn": "interrupted",
    }
    for job in ("model=lstm", "model=rnn"):
        assert ckpt_step(sweep_dir / job) > 0
        assert f"] stopped by SIGINT; checkpoint saved to {sweep_dir / job}" in out + err
    assert "[job 2 model=stacked_lstm] not started: the sweep was stopped" in err
    assert not (sweep_dir / "model=stacked_lstm" / "run.lock").exists()
    job_lines = [line for line in (out + err).splitlines() if "dglstm_lm.train" in line]
    assert job_lines and all(
        line.startswith(("[job 0 model=lstm] ", "[job 1 model=rnn] ")) for line in job_lines
    )
    assert "0 of 3 jobs completed (2 interrupted, 1 not started)" in out
    assert "make train trainer.resume" not in out + err  # not a command per job: one for the sweep
    assert "leaked semaphore" not in err
    command = out.split("continue all of it with:\n", 1)[1].splitlines()[0].strip()
    assert command.startswith("make sweep hydra/launcher=joblib hydra.launcher.n_jobs=2 ")
    assert command.endswith(f"hydra.sweep.dir={sweep_dir}")

    r = run_cli(["bash", "-c", command], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {k: v["status"] for k, v in jobs(sweep_dir).items()} == dict.fromkeys(
        ("model=lstm", "model=rnn", "model=stacked_lstm"), "completed"
    )
    assert "3 of 3 jobs completed" in r.stdout
    for job in ("model=lstm", "model=rnn"):
        assert "resumed from" in (sweep_dir / job / "train.log").read_text()


def ckpt_step(run_dir: Path) -> int:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["step"]


@pytest.mark.slow
def test_refused_jobs_are_reported_as_refused(tmp_path, ptb_dir, ptb_root):
    """A finished sweep re-run into its folder with another seed: both jobs are rightly refused (their folders
    hold runs of another config), and the summary says `refused` with the reason — not `2 of 2 jobs
    completed` with the old numbers — and the sweep exits non-zero; the old runs are untouched. Run again with
    the first config, the jobs are completed (skipped) and the refusals are gone."""
    first, sweep_dir = sweep(tmp_path, ptb_dir, ptb_root, "logger=none", "model=lstm,dglstm")
    assert first.returncode == 0, first.stderr[-2000:]
    before = jobs(sweep_dir)
    again, _ = sweep(
        tmp_path, ptb_dir, ptb_root, "logger=none", "model=lstm,dglstm", "seed=2", sweep_dir=sweep_dir
    )
    assert again.returncode == 1
    assert "0 of 2 jobs completed (2 refused)" in again.stdout
    refused = [line for line in again.stdout.splitlines() if line.strip().startswith("refused")]
    assert len(refused) == 2 and all(
        "already holds a run with another config (differs in seed)" in r for r in refused
    )
    assert jobs(sweep_dir) == before  # nothing written into the refused jobs' folders
    back, _ = sweep(tmp_path, ptb_dir, ptb_root, "logger=none", "model=lstm,dglstm", sweep_dir=sweep_dir)
    assert back.returncode == 0 and "2 of 2 jobs completed" in back.stdout
    assert not [line for line in back.stdout.splitlines() if line.strip().startswith("refused")]
