"""fa3::attention_infer (fa3_inductor/op.py `_inference_op`): the op without autograd that the rewrite emits for
graphs that run with grad mode off. Same results, fake and dispatch as fa3::attention; chosen only where every
call of the graph runs without grad mode (compiled under no_grad, no grad mode set inside), else the autograd op.
On CPU the op runs the reference kernel (no TRITON_INTERPRET), through Inductor."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fa3_inductor import dispatch
from fa3_inductor.backend import fa3_backend
from fa3_inductor.kernels.program import ScoreProgram

PROG = ScoreProgram(("add", ("mul", ("score",), ("const", 0.25)), ("operand", 0)), 1)
INFER, AUTOGRAD = torch.ops.fa3.attention_infer.default, torch.ops.fa3.attention.default


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g, requires_grad=requires_grad) for _ in range(3))
    bias = torch.randn(1, 4, 9, 9, generator=g)
    return q, k, v, bias


def f(q, k, v, bias):
    return torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, -1) @ v


def f_grad_inside(q, k, v, bias):
    with torch.enable_grad():
        return torch.softmax(q @ k.transpose(-1, -2) / 4.0 + bias, -1) @ v


def _compile(fn, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    targets = []

    def backend(gm, example_inputs):
        compiled = fa3_backend(gm, example_inputs)      # rewrites gm in place, then Inductor compiles it
        targets.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return compiled

    return torch.compile(fn, backend=backend), targets


def test_no_grad_graph_calls_the_inference_op(monkeypatch):
    compiled, targets = _compile(f, monkeypatch)
    args = _inputs()
    before = dispatch.STATS[("forward", "reference")]
    with torch.no_grad():
        out = compiled(*args)
    assert INFER in targets and AUTOGRAD not in targets
    assert dispatch.STATS[("forward", "reference")] == before + 1
    torch.testing.assert_close(out, f(*args), atol=2e-5, rtol=1e-4)


def test_grad_mode_graphs_keep_the_autograd_op(monkeypatch):
    compiled, targets = _compile(f, monkeypatch)
    args = _inputs(requires_grad=True)
    out = compiled(*args)
    assert AUTOGRAD in targets and INFER not in targets
    out.sum().backward()
    assert args[0].grad is not None
    compiled, targets = _compile(f_grad_inside, monkeypatch)
    with torch.no_grad():           # compiled without grad mode, but the graph turns it on around the site
        out = compiled(*_inputs(requires_grad=True))
    assert AUTOGRAD in targets and INFER not in targets
    assert out.requires_grad


def test_same_results_fake_and_dispatch_as_the_autograd_op(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, bias = _inputs()
    s = PROG.dumps()
    out, lse = INFER(q, k, v, [bias], s, "auto", "")
    ref, rlse = AUTOGRAD(q, k, v, [bias], s, "auto", "")
    assert torch.equal(out, ref) and torch.equal(lse, rlse)
    with FakeTensorMode() as mode:
        fq, fk, fv, fb = (mode.from_tensor(t) for t in (q, k, v, bias))
        fo, fl = INFER(fq, fk, fv, [fb], s, "auto", "")
        go, gl = AUTOGRAD(fq, fk, fv, [fb], s, "auto", "")
        assert (fo.shape, fo.stride(), fo.dtype, fl.shape, fl.stride()) == \
               (go.shape, go.stride(), go.dtype, gl.shape, gl.stride())
    with torch.inference_mode():
        out2, _ = INFER(q, k, v, [bias], s, "auto", "")
    assert torch.equal(out2, ref)


def test_the_measured_choice_times_the_op_the_rewrite_emits():
    """site_subgraph.extract's rewritten site (what site_choice times against Inductor's) calls the op the
    rewrite would: attention_infer in a graph compiled without grad mode, the autograd op otherwise."""
    from fa3_inductor.patterns.matcher import find_sites
    from fa3_inductor.site_subgraph import extract
    seen = []

    def backend(gm, example_inputs):
        (spec,), _ = find_sites(gm)
        sub = extract(gm, spec, "auto")
        seen.append({n.target for n in sub.rewritten.graph.nodes if n.op == "call_function"})
        return gm.forward

    for grad in (False, True):
        torch._dynamo.reset()
        with torch.set_grad_enabled(grad):
            torch.compile(f, backend=backend)(*_inputs(requires_grad=grad))
    assert INFER in seen[0] and AUTOGRAD not in seen[0]
    assert AUTOGRAD in seen[1] and INFER not in seen[1]
