"""The one-launch helpers around the forward kernels on a CUDA GPU: kernels/mask_tiles.py's tile lists bit for bit
equal to the multi-op oracle (tests/tile_lists_oracle.py) at the Hopper forward's tiles, on long key axes
(several compaction chunks: the scratch's barriers on real threads), and kernels/uniform_fill.py against
reference.uniform_fill; each is one launch, started directly from the second call on (launcher.py), and no
device sync. Skipped without a CUDA GPU.

    pytest -q tests/gpu/test_prepass_gpu.py
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import hopper, launcher, mask_tiles, reference
from fa3_inductor.kernels import uniform_fill as uf
from tile_lists_oracle import float_mask, oracle_tile_lists, random_visibility  # tests/, on sys.path

DEV = "cuda"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _poisoned(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, 77 if dtype == torch.int8 else -12345, dtype=dtype, device=device)
    monkeypatch.setattr(mask_tiles, "_empty", poisoned)


CASES = [
    # mask dtype (or bool), fill, full (B, H, Sq, Sk), mask shape broadcast ("h": one head), head dim -> BLOCK_N
    ("bool", None, (2, 4, 1000, 1500), "h", 128),
    (torch.float32, "-inf", (2, 4, 777, 1029), "", 128),
    (torch.bfloat16, "finfo.min", (3, 2, 512, 512), "h", 256),
    (torch.float16, "-inf", (1, 8, 300, 40000), "h", 128),       # 313 key blocks: three compaction chunks
    (torch.float32, "finfo.min", (1, 1, 4096, 20000), "", 256),  # 313 key blocks of 64
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind,fill,full,bcast,d", CASES,
                         ids=[f"{str(c[0]).replace('torch.', '')}-{c[1]}-{'x'.join(map(str, c[2]))}-{c[3]}-d{c[4]}"
                              for c in CASES])
def test_tile_lists_match_the_oracle_on_gpu(kind, fill, full, bcast, d, seed):
    b, h, sq, sk = full
    bm, bn = 2 * hopper.BLOCK_M, hopper.config(d, d)[0]
    gen = torch.Generator().manual_seed(seed + sk)
    vis = random_visibility(gen, (b, 1 if "h" in bcast else h, sq, sk), bm, bn)
    mask, plan = (vis, "bool") if kind == "bool" else (float_mask(gen, vis, kind, fill, bm, bn), "add")
    mask = mask.to(DEV)
    got = mask_tiles.tile_lists(mask, plan, full, bm, bn)
    want = oracle_tile_lists(mask, plan, full, bm, bn)
    for name, g, w in zip(("idx", "cls", "count"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w), f"{name} differs at {(g != w).nonzero()[:5].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hkv,sq,sk,dv", [(8, 2, 1000, 3000, 128), (4, 4, 130, 77, 64), (2, 1, 64, 50000, 256)])
def test_uniform_fill_matches_reference_on_gpu(dtype, hq, hkv, sq, sk, dv):
    gen = torch.Generator().manual_seed(sq + sk)
    b = 2
    out = torch.randn(b, hq, sq, dv, generator=gen).to(dtype).to(DEV)
    v = torch.randn(b, hkv, sk, dv, generator=gen).to(dtype).to(DEV)
    lse = torch.randn(b, hq, sq, generator=gen)
    empty = torch.zeros(b, hq, sq, dtype=torch.bool)
    empty[1, :, :min(sq, 200)] = True                       # left padding of batch 1
    empty[0] = torch.rand(hq, sq, generator=gen) < 0.01
    lse = lse.masked_fill(empty, -math.inf).to(DEV)
    empty = empty.to(DEV)
    before = out.clone()
    want = reference.uniform_fill(out.clone(), lse, v)
    assert uf.uniform_fill(out, lse, v) is out
    assert torch.equal(out[~empty], before[~empty])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, want, **tol)


def test_uniform_fill_with_no_empty_row_is_capturable():
    """No row empty: the launch leaves out untouched; the fill records into a CUDA graph (no host sync)."""
    out = torch.randn(2, 4, 512, 128, device=DEV, dtype=torch.float16)
    lse = torch.randn(2, 4, 512, device=DEV)
    v = torch.randn(2, 2, 512, 128, device=DEV, dtype=torch.float16)
    before = out.clone()
    uf.uniform_fill(out, lse, v)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        uf.uniform_fill(out, lse, v)
    lse[0, 1, 7] = -math.inf
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[lse != -math.inf], before[lse != -math.inf])
    torch.testing.assert_close(out[0, 1, 7], v[0, 0].float().mean(0).half(), atol=1e-3, rtol=1e-3)


def test_second_calls_launch_directly():
    """Both go through launcher.launch with keys it accepts: after one call, the compiled kernel is cached."""
    mask = torch.rand(2, 1, 300, 700, device=DEV) > 0.2
    for _ in range(2):
        mask_tiles.tile_lists(mask, "bool", (2, 4, 300, 700), 128, 128)
    out, lse = torch.randn(1, 4, 300, 64, device=DEV, dtype=torch.bfloat16), torch.randn(1, 4, 300, device=DEV)
    v = torch.randn(1, 2, 700, 64, device=DEV, dtype=torch.bfloat16)
    for _ in range(2):
        uf.uniform_fill(out, lse, v)
    names = {k[0] for k in launcher._COMPILED}
    assert {"tile_lists", "uniform_fill"} <= names, names
