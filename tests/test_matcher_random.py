"""Random attention programs in random spellings: every site is rewritten and computes eager's result
(forward and gradients); near misses are left alone and still compute eager's result."""

import torch
from hypothesis import given

from helpers import assert_close_by_rule, compile_counting, flat
from programs import attention_programs, near_misses


def _run(prog, dtype_cast=None, grad=False):
    inputs = [t.clone() for t in prog.inputs]
    if dtype_cast is not None:
        inputs = [t.to(dtype_cast) if t.is_floating_point() else t for t in inputs]
    if grad:
        for i in prog.grad_inputs:
            inputs[i].requires_grad_(True)
    return inputs


def _grads(fn, inputs, idx, seed_out):
    outs = flat(fn(*inputs))
    loss = sum((o.float() * s).sum() for o, s in zip(outs, seed_out))
    grads = torch.autograd.grad(loss, [inputs[i] for i in idx], allow_unused=True)
    return outs, [g if g is not None else torch.zeros_like(inputs[i]) for g, i in zip(grads, idx)]


def check_program(prog, expect_rewrite=True):
    compiled, backend = compile_counting(prog.fn)
    x_ours, x_eager, x_ref = _run(prog, grad=True), _run(prog, grad=True), _run(prog, torch.float64, grad=True)
    eager_out = flat(prog.fn(*x_eager))
    gen = torch.Generator().manual_seed(0)     # not the global generator: results must not depend on test order
    seeds = [torch.randn(o.shape, generator=gen) for o in eager_out]
    ours, g_ours = _grads(compiled, x_ours, prog.grad_inputs, seeds)
    assert backend.rewritten == prog.expected_sites, (prog.description, backend.rewritten,
                                                      [s.reason for s in backend.skipped])
    if not prog.deterministic:
        return backend
    eager, g_eager = _grads(prog.fn, x_eager, prog.grad_inputs, seeds)
    ref, g_ref = _grads(prog.fn, x_ref, prog.grad_inputs, seeds)
    assert_close_by_rule(ours, eager, ref, f"output of {prog.description}")
    grad_scale = max((g[~torch.isnan(g)].abs().max().item() for g in g_ref if (~torch.isnan(g)).any()), default=0.0)
    for i, (a, e, r) in enumerate(zip(g_ours, g_eager, g_ref)):
        assert_close_by_rule([a], [e], [r], f"grad {i} of {prog.description}", scale=grad_scale)
    return backend


@given(attention_programs())
def test_random_programs_fp32(prog):
    check_program(prog)


@given(attention_programs(dtypes=(torch.float16, torch.bfloat16)))
def test_random_programs_half(prog):
    check_program(prog)


@given(near_misses())
def test_near_misses_are_left_alone(prog):
    backend = check_program(prog)
    if prog.description not in ("softmax_dim_q",):
        assert backend.skipped, f"{prog.description}: a near miss must be reported with a reason"


def test_single_key_gradients_are_exact_zeros_in_eager():
    """Sk = 1: the softmax is 1 whatever the score, so eager's (and fp64's) dq and dk are exactly 0 while ours
    carry rounding of dP-sized terms; the guard scales with the backward's largest gradient (helpers.py)."""
    from programs import Program
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 112, generator=g) * 3 for n in (13, 1, 1))
    prog = Program(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v, [q, k, v], 1, "Sk=1")
    check_program(prog)
