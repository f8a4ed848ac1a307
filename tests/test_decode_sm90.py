"""The split-KV decode kernel without a GPU: the default candidate of every row block (16, 64, 128 rows; D 128
and 256; bf16, with and without a mask operand) compiles for sm_90 with Triton's bundled ptxas, fits the H100's
shared memory and spills no registers (contiguous tensors, so unit strides are specialised as at a real
launch). Whether it computes the right numbers: tests/test_decode_kernel.py (interpreter), tests/gpu."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import triton_decode as td
from fa3_inductor.kernels.program import ScoreProgram

try:
    from sm90_cross_compile import compile_triton_sm90, sass_facts
    _HAVE = True
except Exception as exc:   # pragma: no cover - depends on the Triton build
    _HAVE, _WHY = False, repr(exc)


CASES = [  # d, query heads per kv head, queries, mask operand
    (128, 2, 1, False), (128, 2, 1, True), (128, 8, 8, False), (128, 8, 16, False), (256, 2, 1, False),
    (256, 8, 8, False),
]


@pytest.mark.skipif(not _HAVE, reason="Triton without the NVIDIA backend")
@pytest.mark.parametrize("d,g,sq,masked", CASES, ids=[f"d{c[0]}-rows{c[1] * c[2]}-{'mask' if c[3] else 'plain'}"
                                                       for c in CASES])
def test_default_candidate_compiles_without_spills(d, g, sq, masked):
    b, hk, sk, n_split = 1, 2, 1000, 4
    q = torch.randn(b, hk * g, sq, d).bfloat16()
    k, v = torch.randn(b, hk, sk, d).bfloat16(), torch.randn(b, hk, sk, d).bfloat16()
    expr = ("mul", ("score",), ("const", d ** -0.5))
    ops = []
    if masked:
        ops = [torch.ones(b, 1, sq, sk, dtype=torch.bool)]
        expr = ("where", ("operand", 0), expr, ("const", -math.inf))
    prog = ScoreProgram(expr, n_operands=len(ops), causal="none" if masked else "bottom_right")
    out, lse = torch.empty(b, hk * g, sq, d).bfloat16(), torch.empty(b, hk * g, sq)
    part, lpart = torch.empty(b, hk * g, sq, n_split, d), torch.empty(b, hk * g, sq, n_split)
    block_m = max(16, td._next_pow2(g * sq))
    cfg = td._configs(d, q.dtype, block_m)[0]
    kernel, grid, args, kwargs = td.launch_args(q, k, v, ops, prog, out, lse, part, lpart, n_split, 256, cfg)
    assert kwargs["BLOCK_M"] == block_m
    facts = sass_facts(compile_triton_sm90(kernel, *args, **kwargs))
    assert facts["shared"] <= 232448, facts
    assert facts["local_ops"] == 0, f"register spills with {cfg}: {facts}"
