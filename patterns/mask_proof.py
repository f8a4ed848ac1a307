"""Prove what a mask built inside the graph is: causal, sliding window, all-visible, and/or key padding.

Under torch.compile, transformers materialises its masks from aranges: `kv_idx <= q_idx` (causal, q_idx offset
by the KV-cache length), `kv_idx > q_idx - W` (sliding window), `q_idx >= 0` (encoders: always true), a gather
`attention_mask[batch_idx, kv_idx]` (padding), then `where(mask, 0.0, finfo.min)` added to the scores or a bool
SDPA attn_mask. Passing that (B, 1, Sq, Sk) tensor to the kernel works, but the kernel then reads Sq·Sk
elements and cannot skip the hidden blocks.

Here the mask value is traced backwards through the FX graph and evaluated symbolically with sympy: every
tensor becomes one element expression in index symbols (one per dimension), with sizes as sympy expressions
(symbolic under dynamic shapes). aranges, integer arithmetic, comparisons, logic, where, views, expands,
slicing and gathers are understood; anything else (an input, a parameter, an unsupported op) is an opaque
function of its indices. In the score's index space the boolean "visible" formula must then be, as a theorem
over the integers, `S(q_idx, k_idx) ∧ P_1 ∧ … ∧ P_m` where S restricts d = k_idx - q_idx to an interval
(causal: d <= offset, sliding window: offset - W <= d <= offset, or nothing) and each P is a boolean graph
tensor indexed by (batch, head, key) only, which the kernel reads as a small (B, 1, 1, Sk)-like operand.
The offset must be 0 (top-left) or Sk - Sq (bottom-right) as sympy expressions of the sizes.

The decision is sound, not complete: relational atoms become propositional variables (an upper bound on d, or
a literal P), the formula is evaluated on every region between the (totally ordered) bounds and every truth
assignment of the P's, and it must equal the claimed form on all of them. Anything else (a bound that is not a
difference k - q with unit coefficients, data that depends on the query index, symbolic bounds of unknown
order) is NotProven, and the caller keeps the dense operand.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import sympy
import torch
from sympy.core.function import AppliedUndef
from sympy.core.relational import Relational
from torch.fx import Node

from .mask_eval import IDX, Evaluator, NotProven, bounds, eq_size, is_one, provably, reindex, shape_of, size_of
from .normalize import example
from .spec import OperandRef, TensorRef

MAX_LEAVES = 4


@dataclasses.dataclass
class MaskProof:
    causal: str                     # "none" | "top_left" | "bottom_right"
    window: int | None
    leaves: list                    # [(OperandRef, positive: bool)]: visible only where each literal holds

    @property
    def kind(self) -> str:
        parts = []
        if self.window is not None:
            parts.append("sliding_window")
        elif self.causal != "none":
            parts.append("causal")
        if self.leaves:
            parts.append("padding")
        return "+".join(parts) if parts else "all-visible"


# --- the decision -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Space:
    shape: tuple        # score sizes (sympy)
    qdim: int
    kdim: int


def _linear_atom(rel, space: _Space):
    """Classify a relational atom without opaque values: True / False / ('le', U) meaning k - q <= U."""
    op = type(rel).__name__
    lhs, rhs = rel.lhs, rel.rhs
    if op in ("Equality", "Unequality"):
        le1 = _linear_atom(sympy.Le(lhs, rhs, evaluate=False), space)
        le2 = _linear_atom(sympy.Ge(lhs, rhs, evaluate=False), space)
        both = ("and", le1, le2)
        return both if op == "Equality" else ("not", both)
    # integer canonical form: e <= 0
    if op == "LessThan":
        e = lhs - rhs
    elif op == "StrictLessThan":
        e = lhs - rhs + 1
    elif op == "GreaterThan":
        e = rhs - lhs
    elif op == "StrictGreaterThan":
        e = rhs - lhs + 1
    else:
        raise NotProven(f"relation {rel}")
    e = sympy.expand(e)
    bd = bounds(e, space.shape)
    if bd is None:
        raise NotProven(f"the mask compares non-linear or data-dependent values ({rel})")
    if provably(sympy.Le(bd[1], 0)):
        return True
    if provably(sympy.Gt(bd[0], 0)):
        return False
    i, j = IDX[space.qdim], IDX[space.kdim]
    a_i, a_j = e.coeff(i), e.coeff(j)
    rest = sympy.expand(e - a_i * i - a_j * j)
    if any(x in IDX for x in rest.free_symbols):
        raise NotProven(f"the mask depends on a batch or head index ({rel})")
    if a_j == 1 and a_i == -1:          # j - i + rest <= 0  <=>  d <= -rest
        return ("le", sympy.expand(-rest))
    if a_j == -1 and a_i == 1:          # i - j + rest <= 0  <=>  d >= rest  <=>  not (d <= rest - 1)
        return ("not", ("le", sympy.expand(rest - 1)))
    raise NotProven(f"the mask is not a band in k_idx - q_idx ({rel})")


def _leaf_atom(rel, ev: Evaluator, space: _Space):
    """An atom on an opaque boolean graph tensor: (OperandRef, positive) if it is a (batch, head, key) vector."""
    op = type(rel).__name__
    if op not in ("Equality", "Unequality") or rel.rhs != 1 or not isinstance(rel.lhs, AppliedUndef):
        raise NotProven(f"the mask depends on data in a way that is not a boolean tensor ({rel})")
    f = rel.lhs
    node = ev.opaque.get(f.func.__name__)
    if node is None or example(node).dtype != torch.bool:
        raise NotProven(f"the mask compares data values ({rel})")
    nshape = shape_of(node)
    targets = []
    for k, a in enumerate(f.args):
        if a == 0 and is_one(nshape[k]):
            continue
        if a not in IDX[: len(space.shape)]:
            raise NotProven(f"{node.name} is read at shifted or computed positions")
        d = IDX.index(a)
        if d == space.qdim:
            raise NotProven(f"{node.name} depends on the query position (a dense mask)")
        if not eq_size(nshape[k], space.shape[d]):
            raise NotProven(f"{node.name} is read at a subset of its positions")
        targets.append((k, d))
    ds = [d for _, d in targets]
    if len(set(ds)) != len(ds):
        raise NotProven(f"{node.name} is read on a diagonal")
    ref = TensorRef(node)
    rank = len(space.shape)
    aligned = len(nshape) == rank and all(k == d for k, d in targets)
    if not aligned:
        for k in sorted((k for k in range(len(nshape)) if k not in [t[0] for t in targets]), reverse=True):
            ref = ref.then("squeeze", k)
        order = sorted(range(len(ds)), key=lambda n: ds[n])
        if order != list(range(len(ds))):
            ref = ref.then("permute", *order)
        for pos in range(rank):
            if pos not in ds:
                ref = ref.then("unsqueeze", pos)
    shape = tuple(example(node).shape[k] for k, d in sorted(targets, key=lambda t: t[1]))
    full = []
    it = iter(shape)
    for pos in range(rank):
        full.append(next(it) if pos in ds else 1)
    return OperandRef(ref, tuple(full), torch.bool), op == "Equality"


def decide(formula, space: _Space, ev: Evaluator) -> MaskProof:
    """Prove formula ≡ band(k - q) ∧ literals over the score's index space, or raise NotProven."""
    if formula is sympy.false:
        raise NotProven("the mask hides every position")
    atoms = formula.atoms(Relational) if formula is not sympy.true else set()
    bounds: list = []           # distinct U of the atoms "d <= U"
    leaves: dict = {}           # OperandRef.key() -> (OperandRef, symbol)
    repl = {}

    def bound_var(u):
        for n, v in enumerate(bounds):
            diff = sympy.simplify(u - v)
            if diff == 0:
                return sympy.Symbol(f"_u{n}")
        bounds.append(u)
        return sympy.Symbol(f"_u{len(bounds) - 1}")

    def build(c):
        if c is True or c is False:
            return sympy.true if c else sympy.false
        if c[0] == "le":
            return bound_var(c[1])
        if c[0] == "not":
            return sympy.Not(build(c[1]))
        return sympy.And(build(c[1]), build(c[2]))

    for a in atoms:
        if a.has(AppliedUndef):
            ref, positive = _leaf_atom(a, ev, space)
            key = ref.key()
            if key not in leaves:
                leaves[key] = (ref, sympy.Symbol(f"_p{len(leaves)}"))
            sym = leaves[key][1]
            repl[a] = sym if positive else sympy.Not(sym)
        else:
            repl[a] = build(_linear_atom(a, space))
    if len(leaves) > MAX_LEAVES:
        raise NotProven("too many data-dependent terms")
    prop = formula.xreplace(repl) if repl else formula
    # order the bounds: their differences must be known numbers
    order = list(range(len(bounds)))
    for a, b in itertools.combinations(range(len(bounds)), 2):
        if not sympy.simplify(bounds[a] - bounds[b]).is_number:
            raise NotProven(f"cannot order the band limits {bounds[a]} and {bounds[b]}")
    order.sort(key=lambda n: float(sympy.simplify(bounds[n] - bounds[0])))
    uvars = [sympy.Symbol(f"_u{n}") for n in order]
    pvars = [sym for _, sym in leaves.values()]
    # the formula must be true for one assignment of the literals only (the same in every region): then it is
    # band(d) ∧ (each leaf as that assignment says)
    pattern, chosen = [], None
    for region in range(len(order) + 1):      # region r: U_{r-1} < d <= U_r (d <= U_k true iff k >= r)
        env = {u: (k >= region) for k, u in enumerate(uvars)}
        hit = False
        for values in itertools.product((True, False), repeat=len(pvars)):
            e = dict(env)
            e.update(dict(zip(pvars, values)))
            val = prop.xreplace({s: sympy.true if v else sympy.false for s, v in e.items()})
            if val not in (sympy.true, sympy.false):
                raise NotProven("the mask formula does not reduce to a truth value")
            if val is sympy.true:
                if chosen is not None and chosen != values:
                    raise NotProven("the data-dependent terms do not simply restrict the mask")
                chosen, hit = values, True
        pattern.append(hit)
    true_regions = [r for r, t in enumerate(pattern) if t]
    if not true_regions:
        raise NotProven("the mask hides every position")
    r0, r1 = true_regions[0], true_regions[-1]
    if true_regions != list(range(r0, r1 + 1)):
        raise NotProven("the visible positions are not one band")
    lo = None if r0 == 0 else bounds[order[r0 - 1]] + 1
    hi = None if r1 == len(order) else bounds[order[r1]]
    sq, sk = space.shape[space.qdim], space.shape[space.kdim]
    causal, window = "none", None
    if hi is not None:
        if sympy.simplify(hi) == 0:
            causal = "top_left"
        elif sympy.simplify(hi - (sk - sq)) == 0:
            causal = "bottom_right"
        else:
            raise NotProven(f"causal offset {hi} is neither 0 nor Sk - Sq")
    if lo is not None:
        if hi is None:
            raise NotProven("a lower band limit without an upper one")
        w = sympy.simplify(hi - lo)
        if not w.is_Integer or w < 0:
            raise NotProven(f"window size {w} is not a non-negative constant")
        window = int(w)
    return MaskProof(causal, window, [(ref, bool(v)) for (ref, _), v in zip(leaves.values(), chosen)])


# --- entry points -------------------------------------------------------------------------------------------

def _space(score_shape, roles) -> _Space:
    shape = tuple(size_of(s) for s in score_shape)
    return _Space(shape, roles.index("q"), roles.index("k"))


def _guarded(fn):
    """Anything unexpected while proving (an argument form, a sympy limitation) means: not proven."""
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except NotProven:
            raise
        except Exception as exc:    # the caller keeps the dense mask, which is always right
            raise NotProven(f"could not analyse the mask ({type(exc).__name__}: {exc})") from exc
    run.__doc__, run.__name__ = fn.__doc__, fn.__name__
    return run


@_guarded
def prove_visible(cond: Node, score_shape, roles, negate: bool = False) -> MaskProof:
    """`cond` (bool, broadcastable to the scores) marks the visible positions (the hidden ones if negate)."""
    ev = Evaluator()
    space = _space(score_shape, roles)
    c = ev.value(cond)
    if c.kind != "bool":
        raise NotProven("the mask condition is not boolean")
    f = reindex(c, space.shape)
    return decide(sympy.Not(f) if negate else f, space, ev)


@_guarded
def prove_additive(mask: Node, score_shape, roles) -> tuple[MaskProof, float]:
    """`mask` (float) is 0 where visible and a constant fill elsewhere; returns the proof and the fill."""
    ev = Evaluator()
    space = _space(score_shape, roles)
    m = ev.value(mask)
    if m.kind != "float":
        raise NotProven("the additive mask is not a float tensor")
    e = sympy.piecewise_fold(reindex(m, space.shape))
    if e.is_zero:
        return decide(sympy.true, space, ev), 0.0
    if not isinstance(e, sympy.Piecewise) or len(e.args) != 2 or e.args[1][1] is not sympy.true:
        raise NotProven("the additive mask is not where(condition, 0, fill)")
    (a, c), (b, _) = e.args
    if a.is_zero and b.is_number and not b.is_zero:
        visible, fill = c, b
    elif b.is_zero and a.is_number and not a.is_zero:
        visible, fill = sympy.Not(c), a
    else:
        raise NotProven("the additive mask is not where(condition, 0, fill)")
    fill = float(fill) if fill.is_finite else (-math.inf if fill == -sympy.oo else math.inf)
    return decide(visible, space, ev), fill
