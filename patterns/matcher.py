"""Find every attention site of a Dynamo FX graph and describe it as an AttentionSpec.

Two anchors: a softmax (whose input chain reaches a Q·Kᵀ product and whose output, through casts and
inactive dropout, is the left operand of a product with v), and F.scaled_dot_product_attention itself.
Anything that cannot be expressed exactly raises NotMatched inside and becomes a Skip with the reason;
the graph is never touched here.
"""

from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Node

from ..kernels.program import ScoreProgram
from .chain import CASTS, CHAIN, PRODUCTS, ChainLowering
from .gqa import repeated_heads
from .mask_proof import MaskProof, NotProven
from .normalize import canon, example
from .products import broadcast_batch, first_product, is_float_tensor, same_size, second_product
from .regroup import find_regroup, refine, refine_operand
from .site_masks import ProvenMask, prove_root_mask, prove_sdpa_mask, split_root
from .spec import AttentionSpec, NotMatched, OperandRef, SizeOf, Skip, TensorRef


def site_name(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = ""
    if stack:
        path = list(stack.values())[-1][0]
        path = path.replace("L['self'].", "").replace("L['self']", "")
    return f"{path}:{node.name}" if path else node.name


def find_sites(gm: GraphModule) -> tuple[list[AttentionSpec], list[Skip]]:
    specs, skips = [], []
    for node in list(gm.graph.nodes):
        c = canon(node)
        if c is None or c.kind not in ("softmax", "sdpa"):
            continue
        chain = None
        try:
            if c.kind == "sdpa":
                specs.append(_match_sdpa(node, c))
            else:
                chain = ChainLowering()
                spec = _match_softmax(node, c, chain)
                if spec is not None:
                    specs.append(spec)
        except NotMatched as exc:
            spelling = [c.spelling] + (chain.spelling[::-1] if chain else [])
            skips.append(Skip(site_name(node), spelling, str(exc)))
    return specs, skips


def _lower_with_baddbmm(chain: ChainLowering, x):
    """Lower the chain; a baddbmm product contributes beta·input + alpha·score."""
    def on_product(node, c):
        if c.kind != "baddbmm":
            return ("score",)
        inp, beta, alpha = c.args[0], c.kwargs.get("beta", 1), c.kwargs.get("alpha", 1)
        e = ("score",) if alpha == 1 else ("mul", ("score",), chain.const(alpha))
        if beta != 0:
            t = chain.operand(inp, rank=example(node).dim()) if isinstance(inp, Node) else chain.const(inp)
            e = ("add", ("mul", t, chain.const(beta)) if beta != 1 else t, e)
        return e
    chain.on_product = on_product
    return chain.lower(x)


def _lower_scores(chain: ChainLowering, x) -> tuple[tuple, ProvenMask | None, str]:
    """Lower the softmax input. A mask applied last whose form mask_proof.py proves becomes a structural mask
    and per-key operands (site_masks.py); otherwise it stays a dense operand and the reason is returned."""
    split = split_root(x, chain.reaches_product)
    if split is None:
        return _lower_with_baddbmm(chain, x), None, ""
    y, form, mask, negate = split
    y_expr = _lower_with_baddbmm(chain, y)
    score = example(x)
    roles = first_product(chain.product, canon(chain.product)).roles
    if score.dim() != len(roles):               # regrouped scores (regroup.py): standard roles
        roles = [f"b{i}" for i in range(score.dim() - 2)] + ["q", "k"]
    try:
        proven = prove_root_mask(form, mask, negate, tuple(score.shape), roles, score.dtype)
        expr = proven.wrap(lambda ref: chain.operand(ref, rank=score.dim()), y_expr)
    except NotProven as exc:
        return chain.lower(x), None, str(exc)
    chain.nodes.insert(0, x)                  # the root first, as chain.lower records it
    chain.spelling.insert(0, canon(x).spelling)
    return expr, proven, ""


def _match_softmax(node: Node, c, chain: ChainLowering) -> AttentionSpec | None:
    x, dim = c.args[0], c.args[1]
    if not chain.reaches_product(x):
        if not _feeds_product(node):
            return None                     # a softmax that is not attention (a classifier, a router)
        raise NotMatched(f"the softmax input is not an elementwise function of a product "
                         f"({_first_unsupported(x)} in between)")
    expr, proven, mask_note = _lower_scores(chain, x)
    prod = chain.product
    pc = canon(prod)
    if dim is None or not isinstance(dim, int):
        raise NotMatched("softmax without a constant dim")
    layout = first_product(prod, pc)
    sx, sp = example(x), example(prod)
    regroup = find_regroup(chain, prod, layout)
    roles, score_shape = layout.roles, tuple(sp.shape)
    q_in, k_in = (layout.q, layout.q_shape), (layout.k, layout.k_shape)
    if regroup is None:
        if tuple(sx.shape) != tuple(sp.shape):
            raise NotMatched("the score chain broadcasts the scores to a larger shape")
        if layout.roles[dim % sx.dim()] != "k":
            raise NotMatched(f"softmax over dim {dim}, not over the key axis")
    else:
        if layout.roles[-2:] != ["q", "k"] or dim % sx.dim() != sx.dim() - 1:
            raise NotMatched(f"softmax over dim {dim} of regrouped scores, not over the key axis")
        roles, score_shape = ["b0", "b1", "q", "k"], regroup.fine
        if sp.dim() == 3:
            q_in, k_in = refine(regroup, *q_in), refine(regroup, *k_in)
    spelling = [layout.spelling] + chain.spelling[::-1]
    dt = c.kwargs.get("dtype")
    spelling.append(c.spelling + (f"(dtype={str(dt).replace('torch.', '')})" if dt is not None else ""))
    internal = [prod] + chain.nodes + [node]
    # softmax → casts / inactive dropout → second product
    cur, dropout = node, "none"
    while True:
        users = list(cur.users)
        if len(users) != 1:
            raise NotMatched("the attention weights are also used outside attention (e.g. output_attentions)")
        u = users[0]
        uc = canon(u)
        if uc is None:
            raise NotMatched(f"{u.op} {u.target} after the softmax is not supported")
        if uc.kind in CASTS and example(u).is_floating_point():
            spelling.append(uc.spelling)
        elif uc.kind == "dropout":
            p, training = uc.args[1], uc.args[2] if uc.kwargs.get("train") is None else uc.kwargs["train"]
            if isinstance(p, Node) or isinstance(training, Node):
                raise NotMatched("dropout with a run-time probability or mode")
            if p != 0 and training:
                raise NotMatched(f"attention dropout p={p} in training mode (left to eager)")
            dropout = "inactive"
            spelling.append(uc.spelling + "(inactive)")
        elif uc.kind in PRODUCTS:
            break
        else:
            raise NotMatched(f"{uc.spelling} applied to the attention weights")
        internal.append(u)
        cur = u
    probs_rank = example(cur).dim()
    out = second_product(u, uc, cur, layout.roles if probs_rank == len(layout.roles)
                         else [f"b{i}" for i in range(probs_rank - 2)] + ["q", "k"])
    spelling.append(out.spelling)
    v_in, flatten, operands = (out.v, out.v_shape), False, list(chain.operands)
    if regroup is not None:
        operands = [refine_operand(regroup, o) if r == len(regroup.coarse) else o
                    for o, r in zip(operands, chain.operand_rank)]
        if probs_rank == len(regroup.coarse):      # weights and v merged: output flattened back to B·H
            v_in, flatten = refine(regroup, *v_in), True
    for n in internal:
        if any(user not in internal and user is not u for user in n.users):
            raise NotMatched(f"an intermediate of the attention ({n.name}) is also used elsewhere")
    spec = _assemble(
        site=site_name(node), spelling=spelling, roles=roles, q=q_in, k=k_in, v=v_in,
        expr=expr, operands=operands, score_shape=score_shape, proven=proven, empty_row="nan",
        output=u, out_perm=out.out_perm, internal=internal, native_gqa=False, out_flatten=flatten)
    spec.dropout = dropout
    spec.mask_note = mask_note
    return spec


def _feeds_product(node: Node) -> bool:
    """Do the softmax's weights flow (through casts / dropout / views) into a product, like attention's?"""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            uc = canon(u)
            if uc is None or u in seen:
                continue
            seen.add(u)
            if uc.kind in PRODUCTS:
                return True
            if uc.kind in CASTS + ("dropout", "view", "reshape", "transpose", "permute", "mul"):
                frontier.append(u)
    return False


def _first_unsupported(x) -> str:
    """The first node walking back from the softmax input that is not a supported elementwise op."""
    while isinstance(x, Node):
        c = canon(x)
        if c is None or c.kind not in CHAIN:
            return c.spelling if c is not None else f"{x.op} {getattr(x.target, '__name__', x.target)}"
        x = next((a for a in c.args if isinstance(a, Node) and isinstance(example(a), torch.Tensor)), None)
    return "a constant"


def _match_sdpa(node: Node, c) -> AttentionSpec:
    q, k, v = c.args
    kw = c.kwargs
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(kw.get(name), Node):
            ex = example(kw[name])
            if not isinstance(ex, (int, float, bool)) or isinstance(ex, torch.SymInt):
                raise NotMatched(f"scaled_dot_product_attention {name} is only known at run time")
            kw = dict(kw, **{name: ex})
    if kw["dropout_p"]:
        raise NotMatched(f"scaled_dot_product_attention with dropout_p={kw['dropout_p']} (left to SDPA)")
    for t in (q, k, v):
        if not isinstance(t, Node) or not isinstance(example(t), torch.Tensor):
            raise NotMatched("scaled_dot_product_attention on a non-tensor input")
    eq, ek, ev = example(q), example(k), example(v)
    if eq.dim() < 2 or ek.dim() != eq.dim() or ev.dim() != eq.dim():
        raise NotMatched("scaled_dot_product_attention inputs of different ranks")
    d = eq.shape[-1]
    if not isinstance(d, int):
        raise NotMatched("head dim is symbolic")
    scale = kw["scale"] if kw["scale"] is not None else 1.0 / math.sqrt(d)
    expr = ("mul", ("score",), ("const", float(scale)))
    operands, mask_desc, proven, mask_note = [], "none", None, ""
    nd = eq.dim()
    roles = [f"b{i}" for i in range(nd - 2)] + ["q", "k"]
    score_shape = tuple(broadcast_batch(tuple(eq.shape), tuple(ek.shape))) + (eq.shape[-2], ek.shape[-2])
    mask = kw["attn_mask"]
    if mask is not None:
        em = example(mask)
        if not isinstance(mask, Node) or not isinstance(em, torch.Tensor):
            raise NotMatched("attn_mask is not a tensor")
        if kw["is_causal"]:
            raise NotMatched("attn_mask together with is_causal")
        def operand(ref: OperandRef) -> tuple:
            operands.append(ref)
            return ("operand", len(operands) - 1)
        try:
            proven = prove_sdpa_mask(mask, score_shape, roles, eq.dtype)
            expr = proven.wrap(operand, expr)
        except NotProven as exc:
            proven, mask_note = None, str(exc)
        if proven is None:          # the mask as a dense operand
            operands.clear()
            if em.dtype == torch.bool:
                operands.append(mask)
                expr, mask_desc = ("where", ("operand", 0), expr, ("const", -math.inf)), "bool"
            elif em.is_floating_point():
                operands.append(mask)
                expr, mask_desc = ("add", expr, ("operand", 0)), "additive"
            else:
                raise NotMatched(f"attn_mask of dtype {em.dtype}")
    if kw["is_causal"]:
        proven = ProvenMask(MaskProof("top_left", None, []), "zero")
    spec = _assemble(
        site=site_name(node), spelling=[c.spelling], roles=roles,
        q=(TensorRef(q), tuple(eq.shape)), k=(TensorRef(k), tuple(ek.shape)), v=(TensorRef(v), tuple(ev.shape)),
        expr=expr, operands=operands, score_shape=score_shape, proven=proven, empty_row="zero",
        output=node, out_perm=None, internal=[], native_gqa=bool(kw["enable_gqa"]), out_flatten=False)
    if proven is None:
        spec.mask = mask_desc if mask_desc != "none" else spec.mask
    spec.mask_note = mask_note
    return spec


def _equal_lengths(a, b) -> bool:
    """k and v lengths must agree. A KV cache's keys and values are separate graph inputs, so under dynamic
    shapes they carry distinct symbols (s1 + 1, s2 + 1) that nothing in the graph relates (SDPA's meta does not
    compare them); equal now, they are guarded equal, so a call where they differ recompiles instead."""
    if same_size(a, b):
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return guard_or_false(a == b)


def _assemble(*, site, spelling, roles, q, k, v, expr, operands, score_shape, proven, empty_row, output,
              out_perm, internal, native_gqa, out_flatten) -> AttentionSpec:
    """Bring q, k, v and the operands to the op's canonical 4-D layout and build the spec. With a proven
    mask, its structure and empty-row rule replace the defaults."""
    nb = len(roles) - 2
    if nb > 2:
        raise NotMatched(f"{nb} batch dims (the op takes at most batch and heads)")
    (qr, qs), (kr, ks), (vr, vs) = q, k, v
    for name, ref in (("q", qr), ("k", kr), ("v", vr)):
        if not is_float_tensor(ref.node):
            raise NotMatched(f"{name} is not an fp16/bf16/fp32 tensor")
    dts = {example(r.node).dtype for r in (qr, kr, vr)}
    if len(dts) != 1:
        raise NotMatched(f"q, k, v have different dtypes {sorted(map(str, dts))}")
    if len({example(r.node).device for r in (qr, kr, vr)}) != 1:
        raise NotMatched("q, k, v are on different devices")
    if not isinstance(qs[-1], int) or not isinstance(vs[-1], int):
        raise NotMatched("head dim is symbolic")
    if not same_size(qs[-1], ks[-1]) or not _equal_lengths(ks[-2], vs[-2]):
        raise NotMatched("q/k head dims or k/v lengths disagree")
    batch = broadcast_batch(qs, ks)
    for i in range(nb):
        if not (isinstance(vs[i], int) and vs[i] == 1) and not same_size(vs[i], batch[i]):
            raise NotMatched("v broadcasts the batch beyond the scores")
    # grouped-query attention: read the unrepeated K/V
    gqa = 1
    if nb == 2:
        rk = repeated_heads(kr.node) if not kr.steps else None
        rv = repeated_heads(vr.node) if not vr.steps else None
        if rk and rv and rk[1] == rv[1]:
            gqa = rk[1]
            kr, ks = TensorRef(rk[0]), tuple(example(rk[0]).shape)
            vr, vs = TensorRef(rv[0]), tuple(example(rv[0]).shape)
        elif native_gqa and isinstance(qs[1], int) and isinstance(ks[1], int) and ks[1] != qs[1]:
            if qs[1] % ks[1] or ks[1] != vs[1]:
                raise NotMatched(f"enable_gqa with {qs[1]} query heads and {ks[1]} key heads")
            gqa = qs[1] // ks[1]
        elif ks[1] == 1 and vs[1] == 1 and isinstance(batch[1], int) and batch[1] > 1:
            gqa = batch[1]
    refs = {"q": (qr, qs), "k": (kr, ks), "v": (vr, vs)}

    def source(i):
        for r, s in refs.values():
            if same_size(s[i], batch[i]):
                return SizeOf(r, i)
        raise NotMatched("cannot find the batch size to broadcast to")

    canon_refs = {}
    for name, (r, s) in refs.items():
        sizes = []
        for i in range(nb):
            grouped = name in "kv" and i == 1 and gqa > 1
            needs = not same_size(s[i], batch[i]) and not grouped
            sizes.append(source(i) if needs else -1)
        if any(sz != -1 for sz in sizes):
            r = r.then("expand", *sizes, -1, -1)
        for _ in range(2 - nb):
            r = r.then("unsqueeze", 0)
        canon_refs[name] = r
    # operands: broadcast against the scores in the scores' dim order, then canonical order
    perm = [roles.index(rl) for rl in [f"b{i}" for i in range(nb)] + ["q", "k"]]
    op_refs, grads, kinds = [], [], set()
    for node in operands:
        if isinstance(node, OperandRef):        # a view of a graph value, already laid out like the scores
            r, oshape, odtype, ograd, name = node.ref, tuple(node.shape), node.dtype, node.grad, node.ref.node.name
        else:
            eo = example(node)
            r, oshape, odtype, name = TensorRef(node), tuple(eo.shape), eo.dtype, node.name
            ograd = bool(eo.is_floating_point() and eo.requires_grad)
        shape = (1,) * (len(score_shape) - len(oshape)) + oshape
        if len(oshape) > len(score_shape) or any(not (isinstance(a, int) and a == 1) and not same_size(a, b)
                                                 for a, b in zip(shape, score_shape)):
            raise NotMatched(f"operand {name} of shape {oshape} does not broadcast to the scores")
        for _ in range(len(score_shape) - len(oshape)):
            r = r.then("unsqueeze", 0)
        if perm != list(range(len(perm))):
            r = r.then("permute", *perm)
        for _ in range(2 - nb):
            r = r.then("unsqueeze", 0)
        op_refs.append(r)
        grads.append(ograd)
        kinds.add("bool" if odtype == torch.bool else "additive")
    causal, window = "none", None
    if proven is not None:
        causal, window, empty_row = proven.proof.causal, proven.proof.window, proven.empty_row
    program = ScoreProgram(expr, len(operands), causal=causal, window=window, empty_row=empty_row,
                           operand_grad=tuple(grads) if any(grads) else ())
    out_steps = [("squeeze", (0,))] * (2 - nb)
    if out_perm is not None:
        out_steps.append(("permute", tuple(out_perm)))
    if out_flatten:
        out_steps.append(("flatten", (0, 1)))
    eo = example(output)
    if eo.dtype != example(vr.node).dtype:
        raise NotMatched(f"the output dtype {eo.dtype} differs from v's")
    heads = batch[1] if nb == 2 else (batch[0] if nb == 1 else 1)
    shape = f"B={batch[0] if nb == 2 else 1} H={heads}" + (f"/{heads // gqa}" if gqa > 1 and isinstance(heads, int)
                                                           else "") \
        + f" Sq={score_shape[-2]} Sk={score_shape[-1]} D={qs[-1]}" + (f" Dv={vs[-1]}" if vs[-1] != qs[-1] else "")
    return AttentionSpec(
        site=site, spelling=spelling, q=canon_refs["q"], k=canon_refs["k"], v=canon_refs["v"], operands=op_refs,
        program=program, output=output, output_steps=out_steps, nodes=internal,
        scale=program.scale_only() if program.scale_only() is not None else _leading_scale(expr),
        mask=proven.proof.kind if proven is not None else ("+".join(sorted(kinds)) if kinds else "none"), gqa=gqa,
        layout=f"{nb} batch dims, roles {roles}", shape=shape)


def _leading_scale(expr):
    """The constant multiplying the raw score, when the chain starts with one (for the explain summary)."""
    found = []

    def walk(e):
        if e[0] in ("mul",) and ("score",) in e[1:]:
            other = e[2] if e[1] == ("score",) else e[1]
            if other[0] == "const":
                found.append(other[1])
        if e[0] == "div" and e[1] == ("score",) and e[2][0] == "const" and e[2][1]:
            found.append(1.0 / e[2][1])
        for a in e[1:]:
            if isinstance(a, tuple):
                walk(a)
    walk(expr)
    return found[0] if len(found) == 1 else None
