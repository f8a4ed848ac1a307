"""Schedules of the Hopper forward for programs with score operands, without a GPU. Operand prefetch (templates_hopper
PREFETCH: a key block's score operands loaded at the top of the block, ahead of its K wait and S product) compiles
for sm_90a with Triton's bundled ptxas for dense float biases (T5's position bias, a scaled chain with an fp32
bias), key-padding masks walked through tile lists and dense bool masks with a causal structure; in the key loop
the operand loads come before the S product's wgmma (after it without the knob); at head dim 64 it spills at most
16 local-memory operations per block more than the plain kernel (T5's bias: 14 against 0; a dense bool mask with
causal diagonals: 24 against 10, its masked diagonal blocks load byte by byte); the kernel without the knob is
unchanged. At head dim 128 with a dense operand, the schedule without the PV overlap (OVERLAP=False) spills nothing
where the plain one spills 100+ operations per block. The tuner offers both only behind
FA3_HOPPER_OPERAND_SCHEDULES (prefetch for one operand, a dense one only at head dims <= 64; no-overlap for dense
operands above). Whether they compute the right numbers: tests/gpu/test_hopper_gpu.py (`-k "prefetch or
overlap"`); the score chain itself is the Emitter's, which the interpreter suites run."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import hopper
from fa3_inductor.kernels.program import ScoreProgram

from gluon_guard import GLUON, sm90  # noqa: E402  (tests/ is on sys.path)
from test_hopper_codegen import _placeholder_tiles  # noqa: E402  (tests/ is on sys.path)

S = ("score",)


def _where(d, causal="none"):
    return ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", d ** -0.5)), ("const", -math.inf)),
                        n_operands=1, causal=causal)


# name: (program, operand factory (b, h, s) -> tensors)
VARIANTS = {
    "t5-bias": (ScoreProgram(("add", S, ("operand", 0)), n_operands=1),
                lambda b, h, s: [torch.randn(b, h, s, s).to(torch.bfloat16)]),     # per batch, as the zoo's T5
    "scaled-fp32-bias": (ScoreProgram(("add", ("mul", S, ("const", 0.125)), ("operand", 0)), n_operands=1),
                         lambda b, h, s: [torch.randn(b, h, s, s)]),
    "keypad-tile-lists": (_where(64), lambda b, h, s: [torch.rand(b, 1, 1, s) > 0.3]),
    "dense-bool-causal": (_where(64, "top_left"), lambda b, h, s: [torch.rand(b, 1, s, s) > 0.3]),
}


def _launch(name, prefetch, b=2, h=8, s=640, d=64):
    prog, make = VARIANTS[name]
    q, k, v = (torch.randn(b, h, s, d).to(torch.bfloat16) for _ in range(3))
    ops = make(b, h, s)
    out, lse = torch.empty(b, h, s, d, dtype=q.dtype), torch.empty(b, h, s)
    return hopper.launch_args(q, k, v, ops, prog, out, lse, tiles=_placeholder_tiles(q, k, ops, prog),
                              prefetch=prefetch)


def _loads_around_s(sass: str) -> tuple[int, int]:
    """Global loads in one trip of the key loop before / after its first wgmma (the S product)."""
    path = sm90.main_loop_path(sass)
    first = next(i for i, (_, text) in enumerate(path) if "HGMMA" in text)
    return (sum("LDG" in text for _, text in path[:first]), sum("LDG" in text for _, text in path[first:]))


@GLUON
@pytest.mark.parametrize("name", list(VARIANTS))
def test_prefetch_compiles_and_loads_ahead(name):
    kernel, grid, args, kwargs = _launch(name, True)
    assert kwargs["PREFETCH"]
    compiled = sm90.compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg"):
        assert instr in ptx, f"{name}: {instr} missing"
    sass = sm90.sass_text(compiled)
    facts = sm90.sass_facts(compiled)
    kwargs.pop("PREFETCH")
    plain = sm90.compile_sm90(kernel, *args, **kwargs)
    before, after = _loads_around_s(sass)
    p_before, p_after = _loads_around_s(sm90.sass_text(plain))
    print(name, facts, "loads before / after S:", (before, after), "plain:", (p_before, p_after),
          sm90.sass_facts(plain))
    # the operand loads moved ahead of the S product (at most a tile-list read stays on either side)
    assert before >= p_after - 1 and after <= 1 and p_before <= 1, ((before, after), (p_before, p_after))
    assert facts["loop_local_ops"] <= sm90.sass_facts(plain)["loop_local_ops"] + 16, facts
    assert facts["shared"] <= 232448, facts


@GLUON
def test_plain_kernel_unchanged_by_the_knob():
    kernel, grid, args, kwargs = _launch("t5-bias", False)
    assert "PREFETCH" not in kwargs
    assert sm90.sass_text(sm90.compile_sm90(kernel, *args, **kwargs)) == \
        sm90.sass_text(sm90.compile_sm90(kernel, *args, **kwargs, PREFETCH=False))


def test_no_prefetch_without_operands():
    q, k, v = (torch.randn(1, 2, 256, 64).to(torch.bfloat16) for _ in range(3))
    prog = ScoreProgram(("mul", S, ("const", 0.125)))
    *_, kwargs = hopper.launch_args(q, k, v, [], prog, torch.empty_like(q), torch.empty(1, 2, 256), prefetch=True)
    assert "PREFETCH" not in kwargs


def test_tuner_candidates_only_behind_the_switch(monkeypatch):
    def flag(cands, key):     # the candidates whose `key` is not the default schedule's
        default = hopper.Schedule._field_defaults[key]
        return [c for c in cands if getattr(c, key, default) != default]

    monkeypatch.setattr(hopper, "TUNE_OPERAND_SCHEDULES", False)
    for d in (64, 128):
        cands = hopper.candidates(d, d, False, operands=1, dense=True)
        assert not flag(cands, "prefetch") and not flag(cands, "overlap")
    monkeypatch.setattr(hopper, "TUNE_OPERAND_SCHEDULES", True)
    base = hopper.schedules(64, 64, causal=True)
    cands = hopper.candidates(64, 64, True, operands=1, dense=True)
    assert flag(cands, "prefetch") == [c._replace(prefetch=True) for c in base] and not flag(cands, "overlap")
    assert cands[:len(base)] == base                  # the plain schedules stay first
    assert not flag(hopper.candidates(64, 64, False, operands=0), "prefetch")
    # two operands (a dense bias and a key-padding mask): prefetched, the key loop spilled 428 local-memory operations
    # per block against the plain kernel's 10
    assert not flag(hopper.candidates(64, 64, False, operands=2, dense=True), "prefetch")
    # head dim 128: prefetch for a key-padding mask (no spills), the no-overlap schedules for a dense operand
    base = hopper.schedules(128, 128)
    assert flag(hopper.candidates(128, 128, False, operands=1, dense=False), "prefetch") == \
        [c._replace(prefetch=True) for c in base]
    dense = hopper.candidates(128, 128, False, operands=1, dense=True)
    assert not flag(dense, "prefetch") and flag(dense, "overlap") == [c._replace(overlap=False) for c in base]


@GLUON
@pytest.mark.parametrize("case", ["float-bias-tile-lists", "bool-mask-causal"])
def test_no_overlap_removes_the_dense_operand_spills_at_d128(case):
    """A dense operand at head dim 128 (an additive bias walked through tile lists; a bool mask with causal
    diagonals): the plain (overlapped) kernel spills in its key loop, the schedule that waits for P·V before the
    softmax (launch_args overlap=False) does not."""
    b, h, s, d = 2, 16, 640, 128
    q, k, v = (torch.randn(b, h, s, d).to(torch.bfloat16) for _ in range(3))
    if case == "float-bias-tile-lists":
        ops, prog = [torch.randn(1, h, s, s).to(torch.bfloat16)], ScoreProgram(("add", S, ("operand", 0)), 1)
    else:
        ops, prog = [torch.rand(b, 1, s, s) > 0.3], _where(d, "top_left")
    out, lse = torch.empty(b, h, s, d, dtype=q.dtype), torch.empty(b, h, s)
    facts = {}
    for overlap in (True, False):
        kernel, grid, args, kwargs = hopper.launch_args(q, k, v, ops, prog, out, lse,
                                                        tiles=_placeholder_tiles(q, k, ops, prog), overlap=overlap)
        assert kwargs.get("OVERLAP", True) == overlap
        facts[overlap] = sm90.sass_facts(sm90.compile_sm90(kernel, *args, **kwargs))
    print(case, facts)
    assert facts[True]["loop_local_ops"] > 100 and facts[False]["loop_local_ops"] <= 5, facts
