"""Dump the Dynamo FX graphs of every zoo model (tiny, fp32) to /tmp/hf_graphs/{model}_{impl}.txt.

    python tests/models/dump_graphs.py [--out DIR] [model ...]

Each file holds, per graph Dynamo produced for one forward: every node (op, target, args, kwargs) with the
shape/dtype of its example value, then the graph's Python code. A header says how many graphs the forward
compiled into and what torch._dynamo.explain reports as graph breaks. `graphs.json` collects those counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402


def describe_value(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"{tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(describe_value(x) for x in v) + ")"
    if v is None:
        return "-"
    return type(v).__name__ + (f"={v}" if isinstance(v, (int, float, bool, torch.SymInt)) else "")


def format_graph(gm: torch.fx.GraphModule) -> str:
    lines = []
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function":
            mod = getattr(node.target, "__module__", None)
            target = f"{mod}.{target}" if mod and not str(target).startswith(mod) else str(node.target)
        ev = node.meta.get("example_value")
        lines.append(f"%{node.name} = {node.op}[{target}](args={node.args}, kwargs={node.kwargs})"
                     f"    # {describe_value(ev)}")
    return "\n".join(lines)


STOP_TARGETS = ("linear",)
SITE_TARGETS = ("softmax", "scaled_dot_product_attention", "_softmax")


def _tname(node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _is_site(node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    return _tname(node) in SITE_TARGETS


def format_sites(gm: torch.fx.GraphModule) -> str:
    """For every softmax / SDPA node: its backward slice up to the projections (linear), placeholders and params,
    and forward to the consumer product, printed in graph order as code lines with example-value shapes."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    out = []
    for k, site in enumerate(n for n in gm.graph.nodes if _is_site(n)):
        seen, stack = set(), [site]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n is not site and (n.op in ("placeholder", "get_attr") or _tname(n) in STOP_TARGETS):
                continue
            stack.extend(n.all_input_nodes)
        # forward: follow single users until a matmul-type product consumes the probabilities
        n = site
        while _tname(n) != "scaled_dot_product_attention" and len(n.users) == 1:
            n = next(iter(n.users))
            seen.add(n)
            if _tname(n) in ("matmul", "bmm", "einsum", "__matmul__"):
                break
        if n is not site:   # the consuming product's other operand (V): its slice back to the projection too
            stack = [a for a in n.all_input_nodes if a not in seen]
            while stack:
                m = stack.pop()
                if m in seen:
                    continue
                seen.add(m)
                if m.op in ("placeholder", "get_attr") or _tname(m) in STOP_TARGETS:
                    continue
                stack.extend(m.all_input_nodes)
        nodes = sorted(seen, key=order.get)
        out.append(f"### site {k}: %{site.name}")
        for n in nodes:
            if n.op in ("placeholder", "get_attr"):
                out.append(f"    [{n.op}] {n.name}    # {describe_value(n.meta.get('example_value'))}")
                continue
            out.append(f"    %{n.name} = {n.op}[{_tname(n)}](args={n.args}, kwargs={n.kwargs})"
                       f"    # {describe_value(n.meta.get('example_value'))}")
    return "\n".join(out)


def dump_one(name: str, impl: str, out_dir: str) -> dict:
    torch._dynamo.reset()
    model, inputs, n_calls = zoo.build(name, impl)
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append(f"## graph {len(graphs)}\n\n## attention sites (backward slice of each softmax/SDPA up to "
                      f"linear/placeholders, plus the consuming product)\n\n{format_sites(gm)}\n\n"
                      f"## all nodes\n\n{format_graph(gm)}\n\n## code\n{gm.code}")
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(**inputs)
    breaks = [f"{b.reason}" for b in ex.break_reasons]
    info = {"graphs": len(graphs), "explain_graph_count": ex.graph_count, "graph_breaks": ex.graph_break_count,
            "break_reasons": breaks, "n_attention_calls": n_calls,
            "inputs": {k: describe_value(v) for k, v in inputs.items()}}
    path = os.path.join(out_dir, f"{name}_{impl}.txt")
    with open(path, "w") as f:
        f.write(f"# {name} attn_implementation={impl}  (zoo tiny, fp32, eval, no_grad)\n")
        f.write(json.dumps(info, indent=1) + "\n\n")
        f.write("\n\n".join(graphs))
    torch._dynamo.reset()
    return info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", default=zoo.MODELS)
    ap.add_argument("--out", default="/tmp/hf_graphs")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name in args.models:
        for impl in zoo.supported_impls(name):
            info = dump_one(name, impl, args.out)
            summary[f"{name}_{impl}"] = info
            print(f"{name:8s} {impl:5s} graphs={info['graphs']} breaks={info['graph_breaks']} "
                  f"{info['break_reasons']}", flush=True)
    with open(os.path.join(args.out, "graphs.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
