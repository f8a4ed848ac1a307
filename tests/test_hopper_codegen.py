"""The Hopper warp-specialized kernel without a GPU: every generated variant compiles for sm_90a with Triton's
bundled ptxas, and its PTX / SASS is what the design claims (wgmma, TMA bulk tensor copies, mbarriers,
setmaxnreg; no local-memory spills at head dims up to 128); dispatch passes it over off sm_90 with a reason.
Whether it computes the right numbers is tests/gpu/test_hopper_gpu.py's job (Gluon does not run in the
interpreter)."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor import dispatch
from fa3_inductor.kernels import hopper
from fa3_inductor.kernels.program import ScoreProgram

S = ("score",)

try:
    from sm90_cross_compile import compile_sm90, sass_facts, sass_text
    import triton.experimental.gluon  # noqa: F401
    _HAVE = True
except Exception as exc:   # pragma: no cover - depends on the Triton build
    _HAVE, _WHY = False, repr(exc)


def _placeholder_tiles(q, k, operands, prog):
    """Tile-list arguments of the right types without running the (GPU) mask pre-pass."""
    from fa3_inductor.kernels import templates_hopper
    kinds = ["bool" if t.dtype == torch.bool else "float" for t in operands]
    if not operands or templates_hopper.tile_plan(prog, kinds) is None:
        return []
    mb, nb = -(-q.shape[2] // 128), -(-k.shape[2] // hopper.config(q.shape[-1], k.shape[-1])[0])
    idx = torch.zeros(1, 1, mb, nb, dtype=torch.int32)
    return [idx, idx.to(torch.int8), torch.ones(1, 1, mb, dtype=torch.int32), 0, 0, nb, 0, 0]


def C(x):
    return ("const", float(x))


def _t(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


VARIANTS = {
    "scale": (ScoreProgram(("mul", S, C(0.125))), 128, 128, 1, []),
    "causal-gqa": (ScoreProgram(("mul", S, C(0.125)), causal="bottom_right"), 128, 128, 4, []),
    "window-d64": (ScoreProgram(("mul", S, C(0.125)), causal="top_left", window=256), 64, 64, 1, []),
    "bias": (ScoreProgram(("add", ("mul", S, C(0.125)), ("operand", 0)), n_operands=1, empty_row="zero"),
             128, 128, 1, [(1, 1, 1, 0, torch.float32)]),
    "mask-softcap-d256": (ScoreProgram(("where", ("operand", 0), ("mul", ("tanh", ("mul", S, C(0.02))), C(50.0)),
                                        C(-math.inf)), n_operands=1), 256, 256, 2, [(0, 1, 0, 0, torch.bool)]),
    "d192-dv128": (ScoreProgram(("mul", S, C(0.1))), 192, 128, 1, []),
    "d96-causal": (ScoreProgram(("mul", S, C(0.1)), causal="top_left"), 96, 96, 1, []),
}


@pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiles_for_sm90_with_the_claimed_instructions(name):
    prog, d, dv, g, ops = VARIANTS[name]
    b, h, sq, sk = 2, 4, 256, 384
    q, k, v = _t(b, h, sq, d), _t(b, h // g, sk, d), _t(b, h // g, sk, dv)
    operands = []
    for bb, bh, bm, bn, dt in ops:
        shape = (1 if bb else b, 1 if bh else h, 1 if bm else sq, 1 if bn else sk)
        operands.append(torch.rand(*shape) > 0.3 if dt == torch.bool else torch.randn(*shape, dtype=dt))
    out, lse = torch.empty(b, h, sq, dv, dtype=q.dtype), torch.empty(b, h, sq)
    kernel, grid, args, kwargs = hopper.launch_args(q, k, v, operands, prog, out, lse, tiles=_placeholder_tiles(q, k, operands, prog))
    compiled = compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg",
                  "cp.async.bulk.tensor.4d.global.shared"):
        assert instr in ptx, f"{name}: {instr} missing"
    facts = sass_facts(compiled)
    assert facts["hgmma"] > 0, facts
    assert facts["shared"] <= 232448, facts
    if max(d, dv) <= 128:
        assert facts["local_ops"] == 0, f"{name}: register spills {facts}"


def test_dispatch_passes_hopper_over_on_cpu_with_a_reason():
    q = _t(1, 2, 64, 128, dtype=torch.float16)
    entry, passed = dispatch.select(ScoreProgram(("mul", S, C(0.1))), q, q, q, [])
    assert any(p.startswith("hopper: does not run on cpu") for p in passed), passed


def test_supports_reasons():
    prog = ScoreProgram(("mul", S, C(0.1)))
    meta = torch.empty(1, 2, 64, 80, dtype=torch.float16, device="meta")
    assert "sm_90" in hopper.supports(prog, meta, meta, meta, [])
    assert hopper.config(128, 128) == (128, 3)
    assert hopper.config(256, 256) == (64, 2)
    assert hopper.config(64, 64)[1] == 4


@pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")
@pytest.mark.parametrize("d", [64, 128, 256])
def test_fp8_variant_compiles_to_e4m3_wgmma(d):
    from fa3_inductor.kernels.fp8_quant import Fp8Operand
    b, h, s = 2, 4, 512

    def op(shape, transposed=False):
        return Fp8Operand(torch.randn(*shape).to(torch.float8_e4m3fn), torch.ones(b, h, s // 128), 128,
                          transposed, False, transposed, s)
    q8, k8, v8 = op((b, h, s, d)), op((b, h, s, d)), op((b, h, d, s), True)
    with pytest.raises(ValueError, match="wgmma_keys"):
        hopper.fp8_launch_args(q8, k8, op((b, h, d, s)), [], ScoreProgram(("mul", S, C(0.1))), None, None)
    out, lse = torch.empty(b, h, s, d, dtype=torch.bfloat16), torch.empty(b, h, s)
    prog = ScoreProgram(("mul", S, C(d ** -0.5)), causal="top_left")
    kernel, grid, args, kwargs = hopper.fp8_launch_args(q8, k8, v8, [], prog, out, lse)
    compiled = compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    assert ".e4m3.e4m3" in ptx and "cp.async.bulk.tensor" in ptx and "setmaxnreg" in ptx
    facts = sass_facts(compiled)
    assert facts["local_ops"] == 0 and facts["shared"] <= 232448 and facts["qgmma"] > 0, facts
    # P reaches the PV operand without data movement (convert_layout(assert_trivial=True) in the template) and
    # each 4 e4m3 values are packed by one byte permute after two cvt: no byte-by-byte repacking
    sass = sass_text(compiled)
    assert sass.count("PRMT") * 2 <= sass.count("F2FP.SATFINITE.E4M3"), "P packed byte by byte"
