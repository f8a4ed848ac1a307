"""The two products of an attention site, in any spelling (@, matmul, bmm, baddbmm, einsum).

The score tensor S = Q·Kᵀ gets a role per dimension: batch roles "b0", "b1", …, then "q" and "k"
(einsum may order them differently). The first product yields q and k as TensorRefs laid out
[batch…, q, d] and [batch…, k, d]; the second product checks that it contracts S's "k" axis with v and
says how the op's canonical output maps back onto the user's layout.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.fx import Node

from .normalize import Call, canon, example
from .spec import NotMatched, TensorRef


@dataclasses.dataclass
class ScoreLayout:
    roles: list[str]            # role of each dim of S, in S's order
    q: TensorRef                # [b…, q, d]
    k: TensorRef                # [b…, k, d]
    q_shape: tuple
    k_shape: tuple
    spelling: str


@dataclasses.dataclass
class OutputLayout:
    v: TensorRef                # [b…, k, dv]
    v_shape: tuple
    out_perm: list[int] | None  # permutation from canonical [b…, q, dv] to the product's output, or None
    spelling: str


def _pad(ref: TensorRef, shape: tuple, ndim: int) -> tuple[TensorRef, tuple]:
    """Prepend size-1 dims (matmul broadcasting) so that the tensor has ndim dims."""
    for _ in range(ndim - len(shape)):
        ref = ref.then("unsqueeze", 0)
        shape = (1,) + tuple(shape)
    return ref, tuple(shape)


def _permuted(ref: TensorRef, shape: tuple, perm: list[int]) -> tuple[TensorRef, tuple]:
    if perm == list(range(len(perm))):
        return ref, tuple(shape)
    return ref.then("permute", *perm), tuple(shape[p] for p in perm)


def _untransposed(node) -> tuple[TensorRef, tuple]:
    """Given B laid out (…, d, k), return k laid out (…, k, d), peeling an explicit transpose when present."""
    ex = example(node)
    nd = ex.dim()
    c = canon(node)
    if c is not None and c.kind == "transpose" and isinstance(c.args[1], int) and isinstance(c.args[2], int):
        if {c.args[1] % nd, c.args[2] % nd} == {nd - 1, nd - 2}:
            return TensorRef(c.args[0]), tuple(example(c.args[0]).shape)
    if c is not None and c.kind == "t" and nd == 2:
        return TensorRef(c.args[0]), tuple(example(c.args[0]).shape)
    if c is not None and c.kind == "permute":
        perm = [p % nd for p in c.args[1:]]
        if len(perm) == nd and perm[:-2] == list(range(nd - 2)) and perm[-2:] == [nd - 1, nd - 2]:
            return TensorRef(c.args[0]), tuple(example(c.args[0]).shape)
    shape = tuple(ex.shape)
    return TensorRef(node).then("transpose", -2, -1), shape[:-2] + (shape[-1], shape[-2])


def parse_einsum(eq: str) -> tuple[str, str, str]:
    eq = eq.replace(" ", "")
    if "..." in eq or "->" not in eq:
        raise NotMatched(f"einsum {eq!r}: only explicit two-operand equations without '...' are matched")
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or any(len(set(p)) != len(p) for p in parts + [out]):
        raise NotMatched(f"einsum {eq!r} is not a two-operand product without repeated letters")
    return parts[0], parts[1], out


def first_product(node: Node, c: Call) -> ScoreLayout:
    if c.kind in ("matmul", "bmm", "baddbmm"):
        a, b = (c.args[0], c.args[1]) if c.kind != "baddbmm" else (c.args[1], c.args[2])
        ea, eb = example(a), example(b)
        if ea.dim() < 2 or eb.dim() < 2:
            raise NotMatched("a 1-D operand in the Q·Kᵀ product")
        nd = max(ea.dim(), eb.dim())
        q, q_shape = _pad(TensorRef(a), tuple(ea.shape), nd)
        k, k_shape = _untransposed(b)
        k, k_shape = _pad(k, k_shape, nd)
        roles = [f"b{i}" for i in range(nd - 2)] + ["q", "k"]
        return ScoreLayout(roles, q, k, q_shape, k_shape, c.spelling)
    if c.kind == "einsum":
        eq, a, b = c.args[0], c.args[1], c.args[2] if len(c.args) == 3 else None
        if b is None:
            raise NotMatched("einsum with other than two operands")
        la, lb, lo = parse_einsum(eq)
        d = [x for x in la if x in lb and x not in lo]
        ql = [x for x in la if x not in lb]
        kl = [x for x in lb if x not in la]
        batch = [x for x in lo if x in la and x in lb]
        if len(d) != 1 or len(ql) != 1 or len(kl) != 1 or ql[0] not in lo or kl[0] not in lo \
                or len(batch) + 2 != len(lo) or len(batch) + 2 != len(la) or len(la) != len(lb):
            raise NotMatched(f"einsum {eq!r} is not a batched Q·Kᵀ product")
        q, q_shape = _permuted(TensorRef(a), tuple(example(a).shape), [la.index(x) for x in batch + ql + d])
        k, k_shape = _permuted(TensorRef(b), tuple(example(b).shape), [lb.index(x) for x in batch + kl + d])
        roles = ["q" if x == ql[0] else "k" if x == kl[0] else f"b{batch.index(x)}" for x in lo]
        return ScoreLayout(roles, q, k, q_shape, k_shape, f"einsum('{eq}')")
    raise NotMatched(f"{c.spelling} is not a product")


def second_product(node: Node, c: Call, probs: Node, roles: list[str]) -> OutputLayout:
    nb = len(roles) - 2
    batch_roles = [f"b{i}" for i in range(nb)]
    if c.kind in ("matmul", "bmm"):
        if c.args[0] is not probs:
            raise NotMatched("the attention weights are the right operand of the second product")
        if roles[-2:] != ["q", "k"]:
            raise NotMatched("the second product does not contract the key axis of the weights")
        v = c.args[1]
        ev = example(v)
        if ev.dim() < 2 or ev.dim() > len(roles):
            raise NotMatched("the value tensor has more batch dims than the scores")
        ref, shape = _pad(TensorRef(v), tuple(ev.shape), len(roles))
        if roles[:-2] != batch_roles:
            raise NotMatched("the scores' batch dims are reordered before the second product")
        return OutputLayout(ref, shape, None, c.spelling)
    if c.kind == "einsum":
        eq = c.args[0]
        if len(c.args) != 3:
            raise NotMatched("einsum with other than two operands")
        la, lb, lo = parse_einsum(eq)
        if c.args[1] is probs:
            lp, lv, v = la, lb, c.args[2]
        elif c.args[2] is probs:
            lp, lv, v = lb, la, c.args[1]
        else:
            raise NotMatched("the attention weights are not an operand of the second einsum")
        if len(lp) != len(roles):
            raise NotMatched(f"einsum {eq!r} does not match the rank of the weights")
        role_of = dict(zip(lp, roles))
        kl = [x for x, r in role_of.items() if r == "k"][0]
        ql = [x for x, r in role_of.items() if r == "q"][0]
        bl = [next(x for x, r in role_of.items() if r == br) for br in batch_roles]
        dv = [x for x in lv if x not in lp]
        if kl in lo or kl not in lv or ql not in lo or ql in lv or len(dv) != 1 or dv[0] not in lo \
                or sorted(lv) != sorted(bl + [kl] + dv) or sorted(lo) != sorted(bl + [ql] + dv):
            raise NotMatched(f"einsum {eq!r} does not contract the key axis of the weights with v")
        ref, shape = _permuted(TensorRef(v), tuple(example(v).shape), [lv.index(x) for x in bl + [kl] + dv])
        canonical = bl + [ql] + dv
        perm = [canonical.index(x) for x in lo]
        return OutputLayout(ref, shape, None if perm == list(range(len(perm))) else perm, f"einsum('{eq}')")
    raise NotMatched(f"{c.spelling} after the softmax is not a product with v")


def broadcast_batch(*shapes: tuple) -> tuple:
    """Batch sizes of the scores: matmul broadcasting of the given [b…, x, y] shapes' batch dims."""
    nb = len(shapes[0]) - 2
    out = []
    for i in range(nb):
        sizes = [s[i] for s in shapes if not (isinstance(s[i], int) and s[i] == 1)]
        out.append(sizes[0] if sizes else 1)
    return tuple(out)


def same_size(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return a is b or str(a) == str(b)


def is_float_tensor(x) -> bool:
    ex = example(x)
    return isinstance(ex, torch.Tensor) and ex.dtype in (torch.float16, torch.bfloat16, torch.float32)
