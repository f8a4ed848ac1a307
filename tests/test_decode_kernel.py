"""The split-KV decode kernels (kernels/triton_decode.py) on CPU through TRITON_INTERPRET=1.

Few queries (1..16) against a longer KV cache, GQA-packed (the G query heads of a kv head in one program),
the key axis cut into splits whose partial (out, lse) a combine kernel merges. Every case checks out and lse
against kernels/reference.py and, by FlashAttention's rule, against fp64 eager (error <= 2x eager's in the same
dtype plus a guard); outputs and partial buffers are poisoned with NaN first. Key lengths are not multiples of
the block, so splits end inside a block and the last one is partial; split counts from 1 to more than there
are blocks. Runs in the interpreter process (tests/test_interpreter_process.py), like test_triton_kernels.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from interpreter_sandbox import (  # noqa: E402  (tests/, on sys.path)
    INTERPRETER_ONLY, C, OP, S, interpreter_sandbox)

from fa3_inductor.kernels import reference
from fa3_inductor.kernels import triton_decode as td
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram
from test_triton_kernels import check, qkv, run_eager  # noqa: E402  (same directory; shared comparison rule)

pytestmark = INTERPRETER_ONLY


@pytest.fixture(autouse=True, scope="module")
def _interpret(tmp_path_factory):
    with interpreter_sandbox(tmp_path_factory.mktemp("fa3_cache"), [tp]):
        yield


def decode_and_check(q, k, v, ops, prog, splits=None):
    assert td.supports(prog, q, k, v, ops) is None
    out, lse = td.forward(q, k, v, ops, prog, splits=splits)
    rout, rlse = reference.forward(q, k, v, ops, prog)
    dout = torch.zeros_like(out)
    eout, _ = run_eager(q, k, v, ops, prog, dout, q.dtype)
    out64, _ = run_eager(q, k, v, ops, prog, dout, torch.float64)
    check("out", out, rout, eout, out64)
    assert lse.dtype == torch.float32 and lse.shape == rlse.shape
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse)) and not torch.isnan(lse).any()
    fin = torch.isfinite(rlse)
    torch.testing.assert_close(lse[fin], rlse[fin], atol=1e-4 if q.dtype == torch.float32 else 2e-3, rtol=1e-4)
    return out, lse


def scaled(d, **kw):
    return ScoreProgram(("mul", S, C(d ** -0.5)), **kw)


# --- shapes: queries, GQA ratio, key lengths, split counts -------------------------------------------------

GRID = [
    # dtype, d, b, hq, hk, sq, sk, causal, splits
    (torch.float16, 64, 1, 1, 1, 1, 37, "none", None),
    (torch.float32, 32, 2, 4, 1, 1, 100, "bottom_right", None),
    (torch.float16, 128, 1, 8, 1, 1, 161, "bottom_right", 5),
    (torch.float32, 40, 1, 8, 2, 2, 75, "bottom_right", 2),
    (torch.float16, 80, 2, 16, 2, 3, 53, "bottom_right", 1),
    (torch.float32, 16, 1, 4, 4, 4, 66, "none", 4),
    (torch.float16, 64, 1, 8, 1, 4, 49, "bottom_right", 64),    # more splits asked than there are blocks
    (torch.float32, 64, 2, 2, 2, 2, 17, "top_left", None),
    (torch.float16, 32, 1, 32, 4, 16, 90, "bottom_right", 3),   # 8 heads x 16 queries = 128 rows
    (torch.float32, 24, 1, 4, 1, 3, 2, "bottom_right", None),   # fewer keys than queries: empty rows
]


@pytest.mark.parametrize("dtype,d,b,hq,hk,sq,sk,causal,splits", GRID,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-g{c[3] // c[4]}-q{c[5]}-k{c[6]}-{c[7]}-s{c[8]}" for c in GRID])
def test_decode_shapes(dtype, d, b, hq, hk, sq, sk, causal, splits):
    q, k, v = qkv(b, hq, hk, sq, sk, d, dtype, seed=sk)
    decode_and_check(q, k, v, [], scaled(d, causal=causal), splits=splits)


@pytest.mark.parametrize("block_n", [32, 64])
@pytest.mark.parametrize("g,sq", [(8, 8), (8, 16)], ids=["64rows", "128rows"])
def test_gpu_block_shapes(block_n, g, sq, monkeypatch):
    """BLOCK_N of the GPU candidates and programs of 64 / 128 rows (splits are whole multiples of BLOCK_N)."""
    monkeypatch.setattr(td, "INTERPRET_CONFIG", (block_n, 4, 1))
    q, k, v = qkv(1, 2 * g, 2, sq, 5 * block_n - 3, 32, torch.float16, seed=block_n + sq)
    decode_and_check(q, k, v, [], scaled(32, causal="bottom_right"), splits=3)


@pytest.mark.parametrize("empty_row", ["nan", "zero"])
def test_bottom_right_with_empty_rows_and_splits(empty_row):
    q, k, v = qkv(1, 4, 2, 4, 2, 32, torch.float32, seed=1)
    out, lse = decode_and_check(q, k, v, [], scaled(32, causal="bottom_right", empty_row=empty_row), splits=2)
    assert torch.isinf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()


def test_sliding_window_decode():
    """Mistral-style band: only the last W + 1 keys are visible, so most splits see nothing at all."""
    q, k, v = qkv(2, 8, 2, 2, 150, 32, torch.float16, seed=2)
    decode_and_check(q, k, v, [], scaled(32, causal="bottom_right", window=20), splits=6)


def test_value_head_dim_differs():
    q, k, v = qkv(1, 4, 2, 2, 70, 40, torch.float32, dv=24, seed=3)
    decode_and_check(q, k, v, [], scaled(40, causal="bottom_right"), splits=3)


# --- masks and bias operands (the row's head varies inside a program) --------------------------------------

def test_static_cache_padding_mask():
    """HF StaticCache: the cache is longer than what is filled, a bool (B, 1, Sq, Sk) mask hides the rest;
    batch row 1 also has left padding. Some splits hold only hidden keys."""
    b, sq, sk, filled = 2, 2, 90, 41
    q, k, v = qkv(b, 8, 2, sq, sk, 32, torch.float16, seed=4)
    mask = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    for i in range(sq):
        mask[:, :, i, :filled - sq + 1 + i] = True
    mask[1, :, :, :5] = False
    prog = ScoreProgram(("where", OP(0), ("mul", S, C(32 ** -0.5)), C(-math.inf)), n_operands=1,
                        empty_row="zero")
    decode_and_check(q, k, v, [mask], prog, splits=4)


@pytest.mark.parametrize("shape", [(2, 8, 3, 45), (1, 8, 1, 45), (2, 1, 1, 45), (1, 8, 1, 1), (2, 1, 3, 1)],
                         ids=["full", "head-key", "batch-key", "head-only", "batch-query"])
def test_additive_bias_broadcasts(shape):
    q, k, v = qkv(2, 8, 2, 3, 45, 16, torch.float32, seed=5)
    bias = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    prog = ScoreProgram(("add", ("mul", S, C(0.25)), OP(0)), n_operands=1, causal="bottom_right")
    decode_and_check(q, k, v, [bias], prog, splits=3)


def test_hf_additive_mask_fp16_with_fully_masked_row():
    """The HF eager form: s·c + mask with finfo.min entries; a row masked everywhere averages v (as eager)."""
    q, k, v = qkv(2, 4, 1, 1, 58, 64, torch.float16, seed=7)
    lo = torch.finfo(torch.float16).min
    mask = torch.zeros(2, 1, 1, 58, dtype=torch.float16)
    mask[0, ..., 40:] = lo
    mask[1] = lo
    prog = ScoreProgram(("add", ("mul", S, C(0.125)), OP(0)), n_operands=1)
    decode_and_check(q, k, v, [mask], prog, splits=3)


@pytest.mark.parametrize("empty_row", ["nan", "zero"])
def test_bool_mask_with_empty_rows(empty_row):
    q, k, v = qkv(2, 4, 2, 2, 60, 32, torch.float32, seed=8)
    mask = torch.rand(2, 1, 2, 60, generator=torch.Generator().manual_seed(9)) > 0.5
    mask[0, 0, 1] = False
    prog = ScoreProgram(("where", OP(0), ("mul", S, C(32 ** -0.5)), C(-math.inf)), n_operands=1,
                        empty_row=empty_row)
    decode_and_check(q, k, v, [mask], prog, splits=3)


def test_softcap_and_index_program():
    """Gemma-2 tanh soft-capping plus an ALiBi-like term from the query and key indices."""
    q, k, v = qkv(1, 8, 2, 3, 77, 32, torch.float32, seed=10)
    q = q * 3
    x = ("mul", ("tanh", ("div", ("mul", S, C(32 ** -0.5)), C(5.0))), C(5.0))
    prog = ScoreProgram(("add", x, ("mul", C(-0.05), ("abs", ("sub", ("q_idx",), ("k_idx",))))),
                        causal="bottom_right", window=30)
    decode_and_check(q, k, v, [], prog, splits=4)


def test_strided_cache_views():
    """q viewed from (B, S, H, D) storage; k and v slices of a longer, wider cache buffer (no copies)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 2, 8, 32, generator=gen).half().transpose(1, 2)
    cache = torch.randn(2, 2, 80, 2 * 32, generator=gen).half()
    k, v = cache[:, :, :53, :32], cache[:, :, :53, 32:]
    assert not q.is_contiguous() and not k.is_contiguous()
    decode_and_check(q, k, v, [], scaled(32, causal="bottom_right"), splits=3)


# --- plumbing ----------------------------------------------------------------------------------------------

def test_split_plan_covers_the_keys_once():
    cpu = torch.device("cpu")
    for sk in (1, 15, 16, 17, 100, 161):
        for want in (1, 2, 3, 7, 1000, None):
            n, chunk = td.split_plan(2, 2, sk, cpu, want)
            assert chunk % td.INTERPRET_CONFIG[0] == 0 and n >= 1
            assert (n - 1) * chunk < sk <= n * chunk, (sk, want, n, chunk)


def test_supports_only_decode_shapes():
    prog = scaled(16)
    q, k, v = qkv(1, 8, 2, 16, 40, 16, torch.float32)
    assert td.supports(prog, q, k, v, []) is None
    q17 = torch.randn(1, 8, 17, 16)
    assert "17 queries per head is not a decode shape" in td.supports(prog, q17, k, v, [])
    q33 = torch.randn(1, 64, 4, 16)
    assert "rows > 128" in td.supports(prog, q33, torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16), [])
    assert "bf16" in td.supports(prog, q.bfloat16(), k.bfloat16(), v.bfloat16(), [])


def test_dispatch_picks_decode_then_general_and_backward_matches():
    from fa3_inductor import dispatch
    from fa3_inductor.op import attention
    prog = scaled(32, causal="bottom_right")
    q, k, v = qkv(1, 4, 2, 2, 50, 32, torch.float32, seed=12)
    entry, _ = dispatch.select(prog, q, k, v, [])
    assert entry.name == "triton-decode"
    long_q = torch.randn(1, 4, 17, 32)
    entry, passed = dispatch.select(prog, long_q, k, v, [])
    assert entry.name == "triton" and any("not a decode shape" in p for p in passed)
    before = dict(dispatch.STATS)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves, program=prog)
    dout = torch.randn_like(out)
    out.backward(dout)
    assert dispatch.STATS[("forward", "triton-decode")] == before.get(("forward", "triton-decode"), 0) + 1
    assert dispatch.STATS[("backward", "triton-decode")] == before.get(("backward", "triton-decode"), 0) + 1
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention(*ref_leaves, program=prog, kernel="reference")
    ref.backward(dout)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_through_the_decode_kernel(cache):
    """A tiny HF Llama's generate(): prefill on the general kernel, every decode step on the decode kernel (the
    rewrite without Inductor, whose CPU compiles test_generation.py covers); greedy tokens equal eager's."""
    pytest.importorskip("transformers")
    from fa3_inductor import dispatch
    from test_generation import generate_kwargs, left_padded_prompt, tiny_llama
    torch._dynamo.reset()
    model = tiny_llama("sdpa", layers=2)
    ids, mask = left_padded_prompt(21, seed=3)
    kw = generate_kwargs(cache, 5)
    ref = model.generate(input_ids=ids, attention_mask=mask, **kw)
    before = dict(dispatch.STATS)
    model.forward = torch.compile(model.forward, backend="fa3_eager")
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref), (out[:, 21:].tolist(), ref[:, 21:].tolist())
    ran = {k: v - before.get(k, 0) for k, v in dispatch.STATS.items()}
    assert ran.get(("forward", "triton-decode"), 0) == 2 * 4, ran   # 2 layers x 4 decode steps
    assert ran.get(("forward", "triton"), 0) == 2, ran               # 2 layers x 1 prefill
