"""empty_row="uniform" after a forward kernel: rows with no visible key (lse = -inf) take the mean of v over all
keys, in place, in one launch that costs almost nothing when no row is empty (the usual case); on the host, no
torch op (UniformFill: after the first call per layout, the compiled kernel is started directly).

Same result as reference.uniform_fill (the torch reference) up to the order of the fp32 summation.
Runs natively on CUDA and on CPU tensors under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launcher
from .loop_bound import bound


@triton.jit
def _uniform_fill(OUT, LSE, V, sob, soh, som, sod, slb, slh, slm, svb, svh, svn, svd, Sq, Sk, Dv, G,
                  BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (row block, q head, batch). It loads its BLOCK_M lse values and stops there unless
    one is -inf; then it sums v[b, h // G] over all keys (BLOCK_N x BLOCK_D fp32 partial sums, head dim
    contiguous: coalesced), divides by Sk and writes the mean into the empty rows, SUB_M rows at a time.
    Each program that holds an empty row reads its kv head's V once: left padding empties a prefix of rows,
    so that is a few row blocks per (batch, head)."""
    mb = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    lse_ptr = LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    lse = tl.load(lse_ptr + rows * slm, mask=rows < Sq, other=0.0)
    if tl.max((lse == float("-inf")).to(tl.int32), 0) == 1:
        d = tl.arange(0, BLOCK_D)
        d_in = d < Dv
        keys = tl.arange(0, BLOCK_N)
        v_ptr = V + b.to(tl.int64) * svb + (h // G).to(tl.int64) * svh + d[None, :] * svd
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for n0 in range(0, bound(Sk), BLOCK_N):
            n = n0 + keys
            acc += tl.load(v_ptr + n[:, None].to(tl.int64) * svn, mask=(n < Sk)[:, None] & d_in[None, :],
                           other=0.0).to(tl.float32)
        mean = (tl.sum(acc, 0) / Sk).to(OUT.dtype.element_ty)
        out_ptr = OUT + b.to(tl.int64) * sob + h.to(tl.int64) * soh + d[None, :] * sod
        for r0 in range(0, BLOCK_M, SUB_M):
            r = mb * BLOCK_M + r0 + tl.arange(0, SUB_M)
            empty = tl.load(lse_ptr + r * slm, mask=r < Sq, other=0.0) == float("-inf")
            tl.store(out_ptr + r[:, None].to(tl.int64) * som, tl.broadcast_to(mean[None, :], (SUB_M, BLOCK_D)),
                     mask=empty[:, None] & d_in[None, :])


BLOCK_M = 128       # lse rows checked per program


class UniformFill:
    """The fill for one layout of (out, lse, v) (shapes, strides, dtypes, alignment): grid, integer arguments and
    tiles fixed once, so a call is one launch. Holds no tensors."""

    def __init__(self, out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor):
        b, hq, sq, dv = out.shape
        sk = v.shape[2]
        block_d = triton.next_power_of_2(dv)
        self.grid = (-(-sq // BLOCK_M), hq, b)
        self.ints = (*out.stride(), *lse.stride(), *v.stride(), sq, sk, dv, hq // v.shape[1])
        self.kwargs = dict(BLOCK_M=BLOCK_M, SUB_M=max(1, min(BLOCK_M, 2048 // block_d)),
                           BLOCK_N=max(1, 4096 // block_d), BLOCK_D=block_d, num_warps=4)
        empty = sk == 0 or out.numel() == 0     # Sk = 0 leaves out as it is
        key = ("uniform_fill", out.device.index, launcher.call_key((out, lse, v)))
        self.site = None if empty else launcher.Site(key)

    def __call__(self, out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.site is not None:
            self.site(_uniform_fill, self.grid, (out, lse, v, *self.ints), self.kwargs)
        return out


_PLANS: dict = {}


def uniform_fill(out: torch.Tensor, lse: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """out (B, Hq, Sq, Dv), lse (B, Hq, Sq) fp32, v (B, Hkv, Sk, Dv): rows with lse = -inf get the mean of
    v[:, h // (Hq // Hkv)] over keys, written into out in place; returns out. Sk = 0 leaves out as it is.
    A caller with its own plan keeps the UniformFill object instead of looking it up here."""
    key = (out.device.index, launcher.call_key((out, lse, v)))
    fill = _PLANS.get(key)
    if fill is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        fill = _PLANS[key] = UniformFill(out, lse, v)
    return fill(out, lse, v)
