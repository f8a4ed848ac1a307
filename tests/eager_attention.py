"""Unfused eager attention of a ScoreProgram in any dtype and on any device: what the user's graph computes,
the comparison point of the kernel tests (CPU interpreter and GPU)."""

from __future__ import annotations

import math

import torch

from fa3_inductor.kernels import reference
from fa3_inductor.kernels.program import unmasked


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



def eager(q, k, v, ops, prog, dtype, softmax_fp32=False):
    """softmax(program(q·kᵀ)) · v the unfused eager way in `dtype`, with the program's empty-row rule;
    softmax_fp32: the softmax in fp32 and back to `dtype` (the HF models' spelling)."""
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
        xs = x.masked_fill(empty, 0.0)
        p = (torch.softmax(xs.float(), -1).to(dtype) if softmax_fp32 else torch.softmax(xs, -1)).masked_fill(empty, 0.0)
    else:
        p = torch.softmax(x.float(), -1).to(dtype) if softmax_fp32 else torch.softmax(x, -1)
    return p @ vv
