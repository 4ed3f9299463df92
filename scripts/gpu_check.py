"""`python scripts/gpu_check.py OUT.json` on a CUDA machine (run from the repository root). The Triton scan on a real GPU against the float64 per-step reference of tests/test_models.py:
outputs, final states and every gradient, every option, equal and unequal widths; then fp32 on CUDA vs
float64 at a real size, and bf16 autocast vs fp32."""

import itertools
import json
import sys

import torch

sys.path.insert(0, ".")
from dglstm_lm.models import build_core
from tests.test_models import DIMS, OPTIONS, _random_state, reference_dglstm

res = {"float64_all_options": [], "fp32_2x200": None}
dev = torch.device("cuda")
for backend in ("triton", "triton_graph"):
    for (gi, ph, cp, st), dims in itertools.product(OPTIONS, DIMS):
        torch.manual_seed(0)
        opts = dict(dims=[5, *dims], gate_input=gi, peephole=ph, coupled=cp, stabiliser=st)
        core = build_core(
            "dglstm", 5, dims, gate_input=gi, peephole=ph, coupled=cp, backend=backend, stabiliser=st
        ).double()
        with torch.no_grad():
            for p in core.parameters():
                p.uniform_(-0.6, 0.6)
        T, B = 6, 3
        x = torch.randn(T, B, 5, dtype=torch.float64)
        state = _random_state(core, B, torch.float64)
        w_out = torch.randn(T, B, dims[-1], dtype=torch.float64)

        def run(fn, m, device):
            xx = x.detach().clone().to(device).requires_grad_()
            ss = [tuple(s.detach().clone().to(device).requires_grad_() for s in l) for l in state]
            out, final = fn(m, xx, ss)
            loss = (out * w_out.to(device)).sum() + sum((h**2).sum() + (c * 0.3).sum() for h, c in final)
            leaves = [xx, *[s for l in ss for s in l], *m.parameters()]
            return [out, *[t for hc in final for t in hc], *torch.autograd.grad(loss, leaves)]

        ref = run(lambda m, xx, ss: reference_dglstm(m, xx, ss, opts), core, "cpu")
        gpu = core.to(dev)
        got = run(lambda m, xx, ss: m(xx, ss), gpu, dev)
        err = max(float((a.detach().cpu() - b.detach()).abs().max()) for a, b in zip(got, ref))
        res["float64_all_options"].append(
            {"backend": backend, "opts": [gi, ph, cp, st], "dims": dims, "max_abs_err": err}
        )
worst = max(r["max_abs_err"] for r in res["float64_all_options"])
res["float64_worst"] = worst
print(
    f"float64, {len(res['float64_all_options'])} cases (triton, triton_graph x 16 options x 2 widths): worst |diff| {worst:.2e}",
    flush=True,
)

# fp32 on CUDA at 2 x 200, T=35, B=20 vs the float64 CPU python backend
torch.manual_seed(1)
ref = build_core("dglstm", 200, [200, 200], backend="python").double()
x = torch.randn(35, 20, 200, dtype=torch.float64)
st = _random_state(ref, 20, torch.float64)


def fb(m, device, dtype, autocast=False):
    xx = x.detach().clone().to(device, dtype).requires_grad_()
    ss = [tuple(s.to(device, dtype) for s in l) for l in st]
    with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
        out, _ = m(xx, ss)
    out.float().pow(2).sum().backward()
    g = [p.grad.double().cpu() for p in m.parameters()]
    m.zero_grad()
    return out.double().cpu(), xx.grad.double().cpu(), g


r_out, r_gx, r_g = fb(ref, "cpu", torch.float64)
for backend in ("triton", "triton_graph"):
    m = build_core("dglstm", 200, [200, 200], backend=backend)
    m.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    m = m.to(dev)
    for ac in (False, True):
        o, gx, g = fb(m, dev, torch.float32, ac)
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max())
        rec = {
            "backend": backend,
            "bf16_autocast": ac,
            "out_rel": rel(o, r_out),
            "dx_rel": rel(gx, r_gx),
            "grad_rel_worst": max(rel(a, b) for a, b in zip(g, r_g)),
        }
        res.setdefault("fp32_bf16_2x200", []).append(rec)
        print(rec, flush=True)
json.dump(res, open(sys.argv[1], "w"), indent=1)
