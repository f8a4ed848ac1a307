"""Tile classification of a dense mask operand known only at run time (an additive mask or a boolean mask).

For programs of the form  x = f(s) + M  (M float) or  x = where(M, f(s), c ≤ -1.7e38)  the kernels need not
read M everywhere: a pre-pass reads M once and sorts every (row block, key block) tile into

    neutral  every entry leaves x = f(s) (0.0 added / True)          -> no mask load in the kernel
    hidden   every entry hides the score (≤ -1.7e38 added / False)   -> the tile is skipped entirely
    mixed    anything else                                           -> the kernel loads M for the tile

Skipping a hidden tile is exact when each of its rows has a visible key somewhere (then exp(x - max) of a
hidden entry underflows to exactly 0, and the row maximum comes from the visible keys). A row with no visible
key is the eager "uniform over all keys" case, so row blocks holding such a row keep every tile. The pre-pass
writes, per (mask batch, mask head, row block), the list of key blocks to visit and their classes; kernels
iterate over that list. Works for masks broadcast over batch / heads / rows (their strides are 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .program import ScoreProgram

HIDE = -1.7e38      # additive values at or below this hide a score exactly (x + max stays below fp32 exp range)
MIXED, NEUTRAL = 0, 1


def plan(prog: ScoreProgram, kinds) -> tuple[int, str] | None:
    """(operand index, 'add' | 'bool') when the program's mask operand can be tile-classified, else None.
    kinds: per operand 'bool' or 'float'."""
    e = prog.expr

    def uses(x, n):
        if x == ("operand", n):
            return True
        return isinstance(x, tuple) and any(uses(a, n) for a in x[1:] if isinstance(a, tuple))

    if prog.operand_grad and any(prog.operand_grad):
        return None
    if e[0] == "add":
        for m, f in ((e[2], e[1]), (e[1], e[2])):
            if m[0] == "operand" and not uses(f, m[1]) and kinds[m[1]] == "float":
                return m[1], "add"
    if e[0] == "where" and e[1][0] == "operand" and e[3][0] == "const" and e[3][1] <= HIDE:
        n = e[1][1]
        if kinds[n] == "bool" and not uses(e[2], n):
            return n, "bool"
    return None


def neutral_program_expr(prog: ScoreProgram, n: int, kind: str):
    """The score expression on a neutral tile (the mask operand at its neutral value)."""
    e = prog.expr
    if kind == "add":
        return e[1] if e[2] == ("operand", n) else e[2]
    return e[2]


@triton.jit
def _classify(M, CLS, ROWVIS, smb, smh, smm, smn, Sq, Sk, Hm, n_blocks_n,
              BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (mask batch*head, row block, key block): class of the tile, and for each row whether
    this tile holds a visible key (atomic max into ROWVIS)."""
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    nb = tl.program_id(2)
    b = bh // Hm
    h = bh % Hm
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    inb = (rows[:, None] < Sq) & (cols[None, :] < Sk)
    ptr = M + b.to(tl.int64) * smb + h.to(tl.int64) * smh + rows[:, None].to(tl.int64) * smm + cols[None, :] * smn
    if BOOL:
        m = tl.load(ptr, mask=inb, other=0).to(tl.int1)
        visible = m
        neutral = m
    else:
        m = tl.load(ptr, mask=inb, other=0.0).to(tl.float32)
        visible = m > -1.7e38   # HIDE
        neutral = m == 0.0
    all_neutral = tl.min(tl.where(inb, neutral, True).to(tl.int32)) == 1
    any_visible = tl.max((inb & visible).to(tl.int32)) == 1
    cls = tl.where(all_neutral, 1, tl.where(any_visible, 0, 2))
    tl.store(CLS + (bh * tl.num_programs(1) + mb) * n_blocks_n + nb, cls.to(tl.int8))
    row_vis = tl.max((inb & visible).to(tl.int32), 1)
    tl.atomic_max(ROWVIS + bh * Sq + rows, row_vis, mask=rows < Sq)


def tile_lists(mask: torch.Tensor, kind: str, full: tuple, block_m: int, block_n: int):
    """(idx int32 (Bm, Hm, Mb, Nb), cls int8 (same), count int32 (Bm, Hm, Mb)) for the mask expanded to
    full = (B, H, Sq, Sk); Bm / Hm are 1 where the mask broadcasts. Entries past count are unused."""
    b, h, sq, sk = full
    bm = 1 if mask.shape[0] == 1 else b
    hm = 1 if mask.shape[1] == 1 else h
    m = mask.expand(bm, hm, sq, sk)
    mb, nb = triton.cdiv(sq, block_m), triton.cdiv(sk, block_n)
    cls = torch.empty(bm * hm, mb, nb, dtype=torch.int8, device=mask.device)
    rowvis = torch.zeros(bm * hm, sq, dtype=torch.int32, device=mask.device)
    _classify[(bm * hm, mb, nb)](m, cls, rowvis, *m.stride(), sq, sk, hm, nb, BOOL=kind == "bool",
                                 BLOCK_M=block_m, BLOCK_N=block_n)
    # rows past Sq count as having a visible key
    pad = mb * block_m - sq
    rows_ok = torch.nn.functional.pad(rowvis, (0, pad), value=1).view(bm * hm, mb, block_m).amin(-1) > 0
    skip = (cls == 2) & rows_ok[..., None]
    keep = ~skip
    order = torch.argsort(skip.to(torch.int8), dim=-1, stable=True)     # kept blocks first, in key order
    idx = order.to(torch.int32)
    cls_sorted = torch.gather(cls, -1, order)
    cls_sorted = torch.where(cls_sorted == 2, MIXED, cls_sorted).to(torch.int8)   # kept hidden tiles: mixed
    count = keep.sum(-1, dtype=torch.int32)
    return (idx.view(bm, hm, mb, nb), cls_sorted.view(bm, hm, mb, nb), count.view(bm, hm, mb))
