"""kernels/reference.py on rows an additive finfo.min mask covers entirely (HF padding rows), against eager
autograd in fp32: the dense form (the mask as an operand) and the proven form (structural causal mask, a
per-key padding operand, empty_row="uniform").

Eager computes fl(s + finfo.min) = finfo.min on every key of such a row, so its softmax is uniform (1/Sk) and
autograd sends dP·(1/Sk) back into the scores. An fp64 computation keeps s + finfo.min distinct and is no
reference here, so these compare with fp32 eager directly, output gradient nonzero on every row.
"""

from __future__ import annotations

import torch

from fa3_inductor.kernels import reference
from fa3_inductor.kernels.program import ScoreProgram

MIN = torch.finfo(torch.float32).min
SCALE = 0.25


def _inputs(b=2, h=2, s=11, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g) for _ in range(3)]


def _visible(b, s, pad):
    """Causal, with the last batch row left-padded by `pad` keys: its first `pad` query rows see nothing."""
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    keys = torch.ones(b, 1, 1, s, dtype=torch.bool)
    keys[-1, ..., :pad] = False
    return causal & keys, keys


def _eager(q, k, v, visible, dout):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) * SCALE + torch.where(visible, torch.tensor(0.0), MIN)
    out = torch.softmax(s, -1) @ leaves[2]
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def _check(prog, operands, q, k, v, visible):
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    ref_out, ref_grads = _eager(q, k, v, visible, dout)
    out, lse = reference.forward(q, k, v, operands, prog)
    grads = reference.backward(dout, q, k, v, operands, prog)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, a, r in zip(("dq", "dk", "dv"), grads[:3], ref_grads):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return lse


def test_dense_finfo_min_mask_fully_masked_rows():
    q, k, v = _inputs()
    visible, _ = _visible(2, 11, pad=4)
    mask = torch.where(visible, torch.tensor(0.0), MIN)
    prog = ScoreProgram(("add", ("mul", ("score",), ("const", SCALE)), ("operand", 0)), n_operands=1)
    lse = _check(prog, [mask], q, k, v, visible)
    assert torch.isfinite(lse).all()     # finfo.min rows are not empty: lse ~ finfo.min


def test_proven_causal_padding_uniform_rows():
    q, k, v = _inputs(seed=1)
    visible, keys = _visible(2, 11, pad=4)
    y = ("mul", ("score",), ("const", SCALE))
    prog = ScoreProgram(("where", ("operand", 0), y, ("const", -float("inf"))), n_operands=1,
                        causal="top_left", empty_row="uniform")
    lse = _check(prog, [keys], q, k, v, visible)
    assert torch.isinf(lse[1, :, :4]).all() and torch.isfinite(lse[0]).all()


def test_uniform_rows_gradient_reaches_a_bias():
    """A learned bias inside the unmasked expression (T5-like) gets eager's gradient on uniform rows too."""
    q, k, v = _inputs(seed=2)
    visible, keys = _visible(2, 11, pad=3)
    bias = torch.randn(1, 2, 11, 11, generator=torch.Generator().manual_seed(4))
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    s = leaves[0] @ leaves[1].transpose(-1, -2) + leaves[3] + torch.where(visible, torch.tensor(0.0), MIN)
    ref = torch.autograd.grad(torch.softmax(s, -1) @ leaves[2], leaves, dout)
    prog = ScoreProgram(("where", ("operand", 0), ("add", ("score",), ("operand", 1)), ("const", -float("inf"))),
                        n_operands=2, causal="top_left", empty_row="uniform", operand_grad=(False, True))
    dq, dk, dv, (dbias,) = reference.backward(dout, q, k, v, [keys, bias], prog)
    for a, r in zip((dq, dk, dv, dbias), ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_uniform_rows_gqa_query_rows_past_the_keys():
    """The oracle of the kernels' attn_bwd_uniform on its other shapes: GQA (gradients of a kv head summed over
    its query heads), causal bottom_right with Sq > Sk (the first Sq - Sk rows see no key in every batch row)
    and a batch row whose keys are all padding (every row empty)."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 4, 13, 16, generator=g)
    k, v = (torch.randn(3, 2, 9, 16, generator=g) for _ in range(2))
    dout = torch.randn(q.shape, generator=g)
    keys = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    keys[1, ..., :3] = False
    keys[2] = False
    visible = (torch.arange(9).view(1, -1) <= torch.arange(13).view(-1, 1) + 9 - 13) & keys
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kk, vv = (t.repeat_interleave(2, 1) for t in leaves[1:])
    s = leaves[0] @ kk.transpose(-1, -2) * SCALE + torch.where(visible, torch.tensor(0.0), MIN)
    ref = torch.autograd.grad(torch.softmax(s, -1) @ vv, leaves, dout)
    prog = ScoreProgram(("where", ("operand", 0), ("mul", ("score",), ("const", SCALE)), ("const", -float("inf"))),
                        n_operands=1, causal="bottom_right", empty_row="uniform")
    _, lse = reference.forward(q, k, v, [keys], prog)
    assert torch.isinf(lse[:, :, :4]).all() and torch.isinf(lse[2]).all() and torch.isfinite(lse[0, :, 4:]).all()
    for a, r in zip(reference.backward(dout, q, k, v, [keys], prog), ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
