"""Lower the elementwise chain between Q·Kᵀ and the softmax into a ScoreProgram expression.

Walking back from the softmax input: a node that reaches the product through supported elementwise ops is
on the chain and becomes an expression node; a node that does not (a mask, a bias, an ALiBi slope tensor) is
an external operand, computed by Inductor and read by the kernel; a Python number becomes a constant.
"""

from __future__ import annotations

import math
import numbers

import sympy
import torch
from torch.fx import Node

from .mask_eval import NotProven, size_of
from .normalize import Call, canon, example
from .products import same_size
from .spec import NotMatched, OperandRef

PRODUCTS = ("matmul", "bmm", "baddbmm", "einsum")
UNARY = ("neg", "tanh", "exp", "sigmoid", "abs")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum")
CASTS = ("to", "float", "half", "bfloat16", "type_as", "contiguous", "clone")
CHAIN = UNARY + BINARY + CASTS + ("where", "masked_fill", "clamp")
VIEWS = ("view", "reshape", "transpose", "permute", "unsqueeze", "expand")


def regroups_batch(src: tuple, dst: tuple) -> bool:
    """Is a view/reshape from shape src to dst a pure relabeling of the scores: the (q, k) dims kept and the
    batch dims regrouped row-major, one batch dim <-> two (their product proven equal with sympy)?"""
    if len(src) < 2 or len(dst) < 2 or not (same_size(src[-1], dst[-1]) and same_size(src[-2], dst[-2])):
        return False
    a, b = tuple(src[:-2]), tuple(dst[:-2])
    if len(a) == len(b):
        return all(same_size(x, y) for x, y in zip(a, b))
    if sorted((len(a), len(b))) != [1, 2]:
        return False
    one, two = (a, b) if len(a) == 1 else (b, a)
    try:
        return sympy.simplify(size_of(one[0]) - size_of(two[0]) * size_of(two[1])) == 0
    except NotProven:
        return False


def is_float_cast(c: Call, node: Node) -> bool:
    out = example(node)
    return isinstance(out, torch.Tensor) and out.is_floating_point()


class ChainLowering:
    def __init__(self, on_product=None):
        self.on_product = on_product or (lambda node, c: ("score",))   # (node, call) -> the product's expression
        self.product: Node | None = None
        self.operands: list = []            # Node or OperandRef (a view of a node, e.g. a padding vector)
        self.operand_rank: list = []        # rank of the chain value each operand is combined with
        self.relabels: list[Node] = []      # views of the scores that only regroup their batch dims
        self._rank: list[int] = []          # ranks of the chain nodes being lowered (innermost last)
        self.nodes: list[Node] = []         # chain nodes (they vanish with the site)
        self.spelling: list[str] = []
        self._reach: dict[Node, bool] = {}
        self._expr: dict[Node, tuple] = {}

    def reaches_product(self, x) -> bool:
        if not isinstance(x, Node):
            return False
        if x in self._reach:
            return self._reach[x]
        c = canon(x)
        if c is None:
            r = False
        elif c.kind in PRODUCTS:
            r = True
        elif c.kind in CHAIN or c.kind in VIEWS:
            r = any(self.reaches_product(a) for a in c.args if isinstance(a, Node))
        else:
            r = False
        self._reach[x] = r
        return r

    def operand(self, x, rank: int | None = None) -> tuple:
        key = x.key() if isinstance(x, OperandRef) else x
        keys = [o.key() if isinstance(o, OperandRef) else o for o in self.operands]
        if key not in keys:
            self.operands.append(x)
            self.operand_rank.append(rank if rank is not None else (self._rank[-1] if self._rank else None))
            keys.append(key)
        return ("operand", keys.index(key))

    def const(self, value) -> tuple:
        if isinstance(value, bool) or not isinstance(value, numbers.Number):
            raise NotMatched(f"score chain uses a non-numeric constant {value!r}")
        value = float(value)
        if math.isnan(value):
            raise NotMatched("score chain uses a NaN constant")
        return ("const", value)

    def lower(self, x) -> tuple:
        if not isinstance(x, Node):
            return self.const(x)
        ex = example(x)
        if not isinstance(ex, torch.Tensor):
            if isinstance(ex, numbers.Number) and not isinstance(ex, bool):
                return self.const(ex)
            raise NotMatched(f"score chain uses a symbolic scalar ({x.name}); its value is not known at compile time")
        if not self.reaches_product(x):
            if not (ex.is_floating_point() or ex.dtype == torch.bool):
                raise NotMatched(f"score chain reads a {ex.dtype} tensor ({x.name})")
            return self.operand(x)
        if x in self._expr:
            return self._expr[x]
        c = canon(x)
        if c.kind in PRODUCTS:
            if self.product is not None and self.product is not x:
                raise NotMatched("two different products feed one softmax")
            self.product = x
            e = self.on_product(x, c)
        else:
            self.nodes.append(x)
            self.spelling.append(c.spelling)
            self._rank.append(example(x).dim())
            try:
                e = self._lower_call(x, c)
            finally:
                self._rank.pop()
        self._expr[x] = e
        return e

    def _lower_call(self, x: Node, c: Call) -> tuple:
        k, a = c.kind, c.args
        if k in ("view", "reshape") and regroups_batch(tuple(example(a[0]).shape), tuple(example(x).shape)):
            self.relabels.append(x)
            return self.lower(a[0])
        if k in VIEWS:
            raise NotMatched(f"{c.spelling} reshapes the scores between the product and the softmax "
                             "(not a regrouping of batch dims)")
        if k in CASTS:
            if not is_float_cast(c, x):
                raise NotMatched(f"score chain casts the scores to a non-float type ({c.spelling})")
            return self.lower(a[0])
        if k in UNARY:
            return (k, self.lower(a[0]))
        if k in ("add", "sub"):
            alpha = c.kwargs.get("alpha", 1)
            rhs = self.lower(a[1])
            if alpha != 1:
                rhs = ("mul", rhs, self.const(alpha))
            return (k, self.lower(a[0]), rhs)
        if k == "div" and c.kwargs.get("rounding_mode") is not None:
            raise NotMatched(f"score chain divides with rounding_mode={c.kwargs['rounding_mode']!r}")
        if k in BINARY:
            return (k, self.lower(a[0]), self.lower(a[1]))
        if k == "clamp":
            e = self.lower(a[0])
            if a[1] is not None:
                e = ("maximum", e, self.lower(a[1]))
            if a[2] is not None:
                e = ("minimum", e, self.lower(a[2]))
            return e
        if k in ("where", "masked_fill"):
            cond = a[0] if k == "where" else a[1]
            if self.reaches_product(cond):
                raise NotMatched("a where() condition is computed from the scores")
            if not isinstance(cond, Node) or example(cond).dtype != torch.bool:
                raise NotMatched("a where()/masked_fill condition is not a boolean tensor")
            if k == "where":
                return ("where", self.operand(cond), self.lower(a[1]), self.lower(a[2]))
            return ("where", self.operand(cond), self.lower(a[2]), self.lower(a[0]))
        raise NotMatched(f"{c.spelling} in the score chain is not supported")
