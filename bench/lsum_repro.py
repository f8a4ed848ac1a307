"""Isolates the FP8 LSUM row sum bug (templates_hopper LSUM: l = P · ones on the tensor core, measured 24.94x the
true sum at ones width 8/16 and 0.501x at 32/64 on the H100) in single-warpgroup Gluon kernels.

Every probe computes C = A · Bᵀ with A [64, 128] (the P tile: e4m3, or fp16 as a control) and B [W, 128] (the
ones tile, K-major, permuted (1, 0) as the template does), W in 8 / 16 / 32 / 64, and compares with torch.
Knobs of one probe (constexprs of `probe`):
  A_SRC  3: the template's P provenance: fp32 P loaded in the S accumulator layout, converted by the template's
            _p_fp8 (key renaming + inline cvt; e4m3 only; O's reference renames V's keys the same way);
         0: A loaded in the N=128 operand layout (the template's p_layout) then convert_layout(..., lp_layout,
            assert_trivial=True) as the template; 1: loaded directly in the N=W operand layout; 2: A in shared
            memory (NVMMASharedLayout.get_default_for).
  B_SRC  0: the template's ones tile (allocate_shared_memory with gl.full(1.0, fp16, ones_reg).to(dtype));
         1: B from global memory through registers (random small integers: shows which column reads what);
         2: B by TMA from a global tensor (same data as 1).
  PV     the m64n128k32 P·V wgmma issued first on the same A registers, then P·Bᵀ (each its own commit group, both
         in flight, one wait(0) with both tokens: the template's order).
  WS     the product runs in a 4-warp worker partition of warp_specialize, B allocated and stored before it by
         the default partition (as the template's ones tile).
Each line prints max |C - ref|, and C's first row (all W columns) next to the reference's first row.
If every probe is exact, the isolated wgmma is right and the bug is in the full kernel's context. The last section
runs the real forward (q = 0, V = 1: every p = 256, out should be 1, lse ln Sk) through text variants of the
generated module (VARIANTS): as generated; lse := the sum of the ones tile read back after the loop (1024 if
intact); l from the min column / column 0 (which columns are wrong); P·1 synchronous (nothing in flight with it);
ones tile stored and fenced by each consumer itself.

Run (H100, < 2 min):  python bench/lsum_repro.py
Cross-compile only (no GPU, sm_90a):  python bench/lsum_repro.py --cross
"""

from __future__ import annotations

import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

M, K, DV = gl.constexpr(64), gl.constexpr(128), gl.constexpr(128)
MH, KH, DVH = M.value, K.value, DV.value      # host-side ints


@gluon.jit
def _p_fp8(p, p_layout: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """templates_hopper._p_fp8: fp32 P in the accumulator layout -> the e4m3 A operand, keys renamed
    16g + 8a + 2t + b -> 16g + 4t + 2a + b (register renaming, 2 cvt + 1 byte permute per register)."""
    p5 = gl.permute(gl.reshape(p, [BLOCK_M, BLOCK_N // 16, 2, 4, 2]), [0, 1, 3, 2, 4])
    pk = gl.convert_layout(gl.reshape(p5, [BLOCK_M, BLOCK_N]), p_layout, assert_trivial=True)
    return gl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
        "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [pk], dtype=gl.int8, is_pure=True, pack=4).to(gl.float8e4nv,
                                                                                                  bitcast=True)


@gluon.jit
def _product(a_ptr, p_ptr, b_smem, v_smem, c_ptr, o_ptr, W: gl.constexpr, A_SRC: gl.constexpr, PV: gl.constexpr):
    """One warpgroup: load A, issue (P·V then) A·Bᵀ, wait, store C (and O)."""
    dtype: gl.constexpr = a_ptr.dtype.element_ty
    KI: gl.constexpr = 256 // dtype.primitive_bitwidth
    KW: gl.constexpr = 32 // dtype.primitive_bitwidth
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV, KI])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=KW)
    l_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, W, KI])
    lp_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=l_layout, k_width=KW)
    if A_SRC == 3:      # the template's P: fp32 in the S accumulator layout, through _p_fp8
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, K, KI])
        srow = gl.arange(0, M, gl.SliceLayout(1, s_layout))
        scol = gl.arange(0, K, gl.SliceLayout(0, s_layout))
        p32 = gl.load(p_ptr + gl.expand_dims(srow, 1) * K + gl.expand_dims(scol, 0))
        a_o = _p_fp8(p32, p_layout, M, K)
        a_l = gl.convert_layout(a_o, lp_layout, assert_trivial=True)
    elif A_SRC == 1:
        rows = gl.arange(0, M, gl.SliceLayout(1, lp_layout))
        cols = gl.arange(0, K, gl.SliceLayout(0, lp_layout))
        a_l = gl.load(a_ptr + gl.expand_dims(rows, 1) * K + gl.expand_dims(cols, 0))
        a_o = a_l
    else:
        rows = gl.arange(0, M, gl.SliceLayout(1, p_layout))
        cols = gl.arange(0, K, gl.SliceLayout(0, p_layout))
        a_o = gl.load(a_ptr + gl.expand_dims(rows, 1) * K + gl.expand_dims(cols, 0))
        a_l = gl.convert_layout(a_o, lp_layout, assert_trivial=True)
    if A_SRC == 2:
        a_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([M, K], dtype)
        a_smem = gl.allocate_shared_memory(dtype, [M, K], a_sl, a_o)
        fence_async_shared()
        a_o = a_smem
        a_l = a_smem
    zero_l = gl.zeros([M, W], gl.float32, l_layout)
    if PV:
        o_tok = warpgroup_mma(a_o, v_smem.permute((1, 0)), gl.zeros([M, DV], gl.float32, o_layout), is_async=True)
        l_tok = warpgroup_mma(a_l, b_smem.permute((1, 0)), zero_l, use_acc=False, is_async=True)
        o, c = warpgroup_mma_wait(0, deps=(o_tok, l_tok))
        orow = gl.arange(0, M, gl.SliceLayout(1, o_layout))
        ocol = gl.arange(0, DV, gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + gl.expand_dims(orow, 1) * DV + gl.expand_dims(ocol, 0), o)
    else:
        l_tok = warpgroup_mma(a_l, b_smem.permute((1, 0)), zero_l, use_acc=False, is_async=True)
        c = warpgroup_mma_wait(0, deps=(l_tok,))
    crow = gl.arange(0, M, gl.SliceLayout(1, l_layout))
    ccol = gl.arange(0, W, gl.SliceLayout(0, l_layout))
    gl.store(c_ptr + gl.expand_dims(crow, 1) * W + gl.expand_dims(ccol, 0), c)


@gluon.jit
def _idle():
    pass


@gluon.jit
def probe(a_ptr, p_ptr, b_ptr, b_desc, v_ptr, c_ptr, o_ptr, W: gl.constexpr, A_SRC: gl.constexpr, B_SRC: gl.constexpr,
          PV: gl.constexpr, WS: gl.constexpr):
    """C = A · Bᵀ (and O = A · V) in one warpgroup; see the module docstring for the knobs."""
    dtype: gl.constexpr = a_ptr.dtype.element_ty
    b_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([W, K], dtype)
    ones_reg: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [2, 2], [1, 0])
    if B_SRC == 0:
        b_smem = gl.allocate_shared_memory(dtype, [W, K], b_l, gl.full([W, K], 1.0, gl.float16, ones_reg).to(dtype))
    elif B_SRC == 1:
        br = gl.arange(0, W, gl.SliceLayout(1, ones_reg))
        bc = gl.arange(0, K, gl.SliceLayout(0, ones_reg))
        b_smem = gl.allocate_shared_memory(dtype, [W, K], b_l,
                                           gl.load(b_ptr + gl.expand_dims(br, 1) * K + gl.expand_dims(bc, 0)))
    else:
        b_smem = gl.allocate_shared_memory(dtype, [W, K], b_desc.layout)
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=1)
        fence_async_shared()
        mbarrier.expect(bar, b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(b_desc, [0, 0], bar, b_smem)
        mbarrier.wait(bar, 0)
    # V^T [DV, K] (K-major, as the template's transposed V), always through registers
    v_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([DV, K], dtype)
    vr = gl.arange(0, DV, gl.SliceLayout(1, ones_reg))
    vc = gl.arange(0, K, gl.SliceLayout(0, ones_reg))
    v_smem = gl.allocate_shared_memory(dtype, [DV, K], v_l,
                                       gl.load(v_ptr + gl.expand_dims(vr, 1) * K + gl.expand_dims(vc, 0)))
    fence_async_shared()
    if WS:
        gl.warp_specialize([(_idle, ()), (_product, (a_ptr, p_ptr, b_smem, v_smem, c_ptr, o_ptr, W, A_SRC, PV))],
                           [4], [240])
    else:
        _product(a_ptr, p_ptr, b_smem, v_smem, c_ptr, o_ptr, W, A_SRC, PV)


CASES = [  # (name, A_SRC, B_SRC, PV, WS)
    ("1 regs(conv N128->W), ones stored from regs (template)", 0, 0, False, False),
    ("1b regs(conv), random B via regs", 0, 1, False, False),
    ("2 regs(conv), B by TMA", 0, 2, False, False),
    ("3 A in smem, ones from regs", 2, 0, False, False),
    ("3b A in smem, random B via regs", 2, 1, False, False),
    ("4 regs built in N=W parent, ones from regs", 1, 0, False, False),
    ("4b regs built in N=W parent, random B", 1, 1, False, False),
    ("5 after PV m64n128 wgmma, one group, ones", 0, 0, True, False),
    ("5b after PV, random B", 0, 1, True, False),
    ("6 P via _p_fp8 (template), ones", 3, 0, False, False),
    ("6b P via _p_fp8, after PV, ones", 3, 0, True, False),
    ("6c P via _p_fp8, after PV, random B", 3, 1, True, False),
    ("6d P via _p_fp8, after PV, ws worker, ones", 3, 0, True, True),
    ("7 in a warp_specialize worker, ones", 0, 0, False, True),
    ("7b warp_specialize worker, after PV, ones", 0, 0, True, True),
]


def _inputs(dtype, W, dev, kind):
    g = torch.Generator().manual_seed(0)
    if kind == "p256":      # the lead's failing case: every p = 256 (e4m3 0x78)
        a = torch.full((MH, KH), 256.0)
    else:                   # small integers: every product and sum exact in fp32
        a = torch.randint(-3, 4, (MH, KH), generator=g).float()
    b_rand = torch.randint(-2, 3, (W, KH), generator=g).float()
    v = torch.randint(-2, 3, (DVH, KH), generator=g).float()
    return [t.to(dtype).to(dev) for t in (a, b_rand, v)]


def _launch(dtype, W, a_src, b_src, pv, ws, kind, dev="cuda", cross=False):
    a, b, v = _inputs(dtype, W, dev, kind)
    c = torch.full((MH, W), float("nan"), device=dev)
    o = torch.full((MH, DVH), float("nan"), device=dev)
    b_layout = gl.NVMMASharedLayout.get_default_for([W, KH], gl.float8e4nv if dtype == torch.float8_e4m3fn
                                                   else gl.float16)
    b_desc = TensorDescriptor.from_tensor(b, [W, KH], b_layout)
    args = (a, a.float(), b, b_desc, v, c, o)
    kw = dict(W=W, A_SRC=a_src, B_SRC=b_src, PV=pv, WS=ws, num_warps=4)
    if cross:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from sm90_cross_compile import compile_sm90
        return compile_sm90(probe, *args, **kw)
    probe[(1,)](*args, **kw)
    torch.cuda.synchronize()
    bref = torch.ones(W, KH, device=dev) if b_src == 0 else b.float()
    af = a.float()
    if a_src == 3:      # operand position of logical key k (_p_fp8's renaming)
        k = torch.arange(KH)
        pos = (k // 16) * 16 + ((k % 8) // 2) * 4 + ((k % 16) // 8) * 2 + k % 2
        a_op = torch.empty_like(af)
        a_op[:, pos.to(dev)] = af
        af = a_op
    ref = af @ bref.t()
    oref = af @ v.float().t()
    return c, ref, (o, oref) if pv else None


def _fmt(row):
    return "[" + " ".join(f"{x:.6g}" for x in row.tolist()) + "]"


def run_probes():
    print("== isolated probes: max|C-ref| (O's error where PV); C[0,:] vs ref[0,:] ==")
    for dtype in (torch.float8_e4m3fn, torch.float16):
        for kind in ("p256", "ints"):
            for W in (8, 16, 32, 64):
                for name, a_src, b_src, pv, ws in CASES:
                    if kind == "p256" and b_src:
                        continue        # p256 is the lead's ones case
                    if a_src == 3 and dtype != torch.float8_e4m3fn:
                        continue
                    tag = f"{str(dtype)[6:]:>13} {kind:4} W={W:2} | {name}"
                    try:
                        c, ref, o = _launch(dtype, W, a_src, b_src, pv, ws, kind)
                    except Exception as e:     # a probe that does not compile says so and the rest go on
                        print(f"{tag}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                        continue
                    err = (c - ref).abs().max().item()
                    extra = f" O err {(o[0] - o[1]).abs().max().item():.3g}" if o else ""
                    ok = "ok " if err == 0 else "BAD"
                    print(f"{tag}: {ok} err {err:.6g}{extra}")
                    if err != 0 or (W == 8 and kind == "p256"):
                        print(f"      C[0]   {_fmt(c[0])}\n      ref[0] {_fmt(ref[0])}"
                              + (f"\n      C[1]   {_fmt(c[1])}  C[8] {_fmt(c[8])}" if err else ""))


# text substitutions on the generated FP8 module (templates_hopper): each names one hypothesis about the full kernel
_ONES_LOCAL = """    lrow_l: gl.constexpr = gl.SliceLayout(1, l_layout)
    if LSUM:    # probe: each consumer stores and fences its own ones tile
        ones_reg_c: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [2, 2], [1, 0])
        ones_l_c: gl.constexpr = gl.NVMMASharedLayout.get_default_for([8, BLOCK_N], dtype)
        ones_smem = gl.allocate_shared_memory(dtype, [8, BLOCK_N], ones_l_c,
                                              gl.full([8, BLOCK_N], 1.0, gl.float16, ones_reg_c).to(dtype))
        fence_async_shared()
"""
VARIANTS = {
    "as generated": [],
    # lse := sum of the ones tile read back from shared memory after the loop (1024 if intact)
    "ones tile sum (expect lse=1024)": [("    out = acc * gl.expand_dims(",
                                         "    lse = gl.zeros_like(lse) + gl.sum(gl.sum(ones_smem.load(gl.BlockedLayout("
                                         "[1, 8], [4, 8], [4, 1], [1, 0])).to(gl.float32), 1), 0)\n"
                                         "    out = acc * gl.expand_dims(")],
    "min column instead of max": [("gl.max(l_acc, 1)", "gl.min(l_acc, 1)")],
    "column 0 only": [("gl.max(l_acc, 1)", "gl.sum(gl.where(gl.expand_dims(gl.arange(0, 8, gl.SliceLayout(0, "
                                            "l_layout)), 0) == 0, l_acc, 0.0), 1)")],
    # P·1 issued synchronously (its own wait): nothing of it in flight with PV / S
    "P.1 synchronous": [("zero_l, use_acc=False, is_async=True)", "zero_l, use_acc=False, is_async=False)"),
                        ("acc, l_tile = warpgroup_mma_wait(0, deps=(o_tok, l_tok))",
                         "acc = warpgroup_mma_wait(0, deps=(o_tok,)); l_tile = l_tok")],
    "ones stored in each consumer": [("    lrow_l: gl.constexpr = gl.SliceLayout(1, l_layout)\n", _ONES_LOCAL)],
}


def _variant(kernel, name, subs):
    import importlib.util
    import tempfile
    src = open(sys.modules[kernel.fn.__module__].__file__).read()
    for old, new in subs:
        assert old in src, (name, old)
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(prefix="lsum_variant_"), "variant.py")
    with open(path, "w") as f:
        f.write(src)
    mspec = importlib.util.spec_from_file_location(f"lsum_variant_{abs(hash(name))}", path)
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[mspec.name] = mod
    mspec.loader.exec_module(mod)
    return mod.attn_fwd_ws


def run_forward(cross=False):
    """The real forward (the lead's measurement): q = 0 so every p = 256, V = 1 -> out = 1 and lse = ln Sk; an l
    wrong by a factor f gives out = 1/f and lse = ln Sk + ln f."""
    print("== real FP8 forward (kernel text variants), q = 0, V = 1: expect factor 1, lse - ln Sk = 0 ==")
    import math

    from fa3_inductor.kernels import hopper
    from fa3_inductor.kernels.fp8_recipe import Fp8Recipe
    from fa3_inductor.kernels.program import ScoreProgram
    prog = ScoreProgram(("mul", ("score",), ("const", 128 ** -0.5)))
    dev = "cpu" if cross else "cuda"
    for sk in ((1024,) if cross else (128, 1024)):
        q = torch.zeros(1, 2, 256, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 2, sk, 128, device=dev, dtype=torch.bfloat16)
        v = torch.ones(1, 2, sk, 128, device=dev, dtype=torch.bfloat16)
        q8, k8, v8 = hopper.quantize_fp8(q, k, v, Fp8Recipe("block", False, 0), None, 0) if not cross else \
            _cpu_operands(q, k, v)
        for name, subs in VARIANTS.items():
            for knobs in (dict(pingpong=False, tree=True, lsum=True),
                          dict(pingpong=True, emu=2, tree=True, late=True, lsum=True)):
                out = torch.full((1, 2, 256, 128), float("nan"), device=dev, dtype=torch.bfloat16)
                lse = torch.full((1, 2, 256), float("nan"), device=dev)
                try:
                    kernel, grid, args, kwargs = hopper.fp8_launch_args(q8, k8, v8, [], prog, out, lse, **knobs)
                    kern = _variant(kernel, name, subs)
                    if cross:
                        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
                        from sm90_cross_compile import compile_sm90
                        compile_sm90(kern, *args, **kwargs)
                        print(f"  compiled: {name} {knobs}")
                        continue
                    kern[grid](*args, **kwargs)
                    torch.cuda.synchronize()
                except Exception as e:
                    print(f"  Sk={sk:5} {name:32} {knobs}: ERROR {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                    continue
                # out is in units of the last V scale over l: q = 0, V = 1 gives 1 / f with the block recipe
                o = out.float().mean().item()
                print(f"  Sk={sk:5} {name:32} pp={knobs['pingpong']!s:5}: factor {1 / o:.5g}  "
                      f"lse - ln Sk {lse.mean().item() - math.log(sk):.5g}  (lse min/max {lse.min().item():.5g}/"
                      f"{lse.max().item():.5g})")


def _cpu_operands(q, k, v):
    """FP8 operands shaped as quantize_fp8 makes them, for the cross-compile (no GPU): only dtypes and shapes count."""
    from fa3_inductor.kernels.fp8_quant import Fp8Operand
    from fa3_inductor.kernels.templates_hopper import fp8_quant_blocks
    b, h, s, d = q.shape
    sk = k.shape[2]
    qb, kb = fp8_quant_blocks(128)
    return (Fp8Operand(q.to(torch.float8_e4m3fn), torch.ones(b, h, -(-s // qb)), qb, False, False, False, s),
            Fp8Operand(k.to(torch.float8_e4m3fn), torch.ones(b, h, -(-sk // kb)), kb, False, False, False, sk),
            Fp8Operand(v.transpose(-1, -2).contiguous().to(torch.float8_e4m3fn), torch.ones(b, h, -(-sk // kb)), kb,
                       True, False, True, sk))


if __name__ == "__main__":
    if "--cross" in sys.argv:
        for dtype in (torch.float8_e4m3fn, torch.float16):
            for W in (8, 16, 32, 64):
                for name, a_src, b_src, pv, ws in CASES:
                    if a_src == 3 and dtype != torch.float8_e4m3fn:
                        continue
                    comp = _launch(dtype, W, a_src, b_src, pv, ws, "ints", dev="cpu", cross=True)
                    print(f"compiled {str(dtype)[6:]} W={W} {name}: {len(comp.asm['cubin'])} bytes cubin")
        run_forward(cross=True)
    else:
        run_probes()
        run_forward()
