"""Cached launches (kernels/launcher.py, the Hopper call plans) on a CUDA GPU: calls after the first start the
compiled kernel directly with fresh tensors of the same shapes (new data pointers), and a change of strides,
alignment or dtype takes a new plan; every call's result is checked against the reference. Skipped without CUDA.

    pytest -q tests/gpu/test_launch_cache_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from fa3_inductor.kernels import hopper, launcher, reference
from fa3_inductor.kernels import triton_decode as td
from fa3_inductor.kernels import triton_portable as tp
from fa3_inductor.kernels.program import ScoreProgram
from accuracy import DEV, check, randn, run_eager  # noqa: E402  (tests/gpu/accuracy.py)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

S = ("score",)
SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def _check_forward(kernel, q, k, v, ops, prog):
    out, lse = kernel.forward(q, k, v, ops, prog)
    eout, _ = run_eager(q, k, v, ops, prog, torch.zeros_like(out), q.dtype, backward=False)
    o64, _ = run_eager(q, k, v, ops, prog, torch.zeros_like(out), torch.float64, backward=False)
    check("out", out, eout, o64)
    return out, lse


def _fresh(shape_q, shape_kv, gen, layout="bhsd"):
    def one(shape):
        if layout == "bshd":      # the same logical shape through a transposed (B, S, H, D) buffer
            b, h, s, d = shape
            return randn(b, s, h, d, gen=gen).transpose(1, 2)
        return randn(*shape, gen=gen)
    return one(shape_q), one(shape_kv), one(shape_kv)


@pytest.mark.parametrize("kernel", ["hopper", "triton"])
def test_repeated_calls_fresh_tensors(kernel):
    if kernel == "hopper" and not SM90:
        pytest.skip("needs an sm_90 GPU")
    mod = hopper if kernel == "hopper" else tp
    gen = torch.Generator(device=DEV).manual_seed(11)
    pad = torch.ones(2, 1, 1, 700, dtype=torch.bool, device=DEV)
    pad[1, ..., 500:] = False
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", 0.125)), ("const", float("-inf"))),
                        n_operands=1, causal="bottom_right")
    before = len(launcher._COMPILED)
    for layout in ("bhsd", "bhsd", "bhsd", "bshd", "bshd"):
        q, k, v = _fresh((2, 8, 600, 64), (2, 4, 700, 64), gen, layout)
        keep = [torch.empty(1, device=DEV) for _ in range(3)]   # shift the allocator: new data pointers
        _check_forward(mod, q, k, v, [pad], prog)
        del keep
    assert len(launcher._COMPILED) >= before + 2, "no direct launch was cached for the two layouts"
    if kernel == "hopper":
        assert any(key[0] == "hopper" and key[1] == prog for key in hopper._PLANS)


def test_portable_backward_repeated():
    gen = torch.Generator(device=DEV).manual_seed(12)
    prog = ScoreProgram(("mul", S, ("const", 0.125)), causal="top_left")
    for _ in range(3):
        q, k, v = _fresh((1, 4, 300, 64), (1, 2, 300, 64), gen)
        out, lse = tp.forward(q, k, v, [], prog)
        dout = torch.randn_like(out)
        grads = tp.backward(dout, q, k, v, [], out, lse, prog)
        _, egr = run_eager(q, k, v, [], prog, dout, q.dtype)
        _, g64 = run_eager(q, k, v, [], prog, dout, torch.float64)
        for name, a, e, r in zip(("dq", "dk", "dv"), grads[:3], egr, g64):
            check(name, a, e, r)


@pytest.mark.parametrize("rule", ["zero", "uniform"])
def test_padded_backward_plan_strided_dout(rule):
    """BERT's padded batch as torch.compile runs it: a (B, 1, 1, Sk) key-padding mask, q / k / v and dout
    transposed views of (B, S, H, D) buffers; repeated calls with fresh tensors go through the backward's plan
    (direct launches), each checked by the 2x rule, and equal bit for bit to a fresh plan on a contiguous dout."""
    gen = torch.Generator(device=DEV).manual_seed(14)
    pad = torch.ones(4, 1, 1, 512, dtype=torch.bool, device=DEV)
    pad[1, ..., 300:] = False
    pad[3, ..., :] = rule == "zero"          # an all-padding row: uniform rows under "uniform"
    pad[3, ..., 200:] = False
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, ("const", 0.125)), ("const", float("-inf"))),
                        n_operands=1, empty_row=rule)
    for _ in range(3):
        q, k, v = _fresh((4, 16, 512, 64), (4, 16, 512, 64), gen, "bshd")
        out, lse = tp.forward(q, k, v, [pad], prog)
        dout = randn(4, 512, 16, 64, gen=gen).transpose(1, 2)
        grads = tp.backward(dout, q, k, v, [pad], out, lse, prog)
        _, egr = run_eager(q, k, v, [pad], prog, dout, q.dtype)
        _, g64 = run_eager(q, k, v, [pad], prog, dout, torch.float64)
        for name, a, e, r in zip(("dq", "dk", "dv"), grads[:3], egr, g64):
            check(name, a, e, r)
    assert any(key[0] == "bwd" and key[1] == prog for key in tp._BWD_PLANS)
    tp._BWD_PLANS.clear()
    again = tp.backward(dout.contiguous(), q, k, v, [pad], out, lse, prog)
    for a, b in zip(grads[:3], again[:3]):
        assert torch.equal(a, b)


def test_decode_repeated_and_graph_capture():
    gen = torch.Generator(device=DEV).manual_seed(13)
    prog = ScoreProgram(("mul", S, ("const", 128 ** -0.5)), causal="bottom_right", empty_row="nan")
    for _ in range(3):
        q, k, v = _fresh((1, 16, 1, 128), (1, 8, 4352, 128), gen)
        out, _ = td.forward(q, k, v, [], prog)
        rout, _ = reference.forward(q, k, v, [], prog)
        torch.testing.assert_close(out.float(), rout.float(), atol=2e-2, rtol=2e-2)
    # a CUDA graph captures the direct launches and replays them on new contents of the same buffers
    q, k, v = _fresh((1, 16, 1, 128), (1, 8, 4352, 128), gen)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        td.forward(q, k, v, [], prog)
        with torch.cuda.graph(g):
            out, _ = td.forward(q, k, v, [], prog)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(2):
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, device=DEV, generator=gen))
        g.replay()
        rout, _ = reference.forward(q, k, v, [], prog)
        torch.testing.assert_close(out.float(), rout.float(), atol=2e-2, rtol=2e-2)


def test_decode_growing_cache_keeps_its_sites():
    """A DynamicCache's K / V (contiguous, one key longer per call, fresh buffers): the decode plan's sites start
    the compiled kernels directly, and a cache entry is added only with a split count not seen before (at most
    the cap's), never per token; nothing is compiled after the first call."""
    gen = torch.Generator(device=DEV).manual_seed(14)
    prog = ScoreProgram(("mul", S, ("const", 128 ** -0.5)), causal="bottom_right")
    q = randn(1, 32, 1, 128, gen=gen)
    k, v = randn(1, 8, 3000, 128, gen=gen), randn(1, 8, 3000, 128, gen=gen)
    sizes, splits, variants = [], set(), []
    for step in range(300):
        k = torch.cat([k, randn(1, 8, 1, 128, gen=gen)], dim=2)
        v = torch.cat([v, randn(1, 8, 1, 128, gen=gen)], dim=2)
        out, _ = td.forward(q, k, v, [], prog)
        if step % 60 == 0:
            rout, _ = reference.forward(q, k, v, [], prog)
            torch.testing.assert_close(out.float(), rout.float(), atol=2e-2, rtol=2e-2)
        plan = next(p for key, p in td._PLANS.items() if key[0] == prog)
        n_split = plan.split(k.shape[2])[0]
        size = (len(launcher._COMPILED), len(plan.sites), len(plan.cfgs))
        assert not sizes or size == sizes[-1] or n_split not in splits, (step, n_split, size, sizes[-1])
        splits.add(n_split)
        sizes.append(size)
        variants.append(tuple(len(c[0]) for n in ("attn_decode", "attn_decode_combine")
                              for c in getattr(getattr(plan.mod, n), "device_caches", {}).values()))
    assert all(x == variants[0] for x in variants), "a growing cache compiled a new variant"
    assert all(site.hit is not None for site, combine, _, _ in plan.sites.values()), "a site never went direct"
