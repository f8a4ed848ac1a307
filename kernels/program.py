"""The kernels' input language: what happens to one attention score between Q·Kᵀ and the softmax.

A `ScoreProgram` is pure data (no torch, no fx). The pattern matcher lowers the user's elementwise chain
into it; every kernel backend (PyTorch reference, portable Triton, Hopper) compiles it. It is serialised to a
string so that it can travel as a compile-time constant argument of the `fa3::attention` op.

Semantics, for every (b, h, i, j) of the canonical score tensor (B, Hq, Sq, Sk):

    s      = sum_d q[b, h, i, d] * k[b, h // G, j, d]            (fp32 accumulation)
    x      = eval(expr)                                          (fp32 for float values)
    x      = -inf where the structural mask (causal / window) hides (i, j)
    p      = softmax_j(x)         rows with no finite x give `empty_row` (below)
    out    = sum_j p[b, h, i, j] * v[b, h // G, j, :]

A row with no finite x (every key hidden) follows `empty_row`:
    "nan"      NaN, like eager softmax over -inf
    "zero"     0, like SDPA (its safe softmax), with no gradient
    "uniform"  p = 1/Sk on every key (out = mean of v), like eager softmax over a row that an additive mask
               filled with finfo.min (fl(y + finfo.min) = finfo.min for every real score y); the backward
               differentiates that uniform softmax through `unmasked(expr)`, the expression without its
               top-level -inf masking, as autograd does through `y + mask`

Expression nodes are tuples:
    ("score",)                     the raw product s
    ("const", c)                   a float constant (may be +-inf)
    ("operand", n)                 external tensor n, broadcast to (B, Hq, Sq, Sk); float or bool
    ("q_idx",) ("k_idx",)          the row / column index i, j
    (op, a)                        op in UNARY
    (op, a, b)                     op in BINARY
    ("where", c, a, b)
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

UNARY = ("neg", "tanh", "exp", "abs", "sigmoid", "not", "identity")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum",
          "lt", "le", "gt", "ge", "eq", "ne", "and", "or")
COMPARE = ("lt", "le", "gt", "ge", "eq", "ne")
LOGICAL = ("and", "or", "not")
LEAVES = ("score", "const", "operand", "q_idx", "k_idx")

CAUSAL_KINDS = ("none", "top_left", "bottom_right")
EMPTY_ROW_KINDS = ("nan", "zero", "uniform")


class ProgramError(ValueError):
    """A ScoreProgram that is not well formed."""


def _check_expr(e: Any, n_operands: int) -> str:
    """Validate an expression; return its value kind, 'float' or 'bool'."""
    if not isinstance(e, tuple) or not e or not isinstance(e[0], str):
        raise ProgramError(f"expression node must be a non-empty tuple headed by a name: {e!r}")
    op = e[0]
    if op == "score":
        return "float"
    if op == "const":
        if len(e) != 2 or not isinstance(e[1], (int, float)) or isinstance(e[1], bool) or math.isnan(e[1]):
            raise ProgramError(f"const needs one non-NaN number: {e!r}")
        return "float"
    if op == "operand":
        if len(e) != 2 or not isinstance(e[1], int) or not 0 <= e[1] < n_operands:
            raise ProgramError(f"operand index out of range 0..{n_operands - 1}: {e!r}")
        return "any"
    if op in ("q_idx", "k_idx"):
        return "float"
    if op in UNARY:
        if len(e) != 2:
            raise ProgramError(f"{op} takes one argument: {e!r}")
        kind = _check_expr(e[1], n_operands)
        return "bool" if op == "not" else ("float" if op != "identity" else kind)
    if op in BINARY:
        if len(e) != 3:
            raise ProgramError(f"{op} takes two arguments: {e!r}")
        _check_expr(e[1], n_operands)
        _check_expr(e[2], n_operands)
        return "bool" if op in COMPARE or op in LOGICAL else "float"
    if op == "where":
        if len(e) != 4:
            raise ProgramError(f"where takes three arguments: {e!r}")
        for a in e[1:]:
            _check_expr(a, n_operands)
        return "float"
    raise ProgramError(f"unknown expression op {op!r}")


def _to_json(e):
    if isinstance(e, tuple):
        return [_to_json(a) for a in e]
    if isinstance(e, float) and math.isinf(e):
        return {"inf": 1 if e > 0 else -1}
    return e


def _from_json(e):
    if isinstance(e, list):
        return tuple(_from_json(a) for a in e)
    if isinstance(e, dict):
        return math.inf if e["inf"] > 0 else -math.inf
    return e


@dataclasses.dataclass(frozen=True)
class ScoreProgram:
    expr: tuple = ("score",)
    n_operands: int = 0
    causal: str = "none"            # structural causal mask; top_left: j <= i, bottom_right: j <= i + Sk - Sq
    window: int | None = None       # with causal: also hide j < i(+offset) - window (sliding window)
    empty_row: str = "nan"          # what a row with no finite score gives
    operand_grad: tuple = ()        # per operand: may a gradient flow into it (float bias requiring grad)

    def __post_init__(self):
        _check_expr(self.expr, self.n_operands)
        if self.causal not in CAUSAL_KINDS:
            raise ProgramError(f"causal must be one of {CAUSAL_KINDS}, got {self.causal!r}")
        if self.window is not None and (self.causal == "none" or self.window < 0):
            raise ProgramError("window needs a causal kind and a non-negative size")
        if self.empty_row not in EMPTY_ROW_KINDS:
            raise ProgramError(f"empty_row must be one of {EMPTY_ROW_KINDS}, got {self.empty_row!r}")
        if self.operand_grad and len(self.operand_grad) != self.n_operands:
            raise ProgramError("operand_grad needs one flag per operand")

    def dumps(self) -> str:
        d = dataclasses.asdict(self)
        d["expr"] = _to_json(self.expr)
        d["operand_grad"] = list(self.operand_grad)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    @staticmethod
    def loads(s: str) -> "ScoreProgram":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ProgramError(f"not a serialised ScoreProgram: {s[:80]!r}") from exc
        d["expr"] = _from_json(d["expr"])
        d["operand_grad"] = tuple(d.get("operand_grad", ()))
        return ScoreProgram(**d)

    # --- facts the kernels specialise on -------------------------------------------------------------
    def scale_only(self) -> float | None:
        """If the whole chain is `score * c` (or just `score`), return c: kernels fold it into exp2."""
        e = self.expr
        if e == ("score",):
            return 1.0
        if e[0] == "mul" and e[1] == ("score",) and e[2][0] == "const":
            return float(e[2][1])
        if e[0] == "mul" and e[2] == ("score",) and e[1][0] == "const":
            return float(e[1][1])
        if e[0] == "div" and e[1] == ("score",) and e[2][0] == "const" and e[2][1] != 0:
            return 1.0 / float(e[2][1])
        return None

    def describe(self) -> str:
        parts = [render(self.expr)]
        if self.causal != "none":
            parts.append(f"causal={self.causal}" + (f" window={self.window}" if self.window is not None else ""))
        if self.empty_row != "nan":
            parts.append(f"empty_row={self.empty_row}")
        return ", ".join(parts)


def unmasked(e) -> tuple:
    """The expression without its top-level masking: where(c, a, -inf) -> a (nested ones too)."""
    while e[0] == "where" and e[3] == ("const", -math.inf):
        e = e[2]
    return e


_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
          "eq": "==", "ne": "!=", "and": "&", "or": "|"}


def render(e) -> str:
    """Human-readable form of an expression, for explain reports and generated-kernel headers."""
    op = e[0]
    if op == "score":
        return "s"
    if op == "const":
        return repr(e[1])
    if op == "operand":
        return f"t{e[1]}"
    if op in ("q_idx", "k_idx"):
        return op[0]
    if op in _INFIX:
        return f"({render(e[1])} {_INFIX[op]} {render(e[2])})"
    return f"{op}({', '.join(render(a) for a in e[1:])})"


# --- symbolic derivative (used by every backward: dS = dX · ∂x/∂s, d operand = dX · ∂x/∂operand) ----------

_ZERO = ("const", 0.0)
_ONE = ("const", 1.0)


def _is_const(e, value=None):
    return e[0] == "const" and (value is None or e[1] == value)


def _add(a, b):
    if _is_const(a, 0.0):
        return b
    if _is_const(b, 0.0):
        return a
    return ("add", a, b)


def _mul(a, b):
    if _is_const(a, 0.0) or _is_const(b, 0.0):
        return _ZERO
    if _is_const(a, 1.0):
        return b
    if _is_const(b, 1.0):
        return a
    return ("mul", a, b)


def _neg(a):
    return _ZERO if _is_const(a, 0.0) else ("neg", a)


def _where(c, a, b):
    if a == b:
        return a
    return ("where", c, a, b)


def derivative(e, wrt) -> tuple:
    """∂e/∂wrt as a new expression; wrt is ("score",) or ("operand", n). Boolean subexpressions have none."""
    op = e[0]
    if op in LEAVES:
        return _ONE if e == wrt else _ZERO
    if op in COMPARE or op in LOGICAL:
        return _ZERO
    d = [derivative(a, wrt) for a in e[1:]]
    if op == "identity":
        return d[0]
    if op == "neg":
        return _neg(d[0])
    if op == "tanh":
        return _mul(("sub", _ONE, ("mul", e, e)), d[0])
    if op == "exp":
        return _mul(e, d[0])
    if op == "sigmoid":
        return _mul(("mul", e, ("sub", _ONE, e)), d[0])
    if op == "abs":
        return _mul(("where", ("lt", e[1], _ZERO), ("const", -1.0), _ONE), d[0])
    if op == "add":
        return _add(d[0], d[1])
    if op == "sub":
        return _add(d[0], _neg(d[1]))
    if op == "mul":
        return _add(_mul(d[0], e[2]), _mul(e[1], d[1]))
    if op == "div":
        # d(a/b) = da/b - a·db/b²
        first = ("div", d[0], e[2]) if not _is_const(d[0], 0.0) else _ZERO
        second = _ZERO if _is_const(d[1], 0.0) else ("div", ("mul", e[1], d[1]), ("mul", e[2], e[2]))
        return _add(first, _neg(second))
    if op == "maximum":
        return _where(("ge", e[1], e[2]), d[0], d[1])
    if op == "minimum":
        return _where(("le", e[1], e[2]), d[0], d[1])
    if op == "where":
        return _where(e[1], d[1], d[2])
    raise ProgramError(f"no derivative for {op!r}")
