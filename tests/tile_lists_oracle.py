"""The dense-mask tile lists as kernels/mask_tiles.py computed them before its one-launch kernel (a classify kernel,
then torch ops): the oracle the new kernel must match bit for bit (tests/test_prepass_kernels.py under the
interpreter, tests/gpu/test_prepass_gpu.py on CUDA); and the random masks both tests feed it."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fa3_inductor.kernels import mask_tiles


@triton.jit
def _classify(M, CLS, ROWVIS, smb, smh, smm, smn, Sq, Sk, Hm, n_blocks_n,
              BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
        visible = m > -1.7e38
        neutral = m == 0.0
    all_neutral = tl.min(tl.where(inb, neutral, True).to(tl.int32)) == 1
    any_visible = tl.max((inb & visible).to(tl.int32)) == 1
    cls = tl.where(all_neutral, 1, tl.where(any_visible, 0, 2))
    tl.store(CLS + (bh * tl.num_programs(1) + mb) * n_blocks_n + nb, cls.to(tl.int8))
    row_vis = tl.max((inb & visible).to(tl.int32), 1)
    tl.atomic_max(ROWVIS + bh * Sq + rows, row_vis, mask=rows < Sq)


def oracle_tile_lists(mask, kind, full, block_m, block_n):
    """(idx, cls, count) as mask_tiles.tile_lists returned them before its one-launch kernel."""
    b, h, sq, sk = full
    bm = 1 if mask.shape[0] == 1 else b
    hm = 1 if mask.shape[1] == 1 else h
    m = mask.expand(bm, hm, sq, sk)
    mb, nb = triton.cdiv(sq, block_m), triton.cdiv(sk, block_n)
    cls = torch.empty(bm * hm, mb, nb, dtype=torch.int8, device=mask.device)
    rowvis = torch.zeros(bm * hm, sq, dtype=torch.int32, device=mask.device)
    if nb:
        _classify[(bm * hm, mb, nb)](m, cls, rowvis, *m.stride(), sq, sk, hm, nb, BOOL=kind == "bool",
                                     BLOCK_M=block_m, BLOCK_N=block_n)
    pad = mb * block_m - sq
    rows_ok = torch.nn.functional.pad(rowvis, (0, pad), value=1).view(bm * hm, mb, block_m).amin(-1) > 0
    skip = (cls == 2) & rows_ok[..., None]
    keep = ~skip
    order = torch.argsort(skip.to(torch.int8), dim=-1, stable=True)
    idx = order.to(torch.int32)
    cls_sorted = torch.gather(cls, -1, order)
    cls_sorted = torch.where(cls_sorted == 2, mask_tiles.MIXED, cls_sorted).to(torch.int8)
    count = keep.sum(-1, dtype=torch.int32)
    return (idx.view(bm, hm, mb, nb), cls_sorted.view(bm, hm, mb, nb), count.view(bm, hm, mb))


def random_visibility(gen, shape, bm, bn):
    """Bool (B, H, Sq, Sk): tiles all visible, all hidden or random, a causal band, key padding, and rows
    with no visible key at all."""
    b, h, sq, sk = shape
    nmb, nnb = -(-sq // bm), -(-sk // bn)
    kind = torch.randint(0, 3, (b, h, nmb, nnb), generator=gen)
    tile = kind.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :sq, :sk]
    vis = torch.where(tile == 0, True, torch.where(tile == 1, False, torch.rand(shape, generator=gen) > 0.5))
    if torch.rand((), generator=gen) < 0.5:
        off = int(torch.randint(-sq, sk, (), generator=gen))
        vis &= torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + off
    pad = torch.randint(1, sk + 1, (b,), generator=gen)
    vis &= (torch.arange(sk)[None, :] < pad[:, None]).view(b, 1, 1, sk)
    # a third of the row blocks hold a row with no visible key (then they skip nothing)
    row = torch.arange(nmb) * bm + torch.randint(0, bm, (b, h, nmb), generator=gen)
    empty = torch.zeros(b, h, nmb * bm, dtype=torch.bool)
    empty.scatter_(2, row, torch.rand(b, h, nmb, generator=gen) < 0.3)
    return vis & ~empty[..., :sq, None]


FILLS = {"-inf": -math.inf, "finfo.min": None, "-1.7e38": -1.7e38, "-1e9": -1e9}


def float_mask(gen, vis, dtype, fill, bm, bn):
    """An additive mask in dtype: 0 or a random bias (some tiles) where vis, the fill elsewhere."""
    hide = torch.finfo(dtype).min if fill == "finfo.min" else FILLS[fill]
    b, h, sq, sk = vis.shape
    biased = torch.rand(b, h, -(-sq // bm), -(-sk // bn), generator=gen) < 0.15     # some tiles carry a bias
    biased = biased.repeat_interleave(bm, 2).repeat_interleave(bn, 3)[:, :, :sq, :sk]
    m = torch.where(biased, torch.randn(vis.shape, generator=gen), 0.0)
    m[..., :1, :1] = -1e38                          # visible (above HIDE), not neutral
    return torch.where(vis, m.to(dtype), torch.tensor(hide, dtype=dtype))
