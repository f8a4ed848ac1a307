"""Apply AttentionSpecs to the graph: each site becomes one call of torch.ops.fa3.attention.

New nodes go right before the site's output node, where every value they read (q, k, v, operands, sizes)
is already defined; the site's own nodes die with the replaced output and are removed, together with copies
(repeat_kv, .contiguous()) that only the site used. Only what the rewrite made dead is removed, and never a
node with a side effect: FX's own dead-code elimination treats every method call as pure and would drop the
in-place updates of a KV cache (StaticCache's `keys.index_copy_(...)`, whose result nobody reads).
"""

from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule

from . import op as _op  # noqa: F401  (registers torch.ops.fa3.attention)
from .patterns.spec import AttentionSpec, SizeOf, TensorRef


def _example_value(ref: TensorRef, memo: dict):
    """The fake value Dynamo recorded for ref's node, with ref's steps applied; LookupError when missing."""
    key = (ref.node, repr(ref.steps))
    if key not in memo:
        t = ref.node.meta.get("example_value")
        if t is None:
            raise LookupError(ref.node.name)
        for method, args in ref.steps:
            args = tuple(_example_value(a.ref, memo).size(a.dim) if isinstance(a, SizeOf) else a for a in args)
            t = getattr(t, method)(*args)
        memo[key] = t
    return memo[key]


def example_inputs(spec: AttentionSpec):
    """The op's canonical (q, k, v, operands) as the fake values Dynamo recorded, for compile-time dispatch
    questions (the explain report); None when a value is missing."""
    memo: dict = {}

    def value(ref: TensorRef):
        return _example_value(ref, memo)

    try:
        return value(spec.q), value(spec.k), value(spec.v), [value(r) for r in spec.operands]
    except LookupError:
        return None


def dense_operand(ref: TensorRef) -> TensorRef:
    """ref, made to have a unit last stride where its example value lacks one and is not a broadcast view.

    The kernels read an operand along the keys (its last dim); with a larger last stride each read of a key
    tile gathers one element per memory sector. T5's sdpa spelling builds its position bias as
    where(mask, values.permute(...), min) from an embedding laid out (Sq, Sk, H): eager strides give the
    (B, H, Sq, Sk) bias H innermost (last stride H). SDPA's lowering makes Inductor pick a contiguous layout for
    it, written by the same fused kernel; a custom op gets its input in the stride order of the example value,
    so without this the fa3 kernel reads the bias H-strided. A `.contiguous()` here is free for a computed
    operand (Inductor writes the producer's buffer in that layout), one copy for a graph input. A broadcast
    (stride 0) view is left alone: contiguous() would materialise it."""
    try:
        t = _example_value(ref, {})
    except LookupError:
        return ref
    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.size(-1) <= 1 or t.stride(-1) == 1:
        return ref
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        return ref
    return ref.then("contiguous")


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


_GRAD_MODE_SETTERS = {torch._C._set_grad_enabled, torch.set_grad_enabled, torch.enable_grad, torch.no_grad,
                      torch.inference_mode, torch.autograd.grad_mode.set_grad_enabled}


def inference_only(gm: GraphModule) -> bool:
    """Whether every call in gm runs with grad mode off: it is compiled with grad mode off (Dynamo guards grad
    mode, so it only runs so) and sets no grad mode inside."""
    if torch.is_grad_enabled():
        return False
    return not any(n.op == "call_function" and n.target in _GRAD_MODE_SETTERS for n in gm.graph.nodes)


def apply_spec(gm: GraphModule, spec: AttentionSpec, kernel: str, fp8: str = "", infer: bool = False):
    """Replace the site's output with the op's; return the old output node (now unused).
    fp8: serialised FP8 recipe ("" = off); passed to the op only when set, so 16-bit graphs are unchanged.
    infer: call fa3::attention_infer (the op without autograd: op.py `_inference_op`), for inference_only graphs."""
    graph = gm.graph
    memo: dict = {}
    with graph.inserting_before(spec.output):
        q = _materialize(graph, spec.q, memo)
        k = _materialize(graph, spec.k, memo)
        v = _materialize(graph, spec.v, memo)
        operands = [_materialize(graph, dense_operand(r), memo) for r in spec.operands]
        args = (q, k, v, operands, spec.program.dumps(), kernel) + ((fp8,) if fp8 else ())
        target = torch.ops.fa3.attention_infer.default if infer else torch.ops.fa3.attention.default
        res = graph.call_function(target, args)
        out = graph.call_function(operator.getitem, (res, 0))
        for method, args in spec.output_steps:
            out = graph.call_method(method, (out, *args))
    spec.output.replace_all_uses_with(out)
    return spec.output


_INPLACE_DUNDERS = {"__setitem__", "__delitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                    "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                    "__irshift__", "__imatmul__"}


def _has_side_effect(node) -> bool:
    if node.op in ("placeholder", "output", "get_attr") or node.is_impure() or "out" in node.kwargs:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in _INPLACE_DUNDERS:
        return True
    return name.endswith("_") and not name.startswith("__")   # x.add_, x.index_copy_, torch.relu_


def finish(gm: GraphModule, replaced) -> None:
    """Remove the replaced outputs and whatever only they used, keeping every node with a side effect."""
    stack = list(replaced)
    while stack:
        node = stack.pop()
        if getattr(node, "_erased", False) or node.users or _has_side_effect(node):
            continue
        inputs = node.all_input_nodes
        gm.graph.erase_node(node)
        stack.extend(inputs)
    gm.graph.lint()
    gm.recompile()
