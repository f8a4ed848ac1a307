"""What the matcher produces: one AttentionSpec per attention site (or a Skip saying why not).

A spec names graph values (q, k, v, score operands) as TensorRefs: an existing node plus the view steps that
bring it to the op's canonical layout. Applying the spec to the graph is fa3_inductor's job (rewrite.py).
"""

from __future__ import annotations

import dataclasses

from torch.fx import Node

from ..kernels.program import ScoreProgram


class NotMatched(Exception):
    """Raised inside the matcher with the human reason a site is left as it was."""


@dataclasses.dataclass(frozen=True)
class SizeOf:
    """A size argument of a view step, read at run time from a graph value (works for dynamic shapes)."""
    ref: "TensorRef"
    dim: int


@dataclasses.dataclass
class TensorRef:
    node: Node
    steps: list = dataclasses.field(default_factory=list)   # [(method name, args tuple)], applied in order

    def then(self, method: str, *args) -> "TensorRef":
        return TensorRef(self.node, self.steps + [(method, args)])


@dataclasses.dataclass(frozen=True)
class OperandRef:
    """A score-program operand that is a view of a graph value: the (batch, head, key) padding vector."""
    ref: TensorRef
    shape: tuple
    dtype: torch.dtype
    grad: bool = False              # a float operand that requires grad (gradient flows back through the view)

    def key(self):
        return (self.ref.node, repr(self.ref.steps))


@dataclasses.dataclass
class AttentionSpec:
    site: str                       # where it is, for humans (node name and module path)
    spelling: list[str]             # the pieces as the user wrote them
    q: TensorRef
    k: TensorRef
    v: TensorRef
    operands: list[TensorRef]
    program: ScoreProgram
    output: Node                    # the node whose value the op's result replaces
    output_steps: list              # view steps from the op's (B, Hq, Sq, Dv) to output's layout
    nodes: list[Node]               # nodes inside the site (dead after the rewrite)
    # summary facts for explain
    scale: float | None = None
    mask: str = "none"
    gqa: int = 1
    dropout: str = "none"
    layout: str = ""
    shape: str = ""
    mask_note: str = ""             # why a mask built in the graph was not proven (it stays a dense operand)

    def summary(self) -> str:
        parts = [f"scale={self.scale:.4g}" if self.scale is not None else "scale=in chain"]
        if self.mask != "none":
            parts.append(f"mask={self.mask}" + (f" (not proven: {self.mask_note})" if self.mask_note else ""))
        if self.program.causal != "none":
            parts.append(f"causal={self.program.causal}")
        if self.gqa > 1:
            parts.append(f"gqa={self.gqa}")
        if self.dropout != "none":
            parts.append(f"dropout={self.dropout}")
        parts.append(self.shape)
        return " ".join(parts)


@dataclasses.dataclass
class Skip:
    site: str
    spelling: list[str]
    reason: str
