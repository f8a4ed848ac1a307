"""Launch side of the Hopper warp-specialized forward (templates_hopper.py) for the dispatch table.

sm_90 only (wgmma, TMA, setmaxnreg). Same ScoreProgram semantics as the portable kernel, whose backward
consumes this kernel's (out, lse) unchanged. Head dims 64/96/128/192/256, fp16/bf16, q/k/v with a unit last
stride and 16-byte aligned strides (TMA's rules); anything else falls back with the reason in explain.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

from . import codegen, launcher, mask_tiles, triton_portable, uniform_fill
from .program import ScoreProgram

HEAD_DIMS = (64, 96, 128, 192, 256)
BLOCK_M = 64                      # rows per consumer warpgroup (wgmma M); a CTA owns 2 x BLOCK_M rows
SMEM_LIMIT = 232448 - 1024        # bytes per block on the H100, less room for barriers


def _ints(*xs) -> bool:
    return all(type(x) is int for x in xs)


def _tile_dim(d: int) -> int:
    """TMA boxes are powers of two: head dims 96 / 192 run in 128 / 256 tiles whose extra columns TMA
    zero-fills on load (and clips on store)."""
    return 1 << (d - 1).bit_length()


def config(d: int, dv: int, dtype_bytes: int = 2, block_n: int | None = None, block_n2: int = 0) -> tuple[int, int]:
    # FP8 (dtype_bytes=1): the output tile (16-bit) cannot alias Q, so it is counted separately
    """(BLOCK_N, STAGES): 128-key tiles up to head dim 128, else 64 (or block_n); as many K/V stages as fit
    (2..4; block_n2: the second part of key-split blocks, in the same stages)."""
    d, dv = _tile_dim(d), _tile_dim(dv)
    block_n = block_n or (128 if max(d, dv) <= 128 else 64)
    fixed = 2 * BLOCK_M * d * dtype_bytes + (0 if d == dv and dtype_bytes == 2 else 2 * BLOCK_M * dv * 2)
    per_stage = (block_n + block_n2) * (d + dv) * dtype_bytes
    stages = min(4, (SMEM_LIMIT - fixed) // per_stage)
    return block_n, stages


def separate_o(d: int, dv: int, block_n: int, stages: int) -> bool:
    """Whether a 16-bit persistent CTA gets an O buffer of its own (its next tile's Q then loads while this tile's O
    is stored) rather than storing O through Q's buffer: where Q, O and the K/V ring fit the shared memory (head
    dims 64 at 4 stages, 128 at 2; not 256)."""
    d, dv = _tile_dim(d), _tile_dim(dv)
    if d != dv:
        return True         # no aliasing possible: O has its own buffer anyway
    return 2 * BLOCK_M * (d + dv) * 2 + stages * block_n * (d + dv) * 2 <= SMEM_LIMIT


_SMS: dict = {}
_SMS_OFF_GPU = 132      # the H100's count, for launch arguments built off the GPU (cross-compile tests)


def sm_count(device) -> int:
    """Multiprocessors of `device` (cached: the persistent grid is computed on every launch)."""
    if device.type != "cuda":
        return _SMS_OFF_GPU
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SMS.get(idx)
    if n is None:
        n = _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def persistent_grid(device, b: int, hq: int, sq: int) -> tuple[int, int, int]:
    """One CTA per SM, or per work tile (2 x BLOCK_M query rows of one (batch, head)) where there are fewer."""
    return (max(1, min(sm_count(device), triton_portable.triton_cdiv(sq, 2 * BLOCK_M) * hq * b)), 1, 1)


def _capability(device) -> tuple[int, int] | None:
    try:
        return torch.cuda.get_device_capability(device)
    except Exception:
        return None


def _tma_ok(name: str, t) -> str | None:
    if not _ints(*t.shape, *t.stride()):
        return None                     # symbolic at compile time; decided again at run time
    if t.stride(-1) != 1:
        return f"{name} has a non-unit last stride (TMA needs a contiguous head dim)"
    for size, st in zip(t.shape[:-1], t.stride()[:-1]):
        if size > 1 and (st * t.element_size()) % 16 != 0:
            return f"{name} strides are not multiples of 16 bytes (TMA)"
    # fake tensors (compile time) have no storage: alignment is decided again at run time
    if t.device.type == "cuda" and not isinstance(t, FakeTensor) and t.data_ptr() % 16 != 0:
        return f"{name} is not 16-byte aligned (TMA)"
    return None


def _not_sm90(device) -> str | None:
    """Why the device cannot run the sm_90 kernels (wgmma, TMA, setmaxnreg), or None."""
    if device.type != "cuda":
        return f"needs an sm_90 GPU (device is {device.type})"
    cap = _capability(device)
    if cap is None or cap[0] != 9:
        return f"needs an sm_90 GPU (wgmma, TMA); this one is sm_{cap[0]}{cap[1]}" if cap else "no CUDA device"
    return None


def supports(prog: ScoreProgram, q, k, v, operands) -> str | None:
    reason = triton_portable.supports(prog, q, k, v, operands) or _not_sm90(q.device)
    if reason:
        return reason
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (the Hopper kernel runs fp16/bf16)"
    d, dv = q.shape[-1], v.shape[-1]
    if d not in HEAD_DIMS or dv not in HEAD_DIMS:
        return f"head dims ({d}, {dv}) not in {HEAD_DIMS}"
    _, stages = config(d, dv)
    if stages < 2:
        return f"head dims ({d}, {dv}) leave shared memory for fewer than 2 K/V stages"
    for name, t in (("q", q), ("k", k), ("v", v)):
        r = _tma_ok(name, t)
        if r:
            return r
    return None


@functools.lru_cache(maxsize=256)
def _smem_layout(block: tuple, dtype: torch.dtype):
    from triton.experimental.gluon import language as gl
    gdt = {torch.float8_e4m3fn: gl.float8e4nv, torch.float16: gl.float16, torch.bfloat16: gl.bfloat16,
           torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for(list(block), gdt)


def _desc(t, rows: int, cols: int | None = None):
    """Rank-4 TMA descriptor of t with a (1, 1, rows, cols) box (cols: the head dim padded to a power of two)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    block = (1, 1, rows, cols or _tile_dim(t.shape[-1]))
    # dims of size 1 never advance; give them a legal (16-byte multiple) stride
    strides = list(t.stride())
    for i in range(3):
        if t.shape[i] == 1:
            strides[i] = max(t.shape[3], 16)
    return TensorDescriptor(t, list(t.shape), strides, list(block), _smem_layout(block, t.dtype))


_SPECS: dict = {}


def _spec_and_module(prog, q, k, v, operands, flavor: str = "hopper"):
    """(spec key, generated module of `flavor`: the forward "hopper" or the backward "hopper_bwd"), memoised on
    cheap facts so that a launch costs a dict lookup."""
    fast = (flavor, prog, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] // k.shape[1],
            tuple((t.dtype, tuple(s == 1 for s in t.shape)) for t in operands))
    hit = _SPECS.get(fast)
    if hit is None:
        spec = codegen.make_spec(prog, q, k, v, operands, False)
        hit = _SPECS[fast] = (spec.key(), codegen.load(spec, flavor))
    return hit


def _tile_lists(q, k, operands, prog: ScoreProgram, block_n: int):
    """(mask operand index, TileLists) of the mask pre-pass (mask_tiles.py) for this call's layout, or None when
    the kernel walks no tile lists."""
    from .templates_hopper import tile_plan
    plan = tile_plan(prog, ["bool" if t.dtype == torch.bool else "float" for t in operands]) if operands else None
    if plan is None:
        return None
    n, kind = plan
    b, hq, sq, _ = q.shape
    return n, mask_tiles.TileLists(operands[n], kind, (b, hq, sq, k.shape[2]), 2 * BLOCK_M, block_n)


def _tile_ints(lists: mask_tiles.TileLists) -> tuple:
    """The integer kernel arguments after (idx, cls, cnt) as tile_args derives them from the lists: strides of the
    (contiguous) lists, 0 where broadcast; a plan's copy (tests/test_hopper_plan.py checks they agree)."""
    bm, hm, mb, nb = lists.shape
    return (0 if bm == 1 else hm * mb * nb, 0 if hm == 1 else mb * nb, nb, 0 if bm == 1 else hm * mb,
            0 if hm == 1 else mb)


def tile_args(q, k, operands, prog: ScoreProgram, block_n: int) -> list:
    """Kernel arguments of the mask pre-pass's tile lists (mask_tiles.py), [] when the kernel has none."""
    found = _tile_lists(q, k, operands, prog, block_n)
    if found is None:
        return []
    n, lists = found
    idx, cls, cnt = lists(operands[n])
    bc_b, bc_h = idx.shape[0] == 1, idx.shape[1] == 1
    return [idx, cls, cnt, 0 if bc_b else idx.stride(0), 0 if bc_h else idx.stride(1), idx.stride(2),
            0 if bc_b else cnt.stride(0), 0 if bc_h else cnt.stride(1)]


def launch_args(q, k, v, operands, prog: ScoreProgram, out, lse, pingpong: bool = True, block_n=None,
                stages=None, tiles=None, persistent: bool = False, block_n2: int = 0, prefetch: bool = False,
                overlap: bool = True):
    """(kernel, grid, args, kwargs) of one launch; also used by tests to compile and read the PTX.
    tiles: tile_args(...) computed once per call (recomputed when None). persistent: one CTA per SM walking the
    (query block, head, batch) work tiles (templates_hopper's PERSISTENT), with its own O buffer where it fits.
    block_n2: key-split blocks of block_n + block_n2 keys (templates_hopper's BLOCK_N2; not with tile lists).
    prefetch: score operands loaded at the top of each key block, ahead of its K wait and S product
    (templates_hopper's PREFETCH; only where the program has operands). overlap=False: P·V waited before the
    softmax (templates_hopper's OVERLAP), so P's registers are free while S is live."""
    b, hq, sq, d = q.shape
    sk, dv = k.shape[2], v.shape[-1]
    bn, st = config(d, dv, 2, block_n, block_n2)
    st = stages or st
    full = (b, hq, sq, sk)
    op_args = []
    for t in operands:
        op_args += [t] + [int(s) for s in t.expand(*full).stride()]
    if tiles is None:
        tiles = tile_args(q, k, operands, prog, bn)
    if block_n2 and tiles:
        raise ValueError("key-split blocks (block_n2) do not walk the mask pre-pass's tile lists")
    coff = 0 if prog.causal != "bottom_right" else sk - sq
    mod = _spec_and_module(prog, q, k, v, operands)[1]
    if persistent:
        grid = persistent_grid(q.device, b, hq, sq)
    else:
        grid = (triton_portable.triton_cdiv(sq, 2 * BLOCK_M), hq, b)
    kd, vd = _desc(k, bn), _desc(v, bn)
    # the second part's boxes; without key-split blocks the kernel never reads these arguments
    k2d, v2d = (_desc(k, block_n2), _desc(v, block_n2)) if block_n2 else (kd, vd)
    args = (_desc(q, BLOCK_M), kd, vd, _desc(out, BLOCK_M), k2d, v2d, lse, *op_args, *tiles,
            *lse.stride(), sq, sk, coff, b, hq)
    kwargs = dict(BLOCK_M=BLOCK_M, BLOCK_N=bn, STAGES=st, PINGPONG=pingpong, num_warps=4)
    if persistent:      # (absent otherwise: the default kernel's compile key stays what it was)
        kwargs.update(PERSISTENT=True, SEP_O=separate_o(d, dv, bn + block_n2, st))
    if block_n2:
        kwargs["BLOCK_N2"] = block_n2
    if prefetch and operands:
        kwargs["PREFETCH"] = True
    if not overlap:
        kwargs["OVERLAP"] = False
    return mod.attn_fwd_ws, grid, args, kwargs


class Schedule(NamedTuple):
    """One tuner candidate of the 16-bit forward: launch_args's schedule keywords."""
    pingpong: bool
    stages: int
    persistent: bool = False
    block_n2: int = 0       # key-split blocks: BLOCK_N + block_n2 keys per key block
    prefetch: bool = False  # score operands loaded ahead of each key block's S product
    overlap: bool = True    # False: P·V waited before the softmax (P's registers free while S is live)


# The persistent schedule (templates_hopper PERSISTENT) joins the tuner's candidates for non-causal programs
# (FA3_HOPPER_PERSISTENT=0 turns it off). H100, bench/results/fwd_persist.md: non-causal it wins where per-CTA
# prologue / epilogue and the last wave matter (D=64 S=1k 1.16x, D=128 S=1k 1.11x, D=256 S=16k 1.07x) and ties
# elsewhere (0.93-1.04); causal it loses at every point (0.64-0.99x: the static heavy-first order balances worse
# than the hardware's block scheduler), so causal programs do not spend tuning time on it.
TUNE_PERSISTENT = os.environ.get("FA3_HOPPER_PERSISTENT", "1") == "1"


def schedules(d: int, dv: int, persistent: bool | None = None, causal: bool = False) -> list[Schedule]:
    """Candidates, the measured default first (bench/NOTES.md): at head dim 256 only two stages fit and ping-pong
    costs more than it hides; below, both help depending on length and causality. persistent (default
    TUNE_PERSISTENT and not causal): the same schedules on persistent CTAs follow."""
    _, most = config(d, dv)
    if max(d, dv) > 128:
        base = [(False, 2), (True, 2)]
    else:
        base = [(True, 2), (True, min(3, most)), (False, 2)]
    cands = [Schedule(pp, st) for pp, st in base]
    if (TUNE_PERSISTENT and not causal) if persistent is None else persistent:
        cands += [Schedule(pp, st, True) for pp, st in base]
    return cands


# The portable forward (triton_portable.forward_into: the same (out, lse), which the backward reads alike) is the
# 16-bit tuner's last candidate at head dims up to 64: H100, bench/results/kernels.md at 33879c6, D=64 S=1k causal
# it ran 291 TFLOPS to the warp-specialized kernel's 261 (the other D=64 points: 0.89-0.92x of it); at D >= 96 the
# warp-specialized forward led every grid point by 26-50%, so those sites spend no tuning time on it. A call key
# settled on it plans the portable call.
PORTABLE = "portable"
PORTABLE_MAX_D = 64


# Key-split blocks (templates_hopper BLOCK_N2: 128 + 32 keys per key block at head dim 128, two S and two PV
# products per block, one row max and rescale; toward FA3's 176-key tiles, which Gluon's power-of-two tensors
# cannot hold in one accumulator). Cross-compiled for sm_90a (bench/fp8_sass.py): 128 + 32 has no spill and the
# static softmax model gives ~1% fewer cycles per key (the per-block waits and ping-pong turns it amortises are
# not in that model); 128 + 64 spills (21 local ops per block). Not yet timed on the H100, so the tuner tries it
# only with FA3_HOPPER_KSPLIT=1 (bench/fwd_schedules.py times it pinned).
TUNE_KSPLIT = os.environ.get("FA3_HOPPER_KSPLIT", "0") == "1"
KSPLIT_N2 = 32

# Schedules for programs with score operands (biases, masks), cross-compiled for sm_90a
# (tests/test_hopper_prefetch_sm90.py, bench/NOTES.md session 8); not yet timed on the H100, so the tuner tries them only with
# FA3_HOPPER_OPERAND_SCHEDULES=1:
# - operand prefetch (templates_hopper PREFETCH: a key block's operands loaded at the top of the block, ahead of its
#   K wait and S product, so that their latency runs under the GEMMs). The plain kernel issues a block's operand
#   loads (32 per thread for T5's dense bias at D=64) only once S is done, so every block waits a global-load
#   latency (~2-4x the 512-cycle D=64 GEMM) ahead of its softmax (T5-sdpa, H100: 329 us per call vs Inductor's
#   174). Prefetched, the loop holds the values across the GEMMs: 13-14 spilled operations per block with a dense
#   operand at D=64 (0 plain), none with a key-padding mask at any head dim, 440+ with a dense one at D >= 128, and
#   428 with two operands: one operand, dense only at head dims <= 64.
# - P·V waited before the softmax (OVERLAP=False): with a dense operand at head dim 128 the plain kernel spills 184
#   operations per block (a dense bool mask with causal diagonals: 112-118), without the overlap none.
TUNE_OPERAND_SCHEDULES = os.environ.get("FA3_HOPPER_OPERAND_SCHEDULES", "0") == "1"
PREFETCH_DENSE_MAX_D = 64


def candidates(d: int, dv: int, causal: bool, tiles: bool = False, operands: int = 0, dense: bool = False) -> list:
    """The forward tuner's list: schedules(), key-split blocks where switched on (head dim 128, no tile lists:
    those are per 128-key block), the operand schedules where switched on (operands: the program's score operand
    count; dense: one of them varies over both queries and keys), then PORTABLE where it may win."""
    base = schedules(d, dv, causal=causal)
    cands = list(base)
    if TUNE_KSPLIT and not tiles and _tile_dim(max(d, dv)) == 128:
        cands += [Schedule(pp, 2, block_n2=KSPLIT_N2) for pp in (True, False)]
    if TUNE_OPERAND_SCHEDULES and operands == 1 and (max(d, dv) <= PREFETCH_DENSE_MAX_D or not dense):
        cands += [c._replace(prefetch=True) for c in base]
    if TUNE_OPERAND_SCHEDULES and dense and max(d, dv) > PREFETCH_DENSE_MAX_D:
        cands += [c._replace(overlap=False) for c in base]
    return cands + ([PORTABLE] if max(d, dv) <= PORTABLE_MAX_D else [])


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a call key pins of one launch (the tuned schedule, grid, constexprs and every integer argument), so
    that a call only rebases the four TMA descriptors on its tensors and starts the compiled kernel; likewise
    the mask pre-pass (its tile lists are data: computed per call) and the empty-row fill around it."""
    site: launcher.Site
    kernel: object
    out_shape: tuple      # (B, Hq, Sq, Dv); lse is its first three
    grid: tuple
    kwargs: dict
    descs: tuple          # validated descriptors of the first call (q, k, v, out[, k2, v2 with key-split blocks])
    op_strides: tuple     # per operand: its strides expanded to (B, Hq, Sq, Sk)
    tiles: tuple | None   # (mask operand index, mask_tiles.TileLists, the lists' integer arguments)
    fill: object          # uniform_fill.UniformFill for empty_row="uniform", else None
    tail: tuple           # lse strides, Sq, Sk, causal offset, B, Hq


_PLANS: dict = {}


def _rebase(desc, t):
    """desc on tensor t, which the plan key guarantees has desc's shape, strides, dtype and alignment."""
    new = object.__new__(type(desc))
    new.__dict__.update(desc.__dict__)
    new.base = t
    return new


def _make_plan(key, q, k, v, operands, prog, out, lse, cfg, tiles) -> _Plan:
    kernel, grid, args, kwargs = launch_args(q, k, v, operands, prog, out, lse, tiles=tiles, **cfg._asdict())
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    op_strides = tuple(tuple(int(x) for x in t.expand(*full).stride()) for t in operands)
    # the templates must not keep this call's tensors alive (memory; CUDA graph pools check for such leaks)
    # (without key-split blocks the second-part arguments are the K / V descriptors themselves)
    descs = tuple(_rebase(d, None) for d in args[:6 if kwargs.get("BLOCK_N2") else 4])
    found = _tile_lists(q, k, operands, prog, kwargs["BLOCK_N"])
    pre = None if found is None else (found[0], found[1], _tile_ints(found[1]))
    fill = uniform_fill.UniformFill(out, lse, v) if prog.empty_row == "uniform" else None
    return _Plan(launcher.Site(key), kernel, tuple(out.shape), grid, kwargs, descs, op_strides, pre, fill,
                 args[-8:])


def _launch_planned(plan: _Plan, q, k, v, operands):
    dev = q.device
    out = triton_portable.empty_out(*plan.out_shape, v.dtype, dev)
    lse = triton_portable._empty(plan.out_shape[:3], torch.float32, dev)
    op_args = []
    for t, st in zip(operands, plan.op_strides):
        op_args.append(t)
        op_args += st
    if plan.tiles is not None:
        n, lists, ints = plan.tiles
        op_args += [*lists(operands[n]), *ints]
    dq, dk, dv, do = plan.descs[:4]
    kd, vd = _rebase(dk, k), _rebase(dv, v)
    k2d, v2d = (_rebase(plan.descs[4], k), _rebase(plan.descs[5], v)) if len(plan.descs) == 6 else (kd, vd)
    args = (_rebase(dq, q), kd, vd, _rebase(do, out), k2d, v2d, lse, *op_args, *plan.tail)
    plan.site(plan.kernel, plan.grid, args, plan.kwargs)
    if plan.fill is not None:
        plan.fill(out, lse, v)
    return out, lse


def forward(q, k, v, operands, prog: ScoreProgram, **variant):
    """Returns (out (B, Hq, Sq, Dv) in v.dtype, lse fp32 (B, Hq, Sq)). `variant` (pingpong, block_n, stages,
    persistent) pins a schedule (benchmarks, tests); otherwise the tuner picks one per (spec, length bucket), and once it
    has, the call's plan (keyed by its shapes, strides, dtypes, alignments) makes later calls cheap on the host."""
    if not variant:     # a plan exists only for shapes that passed the checks below
        key = ("hopper", prog, q.device.index, launcher.call_key((q, k, v, *operands)))
        plan = _PLANS.get(key)
        if plan is PORTABLE:
            return triton_portable.forward(q, k, v, operands, prog)
        if plan is not None:
            return _launch_planned(plan, q, k, v, operands)
    b, hq, sq, _ = q.shape
    dv = v.shape[-1]
    out = triton_portable.empty_out(b, hq, sq, dv, v.dtype, q.device)
    lse = triton_portable._empty((b, hq, sq), torch.float32, q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    if k.shape[2] == 0:
        return triton_portable.forward(q, k, v, operands, prog)
    if variant:
        kernel, grid, args, kwargs = launch_args(q, k, v, operands, prog, out, lse, **variant)
        kernel[grid](*args, **kwargs)
        return _filled(out, lse, v, prog)
    d, dv = q.shape[-1], v.shape[-1]
    tiles = tile_args(q, k, operands, prog, config(d, dv)[0])

    def launch(cfg):
        if cfg == PORTABLE:
            triton_portable.forward_into(q, k, v, operands, prog, out, lse)
            return
        kernel, grid, args, kwargs = launch_args(q, k, v, operands, prog, out, lse, tiles=tiles, **cfg._asdict())
        kernel[grid](*args, **kwargs)

    tkey = (_spec_and_module(prog, q, k, v, operands)[0], triton_portable._bucket(sq),
            triton_portable._bucket(k.shape[2]))
    cfg = triton_portable._launch_tuned("hopper_fwd", tkey, d, q.dtype, q.device, launch,
                                         candidates(d, dv, prog.causal != "none", tiles=bool(tiles),
                                                    operands=len(operands),
                                                    dense=any(t.shape[2] > 1 and t.shape[3] > 1 for t in operands)))
    if cfg is not None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        _PLANS[key] = PORTABLE if cfg == PORTABLE else _make_plan(key, q, k, v, operands, prog, out, lse, cfg,
                                                                   tiles)
    return _filled(out, lse, v, prog)


def _filled(out, lse, v, prog: ScoreProgram):
    """empty_row="uniform": the kernel leaves rows with no visible key at 0; they take the mean of v (one launch,
    in place: kernels/uniform_fill.py, imported through triton_portable)."""
    if prog.empty_row == "uniform":
        out = triton_portable.uniform_fill(out, lse, v)
    return out, lse


def backward(dout, q, k, v, operands, out, lse, prog: ScoreProgram):
    """The warp-specialized backward (hopper_bwd.py), or the portable one where that declines; both read the
    (out, lse) this forward writes exactly as the portable forward does."""
    from . import hopper_bwd
    return hopper_bwd.backward(dout, q, k, v, operands, out, lse, prog)


# --- FP8 (e4m3) variant: the same schedule on FP8 wgmma, inputs from the fused quantize pass ---------------

def fp8_config(d: int, dv: int, block_n: int | None = None, n_operands: int = 0) -> tuple[int, int]:
    """(BLOCK_N, most STAGES) of the FP8 kernel: 128-key tiles (e4m3 K/V tiles are half the bytes), also at
    head dim 256 — FA3's FP8 tile there: without ping-pong it fits 240 registers with no spill and takes 27%
    fewer instructions per key than 64-key tiles — except with mask / bias operands, whose loads spill it
    (64 keys then). Cross-compiled for sm_90a (bench/fp8_sass.py); 256-key tiles at head dim 128 spill;
    bench/fp8_variants.py times the alternatives."""
    if block_n is None:
        block_n = 64 if max(d, dv) > 128 and n_operands else 128
    return config(d, dv, 1, block_n)


class Fp8Schedule(NamedTuple):
    """One FP8 tuner candidate: fp8_launch_args's schedule keywords (softmax knobs: templates_hopper)."""
    pingpong: bool
    stages: int
    emu: int = 0            # exp2 per 8 scores on the FMA pipe (kernels/fp8_exp2.py)
    tree: bool = False      # row max as a reduction tree
    late: bool = False      # O rescale and P conversion under S's GEMM
    lsum: bool = False      # row sum of e4m3 P on the tensor core
    mid: bool = False       # PV waited after the row max (O's rescale among the exps)
    join: bool = False      # exp2 after the masked / unmasked branches join
    persistent: bool = False    # one CTA per SM walking the work tiles


# Head dims <= 128: the softmax, not the GEMMs, bounds a key tile (64 exp2 per thread against a 512-cycle GEMM).
# Of the lighter softmaxes bench/fp8_variants.py times (Fp8Schedule's knobs), the H100 measured (D=128 S=16k,
# bench/results/fp8_variants.md, 128-key tiles): tree lsum join 965 TFLOPS, tree lsum 939, tree 853, the
# default 812; emu / late / mid slower. lsum was wrong until its ones tile was written as bytes (templates_hopper);
# its RMSE now equals the default's. Persistent CTAs add ~4% at D=128 non-causal (971 vs 932 in one run) and lose
# at D=256 (1190 vs 1255); D=256 S=16k: tree lsum join 1255 vs 1175 without the knobs.
_FP8_TREE = dict(tree=True)
_FP8_LIGHT = dict(tree=True, lsum=True, join=True)


def fp8_schedules(d: int, dv: int, block_n: int | None = None, n_operands: int = 0,
                  causal: bool = False) -> list[Fp8Schedule]:
    """Candidates of the FP8 tuner, the expected best first: the deepest ring that fits; with 128-key tiles the
    measured best (no ping-pong, row max as a tree, row sum on the tensor core, exp2 after the join), on
    persistent CTAs too below head dim 256 for non-causal programs; ping-pong below head dim 256 (at 256 the
    16-bit kernel measured it ~5% slower, and with 128-key FP8 tiles it spills)."""
    bn, most = fp8_config(d, dv, block_n, n_operands)
    first = [(False, most), (True, most)] if max(d, dv) > 128 else [(True, most), (True, 2), (False, most)]
    cands = [Fp8Schedule(pp, st) for pp, st in first + [(False, 2)]]
    if max(d, dv) <= 128:
        cands = [Fp8Schedule(False, most, **_FP8_TREE)] + cands
    if bn == 128:       # lsum's ones tile is measured at 128 keys (the 64-key tiles of masked D=256 are not)
        light = Fp8Schedule(False, most, **_FP8_LIGHT)
        pers = [light._replace(persistent=True)] if TUNE_PERSISTENT and max(d, dv) <= 128 and not causal else []
        cands = [light] + pers + cands
    return list(dict.fromkeys(cands))


def supports_fp8(prog: ScoreProgram, q, k, v, operands, recipe) -> str | None:
    from . import fp8_portable
    from .fp8_recipe import hadamard_dim
    reason = fp8_portable.supports(prog, q, k, v, operands, recipe) or _not_sm90(q.device)
    if reason:
        return reason
    d = hadamard_dim(q.shape[-1]) if recipe.hadamard else q.shape[-1]
    dv = v.shape[-1]
    if d not in HEAD_DIMS or dv not in HEAD_DIMS or _tile_dim(d) != d or _tile_dim(dv) != dv:
        return f"FP8 head dims ({d}, {dv}) not powers of two in {HEAD_DIMS}"
    from .templates_hopper import FP8_QUANT_BLOCKS
    if FP8_QUANT_BLOCKS[0] != 2 * BLOCK_M:
        return "FP8 quantization blocks do not match the kernel's tiles"
    return None


def quantize_fp8(q, k, v, recipe, block_n: int | None = None, n_operands: int = 0):
    """(q8, k8, v8) as the FP8 kernel with key tiles of block_n (default fp8_config's) takes them: Q per CTA
    (2 x BLOCK_M rows), K / V per templates_hopper.fp8_quant_blocks, V transposed in wgmma_key_order."""
    from . import fp8_quant
    from .fp8_recipe import hadamard_dim
    from .templates_hopper import fp8_quant_blocks
    d = hadamard_dim(q.shape[-1]) if recipe.hadamard else q.shape[-1]
    bn = fp8_config(d, v.shape[-1], block_n, n_operands)[0]
    return fp8_quant.quantize_qkv(q, k, v, recipe, *fp8_quant_blocks(bn), v_transposed=True, v_wgmma_keys=True)


def fp8_launch_args(q8, k8, v8, operands, prog: ScoreProgram, out, lse, pingpong=None, stages=None, block_n=None,
                    overlap=True, tiles=None, emu=0, tree=False, late=False,
                    lsum=False, mid=False, join=False, persistent=False):
    """Launch of the FP8 kernel on quantized operands (kernels/fp8_quant.Fp8Operand, as quantize_fp8 makes
    them: V transposed with its keys in wgmma_key_order, the order in which the kernel's P operand holds them).
    pingpong / stages default to the first of fp8_schedules; tiles: tile_args(...) (computed when None).
    Softmax knobs (templates_hopper): emu, exp2 per 8 scores on the FMA pipe (kernels/fp8_exp2.py); tree, row
    max / sum as reduction trees; late, O's rescale and P's conversion between the S and the PV issue; lsum, the
    row sum of e4m3 P on the tensor core (P times a ones tile) instead of 64 FADDs per thread and tile; mid, PV
    waited right after the row max, so O's rescale (unless late) issues among the exps; join, the exp2 after the
    masked / unmasked branches join (one copy, where ptxas interleaves it with the row sum and may hoist the PV
    wait above it); persistent, one CTA per SM walking the work tiles (as launch_args; O has its own buffer)."""
    from .templates_hopper import fp8_quant_blocks
    qd, kd, vt = q8.data, k8.data, v8.data
    b, hq, sq, d = qd.shape
    sk, dv = kd.shape[2], vt.shape[2]
    bn, _ = fp8_config(d, dv, block_n, len(operands))
    pp0, st0 = fp8_schedules(d, dv, bn, len(operands))[0][:2]
    st = stages or st0
    pingpong = pp0 if pingpong is None else pingpong
    if not (v8.transposed and v8.wgmma_keys):
        raise ValueError("the Hopper FP8 kernel takes V quantized with transposed=True, wgmma_keys=True")
    if (q8.block, k8.block, v8.block) != (fp8_quant_blocks(bn)[0],) + (fp8_quant_blocks(bn)[1],) * 2:
        raise ValueError(f"FP8 scale blocks {(q8.block, k8.block, v8.block)} do not match {bn}-key tiles "
                         "(quantize with hopper.quantize_fp8)")
    full = (b, hq, sq, sk)
    op_args = []
    for t in operands:
        op_args += [t] + [int(x) for x in t.expand(*full).stride()]
    if tiles is None:
        tiles = tile_args(qd, kd, operands, prog, bn)
    coff = 0 if prog.causal != "bottom_right" else sk - sq
    mod = _spec_and_module(prog, qd, kd, vt.transpose(-1, -2), operands)[1]
    grid = persistent_grid(qd.device, b, hq, sq) if persistent else (triton_portable.triton_cdiv(sq, 2 * BLOCK_M), hq, b)
    scales = []
    for s in (q8.scale, k8.scale, v8.scale):
        scales += [s.stride(0) if s.shape[0] > 1 else 0, s.stride(1) if s.shape[1] > 1 else 0]
    kdesc, vdesc = _desc(kd, bn), _desc(vt, dv, bn)
    # (no key-split blocks in FP8: the second part's descriptors are placeholders the kernel never reads)
    args = (_desc(qd, BLOCK_M), kdesc, vdesc, _desc(out, BLOCK_M), kdesc, vdesc, lse, q8.scale, k8.scale,
            v8.scale, *scales, *op_args, *tiles, *lse.stride(), sq, sk, coff, b, hq)
    kwargs = dict(BLOCK_M=BLOCK_M, BLOCK_N=bn, STAGES=st, PINGPONG=pingpong, OVERLAP=overlap, EMU=emu, TREE=tree,
                  LATE=late, LSUM=lsum, MID=mid, JOIN=join, num_warps=4)
    if persistent:
        kwargs["PERSISTENT"] = True
    return mod.attn_fwd_ws, grid, args, kwargs


def forward_fp8(q, k, v, operands, prog: ScoreProgram, recipe, **variant):
    """FP8 forward: one quantize pass per operand, then the warp-specialized kernel on e4m3 wgmma. `variant`
    (pingpong, stages, block_n, overlap) pins a schedule; otherwise the tuner picks (pingpong, stages) among
    fp8_schedules per (spec, length bucket)."""
    b, hq, sq, _ = q.shape
    dv = v.shape[-1]
    if b * hq * sq * dv == 0 or k.shape[2] == 0:
        from . import fp8_portable
        return fp8_portable.forward(q, k, v, operands, prog, recipe)
    out = triton_portable.empty_out(b, hq, sq, dv, v.dtype, q.device)
    lse = triton_portable._empty((b, hq, sq), torch.float32, q.device)
    q8, k8, v8 = quantize_fp8(q, k, v, recipe, variant.get("block_n"), len(operands))
    if variant:
        kernel, grid, args, kwargs = fp8_launch_args(q8, k8, v8, operands, prog, out, lse, **variant)
        kernel[grid](*args, **kwargs)
        return _filled(out, lse, v, prog)

    def launch(cfg):
        kernel, grid, args, kwargs = fp8_launch_args(q8, k8, v8, operands, prog, out, lse, **cfg._asdict())
        kernel[grid](*args, **kwargs)

    d = q8.data.shape[-1]
    tkey = (_spec_and_module(prog, q8.data, k8.data, v8.data.transpose(-1, -2), operands)[0],
            triton_portable._bucket(sq), triton_portable._bucket(k.shape[2]))
    triton_portable._launch_tuned("hopper_fp8", tkey, d, q.dtype, q.device, launch,
                                  fp8_schedules(d, dv, n_operands=len(operands), causal=prog.causal != "none"))
    return _filled(out, lse, v, prog)
