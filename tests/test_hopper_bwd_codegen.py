"""The Hopper warp-specialized backward without a GPU: every generated variant (score chains, causal / window,
GQA, dQ by TMA reductions or atomics) compiles for sm_90a with Triton's bundled ptxas and its PTX holds what the
design claims (wgmma, TMA loads, mbarriers, setmaxnreg, bulk tensor reductions for dQ); shared memory fits; the
sites it declines are declined with a reason. Numbers are tests/gpu/test_hopper_gpu.py's job."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import hopper_bwd, triton_portable
from fa3_inductor.kernels.program import ScoreProgram
from interpreter_sandbox import C, S

try:
    from sm90_cross_compile import compile_sm90, main_loop_mix, sass_facts, sass_text
    import triton.experimental.gluon  # noqa: F401
    _HAVE = True
except Exception:   # pragma: no cover - depends on the Triton build
    _HAVE = False


VARIANTS = {
    "scale-d128": (ScoreProgram(("mul", S, C(0.125))), 128, 1, []),
    "causal-gqa-d128": (ScoreProgram(("mul", S, C(0.125)), causal="bottom_right"), 128, 4, []),
    "window-d64": (ScoreProgram(("mul", S, C(0.125)), causal="top_left", window=256, empty_row="zero"), 64, 1, []),
    "bias-d64": (ScoreProgram(("add", ("mul", S, C(0.125)), ("operand", 0)), n_operands=1, empty_row="uniform"), 64,
                 2, [(1, 1, 1, 0, torch.float32)]),
    "mask-softcap-d128": (ScoreProgram(("where", ("operand", 0), ("mul", ("tanh", ("mul", S, C(0.02))), C(50.0)),
                                        C(-math.inf)), n_operands=1), 128, 2, [(0, 1, 0, 0, torch.bool)]),
}


def _call(prog, d, g, ops):
    b, h, sq, sk = 2, 4, 200, 333
    q = torch.randn(b, h, sq, d).bfloat16()
    k, v = (torch.randn(b, h // g, sk, d).bfloat16() for _ in range(2))
    operands = []
    for bb, bh, bm, bn, dt in ops:
        shape = (1 if bb else b, 1 if bh else h, 1 if bm else sq, 1 if bn else sk)
        operands.append(torch.rand(*shape) > 0.3 if dt == torch.bool else torch.randn(*shape, dtype=dt))
    c = triton_portable.BackwardLaunches(torch.randn_like(q), q, k, v, operands, torch.randn(b, h, sq), prog,
                                         torch.randn_like(q))
    acc = torch.zeros(b, h, -(-sq // hopper_bwd.BLOCK_M) * hopper_bwd.BLOCK_M, d)
    return c, operands, acc


@pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("dq_add", [3, 1])
def test_compiles_for_sm90_with_the_claimed_instructions(name, dq_add):
    prog, d, g, ops = VARIANTS[name]
    c, operands, acc = _call(prog, d, g, ops)
    kernel, grid, args, kwargs = hopper_bwd.launch_args(c, operands, prog, acc, n_stages=2, dq_add=dq_add)
    compiled = compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    dq_instr = "cp.reduce.async.bulk.tensor" if dq_add == 3 else "atom.global"
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg", dq_instr):
        assert instr in ptx, f"{name}: {instr} missing"
    facts = sass_facts(compiled)
    assert facts["hgmma"] > 0 and facts["shared"] <= 232448, facts
    if d == 64 and not ops:
        assert facts["local_ops"] == 0, f"{name}: register spills {facts}"


def test_declines_with_reasons():
    q = torch.empty(1, 2, 64, 128, dtype=torch.bfloat16)
    v96 = torch.empty(1, 2, 64, 96, dtype=torch.bfloat16)
    plain = ScoreProgram(("mul", S, C(0.1)))
    assert hopper_bwd._declines(plain, q, q) is None
    assert "head dims" in hopper_bwd._declines(plain, q, v96)
    bias = ScoreProgram(("add", S, ("operand", 0)), n_operands=1, operand_grad=(True,))
    assert "gradient" in hopper_bwd._declines(bias, q, q)
    torch.use_deterministic_algorithms(True)
    try:
        assert "deterministic" in hopper_bwd._declines(plain, q, q)
    finally:
        torch.use_deterministic_algorithms(False)
    assert hopper_bwd.supports(plain, q, q, q, []) is not None     # no sm_90 GPU here
    assert hopper_bwd.stages(128) >= 2 and hopper_bwd.stages(64) >= 2


@pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("knobs", [dict(stats_smem=True), dict(dq_writer=True, dq_early=True, stats_smem=True)],
                         ids=["stats", "writer-early-stats"])
def test_fa3_schedule_knobs_compile_without_spills(name, knobs):
    """lse / delta through shared memory (and the dQ-writer warp with FlashAttention-3's dQ placement): the
    claimed instructions, shared memory within the H100's, and no local memory at all for the programs without
    a soft-cap chain (the plain kernel spills at D=128: ~100 local ops, ~50 per tile)."""
    prog, d, g, ops = VARIANTS[name]
    c, operands, acc = _call(prog, d, g, ops)
    kernel, grid, args, kwargs = hopper_bwd.launch_args(c, operands, prog, acc, n_stages=2, **knobs)
    compiled = compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg",
                  "cp.reduce.async.bulk.tensor"):
        assert instr in ptx, f"{name}: {instr} missing"
    facts = sass_facts(compiled)
    assert facts["hgmma"] > 0 and facts["shared"] <= 232448, facts
    if "softcap" not in name:
        assert facts["local_ops"] == 0, f"{name} {knobs}: register spills {facts}"
        mix = main_loop_mix(sass_text(compiled))
        # ptxas did not serialise the wgmmas (a WARPGROUP.ARRIVE / DEPBAR pair around every HGMMA)
        assert mix["WARPGROUP"] < mix["HGMMA"] / 2, mix


def test_knob_combinations_that_do_not_exist_raise():
    prog, d, g, ops = VARIANTS["scale-d128"]
    c, operands, acc = _call(prog, d, g, ops)
    with pytest.raises(ValueError, match="dq_add=3"):
        hopper_bwd.launch_args(c, operands, prog, acc, dq_writer=True, dq_add=1)
    with pytest.raises(ValueError, match="pick one"):
        hopper_bwd.launch_args(c, operands, prog, acc, dq_early=True, dq_lag=True)
    assert hopper_bwd.stages(128, dq_writer=True) == 2 and hopper_bwd.stages(64, dq_writer=True) == 3
    assert hopper_bwd.stages(64, dq_writer=True, block_m=128) == 2
    with pytest.raises(ValueError, match="block_m=128"):
        hopper_bwd.launch_args(c, operands, prog, acc, dq_rows=True)
    for cand in hopper_bwd.candidates(64):
        if cand[0] == "ws":
            assert set(hopper_bwd.variant_of(cand)) == set(hopper_bwd.WS_KNOBS)


@pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")
@pytest.mark.parametrize("name", ["window-d64", "bias-d64"])
def test_d64_alternating_whole_dq_tiles(name):
    """dq_alt at D=64: the consumers take whole dQ tiles in turn (the loop walks tiles in pairs, so which consumer
    reads dS is known at compile time); no spills in the tile loop and ptxas keeps the wgmmas pipelined (at D=128
    the 64-register dQ tile does not fit: spills, and ptxas serialises every wgmma)."""
    prog, d, g, ops = VARIANTS[name]
    c, operands, acc = _call(prog, d, g, ops)
    kernel, grid, args, kwargs = hopper_bwd.launch_args(c, operands, prog, acc, dq_alt=True, dq_early=True,
                                                        stats_smem=True, dq_writer=True)
    compiled = compile_sm90(kernel, *args, **kwargs)
    assert "cp.reduce.async.bulk.tensor" in compiled.asm["ptx"]
    mix = main_loop_mix(sass_text(compiled))
    assert mix["WARPGROUP"] < mix["HGMMA"] / 2 and mix["local"] == 0, mix
    with pytest.raises(ValueError, match="dq_alt"):
        hopper_bwd.launch_args(c, operands, prog, acc, dq_alt=True)


@pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")
@pytest.mark.parametrize("name", ["window-d64", "bias-d64"])
@pytest.mark.parametrize("writer", [False, True])
def test_d64_128_row_step_with_dq_by_rows(name, writer):
    """FlashAttention-3's D=64 step: 128 query rows, each consumer's dQ is 64 rows x the whole head dim (wgmma
    N = 64, not 32); fits shared memory with the writer's two buffers at two stages, and the consumer's tile loop
    touches no local memory (one reload per tile with the window's masks and the writer, Triton 3.6)."""
    prog, d, g, ops = VARIANTS[name]
    c, operands, acc = _call(prog, d, g, ops)
    acc = torch.zeros(acc.shape[0], acc.shape[1], -(-acc.shape[2] // 128) * 128, d)
    kernel, grid, args, kwargs = hopper_bwd.launch_args(c, operands, prog, acc, block_m=128, dq_rows=True,
                                                        stats_smem=True, dq_writer=writer, dq_early=writer)
    compiled = compile_sm90(kernel, *args, **kwargs)
    assert "cp.reduce.async.bulk.tensor" in compiled.asm["ptx"]
    facts = sass_facts(compiled)
    mix = main_loop_mix(sass_text(compiled))
    assert facts["shared"] <= 232448 and mix["HGMMA"] > 0, (facts, mix)
    assert mix["local"] <= (1 if writer and name == "window-d64" else 0), (facts, mix)
