"""Views of the scores between the product and the softmax (patterns/regroup.py): a view that only regroups the
batch dims (B·H <-> B, H, proven with sympy on the sizes) is matched; any other reshape is left alone."""

from __future__ import annotations

import pytest
import torch

from helpers import compile_counting


def bart(q, k, v, mask, bias3):
    """BART's eager attention: bmm on (B·H, S, D), the mask added on a 4-D view, softmax on the 3-D scores."""
    bsz, h, tgt, d = q.shape
    src = k.shape[2]
    q3, k3, v3 = (t.reshape(bsz * h, -1, d) for t in (q, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2)) * d ** -0.5 + bias3
    w = w.view(bsz, h, tgt, src) + mask
    w = w.view(bsz * h, tgt, src)
    out = torch.bmm(torch.softmax(w, dim=-1), v3)
    return out.view(bsz, h, tgt, d).transpose(1, 2).reshape(bsz, tgt, h * d)


def merged_after_product(q, k, v):
    """4-D scores merged to 3-D before the softmax, v merged alike."""
    s = q @ k.transpose(-1, -2) * 0.3
    s = s.reshape(s.shape[0] * s.shape[1], s.shape[2], s.shape[3])
    return (s.softmax(-1) @ v.reshape(-1, *v.shape[2:])).view(q.shape[0], q.shape[1], q.shape[2], -1)


def _inputs(sq=5, sk=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, sq, 8, generator=g)
    k, v = (torch.randn(2, 3, sk, 8, generator=g) for _ in range(2))
    mask = torch.randn(2, 1, sq, sk, generator=g)
    bias3 = torch.randn(6, sq, sk, generator=g)
    return [q, k, v, mask, bias3]


def _check(fn, args, expect=1):
    compiled, backend = compile_counting(fn)
    leaves = [a.clone().requires_grad_() for a in args]
    ref_leaves = [a.clone().requires_grad_() for a in args]
    out, ref = compiled(*leaves), fn(*ref_leaves)
    assert backend.rewritten == expect, [s.reason for s in backend.skipped]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    seed = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    (out * seed).sum().backward()
    (ref * seed).sum().backward()
    for a, r in zip(leaves, ref_leaves):     # q, k, v, the 4-D mask and the 3-D bias all get eager's gradient
        torch.testing.assert_close(a.grad, r.grad, atol=2e-5, rtol=1e-4)
    return backend


def test_bart_views_are_matched():
    backend = _check(bart, _inputs())
    assert backend.reports[0].sites[0].spelling.count(".view()") == 2


def test_merged_scores_are_matched():
    _check(merged_after_product, _inputs()[:3])


def test_bart_dynamic_lengths_do_not_recompile():
    """Symbolic sequence lengths: the split sizes and the operand reshapes follow them without a recompile."""
    compiled, backend = compile_counting(bart)
    for sq, sk in ((5, 7), (9, 4), (3, 12)):
        args = _inputs(sq, sk, seed=sq)
        for t in args:          # the sequence dims (mark_dynamic wants non-negative dims)
            torch._dynamo.mark_dynamic(t, t.dim() - 2)
            if t.shape[-1] != 8:
                torch._dynamo.mark_dynamic(t, t.dim() - 1)
        torch.testing.assert_close(compiled(*args), bart(*args), atol=2e-5, rtol=1e-4)
    assert len(backend.reports) == 1 and backend.rewritten == 1, [s.reason for s in backend.skipped]


def _folds_heads_into_queries(q, k, v):
    s = q @ k.transpose(-1, -2)
    s = s.reshape(s.shape[0], s.shape[1] * s.shape[2], s.shape[3])
    return (s.softmax(-1) @ v[:, 0]).view(q.shape[0], q.shape[1], q.shape[2], -1)


def _reinterprets_memory(q, k, v):        # (B·H, Sq, Sk) viewed as (B, H, Sk, Sq): not a relabeling
    bsz, h, sq, d = q.shape
    sk = k.shape[2]
    w = torch.bmm(q.reshape(bsz * h, sq, d), k.reshape(bsz * h, sk, d).transpose(1, 2))
    w = w.view(bsz, h, sk, sq).transpose(-1, -2).reshape(bsz * h, sq, sk)
    return torch.bmm(w.softmax(-1), v.reshape(bsz * h, sk, d))


@pytest.mark.parametrize("fn", [_folds_heads_into_queries, _reinterprets_memory])
def test_other_reshapes_are_left_alone(fn):
    backend = _check(fn, _inputs()[:3], expect=0)
    assert backend.skipped and "reshape" in backend.skipped[0].reason
