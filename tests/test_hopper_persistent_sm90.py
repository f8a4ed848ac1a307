"""The Hopper forward's persistent schedule (templates_hopper PERSISTENT: one CTA per SM walking (query block,
head, batch) work tiles) without a GPU: it compiles for sm_90a with Triton's bundled ptxas at head dims 64 / 128 /
256, causal or not, with GQA and mask operands (tile lists or not), keeps the claimed instructions (wgmma, TMA loads
and stores, mbarriers, setmaxnreg) plus the tile loop's (the grid size read in the kernel, the O store's
read-completion wait), spills nothing at head dims up to 128 and fits the shared memory; the default schedule's
kernel is unchanged by the knob (same SASS); the launcher's grid, O buffer and tuner switch. Whether it computes
the right numbers: tests/gpu/test_hopper_gpu.py (`-k persistent`)."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import hopper
from fa3_inductor.kernels.program import ScoreProgram

try:
    from sm90_cross_compile import compile_sm90, sass_facts, sass_text
    import triton.experimental.gluon  # noqa: F401
    _HAVE = True
except Exception as exc:   # pragma: no cover - depends on the Triton build
    _HAVE, _WHY = False, repr(exc)

from test_hopper_codegen import _placeholder_tiles  # noqa: E402  (tests/ is on sys.path)

S = ("score",)
GLUON = pytest.mark.skipif(not _HAVE, reason="Triton without Gluon / NVIDIA backend")


def _scaled(d, causal="none", window=None):
    return ScoreProgram(("mul", S, ("const", d ** -0.5)), causal=causal, window=window)


def _masked(d, causal="none", empty_row="zero"):
    return ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", d ** -0.5)), ("const", -math.inf)),
                        n_operands=1, causal=causal, empty_row=empty_row)


def _bias(d):
    return ScoreProgram(("add", ("mul", S, ("const", d ** -0.5)), ("operand", 0)), n_operands=1)


KEYPAD = ("bool", (0, 1, 1, 0))     # (B, 1, 1, Sk): a key-padding mask
DENSE = ("bool", (0, 1, 0, 0))      # (B, 1, Sq, Sk)
BIAS = ("float", (1, 1, 1, 0))      # (1, 1, 1, Sk) additive

# name: (program, d, dv, GQA group, mask operand or None, stages or None (config's))
VARIANTS = {
    "d64": (_scaled(64), 64, 64, 1, None, None),
    "d64-causal-gqa": (_scaled(64, "top_left"), 64, 64, 4, None, None),
    "d64-keypad": (_masked(64), 64, 64, 1, KEYPAD, None),
    "d64-window-bottom-right": (_scaled(64, "bottom_right", 200), 64, 64, 2, None, None),
    "d128": (_scaled(128), 128, 128, 1, None, None),                       # 3 stages: O through Q's buffer
    "d128-2stages": (_scaled(128), 128, 128, 1, None, 2),                  # O in a buffer of its own
    "d128-causal-gqa": (_scaled(128, "bottom_right"), 128, 128, 4, None, None),
    "d128-keypad-gqa": (_masked(128), 128, 128, 2, KEYPAD, 2),
    "d128-dense-mask": (_masked(128, "none", "nan"), 128, 128, 1, DENSE, None),         # tile lists
    "d64-dense-mask-causal": (_masked(64, "top_left", "nan"), 64, 64, 1, DENSE, None),
    "d128-bias": (_bias(128), 128, 128, 1, BIAS, 2),
    "d256": (_scaled(256), 256, 256, 1, None, None),
    "d256-causal-gqa": (_scaled(256, "top_left"), 256, 256, 2, None, None),
    "d256-keypad": (_masked(256), 256, 256, 1, KEYPAD, None),
    "d192-dv128-causal": (_scaled(192, "top_left"), 192, 128, 1, None, None),
}


def _case(name, b=2, h=8, sq=640, sk=896):
    prog, d, dv, g, mask, stages = VARIANTS[name]
    q = torch.randn(b, h, sq, d).to(torch.bfloat16)
    k, v = torch.randn(b, h // g, sk, d).to(torch.bfloat16), torch.randn(b, h // g, sk, dv).to(torch.bfloat16)
    ops = []
    if mask is not None:
        kind, bc = mask
        shape = tuple(1 if one else n for one, n in zip(bc, (b, h, sq, sk)))
        ops = [torch.rand(*shape) > 0.3 if kind == "bool" else torch.randn(*shape)]
    out, lse = torch.empty(b, h, sq, dv, dtype=q.dtype), torch.empty(b, h, sq)
    return prog, q, k, v, ops, out, lse, stages


@GLUON
@pytest.mark.parametrize("name", list(VARIANTS))
def test_persistent_compiles_for_sm90(name):
    prog, q, k, v, ops, out, lse, stages = _case(name)
    d, dv = q.shape[-1], v.shape[-1]
    kernel, grid, args, kwargs = hopper.launch_args(q, k, v, ops, prog, out, lse, stages=stages, persistent=True,
                                                    tiles=_placeholder_tiles(q, k, ops, prog))
    assert kwargs["PERSISTENT"] and grid[1:] == (1, 1)
    assert kwargs["SEP_O"] == hopper.separate_o(d, dv, kwargs["BLOCK_N"], kwargs["STAGES"])
    compiled = compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg",
                  "cp.async.bulk.tensor.4d.global.shared", "cp.async.bulk.wait_group.read", "%nctaid.x"):
        assert instr in ptx, f"{name}: {instr} missing"
    facts = sass_facts(compiled)
    kwargs.update(PERSISTENT=False, SEP_O=False)
    base = sass_facts(compile_sm90(kernel, *args, **kwargs))     # the default schedule, same tiles and stages
    print(name, kwargs["STAGES"], "SEP_O" if hopper.separate_o(d, dv, kwargs["BLOCK_N"], kwargs["STAGES"])
          else "O aliases Q", facts, "default:", base)
    assert facts["hgmma"] == base["hgmma"] > 0, (facts, base)
    assert facts["shared"] <= 232448, facts
    # the tile loop adds no spills to the key loop
    assert facts["loop_local_ops"] <= base["loop_local_ops"], (facts, base)
    if max(d, dv) <= 128 and not ops:
        assert facts["local_ops"] == 0, f"{name}: register spills {facts}"
    else:
        # with operands: a few scalars (operand and tile-list strides, the grid size) that the backend hoists above
        # the partitions' register reallocation, stored once per CTA and reloaded once per work tile
        assert facts["local_ops"] <= base["local_ops"] + 64, (facts, base)


@GLUON
@pytest.mark.parametrize("name", ["d128-causal-gqa", "d64-keypad"])
def test_default_schedule_unchanged_by_the_knob(name):
    """PERSISTENT=False prunes every persistent branch: the kernel is what an explicit PERSISTENT=False compiles
    to, and its grid is one CTA per work tile."""
    prog, q, k, v, ops, out, lse, stages = _case(name)
    tiles = _placeholder_tiles(q, k, ops, prog)
    kernel, grid, args, kwargs = hopper.launch_args(q, k, v, ops, prog, out, lse, tiles=tiles)
    assert "PERSISTENT" not in kwargs and grid == (-(-q.shape[2] // 128), q.shape[1], q.shape[0])
    plain = sass_text(compile_sm90(kernel, *args, **kwargs))
    explicit = sass_text(compile_sm90(kernel, *args, **kwargs, PERSISTENT=False, SEP_O=False))
    assert plain == explicit


@GLUON
def test_persistent_fp8_compiles():
    """FP8 shares the template: the persistent schedule compiles on e4m3 wgmma too (O has its own buffer)."""
    from fa3_inductor.kernels.fp8_quant import Fp8Operand
    b, h, s, d = 2, 4, 512, 128

    def op(shape, transposed=False):
        return Fp8Operand(torch.randn(*shape).to(torch.float8_e4m3fn), torch.ones(b, h, s // 128), 128,
                          transposed, False, transposed, s)
    q8, k8, v8 = op((b, h, s, d)), op((b, h, s, d)), op((b, h, d, s), True)
    out, lse = torch.empty(b, h, s, d, dtype=torch.bfloat16), torch.empty(b, h, s)
    kernel, grid, args, kwargs = hopper.fp8_launch_args(q8, k8, v8, [], _scaled(d, "top_left"), out, lse,
                                                        persistent=True)
    compiled = compile_sm90(kernel, *args, **kwargs)
    ptx = compiled.asm["ptx"]
    assert ".e4m3.e4m3" in ptx and "%nctaid.x" in ptx and "cp.async.bulk.wait_group.read" in ptx
    facts = sass_facts(compiled)
    assert facts["local_ops"] == 0 and facts["qgmma"] > 0 and facts["shared"] <= 232448, facts


def test_grid_is_one_cta_per_sm_or_per_work_tile():
    cpu = torch.device("cpu")
    n = hopper.sm_count(cpu)
    assert hopper.persistent_grid(cpu, 1, 2, 1000) == (2 * 8, 1, 1)           # 16 work tiles < SMs
    assert hopper.persistent_grid(cpu, 4, 32, 4096) == (n, 1, 1)              # 4096 work tiles
    assert hopper.persistent_grid(cpu, 1, 1, 1) == (1, 1, 1)


def test_o_buffer_of_its_own_where_it_fits():
    assert hopper.separate_o(64, 64, 128, 4)
    assert hopper.separate_o(128, 128, 128, 2) and not hopper.separate_o(128, 128, 128, 3)
    assert not hopper.separate_o(256, 256, 64, 2)
    assert hopper.separate_o(192, 128, 64, 2)       # no aliasing possible: its own buffer as in the default


def test_tuner_candidates_only_behind_the_switch(monkeypatch):
    monkeypatch.setattr(hopper, "TUNE_PERSISTENT", False)
    for d in (64, 128, 256):
        cands = hopper.schedules(d, d)
        assert cands and not any(c.persistent for c in cands)
        assert cands[0] == hopper.schedules(d, d, persistent=True)[0]     # the default stays first
    monkeypatch.setattr(hopper, "TUNE_PERSISTENT", True)
    cands = hopper.schedules(128, 128)
    assert [c[:2] for c in cands if c.persistent] == [c[:2] for c in cands if not c.persistent]
    # causal programs: measured slower at every grid point, not a candidate
    assert not any(c.persistent for c in hopper.schedules(128, 128, causal=True))


from test_hopper_plan import _fresh, _roles, recorded  # noqa: E402,F401  (the recording fixture)


@pytest.mark.parametrize("causal,mask", [("bottom_right", False), ("none", True)])
def test_persistent_plan_launches_what_the_first_call_did(recorded, monkeypatch, causal, mask):  # noqa: F811
    """A tuner settled on a persistent candidate: its plan (kernels/hopper.py _Plan, args[-8:] as its tail) launches
    what the first call launched, on the persistent grid."""
    monkeypatch.setattr(hopper, "schedules", lambda d, dv, persistent=None, causal=False: [hopper.Schedule(True, 2, True)])
    prog = _masked(64, causal) if mask else _scaled(64, causal)
    runs = []
    for seed in range(3):
        q, k, v = (_fresh((2, 4, 300, 64), "bshd", seed=3 * seed + n) for n in range(3))
        ops = [torch.rand(2, 1, 1, 300, generator=torch.Generator().manual_seed(seed)) > 0.2] if mask else []
        recorded.clear()
        out, lse = hopper.forward(q, k, v, ops, prog)
        runs.append(_roles(list(recorded), (q, k, v, *ops), (out, lse)))
    fwd = [r for r in runs[0] if r[3] and dict(r[3]).get("PERSISTENT")]
    assert len(fwd) == 1 and fwd[0][1] == (2 * 4 * 3, 1, 1), runs[0]
    assert fwd[0][2][-2:] == (2, 4)       # B, Hq
    assert runs[1] == runs[0] and runs[2] == runs[0]
