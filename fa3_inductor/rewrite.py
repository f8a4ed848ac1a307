"""Apply AttentionSpecs to the graph: each site becomes one call of torch.ops.fa3.attention.

New nodes go right before the site's output node, where every value they read (q, k, v, operands, sizes)
is already defined; the site's own nodes die with the replaced output and are removed by dead-code
elimination, together with copies (repeat_kv, .contiguous()) that only the site used.
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from . import op as _op  # noqa: F401  (registers torch.ops.fa3.attention)
from .patterns.spec import AttentionSpec, SizeOf, TensorRef


def example_inputs(spec: AttentionSpec):
    """The op's canonical (q, k, v, operands) as the fake values Dynamo recorded, for compile-time dispatch
    questions (the explain report); None when a value is missing."""
    memo: dict = {}

    def value(ref: TensorRef):
        key = (ref.node, repr(ref.steps))
        if key not in memo:
            t = ref.node.meta.get("example_value")
            if t is None:
                raise LookupError(ref.node.name)
            for method, args in ref.steps:
                args = tuple(value(a.ref).size(a.dim) if isinstance(a, SizeOf) else a for a in args)
                t = getattr(t, method)(*args)
            memo[key] = t
        return memo[key]

    try:
        return value(spec.q), value(spec.k), value(spec.v), [value(r) for r in spec.operands]
    except LookupError:
        return None


def _materialize(graph, ref: TensorRef, memo: dict):
    key = (ref.node, repr(ref.steps))
    if key in memo:
        return memo[key]
    cur = ref.node
    for method, args in ref.steps:
        args = tuple(graph.call_method("size", (_materialize(graph, a.ref, memo), a.dim))
                     if isinstance(a, SizeOf) else a for a in args)
        cur = graph.call_method(method, (cur, *args))
    memo[key] = cur
    return cur


def apply_spec(gm: GraphModule, spec: AttentionSpec, kernel: str, fp8: str = "") -> None:
    """fp8: serialised FP8 recipe ("" = off); passed to the op only when set, so 16-bit graphs are unchanged."""
    graph = gm.graph
    memo: dict = {}
    with graph.inserting_before(spec.output):
        q = _materialize(graph, spec.q, memo)
        k = _materialize(graph, spec.k, memo)
        v = _materialize(graph, spec.v, memo)
        operands = [_materialize(graph, r, memo) for r in spec.operands]
        args = (q, k, v, operands, spec.program.dumps(), kernel) + ((fp8,) if fp8 else ())
        res = graph.call_function(torch.ops.fa3.attention.default, args)
        out = graph.call_function(operator.getitem, (res, 0))
        for method, args in spec.output_steps:
            out = graph.call_method(method, (out, *args))
    spec.output.replace_all_uses_with(out)


def finish(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
