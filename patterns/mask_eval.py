"""Symbolic values of the tensors that build a mask: one sympy element expression per tensor.

A tensor of rank n is described by its sizes (sympy, symbolic under dynamic shapes) and one expression in
the index symbols IDX[0..n-1] giving its element at any index. aranges, integer arithmetic, comparisons,
logic, where / masked_fill, views that only move size-1 dims, expands, permutes, slicing and gathers, tril /
triu, first differences and cumsums of constants are evaluated exactly; any other value (an input, a
parameter, an unsupported op) is an opaque sympy function of its indices named after its node, and a boolean
one appears as Eq(T_node(...), 1). Used by mask_proof.py.
"""

from __future__ import annotations

import dataclasses
import math
import operator

import sympy
import torch
from sympy.core.function import AppliedUndef
from torch.fx import Node

from .normalize import example

MAX_RANK = 8
MAX_NODES = 400
IDX = [sympy.Symbol(f"_i{k}", integer=True, nonnegative=True) for k in range(MAX_RANK)]


class NotProven(Exception):
    """The mask could not be shown to have one of the supported forms (the reason says why)."""


@dataclasses.dataclass
class Sym:
    shape: tuple        # sympy sizes
    expr: object        # sympy expression in IDX[:len(shape)]
    kind: str           # "bool" | "int" | "float"


# --- sizes and constants ------------------------------------------------------------------------------------

def size_of(s):
    if isinstance(s, bool):
        raise NotProven("a boolean where a size was expected")
    if isinstance(s, int):
        return sympy.Integer(s)
    if isinstance(s, torch.SymInt):
        return sympy.sympify(s.node.expr)
    raise NotProven(f"size {s!r} is not an integer")


def shape_of(node) -> tuple:
    ev = example(node)
    if not isinstance(ev, torch.Tensor):
        raise NotProven(f"{getattr(node, 'name', node)} is not a tensor")
    if ev.dim() > MAX_RANK:
        raise NotProven("tensor of too high rank")
    return tuple(size_of(s) for s in ev.shape)


def is_one(s) -> bool:
    return s == 1


def eq_size(a, b) -> bool:
    return sympy.simplify(a - b) == 0


def _kind_of(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        raise NotProven("complex values")
    return "int"


def _number(v):
    if isinstance(v, bool):
        return sympy.true if v else sympy.false
    if isinstance(v, int):
        return sympy.Integer(v)
    if isinstance(v, float):
        if math.isnan(v):
            raise NotProven("NaN constant")
        if math.isinf(v):
            return sympy.oo if v > 0 else -sympy.oo
        return sympy.Float(v, precision=53)
    raise NotProven(f"constant {v!r}")


def _scalar_kind(v) -> str:
    return "bool" if isinstance(v, bool) else "int" if isinstance(v, int) else "float"


def _num(s: Sym):
    """Numeric value of s (booleans as 0/1)."""
    if s.kind == "bool":
        return sympy.Piecewise((sympy.Integer(1), s.expr), (sympy.Integer(0), True))
    return s.expr


def _truth(s: Sym):
    """Boolean value of s (numbers: != 0)."""
    if s.kind == "bool":
        return s.expr
    return sympy.Ne(s.expr, 0)


def _check_representable(e, dtype: torch.dtype) -> None:
    """Every float constant of a value must be exact in the tensor's dtype (-1e9 in fp16 is -inf)."""
    for f in e.atoms(sympy.Float):
        v = float(f)
        if torch.tensor(v, dtype=dtype).item() != v:
            raise NotProven(f"constant {v:g} is not exact in {dtype}")


def reindex(s: Sym, out_shape: tuple):
    """s's expression in the index symbols of out_shape, broadcasting right-aligned."""
    r, m = len(out_shape), len(s.shape)
    if m > r:
        raise NotProven("broadcast to a lower rank")
    sub = {}
    for k in range(m):
        d = k + r - m
        if is_one(s.shape[k]):
            sub[IDX[k]] = sympy.Integer(0)
        elif eq_size(s.shape[k], out_shape[d]):
            sub[IDX[k]] = IDX[d]
        else:
            raise NotProven(f"sizes {s.shape} do not broadcast to {out_shape}")
    return s.expr.xreplace(sub)


def bounds(e, shape):
    """(min, max) of an expression linear in IDX over the index box of shape, or None."""
    syms = [IDX[k] for k in range(len(shape))]
    if e.has(AppliedUndef) or e.has(sympy.Piecewise):
        return None
    extra = [x for x in e.free_symbols if x in IDX and x not in syms]
    if extra:
        return None
    try:
        poly = sympy.Poly(e, *syms) if syms else None
    except sympy.PolynomialError:
        return None
    if poly is not None and poly.total_degree() > 1:
        return None
    lo = hi = e.xreplace({x: 0 for x in syms})
    for k, x in enumerate(syms):
        a = e.coeff(x)
        if a == 0:
            continue
        if not a.is_number:
            return None
        top = a * (shape[k] - 1)
        if a > 0:
            hi = hi + top
        else:
            lo = lo + top
    return sympy.expand(lo), sympy.expand(hi)


def provably(rel) -> bool:
    return rel is sympy.true or rel == True  # noqa: E712  (sympy's BooleanTrue)


# --- symbolic evaluation ---------------------------------------------------------------------------------

_COMPARE = {"lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge, "eq": sympy.Eq, "ne": sympy.Ne}

_FUNCS = {
    torch.arange: "arange",
    operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub", torch.subtract: "sub",
    torch.rsub: "rsub", operator.mul: "mul", torch.mul: "mul", torch.multiply: "mul",
    operator.neg: "neg", torch.neg: "neg",
    operator.lt: "lt", torch.lt: "lt", torch.less: "lt", operator.le: "le", torch.le: "le",
    torch.less_equal: "le", operator.gt: "gt", torch.gt: "gt", torch.greater: "gt", operator.ge: "ge",
    torch.ge: "ge", torch.greater_equal: "ge", operator.eq: "eq", torch.eq: "eq", operator.ne: "ne",
    torch.ne: "ne", torch.not_equal: "ne",
    operator.and_: "and", torch.logical_and: "and", torch.bitwise_and: "and",
    operator.or_: "or", torch.logical_or: "or", torch.bitwise_or: "or",
    operator.xor: "xor", torch.logical_xor: "xor", torch.bitwise_xor: "xor",
    operator.invert: "not", torch.logical_not: "not", torch.bitwise_not: "not",
    torch.where: "where", torch.masked_fill: "masked_fill", operator.getitem: "getitem",
    torch.unsqueeze: "unsqueeze", torch.squeeze: "relabel", torch.reshape: "relabel", torch.permute: "permute",
    torch.transpose: "transpose", torch.tril: "tril", torch.triu: "triu", torch.diff: "diff",
    torch.cumsum: "cumsum", torch.clone: "copy", torch.broadcast_to: "expand",
    torch.ones: "const1", torch.zeros: "const0", torch.full: "full", torch.ones_like: "const1",
    torch.zeros_like: "const0", torch.full_like: "full_like", torch.tensor: "tensor",
    torch.scalar_tensor: "tensor",
}

_METHODS = {
    "add": "add", "__add__": "add", "__radd__": "add", "sub": "sub", "__sub__": "sub", "__rsub__": "rsub",
    "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "neg": "neg", "__neg__": "neg",
    "lt": "lt", "__lt__": "lt", "le": "le", "__le__": "le", "gt": "gt", "__gt__": "gt", "ge": "ge",
    "__ge__": "ge", "eq": "eq", "__eq__": "eq", "ne": "ne", "__ne__": "ne",
    "logical_and": "and", "__and__": "and", "bitwise_and": "and", "logical_or": "or", "__or__": "or",
    "bitwise_or": "or", "logical_xor": "xor", "__xor__": "xor", "logical_not": "not", "__invert__": "not",
    "bitwise_not": "not", "where": "where_method", "masked_fill": "masked_fill",
    "unsqueeze": "unsqueeze", "squeeze": "relabel", "view": "relabel", "reshape": "relabel",
    "expand": "expand", "expand_as": "expand", "broadcast_to": "expand", "permute": "permute",
    "transpose": "transpose", "contiguous": "copy", "clone": "copy", "to": "convert", "type": "convert",
    "bool": "convert", "int": "convert", "long": "convert", "float": "convert", "double": "convert",
    "half": "convert", "bfloat16": "convert", "type_as": "convert", "tril": "tril", "triu": "triu",
    "diff": "diff", "cumsum": "cumsum", "repeat": "repeat", "new_ones": "const1", "new_zeros": "const0",
    "new_full": "full_like",
}


class Evaluator:
    """Symbolic values of graph nodes (memoised); opaque values are sympy functions named after their node."""

    def __init__(self):
        self.memo: dict = {}
        self.opaque: dict = {}        # function name -> node
        self.visited = 0

    # leaves -------------------------------------------------------------------------------------------
    def value(self, x) -> Sym:
        if not isinstance(x, Node):
            if isinstance(x, (bool, int, float)):
                return Sym((), _number(x), _scalar_kind(x))
            raise NotProven(f"argument {x!r}")
        if x in self.memo:
            return self.memo[x]
        self.visited += 1
        if self.visited > MAX_NODES:
            raise NotProven("the mask is computed by too large a subgraph")
        ev = example(x)
        if isinstance(ev, torch.SymInt) or (isinstance(ev, int) and not isinstance(ev, bool)):
            s = Sym((), size_of(ev), "int")
        elif not isinstance(ev, torch.Tensor):
            raise NotProven(f"{x.name} is not a tensor or an integer")
        else:
            s = self._call(x)
        self.memo[x] = s
        return s

    def opaque_value(self, node: Node) -> Sym:
        shape = shape_of(node)
        name = f"T_{node.name}"
        self.opaque[name] = node
        args = [sympy.Integer(0) if is_one(n) else IDX[k] for k, n in enumerate(shape)]
        f = sympy.Function(name)(*args)
        kind = _kind_of(example(node).dtype)
        return Sym(shape, sympy.Eq(f, 1) if kind == "bool" else f, kind)

    def _call(self, node: Node) -> Sym:
        if node.op == "call_function":
            kind = _FUNCS.get(node.target)
        elif node.op == "call_method":
            kind = _METHODS.get(node.target)
        else:
            kind = None
        if kind is None:
            return self.opaque_value(node)
        out_shape = shape_of(node)
        dtype = example(node).dtype
        out_kind = _kind_of(dtype)
        if out_kind == "int" and dtype not in (torch.int64, torch.int32):
            raise NotProven(f"{dtype} values (narrow integers wrap around)")
        try:
            s = getattr(self, "_op_" + kind)(node, out_shape, out_kind)
        except (TypeError, ValueError, IndexError, KeyError, AttributeError, ZeroDivisionError) as exc:
            raise NotProven(f"cannot evaluate {node.name} ({type(exc).__name__})") from exc
        if out_kind == "float":
            _check_representable(s.expr, dtype)
        return s

    # helpers ------------------------------------------------------------------------------------------
    def _arg(self, node, i, name, default=None):
        if len(node.args) > i:
            return node.args[i]
        return node.kwargs.get(name, default)

    def _int(self, x):
        v = self.value(x)
        if v.shape != () or v.kind != "int":
            raise NotProven(f"{x!r} is not an integer scalar")
        return v.expr

    # ops ---------------------------------------------------------------------------------------------
    def _op_arange(self, node, shape, kind):
        a = list(node.args)
        start, end, step = 0, None, 1
        if len(a) == 1:
            end = a[0]
        elif len(a) >= 2:
            start, end = a[0], a[1]
            step = a[2] if len(a) > 2 else node.kwargs.get("step", 1)
        start = node.kwargs.get("start", start)
        step = node.kwargs.get("step", step)
        if any(isinstance(v, float) for v in (start, step)) or kind != "int":
            raise NotProven("arange of floats (rounding above 2^24)")
        return Sym(shape, self._int(start) + self._int(step) * IDX[0], kind)

    def _binary_num(self, node, shape, kind, fn):
        a, b = self.value(node.args[0]), self.value(node.args[1])
        if node.kwargs.get("alpha", 1) != 1 or (len(node.args) > 2):
            raise NotProven("add/sub with alpha")
        if a.kind == "bool" and b.kind == "bool":
            raise NotProven("arithmetic on two booleans")
        if kind != "int":
            raise NotProven("floating-point arithmetic (it rounds; only integer arithmetic is evaluated exactly)")
        ea, eb = (reindex(Sym(s.shape, _num(s), s.kind), shape) for s in (a, b))
        return Sym(shape, fn(ea, eb), kind)

    def _op_add(self, node, shape, kind):
        return self._binary_num(node, shape, kind, operator.add)

    def _op_sub(self, node, shape, kind):
        return self._binary_num(node, shape, kind, operator.sub)

    def _op_rsub(self, node, shape, kind):
        return self._binary_num(node, shape, kind, lambda a, b: b - a)

    def _op_mul(self, node, shape, kind):
        return self._binary_num(node, shape, kind, operator.mul)

    def _op_neg(self, node, shape, kind):
        a = self.value(node.args[0])
        if a.kind == "bool":
            raise NotProven("negation of a boolean")
        return Sym(shape, -reindex(a, shape), kind)

    def _compare(self, node, shape, op):
        a, b = self.value(node.args[0]), self.value(node.args[1])
        if "float" in (a.kind, b.kind) and a.kind != b.kind:
            raise NotProven("an integer compared with a float (compared after rounding to float)")
        if a.kind == "bool" and b.kind == "bool" and op in ("eq", "ne"):
            ea, eb = reindex(a, shape), reindex(b, shape)
            eq = sympy.Equivalent(ea, eb)
            return Sym(shape, eq if op == "eq" else sympy.Not(eq), "bool")
        ea = reindex(Sym(a.shape, _num(a), a.kind), shape)
        eb = reindex(Sym(b.shape, _num(b), b.kind), shape)
        return Sym(shape, _COMPARE[op](ea, eb), "bool")

    def _op_lt(self, node, shape, kind):
        return self._compare(node, shape, "lt")

    def _op_le(self, node, shape, kind):
        return self._compare(node, shape, "le")

    def _op_gt(self, node, shape, kind):
        return self._compare(node, shape, "gt")

    def _op_ge(self, node, shape, kind):
        return self._compare(node, shape, "ge")

    def _op_eq(self, node, shape, kind):
        return self._compare(node, shape, "eq")

    def _op_ne(self, node, shape, kind):
        return self._compare(node, shape, "ne")

    def _logic(self, node, shape, kind, fn):
        vals = [self.value(a) for a in node.args[:2]]
        if kind != "bool" or any(v.kind != "bool" for v in vals):
            raise NotProven("bitwise logic on integers")
        return Sym(shape, fn(*[reindex(v, shape) for v in vals]), "bool")

    def _op_and(self, node, shape, kind):
        return self._logic(node, shape, kind, sympy.And)

    def _op_or(self, node, shape, kind):
        return self._logic(node, shape, kind, sympy.Or)

    def _op_xor(self, node, shape, kind):
        return self._logic(node, shape, kind, sympy.Xor)

    def _op_not(self, node, shape, kind):
        a = self.value(node.args[0])
        if a.kind != "bool":
            raise NotProven("bitwise not on integers")
        return Sym(shape, sympy.Not(reindex(a, shape)), "bool")

    def _select(self, shape, kind, cond: Sym, a: Sym, b: Sym) -> Sym:
        c = reindex(Sym(cond.shape, _truth(cond), "bool"), shape)
        if kind == "bool":
            ea, eb = (reindex(Sym(s.shape, _truth(s), "bool"), shape) for s in (a, b))
            return Sym(shape, sympy.Or(sympy.And(c, ea), sympy.And(sympy.Not(c), eb)), "bool")
        ea, eb = (reindex(Sym(s.shape, _num(s), s.kind), shape) for s in (a, b))
        return Sym(shape, sympy.Piecewise((ea, c), (eb, True)), kind)

    def _op_where(self, node, shape, kind):
        if len(node.args) + len(node.kwargs) != 3:
            raise NotProven("where with one argument")
        c = self._arg(node, 0, "condition")
        a = self._arg(node, 1, "input")
        b = self._arg(node, 2, "other")
        return self._select(shape, kind, self.value(c), self.value(a), self.value(b))

    def _op_where_method(self, node, shape, kind):   # x.where(cond, other)
        x, c = node.args[0], self._arg(node, 1, "condition")
        o = self._arg(node, 2, "other")
        return self._select(shape, kind, self.value(c), self.value(x), self.value(o))

    def _op_masked_fill(self, node, shape, kind):
        x, m, v = node.args[0], self._arg(node, 1, "mask"), self._arg(node, 2, "value")
        return self._select(shape, kind, self.value(m), self.value(v), self.value(x))

    def _op_copy(self, node, shape, kind):
        a = self.value(node.args[0] if node.args else node.kwargs["input"])
        if a.kind != kind:
            raise NotProven("copy changing dtype")
        return Sym(shape, reindex(a, shape), kind)

    def _op_convert(self, node, shape, kind):
        a = self.value(node.args[0])
        if kind == "bool" and a.kind != "bool" and a.expr.has(AppliedUndef):
            return self.opaque_value(node)      # a data tensor made boolean: the converted tensor is the leaf
        src, dst = example(node.args[0]).dtype, example(node).dtype
        if src != dst and src.is_floating_point and dst.is_floating_point:
            raise NotProven(f"conversion {src} -> {dst} (may round or overflow)")
        if a.kind == kind:
            e = a.expr
        elif kind == "bool":
            e = _truth(a)
        elif a.kind == "bool":
            e = _num(a)
        else:
            raise NotProven(f"conversion of {a.kind} values to {kind} (may round)")
        if len(a.shape) != len(shape) or not all(eq_size(x, y) for x, y in zip(a.shape, shape)):
            raise NotProven("conversion changes the shape")
        return Sym(shape, e, kind)

    def _op_relabel(self, node, shape, kind):
        """view / reshape / squeeze that only inserts or removes size-1 dims (any other reshape: NotProven)."""
        a = self.value(node.args[0])
        if example(node.args[0]).dtype != example(node).dtype:
            raise NotProven("a view as another dtype")
        src = [k for k, n in enumerate(a.shape) if not is_one(n)]
        dst = [k for k, n in enumerate(shape) if not is_one(n)]
        if len(src) != len(dst) or not all(eq_size(a.shape[i], shape[j]) for i, j in zip(src, dst)):
            raise NotProven("a reshape that is not a relabeling of dims")
        sub = {IDX[k]: sympy.Integer(0) for k in range(len(a.shape))}
        sub.update({IDX[i]: IDX[j] for i, j in zip(src, dst)})
        return Sym(shape, a.expr.xreplace(sub), kind)

    def _op_unsqueeze(self, node, shape, kind):
        return self._op_relabel(node, shape, kind)

    def _op_expand(self, node, shape, kind):
        a = self.value(node.args[0])
        return Sym(shape, reindex(a, shape), kind)

    def _op_permute(self, node, shape, kind):
        a = self.value(node.args[0])
        perm = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) == 2 else node.kwargs["dims"])
        perm = [int(p) % len(shape) for p in (perm if isinstance(perm, (list, tuple)) else [perm])]
        if sorted(perm) != list(range(len(shape))):
            raise NotProven("not a permutation")
        return Sym(shape, a.expr.xreplace({IDX[p]: IDX[d] for d, p in enumerate(perm)}), kind)

    def _op_transpose(self, node, shape, kind):
        a = self.value(node.args[0])
        d0, d1 = (int(node.args[i]) % len(shape) for i in (1, 2))
        return Sym(shape, a.expr.xreplace({IDX[d0]: IDX[d1], IDX[d1]: IDX[d0]}), kind)

    def _tri(self, node, shape, kind, lower: bool):
        a = self.value(node.args[0])
        diag = self._int(self._arg(node, 1, "diagonal", 0))
        r = len(shape)
        if r < 2:
            raise NotProven("tril/triu of a vector")
        d = IDX[r - 1] - IDX[r - 2]
        keep = sympy.Le(d, diag) if lower else sympy.Ge(d, diag)
        zero = Sym((), sympy.false if kind == "bool" else sympy.Integer(0), kind)
        return self._select(shape, kind, Sym(shape, keep, "bool"), a, zero)

    def _op_tril(self, node, shape, kind):
        return self._tri(node, shape, kind, True)

    def _op_triu(self, node, shape, kind):
        return self._tri(node, shape, kind, False)

    def _op_cumsum(self, node, shape, kind):
        a = self.value(node.args[0])
        if kind != "int":
            raise NotProven("cumsum of floats")
        dim = self._arg(node, 1, "dim")
        d = int(dim) % len(shape)
        e = _num(a)
        if e.has(IDX[d]):
            raise NotProven("cumsum of a value that varies along the summed dim")
        return Sym(shape, (IDX[d] + 1) * e, kind)

    def _op_diff(self, node, shape, kind):
        a = self.value(node.args[0])
        n, dim = self._arg(node, 1, "n", 1), self._arg(node, 2, "dim", -1)
        pre, app = self._arg(node, 3, "prepend"), self._arg(node, 4, "append")
        if n != 1 or app is not None or kind != "int":
            raise NotProven("diff other than first differences of integers")
        d = int(dim) % len(shape)
        t = IDX[d]
        at = lambda s, idx: s.expr.xreplace({t: idx})   # noqa: E731
        if pre is None:
            return Sym(shape, at(a, t + 1) - a.expr, kind)
        p = self.value(pre)
        if len(p.shape) != len(a.shape) or not is_one(p.shape[d]):
            raise NotProven("diff with a prepend of more than one step")
        first = at(a, sympy.Integer(0)) - p.expr.xreplace({t: sympy.Integer(0)})
        return Sym(shape, sympy.Piecewise((a.expr - at(a, t - 1), t >= 1), (first, True)), kind)

    def _op_repeat(self, node, shape, kind):
        a = self.value(node.args[0])
        reps = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
        r, m = len(shape), len(a.shape)
        sub = {}
        for k in range(m):
            d = k + r - m
            if is_one(a.shape[k]):
                sub[IDX[k]] = sympy.Integer(0)
            elif reps[d] == 1:
                sub[IDX[k]] = IDX[d]
            else:
                sub[IDX[k]] = sympy.Mod(IDX[d], a.shape[k])
        return Sym(shape, a.expr.xreplace(sub), kind)

    def _const(self, shape, kind, value):
        v = _number(value)
        if kind == "bool":
            v = sympy.true if bool(value) else sympy.false
        return Sym(shape, v, kind)

    def _op_const1(self, node, shape, kind):
        return self._const(shape, kind, 1)

    def _op_const0(self, node, shape, kind):
        return self._const(shape, kind, 0)

    def _op_full(self, node, shape, kind):
        v = self._arg(node, 1, "fill_value")
        if isinstance(v, Node):
            raise NotProven("full with a run-time value")
        return self._const(shape, kind, v)

    def _op_full_like(self, node, shape, kind):
        return self._op_full(node, shape, kind)

    def _op_tensor(self, node, shape, kind):
        v = node.args[0] if node.args else node.kwargs.get("data")
        if shape != () or not isinstance(v, (bool, int, float)):
            raise NotProven("torch.tensor of a non-scalar")
        return self._const(shape, kind, v)

    def _op_getitem(self, node, shape, kind):
        base, index = node.args
        b = self.value(base)
        if not isinstance(index, tuple):
            index = (index,)
        consuming = sum(1 for i in index if i is not None and i is not Ellipsis)
        if sum(1 for i in index if i is Ellipsis) > 1:
            raise NotProven("two ellipses")
        entries = []
        for i in index:
            if i is Ellipsis:
                entries += [slice(None)] * (len(b.shape) - consuming)
            else:
                entries.append(i)
        n_in = sum(1 for i in entries if i is not None)
        entries += [slice(None)] * (len(b.shape) - n_in)
        adv = [p for p, e in enumerate(entries) if isinstance(e, Node)]
        adv_vals = [self.value(entries[p]) for p in adv]
        if any(v.kind != "int" for v in adv_vals):
            raise NotProven("boolean or float tensor index")
        adv_rank = max((len(v.shape) for v in adv_vals), default=0)
        adjacent = adv and adv == list(range(adv[0], adv[0] + len(adv)))
        # output layout: a token per output dim
        tokens = []
        for p, e in enumerate(entries):
            if isinstance(e, Node):
                if adjacent and p == adv[0]:
                    tokens += [("adv", j) for j in range(adv_rank)]
            elif e is None:
                tokens.append(("new",))
            elif isinstance(e, slice):
                tokens.append(("slice", p))
            elif isinstance(e, int):
                pass
            else:
                raise NotProven(f"index {e!r}")
        if adv and not adjacent:
            tokens = [("adv", j) for j in range(adv_rank)] + tokens
        if len(tokens) != len(shape):
            raise NotProven("unexpected indexing result rank")
        adv_pos = [o for o, t in enumerate(tokens) if t[0] == "adv"]
        adv_shape = tuple(shape[o] for o in adv_pos)
        sub = {}
        in_dim = 0
        for p, e in enumerate(entries):
            if e is None:
                continue
            size = b.shape[in_dim]
            x = IDX[in_dim]
            if isinstance(e, Node):
                v = adv_vals[adv.index(p)]
                local = reindex(v, adv_shape)
                ex = local.xreplace({IDX[j]: IDX[adv_pos[j]] for j in range(len(adv_pos))})
                self._check_in_bounds(ex, shape, size)
                sub[x] = ex
            elif isinstance(e, int):
                i = e + size if e < 0 else e
                sub[x] = sympy.Integer(i) if isinstance(i, int) else i
            else:
                o = tokens.index(("slice", p))
                start, step = e.start or 0, e.step or 1
                if not isinstance(start, int) or not isinstance(step, int) or start < 0 or step <= 0:
                    raise NotProven("a slice with a negative or symbolic start or step")
                sub[x] = start + step * IDX[o]
            in_dim += 1
        return Sym(shape, b.expr.xreplace(sub), kind)

    @staticmethod
    def _check_in_bounds(e, shape, size):
        """A gather index must be provably inside [0, size): torch wraps negative indices."""
        bd = bounds(e, shape)
        if bd is None or not provably(sympy.Ge(bd[0], 0)) or not provably(sympy.Le(bd[1], size - 1)):
            raise NotProven("cannot show a gather index is within bounds")


