"""The split-KV decode kernel on a CUDA GPU: bf16 / fp16 accuracy by FlashAttention's 2x rule against fp64 (outlier
data too), every tuning candidate compiled and run, no recompilation as the cache grows, CUDA graph capture, and
HF generate() through backend="fa3" with StaticCache under mode="reduce-overhead" (CUDA graphs) giving eager's
tokens. Skipped without CUDA.

    pytest -q tests/gpu/test_decode_gpu.py
"""

from __future__ import annotations

import math

import pytest
import torch

from fa3_inductor.kernels import codegen, reference
from fa3_inductor.kernels import triton_decode as td
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram
from accuracy import DEV, check, randn, run_eager  # noqa: E402  (tests/gpu/accuracy.py)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

S = ("score",)


def C(x):
    return ("const", float(x))


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    monkeypatch.setattr(tp, "_AUTOTUNE", False)


def decode_and_check(q, k, v, ops, prog, splits=None):
    assert td.supports(prog, q, k, v, ops) is None
    out, lse = td.forward(q, k, v, ops, prog, splits=splits)
    dout = torch.zeros_like(out)
    eout, _ = run_eager(q, k, v, ops, prog, dout, q.dtype, backward=False)
    o64, _ = run_eager(q, k, v, ops, prog, dout, torch.float64, backward=False)
    rout, rlse = reference.forward(q, k, v, ops, prog)
    check("out", out, eout, o64, rout)
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isinf(lse), torch.isinf(rlse))
    torch.testing.assert_close(lse[fin], rlse[fin], atol=2e-3, rtol=1e-4)
    return out


CASES = [(dt, d, g, sq, outlier) for dt in (torch.bfloat16, torch.float16) for d in (64, 128, 256)
         for g, sq in ((1, 1), (2, 1), (8, 1), (4, 4), (8, 16)) for outlier in (False, True)]


@pytest.mark.parametrize("dtype,d,g,sq,outlier", CASES,
                         ids=[f"{str(c[0])[6:]}-d{c[1]}-g{c[2]}-q{c[3]}-{'outlier' if c[4] else 'normal'}" for c in CASES])
def test_accuracy(dtype, d, g, sq, outlier):
    gen = torch.Generator(device=DEV).manual_seed(d + g + sq)
    hk, sk = 2, 4099
    q = randn(2, hk * g, sq, d, outlier=outlier, dtype=dtype, gen=gen)
    k, v = (randn(2, hk, sk, d, outlier=outlier, dtype=dtype, gen=gen) for _ in range(2))
    decode_and_check(q, k, v, [], ScoreProgram(("mul", S, C(d ** -0.5)), causal="bottom_right"))


@pytest.mark.parametrize("cfg_index", range(4))
@pytest.mark.parametrize("d,g,sq", [(128, 2, 1), (128, 8, 8), (128, 8, 16), (256, 2, 1), (256, 8, 8)])
def test_every_tuning_candidate(d, g, sq, cfg_index, monkeypatch):
    """Each (BLOCK_N, warps, stages) candidate for 16, 64 and 128 rows compiles, fits, and is right (split
    lengths are a multiple of every BLOCK_N, so the candidates can differ only in speed)."""
    q = randn(1, 2 * g, sq, d)
    k, v = (randn(1, 2, 3000, d) for _ in range(2))
    block_m = max(16, td._next_pow2(g * sq))
    cfgs = td._configs(d, q.dtype, block_m)
    if cfg_index >= len(cfgs):
        pytest.skip(f"{len(cfgs)} candidates")
    monkeypatch.setattr(td, "_configs", lambda *a: [cfgs[cfg_index]])
    decode_and_check(q, k, v, [], ScoreProgram(("mul", S, C(d ** -0.5)), causal="bottom_right"), splits=7)


def test_static_cache_mask_and_hf_additive_mask():
    gen = torch.Generator(device=DEV).manual_seed(5)
    q = randn(2, 16, 1, 128, gen=gen)
    k, v = (randn(2, 8, 4352, 128, gen=gen) for _ in range(2))
    mask = torch.ones(2, 1, 1, 4352, dtype=torch.bool, device=DEV)
    mask[..., 4100:] = False
    mask[1, ..., :37] = False
    where = ScoreProgram(("where", ("operand", 0), ("mul", S, C(128 ** -0.5)), C(-math.inf)), n_operands=1,
                         empty_row="zero")
    decode_and_check(q, k, v, [mask], where)
    add = torch.zeros(2, 1, 1, 4352, dtype=torch.bfloat16, device=DEV).masked_fill(~mask, torch.finfo(torch.bfloat16).min)
    decode_and_check(q, k, v, [add], ScoreProgram(("add", ("mul", S, C(128 ** -0.5)), ("operand", 0)), n_operands=1))


def test_no_recompile_as_the_cache_grows():
    prog = ScoreProgram(("mul", S, C(128 ** -0.5)), causal="bottom_right")
    q = randn(1, 16, 1, 128)
    counts, mod = [], None
    for sk in (4097, 4098, 4111, 5000, 8191, 8192, 8193):
        k, v = (randn(1, 8, sk, 128) for _ in range(2))
        td.forward(q, k, v, [], prog)
        torch.cuda.synchronize()
        if mod is None:
            mod = codegen.load(codegen.make_spec(prog, q, k, v, [], False, "decode"))
        counts.append(tuple(sum(len(c[0]) for c in getattr(getattr(mod, n), "device_caches", {}).values())
                            for n in ("attn_decode", "attn_decode_combine")))
    assert all(c == counts[0] for c in counts), f"compiled variants per cache length: {counts}"


def test_cuda_graph_capture():
    prog = ScoreProgram(("mul", S, C(128 ** -0.5)), causal="bottom_right")
    q = randn(1, 16, 1, 128)
    k, v = (randn(1, 8, 6000, 128) for _ in range(2))
    eager_out, _ = td.forward(q, k, v, [], prog)      # compiles outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = td.forward(q, k, v, [], prog)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)


def test_generate_reduce_overhead_static_cache():
    """generate() with the forward compiled by fa3 in reduce-overhead mode (CUDA graphs), StaticCache, fp32 so the
    greedy tokens are those of eager; prefill on the general kernel, every decode step on the decode kernel.
    The StaticCache is built and initialised up front and passed in (bench/common.static_cache, as bench/generate.py
    does): with cache_implementation="static" (generate() builds it lazily inside the compiled region) torch 2.11's
    Inductor alone (backend="inductor") segfaults in its static CUDA launcher on the H100, and without that
    launcher fails with "Pointer argument must be either uint64 or have data_ptr method" in the cache's
    index_copy kernel (bench/NOTES.md, session 7) - not a fa3 path."""
    pytest.importorskip("transformers")
    from fa3_inductor import dispatch
    from transformers import LlamaConfig, LlamaForCausalLM
    from helpers import import_bench
    common = import_bench("common")
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").to(DEV).eval()
    ids = torch.randint(3, 1000, (2, 300), device=DEV)
    cache = common.static_cache(model, ids.shape[0], 320, ids.device)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, disable_compile=True)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, past_key_values=cache, **kw)
        torch._dynamo.reset()
        before = dict(dispatch.STATS)
        model.forward = torch.compile(model.forward, backend="fa3", mode="reduce-overhead")
        for _ in range(2):   # the second call replays recorded graphs
            cache.reset()
            out = model.generate(input_ids=ids, past_key_values=cache, **kw)
            assert torch.equal(out, ref), (out[:, 300:].tolist(), ref[:, 300:].tolist())
    ran = {key: n - before.get(key, 0) for key, n in dispatch.STATS.items()}
    assert ran.get(("forward", "triton-decode"), 0) > 0 and ran.get(("forward", "triton"), 0) > 0, ran
