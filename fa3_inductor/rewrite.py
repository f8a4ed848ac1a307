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


def apply_spec(gm: GraphModule, spec: AttentionSpec, kernel: str) -> None:
    graph = gm.graph
    memo: dict = {}
    with graph.inserting_before(spec.output):
        q = _materialize(graph, spec.q, memo)
        k = _materialize(graph, spec.k, memo)
        v = _materialize(graph, spec.v, memo)
        operands = [_materialize(graph, r, memo) for r in spec.operands]
        res = graph.call_function(torch.ops.fa3.attention.default,
                                  (q, k, v, operands, spec.program.dumps(), kernel))
        out = graph.call_function(operator.getitem, (res, 0))
        for method, args in spec.output_steps:
            out = graph.call_method(method, (out, *args))
    spec.output.replace_all_uses_with(out)


def finish(gm: GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
