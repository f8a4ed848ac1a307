"""The Hopper forward's call plan without a GPU: a call through the plan (kernels/hopper.py `_Plan`, the tile-list
pre-pass and the empty-row fill it pins) launches exactly what the unplanned first call launched — the same
kernels, grids, constexprs and integer arguments, with every tensor argument in the same role (this call's
q / k / v / operands, or the same buffer the call allocated, of the same shape, strides and dtype).

Launches are recorded, not run (`kernel[grid](...)` is replaced; Gluon does not run in the interpreter), and the
tuner is stood in for by one that has settled on its first schedule, as on the GPU after tuning. Whether the
kernels compute the right numbers is tests/gpu's job.
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import hopper, mask_tiles
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


def test_plan_holds_no_tensors(recorded):
    """A plan outlives its calls: it must not keep their tensors (memory; CUDA graph pools check for leaks)."""
    qshape, kshape, layout, make_ops, prog = CASES["key-padding-uniform"]
    q, k, v = (_fresh(s, layout) for s in (qshape, kshape, kshape))
    hopper.forward(q, k, v, make_ops(), prog)
    plan = next(iter(hopper._PLANS.values()))
    held = plan_checks.tensors_held([plan])
    assert not held, held
