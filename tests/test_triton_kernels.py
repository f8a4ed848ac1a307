"""The portable Triton kernels (kernels/triton_portable.py) on CPU through TRITON_INTERPRET=1.

Every case compares forward and backward with kernels/reference.py (exact NaN pattern, same dtypes and
shapes) and, by FlashAttention's accuracy rule, with an fp64 eager computation: the kernel's error versus
fp64 must stay within 2x the error of PyTorch eager in the same dtype, plus a small absolute guard.
Output buffers are poisoned with NaN so an element the kernels fail to write shows up.

Triton honours TRITON_INTERPRET only if it is set before triton is first imported in the process, so this
module runs in its own process with the variable set from the start (tests/test_interpreter_process.py
starts it); in any other process its tests are skipped with that reason and the other modules keep the
reference on CPU.
The interpreter computes bf16 tl.dot wrongly, so only fp16 and fp32 are tested here (tests/gpu covers bf16).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interpreter_sandbox import (  # noqa: E402  (tests/, on sys.path)
    INTERPRETER_ONLY, C, OP, S, interpreter_sandbox)

from eager_attention import eager  # noqa: E402
from fa3_inductor.kernels import codegen, reference
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram

pytestmark = INTERPRETER_ONLY


@pytest.fixture(autouse=True, scope="module")
def _interpret(tmp_path_factory):
    with interpreter_sandbox(tmp_path_factory.mktemp("fa3_cache"), [tp]):
        yield


# --- eager implementation (autograd) in any dtype -------------------------------------------------------

def run_eager(q, k, v, ops, prog, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    want = prog.operand_grad or (False,) * len(ops)
    opl = [t.detach().to(dtype).requires_grad_() if w else t for t, w in zip(ops, want)]
    out = eager(*leaves, opl, prog, dtype)
    wrt = leaves + [t for t, w in zip(opl, want) if w]
    grads = torch.autograd.grad(out, wrt, dout.to(dtype), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]


# --- comparison -----------------------------------------------------------------------------------------

GUARD = {torch.float32: 1e-5, torch.float16: 2e-3}


def check(name, ours, refpy, eag, r64):
    assert ours.shape == refpy.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(refpy.shape)}"
    assert ours.dtype == refpy.dtype, f"{name}: dtype {ours.dtype} vs reference {refpy.dtype}"
    nan_o, nan_r = torch.isnan(ours), torch.isnan(refpy)
    assert torch.equal(nan_o, nan_r), (f"{name}: NaN pattern differs from reference.py "
                                        f"({int(nan_o.sum())} vs {int(nan_r.sum())} NaNs)")
    keep = ~(nan_o | torch.isnan(r64) | torch.isnan(eag))
    a, e, r, rp = (t[keep].double() for t in (ours, eag, r64, refpy))
    if a.numel() == 0:
        return
    guard = GUARD[ours.dtype] * max(1.0, r.abs().max().item())
    ours_err = (a - r).abs().max().item()
    eager_err = (e - r).abs().max().item()
    assert ours_err <= 2 * eager_err + guard, \
        f"{name}: error vs fp64 {ours_err:.3g} > 2 x eager {eager_err:.3g} + {guard:.3g}"
    ref_err = (rp - r).abs().max().item()
    assert (a - rp).abs().max().item() <= 2 * eager_err + ref_err + guard, f"{name}: far from reference.py"


def attend_and_check(q, k, v, ops, prog, backward=True):
    dtype = q.dtype
    assert tp.supports(prog, q, k, v, ops) is None
    out, lse = tp.forward(q, k, v, ops, prog)
    rout, rlse = reference.forward(q, k, v, ops, prog)
    dout = torch.randn_like(out)
    eout, egr = run_eager(q, k, v, ops, prog, dout, dtype)
    out64, gr64 = run_eager(q, k, v, ops, prog, dout, torch.float64)
    check("out", out, rout, eout, out64)
    assert lse.dtype == torch.float32 and lse.shape == rlse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)) and not torch.isnan(lse).any()
    fin = torch.isfinite(rlse)
    torch.testing.assert_close(lse[fin], rlse[fin], atol=1e-4 if dtype == torch.float32 else 2e-3, rtol=1e-4)
    if not backward:
        return
    grads = tp.backward(dout, q, k, v, ops, out, lse, prog)
    rgr = reference.backward(dout, q, k, v, ops, prog)
    assert len(grads[3]) == len(rgr[3])
    names = ["dq", "dk", "dv"] + [f"d operand {n}" for n, w in enumerate(prog.operand_grad) if w]
    for name, a, r, e, r64 in zip(names, [*grads[:3], *grads[3]], [*rgr[:3], *rgr[3]], egr, gr64):
        check(name, a, r, e, r64)


def qkv(b, hq, hk, sq, sk, d, dtype, dv=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=gen).to(dtype)
    v = torch.randn(b, hk, sk, dv or d, generator=gen).to(dtype)
    return q, k, v


def scaled(d, **kw):
    return ScoreProgram(("mul", S, C(d ** -0.5)), **kw)


# --- cases ------------------------------------------------------------------------------------------------

BASIC = [
    # dtype, d, b, hq, hk, sq, sk, causal, window
    (torch.float16, 16, 1, 1, 1, 1, 33, "none", None),
    (torch.float16, 40, 2, 2, 1, 37, 45, "none", None),
    (torch.float32, 64, 1, 2, 2, 64, 64, "top_left", None),
    (torch.float16, 80, 1, 4, 1, 29, 45, "bottom_right", None),
    (torch.float32, 128, 1, 2, 1, 33, 50, "top_left", 5),
    (torch.float16, 128, 1, 1, 1, 64, 64, "bottom_right", 16),
    (torch.float32, 40, 1, 2, 1, 1, 64, "bottom_right", None),
    (torch.float16, 64, 2, 2, 2, 50, 1, "none", None),
    (torch.float32, 16, 1, 4, 2, 47, 31, "none", None),
    (torch.float16, 64, 1, 2, 1, 48, 48, "top_left", 0),
]


@pytest.mark.parametrize("dtype,d,b,hq,hk,sq,sk,causal,window", BASIC,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-g{c[3] // c[4]}-{c[5]}x{c[6]}-{c[7]}-w{c[8]}" for c in BASIC])
def test_scaled_attention(dtype, d, b, hq, hk, sq, sk, causal, window):
    q, k, v = qkv(b, hq, hk, sq, sk, d, dtype)
    attend_and_check(q, k, v, [], scaled(d, causal=causal, window=window))


def test_value_head_dim_differs():
    q, k, v = qkv(1, 2, 1, 30, 40, 40, torch.float16, dv=24)
    attend_and_check(q, k, v, [], scaled(40, causal="top_left"))


def test_strided_inputs():
    """(B, S, H, D) storage viewed as (B, H, S, D), and a k that is a slice of a wider tensor: no copies."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 35, 2, 64, generator=gen).half().transpose(1, 2)
    kv = torch.randn(2, 41, 1, 2 * 64, generator=gen).half().transpose(1, 2)
    k, v = kv[..., :64], kv[..., 64:]
    assert not q.is_contiguous() and not k.is_contiguous()
    attend_and_check(q, k, v, [], scaled(64, causal="bottom_right"))


BIAS_SHAPES = [(1, 2, 33, 41), (2, 1, 33, 41), (2, 1, 1, 41), (2, 2, 33, 41), (1, 2, 1, 1), (2, 2, 33, 1)]


@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=["x".join(map(str, s)) for s in BIAS_SHAPES])
def test_bias_operand_with_grad(shape):
    q, k, v = qkv(2, 2, 1, 33, 41, 32, torch.float32, seed=2)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    prog = ScoreProgram(("add", ("mul", S, C(32 ** -0.5)), OP(0)), n_operands=1, operand_grad=(True,),
                        causal="top_left")
    attend_and_check(q, k, v, [bias], prog)


def test_fp16_bias_broadcast_heads_with_grad():
    q, k, v = qkv(2, 4, 2, 40, 40, 64, torch.float16, seed=4)
    bias = torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(5)).half()
    prog = ScoreProgram(("add", ("mul", S, C(0.125)), OP(0)), n_operands=1, operand_grad=(True,))
    attend_and_check(q, k, v, [bias], prog)


@pytest.mark.parametrize("empty_row", ["nan", "zero"])
def test_bool_mask_with_empty_rows(empty_row):
    q, k, v = qkv(2, 2, 2, 36, 44, 40, torch.float16, seed=6)
    gen = torch.Generator().manual_seed(7)
    mask = torch.rand(2, 1, 36, 44, generator=gen) > 0.4
    mask[0, 0, 3] = False            # rows with no visible key
    mask[1, 0, 20] = False
    prog = ScoreProgram(("where", OP(0), ("mul", S, C(40 ** -0.5)), C(-math.inf)), n_operands=1,
                        empty_row=empty_row)
    attend_and_check(q, k, v, [mask], prog)


@pytest.mark.parametrize("empty_row", ["nan", "zero", "uniform"])
def test_structurally_empty_rows(empty_row):
    """bottom_right with Sq > Sk: the first Sq - Sk rows see no key at all (a scale-only program: the kernels
    fold the scale into exp2)."""
    q, k, v = qkv(1, 2, 1, 40, 24, 32, torch.float32, seed=8)
    attend_and_check(q, k, v, [], scaled(32, causal="bottom_right", empty_row=empty_row))


def test_key_padding_mask_bool_broadcast():
    q, k, v = qkv(2, 2, 1, 21, 37, 64, torch.float32, seed=9)
    mask = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    mask[0, ..., 30:] = False
    mask[1, ..., 11:] = False
    prog = ScoreProgram(("where", OP(0), ("mul", S, C(0.125)), C(-math.inf)), n_operands=1, causal="none")
    attend_and_check(q, k, v, [mask], prog)


@pytest.mark.parametrize("fill", [torch.finfo(torch.float32).min, -1e9])
def test_hf_additive_mask_with_fully_masked_row(fill):
    """HF Llama eager form: s·c + mask, mask = fill above the diagonal and on a padded query row.

    The fully masked row's output is what eager gives (the average of v over its largest scores). Its
    gradient: the kernels' fp32 lse = max + log(l) rounds to max at |max| ~ 3e38 (or 1e9), so the backward
    lists that row on the device and attn_bwd_imprecise computes it from the row's exact softmax; checked with a
    nonzero output gradient."""
    q, k, v = qkv(2, 2, 1, 33, 33, 64, torch.float32, seed=10)
    mask = torch.triu(torch.full((33, 33), fill), 1).expand(2, 1, 33, 33).clone()
    mask[1, 0, 5] = fill               # a fully masked row
    prog = ScoreProgram(("add", ("mul", S, C(0.125)), OP(0)), n_operands=1)
    attend_and_check(q, k, v, [mask], prog)


UNIFORM = [
    # dtype, hq, hk, sq, sk, causal, window, left padding of batch row 1
    (torch.float32, 2, 1, 37, 37, "top_left", None, 9),
    (torch.float32, 4, 2, 21, 45, "bottom_right", None, 30),
    (torch.float32, 2, 2, 40, 40, "top_left", 6, 17),
    (torch.float16, 2, 1, 33, 33, "top_left", None, 0),
    (torch.float16, 4, 2, 40, 24, "bottom_right", None, 0),     # Sq > Sk: the first 16 rows see no key
    (torch.float16, 4, 1, 33, 45, "none", None, 45),            # batch row 1 wholly padded: every row empty
]


@pytest.mark.parametrize("dtype,hq,hk,sq,sk,causal,window,pad", UNIFORM,
                         ids=[f"{str(c[0])[6:]}-{c[3]}x{c[4]}-{c[5]}-w{c[6]}-pad{c[7]}" for c in UNIFORM])
def test_proven_hf_mask_uniform_rows(dtype, hq, hk, sq, sk, causal, window, pad):
    """A mask proven from the graph (patterns/mask_proof.py): structural causal / window, a (B, 1, 1, Sk)
    padding operand, and empty_row="uniform" for the rows left padding empties (eager's finfo.min rows: the
    mean of v, gradient through the scores), with a nonzero output gradient on every row."""
    q, k, v = qkv(2, hq, hk, sq, sk, 32, dtype, seed=18)
    keys = torch.ones(2, 1, 1, sk, dtype=torch.bool)
    keys[1, ..., :pad] = False
    prog = ScoreProgram(("where", OP(0), ("mul", S, C(32 ** -0.5)), C(-math.inf)), n_operands=1, causal=causal,
                        window=window, empty_row="uniform")
    attend_and_check(q, k, v, [keys], prog)
    _, lse = tp.forward(q, k, v, [keys], prog)
    structural = causal == "bottom_right" and sq > sk
    assert bool(torch.isinf(lse[1]).any()) == bool(pad or structural)
    assert bool(torch.isinf(lse[0]).any()) == structural


def _uniform_bias_case(dtype, bias_shape, seed, d=32, dv=None):
    """Causal bottom_right with Sq > Sk (rows with no key), left padding of batch row 1, GQA, and a float bias
    inside the unmasked expression that wants a gradient (T5-like)."""
    q, k, v = qkv(2, 4, 2, 37, 29, d, dtype, dv=dv, seed=seed)
    keys = torch.ones(2, 1, 1, 29, dtype=torch.bool)
    keys[1, ..., :11] = False
    bias = torch.randn(bias_shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    prog = ScoreProgram(("where", OP(0), ("add", ("mul", S, C(d ** -0.5)), OP(1)), C(-math.inf)), n_operands=2,
                        causal="bottom_right", empty_row="uniform", operand_grad=(False, True))
    return q, k, v, [keys, bias], prog


@pytest.mark.parametrize("dtype,bias_shape,d,dv", [(torch.float32, (1, 4, 37, 29), 32, None),
                                                   (torch.float16, (2, 1, 1, 29), 40, 24)],
                         ids=["fp32-bias1x4x37x29", "fp16-bias2x1x1x29-d40-dv24"])
def test_uniform_rows_bias_grad(dtype, bias_shape, d, dv):
    """empty_row="uniform" rows send eager's gradient into a float bias too (attn_bwd_uniform's d operand);
    also with padded head dims (D=40, Dv=24)."""
    attend_and_check(*_uniform_bias_case(dtype, bias_shape, seed=40, d=d, dv=dv))


def test_uniform_rows_beside_dense_finfo_min_rows():
    """A bool padding operand empties rows (uniform) while a float finfo.min mask fully covers another row
    (finite lse ~ finfo.min: attn_bwd_imprecise): both corrections in one backward."""
    q, k, v = qkv(2, 2, 1, 33, 33, 32, torch.float32, seed=41)
    keys = torch.ones(2, 1, 1, 33, dtype=torch.bool)
    keys[1, ..., :7] = False
    fill = torch.zeros(2, 1, 33, 33)
    fill[0, 0, 12] = torch.finfo(torch.float32).min
    prog = ScoreProgram(("where", OP(0), ("add", ("mul", S, C(32 ** -0.5)), OP(1)), C(-math.inf)), n_operands=2,
                        causal="top_left", empty_row="uniform")
    attend_and_check(q, k, v, [keys, fill], prog)
    assert reference.imprecise_rows(prog, tp.forward(q, k, v, [keys, fill], prog)[1], [keys, fill]) == (12, 13)


def test_uniform_rows_none_empty_leave_gradients_alone():
    """With no empty row attn_bwd_uniform finds an empty work list: gradients bit-equal to empty_row="zero"."""
    q, k, v = qkv(2, 4, 2, 35, 35, 32, torch.float16, seed=42)
    keys = torch.ones(2, 1, 1, 35, dtype=torch.bool)
    keys[1, ..., 30:] = False         # right padding: every row keeps a key under top_left causal
    bias = torch.randn(1, 4, 35, 35, generator=torch.Generator().manual_seed(43)).half()
    expr = ("where", OP(0), ("add", ("mul", S, C(32 ** -0.5)), OP(1)), C(-math.inf))
    grads = {}
    for rule in ("uniform", "zero"):
        prog = ScoreProgram(expr, n_operands=2, causal="top_left", empty_row=rule, operand_grad=(False, True))
        out, lse = tp.forward(q, k, v, [keys, bias], prog)
        assert torch.isfinite(lse).all()
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(44)).half()
        dq, dk, dv, dops = tp.backward(dout, q, k, v, [keys, bias], out, lse, prog)
        grads[rule] = [dq, dk, dv, *dops]
    for a, b in zip(grads["uniform"], grads["zero"]):
        assert torch.equal(a, b)


PADDED = [("zero", None), ("uniform", None), ("nan", None), ("uniform", "bias"), ("nan", "finfo.min")]


@pytest.mark.parametrize("rule,extra", PADDED, ids=[f"{r}-{e}" for r, e in PADDED])
def test_padded_backward_strided_dout_and_repeated_calls(rule, extra):
    """The padded-batch backward as torch.compile calls it: dout a transposed view of a (B, S, H, D) gradient
    (read through its strides, no copy) gives bit for bit the gradients of its contiguous copy; and later calls
    with fresh tensors of the same layouts (the backward's per-call-key plan) give bit for bit what a fresh
    plan gives, also when imprecise rows (attn_bwd_imprecise) or uniform rows come in."""
    b, hq, hk, sq, sk, d = 2, 4, 2, 29, 37, 32
    keys = torch.ones(b, 1, 1, sk, dtype=torch.bool)
    keys[0, ..., 25:] = False
    keys[1, ..., :sk] = rule == "nan"        # batch row 1 wholly padded (empty rows) except under "nan"
    keys[1, ..., 30:] = False
    ops, expr, grad = [keys], ("where", OP(0), ("mul", S, C(d ** -0.5)), C(-math.inf)), ()
    if extra == "bias":
        ops.append(torch.randn(1, hq, sq, sk, generator=torch.Generator().manual_seed(51)))
        expr, grad = ("where", OP(0), ("add", ("mul", S, C(d ** -0.5)), OP(1)), C(-math.inf)), (False, True)
    elif extra == "finfo.min":
        fill = torch.zeros(b, 1, sq, sk)
        fill[0, 0, 7] = torch.finfo(torch.float32).min     # a fully covered row: an imprecise one
        ops.append(fill)
        expr = ("where", OP(0), ("add", ("mul", S, C(d ** -0.5)), OP(1)), C(-math.inf))
    prog = ScoreProgram(expr, n_operands=len(ops), empty_row=rule, operand_grad=grad)

    def same(x, y):
        for a, w in zip([*x[:3], *x[3]], [*y[:3], *y[3]]):
            assert torch.equal(a.nan_to_num(5.0), w.nan_to_num(5.0)) and torch.equal(a.isnan(), w.isnan())

    calls = []
    tp._BWD_PLANS.clear()
    for seed in range(3):       # the first call makes the plan, the others run through it
        gen = torch.Generator().manual_seed(60 + seed)
        q = torch.randn(b, sq, hq, d, generator=gen).transpose(1, 2)
        k, v = torch.randn(b, hk, sk, d, generator=gen), torch.randn(b, hk, sk, d, generator=gen)
        out, lse = tp.forward(q, k, v, ops, prog)
        dout = torch.randn(b, sq, hq, d, generator=gen).transpose(1, 2)
        calls.append(((q, k, v, dout, out, lse), tp.backward(dout, q, k, v, ops, out, lse, prog)))
    for (q, k, v, dout, out, lse), got in calls:
        tp._BWD_PLANS.clear()
        same(got, tp.backward(dout, q, k, v, ops, out, lse, prog))                # a fresh plan
        tp._BWD_PLANS.clear()
        same(got, tp.backward(dout.contiguous(), q, k, v, ops, out, lse, prog))   # contiguous dout
    if extra == "finfo.min":
        assert reference.imprecise_rows(prog, lse, ops) == (7, 8)
    rgr = reference.backward(dout, q, k, v, ops, prog)
    for a, r in zip(got[:3], rgr[:3]):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, equal_nan=True)


# rows a dense additive mask covers entirely: fp32 lse = max + log l loses log l (attn_bwd_imprecise)
IMPRECISE = [
    # dtype, fill, hq, hk, sq, sk, causal, mask heads (1: HF's (B, 1, Sq, Sk); hq: one mask per head)
    (torch.float32, "finfo.min", 4, 2, 45, 37, "none", 1),
    (torch.float32, -1e9, 2, 1, 33, 50, "top_left", 1),
    (torch.float16, "finfo.min", 4, 2, 33, 40, "bottom_right", 4),
    (torch.float16, "finfo.min", 2, 2, 37, 45, "none", 1),
]


def _imprecise_case(dtype, fill, hq, hk, sq, sk, causal, mask_heads, seed, bias=False):
    """The HF eager form s·c + mask with a dense additive mask (in the model's dtype, as HF builds it; fill
    finfo.min of that dtype or -1e9 in fp32): random partly masked rows, fully masked rows at block edges, the
    left-padded rows of batch row 1 and (per-head masks) one head's row; bias: a float (1, Hq, Sq, Sk) bias
    with a gradient, added inside."""
    q, k, v = qkv(2, hq, hk, sq, sk, 32, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    vis = torch.rand(2, mask_heads, sq, sk, generator=gen) > 0.3
    vis[0, :, 3] = False
    vis[0, :, sq - 1] = False
    vis[1, :, :6] = False
    if mask_heads > 1:
        vis[1, 1, 20] = False
    mdt = dtype if fill == "finfo.min" else torch.float32
    hide = torch.finfo(mdt).min if fill == "finfo.min" else fill
    mask = torch.where(vis, 0.0, hide).to(mdt)
    y = ("add", ("mul", S, C(32 ** -0.5)), OP(0))
    ops = [mask]
    if bias:
        ops.append(torch.randn(1, hq, sq, sk, generator=gen).to(dtype))
        y = ("add", y, OP(1))
    prog = ScoreProgram(y, n_operands=len(ops), causal=causal, operand_grad=(False, True) if bias else ())
    return q, k, v, ops, prog


@pytest.mark.parametrize("dtype,fill,hq,hk,sq,sk,causal,mask_heads", IMPRECISE,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-g{c[2] // c[3]}-{c[4]}x{c[5]}-{c[6]}-mh{c[7]}"
                              for c in IMPRECISE])
def test_imprecise_rows_dense_mask(dtype, fill, hq, hk, sq, sk, causal, mask_heads):
    """Fully masked rows of a dense finfo.min / -1e9 mask beside partly masked ones, with GQA and structural
    masks: gradients by the 2x rule against eager and fp64, and against reference.backward."""
    q, k, v, ops, prog = _imprecise_case(dtype, fill, hq, hk, sq, sk, causal, mask_heads, seed=70)
    out, lse = tp.forward(q, k, v, ops, prog)
    assert ((lse.abs() > reference.IMPRECISE_LSE) & lse.isfinite()).any(), "no imprecise row: the case tests nothing"
    attend_and_check(q, k, v, ops, prog)
    # eager in fp16 rounds s·c + finfo.min to one value per row, so the 2x rule is loose there: also against the
    # reference's exact softmax of those rows
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(71)).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for a, r in zip(tp.backward(dout, q, k, v, ops, out, lse, prog)[:3], reference.backward(dout, q, k, v, ops, prog)):
        torch.testing.assert_close(a, r, atol=tol * max(1.0, r.nan_to_num().abs().max().item()), rtol=tol,
                                   equal_nan=True)


def test_imprecise_rows_bias_grad():
    """A float bias with a gradient beside a finfo.min mask: d(bias) on the imprecise rows comes from
    attn_bwd_imprecise's PART 1 (added into attn_bwd_dq's d(operand) tiles)."""
    attend_and_check(*_imprecise_case(torch.float32, "finfo.min", 4, 2, 35, 29, "none", 1, seed=72, bias=True))


@pytest.mark.parametrize("empty_row", ["zero", "uniform"])
def test_imprecise_rows_beside_empty_rows(empty_row):
    """A -1e9 float mask's fully masked rows beside the rows a bool key-padding operand empties, under the other
    empty-row rules ("nan": the tests above): the imprecise rows' work list sits at the start of FLAG ("zero")
    or after the uniform rows' list ("uniform")."""
    q, k, v = qkv(2, 4, 1, 40, 40, 32, torch.float32, seed=78)
    gen = torch.Generator().manual_seed(79)
    vis = torch.rand(2, 1, 40, 40, generator=gen) > 0.3
    vis[0, :, 5] = False
    vis[1, :, :4] = False
    keys = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keys[1, ..., 30:] = False
    prog = ScoreProgram(("where", OP(1), ("add", ("mul", S, C(32 ** -0.5)), OP(0)), C(-math.inf)), n_operands=2,
                        empty_row=empty_row, causal="top_left")
    ops = [torch.where(vis, 0.0, -1e9), keys]
    attend_and_check(q, k, v, ops, prog)
    out, lse = tp.forward(q, k, v, ops, prog)
    dout = torch.randn(out.shape, generator=gen)
    for a, r in zip(tp.backward(dout, q, k, v, ops, out, lse, prog)[:3], reference.backward(dout, q, k, v, ops, prog)):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, equal_nan=True)


_SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "equal", "allclose",
             "unique", "_unique2", "unique_dim", "unique_consecutive")


class _FailOnSync(TorchDispatchMode):
    """Fails on every aten op that reads a device value back to the host (bool(), item(), nonzero, ...): on a
    GPU each is a sync."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            raise AssertionError(f"host sync: aten::{name}")
        return func(*args, **(kwargs or {}))


def test_imprecise_rows_backward_makes_no_host_sync(monkeypatch):
    """The backward of a program that can have imprecise rows reads nothing back from the device, with such
    rows and without (the reference's host-side finder must not be called either)."""
    q, k, v, ops, prog = _imprecise_case(torch.float32, "finfo.min", 4, 2, 45, 37, "top_left", 1, seed=74)
    with pytest.raises(AssertionError, match="host sync"), _FailOnSync():
        bool(ops[0].any())         # the guard catches what the old path did
    for mask in (ops[0], torch.zeros_like(ops[0])):
        out, lse = tp.forward(q, k, v, [mask], prog)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(75))
        want = reference.backward(dout, q, k, v, [mask], prog)
        tp.backward(dout, q, k, v, [mask], out, lse, prog)      # plan and compile outside the check
        monkeypatch.setattr(reference, "imprecise_rows", lambda *a, **kw: pytest.fail("imprecise_rows called"))
        with _FailOnSync():
            got = tp.backward(dout, q, k, v, [mask], out, lse, prog)
        monkeypatch.undo()
        for a, r in zip(got[:3], want[:3]):
            torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", ["uniform", "imprecise"])
def test_special_rows_independent_of_program_count(monkeypatch, rows):
    """attn_bwd_uniform's / attn_bwd_imprecise's programs stride over the work lists; each output has one owner
    item, so the result is the same (bit for bit) with one program or several."""
    if rows == "uniform":
        q, k, v, ops, prog = _uniform_bias_case(torch.float32, (1, 4, 37, 29), seed=45)
    else:
        q, k, v, ops, prog = _imprecise_case(torch.float32, "finfo.min", 4, 2, 35, 29, "none", 1, seed=76, bias=True)
    out, lse = tp.forward(q, k, v, ops, prog)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(46 if rows == "uniform" else 77))
    runs = []
    for n in (1, 4):
        monkeypatch.setattr(tp, "_UNIFORM_PROGRAMS_INTERPRET", n)
        dq, dk, dv, dops = tp.backward(dout, q, k, v, ops, out, lse, prog)
        runs.append([dq, dk, dv, *dops])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_softcap_tanh(dtype):
    q, k, v = qkv(1, 2, 1, 45, 45, 64, dtype, seed=11)
    q = q * 3
    cap = 20.0
    prog = ScoreProgram(("mul", ("tanh", ("div", ("mul", S, C(0.125)), C(cap))), C(cap)), causal="top_left")
    attend_and_check(q, k, v, [], prog)


def test_index_program_alibi():
    q, k, v = qkv(1, 2, 2, 30, 38, 32, torch.float32, seed=12)
    prog = ScoreProgram(("add", ("mul", S, C(32 ** -0.5)),
                         ("mul", C(-0.25), ("abs", ("sub", ("q_idx",), ("k_idx",))))))
    attend_and_check(q, k, v, [], prog)


def test_expression_zoo():
    """sigmoid, exp, maximum, minimum, neg, logical ops, comparisons on indices, bool and float operands."""
    q, k, v = qkv(1, 2, 1, 34, 34, 16, torch.float32, seed=13)
    gen = torch.Generator().manual_seed(14)
    keep = torch.rand(1, 1, 34, 34, generator=gen) > 0.2
    bias = torch.randn(1, 2, 1, 34, generator=gen)
    x = ("mul", S, C(0.25))
    expr = ("where",
            ("and", ("ge", ("q_idx",), ("k_idx",)), ("or", OP(0), ("not", ("lt", ("k_idx",), C(3.0))))),
            ("add", ("maximum", x, ("neg", ("exp", C(1.0)))),
             ("mul", ("sigmoid", OP(1)), ("minimum", ("abs", x), C(2.0)))),
            C(-math.inf))
    prog = ScoreProgram(expr, n_operands=2, operand_grad=(False, True))
    attend_and_check(q, k, v, [keep, bias], prog)


def test_zero_length_keys_and_batch():
    q, k, v = qkv(0, 2, 1, 5, 7, 16, torch.float32)
    out, lse = tp.forward(q, k, v, [], scaled(16))
    assert out.shape == (0, 2, 5, 16) and lse.shape == (0, 2, 5)


# --- plumbing ---------------------------------------------------------------------------------------------

def test_supports_reasons():
    q, k, v = qkv(1, 1, 1, 4, 4, 16, torch.float32)
    assert tp.supports(scaled(16), q, k, v, []) is None
    big = torch.randn(1, 1, 4, 320)
    assert "head dim 320 > 256" in tp.supports(scaled(320), big, big, big, [])
    assert "bf16" in tp.supports(scaled(16), q.bfloat16(), k.bfloat16(), v.bfloat16(), [])
    m = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    prog = ScoreProgram(("add", S, ("add", OP(0), OP(0))), n_operands=1)
    assert "boolean" in tp.supports(prog, q, k, v, [m])


def test_debug_dir_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FA3_DEBUG_DIR", str(tmp_path))
    q, k, v = qkv(1, 2, 1, 17, 17, 24, torch.float16, seed=15)
    prog = ScoreProgram(("mul", S, C(0.2)), causal="top_left", window=3)
    spec = codegen.make_spec(prog, q, k, v, [], True)
    codegen._MODULES.pop(spec.key(), None)
    tp._SPECS.clear()
    tp.forward(q, k, v, [], prog)
    files = list(tmp_path.glob("*.py"))
    assert len(files) == 1 and spec.key() in files[0].name
    text = files[0].read_text()
    assert "causal=top_left window=3" in text and "D=24 (block 32)" in text
    assert os.path.exists(os.path.join(codegen.cache_dir(), files[0].name))


def test_dispatch_and_op_autograd():
    from fa3_inductor import dispatch
    from fa3_inductor.op import attention
    q, k, v = qkv(1, 2, 1, 20, 20, 32, torch.float32, seed=16)
    prog = scaled(32, causal="top_left")
    entry, _ = dispatch.select(prog, q, k, v, [])
    assert entry.name == "triton"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, program=prog)
    out.sum().backward()
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_leaves, program=prog, kernel="reference")
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cfg", [
    {"fwd": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1), "dq": (16, 32, 4, 1)},
    {"fwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)},
], ids=["bm<bn", "bm=bn"])
@pytest.mark.parametrize("causal,window", [("bottom_right", 9), ("top_left", None), ("none", None)])
def test_block_shapes(cfg, causal, window, monkeypatch):
    monkeypatch.setattr(tp, "INTERPRET_CONFIGS", cfg)
    q, k, v = qkv(1, 2, 1, 39, 53, 32, torch.float16, seed=17)
    attend_and_check(q, k, v, [], scaled(32, causal=causal, window=window))


TWO_SWEEPS = [
    # dtype, d, hq, hk, sq, sk, causal, window, dkdv tiles (BLOCK_M, BLOCK_N, warps, stages, DV_BLOCK_M),
    # program: "scaled", "bias" (float bias with a gradient + key padding), "softcap" (tanh chain, nan rows)
    (torch.float16, 256, 2, 1, 37, 45, "top_left", None, (16, 32, 4, 1, 32), "scaled"),
    (torch.float32, 256, 2, 2, 33, 50, "bottom_right", 7, (32, 16, 4, 1, 16), "scaled"),
    (torch.float16, 256, 4, 2, 29, 29, "none", None, (16, 16, 4, 1, 32), "bias"),
    (torch.float32, 64, 4, 1, 45, 37, "top_left", None, (32, 32, 4, 1, 16), "softcap"),
    (torch.float16, 40, 2, 1, 40, 24, "bottom_right", None, (16, 32, 4, 1, 16), "uniform"),
]


@pytest.mark.parametrize("dtype,d,hq,hk,sq,sk,causal,window,cfg,kind", TWO_SWEEPS,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-g{c[2] // c[3]}-{c[4]}x{c[5]}-{c[6]}-{c[9]}-"
                              f"{'.'.join(map(str, c[8]))}" for c in TWO_SWEEPS])
def test_dkdv_two_sweeps(dtype, d, hq, hk, sq, sk, causal, window, cfg, kind, monkeypatch):
    """attn_bwd_dkdv's two-sweep schedule (dV over DV_BLOCK_M-query blocks, then dK over BLOCK_M-query blocks:
    the D=256 tiles on CUDA) gives the same gradients as the one-sweep schedule: same score program, masks,
    GQA and empty-row handling."""
    monkeypatch.setitem(tp.INTERPRET_CONFIGS, "dkdv", cfg)
    q, k, v = qkv(2, hq, hk, sq, sk, d, dtype, seed=31)
    gen = torch.Generator().manual_seed(32)
    ops = []
    if kind == "scaled":
        prog = scaled(d, causal=causal, window=window)
    elif kind == "bias":
        keys = torch.ones(2, 1, 1, sk, dtype=torch.bool)
        keys[1, ..., 20:] = False
        ops = [keys, torch.randn(1, hq, sq, sk, generator=gen).to(dtype)]
        prog = ScoreProgram(("where", OP(0), ("add", ("mul", S, C(d ** -0.5)), OP(1)), C(-math.inf)),
                            n_operands=2, operand_grad=(False, True), causal=causal)
    elif kind == "softcap":
        mask = torch.rand(2, 1, sq, sk, generator=gen) > 0.3
        mask[0, 0, 4] = False
        ops = [mask]
        prog = ScoreProgram(("where", OP(0), ("mul", ("tanh", ("mul", S, C(0.02))), C(30.0)), C(-math.inf)),
                            n_operands=1, causal=causal, empty_row="nan")
    else:
        keys = torch.ones(2, 1, 1, sk, dtype=torch.bool)
        keys[1, ..., :9] = False
        ops = [keys]
        prog = ScoreProgram(("where", OP(0), ("mul", S, C(d ** -0.5)), C(-math.inf)), n_operands=1,
                            causal=causal, empty_row="uniform")
    attend_and_check(q, k, v, ops, prog)


# --- random programs --------------------------------------------------------------------------------------

from hypothesis import given, strategies as st  # noqa: E402


@st.composite
def _float_expr(draw, depth):
    leaves = [("mul", S, C(draw(st.sampled_from([0.125, 0.3, -0.2])))),
              C(draw(st.floats(-3, 3, allow_nan=False).map(lambda x: round(x, 2)))),
              ("mul", ("q_idx",), C(0.05)), ("mul", ("k_idx",), C(-0.05)), OP(1)]
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(leaves))
    kind = draw(st.sampled_from(["tanh", "sigmoid", "abs", "neg", "exp_tanh", "add", "sub", "mul_c", "div_c",
                                 "maximum", "minimum", "where"]))
    a = draw(_float_expr(depth - 1))
    if kind == "exp_tanh":
        return ("exp", ("tanh", a))
    if kind in ("tanh", "sigmoid", "abs", "neg"):
        return (kind, a)
    if kind == "mul_c":
        return ("mul", a, C(draw(st.sampled_from([0.5, -1.5, 2.0]))))
    if kind == "div_c":
        return ("div", a, C(draw(st.sampled_from([0.5, -4.0]))))
    b = draw(_float_expr(depth - 1))
    if kind == "where":
        return ("where", draw(_bool_expr(depth - 1)), a, b)
    return (kind, a, b)


@st.composite
def _bool_expr(draw, depth):
    kind = draw(st.sampled_from(["operand", "cmp", "not", "and", "or"] if depth > 0 else ["operand", "cmp"]))
    if kind == "operand":
        return OP(0)
    if kind == "cmp":
        op = draw(st.sampled_from(["lt", "le", "gt", "ge", "ne"]))
        return (op, draw(_float_expr(0)), draw(_float_expr(0)))
    if kind == "not":
        return ("not", draw(_bool_expr(depth - 1)))
    return (kind, draw(_bool_expr(depth - 1)), draw(_bool_expr(depth - 1)))


@st.composite
def _programs(draw):
    body = draw(_float_expr(3))
    if draw(st.booleans()):
        body = ("add", ("mul", S, C(0.25)), body)  # keep the score in play
    if draw(st.booleans()):
        body = ("where", draw(_bool_expr(1)), body, C(-math.inf))
    causal = draw(st.sampled_from(["none", "top_left", "bottom_right"]))
    window = draw(st.sampled_from([None, 4])) if causal != "none" else None
    prog = ScoreProgram(body, n_operands=2, causal=causal, window=window,
                        empty_row=draw(st.sampled_from(["nan", "zero", "uniform"])),
                        operand_grad=(False, draw(st.booleans())))
    shape = draw(st.tuples(st.integers(1, 2), st.sampled_from([(1, 1), (2, 1), (2, 2)]), st.integers(1, 40),
                           st.integers(1, 40), st.sampled_from([16, 24, 32])))
    bias_shape = draw(st.sampled_from(["full", "b1", "h1", "m1", "n1"]))
    return prog, shape, bias_shape, draw(st.integers(0, 2 ** 16))


@given(_programs())
def test_random_programs(case):
    prog, (b, (hq, hk), sq, sk, d), bias_shape, seed = case
    q, k, v = qkv(b, hq, hk, sq, sk, d, torch.float32, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
    full = [b, hq, sq, sk]
    if bias_shape != "full":
        full[{"b1": 0, "h1": 1, "m1": 2, "n1": 3}[bias_shape]] = 1
    bias = torch.randn(full, generator=gen)
    attend_and_check(q, k, v, [mask, bias], prog)


# --- the dense-mask tile pre-pass (kernels/mask_tiles.py) ----------------------------------------------

def _tiles_brute(m, kind, sq, sk, bm, bn):
    """Per (batch*head, row block): list of (key block, class) the kernel must visit, by plain torch."""
    if kind == "bool":
        visible, neutral = m, m
    else:
        visible, neutral = m > -1.7e38, m == 0
    out = {}
    bh = m.shape[0] * m.shape[1]
    vis = visible.reshape(bh, sq, sk)
    neu = neutral.reshape(bh, sq, sk)
    for g in range(bh):
        for mb in range(-(-sq // bm)):
            rows = slice(mb * bm, min(sq, (mb + 1) * bm))
            rows_ok = bool(vis[g, rows].any(-1).all())
            kept = []
            for nb in range(-(-sk // bn)):
                cols = slice(nb * bn, min(sk, (nb + 1) * bn))
                if bool(neu[g, rows, cols].all()):
                    kept.append((nb, 1))
                elif bool(vis[g, rows, cols].any()) or not rows_ok:
                    kept.append((nb, 0))
            out[(g, mb)] = kept
    return out


@pytest.mark.parametrize("kind", ["add", "bool"])
def test_mask_tile_lists(kind):
    from fa3_inductor.kernels import mask_tiles
    gen = torch.Generator().manual_seed(7)
    b, h, sq, sk, bm, bn = 2, 1, 70, 90, 16, 32
    causal = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    vis = causal.expand(b, h, sq, sk).clone()
    vis[1, :, :, 60:] = False                       # padding of batch 1
    vis[0, 0, 5] = False                            # a row with no visible key: its row block keeps all tiles
    vis[1, 0, 40:48, 0:32] = torch.rand(8, 32, generator=gen) > 0.5   # a mixed tile inside a visible region
    if kind == "bool":
        m = vis
    else:
        m = torch.where(vis, 0.0, torch.finfo(torch.float32).min)
        m[0, 0, 60:64, 0:8] = 0.5                   # a non-zero bias: mixed, never neutral
    idx, cls, cnt = mask_tiles.tile_lists(m, kind, (b, h, sq, sk), bm, bn)
    want = _tiles_brute(m, kind, sq, sk, bm, bn)
    for (g, mb), kept in want.items():
        n = int(cnt.view(-1, cnt.shape[-1])[g, mb])
        got = [(int(idx.view(-1, *idx.shape[2:])[g, mb, t]), int(cls.view(-1, *cls.shape[2:])[g, mb, t]))
               for t in range(n)]
        assert got == kept, (g, mb, got, kept)
