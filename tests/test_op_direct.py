"""The ops' direct autograd kernels (fa3_inductor/op.py `_direct_autograd_kernel`): a call that needs no gradient
on plain CPU / CUDA tensors runs the forward (or the backward op) at once; a call that needs a gradient, fake tensors, a dispatch mode
or inference mode go the custom op's way and give what they gave before. On CPU the op runs the reference kernel
(no TRITON_INTERPRET), so these run anywhere."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fa3_inductor import op
from fa3_inductor.kernels import reference
from fa3_inductor.kernels.program import ScoreProgram

pytestmark = pytest.mark.skipif(op._DIRECT is None or op._DIRECT_BACKWARD is None,
                                reason="this torch lacks make_autograd_impl")

PROG = ScoreProgram(("add", ("mul", ("score",), ("const", 0.25)), ("operand", 0)), 1, operand_grad=(True,))


def _count(monkeypatch, name):
    calls, fn = [], getattr(op, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return fn(*args, **kwargs)

    monkeypatch.setattr(op, name, counted)
    return calls


@pytest.fixture
def direct_calls(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return _count(monkeypatch, "_forward")


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 16, generator=g, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    for t in (q, k, v, bias):
        t.requires_grad_(requires_grad)
    return q, k, v, [bias]


def _call(q, k, v, ops):
    return torch.ops.fa3.attention(q, k, v, ops, PROG.dumps(), "auto", "")


def test_no_grad_call_runs_the_forward_directly(direct_calls):
    q, k, v, ops = _inputs()
    out, lse = _call(q, k, v, ops)
    ref, rlse = reference.forward(q, k, v, ops, PROG)
    assert len(direct_calls) == 1
    assert torch.equal(out, ref) and torch.equal(lse, rlse)
    with torch.no_grad():
        q2, k2, v2, ops2 = _inputs(requires_grad=True)
        _call(q2, k2, v2, ops2)
    assert len(direct_calls) == 2


def test_grad_call_takes_the_custom_ops_autograd(direct_calls, monkeypatch):
    backward_calls = _count(monkeypatch, "_backward_op")
    q, k, v, ops = _inputs(requires_grad=True)
    out, _ = _call(q, k, v, ops)
    assert not direct_calls and out.grad_fn is not None
    out.sum().backward()
    assert len(backward_calls) == 1     # the backward op, called with grad mode off, runs directly
    q2, k2, v2, ops2 = (t.detach().requires_grad_() for t in (q, k, v, ops[0]))
    (torch.softmax(q2 @ k2.transpose(-1, -2) * 0.25 + ops2, -1) @ v2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2), (ops[0], ops2)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)   # the reference works in fp32


def test_fake_tensors_mode_and_inference_mode_take_the_dispatcher(direct_calls):
    q, k, v, ops = _inputs()
    with FakeTensorMode() as mode:
        fq, fk, fv, fb = (mode.from_tensor(t) for t in (q, k, v, ops[0]))
        out, lse = _call(fq, fk, fv, [fb])
        assert out.shape == (2, 4, 5, 16) and lse.shape == (2, 4, 5)
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Log():
        out, _ = _call(q, k, v, ops)
    assert torch.ops.fa3.attention.default in seen
    assert not direct_calls
    with torch.inference_mode():
        out2, _ = _call(q, k, v, ops)
    assert torch.equal(out, out2)
    assert not direct_calls        # inference mode skips autograd kernels altogether
