"""The language model's loss (models/loss.py and the fused kernel's cross-entropy): the summed negative
log-likelihood and its gradient against a float64 reference written from the definition, in float32 and
bfloat16, with ignored rows, extreme and non-finite logits, every instruction-set variant, any thread count,
and inside a training step against torch's F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dglstm_lm.errors import ConfigError
from dglstm_lm.models import loss
from dglstm_lm.models.kernels import cpp_extension

from .conftest import ROW_VARIANTS, run_row_variant

IGNORE = -100
pytestmark = pytest.mark.skipif(cpp_extension() is None, reason="no fused kernel")


@pytest.fixture(autouse=True)
def _automatic_loss(monkeypatch):
    monkeypatch.delenv("DGLSTM_LOSS", raising=False)  # the choice per machine, not a caller's


def reference(x: torch.Tensor, t: torch.Tensor):
    """sum_r [log sum_j exp(x_rj) - x_r,t_r] over rows with t_r != IGNORE, and its gradient softmax(x_r) -
    onehot(t_r) (zero for ignored rows), in float64, written from the definition."""
    x = x.double()
    m = x.max(1, keepdim=True).values
    lse = m.squeeze(1) + (x - m).exp().sum(1).log()
    keep = t != IGNORE
    tt = t.clamp(min=0)
    nll = ((lse - x.gather(1, tt[:, None]).squeeze(1)) * keep).sum()
    grad = (x - lse[:, None]).exp()
    grad[torch.arange(len(t)), tt] -= 1.0
    return nll, grad * keep[:, None]


def fused(x: torch.Tensor, t: torch.Tensor, g: float = 1.0):
    x = x.detach().requires_grad_()
    nll = loss.summed_nll(x, t, IGNORE)
    assert loss.loss_path(x) == "fused" and nll.dtype == torch.float32 and nll.dim() == 0
    (nll * g).backward()
    return nll.detach(), x.grad


def targets(n: int, v: int, seed: int = 0) -> torch.Tensor:
    t = torch.randint(v, (n,), generator=torch.Generator().manual_seed(seed))
    t[1::7] = IGNORE
    return t


@pytest.mark.parametrize("v", [1, 5, 16, 37, 10_000])  # below, at and above the 16 lanes, a remainder, PTB's
def test_float32_loss_and_gradient_match_the_definition(v):
    torch.manual_seed(v)
    x, t = torch.randn(23, v) * 4, targets(23, v, v)
    nll, grad = fused(x, t, g=0.5)
    ref, ref_grad = reference(x, t)
    assert abs(float(nll) - float(ref)) <= 1e-6 * abs(float(ref)) + 1e-5
    torch.testing.assert_close(grad.double(), 0.5 * ref_grad, rtol=1e-5, atol=1e-6)
    assert grad[1::7].abs().max() == 0  # ignored rows: no gradient


def test_bfloat16_logits_are_read_as_they_are_and_the_gradient_is_bfloat16():
    """The loss of bfloat16 logits is computed in float32 from their exact values (no bfloat16 rounding in
    it: float32 accuracy against the float64 loss of the same values, and the same loss as their float32
    copy); the gradient is the float32 one rounded once to bfloat16, to nearest even: bit for bit the
    float32 logits' gradient rounded by torch, and within half a bfloat16 ulp of the float64 one."""
    torch.manual_seed(1)
    x, t = (torch.randn(40, 1000) * 3).bfloat16(), targets(40, 1000)
    nll, grad = fused(x, t, g=0.37)
    ref, ref_grad = reference(x, t)
    assert abs(float(nll) - float(ref)) <= 1e-6 * abs(float(ref))
    assert grad.dtype == torch.bfloat16
    nll32, grad32 = fused(x.float(), t, g=0.37)
    assert torch.equal(nll, nll32)
    assert torch.equal(grad, grad32.bfloat16())
    err = (grad.double() - 0.37 * ref_grad).abs() - (2.0**-8 * 0.37 * ref_grad.abs() + 1e-7)
    assert err.max() <= 0, float(err.max())


def test_extreme_logits_stay_finite_and_non_finite_ones_give_nan():
    """Logits far beyond exp's range (a spread of 1e4) are shifted by the row's maximum, as in the
    definition; a NaN or +inf in a row makes that row's loss NaN, as torch's does, so that a diverged run
    is seen diverging."""
    x = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-3e4, -3e4 + 1.0, -3e4 + 2.0, -3e4]])
    t = torch.tensor([0, 2])
    nll, grad = fused(x, t)
    ref, ref_grad = reference(x, t)
    torch.testing.assert_close(nll.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    for dtype in (torch.float32, torch.bfloat16):
        for bad in (float("nan"), float("inf")):
            for col in (5, 20, 43):  # in the first and the second 16 lanes, and in the remainder after them
                y = torch.randn(3, 44).to(dtype)
                y[1, col] = bad
                nll, grad = fused(y, torch.tensor([0, 2, 7]))
                assert torch.isnan(nll), (dtype, bad, col)
                assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2]]).all(), (dtype, bad, col)
        y = torch.randn(3, 44).to(dtype)  # -inf: a word with probability 0, finite elsewhere
        y[1, 20] = float("-inf")
        nll, grad = fused(y, torch.tensor([0, 2, 7]))
        ref, ref_grad = reference(y, torch.tensor([0, 2, 7]))
        assert torch.isfinite(nll) and grad[1, 20] == 0
        torch.testing.assert_close(nll.double(), ref, rtol=1e-6, atol=1e-6)


def test_the_result_does_not_depend_on_the_thread_count():
    """Rows are one thread's work each and their losses are summed in row order: bit-identical at 1 and 2
    threads."""
    torch.manual_seed(2)
    x, t = torch.randn(300, 2000), targets(300, 2000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused(x, t)
        torch.set_num_threads(2)
        two = fused(x, t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_bad_targets_and_a_bad_switch_are_one_line_errors(monkeypatch):
    x = torch.randn(3, 10)
    for bad in (10, -1):
        with pytest.raises(
            RuntimeError, match=f"cross_entropy: target {bad} is out of bounds for 10 classes"
        ):
            loss.summed_nll(x, torch.tensor([0, bad, 1]), IGNORE)
    monkeypatch.setenv("DGLSTM_LOSS", "fast")
    with pytest.raises(ConfigError, match=r"^DGLSTM_LOSS=fast: expected torch \(F.cross_entropy\) or auto"):
        loss.summed_nll(x, torch.tensor([0, 1, 2]), IGNORE)


def test_the_switch_the_fallback_and_the_record(monkeypatch):
    """$DGLSTM_LOSS=torch runs F.cross_entropy; float64 logits always do (float64 loss, equal to the
    definition); the record names what ran; no second derivative through the fused loss."""
    x, t = torch.randn(4, 9), torch.tensor([1, IGNORE, 3, 8])
    loss.reset_loss_record()
    assert loss.loss_record() == "none"
    a = loss.summed_nll(x, t, IGNORE)
    assert loss.loss_record() == "fused (fused CPU cross-entropy)"
    monkeypatch.setenv("DGLSTM_LOSS", "torch")
    assert loss.loss_path(x) == "torch"
    b = loss.summed_nll(x, t, IGNORE)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    monkeypatch.delenv("DGLSTM_LOSS")
    assert loss.loss_record() == "fused (fused CPU cross-entropy), torch (F.cross_entropy)"
    loss.reset_loss_record()
    d = loss.summed_nll(x.double(), t, IGNORE)
    assert loss.loss_record() == "torch (F.cross_entropy)" and d.dtype == torch.float64
    torch.testing.assert_close(d, reference(x, t)[0], rtol=1e-12, atol=0)
    y, w = x.clone().requires_grad_(), torch.tensor(2.0, requires_grad=True)
    (g,) = torch.autograd.grad(w * loss.summed_nll(y, t, IGNORE), y, create_graph=True)
    with pytest.raises(RuntimeError, match="marked with @once_differentiable"):
        g.sum().backward()


def test_training_steps_match_torch_cross_entropy_in_float32_and_under_autocast():
    """Five SGD steps of a small language model (DGLSTM core) with the fused loss and with F.cross_entropy
    from the same weights: float32 parameters agree to float32 rounding; under autocast bf16 the two losses
    see the same bfloat16 logits, and the parameters agree within bfloat16 rounding."""
    from dglstm_lm.models import LanguageModel, build_core

    def train(torch_loss: bool, bf16: bool):
        torch.manual_seed(3)
        model = LanguageModel(50, 16, build_core("dglstm", 16, [24, 24]))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(4)
        losses = []
        for _ in range(5):
            x, y = torch.randint(50, (7, 3), generator=gen), torch.randint(50, (7, 3), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits, _ = model(x, model.init_state(3))
                flat = logits.view(-1, 50)
                if torch_loss:
                    nll = F.cross_entropy(flat, y.view(-1), reduction="sum")
                else:
                    assert loss.loss_path(flat) == "fused"
                    nll = loss.summed_nll(flat, y.view(-1))
            opt.zero_grad()
            (nll / 3).backward()
            opt.step()
            losses.append(float(nll.detach()))
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    for bf16, tol in ((False, 1e-5), (True, 2e-2)):
        (la, pa), (lb, pb) = train(False, bf16), train(True, bf16)
        assert max(abs(a - b) / b for a, b in zip(la, lb)) < tol, (bf16, la, lb)
        assert float((pa - pb).abs().max()) < tol, bf16


ROW_VARIANT_CHECK = """
import json, torch
from dglstm_lm.models.kernels import cpp_extension
from dglstm_lm.models.loss import summed_nll
torch.manual_seed(5)
errors = []
for dtype in (torch.float32, torch.bfloat16):
    x = (torch.randn(31, 1037) * 3).to(dtype).requires_grad_()  # 1037: a remainder after the 16-wide lanes
    t = torch.randint(1037, (31,))
    t[::4] = -100
    nll = summed_nll(x, t)
    nll.backward()
    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x64, t, reduction="sum")
    ref.backward()
    bound = 2.0**-8 * x64.grad.abs() + 1e-6 if dtype == torch.bfloat16 else 1e-6  # bf16: half an ulp
    errors += [abs(float(nll) - float(ref)) / float(ref), float(((x.grad.double() - x64.grad).abs() - bound).max())]
print(json.dumps([cpp_extension().row_isa(), torch.backends.cpu.get_cpu_capability(), *errors]))
"""


@pytest.mark.parametrize("capability,rows", ROW_VARIANTS)
def test_every_row_variant_of_the_loss_matches_float64(capability, rows):
    """The loss's rows are compiled for AVX-512, AVX2 and baseline x86-64 like the scan's: each variant this
    CPU can run, forced in a fresh process, against float64, with float32 and bfloat16 logits and ignored
    rows."""
    _, _, rel32, grad32, rel16, grad16 = run_row_variant(capability, rows, ROW_VARIANT_CHECK)
    assert rel32 < 1e-6 and grad32 <= 0 and rel16 < 1e-6 and grad16 <= 0, (rel32, grad32, rel16, grad16)
