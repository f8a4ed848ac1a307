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

from . import launcher
from .loop_bound import bound
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
def _tile_lists(M, IDX, CLS, CNT, smb, smh, smm, smn, Sq, Sk, Hm, n_blocks_m, n_blocks_n,
                BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
                CHUNK: tl.constexpr):
    """The whole pre-pass in one launch: one program per (mask batch*head, row block), writing that row
    block's idx / cls row and its count.

    Pass 1 walks the key blocks in order and reads each BLOCK_M x BLOCK_N tile of M once, in BLOCK_M x SUB_N
    slices (keys contiguous across a warp: coalesced; the slices of a tile are independent loads, in flight
    together). It stores the tile's class into the row block's own CLS row (scratch until pass 2) and ORs
    each row's "has a visible key" into registers; at the end the row-emptiness rule gives the count.
    Pass 2 reads the classes back CHUNK at a time and scatters them with prefix sums: kept tiles first in
    key order, then the skipped ones, so idx stays a permutation (their cls is MIXED and never read). A
    kept tile lands at a position <= its own, so pass 2 never overwrites a class it has yet to read;
    barriers order the scratch's writes and reads across the program's threads, and it is read through L2
    (.cg), never from a stale L1 line.

    Cost: M is read once (the bytes the forward would load for it) and 6 bytes are written per tile; the
    work is memory-bound and spread over Bm*Hm*Mb programs (fewer than the SMs leave bandwidth unused: a
    B=1, 8k-query mask has 64 row blocks). On the host: three torch.empty and one launch (TileLists: after
    the first call per mask layout, the compiled kernel is started directly).
    """
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    b = bh // Hm
    h = bh % Hm
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rows < Sq
    row_ptr = M + b.to(tl.int64) * smb + h.to(tl.int64) * smh + rows[:, None].to(tl.int64) * smm
    row_list = (bh.to(tl.int64) * n_blocks_m + mb) * n_blocks_n
    row_vis = tl.zeros([BLOCK_M, SUB_N], dtype=tl.int1)
    n_hidden = 0
    for nb in range(0, bound(n_blocks_n)):
        # the tile in BLOCK_M x SUB_N slices (fewer live registers), OR-ed element-wise, reduced once
        tile_vis = tl.zeros([BLOCK_M, SUB_N], dtype=tl.int1)
        tile_not_neutral = tl.zeros([BLOCK_M, SUB_N], dtype=tl.int1)
        for s in tl.static_range(BLOCK_N // SUB_N):
            cols = nb * BLOCK_N + s * SUB_N + tl.arange(0, SUB_N)
            inb = row_in[:, None] & (cols[None, :] < Sk)
            ptr = row_ptr + cols[None, :].to(tl.int64) * smn
            if BOOL:
                m = tl.load(ptr, mask=inb, other=0).to(tl.int1)
                visible = m
                neutral = m
            else:
                m = tl.load(ptr, mask=inb, other=0.0).to(tl.float32)
                visible = m > -1.7e38   # HIDE
                neutral = m == 0.0
            tile_vis = tile_vis | (inb & visible)
            tile_not_neutral = tile_not_neutral | (inb & (neutral == 0))
        any_visible = tl.max(tile_vis.to(tl.int32)) == 1
        all_neutral = tl.max(tile_not_neutral.to(tl.int32)) == 0
        cls = tl.where(all_neutral, 1, tl.where(any_visible, 0, 2))
        tl.store(CLS + row_list + nb, cls.to(tl.int8))
        n_hidden += (cls == 2).to(tl.int32)
        row_vis = row_vis | tile_vis
    # rows past Sq count as having a visible key
    rows_ok = (tl.min(tl.where(row_in, tl.max(row_vis.to(tl.int32), 1), 1)) == 1).to(tl.int32)
    count = n_blocks_n - n_hidden * rows_ok
    tl.store(CNT + bh.to(tl.int64) * n_blocks_m + mb, count)
    tl.debug_barrier()
    kept_before = 0
    skipped_before = 0
    for j0 in range(0, bound(n_blocks_n), CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        j_in = j < n_blocks_n
        c = tl.load(CLS + row_list + j, mask=j_in, other=0, cache_modifier=".cg")
        tl.debug_barrier()
        skip = ((c == 2) & j_in).to(tl.int32) * rows_ok
        keep = j_in.to(tl.int32) - skip
        pos = tl.where(keep == 1, kept_before + tl.cumsum(keep, 0) - keep,
                       count + skipped_before + tl.cumsum(skip, 0) - skip)
        tl.store(IDX + row_list + pos, j, mask=j_in)
        tl.store(CLS + row_list + pos, tl.where(c == 2, 0, c).to(tl.int8), mask=keep == 1)
        kept_before += tl.sum(keep, 0)
        skipped_before += tl.sum(skip, 0)
    for j0 in range(0, bound(n_blocks_n), CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        tl.store(CLS + row_list + j, tl.zeros([CHUNK], dtype=tl.int8), mask=(j >= count) & (j < n_blocks_n))


def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests replace it with a poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


class TileLists:
    """The pre-pass for one mask layout (shape, strides, dtype, alignment), expansion and tiles: everything but
    the mask's data is fixed here once, so a call is three allocations and one launch. Holds no tensors."""

    def __init__(self, mask: torch.Tensor, kind: str, full: tuple, block_m: int, block_n: int):
        b, h, sq, sk = full
        bm = 1 if mask.shape[0] == 1 else b
        hm = 1 if mask.shape[1] == 1 else h
        mb, nb = -(-sq // block_m), -(-sk // block_n)
        self.shape, self.count_shape = (bm, hm, mb, nb), (bm, hm, mb)
        self.device = mask.device
        self.grid = (bm * hm, mb)
        # the expanded mask's strides: the kernel reads the mask itself through them (no expand per call)
        self.ints = (*mask.expand(bm, hm, sq, sk).stride(), sq, sk, hm, mb, nb)
        self.kwargs = dict(BOOL=kind == "bool", BLOCK_M=block_m, BLOCK_N=block_n, SUB_N=min(block_n, 32),
                           CHUNK=_CHUNK, num_warps=8 if block_m * block_n >= 8192 else 4)
        key = ("tile_lists", mask.device.index, launcher.call_key((mask,)), full, kind, block_m, block_n)
        self.site = launcher.Site(key) if mb else None

    def __call__(self, mask: torch.Tensor):
        dev = self.device
        idx = _empty(self.shape, torch.int32, dev)
        cls = _empty(self.shape, torch.int8, dev)
        count = _empty(self.count_shape, torch.int32, dev)
        if self.site is not None:
            self.site(_tile_lists, self.grid, (mask, idx, cls, count, *self.ints), self.kwargs)
        return idx, cls, count


_PLANS: dict = {}


def tile_lists(mask: torch.Tensor, kind: str, full: tuple, block_m: int, block_n: int):
    """(idx int32 (Bm, Hm, Mb, Nb), cls int8 (same), count int32 (Bm, Hm, Mb)) for the mask expanded to
    full = (B, H, Sq, Sk); Bm / Hm are 1 where the mask broadcasts. Per row block: the count kept key
    blocks in key order, then the skipped ones (cls MIXED past count: unused). One launch (_tile_lists);
    a caller with its own plan keeps the TileLists object instead of looking it up here."""
    key = (mask.device.index, launcher.call_key((mask,)), tuple(full), kind, block_m, block_n)
    lists = _PLANS.get(key)
    if lists is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        lists = _PLANS[key] = TileLists(mask, kind, tuple(full), block_m, block_n)
    return lists(mask)


_CHUNK = 128    # classes compacted per step of pass 2 (a row block of a 16k-key mask has 128 to 256)
