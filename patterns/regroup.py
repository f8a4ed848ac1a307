"""Sites whose scores are regrouped between the product and the softmax (BART-style eager attention):

    w = bmm(q3, k3ᵀ)                         # (B·H, Sq, Sk)
    w = w.view(B, H, Sq, Sk) + mask           # (B, H, Sq, Sk)
    w = w.view(B·H, Sq, Sk).softmax(-1)       # (B·H, Sq, Sk)
    out = bmm(w, v3)

Every view in the chain was checked (chain.regroups_batch, sympy on the sizes) to keep (Sq, Sk) and only merge
or split the batch dims row-major, so the elementwise chain means the same thing in either grouping. The site
is then expressed in the split (two batch dims) layout, which the op takes natively: q, k, v and operands that
live in the merged layout are reshaped to (B, H, …) with the chain's own split sizes (or the 4-D tensor they
were merged from is used directly), and the op's output is flattened back to B·H.
"""

from __future__ import annotations

import dataclasses

from torch.fx import Node

from .normalize import canon, example
from .products import same_size
from .spec import NotMatched, OperandRef, SizeOf, TensorRef


@dataclasses.dataclass
class Regroup:
    coarse: tuple       # (B·H, Sq, Sk): the product's scores
    fine: tuple         # (B, H, Sq, Sk)
    args: tuple         # the split's two batch sizes as the view wrote them (ints, SymInt nodes, at most one -1)


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def find_regroup(chain, prod: Node, layout) -> Regroup | None:
    """The regrouping of the site's scores, or None when the chain has no regrouping view.

    The product's scores are either the merged (B·H, Sq, Sk) ones, split by a view whose two batch sizes are
    used to split q, k, v and operands alike, or the split ones, merged by a view: then the split sizes are
    read from q or k, which carry them."""
    sp = tuple(example(prod).shape)
    other, args = None, None
    for n in chain.relabels:
        sh = tuple(example(n).shape)
        if len(sh) == len(sp):
            continue
        if sorted((len(sp), len(sh))) != [3, 4]:
            raise NotMatched("the scores are regrouped other than between one batch dim and two")
        if other is not None and not _same_shape(other, sh):
            raise NotMatched("the scores are regrouped in two different ways")
        other = sh
        if len(sh) == 4:
            c = canon(n)
            sizes = tuple(c.args[1]) if c.kind == "reshape" else tuple(c.args[1:])
            args = sizes[:2] if len(sizes) == 4 else None
    if other is None:
        return None
    coarse, fine = (sp, other) if len(sp) == 3 else (other, sp)
    if len(sp) == 4:
        if layout.roles != ["b0", "b1", "q", "k"]:
            raise NotMatched("regrouped scores of a product with reordered dims")
        src = next((s for s in (layout.q_shape, layout.k_shape) if _same_shape(s[:2], fine[:2])), None)
        if src is None:
            raise NotMatched("q and k both broadcast a batch dim of the regrouped scores")
        ref = layout.q if src is layout.q_shape else layout.k
        args = tuple(_size_arg(ref, src, d) for d in (0, 1))
    if args is None or sum(1 for a in args if isinstance(a, int) and a == -1) > 1 or \
            any(not isinstance(a, (int, Node, SizeOf)) for a in args):
        raise NotMatched("cannot read the batch split of the regrouped scores")
    for n in chain.nodes:
        sh = tuple(example(n).shape)
        if not (_same_shape(sh, coarse) or _same_shape(sh, fine)):
            raise NotMatched("the score chain broadcasts the scores to a larger shape")
    return Regroup(coarse, fine, tuple(args))


def _size_arg(ref: TensorRef, shape: tuple, dim: int):
    return shape[dim] if isinstance(shape[dim], int) else SizeOf(ref, dim)


def refine(reg: Regroup, ref: TensorRef, shape: tuple) -> tuple[TensorRef, tuple]:
    """[B·H, S, X] -> [B, H, S, X]: the 4-D tensor it was merged from, or a reshape with the chain's split."""
    if len(shape) != 3 or not same_size(shape[0], reg.coarse[0]):
        raise NotMatched("q, k or v broadcasts over the regrouped batch dim")
    c = canon(ref.node) if not ref.steps else None
    if c is not None and c.kind in ("view", "reshape") and isinstance(c.args[0], Node):
        src = tuple(example(c.args[0]).shape)
        if len(src) == 4 and _same_shape(src[:2], reg.fine[:2]) and _same_shape(src[2:], shape[1:]):
            return TensorRef(c.args[0]), src
    fine_shape = (reg.fine[0], reg.fine[1], shape[1], shape[2])
    return ref.then("reshape", *reg.args, _size_arg(ref, shape, 1), _size_arg(ref, shape, 2)), fine_shape


def refine_operand(reg: Regroup, op) -> OperandRef:
    """An operand combined with the merged (B·H, Sq, Sk) scores, as a view broadcasting to the split ones."""
    if isinstance(op, OperandRef):
        ref, shape, dtype, grad = op.ref, tuple(op.shape), op.dtype, op.grad
    else:
        eo = example(op)
        ref, shape, dtype = TensorRef(op), tuple(eo.shape), eo.dtype
        grad = bool(eo.is_floating_point() and eo.requires_grad)
    if len(shape) > 3:
        raise NotMatched("an operand of the merged scores has more than three dims")
    for _ in range(3 - len(shape)):
        ref, shape = ref.then("unsqueeze", 0), (1,) + shape
    if isinstance(shape[0], int) and shape[0] == 1:
        return OperandRef(ref.then("unsqueeze", 0), (1,) + shape, dtype, grad)
    ref, fine_shape = refine(reg, ref, shape)
    return OperandRef(ref, fine_shape, dtype, grad)
