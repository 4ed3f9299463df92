"""What a run says in its log while it runs (no terminal: a log file, a sweep's job): its first line names
the model's shapes and precision, and the once-a-minute progress line carries the running training loss."""

from __future__ import annotations

import json
import re

import pytest
import torch

from dglstm_lm import trainer as trainer_mod
from dglstm_lm.config import compose
from dglstm_lm.train import train

from .conftest import write_corpus


def _tiny_cfg(tmp_path, *extra):
    corpus = write_corpus(tmp_path / "corpus")
    return compose(
        [
            "experiment=smoke",
            "model=dglstm",
            "model.emb_dim=6",
            "model.hidden_dim=10",
            "logger=none",
            "trainer.progress=off",
            "trainer.max_epochs=1",
            "trainer.batch_size=2",
            "trainer.eval_batch_size=2",
            "trainer.bptt=3",
            "trainer.limit_train_batches=null",
            f"data.dir={corpus}",
            "data.verify_checksums=false",
            f"paths.data_dir={tmp_path / 'data'}",
            f"paths.output_dir={tmp_path / 'out'}",
            *extra,
        ]
    )


def test_progress_lines_carry_the_running_training_loss(tmp_path, monkeypatch, caplog):
    """With a line after every step, the epoch's last line shows the epoch's training loss and perplexity:
    the values its history records."""
    monkeypatch.setattr(trainer_mod, "PROGRESS_EVERY_S", 0.0)
    caplog.set_level("INFO", logger="dglstm_lm")
    run_dir = tmp_path / "run"
    train(_tiny_cfg(tmp_path), run_dir)
    lines = [r.getMessage() for r in caplog.records if "windows)" in r.getMessage()]
    assert len(lines) >= 3
    last = re.search(r"\((\d+)/(\d+) windows\)  train loss ([\d.]+) \(ppl ([\d.]+)\)", lines[-1])
    assert last and last.group(1) == last.group(2)  # the epoch's last window
    (epoch,) = [json.loads(s) for s in (run_dir / "history.jsonl").read_text().splitlines()]
    assert float(last.group(3)) == pytest.approx(epoch["train/loss"], abs=5e-4)
    assert float(last.group(4)) == pytest.approx(epoch["train/ppl"], abs=5e-3)
    losses = [float(re.search(r"train loss ([\d.]+)", s).group(1)) for s in lines]
    assert len(set(losses)) > 1  # a running value, not the epoch's end repeated


@pytest.mark.parametrize(
    "extra,shapes",
    [
        ((), "emb 6, hidden 10 × 2, vocab 12, untied), fp32"),
        (
            ("model.hidden_dims=[10,12]", "trainer.precision=bf16"),
            "emb 6, hidden 10 / 12, vocab 12, untied), bf16",
        ),
        (("model.hidden_dim=6", "model.tie_weights=true"), "emb 6, hidden 6 × 2, vocab 12, tied), fp32"),
    ],
)
def test_the_first_line_names_the_shapes_and_the_precision(tmp_path, caplog, monkeypatch, extra, shapes):
    caplog.set_level("INFO", logger="dglstm_lm")
    # the line is the point here: the DGLSTM's own kernel runs under bf16 autocast on any CPU, so the check
    # that refuses bf16 where oneDNN has none (nn.LSTM's need) is passed
    monkeypatch.setattr(trainer_mod, "cpu_bf16_supported", lambda: True)
    train(_tiny_cfg(tmp_path, *extra), tmp_path / "run")
    first = next(r.getMessage() for r in caplog.records if "parameters (" in r.getMessage())
    assert shapes in first, first


@pytest.mark.parametrize(
    "args,error",
    [
        (["trainer.device=cuda:5"], "error: trainer.device=cuda:5: CUDA is not available on this machine"),
        (["data.dir=/nonexistent/ptb"], "error: data folder /nonexistent/ptb (from data.dir) does not exist"),
        (["--multirun", "seed=1,2", "data.dir=/nonexistent/ptb"], "error: data folder /nonexistent/ptb"),
    ]
    if not torch.cuda.is_available()
    else [
        (["data.dir=/nonexistent/ptb"], "error: data folder /nonexistent/ptb (from data.dir) does not exist")
    ],
)
def test_a_run_that_cannot_start_leaves_no_run_folder(tmp_path, args, error):
    """An unknown device or a missing data folder is refused before Hydra makes the run (or sweep) folder:
    one line, a non-zero exit, and no `failed` run for every later report to list."""
    from .conftest import PY, run_cli

    out = tmp_path / "outputs"
    res = run_cli([PY, "-m", "dglstm_lm.train", *args, f"paths.output_dir={out}", "logger=none"])
    assert res.returncode != 0
    assert res.stderr.strip().splitlines()[-1].startswith(error), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists()


def test_make_runs_lists_each_run_with_what_finds_it(tmp_path):
    """`make runs`: one line per run, newest first, with status, epochs, best valid ppl, test ppl, data and
    the overrides it was started with (where and how it was watched left out)."""
    from dglstm_lm import rundir

    from .conftest import PY, run_cli

    out = tmp_path / "out"
    done = train(_tiny_cfg(tmp_path), out / "runs" / "a")
    rundir.write_overrides(out / "runs" / "a", ["model=dglstm", "model.hidden_dim=10", "logger=none"])
    failed = out / "multirun" / "s" / "seed=2"
    failed.mkdir(parents=True)
    (failed / "config.json").write_text("{}")
    rundir.write_metrics(failed, {"status": "failed", "epochs_completed": 0, "max_epochs": 13,
                                  "updated_at": "2000-01-01T00:00:00+00:00"})  # fmt: skip
    res = run_cli([PY, "-m", "dglstm_lm.runs", "--dir", str(out)])
    assert res.returncode == 0, res.stderr
    head, first, second = res.stdout.splitlines()
    assert head.split() == ["run", "status", "epochs", "best", "val", "test", "data", "overrides"]
    assert first.split()[:4] == ["runs/a", "completed", "1/1", f"{done['val/ppl']:.2f}"]
    assert first.split()[4] == f"{done['test/ppl']:.2f}" and str(tmp_path / "corpus") in first
    assert first.endswith("model=dglstm model.hidden_dim=10")  # logger=none: how it was watched, left out
    assert second.split()[:4] == ["multirun/s/seed=2", "failed", "0/13", "-"]
    bad = run_cli([PY, "-m", "dglstm_lm.runs", "--dir", str(tmp_path / "nowhere")])
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'nowhere'} does not exist"


@pytest.mark.parametrize(
    "args,error",
    [
        (
            ["-m", "dglstm_lm.train", "paths.output_dir={f}", "logger=none"],
            "paths.output_dir={f} is not a folder",
        ),
        (
            ["-m", "dglstm_lm.train", "paths.output_dir={f}/sub", "logger=none"],
            "paths.output_dir={f}/sub is not a folder ({f} is a file)",
        ),
        (
            ["-m", "dglstm_lm.train", "--multirun", "seed=1,2", "paths.output_dir={f}"],
            "paths.output_dir={f} is not",
        ),
        (["-m", "dglstm_lm.compare", "--dir", "{f}"], "dir={f} is not a folder"),
        (["-m", "dglstm_lm.report", "--out", "{f}"], "--out={f} is not a folder"),
        (
            ["-m", "dglstm_lm.report", "--dir", "{f}", "--out", "{t}/report"],
            "{f} is a file, not a run or sweep folder",
        ),
    ],
    ids=["train", "train-parent", "sweep", "compare", "report-out", "report-dir"],
)
def test_a_file_where_a_folder_belongs_is_one_line(tmp_path, args, error):
    """A regular file given where a folder is expected: one line naming the setting, a non-zero exit, the
    file untouched and nothing written (a traceback of 105 lines through Hydra's error formatting before)."""
    from .conftest import PY, run_cli

    f = tmp_path / "afile"
    f.write_text("mine")
    res = run_cli([PY, *(a.format(f=f, t=tmp_path) for a in args)])
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines == [f"error: {error.format(f=f, t=tmp_path)}"] or (
        len(lines) == 1 and lines[0].startswith(f"error: {error.format(f=f, t=tmp_path)}")
    ), res.stderr
    assert f.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_stopped_sweeps_continue_command_keeps_a_templated_job_folder(tmp_path, capsys):
    """make compare's final stage names its jobs `hydra.sweep.subdir='seed=${seed}'`: the continue command
    printed when such a sweep stops must keep the template (it printed the last job's resolved seed=1, so
    run as printed seed 2 was refused and the sweep exited 0)."""
    import shlex

    from omegaconf import OmegaConf

    from dglstm_lm import rundir
    from dglstm_lm.callbacks import SweepSummary

    sweep = tmp_path / "final"
    rundir.write_metrics(sweep / "seed=1", {"status": "completed", "val/ppl": 1.0, "test/ppl": 1.0})
    rundir.write_metrics(sweep / "seed=2", {"status": "interrupted", "error": "stopped by SIGINT"})
    rundir.mark_sweep_stopped(sweep, "SIGINT")
    config = OmegaConf.create(
        {
            "seed": 1,  # the last job's, as Hydra's config at the sweep's end holds it
            "hydra": {
                "sweep": {"dir": str(sweep)},
                "overrides": {
                    "hydra": ["hydra.sweep.subdir=seed=${seed}", "hydra/launcher=joblib"],
                    "task": ["model=dglstm", "seed=1,2"],
                },
            },
        }
    )
    SweepSummary().on_multirun_end(config)
    out = capsys.readouterr().out
    (command,) = [line.strip() for line in out.splitlines() if line.strip().startswith("make sweep")]
    args = shlex.split(command)
    assert "hydra.sweep.subdir=seed=${seed}" in args and "seed=1,2" in args
    assert f"hydra.sweep.dir={sweep}" in args and "hydra.sweep.subdir=seed=1" not in args
