"""One attention site cut out of its graph as two standalone GraphModules: the site as the model wrote it and
the site rewritten to the fa3 op, with the same placeholders, so both can be compiled and timed (site_choice.py).

The site's region is what the rewrite removes: the spec's output and every node that only it (transitively)
uses, never crossing the values the op reads (q, k, v, operands and the graph values their views take sizes
from) and never taking a node with a side effect (rewrite.finish keeps those). Values the region reads from
outside become placeholders. A value shared with the rest of the graph (a mask built once for all layers, a
position bias computed in the first layer) stays outside: the site costs only what its rewrite would save.
The region also takes the chain of layout-only consumers (transpose / permute / contiguous / reshape / view)
that reads the output and nothing else, up to the first other use, and the cut-out graphs return its end: what
such a chain costs depends on the layout the site's output has. SDPA's output and the op's are both (B, Sq, H, D)
in memory (op.out_strides), so HF's `attn_output.transpose(1, 2).contiguous()` costs nothing after either; a
contiguous (B, H, Sq, D) output would make it a copy of the whole output, which the timing must see.
An operand the graph computes (not a view, not an input) with a non-unit last stride is timed laid out contiguous:
that layout is Inductor's choice in the model's graph, and both SDPA's lowering and the rewrite
(rewrite.dense_operand) make its producing kernel write it so at no cost. Timed in the example value's layout
(T5's sdpa position bias: H innermost), both graphs would pay a copy of the whole (B, H, Sq, Sk) bias that the
model does not.
Node names are canonical (n0, n1, ... in order of use), so sites of one model that differ only in their names
give the same code, which names the measurement in site_choice's cache.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Graph, GraphModule, Node

from .patterns.spec import AttentionSpec, SizeOf, TensorRef
from .rewrite import _has_side_effect, apply_spec, finish, inference_only, key_strided


@dataclasses.dataclass
class SiteSubgraph:
    original: GraphModule           # placeholders -> the site as written -> (output,)
    rewritten: GraphModule          # the same placeholders -> fa3::attention (and the output's views) -> (output,)
    inputs: list                    # example values (Dynamo's fake tensors, or constants) of the placeholders
    roles: list[str]                # per placeholder: "q", "k", "v", "operand" or "other"
    sources: list[Node]             # per placeholder: the node of the model's graph whose value it takes
    returns: Node                   # the node of the model's graph whose value both return (end of the layout tail)


_LAYOUT_METHODS = {"transpose", "permute", "contiguous", "reshape", "view", "flatten"}
_LAYOUT_FUNCTIONS = {torch.transpose, torch.permute, torch.reshape, torch.flatten}


def _layout_tail(output: Node) -> list:
    """The chain of layout-only nodes after output, each its predecessor's only user (may be empty)."""
    tail, cur = [], output
    while len(cur.users) == 1:
        user = next(iter(cur.users))
        layout = ((user.op == "call_method" and user.target in _LAYOUT_METHODS)
                  or (user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS))
        if not layout or user.args[0] is not cur or _has_side_effect(user):
            break
        tail.append(user)
        cur = user
    return tail


def _ref_nodes(ref: TensorRef, out: set) -> None:
    out.add(ref.node)
    for _, args in ref.steps:
        for a in args:
            if isinstance(a, SizeOf):
                _ref_nodes(a.ref, out)


def _region(graph: Graph, output: Node, keep: set) -> set:
    """output and the nodes only it uses (transitively): users come after a node, so one reverse pass does."""
    region = {output}
    nodes = list(graph.nodes)
    for node in reversed(nodes[:nodes.index(output)]):
        if node in keep or node.op in ("placeholder", "get_attr") or _has_side_effect(node):
            continue
        if node.users and all(u in region for u in node.users):
            region.add(node)
    return region


def _measured_layout(node: Node, example, role: str):
    """The layout the site's input `node` is timed in: example's, or contiguous for a computed operand whose layout
    Inductor picks (module docstring)."""
    if (role != "operand" or node.op not in ("call_function", "call_method") or not key_strided(example)
            or example._is_view()):
        return example
    dense = torch.empty(example.shape, dtype=example.dtype, device="meta")
    return dense.requires_grad_(True) if example.requires_grad else dense


def _remap_ref(ref: TensorRef, env: dict) -> TensorRef:
    steps = [(m, tuple(SizeOf(_remap_ref(a.ref, env), a.dim) if isinstance(a, SizeOf) else a for a in args))
             for m, args in ref.steps]
    return TensorRef(env[ref.node], steps)


def extract(gm: GraphModule, spec: AttentionSpec, kernel: str, fp8: str = "") -> SiteSubgraph:
    """The site of `spec` in `gm` as two standalone GraphModules (the graph of gm is not changed)."""
    keep: set = set()
    roles: dict = {}
    for name, ref in (("q", spec.q), ("k", spec.k), ("v", spec.v)):
        _ref_nodes(ref, keep)
        roles.setdefault(ref.node, name)
    for ref in spec.operands:
        _ref_nodes(ref, keep)
        roles.setdefault(ref.node, "operand")
    tail = _layout_tail(spec.output)
    region = _region(gm.graph, spec.output, keep) | set(tail)
    ordered = [n for n in gm.graph.nodes if n in region]
    # placeholders in the order the site first reads them (not graph order, which differs between layers that
    # compute a shared value first), then the op's inputs the site as written does not read itself
    outside = {n: None for r in ordered for n in r.all_input_nodes if n not in region}
    for n in gm.graph.nodes:
        if n in keep:
            outside.setdefault(n, None)
    placeholders = list(outside)
    examples = [_measured_layout(n, n.meta.get("example_value"), roles.get(n, "other")) for n in placeholders]
    # the op the rewrite would emit (fa3::attention_infer in a graph compiled without grad mode), where the
    # measurement runs without grad mode too (no input requires grad: site_choice._measure)
    infer = inference_only(gm) and not any(isinstance(e, torch.Tensor) and e.requires_grad for e in examples)

    def build(rewrite: bool) -> GraphModule:
        graph = Graph()
        env: dict = {}
        for i, n in enumerate(placeholders):
            p = graph.placeholder(f"n{i}")
            p.meta = dict(n.meta)
            env[n] = p
        for n in ordered:
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output((env[tail[-1] if tail else spec.output],))
        for i, n in enumerate(graph.nodes):
            if n.op not in ("placeholder", "output"):
                n.name = f"n{i}"    # canonical names: the code of equal sites is equal
        sub = GraphModule(gm, graph)
        if rewrite:
            local = dataclasses.replace(
                spec, q=_remap_ref(spec.q, env), k=_remap_ref(spec.k, env), v=_remap_ref(spec.v, env),
                operands=[_remap_ref(r, env) for r in spec.operands], output=env[spec.output],
                nodes=[env[n] for n in spec.nodes if n in env])
            finish(sub, [apply_spec(sub, local, kernel, fp8, infer)])
        else:
            sub.recompile()
        return sub

    return SiteSubgraph(build(False), build(True), examples, [roles.get(n, "other") for n in placeholders],
                        placeholders, tail[-1] if tail else spec.output)


def signature(sub: SiteSubgraph) -> str:
    """What the timings depend on besides the machine: both graphs' code and the inputs' layouts."""
    parts = [sub.original.code, sub.rewritten.code]
    for x in sub.inputs:
        if isinstance(x, torch.Tensor):
            parts.append(f"{tuple(x.shape)}/{x.stride()}/{x.dtype}/{x.requires_grad}")
        else:
            parts.append(repr(x))
    return "\n".join(parts)
