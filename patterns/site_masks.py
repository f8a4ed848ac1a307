"""Masks at an attention site: when mask_proof.py proves what a mask built in the graph is, the site uses a
structural mask (causal / sliding window, which the kernels skip block by block) plus small per-key operands
instead of the dense (B, H, Sq, Sk) mask tensor.

Only a mask applied last, right before the softmax, is replaced: x = y + M with M = where(C, 0, fill),
x = where(C, y, -inf), x = y.masked_fill(~C, -inf), or SDPA's attn_mask. Hidden positions then become -inf;
a softmax sees no difference on any row with a visible key (exp(fill − max) underflows to 0 for fill = finfo.min
as for -inf). A row with no visible key follows the program's empty_row: NaN (eager over -inf), 0 (SDPA over
-inf) or "uniform" (eager and SDPA over finfo.min fills: the mean of v, gradient through y). Other fills
(e.g. -10000.0, which leaves a little weight on hidden keys) are not replaced, nor are where / masked_fill
with a finite fill (their fully masked rows pass no gradient to the scores, unlike y + mask). When nothing is
proven the site keeps the dense operand and the reason is kept for the explain report.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.fx import Node

from .mask_proof import MaskProof, NotProven, prove_additive, prove_visible
from .normalize import canon, example


@dataclasses.dataclass
class ProvenMask:
    proof: MaskProof
    empty_row: str

    def wrap(self, operand, y: tuple) -> tuple:
        """y with the proven per-key literals applied; operand(OperandRef) -> ("operand", n).

        A "uniform" empty row stands for eager's softmax over finfo.min fills, which is uniform only if y has
        no -inf of its own (another mask): then the site keeps the dense operand."""
        if self.empty_row == "uniform" and _has_neg_inf(y):
            raise NotProven("the scores are also masked with -inf elsewhere (rows masked by both would differ)")
        cond = None
        for ref, positive in self.proof.leaves:
            lit = operand(ref) if positive else ("not", operand(ref))
            cond = lit if cond is None else ("and", cond, lit)
        return y if cond is None else ("where", cond, y, ("const", -math.inf))


def _has_neg_inf(e) -> bool:
    if e[0] == "const":
        return e[1] == -math.inf
    return any(isinstance(a, tuple) and _has_neg_inf(a) for a in e[1:])


def _is_neg_inf(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == -math.inf


def _empty_row_for_fill(fill: float, score_dtype: torch.dtype, on_inf: str) -> str:
    if fill == 0.0:
        return on_inf
    if fill == -math.inf:
        return on_inf
    if fill <= torch.finfo(score_dtype).min:
        return "uniform"
    raise NotProven(f"fill value {fill:g} is neither -inf nor finfo.min (it leaves weight on hidden keys)")


def split_root(x, reaches_product):
    """If the softmax input x applies a mask last, return (y, form, mask node, negate); else None.

    form "add": x = y + mask (float); form "where": visible where mask (hidden where mask if negate)."""
    c = canon(x)
    if c is None:
        return None
    if c.kind == "add" and c.kwargs.get("alpha", 1) == 1:
        a, b = c.args
        for y, m in ((a, b), (b, a)):
            if isinstance(m, Node) and reaches_product(y) and not reaches_product(m) \
                    and isinstance(example(m), torch.Tensor) and example(m).is_floating_point():
                return y, "add", m, False
    if c.kind == "where":
        cond, a, b = c.args
        if isinstance(cond, Node) and not reaches_product(cond):
            if _is_neg_inf(b) and reaches_product(a):
                return a, "where", cond, False
            if _is_neg_inf(a) and reaches_product(b):
                return b, "where", cond, True
    if c.kind == "masked_fill":
        y, m, v = c.args
        if isinstance(m, Node) and not reaches_product(m) and _is_neg_inf(v) and reaches_product(y):
            return y, "where", m, True
    return None


def prove_root_mask(form: str, mask: Node, negate: bool, score_shape, roles, score_dtype) -> ProvenMask:
    """Softmax anchor: the mask applied last to the scores (raises NotProven)."""
    if form == "add":
        proof, fill = prove_additive(mask, score_shape, roles)
        return ProvenMask(proof, _empty_row_for_fill(fill, score_dtype, on_inf="nan"))
    if example(mask).dtype != torch.bool:
        raise NotProven("the where() condition is not boolean")
    return ProvenMask(prove_visible(mask, score_shape, roles, negate=negate), "nan")


def prove_sdpa_mask(mask: Node, score_shape, roles, score_dtype) -> ProvenMask:
    """SDPA's attn_mask: bool (visible where True) or float (added to the scores)."""
    if example(mask).dtype == torch.bool:
        return ProvenMask(prove_visible(mask, score_shape, roles), "zero")
    proof, fill = prove_additive(mask, score_shape, roles)
    return ProvenMask(proof, _empty_row_for_fill(fill, score_dtype, on_inf="zero"))
