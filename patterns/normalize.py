"""One table from the many spellings of a torch-level FX node to a canonical (kind, args, kwargs).

Dynamo hands the backend a graph whose nodes call torch functions, `operator` functions and Tensor methods;
`canon(node)` returns `Call(kind, args, kwargs)` with positional arguments bound in one fixed order per kind,
or None for anything the matcher does not understand (which then stays outside every attention site).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import Node


@dataclasses.dataclass(frozen=True)
class Call:
    kind: str
    args: tuple
    kwargs: dict
    spelling: str       # what the user wrote, for explain


def _name(node: Node) -> str:
    if node.op == "call_method":
        return f".{node.target}()"
    t = node.target
    mod = getattr(t, "__module__", "") or ""
    nm = getattr(t, "__name__", str(t))
    if t in _OPERATOR_SPELLING:
        return _OPERATOR_SPELLING[t]
    if mod.startswith("torch.nn.functional"):
        return f"F.{nm}"
    return f"torch.{nm}" if "torch" in mod or mod == "" else f"{mod}.{nm}"


_OPERATOR_SPELLING = {operator.matmul: "@", operator.add: "+", operator.sub: "-", operator.mul: "*",
                      operator.truediv: "/", operator.neg: "unary -", operator.iadd: "+=", operator.imul: "*=",
                      operator.itruediv: "/=", operator.isub: "-="}

# kind -> (function targets, method names, parameter names in canonical order, defaults)
_SPECS: dict[str, tuple[tuple, tuple, tuple, dict]] = {
    "matmul": ((torch.matmul, operator.matmul), ("matmul", "__matmul__"), ("input", "other"), {}),
    "bmm": ((torch.bmm,), ("bmm",), ("input", "mat2"), {}),
    "baddbmm": ((torch.baddbmm,), ("baddbmm",), ("input", "batch1", "batch2"), {"beta": 1, "alpha": 1}),
    "add": ((torch.add, operator.add, operator.iadd), ("add", "__add__", "__radd__", "add_"), ("input", "other"),
            {"alpha": 1}),
    "sub": ((torch.sub, torch.subtract, operator.sub, operator.isub), ("sub", "subtract", "__sub__"),
            ("input", "other"), {"alpha": 1}),
    "rsub": ((torch.rsub,), ("__rsub__",), ("input", "other"), {"alpha": 1}),
    "mul": ((torch.mul, torch.multiply, operator.mul, operator.imul), ("mul", "multiply", "__mul__", "__rmul__",
                                                                      "mul_"), ("input", "other"), {}),
    "div": ((torch.div, torch.divide, torch.true_divide, operator.truediv, operator.itruediv),
            ("div", "divide", "true_divide", "__truediv__", "div_"), ("input", "other"), {"rounding_mode": None}),
    "neg": ((torch.neg, torch.negative, operator.neg), ("neg", "negative", "__neg__"), ("input",), {}),
    "tanh": ((torch.tanh, F.tanh), ("tanh",), ("input",), {}),
    "exp": ((torch.exp,), ("exp",), ("input",), {}),
    "sigmoid": ((torch.sigmoid, F.sigmoid), ("sigmoid",), ("input",), {}),
    "abs": ((torch.abs,), ("abs",), ("input",), {}),
    "maximum": ((torch.maximum,), ("maximum",), ("input", "other"), {}),
    "minimum": ((torch.minimum,), ("minimum",), ("input", "other"), {}),
    "clamp": ((torch.clamp, torch.clip), ("clamp", "clip"), ("input", "min", "max"), {"min": None, "max": None}),
    "where": ((torch.where,), (), ("condition", "input", "other"), {}),
    "where_method": ((), ("where",), ("input", "condition", "other"), {}),
    "masked_fill": ((torch.masked_fill,), ("masked_fill", "masked_fill_"), ("input", "mask", "value"), {}),
    "softmax": ((torch.softmax, F.softmax, torch.nn.functional.softmax), ("softmax",),
                ("input", "dim"), {"_stacklevel": 3, "dtype": None}),
    "dropout": ((F.dropout, torch.dropout), ("dropout",), ("input", "p", "training"),
                {"p": 0.5, "training": True, "inplace": False, "train": None}),
    "to": ((), ("to", "type"), ("input",), {}),
    "float": ((), ("float",), ("input",), {}),
    "half": ((), ("half",), ("input",), {}),
    "bfloat16": ((), ("bfloat16",), ("input",), {}),
    "type_as": ((), ("type_as",), ("input", "other"), {}),
    "contiguous": ((), ("contiguous", "clone"), ("input",), {"memory_format": None}),
    "clone": ((torch.clone,), (), ("input",), {"memory_format": None}),
    "einsum": ((torch.einsum, torch.functional.einsum), (), (), {}),
    "sdpa": ((F.scaled_dot_product_attention,), (), ("query", "key", "value"),
             {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}),
    "transpose": ((torch.transpose,), ("transpose",), ("input", "dim0", "dim1"), {}),
    "permute": ((torch.permute,), ("permute",), ("input",), {}),
    "view": ((), ("view", "reshape"), ("input",), {}),
    "reshape": ((torch.reshape,), (), ("input", "shape"), {}),
    "expand": ((), ("expand",), ("input",), {}),
    "unsqueeze": ((torch.unsqueeze,), ("unsqueeze",), ("input", "dim"), {}),
    "repeat_interleave": ((torch.repeat_interleave,), ("repeat_interleave",), ("input", "repeats", "dim"),
                          {"dim": None, "output_size": None}),
    "getitem": ((operator.getitem,), (), ("input", "index"), {}),
    "t": ((torch.t,), ("t",), ("input",), {}),
}

_BY_FUNCTION: dict[Any, str] = {}
_BY_METHOD: dict[str, str] = {}
for _kind, (_fns, _methods, _, _) in _SPECS.items():
    for _fn in _fns:
        _BY_FUNCTION.setdefault(_fn, _kind)
    for _m in _methods:
        _BY_METHOD.setdefault(_m, _kind)

# Variadic argument lists: everything after the tensor is the shape / permutation / equation operands.
_VARIADIC = {"permute", "view", "expand", "to"}


def canon(node: Any) -> Call | None:
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    kind = _BY_FUNCTION.get(node.target) if node.op == "call_function" else _BY_METHOD.get(node.target)
    if kind is None:
        return None
    _, _, params, defaults = _SPECS[kind]
    args, kwargs = tuple(node.args), dict(node.kwargs)
    spelling = _name(node)
    if kind == "einsum":
        eq, *ops = args
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        return Call(kind, (eq, *ops), {}, spelling)
    if kind in _VARIADIC:
        rest = args[1:]
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = tuple(rest[0])
        if kind == "permute" and "dims" in kwargs:
            rest = tuple(kwargs.pop("dims"))
        if kind == "view" and "size" in kwargs:
            rest = tuple(kwargs.pop("size"))
        return Call(kind, (args[0] if args else kwargs.pop("input", kwargs.pop("self", None)), *rest), kwargs,
                    spelling)
    bound = list(args[: len(params)])
    extra = dict(kwargs)
    for i in range(len(bound), len(params)):
        p = params[i]
        if p in extra:
            bound.append(extra.pop(p))
        elif p == "input" and "self" in extra:
            bound.append(extra.pop("self"))
        elif p in defaults:
            bound.append(defaults[p])
        else:
            return None
    for p, v in zip(params[len(args):], bound[len(args):]):
        extra.pop(p, None)
    # positional arguments past the canonical ones (e.g. F.softmax(x, -1, 3, torch.float32))
    for p, v in zip([p for p in defaults if p not in params], args[len(params):]):
        extra[p] = v
    full = {k: v for k, v in defaults.items() if k not in params}
    full.update(extra)
    if kind == "where_method":
        kind = "where"
        bound = [bound[1], bound[0], bound[2]]
    if kind == "rsub":  # torch.rsub(a, b) = b - a
        kind = "sub"
        bound = [bound[1], bound[0]]
    return Call(kind, tuple(bound), full, spelling)


def example(x):
    """The fake value a Dynamo node carries (a FakeTensor, a SymInt, ...), or the constant itself."""
    if isinstance(x, Node):
        return x.meta.get("example_value")
    return x


def is_tensor(x) -> bool:
    return isinstance(example(x), torch.Tensor)
