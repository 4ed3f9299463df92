"""The Triton kernels of the GPU scan (see triton_scan.py): one forward and one backward step, elementwise over
(B, H). Imported on first use (triton_scan.kernels()), so that TRITON_INTERPRET is read when they are defined:
with TRITON_INTERPRET=1 they run on CPU tensors through Triton's interpreter.

Math in the tensors' dtype (float32, or float64 for the tests); σ(x) = 1 / (1 + e^-x) and
tanh(x) = 2σ(2x) - 1, which saturate to exactly 0, 1 and ±1 (σ(100) = 1 exactly: the open depth gate).
"""

import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0


@triton.jit
def fwd_step(
    z_ptr,  # (B, G*H): gx_t + h_{t-1} W_hh^T
    c_prev_ptr,  # (B, H)
    gd_ptr,  # (B, H): the depth gate's pre-activation without w_cd ⊙ c_{t-1}
    m_ptr,  # (B, H): the carried term
    wci_ptr,
    wcf_ptr,
    wco_ptr,
    wcd_ptr,  # (H,)
    h_ptr,  # out (B, H)
    c_ptr,  # out (B, H)
    acts_ptr,  # out (B, A*H): [i, f, g, o, d] ([i, g, o, d] coupled; no d without a depth path)
    tc_ptr,  # out (B, H): tanh(c_t)
    N,
    H,
    COUPLED: tl.constexpr,
    PEEP: tl.constexpr,
    DEPTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b = offs // H
    j = offs - b * H
    if COUPLED:
        G = 3
    else:
        G = 4
    if DEPTH:
        A = G + 1
    else:
        A = G
    zrow = b * (G * H) + j
    arow = b * (A * H) + j
    c = tl.load(c_prev_ptr + offs, mask=mask, other=0.0)
    zi = tl.load(z_ptr + zrow, mask=mask, other=0.0)
    if PEEP:
        zi = zi + tl.load(wci_ptr + j, mask=mask, other=0.0) * c
    i = _sigmoid(zi)
    if COUPLED:
        f = 1.0 - i
        zg = tl.load(z_ptr + zrow + H, mask=mask, other=0.0)
        zo = tl.load(z_ptr + zrow + 2 * H, mask=mask, other=0.0)
    else:
        zf = tl.load(z_ptr + zrow + H, mask=mask, other=0.0)
        if PEEP:
            zf = zf + tl.load(wcf_ptr + j, mask=mask, other=0.0) * c
        f = _sigmoid(zf)
        zg = tl.load(z_ptr + zrow + 2 * H, mask=mask, other=0.0)
        zo = tl.load(z_ptr + zrow + 3 * H, mask=mask, other=0.0)
    g = _tanh(zg)
    c_new = f * c + i * g
    if DEPTH:
        gd = tl.load(gd_ptr + offs, mask=mask, other=0.0)
        wcd = tl.load(wcd_ptr + j, mask=mask, other=0.0)
        d = _sigmoid(gd + wcd * c)
        c_new = c_new + d * tl.load(m_ptr + offs, mask=mask, other=0.0)
        tl.store(acts_ptr + arow + G * H, d, mask=mask)
    if PEEP:
        zo = zo + tl.load(wco_ptr + j, mask=mask, other=0.0) * c_new
    o = _sigmoid(zo)
    tc = _tanh(c_new)
    tl.store(h_ptr + offs, o * tc, mask=mask)
    tl.store(c_ptr + offs, c_new, mask=mask)
    tl.store(tc_ptr + offs, tc, mask=mask)
    tl.store(acts_ptr + arow, i, mask=mask)
    if COUPLED:
        tl.store(acts_ptr + arow + H, g, mask=mask)
        tl.store(acts_ptr + arow + 2 * H, o, mask=mask)
    else:
        tl.store(acts_ptr + arow + H, f, mask=mask)
        tl.store(acts_ptr + arow + 2 * H, g, mask=mask)
        tl.store(acts_ptr + arow + 3 * H, o, mask=mask)


# (bwd_step is long on purpose: one fused backward step, the equations in the order of the derivation;
# split into helpers it would need their loads and stores passed through Triton's call boundaries.)
@triton.jit
def bwd_step(
    gh_ptr,  # (B, H): grad_h_t
    dh_rec_ptr,  # (B, H): dz_{t+1} W_hh
    dc_ptr,  # in/out (B, H): dc_t (from step t+1) in, dc_{t-1} out (each element read, then written)
    gc_ptr,  # (B, H): grad_c_t
    acts_ptr,  # (B, A*H)
    tc_ptr,  # (B, H)
    c_prev_ptr,  # (B, H)
    m_ptr,  # (B, H)
    wci_ptr,
    wcf_ptr,
    wco_ptr,
    wcd_ptr,
    dz_ptr,  # out (B, G*H)
    dgd_ptr,  # out (B, H)
    dm_ptr,  # out (B, H)
    N,
    H,
    COUPLED: tl.constexpr,
    PEEP: tl.constexpr,
    DEPTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    b = offs // H
    j = offs - b * H
    if COUPLED:
        G = 3
    else:
        G = 4
    if DEPTH:
        A = G + 1
    else:
        A = G
    zrow = b * (G * H) + j
    arow = b * (A * H) + j
    dh = tl.load(gh_ptr + offs, mask=mask, other=0.0) + tl.load(dh_rec_ptr + offs, mask=mask, other=0.0)
    dc = tl.load(dc_ptr + offs, mask=mask, other=0.0) + tl.load(gc_ptr + offs, mask=mask, other=0.0)
    i = tl.load(acts_ptr + arow, mask=mask, other=0.0)
    if COUPLED:
        f = 1.0 - i
        g = tl.load(acts_ptr + arow + H, mask=mask, other=0.0)
        o = tl.load(acts_ptr + arow + 2 * H, mask=mask, other=0.0)
    else:
        f = tl.load(acts_ptr + arow + H, mask=mask, other=0.0)
        g = tl.load(acts_ptr + arow + 2 * H, mask=mask, other=0.0)
        o = tl.load(acts_ptr + arow + 3 * H, mask=mask, other=0.0)
    c_prev = tl.load(c_prev_ptr + offs, mask=mask, other=0.0)
    tc = tl.load(tc_ptr + offs, mask=mask, other=0.0)
    dzo = dh * tc * o * (1.0 - o)
    dc = dc + dh * o * (1.0 - tc * tc)
    if PEEP:
        dc = dc + dzo * tl.load(wco_ptr + j, mask=mask, other=0.0)
    dcp = dc * f
    if DEPTH:
        d = tl.load(acts_ptr + arow + G * H, mask=mask, other=0.0)
        dzd = dc * tl.load(m_ptr + offs, mask=mask, other=0.0) * d * (1.0 - d)
        tl.store(dgd_ptr + offs, dzd, mask=mask)
        tl.store(dm_ptr + offs, dc * d, mask=mask)
        dcp = dcp + dzd * tl.load(wcd_ptr + j, mask=mask, other=0.0)
    dzg = dc * i * (1.0 - g * g)
    if COUPLED:
        dzi = dc * (g - c_prev) * i * (1.0 - i)
        if PEEP:
            dcp = dcp + dzi * tl.load(wci_ptr + j, mask=mask, other=0.0)
        tl.store(dz_ptr + zrow, dzi, mask=mask)
        tl.store(dz_ptr + zrow + H, dzg, mask=mask)
        tl.store(dz_ptr + zrow + 2 * H, dzo, mask=mask)
    else:
        dzi = dc * g * i * (1.0 - i)
        dzf = dc * c_prev * f * (1.0 - f)
        if PEEP:
            dcp = (
                dcp
                + dzi * tl.load(wci_ptr + j, mask=mask, other=0.0)
                + dzf * tl.load(wcf_ptr + j, mask=mask, other=0.0)
            )
        tl.store(dz_ptr + zrow, dzi, mask=mask)
        tl.store(dz_ptr + zrow + H, dzf, mask=mask)
        tl.store(dz_ptr + zrow + 2 * H, dzg, mask=mask)
        tl.store(dz_ptr + zrow + 3 * H, dzo, mask=mask)
    tl.store(dc_ptr + offs, dcp, mask=mask)
