"""What `make bench` records about the machine: the CPU's instruction set, the one torch's kernels use, and
the limits asked for (an emulated AVX2 figure must say it is one)."""

from __future__ import annotations

import json

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

    assert quiet_machine_warnings([control(1.02, 0.97)], 1.9, 2.1, 2) == []  # our own 2 threads: quiet
    (w,) = quiet_machine_warnings([control(1.0, 1.0)], 4.2, 7.9, 2)
    assert w.startswith("load average 7.9 on 2 cores")
    (w,) = quiet_machine_warnings([control(0.41, 1.0)], None, None, 2)
    assert "(2 x 200 train) is at 0.41x" in w and "at least 59%" in w
    assert len(quiet_machine_warnings([control(0.9, 1.1)], 5.0, 5.0, 2)) == 3
