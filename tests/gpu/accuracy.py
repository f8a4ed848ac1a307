"""Accuracy harness shared by the GPU kernel tests: unfused eager attention in the test dtype and in fp64, and
FlashAttention's rule (error vs fp64 <= 2x eager's error in the same dtype, plus an absolute guard)."""

from __future__ import annotations

import torch

from eager_attention import eager as _eager
from fa3_inductor.kernels import reference
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram

S = ("score",)
DEV = "cuda"


def C(x):
    return ("const", float(x))


def eager(q, k, v, ops, prog, dtype):
    """HF style: the softmax in fp32, back to the dtype."""
    return _eager(q, k, v, ops, prog, dtype, softmax_fp32=True)


def run_eager(q, k, v, ops, prog, dout, dtype, backward=True):
    leaves = [t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v)]
    want = prog.operand_grad or (False,) * len(ops)
    # operands keep their own dtype (as in the model), except in the fp64 reference
    opl = [t.detach().to(torch.float64 if dtype == torch.float64 else t.dtype).requires_grad_()
           if (w and backward) else t for t, w in zip(ops, want)]
    out = eager(*leaves, opl, prog, dtype)
    if not backward:
        return out.detach(), []
    wrt = leaves + [t for t, w in zip(opl, want) if w]
    grads = torch.autograd.grad(out, wrt, dout.to(dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


GUARD = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(name, ours, eag, r64, nan_ref=None):
    assert ours.dtype == eag.dtype and ours.shape == eag.shape, name
    if nan_ref is not None:
        assert torch.equal(torch.isnan(ours), torch.isnan(nan_ref)), f"{name}: NaN pattern differs from reference.py"
    keep = ~(torch.isnan(ours) | torch.isnan(eag) | torch.isnan(r64))
    a, e, r = ours[keep].double(), eag[keep].double(), r64[keep].double()
    if a.numel() == 0:
        return
    guard = GUARD[ours.dtype] * max(1.0, r.abs().max().item())
    ours_err, eager_err = (a - r).abs().max().item(), (e - r).abs().max().item()
    assert ours_err <= 2 * eager_err + guard, \
        f"{name}: error vs fp64 {ours_err:.3g} > 2 x eager {eager_err:.3g} + {guard:.3g}"


def attend_and_check(q, k, v, ops, prog, backward=True, kernel=tp):
    """Forward of `kernel` (a module with supports / forward / backward) and the backward from its lse."""
    dtype = q.dtype
    assert kernel.supports(prog, q, k, v, ops) is None, kernel.supports(prog, q, k, v, ops)
    out, lse = kernel.forward(q, k, v, ops, prog)
    dout = torch.randn_like(out)
    eout, egr = run_eager(q, k, v, ops, prog, dout, dtype, backward)
    o64, g64 = run_eager(q, k, v, ops, prog, dout, torch.float64, backward)
    rout, _ = reference.forward(q, k, v, ops, prog)
    check("out", out, eout, o64, rout)
    if not backward:
        return
    grads = kernel.backward(dout, q, k, v, ops, out, lse, prog)
    rgr = reference.backward(dout, q, k, v, ops, prog)
    for name, a, e, r, rr in zip(["dq", "dk", "dv", "dop"], [*grads[:3], *grads[3]], egr, g64,
                                 [*rgr[:3], *rgr[3]]):
        check(name, a, e, r, rr)


def randn(*shape, outlier=False, dtype=torch.bfloat16, gen=None):
    """N(0,1), or the FlashAttention-3 paper's outlier data N(0,1) + N(0,100)·Bernoulli(0.001) (std 10)."""
    x = torch.randn(*shape, device=DEV, generator=gen)
    if outlier:
        x = x + 10.0 * torch.randn(*shape, device=DEV, generator=gen) * (torch.rand(*shape, device=DEV, generator=gen) < 0.001)
    return x.to(dtype)


def accuracy_cases(head_dims):
    """(cases, ids) of the scaled-attention accuracy grid: dtype x head dim x causal x outlier data."""
    cases = [(dt, d, causal, outlier) for dt in (torch.bfloat16, torch.float16) for d in head_dims
             for causal in ("none", "top_left") for outlier in (False, True)]
    ids = [f"{str(c[0])[6:]}-d{c[1]}-{c[2]}-{'outlier' if c[3] else 'normal'}" for c in cases]
    return cases, ids


def check_scaled(dtype, d, causal, outlier, kernel=tp):
    """softmax(q·kᵀ/√d)·v on fresh data (B=2, H=4, S=1031), forward and backward, by the 2x rule."""
    gen = torch.Generator(device=DEV).manual_seed(d)
    q, k, v = (randn(2, 4, 1031, d, outlier=outlier, dtype=dtype, gen=gen) for _ in range(3))
    attend_and_check(q, k, v, [], ScoreProgram(("mul", S, C(d ** -0.5)), causal=causal), kernel=kernel)

