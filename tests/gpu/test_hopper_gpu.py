"""The Hopper warp-specialized forward and backward on an sm_90 GPU: their PTX is what it claims (wgmma, TMA,
mbarriers, setmaxnreg); accuracy by FlashAttention's 2x rule against fp64 for every head dim they serve, with
masks, operands, GQA, odd lengths and strided layouts (`hopper.backward` is the warp-specialized backward where
it serves the site, the portable one elsewhere: bias gradients, NaN rows, other head dims); dispatch picks
them and sends deterministic runs to the portable backward; no recompilation per sequence length; CUDA-graph
capture. Skipped without an sm_90 GPU.

    pytest -q tests/gpu/test_hopper_gpu.py
"""

from __future__ import annotations

import math

import pytest
import torch

from accuracy import C, S, accuracy_cases, attend_and_check, check_scaled, randn
from fa3_inductor import dispatch
from fa3_inductor.kernels import hopper, hopper_bwd, triton_portable
from fa3_inductor.kernels.program import ScoreProgram

DEV = "cuda"

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 GPU")]


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    """Each test then compiles one schedule, not every candidate; bench/kernel_grid.py exercises the tuner."""
    from fa3_inductor.kernels import triton_portable
    monkeypatch.setattr(triton_portable, "_AUTOTUNE", False)


def _compiled(kernel):
    return [k for cache in kernel.device_caches.values() for k in cache[0].values()]


def test_ptx_is_warp_specialized():
    q, k, v = (randn(1, 2, 256, 128) for _ in range(3))
    prog = ScoreProgram(("mul", S, C(128 ** -0.5)), causal="top_left")
    hopper.forward(q, k, v, [], prog)
    kernel, *_ = hopper.launch_args(q, k, v, [], prog, torch.empty_like(q), torch.empty(1, 2, 256, device=DEV))
    ptx = _compiled(kernel)[-1].asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg"):
        assert instr in ptx, f"{instr} missing from the Hopper kernel's PTX"


def test_dispatch_picks_hopper():
    q, k, v = (randn(2, 4, 300, 128) for _ in range(3))
    entry, passed = dispatch.select(ScoreProgram(("mul", S, C(0.1))), q, k, v, [])
    assert entry.name == "hopper", passed
    q32 = q.float()
    entry, passed = dispatch.select(ScoreProgram(("mul", S, C(0.1))), q32, q32, q32, [])
    assert entry.name == "triton" and any("hopper" in p for p in passed)


CASES, CASE_IDS = accuracy_cases(hopper.HEAD_DIMS)


@pytest.mark.parametrize("dtype,d,causal,outlier", CASES, ids=CASE_IDS)
def test_accuracy(dtype, d, causal, outlier):
    check_scaled(dtype, d, causal, outlier, kernel=hopper)


def test_anchor_outlier_rmse():
    """ANCHORS.md outlier data, B=1 H=16 S=4096 D=128: RMSE vs fp64 within 2x of SDPA's in the same dtype."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (randn(1, 16, 4096, 128, outlier=True, dtype=dtype, gen=gen) for _ in range(3))
        out, _ = hopper.forward(q, k, v, [], ScoreProgram(("mul", S, C(128 ** -0.5))))
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        rmse = ((out.double() - ref) ** 2).mean().sqrt().item()
        rmse_sdpa = ((sdpa.double() - ref) ** 2).mean().sqrt().item()
        print(f"{dtype}: RMSE ours {rmse:.3g}, SDPA {rmse_sdpa:.3g}")
        assert rmse <= 2 * rmse_sdpa + 1e-6


@pytest.mark.parametrize("sq,sk", [(700, 900), (900, 700), (1, 4096), (64, 64), (300, 100)])
def test_gqa_window_bottom_right(sq, sk):
    gen = torch.Generator(device=DEV).manual_seed(sq)
    q = randn(2, 8, sq, 128, gen=gen)
    k, v = (randn(2, 2, sk, 128, gen=gen) for _ in range(2))
    for prog in (ScoreProgram(("mul", S, C(128 ** -0.5)), causal="bottom_right", window=256),
                 ScoreProgram(("mul", S, C(128 ** -0.5)), causal="bottom_right", empty_row="zero"),
                 ScoreProgram(("mul", S, C(128 ** -0.5)), causal="top_left")):
        attend_and_check(q, k, v, [], prog, kernel=hopper)


def test_head_dims_differ():
    gen = torch.Generator(device=DEV).manual_seed(5)
    q, k = (randn(1, 4, 600, 192, gen=gen) for _ in range(2))
    v = randn(1, 4, 600, 128, gen=gen)
    attend_and_check(q, k, v, [], ScoreProgram(("mul", S, C(192 ** -0.5)), causal="top_left"), kernel=hopper)


def test_bshd_layout_no_copy():
    """q/k/v as transposed views of (B, S, H, D) buffers, the HF layout: TMA reads them in place."""
    gen = torch.Generator(device=DEV).manual_seed(6)
    q, k, v = (randn(2, 777, 4, 64, gen=gen).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    prog = ScoreProgram(("mul", S, C(0.125)), causal="top_left")
    assert hopper.supports(prog, q, k, v, []) is None
    attend_and_check(q, k, v, [], prog, kernel=hopper)


@pytest.mark.parametrize("shape", [(1, 4, 513, 513), (2, 1, 513, 513), (2, 1, 1, 513)])
def test_bias_grad(shape):
    gen = torch.Generator(device=DEV).manual_seed(2)
    q, k, v = (randn(2, 4, 513, 64, dtype=torch.float16, gen=gen) for _ in range(3))
    bias = randn(*shape, dtype=torch.float32, gen=gen)
    prog = ScoreProgram(("add", ("mul", S, C(0.125)), ("operand", 0)), n_operands=1, operand_grad=(True,),
                        causal="top_left")
    attend_and_check(q, k, v, [bias], prog, kernel=hopper)


@pytest.mark.parametrize("empty_row", ["nan", "zero"])
def test_bool_mask_empty_rows(empty_row):
    gen = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (randn(2, 4, 300, 128, gen=gen) for _ in range(3))
    mask = torch.rand(2, 1, 300, 300, device=DEV, generator=gen) > 0.5
    mask[0, 0, 17] = False
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, C(128 ** -0.5)), C(-math.inf)), n_operands=1,
                        empty_row=empty_row)
    attend_and_check(q, k, v, [mask], prog, kernel=hopper)


@pytest.mark.parametrize("window", [None, 200])
def test_proven_hf_mask_uniform_rows(window):
    """A mask proven from the graph: causal (or sliding window) + a (B, 1, 1, Sk) padding vector, and
    empty_row="uniform" for the rows left padding empties (the mean of v, eager's gradient)."""
    gen = torch.Generator(device=DEV).manual_seed(6)
    q = randn(2, 8, 700, 128, gen=gen)
    k, v = (randn(2, 2, 700, 128, gen=gen) for _ in range(2))
    keys = torch.ones(2, 1, 1, 700, dtype=torch.bool, device=DEV)
    keys[1, ..., :300] = False
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, C(128 ** -0.5)), C(-math.inf)), n_operands=1,
                        causal="top_left", window=window, empty_row="uniform")
    attend_and_check(q, k, v, [keys], prog, kernel=hopper)


def test_softcap_and_hf_mask():
    gen = torch.Generator(device=DEV).manual_seed(4)
    q, k, v = (randn(1, 4, 600, 256, gen=gen) for _ in range(3))
    cap = ScoreProgram(("mul", ("tanh", ("div", ("mul", S, C(256 ** -0.5)), C(30.0))), C(30.0)), causal="top_left")
    attend_and_check(q, k, v, [], cap, kernel=hopper)
    lo = torch.finfo(torch.bfloat16).min
    mask = torch.triu(torch.full((600, 600), lo, device=DEV), 1).to(torch.bfloat16).expand(1, 1, 600, 600)
    hf = ScoreProgram(("add", ("mul", S, C(256 ** -0.5)), ("operand", 0)), n_operands=1)
    attend_and_check(q, k, v, [mask], hf, kernel=hopper)


def test_no_recompile_per_sequence_length():
    prog = ScoreProgram(("mul", S, C(128 ** -0.5)), causal="bottom_right")
    counts = []
    for s in (1100, 1537, 2011, 2048, 1999):
        q, k, v = (randn(1, 4, s, 128) for _ in range(3))
        hopper.forward(q, k, v, [], prog)
        torch.cuda.synchronize()
        kernel, *_ = hopper.launch_args(q, k, v, [], prog, torch.empty_like(q), torch.empty(1, 4, s, device=DEV))
        counts.append(len(_compiled(kernel)))
    assert all(c == counts[0] for c in counts), f"compiled variants per length: {counts}"


def test_cuda_graph_capture():
    prog = ScoreProgram(("mul", S, C(64 ** -0.5)), causal="top_left")
    q, k, v = (randn(2, 4, 777, 64) for _ in range(3))
    eager_out, _ = hopper.forward(q, k, v, [], prog)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out, _ = hopper.forward(q, k, v, [], prog)
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["add", "bool"])
def test_dense_mask_tile_skipping(kind):
    """A causal + padding mask passed as a tensor: the pre-pass skips hidden tiles and drops the mask load on
    neutral ones; rows whose every key is hidden (finfo.min fill: eager gives the mean of V) stay exact."""
    gen = torch.Generator(device=DEV).manual_seed(8)
    b, h, s, d = 2, 4, 1000, 128
    q, k, v = (randn(b, h, s, d, gen=gen) for _ in range(3))
    vis = (torch.arange(s, device=DEV)[None, :] <= torch.arange(s, device=DEV)[:, None]).expand(b, 1, s, s).clone()
    vis[1, :, :, 700:] = False
    vis[0, 0, 300] = False
    if kind == "add":
        mask = torch.where(vis, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
        prog = ScoreProgram(("add", ("mul", S, C(d ** -0.5)), ("operand", 0)), n_operands=1)
    else:
        mask = vis
        prog = ScoreProgram(("where", ("operand", 0), ("mul", S, C(d ** -0.5)), C(-math.inf)), n_operands=1,
                            empty_row="zero")
    tiles = hopper.tile_args(q, k, [mask], prog, hopper.config(d, d)[0])
    assert tiles, "the mask was not tile-classified"
    idx, cls, cnt = tiles[:3]
    assert cnt.sum().item() < idx.numel() * 0.7, "no tiles skipped"
    assert (cls == 1).any(), "no neutral tiles"
    # the finfo.min row's lse lost log l: its gradient is attn_bwd_imprecise's
    attend_and_check(q, k, v, [mask], prog, kernel=hopper)


@pytest.mark.parametrize("d", [64, 128])
def test_ws_backward_imprecise_rows_no_sync(d):
    """The warp-specialized backward (no operand gradient, d = dv in 64/128) of a dense finfo.min mask with rows
    masked everywhere: it reads the lse copy attn_bwd_pre writes (+inf there) and attn_bwd_imprecise adds those
    rows; no host sync; equal to the portable backward up to its dQ reduction order; CUDA graph capture."""
    gen = torch.Generator(device=DEV).manual_seed(12 + d)
    b, h, s = 2, 8, 1000
    q = randn(b, h, s, d, gen=gen)
    k, v = (randn(b, 2, s, d, gen=gen) for _ in range(2))
    vis = (torch.arange(s, device=DEV)[None, :] <= torch.arange(s, device=DEV)[:, None]).expand(b, 1, s, s).clone()
    vis[1, :, :, :300] = False
    vis[0, :, 700] = False
    mask = torch.where(vis, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)
    prog = ScoreProgram(("add", ("mul", S, C(d ** -0.5)), ("operand", 0)), n_operands=1)
    assert hopper_bwd.supports(prog, q, k, v, [mask]) is None
    attend_and_check(q, k, v, [mask], prog, kernel=hopper)
    out, lse = hopper.forward(q, k, v, [mask], prog)
    dout = torch.randn_like(out)
    ws = hopper_bwd.backward(dout, q, k, v, [mask], out, lse, prog, **hopper_bwd.variant_of(hopper_bwd.CANDIDATES[0]))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        again = hopper_bwd.backward(dout, q, k, v, [mask], out, lse, prog,
                                    **hopper_bwd.variant_of(hopper_bwd.CANDIDATES[0]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pt = triton_portable.backward(dout, q, k, v, [mask], out, lse, prog)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = hopper_bwd.backward(dout, q, k, v, [mask], out, lse, prog,
                                       **hopper_bwd.variant_of(hopper_bwd.CANDIDATES[0]))
    g.replay()
    torch.cuda.synchronize()
    for a, b_, c, p in zip(ws[:3], again[:3], captured[:3], pt[:3]):
        torch.testing.assert_close(b_.float(), a.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(c.float(), a.float(), atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a.float(), p.float(), atol=2e-2, rtol=2e-2)


def test_backward_ptx_is_warp_specialized_and_dispatched():
    gen = torch.Generator(device=DEV).manual_seed(11)
    q, k, v = (randn(1, 2, 256, 128, gen=gen) for _ in range(3))
    prog = ScoreProgram(("mul", S, C(128 ** -0.5)), causal="top_left")
    entry, passed = dispatch.select_backward(prog, q, k, v, [])
    assert entry is dispatch.HOPPER and hopper_bwd.supports(prog, q, k, v, []) is None, passed
    out, lse = hopper.forward(q, k, v, [], prog)
    hopper.backward(torch.randn_like(out), q, k, v, [], out, lse, prog)
    mod = hopper_bwd._spec_and_module(prog, q, k, v, [])
    ptx = _compiled(mod.attn_bwd_ws)[-1].asm["ptx"]
    for instr in ("wgmma.mma_async", "cp.async.bulk.tensor", "mbarrier.try_wait", "setmaxnreg",
                  "cp.reduce.async.bulk.tensor"):
        assert instr in ptx, f"{instr} missing from the warp-specialized backward's PTX"
    torch.use_deterministic_algorithms(True)
    try:
        entry, passed = dispatch.select_backward(prog, q, k, v, [])
    finally:
        torch.use_deterministic_algorithms(False)
    assert entry is dispatch.TRITON and any("deterministic" in p for p in passed), passed


@pytest.mark.parametrize("d", [64, 128])
def test_ws_backward_plan_and_dout_layouts(d):
    """The tuned warp-specialized backward through its call-key plan (hopper_bwd._WsPlan: the settled schedule,
    descriptors rebased on each call's tensors) on new tensors gives what its first, unplanned call gave, also
    under CUDA-graph capture; dout read in place as a transposed (B, S, H, D) view (torch.compile's layout) or
    copied where TMA cannot read it (expanded, the gradient of out.sum()) gives the gradients of the same dout
    made contiguous. dK / dV come from one CTA per key block in a fixed order: equal bit for bit; dQ is added by
    TMA reductions in no fixed order: close. And all of it matches the portable backward."""
    gen = torch.Generator(device=DEV).manual_seed(40 + d)
    b, hq, hk, sq, sk = 2, 8, 2, 700, 900
    q = randn(b, sq, hq, d, gen=gen).transpose(1, 2)
    k, v = (randn(b, sk, hk, d, gen=gen).transpose(1, 2) for _ in range(2))
    prog = ScoreProgram(("mul", S, C(d ** -0.5)), causal="bottom_right")
    out, lse = hopper.forward(q, k, v, [], prog)
    douts = {"transposed": randn(b, sq, hq, d, gen=gen).transpose(1, 2),
             "expanded": torch.full((), 0.5, dtype=out.dtype, device=DEV).expand(out.shape)}
    assert hopper_bwd.tma_ready(douts["transposed"]) and not hopper_bwd.tma_ready(douts["expanded"])

    def same(got, want, what):
        for name, a, w in zip(("dq", "dk", "dv"), got[:3], want[:3]):
            if name == "dq":
                torch.testing.assert_close(a.float(), w.float(), atol=1e-2, rtol=1e-2, msg=f"{what} {name}")
            else:
                assert torch.equal(a, w), f"{what} {name}"

    for kind, dout in douts.items():
        triton_portable._BWD_PLANS.clear()
        first = hopper_bwd.backward(dout, q, k, v, [], out, lse, prog)    # _AUTOTUNE off: settles at once
        assert any(hopper_bwd._STEP in p.steps for p in triton_portable._BWD_PLANS.values()), "no plan"
        args = [t.clone() for t in (dout if kind == "transposed" else dout.contiguous(), q, k, v, out, lse)]
        if kind == "expanded":
            args[0] = dout
        planned = hopper_bwd.backward(args[0], *args[1:4], [], *args[4:], prog)
        same(planned, first, f"{kind}: planned vs first call")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = hopper_bwd.backward(args[0], *args[1:4], [], *args[4:], prog)
        g.replay()
        torch.cuda.synchronize()
        same(captured, first, f"{kind}: captured plan vs first call")
        same(hopper_bwd.backward(dout.contiguous(), q, k, v, [], out, lse, prog), first,
             f"{kind}: contiguous dout vs {kind}")
        pt = triton_portable.backward(dout, q, k, v, [], out, lse, prog)
        for name, a, p in zip(("dq", "dk", "dv"), first[:3], pt[:3]):
            err = (a.float() - p.float()).abs().max().item()
            scale = p.float().abs().max().item()
            assert err <= 2e-2 * scale + 1e-3, f"{kind} {name}: ws vs portable max err {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("d,causal,g,sq,sk", [(128, "none", 1, 2048, 2048), (128, "bottom_right", 4, 1500, 2100),
                                              (64, "top_left", 2, 2100, 1500), (64, "none", 1, 77, 1000)])
def test_ws_backward_against_portable(d, causal, g, sq, sk):
    """Larger shapes than the accuracy grid: the warp-specialized gradients by the 2x rule (its default
    schedule), and every candidate schedule of its tuner beside the portable backward on the same (out, lse)."""
    gen = torch.Generator(device=DEV).manual_seed(d + sq)
    q = randn(2, 8, sq, d, gen=gen)
    k, v = (randn(2, 8 // g, sk, d, gen=gen) for _ in range(2))
    prog = ScoreProgram(("mul", S, C(d ** -0.5)), causal=causal)
    attend_and_check(q, k, v, [], prog, kernel=hopper)
    out, lse = hopper.forward(q, k, v, [], prog)
    dout = torch.randn_like(out)
    pt = triton_portable.backward(dout, q, k, v, [], out, lse, prog)
    for cand in hopper_bwd.candidates(d):
        if cand[0] != "ws":
            continue
        ws = hopper_bwd.backward(dout, q, k, v, [], out, lse, prog, **hopper_bwd.variant_of(cand))
        for name, a, b in zip(("dq", "dk", "dv"), ws[:3], pt[:3]):
            err = (a.float() - b.float()).abs().max().item()
            scale = b.float().abs().max().item()
            assert err <= 2e-2 * scale + 1e-3, f"{cand} {name}: ws vs portable max err {err:.3g} (scale {scale:.3g})"


# --- the persistent schedule (templates_hopper PERSISTENT; a tuner candidate only with hopper.TUNE_PERSISTENT) ---

@pytest.fixture
def _poisoned_outputs(monkeypatch):
    """Every output buffer starts as NaN: a work tile the persistent schedule skips shows up as a NaN row."""
    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(triton_portable, "_empty", poisoned)


def _pinned(**pin):
    """hopper as attend_and_check takes it, with the forward pinned to one schedule (launch_args's keywords)."""
    import functools
    import types
    fwd = functools.partial(hopper.forward, **pin)
    return types.SimpleNamespace(supports=hopper.supports, forward=fwd, backward=hopper.backward)


def _persistent(**pin):
    """hopper with the forward pinned to the persistent schedule."""
    return _pinned(persistent=True, **pin)


def _sms() -> int:
    return hopper.sm_count(torch.device(DEV))


PERSISTENT_CASES = [
    # d, causal, (B, Hq, Hk), (Sq, Sk), mask ("pad": (B, 1, 1, Sk) key padding), pinned (pingpong, stages)
    (64, "none", (2, 4, 4), (1031, 1031), None, (True, 2)),             # 72 work tiles: fewer than the SMs
    (64, "top_left", (4, 16, 4), (2000, 2000), None, (True, 4)),        # 1024 tiles, GQA 4
    (64, "bottom_right", (2, 8, 2), (777, 1500), "pad", (False, 2)),
    (128, "none", (2, 8, 8), (1100, 900), None, (True, 3)),             # O through Q's buffer
    (128, "none", (3, 16, 4), (2049, 2049), None, (True, 2)),           # own O buffer; 816 tiles
    (128, "top_left", (2, 16, 2), (3000, 3000), None, (True, 2)),       # 768 tiles, LPT order
    (128, "bottom_right", (1, 8, 8), (300, 4100), None, (True, 3)),
    (128, "none", (2, 8, 2), (1000, 1000), "pad", (True, 2)),           # tile lists (mask pre-pass)
    (256, "none", (2, 4, 4), (1031, 1031), None, (False, 2)),
    (256, "top_left", (2, 16, 8), (2500, 2500), None, (False, 2)),      # 640 tiles
    (256, "bottom_right", (1, 4, 2), (900, 1300), "pad", (True, 2)),
]


@pytest.mark.parametrize("d,causal,heads,lengths,mask,pin", PERSISTENT_CASES,
                         ids=[f"d{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}-{c[3][0]}x{c[3][1]}-{c[4] or 'nomask'}"
                              f"-{'pp' if c[5][0] else 'nopp'}{c[5][1]}" for c in PERSISTENT_CASES])
def test_persistent_accuracy(_poisoned_outputs, d, causal, heads, lengths, mask, pin):
    """The persistent schedule by the 2x rule on NaN-poisoned outputs, with work tiles below and well above the
    SM count, ragged lengths, Sq != Sk, GQA and a key-padding mask; and within a bf16 rounding of the default
    schedule with the same tiles (each work tile runs the default's code)."""
    b, hq, hk = heads
    sq, sk = lengths
    n_tiles = b * hq * -(-sq // (2 * hopper.BLOCK_M))
    gen = torch.Generator(device=DEV).manual_seed(d + sq + hq)
    q = randn(b, hq, sq, d, gen=gen)
    k, v = (randn(b, hk, sk, d, gen=gen) for _ in range(2))
    ops, expr = [], ("mul", S, C(d ** -0.5))
    if mask == "pad":
        keys = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=DEV)
        keys[-1, ..., sk // 3:] = False
        ops, expr = [keys], ("where", ("operand", 0), expr, C(-math.inf))
    prog = ScoreProgram(expr, n_operands=len(ops), causal=causal, empty_row="zero")
    pingpong, stages = pin
    kernel, grid, args, kwargs = hopper.launch_args(q, k, v, ops, prog, torch.empty(b, hq, sq, d, device=DEV,
                                                    dtype=q.dtype), torch.empty(b, hq, sq, device=DEV),
                                                    pingpong=pingpong, stages=stages, persistent=True)
    assert grid == (min(_sms(), n_tiles), 1, 1) and kwargs["PERSISTENT"]
    attend_and_check(q, k, v, ops, prog, backward=False, kernel=_persistent(pingpong=pingpong, stages=stages))
    out_p, lse_p = hopper.forward(q, k, v, ops, prog, persistent=True, pingpong=pingpong, stages=stages)
    out_d, lse_d = hopper.forward(q, k, v, ops, prog, pingpong=pingpong, stages=stages)
    torch.testing.assert_close(out_p.float(), out_d.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse_p, lse_d, atol=1e-4, rtol=0)


def test_persistent_repeated_launches_and_graph_capture(_poisoned_outputs):
    """Many work tiles per CTA (B*H*m-blocks = 32x the SMs) across several launches and a CUDA-graph replay: the
    barrier phases that run on across tiles never let a tile read a stale Q, K or V: every launch gives the same
    bits, within a bf16 rounding of the default schedule."""
    b, h, s, d = 4, 32, 4096, 128
    n_tiles = b * h * s // 128
    assert n_tiles >= 8 * _sms()
    gen = torch.Generator(device=DEV).manual_seed(77)
    q, k, v = (randn(b, h, s, d, gen=gen) for _ in range(3))
    prog = ScoreProgram(("mul", S, C(d ** -0.5)), causal="top_left")
    want, _ = hopper.forward(q, k, v, [], prog, pingpong=True, stages=2)
    assert not want.isnan().any()
    for stages in (2, 3):
        first, _ = hopper.forward(q, k, v, [], prog, persistent=True, pingpong=True, stages=stages)
        torch.testing.assert_close(first.float(), want.float(), atol=2e-2, rtol=0)
        for _ in range(3):
            got, _ = hopper.forward(q, k, v, [], prog, persistent=True, pingpong=True, stages=stages)
            assert torch.equal(got, first), f"stages={stages}: launches differ"
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cap, _ = hopper.forward(q, k, v, [], prog, persistent=True, pingpong=True, stages=2)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(cap, hopper.forward(q, k, v, [], prog, persistent=True, pingpong=True, stages=2)[0])


@pytest.mark.parametrize("causal", ["none", "top_left"])
def test_portable_candidate_through_the_tuner(monkeypatch, causal):
    """A call key the tuner settles on the portable candidate (hopper.PORTABLE, D <= 64) gives the portable
    forward's numbers bit for bit, on the tuning call and through its plan, with the padded rows' rule applied
    once (uniform fill)."""
    monkeypatch.setattr(triton_portable, "_AUTOTUNE", True)
    monkeypatch.setattr(hopper, "candidates", lambda d, dv, causal, **kw: [hopper.PORTABLE])
    hopper._PLANS.clear()
    gen = torch.Generator(device=DEV).manual_seed(79)
    q = randn(2, 8, 700, 64, gen=gen)
    k, v = (randn(2, 4, 700, 64, gen=gen) for _ in range(2))
    keep = torch.ones(2, 1, 1, 700, dtype=torch.bool, device=DEV)
    keep[1, ..., 300:] = False
    prog = ScoreProgram(("where", ("operand", 0), ("mul", S, C(0.125)), C(-math.inf)), 1, causal=causal,
                        empty_row="uniform")
    want, want_lse = triton_portable.forward(q, k, v, [keep], prog)
    first, first_lse = hopper.forward(q, k, v, [keep], prog)
    planned, planned_lse = hopper.forward(q, k, v, [keep], prog)
    assert list(hopper._PLANS.values()) == [hopper.PORTABLE]
    for got, got_lse in ((first, first_lse), (planned, planned_lse)):
        assert torch.equal(got, want) and torch.equal(got_lse, want_lse)
    hopper._PLANS.clear()


def test_persistent_through_the_tuner(monkeypatch):
    """With the switch on, the tuner times the persistent candidates beside the default ones, and whatever it
    settles on (and the plan it pins) gives the default schedule's numbers."""
    monkeypatch.setattr(triton_portable, "_AUTOTUNE", True)
    monkeypatch.setattr(hopper, "TUNE_PERSISTENT", True)
    hopper._PLANS.clear()
    gen = torch.Generator(device=DEV).manual_seed(78)
    q = randn(2, 16, 1500, 64, gen=gen)
    k, v = (randn(2, 4, 1500, 64, gen=gen) for _ in range(2))
    prog = ScoreProgram(("mul", S, C(0.125)))      # causal programs have no persistent candidate
    assert any(c.persistent for c in hopper.schedules(64, 64))
    first, _ = hopper.forward(q, k, v, [], prog)
    planned, _ = hopper.forward(q, k, v, [], prog)
    want, _ = hopper.forward(q, k, v, [], prog, pingpong=True, stages=2)
    torch.testing.assert_close(first.float(), want.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(planned, first, atol=0, rtol=0)
    hopper._PLANS.clear()


# --- key-split key blocks (templates_hopper BLOCK_N2; a tuner candidate only with hopper.TUNE_KSPLIT) ---------------

KSPLIT_CASES = [
    # causal, window, (B, Hq, Hk), (Sq, Sk), chain ("scale" or "softcap-bias"), pinned (block_n2, pingpong, persistent)
    ("none", None, (2, 8, 8), (1000, 1000), "scale", (32, True, False)),     # ragged: the last block is partial
    ("none", None, (2, 8, 2), (700, 2100), "scale", (32, False, False)),
    ("top_left", None, (2, 16, 4), (2000, 2000), "scale", (32, True, False)),  # diagonal blocks of 160 keys
    ("bottom_right", 300, (1, 8, 2), (900, 1700), "scale", (32, True, False)),
    ("bottom_right", None, (1, 8, 8), (1, 4100), "scale", (32, True, False)),  # one query row
    ("none", None, (2, 4, 4), (1031, 1031), "softcap-bias", (32, True, False)),
    ("none", None, (3, 16, 4), (2049, 2049), "scale", (32, True, True)),     # persistent, own O buffer
    ("top_left", None, (2, 8, 8), (1500, 1500), "scale", (64, True, False)),  # 128 + 64: spills, still right
]


@pytest.mark.parametrize("causal,window,heads,lengths,chain,pin", KSPLIT_CASES,
                         ids=[f"{c[0]}-w{c[1]}-{'x'.join(map(str, c[2]))}-{c[3][0]}x{c[3][1]}-{c[4]}-n{c[5][0]}"
                              f"{'-pp' if c[5][1] else '-nopp'}{'-persistent' if c[5][2] else ''}"
                              for c in KSPLIT_CASES])
def test_ksplit_accuracy(_poisoned_outputs, causal, window, heads, lengths, chain, pin):
    """Key-split blocks by the 2x rule on NaN-poisoned outputs (ragged lengths, a partial last block, causal
    diagonals and windows across the 128 / 32 boundary, GQA, a score chain with an operand), and within a bf16
    rounding of the plain 128-key schedule."""
    b, hq, hk = heads
    sq, sk = lengths
    d = 128
    gen = torch.Generator(device=DEV).manual_seed(sq + sk + hq)
    q = randn(b, hq, sq, d, gen=gen)
    k, v = (randn(b, hk, sk, d, gen=gen) for _ in range(2))
    ops, expr = [], ("mul", S, C(d ** -0.5))
    if chain == "softcap-bias":
        ops = [randn(1, hq, 1, sk, gen=gen)]
        expr = ("mul", ("tanh", ("mul", ("add", expr, ("operand", 0)), C(1 / 30.0))), C(30.0))
    prog = ScoreProgram(expr, n_operands=len(ops), causal=causal, window=window, empty_row="zero")
    n2, pingpong, persistent = pin
    kw = dict(block_n2=n2, pingpong=pingpong, stages=2, persistent=persistent)
    attend_and_check(q, k, v, ops, prog, backward=False, kernel=_pinned(**kw))
    out_s, lse_s = hopper.forward(q, k, v, ops, prog, **kw)
    out_d, lse_d = hopper.forward(q, k, v, ops, prog, pingpong=pingpong, stages=2)
    assert not out_s.isnan().any()
    torch.testing.assert_close(out_s.float(), out_d.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(lse_s, lse_d, atol=1e-4, rtol=0)


def test_ksplit_through_the_tuner(monkeypatch):
    """With the switch on, the tuner times the key-split candidates beside the others, and whatever it settles on
    (and the plan it pins, which rebases both K / V boxes on each call's tensors) gives the plain schedule's
    numbers, call after call on new tensors."""
    monkeypatch.setattr(triton_portable, "_AUTOTUNE", True)
    monkeypatch.setattr(hopper, "TUNE_KSPLIT", True)
    hopper._PLANS.clear()
    prog = ScoreProgram(("mul", S, C(128 ** -0.5)), causal="bottom_right")
    assert any(getattr(c, "block_n2", 0) for c in hopper.candidates(128, 128, True))
    for seed in range(3):
        gen = torch.Generator(device=DEV).manual_seed(90 + seed)
        q = randn(2, 16, 1800, 128, gen=gen)
        k, v = (randn(2, 4, 1800, 128, gen=gen) for _ in range(2))
        got, _ = hopper.forward(q, k, v, [], prog)
        want, _ = hopper.forward(q, k, v, [], prog, pingpong=True, stages=2)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)
    hopper._PLANS.clear()


# --- operand prefetch (templates_hopper PREFETCH; a tuner candidate only with hopper.TUNE_OPERAND_SCHEDULES) ------

PREFETCH_CASES = [
    # name, causal, (B, Hq, Hk), (Sq, Sk), d
    ("t5-bias", "none", (2, 16, 16), (1000, 1000), 64),        # T5's self-attention: dense bias, no scale
    ("scaled-fp32-bias", "none", (2, 8, 2), (700, 1300), 64),
    ("keypad-tile-lists", "none", (2, 8, 8), (1031, 1031), 64),
    ("dense-bool-causal", "bottom_right", (1, 8, 4), (900, 1500), 64),
    ("t5-bias", "none", (1, 8, 8), (600, 600), 128),            # pinned at 128 too (the tuner does not offer it)
]


def _prefetch_case(name, b, hq, sq, sk, gen):
    if name == "t5-bias":
        return [randn(b, hq, sq, sk, gen=gen)], ("add", S, ("operand", 0)), "zero"     # per batch, as the zoo's T5
    if name == "scaled-fp32-bias":
        return [torch.randn(b, hq, sq, sk, generator=gen, device=DEV)], ("add", ("mul", S, C(0.125)), ("operand", 0)), \
            "zero"
    if name == "keypad-tile-lists":
        keys = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=DEV)
        keys[-1, ..., sk // 3:] = False
        return [keys], ("where", ("operand", 0), ("mul", S, C(0.125)), C(-math.inf)), "zero"
    mask = torch.rand(b, 1, sq, sk, generator=gen, device=DEV) > 0.2
    return [mask], ("where", ("operand", 0), ("mul", S, C(0.125)), C(-math.inf)), "zero"


@pytest.mark.parametrize("name,causal,heads,lengths,d", PREFETCH_CASES,
                         ids=[f"{c[0]}-{c[1]}-{'x'.join(map(str, c[2]))}-{c[3][0]}x{c[3][1]}-d{c[4]}"
                              for c in PREFETCH_CASES])
def test_prefetch_accuracy(_poisoned_outputs, name, causal, heads, lengths, d):
    """Operands loaded ahead of each key block's S product: the 2x rule on NaN-poisoned outputs, and the plain
    schedule's numbers within a rounding (the same loads and arithmetic, issued earlier; ptxas may schedule the
    conversions differently)."""
    b, hq, hk = heads
    sq, sk = lengths
    gen = torch.Generator(device=DEV).manual_seed(sq + sk + d)
    q = randn(b, hq, sq, d, gen=gen)
    k, v = (randn(b, hk, sk, d, gen=gen) for _ in range(2))
    ops, expr, rule = _prefetch_case(name, b, hq, sq, sk, gen)
    prog = ScoreProgram(expr, n_operands=len(ops), causal=causal, empty_row=rule)
    attend_and_check(q, k, v, ops, prog, backward=False, kernel=_pinned(prefetch=True, pingpong=True, stages=2))
    got, got_lse = hopper.forward(q, k, v, ops, prog, prefetch=True, pingpong=True, stages=2)
    want, want_lse = hopper.forward(q, k, v, ops, prog, pingpong=True, stages=2)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=0)


def test_prefetch_through_the_tuner(monkeypatch):
    """With the switch on, the tuner times the prefetching candidates beside the plain ones for a one-operand
    program at head dim 64; whatever it settles on gives the plain schedule's numbers, through the plan too."""
    monkeypatch.setattr(triton_portable, "_AUTOTUNE", True)
    monkeypatch.setattr(hopper, "TUNE_OPERAND_SCHEDULES", True)
    hopper._PLANS.clear()
    gen = torch.Generator(device=DEV).manual_seed(91)
    q, k, v = (randn(2, 16, 1024, 64, gen=gen) for _ in range(3))
    bias = randn(1, 16, 1024, 1024, gen=gen)
    prog = ScoreProgram(("add", S, ("operand", 0)), n_operands=1)
    assert any(getattr(c, "prefetch", False) for c in hopper.candidates(64, 64, False, operands=1, dense=True))
    first, _ = hopper.forward(q, k, v, [bias], prog)
    planned, _ = hopper.forward(q, k, v, [bias], prog)
    want, _ = hopper.forward(q, k, v, [bias], prog, pingpong=True, stages=2)
    torch.testing.assert_close(first.float(), want.float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(planned, first, atol=0, rtol=0)
    hopper._PLANS.clear()


@pytest.mark.parametrize("case", ["float-bias-tile-lists", "bool-mask-causal"])
def test_no_overlap_dense_operand_accuracy(_poisoned_outputs, case):
    """The schedule without the PV overlap (launch_args overlap=False, the operand schedules' choice for dense operands
    at head dim 128): the 2x rule on NaN-poisoned outputs, and the overlapped schedule's numbers within a rounding."""
    b, hq, hk, sq, sk, d = 2, 8, 4, 900, 1300, 128
    gen = torch.Generator(device=DEV).manual_seed(sq + sk + len(case))
    q = randn(b, hq, sq, d, gen=gen)
    k, v = (randn(b, hk, sk, d, gen=gen) for _ in range(2))
    if case == "float-bias-tile-lists":
        ops, expr, causal = [randn(1, hq, sq, sk, gen=gen)], ("add", ("mul", S, C(d ** -0.5)), ("operand", 0)), "none"
    else:
        ops = [torch.rand(b, 1, sq, sk, generator=gen, device=DEV) > 0.2]
        expr, causal = ("where", ("operand", 0), ("mul", S, C(d ** -0.5)), C(-math.inf)), "bottom_right"
    prog = ScoreProgram(expr, n_operands=1, causal=causal, empty_row="zero")
    attend_and_check(q, k, v, ops, prog, backward=False, kernel=_pinned(overlap=False, pingpong=True, stages=2))
    got, got_lse = hopper.forward(q, k, v, ops, prog, overlap=False, pingpong=True, stages=2)
    want, want_lse = hopper.forward(q, k, v, ops, prog, pingpong=True, stages=2)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-5, rtol=0)
