"""Key-split key blocks of the Hopper forward (templates_hopper BLOCK_N2: BLOCK_N + BLOCK_N2 keys per block, two S
and two PV products, one row max and rescale) without a GPU: they compile for sm_90a with Triton's bundled ptxas,
causal or not, windowed, with GQA, a score chain and a bias operand, ping-pong or not, persistent or not; keep the
warp-specialized instructions; spill nothing at 128 + 32 keys without operands and fit the shared memory; the
kernel without them is unchanged (BLOCK_N2=0 prunes every branch); the launcher refuses them with tile lists; the
tuner offers them only behind FA3_HOPPER_KSPLIT at head dim 128; a call planned on them rebases both boxes of K
and V on the call's tensors. Whether they compute the right numbers: tests/gpu/test_hopper_gpu.py (`-k ksplit`)."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import hopper
from fa3_inductor.kernels.program import ScoreProgram

from gluon_guard import GLUON, sm90  # noqa: E402  (tests/ is on sys.path)
from test_hopper_codegen import _placeholder_tiles  # noqa: E402  (tests/ is on sys.path)

S = ("score",)


def _scaled(d, causal="none", window=None):
    return ScoreProgram(("mul", S, ("const", d ** -0.5)), causal=causal, window=window)


def _softcap_bias(d):
    """Gemma-2-style soft-capping after an additive bias: a chain evaluated in natural units, with an operand."""
    x = ("add", ("mul", S, ("const", d ** -0.5)), ("operand", 0))
    return ScoreProgram(("mul", ("tanh", ("mul", x, ("const", 1 / 30.0))), ("const", 30.0)), n_operands=1)


# name: (program, GQA group, bias operand (1, H, 1, Sk) or not, launch keywords)
VARIANTS = {
    "n32": (_scaled(128), 1, False, dict(block_n2=32)),
    "n32-nopp": (_scaled(128), 1, False, dict(block_n2=32, pingpong=False)),
    "n32-causal-gqa": (_scaled(128, "top_left"), 4, False, dict(block_n2=32)),
    "n32-window-bottom-right": (_scaled(128, "bottom_right", 300), 2, False, dict(block_n2=32)),
    "n32-softcap-bias": (_softcap_bias(128), 1, True, dict(block_n2=32)),
    "n32-persistent": (_scaled(128), 2, False, dict(block_n2=32, persistent=True)),
    "n64": (_scaled(128), 1, False, dict(block_n2=64)),
}


def _case(name, b=2, h=8, sq=640, sk=900):
    prog, g, bias, kw = VARIANTS[name]
    d = 128
    q = torch.randn(b, h, sq, d).to(torch.bfloat16)
    k, v = (torch.randn(b, h // g, sk, d).to(torch.bfloat16) for _ in range(2))
    ops = [torch.randn(1, h, 1, sk).to(torch.bfloat16)] if bias else []
    out, lse = torch.empty(b, h, sq, d, dtype=q.dtype), torch.empty(b, h, sq)
    return prog, q, k, v, ops, out, lse, kw


@GLUON
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ksplit_compiles_for_sm90(name):
    prog, q, k, v, ops, out, lse, kw = _case(name)
    kernel, grid, args, kwargs = hopper.launch_args(q, k, v, ops, prog, out, lse, **kw)
    n2 = kw["block_n2"]
    assert kwargs["BLOCK_N2"] == n2 and kwargs["BLOCK_N"] == 128 and kwargs["STAGES"] == 2
    # the second part's boxes: n2 rows of K and V
    assert [tuple(a.block_shape) for a in args[4:6]] == [(1, 1, n2, 128)] * 2
    compiled = sm90.compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg"):
        assert instr in ptx, f"{name}: {instr} missing"
    # four TMA loads per key block (K, K2, V, V2) where the plain kernel has two
    facts = sm90.sass_facts(compiled)
    base_kw = {key: val for key, val in kwargs.items() if key != "BLOCK_N2"}
    base_args = args[:4] + args[1:3] + args[6:]
    base = sm90.sass_facts(sm90.compile_sm90(kernel, *base_args, **base_kw))
    print(name, facts, "plain:", base)
    assert facts["hgmma"] > base["hgmma"] > 0, (facts, base)
    assert facts["shared"] <= 232448, facts
    if n2 == 32 and not ops:
        assert facts["local_ops"] == 0, f"{name}: register spills {facts}"


@GLUON
def test_plain_kernel_unchanged_by_the_knob():
    """BLOCK_N2=0 prunes every key-split branch: the kernel is what it compiles to without the keyword."""
    prog, q, k, v, ops, out, lse, _ = _case("n32-causal-gqa")
    kernel, grid, args, kwargs = hopper.launch_args(q, k, v, ops, prog, out, lse)
    assert "BLOCK_N2" not in kwargs and args[4] is args[1] and args[5] is args[2]
    assert sm90.sass_text(sm90.compile_sm90(kernel, *args, **kwargs)) == \
        sm90.sass_text(sm90.compile_sm90(kernel, *args, **kwargs, BLOCK_N2=0))


def test_stages_count_both_parts():
    assert hopper.config(128, 128, 2, None, 32) == (128, 2)       # 80 KB per stage next to 32 KB of Q
    assert hopper.config(128, 128, 2, None, 64) == (128, 2)       # 96 KB per stage
    assert hopper.config(128, 128) == (128, 3)


def test_refused_with_tile_lists():
    q, k, v = (torch.randn(1, 2, 300, 128).to(torch.bfloat16) for _ in range(3))
    keep = torch.rand(1, 1, 300, 300) > 0.3
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", 0.1)), ("const", -math.inf)), 1)
    tiles = _placeholder_tiles(q, k, [keep], prog)
    assert tiles, "a dense bool mask without a structural mask walks tile lists"
    with pytest.raises(ValueError, match="tile lists"):
        hopper.launch_args(q, k, v, [keep], prog, torch.empty_like(q), torch.empty(1, 2, 300), tiles=tiles,
                           block_n2=32)


def test_tuner_candidates_only_behind_the_switch(monkeypatch):
    monkeypatch.setattr(hopper, "TUNE_KSPLIT", False)
    assert not any(getattr(c, "block_n2", 0) for c in hopper.candidates(128, 128, False))
    monkeypatch.setattr(hopper, "TUNE_KSPLIT", True)
    split = [c for c in hopper.candidates(128, 128, True) if getattr(c, "block_n2", 0)]
    assert {(c.pingpong, c.stages, c.block_n2) for c in split} == {(True, 2, 32), (False, 2, 32)}
    assert hopper.candidates(128, 128, False)[0] == hopper.schedules(128, 128)[0]     # the default stays first
    for d in (64, 256):
        assert not any(getattr(c, "block_n2", 0) for c in hopper.candidates(d, d, False))
    assert not any(getattr(c, "block_n2", 0) for c in hopper.candidates(128, 128, False, tiles=True))


from test_hopper_plan import _fresh, _roles, recorded  # noqa: E402,F401  (the recording fixture)


@GLUON
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_ksplit_plan_rebases_both_boxes(recorded, monkeypatch, layout):  # noqa: F811
    """A tuner settled on a key-split candidate: its plan launches what the first call launched, with the second
    part's K / V descriptors on this call's K / V (not the first call's)."""
    monkeypatch.setattr(hopper, "candidates",
                        lambda d, dv, causal, **kw: [hopper.Schedule(True, 2, block_n2=32)])
    prog = _scaled(128, "bottom_right")
    runs = []
    for seed in range(3):
        q, k, v = (_fresh((2, 4, 300, 128), layout, seed=3 * seed + n) for n in range(3))
        recorded.clear()
        out, lse = hopper.forward(q, k, v, [], prog)
        launch = [c for c in recorded if c[3].get("BLOCK_N2")]
        assert len(launch) == 1
        assert launch[0][2][4].base is k and launch[0][2][5].base is v
        runs.append(_roles(list(recorded), (q, k, v), (out, lse)))
    assert runs[1] == runs[0] and runs[2] == runs[0]
