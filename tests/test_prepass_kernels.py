"""The one-launch helpers around the forward kernels, on CPU through TRITON_INTERPRET=1:

- kernels/mask_tiles.py `tile_lists`: bit for bit the output of the multi-op implementation it replaced
  (tests/tile_lists_oracle.py: a classify kernel then torch ops), on random bool and float masks;
- kernels/uniform_fill.py: the in-place mean-of-v fill of empty rows, against reference.uniform_fill.

Runs in its own process with TRITON_INTERPRET=1 from the start (tests/test_interpreter_process.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fa3_inductor.kernels import mask_tiles, reference
from fa3_inductor.kernels.uniform_fill import uniform_fill
from tile_lists_oracle import float_mask, oracle_tile_lists, random_visibility  # tests/, on sys.path

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 from process start; run by test_interpreter_process.py")


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    """Outputs start as values the kernel never writes, so an entry it skips shows up."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, 77 if dtype == torch.int8 else -12345, dtype=dtype, device=device)
    monkeypatch.setattr(mask_tiles, "_empty", poisoned)


CASES = [
    # kind (bool or float dtype, fill), full (B, H, Sq, Sk), mask dims broadcast (b, h, rows), block_m, block_n
    ("bool", None, (2, 1, 70, 90), "", 16, 32),
    ("bool", None, (3, 2, 33, 17), "h", 8, 16),
    (torch.float32, "-inf", (2, 3, 40, 70), "h", 16, 16),
    (torch.float32, "finfo.min", (1, 2, 64, 64), "", 16, 32),
    (torch.float32, "-1.7e38", (2, 2, 23, 41), "b", 8, 8),
    (torch.float32, "-1e9", (2, 1, 30, 30), "", 8, 16),     # -1e9 hides nothing: no tile is skipped
    (torch.bfloat16, "finfo.min", (2, 2, 50, 37), "", 16, 16),
    (torch.float16, "finfo.min", (1, 1, 40, 40), "", 16, 16),  # fp16 min (-65504) hides nothing either
    (torch.float16, "-inf", (2, 2, 45, 63), "bh", 16, 8),
    (torch.float64, "-inf", (1, 2, 20, 50), "", 8, 16),
    (torch.float32, "-inf", (2, 1, 1, 200), "", 16, 32),       # one query row
    (torch.float32, "finfo.min", (2, 2, 37, 60), "r", 16, 16),  # a (B, H, 1, Sk) key-padding mask
    ("bool", None, (1, 1, 20, 700), "", 8, 4),                 # 175 key blocks: pass 2 takes two chunks
    (torch.float32, "-inf", (1, 2, 24, 530), "", 8, 2),        # 265 key blocks: three chunks
    (torch.float32, "finfo.min", (2, 1, 150, 300), "", 32, 128),  # key blocks read in four slices
    ("bool", None, (1, 2, 100, 130), "", 64, 64),
]


def _case_mask(gen, kind, fill, full, bcast, bm, bn):
    b, h, sq, sk = full
    shape = (1 if "b" in bcast else b, 1 if "h" in bcast else h, 1 if "r" in bcast else sq, sk)
    vis = random_visibility(gen, shape, bm, bn)
    if kind == "bool":
        return vis, "bool"
    return float_mask(gen, vis, kind, fill, bm, bn), "add"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind,fill,full,bcast,bm,bn", CASES,
                         ids=[f"{str(c[0])[6:] if c[0] != 'bool' else 'bool'}-{c[1]}-{'x'.join(map(str, c[2]))}-{c[3]}"
                              f"-{c[4]}x{c[5]}" for c in CASES])
def test_tile_lists_match_the_oracle(kind, fill, full, bcast, bm, bn, seed):
    gen = torch.Generator().manual_seed(seed * 1000 + full[3])
    mask, plan_kind = _case_mask(gen, kind, fill, full, bcast, bm, bn)
    _check(mask, plan_kind, full, bm, bn)


def _check(mask, kind, full, bm, bn):
    got = mask_tiles.tile_lists(mask, kind, full, bm, bn)
    want = oracle_tile_lists(mask, kind, full, bm, bn)
    for name, g, w in zip(("idx", "cls", "count"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.dtype, w.shape)
        assert torch.equal(g, w), f"{name} differs at {(g != w).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("kind", ["bool", "add"])
def test_tile_lists_edge_masks(kind):
    """All keys hidden (every row block keeps every tile), all keys visible, and a strided mask view."""
    b, h, sq, sk = 2, 2, 37, 45
    for vis in (torch.zeros(b, h, sq, sk, dtype=torch.bool), torch.ones(b, h, sq, sk, dtype=torch.bool)):
        mask = vis if kind == "bool" else torch.where(vis, 0.0, -math.inf)
        _check(mask, kind, (b, h, sq, sk), 16, 16)
    gen = torch.Generator().manual_seed(5)
    vis = random_visibility(gen, (b, sk, h, sq), 16, 16).permute(0, 2, 3, 1)        # keys not contiguous
    mask = vis if kind == "bool" else torch.where(vis, 0.0, torch.finfo(torch.float32).min)
    assert not mask.is_contiguous()
    _check(mask, kind, (b, h, sq, sk), 16, 16)


def test_tile_lists_no_keys():
    got = mask_tiles.tile_lists(torch.ones(1, 1, 20, 0, dtype=torch.bool), "bool", (1, 1, 20, 0), 16, 16)
    assert [tuple(t.shape) for t in got] == [(1, 1, 2, 0), (1, 1, 2, 0), (1, 1, 2)]
    assert torch.equal(got[2], torch.zeros(1, 1, 2, dtype=torch.int32))


# --- uniform fill --------------------------------------------------------------------------------------------

def _fill_case(gen, dtype, b, hq, hkv, sq, sk, dv, empty_rows, strided):
    v = torch.randn(b, sk, hkv, dv, generator=gen).to(dtype).transpose(1, 2) if strided else \
        torch.randn(b, hkv, sk, dv, generator=gen).to(dtype)
    out = torch.randn(b, sq, hq, dv, generator=gen).to(dtype).transpose(1, 2) if strided else \
        torch.randn(b, hq, sq, dv, generator=gen).to(dtype)
    lse = torch.randn(b, hq, sq, generator=gen)
    lse[empty_rows] = -math.inf
    return out, lse, v


FILL_CASES = [
    # dtype, b, hq, hkv, sq, sk, dv, strided
    (torch.float32, 2, 4, 2, 300, 37, 40, False),
    (torch.float16, 1, 4, 1, 200, 1000, 64, True),
    (torch.float16, 2, 2, 2, 17, 5, 256, False),
    (torch.float32, 1, 3, 3, 129, 300, 16, True),
]


@pytest.mark.parametrize("dtype,b,hq,hkv,sq,sk,dv,strided", FILL_CASES,
                         ids=[f"{str(c[0])[6:]}-g{c[2] // c[3]}-{c[4]}x{c[5]}-dv{c[6]}{'-strided' if c[7] else ''}"
                              for c in FILL_CASES])
@pytest.mark.parametrize("pattern", ["none", "prefix", "scattered", "all"])
def test_uniform_fill_matches_reference(dtype, b, hq, hkv, sq, sk, dv, strided, pattern):
    gen = torch.Generator().manual_seed(sq + sk + dv)
    if pattern == "none":
        empty = torch.zeros(b, hq, sq, dtype=torch.bool)
    elif pattern == "prefix":                        # left padding of the last batch element, past a row block
        empty = torch.zeros(b, hq, sq, dtype=torch.bool)
        empty[-1, :, :min(sq, 130)] = True
    elif pattern == "scattered":
        empty = torch.rand(b, hq, sq, generator=gen) < 0.1
    else:
        empty = torch.ones(b, hq, sq, dtype=torch.bool)
    out, lse, v = _fill_case(gen, dtype, b, hq, hkv, sq, sk, dv, empty, strided)
    before = out.clone()
    want = reference.uniform_fill(out.clone(), lse, v)
    got = uniform_fill(out, lse, v)
    assert got is out                                # in place
    assert torch.equal(out[~empty], before[~empty])  # rows with a visible key are not touched
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(out, want, **tol)
    if empty.any():
        assert not torch.equal(out[empty], before[empty])


def test_uniform_fill_no_keys_leaves_out():
    out = torch.randn(1, 2, 10, 8)
    lse = torch.full((1, 2, 10), -math.inf)
    before = out.clone()
    assert torch.equal(uniform_fill(out, lse, torch.empty(1, 1, 0, 8)), before)
    assert torch.equal(reference.uniform_fill(out, lse, torch.empty(1, 1, 0, 8)), before)
