"""The portable backward's default tiles at head dim 256 (the first entry of triton_portable's dkdv and dq lists:
what runs when tuning is off) without a GPU: compiled for sm_90a with Triton's bundled ptxas, they fit the
H100's shared memory, use wgmma, and keep local memory (register spills) out of their inner loops — the state
the two-sweep dK/dV schedule reached (bench/results/bwd256_sass.md). Speed: bench/bwd256_sweep.py on a GPU;
numbers: tests/test_triton_kernels.py (interpreter) and tests/gpu."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram

try:
    from sm90_cross_compile import compile_triton_sm90, sass_facts
    _HAVE = True
except Exception:   # pragma: no cover - depends on the Triton build
    _HAVE = False

D, S = 256, 1024
SCALED = ("mul", ("score",), ("const", D ** -0.5))
PROGRAMS = {
    "causal": (ScoreProgram(SCALED, causal="top_left"), False),
    # key padding and a bias operand (more live values per tile), rows emptied by padding get uniform gradients
    "pad+bias": (ScoreProgram(("where", ("operand", 0), ("add", SCALED, ("operand", 1)), ("const", -math.inf)),
                              n_operands=2, causal="top_left", empty_row="uniform"), True),
}


def _launches(name):
    prog, with_ops = PROGRAMS[name]
    q, k, v = (torch.zeros(2, 8, S, D, dtype=torch.bfloat16) for _ in range(3))
    ops = [torch.ones(2, 1, 1, S, dtype=torch.bool), torch.zeros(1, 8, S, S, dtype=torch.bfloat16)] if with_ops else []
    return tp.BackwardLaunches(q, q, k, v, ops, torch.zeros(2, 8, S), prog, q)


@pytest.mark.skipif(not _HAVE, reason="Triton without the NVIDIA backend")
@pytest.mark.parametrize("kind", ["dkdv", "dq"])
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_default_d256_tiles_compile_without_loop_spills(kind, name):
    run = _launches(name)
    cfg = (tp._dkdv_configs if kind == "dkdv" else tp._dq_configs)(D, torch.bfloat16)[0]
    kernel, _, args, kwargs = run.dkdv_call(cfg) if kind == "dkdv" else run.dq_call(cfg)
    facts = sass_facts(compile_triton_sm90(kernel, *args, **kwargs))
    assert facts["shared"] <= 232448, facts
    assert facts["hgmma"] > 0 and facts["hmma"] == 0, f"{kind} {cfg}: not on wgmma: {facts}"
    assert facts["loop_local_ops"] == 0, f"{kind} {cfg}: local memory in an inner loop: {facts}"
