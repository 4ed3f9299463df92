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
