"""The FP8 Hopper forward's softmax knobs (hopper.Fp8Schedule: emu, tree, late, lsum) compiled for sm_90a with
Triton's bundled ptxas: no local memory in the key loop, and one trip of consumer 0's main loop (unmasked path)
has the instruction mix each knob claims. Their numbers are tests/gpu/test_fp8_gpu.py's job."""

from __future__ import annotations

import pytest
import torch

from fa3_inductor.kernels import hopper
from fa3_inductor.kernels.program import ScoreProgram

try:
    from sm90_cross_compile import compile_sm90, main_loop_mix, sass_facts, sass_text
    import triton.experimental.gluon  # noqa: F401
    _HAVE = True
except Exception:   # pragma: no cover - depends on the Triton build
    _HAVE = False

pytestmark = pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")


def _compile(d, causal="none", **kw):
    from fa3_inductor.kernels.fp8_quant import Fp8Operand
    b, h, s = 2, 4, 1024

    def op(shape, transposed=False):
        return Fp8Operand(torch.randn(*shape).to(torch.float8_e4m3fn), torch.ones(b, h, s // 128), 128,
                          transposed, False, transposed, s)
    q8, k8, v8 = op((b, h, s, d)), op((b, h, s, d)), op((b, h, d, s), True)
    out, lse = torch.empty(b, h, s, d, dtype=torch.bfloat16), torch.empty(b, h, s)
    prog = ScoreProgram(("mul", ("score",), ("const", d ** -0.5)), causal=causal)
    kernel, grid, args, kwargs = hopper.fp8_launch_args(q8, k8, v8, [], prog, out, lse, **kw)
    compiled = compile_sm90(kernel, *args, **kwargs)
    sass = sass_text(compiled)
    return sass_facts(compiled), main_loop_mix(sass), sass


@pytest.fixture(scope="module")
def base128():
    return _compile(128, pingpong=False)


# per thread and 128-key tile at D=128: 64 scores (2 rows x 32), 64 accumulator columns of O
@pytest.mark.parametrize("kw", [dict(pingpong=False, tree=True), dict(pingpong=False, lsum=True, tree=True),
                                dict(pingpong=False, emu=2, tree=True, late=True, lsum=True),
                                dict(pingpong=True, emu=2, tree=True, late=True, lsum=True),
                                dict(pingpong=False, emu=3, tree=True, lsum=True),
                                dict(pingpong=False, emu=1, tree=True, lsum=True, join=True),
                                dict(pingpong=False, emu=1, tree=True, lsum=True, mid=True),
                                dict(pingpong=False, join=True)])
def test_knobs_d128_mix(base128, kw):
    facts, mix, sass = _compile(128, **kw)
    bfacts, bmix, _ = base128
    assert facts["local_ops"] == 0 and facts["loop_local_ops"] == 0 and mix["local"] == 0, facts
    e = kw.get("emu", 0)
    # each emulated exp2 leaves MUFU for 3 FADD (one rounding down), 3 FFMA, a clamp and a shift-add
    assert mix["MUFU"] == bmix["MUFU"] - 8 * e
    # lsum: where l's rescale and the tile's add meet (late), ptxas fuses them into 4 FFMAs
    fused = 4 if kw.get("lsum") and kw.get("late") else 0
    assert mix["FFMA"] == bmix["FFMA"] - (2 if kw.get("lsum") else 0) + 24 * e + fused
    assert sass.count("FADD.FTZ.RM") > 0 if e else "FADD.FTZ.RM" not in sass
    if kw.get("lsum"):
        # 64 FADDs of the row sum become one 64x8 QGMMA per 32 keys (4 per tile) on P's registers, plus the 4
        # FADDs that add each tile's fresh P·1 accumulator to l in fp32 (the two-level sum)
        assert mix["FADD"] <= bmix["FADD"] - 64 + 4 + 24 * e
        assert sass.count("QGMMA.64x8x32") > 0 and mix["QGMMA"] == bmix["QGMMA"] + 4
    assert mix["FMNMX"] == bmix["FMNMX"] + 8 * e        # the row max's count is the tree's too
    assert mix["total"] <= bmix["total"] + 56 * e


@pytest.mark.parametrize("d,causal,kw", [(64, "none", dict(pingpong=True, emu=2, tree=True, late=True, lsum=True)),
                                         (128, "top_left", dict(pingpong=False, emu=2, tree=True, late=True,
                                                                lsum=True)),
                                         (256, "none", dict(pingpong=False, tree=True))])
def test_knobs_other_shapes_do_not_spill(d, causal, kw):
    facts, mix, _ = _compile(d, causal, **kw)
    assert facts["local_ops"] == 0 and mix["local"] == 0, facts


def test_tuner_candidates_compile_without_spills():
    cands = [c for c in hopper.fp8_schedules(128, 128) if c.tree]
    # the measured best first (tree lsum join), also on persistent CTAs; causal programs: no persistent candidate
    assert cands[0] == hopper.Fp8Schedule(False, cands[0].stages, tree=True, lsum=True, join=True)
    assert any(c.persistent for c in cands) and not any(c.persistent for c in hopper.fp8_schedules(128, 128,
                                                                                                     causal=True))
    assert not any(c.lsum for c in hopper.fp8_schedules(256, 256, n_operands=1))     # 64-key tiles: not measured
    for cand in cands:
        facts, mix, _ = _compile(128, **cand._asdict())
        assert facts["loop_local_ops"] == 0 and mix["local"] == 0, (cand, facts)
