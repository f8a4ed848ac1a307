"""Accuracy harness shared by the GPU kernel tests: unfused eager attention in the test dtype and in fp64, and
FlashAttention's rule (error vs fp64 <= 2x eager's error in the same dtype, plus an absolute guard)."""

from __future__ import annotations

import math

import torch

from fa3_inductor.kernels import reference
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import unmasked

S = ("score",)
DEV = "cuda"


def C(x):
    return ("const", float(x))


def _ev(e, s, ops, i, j):
    op = e[0]
    if op == "score":
        return s
    if op == "const":
        return torch.tensor(float(e[1]), dtype=s.dtype, device=s.device)
    if op == "operand":
        t = ops[e[1]]
        return t if t.dtype == torch.bool else t.to(s.dtype)
    if op == "q_idx":
        return i
    if op == "k_idx":
        return j
    a = [_ev(x, s, ops, i, j) for x in e[1:]]
    if op == "where":
        return torch.where(a[0].bool(), a[1], a[2])
    if len(a) == 1:
        return reference._unary(op, a[0])
    return reference._BINARY[op](a[0], a[1])


def eager(q, k, v, ops, prog, dtype):
    """Unfused eager attention in `dtype` (what the user's graph computes), with the empty-row rule."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ops = [t if t.dtype == torch.bool else t.to(dtype) for t in ops]
    g = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ kk.transpose(-1, -2)
    sq, sk = s.shape[-2:]
    i = torch.arange(sq, dtype=dtype, device=q.device).view(-1, 1)
    j = torch.arange(sk, dtype=dtype, device=q.device).view(1, -1)
    x = _ev(prog.expr, s, ops, i, j).expand_as(s)
    vis = reference.structural_mask(prog, 0, sq, sq, sk, q.device)
    if vis is not None:
        x = x.masked_fill(~vis, -math.inf)
    if prog.empty_row == "uniform":   # what the program stands for: eager's y + where(visible, 0, finfo.min)
        y = _ev(unmasked(prog.expr), s, ops, i, j).expand_as(s)
        x = y + torch.where(x != -math.inf, torch.zeros_like(x), torch.full_like(x, torch.finfo(dtype).min))
    if prog.empty_row == "zero":
        empty = (x == -math.inf).all(-1, keepdim=True)
        p = torch.softmax(x.masked_fill(empty, 0.0).float(), -1).to(dtype).masked_fill(empty, 0.0)
    else:
        p = torch.softmax(x.float(), -1).to(dtype)   # HF style: softmax in fp32, back to the dtype
    return p @ vv


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


