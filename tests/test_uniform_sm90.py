"""attn_bwd_uniform and attn_bwd_imprecise (kernels/templates_uniform.py) and the work-list part of attn_bwd_pre
without a GPU: the tiles triton_portable picks on CUDA compile for sm_90 with Triton's bundled ptxas (the scalar
branches, the strided loop over the work list and the atomics' returned values lower), fit the H100's shared
memory and spill no registers. Whether they compute the right numbers: tests/test_triton_kernels.py
(interpreter), tests/gpu."""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import codegen
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram

try:
    from sm90_cross_compile import compile_triton_sm90, sass_facts
    _HAVE = True
except Exception as exc:   # pragma: no cover - depends on the Triton build
    _HAVE, _WHY = False, repr(exc)

CUDA = torch.device("cuda")
CASES = [  # dtype, head dim, float bias wanting a gradient
    (torch.bfloat16, 64, False), (torch.float16, 128, True), (torch.bfloat16, 256, False), (torch.float32, 64, False),
    (torch.float32, 128, False),
]


@pytest.mark.skipif(not _HAVE, reason="Triton without the NVIDIA backend")
@pytest.mark.parametrize("dtype,d,bias", CASES, ids=[f"{str(c[0])[6:]}-d{c[1]}{'-bias' if c[2] else ''}"
                                                      for c in CASES])
def test_uniform_kernel_compiles_without_spills(dtype, d, bias):
    b, hq, hk, sq, sk = 2, 8, 2, 300, 280
    q = torch.randn(b, hq, sq, d).to(dtype)
    k, v = torch.randn(b, hk, sk, d).to(dtype), torch.randn(b, hk, sk, d).to(dtype)
    ops = [torch.ones(b, 1, 1, sk, dtype=torch.bool)]
    y = ("mul", ("score",), ("const", d ** -0.5))
    if bias:
        ops.append(torch.randn(1, hq, sq, sk))
        y = ("add", y, ("operand", 1))
    prog = ScoreProgram(("where", ("operand", 0), y, ("const", -math.inf)), n_operands=len(ops), causal="top_left",
                        empty_row="uniform", operand_grad=(False, True) if bias else ())
    _check_special_kernels(prog, q, k, v, ops, bias, rules=("uniform", "imprecise") if bias else ("uniform",))


def _check_special_kernels(prog, q, k, v, ops, bias, rules):
    b, hq, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    spec = codegen.make_spec(prog, q, k, v, ops, interpret=False)
    assert codegen.imprecise_possible(spec) == ("imprecise" in rules)
    mod = codegen.load(spec)
    full = (b, hq, sq, sk)
    op_args = [x for t in ops for x in [t, *tp._expanded_strides(t, full)]]
    dops = [torch.zeros(full)] if bias else []
    dop_args = [x for t in dops for x in [t, *t.stride()]]
    lse = torch.empty(b, hq, sq)
    work = torch.zeros(2 * tp.uniform_work_len(b, hq, hk, sq, CUDA), dtype=torch.int32)
    dout, dq, dk, dv = q.clone(), q.clone(), k.clone(), v.clone()
    launches = []
    if "uniform" in rules:
        launches.append(tp.uniform_launch_args(mod, q, k, v, dout, lse, work, dq, dk, dv, op_args, dop_args,
                                               target=CUDA))
    if "imprecise" in rules:
        delta = torch.empty(3, b, hq, sq)
        for part in (1, 2):
            _, ints, kw = tp.imprecise_fixed(q, k, v, dout, lse.stride(), (dq.stride(), dk.stride(), dv.stride()),
                                             sk - sq, part, CUDA)
            launches.append((mod.attn_bwd_imprecise, None, (q, k, v, dout, lse, delta, work, dq, dk, dv, *op_args,
                                                            *dop_args, *ints), kw))
    for kernel, _, args, kwargs in launches:
        facts = sass_facts(compile_triton_sm90(kernel, *args, **kwargs))
        assert facts["shared"] <= 232448, facts
        assert facts["local_ops"] == 0, f"{kernel.__name__}: register spills with {kwargs}: {facts}"
    lsek = (lse,) if "imprecise" in rules else ()
    pre = compile_triton_sm90(mod.attn_bwd_pre, q, q, lse, lse, work, *lsek, *q.stride(), *q.stride(), *lse.stride(),
                              sq, hq, BLOCK_M=tp._pre_block(CUDA))
    assert sass_facts(pre)["local_ops"] == 0


IMPRECISE = [  # dtype, head dim, causal
    (torch.float16, 128, "none"), (torch.bfloat16, 64, "top_left"), (torch.bfloat16, 256, "none"),
    (torch.float32, 64, "none"), (torch.float32, 128, "bottom_right"),
]


@pytest.mark.skipif(not _HAVE, reason="Triton without the NVIDIA backend")
@pytest.mark.parametrize("dtype,d,causal", IMPRECISE, ids=[f"{str(c[0])[6:]}-d{c[1]}-{c[2]}" for c in IMPRECISE])
def test_imprecise_kernel_compiles_without_spills(dtype, d, causal):
    """The HF eager form with a dense additive mask (s·c + mask): attn_bwd_imprecise's two parts and the pre-pass
    that lists its rows."""
    b, hq, hk, sq, sk = 2, 8, 2, 300, 280
    q = torch.randn(b, hq, sq, d).to(dtype)
    k, v = torch.randn(b, hk, sk, d).to(dtype), torch.randn(b, hk, sk, d).to(dtype)
    mask = torch.zeros(b, 1, sq, sk).to(dtype)
    prog = ScoreProgram(("add", ("mul", ("score",), ("const", d ** -0.5)), ("operand", 0)), n_operands=1,
                        causal=causal)
    _check_special_kernels(prog, q, k, v, [mask], False, rules=("imprecise",))
