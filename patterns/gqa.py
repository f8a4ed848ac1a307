"""Grouped-query attention: recognise K/V heads repeated for the query heads, so the op reads the original
(B, Hkv, S, D) tensor with native GQA instead of the repeated copy.

Spellings: HF's repeat_kv — x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv·G, S, D) (or unsqueeze(2)),
and x.repeat_interleave(G, dim=1). Both put query head h on kv head h // G, the op's convention. Every step
is verified on the shapes the nodes carry, not on the argument spelling.
"""

from __future__ import annotations

from torch.fx import Node

from .normalize import canon, example
from .products import same_size


def _shape(n):
    return tuple(example(n).shape)


def repeated_heads(node: Node) -> tuple[Node, int] | None:
    """If node is x with each of its dim-1 heads repeated G times (G ≥ 2), return (x, G)."""
    c = canon(node)
    if c is None:
        return None
    out = _shape(node)
    if len(out) != 4:
        return None
    if c.kind == "repeat_interleave":
        x, reps, dim = c.args
        if not isinstance(reps, int) or reps < 2 or dim is None or dim % 4 != 1 or not isinstance(x, Node):
            return None
        return x, reps
    if c.kind not in ("view", "reshape"):
        return None
    e = canon(c.args[0])
    if e is None or e.kind != "expand":
        return None
    u = canon(e.args[0])
    if u is None or not isinstance(u.args[0], Node):
        return None
    x = u.args[0]
    xs = _shape(x)
    if len(xs) != 4:
        return None
    if u.kind == "unsqueeze":
        if u.args[1] % 5 != 2:
            return None
    elif u.kind == "getitem":
        idx = u.args[1]
        if not isinstance(idx, tuple) or sum(i is None for i in idx) != 1 or idx.index(None) != 2 \
                or any(i is not None and i != slice(None) for i in idx):
            return None
    else:
        return None
    us, es = _shape(e.args[0]), _shape(c.args[0])
    if us != xs[:2] + (1,) + xs[2:] or len(es) != 5:
        return None
    g = es[2]
    if not isinstance(g, int) or g < 2:
        return None
    if not all(same_size(es[i], us[i]) for i in (0, 1, 3, 4)):
        return None
    if not (same_size(out[0], xs[0]) and same_size(out[2], xs[2]) and same_size(out[3], xs[3])):
        return None
    if not (isinstance(xs[1], int) and isinstance(out[1], int) and out[1] == xs[1] * g):
        return None
    return x, g
