"""The Hopper call plans without a GPU: a call through the forward's plan (kernels/hopper.py `_Plan`, the tile-list
pre-pass and the empty-row fill it pins) or the warp-specialized backward's (kernels/hopper_bwd.py `_WsPlan` inside
triton_portable's backward plan) launches exactly what the unplanned first call launched — the same kernels,
grids, constexprs and integer arguments, with every tensor argument in the same role (this call's inputs, its
returned gradients, or the same buffer the call allocated, of the same shape, strides and dtype).

Launches are recorded, not run (`kernel[grid](...)` is replaced; Gluon does not run in the interpreter), and the
tuner is stood in for by one that has settled on its first schedule, as on the GPU after tuning. Whether the
kernels compute the right numbers is tests/gpu's job.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from fa3_inductor.kernels import hopper, hopper_bwd, mask_tiles
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels import uniform_fill as uf
from fa3_inductor.kernels.program import ScoreProgram

import plan_checks

try:
    import triton.experimental.gluon  # noqa: F401
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import KernelInterface
    _HAVE = True
except Exception:   # pragma: no cover - depends on the Triton build
    _HAVE = False

pytestmark = pytest.mark.skipif(not _HAVE, reason="Triton without Gluon")

S = ("score",)


@pytest.fixture
def recorded(monkeypatch):
    """Every kernel[grid](*args, **kwargs) is appended to the returned list instead of running."""
    calls = []

    def getitem(kernel, grid):
        return lambda *args, **kwargs: calls.append((kernel, grid, args, kwargs))

    def settled(kind, key, d, dtype, device, launch, configs=None, interpret_config=None):
        cfg = (configs or tp._CONFIGS[kind](d, dtype))[0]
        launch(cfg)
        return cfg

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    monkeypatch.setattr(tp, "_launch_tuned", settled)
    hopper._PLANS.clear(), mask_tiles._PLANS.clear(), uf._PLANS.clear()
    yield calls
    hopper._PLANS.clear(), mask_tiles._PLANS.clear(), uf._PLANS.clear()


def _roles(calls, inputs, returned):
    """The launches with each tensor replaced by its role: an input by its position, a returned tensor by its
    position, any other by the order it first appeared in (plus shape, strides, dtype); descriptors likewise."""
    seen = {}

    def role(t):
        for name, group in (("in", inputs), ("out", returned)):
            for i, x in enumerate(group):
                if t is x:
                    return (name, i)
        if id(t) not in seen:
            seen[id(t)] = len(seen)
        return ("new", seen[id(t)], tuple(t.shape), t.stride(), t.dtype)

    def arg(a):
        if isinstance(a, torch.Tensor):
            return role(a)
        if isinstance(a, TensorDescriptor):
            return ("desc", role(a.base), tuple(a.shape), tuple(a.strides), tuple(a.block_shape), repr(a.layout))
        assert type(a) in (int, bool, float), type(a)
        return a

    return [(id(kernel), tuple(grid), tuple(arg(a) for a in args), sorted(kwargs.items()))
            for kernel, grid, args, kwargs in calls]


def _fresh(shape, layout, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, s, d = shape
    if layout == "bshd":
        return torch.randn(b, s, h, d, generator=g).to(dtype).transpose(1, 2)
    return torch.randn(b, h, s, d, generator=g).to(dtype)


def _where(n, rule, causal="none"):
    return ScoreProgram(("where", ("operand", n), ("mul", S, ("const", 0.125)), ("const", -math.inf)), n + 1,
                        causal=causal, empty_row=rule)


def _pad(b, sk):
    keep = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    keep[-1, ..., sk // 2:] = False
    return keep


CASES = {
    # BERT's padded batch (sdpa: SDPA's empty rows; eager: the uniform rows of finfo.min fills)
    "key-padding-zero": ((2, 4, 300, 64), (2, 4, 300, 64), "bshd", lambda: [_pad(2, 300)], _where(0, "zero")),
    "key-padding-uniform": ((2, 4, 300, 64), (2, 4, 300, 64), "bshd", lambda: [_pad(2, 300)], _where(0, "uniform")),
    "dense-bool-gqa": ((2, 8, 200, 128), (2, 2, 333, 128), "bhsd",
                       lambda: [torch.rand(2, 1, 200, 333, generator=torch.Generator().manual_seed(1)) > 0.3],
                       _where(0, "nan")),
    "dense-additive": ((1, 4, 256, 64), (1, 4, 256, 64), "bhsd",
                       lambda: [torch.zeros(1, 4, 256, 256, dtype=torch.float16)],
                       ScoreProgram(("add", ("mul", S, ("const", 0.125)), ("operand", 0)), 1, empty_row="uniform")),
    "causal-no-operand": ((1, 4, 200, 64), (1, 4, 200, 64), "bhsd", lambda: [],
                          ScoreProgram(("mul", S, ("const", 0.125)), causal="bottom_right")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_planned_call_launches_what_the_first_call_did(recorded, name):
    qshape, kshape, layout, make_ops, prog = CASES[name]
    runs = []
    for seed in range(3):
        q, k, v = _fresh(qshape, layout, seed=3 * seed), _fresh(kshape, layout, seed=3 * seed + 1), \
            _fresh(kshape, layout, seed=3 * seed + 2)
        ops = make_ops()
        keep = [torch.empty(7) for _ in range(seed)]   # new data pointers from call to call
        recorded.clear()
        out, lse = hopper.forward(q, k, v, ops, prog)
        runs.append(_roles(list(recorded), (q, k, v, *ops), (out, lse)))
        del keep
    assert any(key[0] == "hopper" and key[1] == prog for key in hopper._PLANS), "no plan was made"
    n_pre = 1 if hopper._tile_lists(q, k, ops, prog, hopper.config(q.shape[-1], v.shape[-1])[0]) else 0
    assert len(runs[0]) == 1 + n_pre + (prog.empty_row == "uniform"), runs[0]
    assert runs[1] == runs[0]
    assert runs[2] == runs[0]


def test_portable_candidate_only_at_small_head_dims():
    assert hopper.candidates(64, 64, causal=True)[-1] == hopper.PORTABLE
    assert hopper.candidates(64, 64, causal=False)[:-1] == hopper.schedules(64, 64, causal=False)
    for d in (96, 128, 256):
        assert hopper.PORTABLE not in hopper.candidates(d, d, causal=True)


@pytest.mark.parametrize("name", ["key-padding-uniform", "causal-no-operand", "dense-additive"])
def test_forward_settled_on_portable_plans_the_portable_call(recorded, monkeypatch, name):
    """The tuner settled on the portable candidate (as on the H100 at D=64 S=1k causal): the first call launches
    the portable forward into the call's out / lse (plus the Hopper path's tile-list pre-pass, computed before
    tuning), and later calls under its key launch just what triton_portable.forward launches, through the plan."""
    def settled(kind, key, d, dtype, device, launch, configs=None, interpret_config=None):
        configs = configs or tp._CONFIGS[kind](d, dtype)
        cfg = hopper.PORTABLE if kind == "hopper_fwd" else configs[0]
        assert cfg in configs
        launch(cfg)
        return cfg

    monkeypatch.setattr(tp, "_launch_tuned", settled)
    qshape, kshape, layout, make_ops, prog = CASES[name]
    runs, portable_runs = [], []
    for seed in range(3):
        q, k, v = (_fresh(s, layout, seed=3 * seed + i) for i, s in enumerate((qshape, kshape, kshape)))
        ops = make_ops()
        recorded.clear()
        out, lse = hopper.forward(q, k, v, ops, prog)
        runs.append(_roles(list(recorded), (q, k, v, *ops), (out, lse)))
        recorded.clear()
        out2, lse2 = tp.forward(q, k, v, ops, prog)
        portable_runs.append(_roles(list(recorded), (q, k, v, *ops), (out2, lse2)))
        assert out.shape == out2.shape and out.stride() == out2.stride() and lse.shape == lse2.shape
    assert [p for key, p in hopper._PLANS.items() if key[1] == prog] == [hopper.PORTABLE]
    fwd = tp._prepare(q, k, v, ops, prog)[1].attn_fwd
    assert runs[1] == runs[2] == portable_runs[1] and runs[1][0][0] == id(fwd)
    n_pre = 1 if hopper._tile_lists(q, k, ops, prog, hopper.config(q.shape[-1], v.shape[-1])[0]) else 0
    assert len(runs[0]) == len(runs[1]) + n_pre and runs[0][n_pre:] == runs[1]


def test_plan_holds_no_tensors(recorded):
    """A plan outlives its calls: it must not keep their tensors (memory; CUDA graph pools check for leaks)."""
    qshape, kshape, layout, make_ops, prog = CASES["key-padding-uniform"]
    q, k, v = (_fresh(s, layout) for s in (qshape, kshape, kshape))
    hopper.forward(q, k, v, make_ops(), prog)
    plan = next(iter(hopper._PLANS.values()))
    held = plan_checks.tensors_held([plan])
    assert not held, held


# --- the warp-specialized backward's plan ----------------------------------------------------------------------

def _scaled(d, causal="none", empty_row="nan"):
    return ScoreProgram(("mul", S, ("const", d ** -0.5)), causal=causal, empty_row=empty_row)


BWD_CASES = {
    # (q shape, k shape, layout of q / k / v and dout, operands, program)
    "causal-d64": ((1, 4, 200, 64), (1, 4, 200, 64), "bhsd", lambda: [], _scaled(64, "top_left")),
    "causal-gqa-d128": ((2, 8, 200, 128), (2, 2, 333, 128), "bshd", lambda: [], _scaled(128, "bottom_right")),
    "key-padding-zero-d64": ((2, 4, 300, 64), (2, 4, 300, 64), "bshd", lambda: [_pad(2, 300)], _where(0, "zero")),
    "key-padding-uniform-d128": ((2, 4, 150, 128), (2, 4, 150, 128), "bshd", lambda: [_pad(2, 150)],
                                 ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", 0.125)),
                                               ("const", -math.inf)), 1, empty_row="uniform")),
    # a float operand: rows whose lse may lose log l (attn_bwd_imprecise's two launches around the step)
    "dense-additive-gqa-d64": ((1, 4, 256, 64), (1, 2, 256, 64), "bhsd",
                               lambda: [torch.zeros(1, 1, 256, 256, dtype=torch.float16)],
                               ScoreProgram(("add", ("mul", S, ("const", 0.125)), ("operand", 0)), 1)),
}


@pytest.fixture
def recorded_bwd(recorded, monkeypatch):
    """`recorded`, with the tuner settled on `choice[0]` (an index into its candidates) for the backward's step."""
    choice = [0]

    def settled(kind, key, d, dtype, device, launch, configs=None, interpret_config=None):
        configs = configs or tp._CONFIGS[kind](d, dtype)
        cfg = configs[choice[0] if kind == "ws_bwd" else 0]
        launch(cfg)
        return cfg

    monkeypatch.setattr(tp, "_launch_tuned", settled)
    tp._BWD_PLANS.clear()
    yield recorded, choice
    tp._BWD_PLANS.clear()


def _bwd_call(qshape, kshape, layout, make_ops, seed, dout_of=None):
    q, k, v = _fresh(qshape, layout, seed=4 * seed), _fresh(kshape, layout, seed=4 * seed + 1), \
        _fresh(kshape, layout, seed=4 * seed + 2)
    ops = make_ops()
    out = _fresh(qshape, layout, seed=4 * seed + 3)
    lse = torch.randn(qshape[:3])
    dout = (dout_of or (lambda o: _fresh(o.shape, layout, seed=99 + seed)))(out)
    return dout, q, k, v, ops, out, lse


@pytest.mark.parametrize("name", list(BWD_CASES))
def test_planned_backward_launches_what_the_first_call_did(recorded_bwd, name):
    """For each candidate the tuner may settle on (every warp-specialized schedule, the D=64 ones, the portable
    kernels): calls 2 and 3 (through the plan, on new tensors) launch what call 1 (unplanned) did; dout, a
    transposed view in the "bshd" cases as torch.compile passes it, is read in place, not copied."""
    calls, choice = recorded_bwd
    qshape, kshape, layout, make_ops, prog = BWD_CASES[name]
    cands = hopper_bwd.candidates(qshape[-1])
    assert len(cands) == len(hopper_bwd.CANDIDATES) + (3 if qshape[-1] == 64 else 0)
    for i, cand in enumerate(cands):
        choice[0] = i
        tp._BWD_PLANS.clear()
        runs = []
        for seed in range(3):
            keep = [torch.empty(7) for _ in range(seed)]   # new data pointers from call to call
            inputs = _bwd_call(qshape, kshape, layout, make_ops, seed)
            calls.clear()
            dq, dk, dv, extra = hopper_bwd.backward(*inputs, prog)
            runs.append(_roles(list(calls), inputs, (dq, dk, dv, *extra)))
            del keep
        plan = next(iter(tp._BWD_PLANS.values()))
        step = plan.steps.get(hopper_bwd._STEP)
        if cand[0] == "ws":
            assert isinstance(step, hopper_bwd._WsPlan), cand
            ws = [r for r in runs[0] if any(type(a) is tuple and a[0] == "desc" for a in r[2])]
            assert len(ws) == 1, runs[0]
            assert ws[0][2][3][:2] == ("desc", ("in", 0)), "dout was copied"
            assert ws[0][3] == sorted(_ws_kwargs(cand, qshape[-1]).items()), cand
        else:
            assert step is tp.portable_grads, cand
        n = 1 + 2 + (prog.empty_row == "uniform") + 2 * (name.startswith("dense"))   # pre, step (2), specials
        assert len(runs[0]) == n, (cand, runs[0])
        assert runs[1] == runs[0], cand
        assert runs[2] == runs[0], cand


def _ws_kwargs(cand, d):
    kw = hopper_bwd.variant_of(cand)
    return dict(BLOCK_M=kw["block_m"], BLOCK_N=hopper_bwd.BLOCK_N,
                STAGES=kw["n_stages"] or hopper_bwd.stages(d, kw["dq_writer"], kw["block_m"]), DQ_LAG=kw["dq_lag"],
                DQ_ADD=kw["dq_add"], DQ_WRITER=kw["dq_writer"], DQ_EARLY=kw["dq_early"],
                STATS_SMEM=kw["stats_smem"], DQ_ALT=kw["dq_alt"], num_warps=4)


def _padded_head(o):
    """dout as a slice of wider rows: unit last stride, but 136-byte row strides (not TMA's 16-byte multiples)."""
    return torch.randn(*o.shape[:3], o.shape[3] + 4).half()[..., :o.shape[3]]


@pytest.mark.parametrize("dout_of,in_place", [
    (lambda o: torch.randn(o.shape).half(), True),
    (lambda o: torch.randn(o.shape[0], o.shape[2], o.shape[1], o.shape[3]).half().transpose(1, 2), True),
    (lambda o: torch.ones((), dtype=torch.float16).expand(o.shape), False),     # the gradient of out.sum()
    (lambda o: torch.randn(o.shape).half().transpose(2, 3).contiguous().transpose(2, 3), False),
    (_padded_head, False),
], ids=["contiguous", "transposed", "expanded", "head-dim-major", "padded-rows"])
def test_dout_copied_only_where_tma_cannot_read_it(recorded_bwd, dout_of, in_place):
    """The kernel's dout descriptor is on dout itself where TMA can read it, else on a contiguous copy; either
    way the planned calls launch what the first did."""
    calls, _ = recorded_bwd
    qshape, kshape, layout, make_ops, prog = BWD_CASES["causal-d64"]
    runs = []
    for seed in range(3):
        inputs = _bwd_call(qshape, kshape, layout, make_ops, seed, dout_of)
        assert hopper_bwd.tma_ready(inputs[0]) == in_place
        calls.clear()
        dq, dk, dv, extra = hopper_bwd.backward(*inputs, prog)
        runs.append(_roles(list(calls), inputs, (dq, dk, dv, *extra)))
        descs = [a for a in next(c for c in calls if any(isinstance(x, TensorDescriptor) for x in c[2]))[2]
                 if isinstance(a, TensorDescriptor)]
        do = descs[3].base
        assert (do is inputs[0]) == in_place
        assert do.stride(-1) == 1 and torch.equal(do, inputs[0])
    assert runs[1] == runs[0]
    assert runs[2] == runs[0]


def test_backward_plan_holds_no_tensors(recorded_bwd):
    qshape, kshape, layout, make_ops, prog = BWD_CASES["key-padding-uniform-d128"]
    hopper_bwd.backward(*_bwd_call(qshape, kshape, layout, make_ops, 0), prog)
    plan = next(iter(tp._BWD_PLANS.values()))
    assert isinstance(plan.steps[hopper_bwd._STEP], hopper_bwd._WsPlan)
    held = plan_checks.tensors_held([plan])
    assert not held, held
