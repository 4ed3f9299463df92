"""What `make bench` records about the machine: the CPU's instruction set, the one torch's kernels use, and
the limits asked for (an emulated AVX2 figure must say it is one)."""

from __future__ import annotations

import json

import pytest

from .conftest import PY, run_cli

SHOW = "import json; from dglstm_lm.bench import machine, describe_isa; m = machine(); print(json.dumps([m, describe_isa(m)]))"


def test_the_instruction_set_and_its_limits_are_recorded():
    plain = run_cli([PY, "-c", SHOW])
    assert plain.returncode == 0, plain.stderr
    info, text = json.loads(plain.stdout)
    assert info["cpu_isa"] in ("AVX-512", "AVX2", "SSE") and info["isa_limits"] == {}
    if info["cpu_isa"] == "AVX-512" and info["aten_capability"] == "AVX512":
        assert info["fused_rows"] == "AVX-512"
    assert "emulated" not in text
    limits = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    limited = run_cli([PY, "-c", SHOW], env=limits)
    info, text = json.loads(limited.stdout)
    assert info["isa_limits"] == limits
    if info["cpu_isa"] in ("AVX-512", "AVX2"):
        assert info["aten_capability"] == "AVX2"  # the limit took effect in torch's kernels
        assert info["fused_rows"] == "AVX2"  # ... and in the fused kernel's own rows
    assert text.endswith(
        "(emulated: ATEN_CPU_CAPABILITY=avx2, DNNL_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2)"
    )


def test_a_busy_machine_or_a_stray_control_row_is_said():
    """`make bench` on a loaded machine once reported the DGLSTM at 0.26x (control 0.41x) without a word: a
    load average above the cores, or a control row beyond 1 ± 5%, is now a warning (and in bench.json)."""
    from dglstm_lm.bench import quiet_machine_warnings

    def control(train, evaluate):
        return {"core": "nn.LSTM (control)", "layers": 2, "hidden": 200,
                "train_ratio_to_nn_lstm": train, "eval_ratio_to_nn_lstm": evaluate}  # fmt: skip

    assert quiet_machine_warnings([control(1.02, 0.97)], [1.9, 2.1], 2) == []  # our own 2 threads: quiet
    (w,) = quiet_machine_warnings([control(1.0, 1.0)], [4.2, 7.9], 2)
    assert w.startswith("load average 7.9 on 2 cores")
    (w,) = quiet_machine_warnings([control(0.41, 1.0)], [None, None], 2)
    assert "(2 x 200 train) is at 0.41x" in w and "at least 59%" in w
    assert len(quiet_machine_warnings([control(0.9, 1.1)], [5.0, 5.0], 2)) == 3


def test_the_median_interval_has_the_textbook_ranks_and_its_coverage():
    """median_ci's order statistics against the published ranks of the distribution-free 95% interval for a
    median (Conover, Practical Nonparametric Statistics, Table A3: n = 6 → 1st and 6th, 10 → 2nd and 9th,
    15 → 4th and 12th, 20 → 6th and 15th), none below 6 values, and its coverage by simulation: at least 95%
    (exactly 96.5% at n = 15) of intervals from samples of a skewed distribution hold its true median."""
    import math
    import random

    from dglstm_lm.bench import median_ci

    for n, (lo, hi) in {6: (1, 6), 10: (2, 9), 15: (4, 12), 20: (6, 15)}.items():
        values = [float(v) for v in range(n, 0, -1)]  # n, ..., 1: the ranks are the values
        med, a, b = median_ci(values)
        assert (med, a, b) == ((n + 1) / 2, lo, hi), n
    assert median_ci([3.0, 1.0, 2.0, 5.0, 4.0]) == (3.0, None, None)
    rng, true_median = random.Random(1), math.log(2)  # the exponential distribution's median
    hits = 0
    for _ in range(20_000):
        _, a, b = median_ci([rng.expovariate(1.0) for _ in range(15)])
        hits += a <= true_median <= b
    assert abs(hits / 20_000 - 0.9648) < 0.006, hits / 20_000


def test_a_ratio_is_paired_by_round(monkeypatch):
    """A row's ratio to nn.LSTM is taken round by round (a slow round slows both, and cancels): here every
    round of the core is 1/r_i of nn.LSTM's time while the rounds' speeds differ 3x, so the ratio is the
    median r_i and its interval the 4th and 12th of the 15 r_i; the ratio of the two median rounds (what a
    median of tokens/s per model gives) would be another number."""
    import argparse

    import torch

    from dglstm_lm import bench

    monkeypatch.setattr(bench, "peak_memory_mb", lambda *a: 0.0)
    r = [0.90, 1.02, 0.95, 0.97, 0.99, 0.93, 0.96, 1.00, 0.94, 0.98, 0.91, 1.01, 0.92, 0.97, 0.96]
    speed = [1.0, 3.0, 1.5, 2.0, 1.2, 2.5, 1.1, 2.8, 1.3, 1.7, 2.2, 1.9, 1.4, 2.6, 1.6]
    ref = [s * 0.1 for s in speed]
    times = {"nn.LSTM": ref, "dglstm": [t / x for t, x in zip(ref, r, strict=True)]}
    models = {k: torch.nn.Linear(2, 2) for k in times}
    args = argparse.Namespace(layers=2, threads=2, device="cpu")
    recs = bench._rows(list(times), models, 8, args, torch.device("cpu"), times, times)
    row = next(x for x in recs if x["core"] == "dglstm")
    s = sorted(r)
    assert row["train_ratio_to_nn_lstm"] == pytest.approx(s[7]) and s[7] == 0.96
    assert row["train_ratio_to_nn_lstm_ci95"] == pytest.approx([s[3], s[11]])
    assert row["eval_ratio_to_nn_lstm"] == pytest.approx(0.96)
    assert bench.tokens_per_s(times)["dglstm"] / bench.tokens_per_s(times)["nn.LSTM"] != pytest.approx(0.96)
    base = next(x for x in recs if x["core"] == "nn.LSTM")
    assert base["train_ratio_to_nn_lstm"] == 1.0 and base["train_ratio_to_nn_lstm_ci95"] == [1.0, 1.0]


def test_the_load_before_the_start_is_taken_out_of_the_readings():
    """A job paused just before make bench leaves the one-minute load average at 4.5 on 2 cores, decaying;
    the bench's own 2 threads then hold the load at 2.0. Linux's average is exponential (time constant
    60 s): L(t) = 2.0 + (4.5 - 2.0) e^(-t/60). Each reading 30 s or more in gives back 2.0 (no warning),
    although the raw readings at 40 and 60 s are above 2.75 (a warning); a reading 10 s in is too early to
    say; a load of 4.0 since the start is seen as such."""
    import math

    from dglstm_lm.bench import load_while_measuring, quiet_machine_warnings

    def average(t, before, since):
        return since + (before - since) * math.exp(-t / 60)

    readings = [[t, average(t, 4.5, 2.0)] for t in (10, 40, 60, 300)]
    assert readings[1][1] > 2.75 and readings[2][1] > 2.75
    assert quiet_machine_warnings([], [r[1] for r in readings], 2) != []  # the raw readings: a false alarm
    got = load_while_measuring(4.5, readings)
    assert got == pytest.approx([2.0, 2.0, 2.0])
    assert quiet_machine_warnings([], got, 2) == []
    busy = load_while_measuring(0.5, [[t, average(t, 0.5, 4.0)] for t in (45, 120)])
    assert busy == pytest.approx([4.0, 4.0])
    (w,) = quiet_machine_warnings([], busy, 2)
    assert w.startswith("load average 4.0 on 2 cores")
    assert load_while_measuring(None, [[50, 3.0], [70, None]]) == [3.0]


def test_zero_rounds_is_refused_in_one_line_before_anything_is_written(tmp_path):
    r = run_cli([PY, "-m", "dglstm_lm.bench", "--rounds", "0", "--out", str(tmp_path / "bench")])
    assert r.returncode != 0 and not (tmp_path / "bench").exists()
    assert r.stderr.strip().splitlines() == ["error: --rounds 0: expected a whole number ≥ 1"], r.stderr
