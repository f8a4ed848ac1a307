"""The one-launch helpers (kernels/mask_tiles.py tile lists, kernels/uniform_fill.py) compiled for sm_90a without a
GPU, with the launch arguments their public functions pass: they compile outside the interpreter (which
tests/test_prepass_kernels.py runs them in), keep within registers at the Hopper forward's tiles, and the
tile-list scratch is read through L2 as its kernel's docstring claims. Their numbers are checked by
tests/test_prepass_kernels.py (interpreter) and tests/gpu/test_prepass_gpu.py."""

from __future__ import annotations

import pytest
import torch

from fa3_inductor.kernels import hopper, mask_tiles
from fa3_inductor.kernels import uniform_fill as uf

try:
    from sm90_cross_compile import compile_triton_sm90, sass_facts
    _HAVE = True
except Exception:   # pragma: no cover - depends on the Triton build
    _HAVE = False

pytestmark = pytest.mark.skipif(not _HAVE, reason="Triton without the NVIDIA backend")


class _Capture:
    """Stands in for a kernel: records the arguments of `kernel[grid](*args, **kwargs)`."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _captured(monkeypatch, module, name, run):
    cap = _Capture()
    monkeypatch.setattr(module, name, cap)
    run()
    assert len(cap.calls) == 1, "one launch"
    return cap.calls[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool])
@pytest.mark.parametrize("d", [128, 256])
def test_tile_lists_compile_without_spills(monkeypatch, dtype, d):
    b, sq, sk = 2, 1024, 2048
    mask = torch.zeros(b, 1, sq, sk, dtype=dtype)
    block_n = hopper.config(d, d)[0]
    kind = "bool" if dtype == torch.bool else "add"
    _, args, kwargs = _captured(monkeypatch, mask_tiles, "_tile_lists",
                                lambda: mask_tiles.tile_lists(mask, kind, (b, 8, sq, sk), 2 * hopper.BLOCK_M, block_n))
    monkeypatch.undo()
    compiled = compile_triton_sm90(mask_tiles._tile_lists, *args, **kwargs)
    facts = sass_facts(compiled)
    # ptxas may park a loop-invariant value in local memory (2 ops); spilling tiles costs tens to thousands
    assert facts["local_ops"] <= 2, facts
    assert "ld.global.cg" in compiled.asm["ptx"], "pass 2 reads the class scratch through L2"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dv", [64, 96, 256])
def test_uniform_fill_compiles_without_spills(monkeypatch, dtype, dv):
    out, lse = torch.empty(2, 8, 512, dv, dtype=dtype), torch.empty(2, 8, 512)
    v = torch.empty(2, 2, 512, dv, dtype=dtype)
    _, args, kwargs = _captured(monkeypatch, uf, "_uniform_fill", lambda: uf.uniform_fill(out, lse, v))
    monkeypatch.undo()
    facts = sass_facts(compile_triton_sm90(uf._uniform_fill, *args, **kwargs))
    assert facts["local_ops"] == 0, facts
