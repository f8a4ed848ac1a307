"""fa3-inductor: a torch.compile backend ("fa3") that finds every softmax(Q·Kᵀ)·V in a model's graph and runs
it on FlashAttention-3-style kernels; everything else goes on to Inductor."""

from . import op as _op  # registers torch.ops.fa3.*
from .backend import fa3_backend
from .explain import explain
from .kernels.program import ScoreProgram
from .op import attention

__all__ = ["ScoreProgram", "attention", "explain", "fa3_backend"]
