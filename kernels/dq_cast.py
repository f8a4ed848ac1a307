"""dQ out of the warp-specialized backward's fp32 accumulator: one pass that casts to the input dtype and, for
programs with empty_row="nan", writes NaN on the rows whose log-sum-exp is -inf (no visible key), as eager does.

Schedule: one program per (BLOCK rows, head, batch); it reads the rows of the padded accumulator once and
writes dq once; no other work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launcher

BLOCK = 32


@triton.jit(do_not_specialize=["sq", "sq_pad", "slb", "slh"])
def _dq_cast(ACC, LSE, DQ, sq, sq_pad, slb, slh, slm, sdb, sdh, sdm, D: tl.constexpr, BLOCK: tl.constexpr,
             NAN_ROWS: tl.constexpr):
    pid = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    h = tl.num_programs(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, D)
    ok = rows < sq
    acc = tl.load(ACC + ((off_b * h + off_h) * sq_pad + rows[:, None]) * D + cols[None, :], mask=ok[:, None],
                  other=0.0)
    if NAN_ROWS:
        lse = tl.load(LSE + off_b * slb + off_h * slh + rows * slm, mask=ok, other=0.0)
        acc = tl.where((lse == float("-inf"))[:, None], float("nan"), acc)
    tl.store(DQ + off_b * sdb + off_h * sdh + rows[:, None] * sdm + cols[None, :], acc.to(DQ.dtype.element_ty),
             mask=ok[:, None])


def cast_fixed(dq: torch.Tensor, acc: torch.Tensor, lse: torch.Tensor, nan_rows: bool) -> tuple:
    """(grid, integer arguments after (acc, lse, dq), kwargs) of the cast: what the layouts alone decide."""
    b, h, sq, d = dq.shape
    return ((triton.cdiv(sq, BLOCK), h, b), (sq, acc.shape[2], *lse.stride(), *dq.stride()[:3]),
            dict(D=d, BLOCK=BLOCK, NAN_ROWS=nan_rows))


def cast_into(dq: torch.Tensor, acc: torch.Tensor, lse: torch.Tensor, nan_rows: bool, key: tuple) -> None:
    """dq (B, H, Sq, D) with a unit last stride <- acc (B, H, Sq padded, D) contiguous fp32; key: the caller's
    launch key (it pins every shape, stride and dtype here)."""
    grid, ints, kwargs = cast_fixed(dq, acc, lse, nan_rows)
    launcher.launch(key + ("dq_cast", nan_rows), _dq_cast, grid, (acc, lse, dq, *ints), kwargs)
