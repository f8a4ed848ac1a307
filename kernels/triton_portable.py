"""Launch side of the portable Triton attention kernels: supports / forward / backward for the dispatch table.

Runs natively on CUDA and on CPU tensors under TRITON_INTERPRET=1. Kernel source comes from codegen.py
(one module per specialisation); block sizes and warps are launch-time choices picked by a small cached
autotuner on CUDA (never while a CUDA graph is being captured) and fixed small tiles in the interpreter.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from . import codegen, launcher
from .program import COMPARE, LEAVES, LOGICAL, ScoreProgram
from .uniform_fill import uniform_fill

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _empty(shape, dtype, device):
    """Every output buffer comes from here (tests replace it with a NaN-poisoning allocator)."""
    return torch.empty(shape, dtype=dtype, device=device)


def empty_out(b: int, hq: int, sq: int, dv: int, dtype, device):
    """The attention output (B, Hq, Sq, Dv) laid out (B, Sq, Hq, Dv) in memory, as SDPA lays out its own: models
    read it back as out.transpose(1, 2).contiguous() into the o-projection, which is then free (a copy of the
    whole output after a contiguous (B, Hq, Sq, Dv) one). The op (fa3_inductor/op.py) promises this layout."""
    return _empty((b, sq, hq, dv), dtype, device).transpose(1, 2)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- what the kernels can run ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _bool_arith(e, n_operands, operand_kinds: tuple) -> str | None:
    """Reason if the expression does arithmetic on two boolean values (torch keeps those boolean)."""
    def kind(x):
        op = x[0]
        if op == "operand":
            return operand_kinds[x[1]]
        if op in COMPARE or op in LOGICAL:
            return "bool"
        if op == "identity":
            return kind(x[1])
        return "float"

    def walk(x):
        op = x[0]
        if op in LEAVES:
            return None
        if op in ("add", "sub", "mul", "div", "maximum", "minimum") and kind(x[1]) == kind(x[2]) == "bool":
            return f"arithmetic '{op}' on two boolean values"
        if op == "neg" and kind(x[1]) == "bool":
            return "negation of a boolean value"
        for a in x[1:]:
            r = walk(a)
            if r:
                return r
        return None

    return walk(e)


_INT = {int}


def _ints(*xs) -> bool:
    """All plain ints (not symbolic sizes): checks on symbolic sizes would add compile-time guards."""
    return not xs or set(map(type, xs)) == _INT


def _span(t) -> int:
    """Largest element offset inside one (batch, head) slice of t (0 when sizes are symbolic)."""
    shape, stride = t.shape, t.stride()
    if len(shape) == 4:     # the common case, without building sets
        b, h, s, d = shape
        sb, sh, ss, sd = stride
        if not (type(b) is type(h) is type(s) is type(d) is type(sb) is type(sh) is type(ss) is type(sd) is int):
            return 0
        return (s - 1) * abs(ss) * (s > 0) + (d - 1) * abs(sd) * (d > 0)
    if len(shape) < 4 or set(map(type, shape)) != _INT or set(map(type, stride)) != _INT:
        return 0
    span = 0
    for s, st in zip(shape[2:], stride[2:]):
        if s > 0:
            span += (s - 1) * abs(st)
    return span


def supports(prog: ScoreProgram, q, k, v, operands, fp8: bool = False) -> str | None:
    """None when the generated kernels can run the site, else why not. fp8: the FP8 forward asks (its dots
    take e4m3, so the interpreter's bf16 dot does not matter)."""
    if q.dtype not in _FLOATS:
        return f"dtype {q.dtype} is not fp16/bf16/fp32"
    if not (q.dtype == k.dtype == v.dtype):
        return "q, k, v dtypes differ"
    d, dv = q.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM:
        return f"head dim {d} > {MAX_HEAD_DIM}"
    if dv > MAX_HEAD_DIM:
        return f"value head dim {dv} > {MAX_HEAD_DIM}"
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not fp8:
        return "bf16 tl.dot is wrong in the Triton CPU interpreter"
    if q.device.type not in ("cpu", "cuda", "meta"):
        return f"device {q.device.type} is not supported"
    if _ints(q.shape[1], k.shape[1]) and (k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0):
        return "query heads are not a multiple of kv heads"
    kinds = []
    for n, t in enumerate(operands):
        if t.dim() != 4:
            return f"operand {n} is not 4-D"
        if t.dtype.is_complex:
            return f"operand {n} is complex"
        kinds.append("bool" if t.dtype == torch.bool else "float")
    reason = _bool_arith(prog.expr, prog.n_operands, tuple(kinds))
    if reason:
        return reason
    for name, t in [("q", q), ("k", k), ("v", v)] + [(f"operand {n}", t) for n, t in enumerate(operands)]:
        if _span(t) >= 2 ** 31 - 1:
            return f"{name} spans more than 2^31 elements within one (batch, head)"
    if (prog.operand_grad and any(prog.operand_grad) and _ints(*q.shape, *k.shape)
            and q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] >= 2 ** 31):
        return "operand gradient buffer (B·H·Sq·Sk) exceeds 2^31 elements"
    return None


# --- configurations -------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages); the first entry is the default when tuning is not possible.
# dkdv configs may add DV_BLOCK_M (dkdv_config). Backward lists from the H100 sweep in bench/NOTES.md (scratch
# sweep of dkdv / dq tiles at S=4096; D=256: bench/bwd256_sweep.py). fp32 uses
# IEEE fp32 tl.dot (no TF32, to match eager fp32), an FMA path that spills at any tile: small tiles.
def _fwd_configs(d: int, dtype: torch.dtype):
    if dtype == torch.float32:
        return [(32, 32, 8, 1), (16, 32, 4, 1)] if d <= 128 else [(32, 32, 8, 1), (32, 32, 4, 1)]
    if d <= 64:
        return [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)]
    if d <= 128:
        return [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2)]
    return [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)]


def _dkdv_configs(d: int, dtype: torch.dtype):
    if dtype == torch.float32:
        return [(16, 32, 4, 1), (16, 64, 8, 1), (32, 32, 8, 1)]
    if d <= 64:
        return [(32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3)]
    if d <= 128:
        return [(64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 2)]
    # D > 128: two fp32 accumulators of 64 keys x 256 spill at 8 warps, and fewer keys than 128 make Triton
    # compute S and dP in both warpgroups (or fall back to mma.sync below 64): the two-sweep schedule with 128
    # keys, which compiles for sm_90a without local-memory traffic in its inner loops (bench/results/
    # bwd256_sass.md; the first entry also with GQA, operands and soft-capping, where DV_BLOCK_M=64 spills);
    # (64, 32, 8, 2), the one-sweep pick before, stays for GPUs with less shared memory than the H100's 227 KB
    return [(32, 128, 8, 2, 32), (32, 128, 8, 2, 64), (32, 128, 8, 3, 32), (64, 32, 8, 2)]


def dkdv_config(cfg) -> tuple:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, DV_BLOCK_M) of a dkdv config: DV_BLOCK_M > 0 is the two-sweep
    schedule (dV, then dK; templates_bwd.BackwardKernels.dkdv_kernel), a 4-tuple the one-sweep schedule."""
    return tuple(cfg) if len(cfg) == 5 else (*cfg, 0)


def _dq_configs(d: int, dtype: torch.dtype):
    if dtype == torch.float32:
        return [(32, 32, 8, 1), (32, 32, 4, 1)]
    if d <= 64:
        return [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3)]
    if d <= 128:
        return [(128, 64, 8, 2), (128, 128, 8, 1), (128, 32, 8, 2)]
    # D > 128: Q and dO of 128 rows take 128 KB of shared memory, so only 16-32 keys per stage leave room for a
    # cp.async pipeline (a single stage loads through registers and spills); (64, 32, 8, 2) for smaller GPUs
    return [(128, 32, 8, 2), (128, 32, 8, 3), (128, 16, 8, 4), (64, 32, 8, 2)]


_CONFIGS = {"fwd": _fwd_configs, "dkdv": _dkdv_configs, "dq": _dq_configs}

# Interpreter tiles: small and unequal, so that several blocks, partial blocks and both masked and unmasked
# runs are exercised on short sequences. Tests may change these.
INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}

_TUNED: dict = {}
_AUTOTUNE = os.environ.get("FA3_AUTOTUNE", "1") != "0"


def _bucket(n: int) -> int:
    return 1 << max(6, min(17, (max(n, 1) - 1).bit_length()))


def _capturing(device) -> bool:
    try:
        return torch.cuda.is_current_stream_capturing()
    except Exception:
        return False


_TUNE_ROUNDS = 2


def _launch_tuned(kind: str, key: tuple, d: int, dtype, device, launch, configs=None, interpret_config=None):
    """launch(config) runs the kernel once. Picks/caches the fastest config for key among `configs` (default:
    this module's list for `kind`; the first is the default when tuning is not possible). interpret_config
    replaces INTERPRET_CONFIGS[kind] for kernels defined elsewhere. Returns the config when it is settled for
    key (tuned, or tuning is off), so a caller may pin it; None otherwise (CPU, or a first call under capture)."""
    if device.type != "cuda":
        launch(interpret_config or INTERPRET_CONFIGS[kind])
        return None
    configs = configs or _CONFIGS[kind](d, dtype)
    full_key = (kind,) + key
    best = _TUNED.get(full_key)
    if best is not None:
        launch(best)
        return best
    if not _AUTOTUNE or _capturing(device):
        for cfg in configs:
            try:
                launch(cfg)
                return cfg if not _AUTOTUNE else None
            except Exception as exc:  # out of shared memory etc.: next config
                last = exc
        raise last
    import triton.testing
    # two rounds over the candidates, each keeping its faster median: a single 15 ms window holds only ~3 calls
    # of a long backward, and the first candidates run while clocks and caches settle (the H100 tuner once
    # settled a 16k causal backward on a schedule 13% slower than the best, bench/results/bwd_ws.md)
    timings: dict = {}
    for _ in range(_TUNE_ROUNDS):
        for i, cfg in enumerate(configs):
            if timings.get(i, 0.0) is None:
                continue
            try:
                launch(cfg)
                torch.cuda.synchronize(device)
                ms = triton.testing.do_bench(lambda: launch(cfg), warmup=3, rep=15)
                timings[i] = min(ms, timings.get(i, ms))
            except Exception:
                timings[i] = None       # out of shared memory etc.: not a candidate
    ranked = sorted((ms, i) for i, ms in timings.items() if ms is not None)
    if not ranked:
        launch(configs[0])  # raises the real error
        return None
    best = configs[ranked[0][1]]
    _TUNED[full_key] = best
    launch(best)
    return best


def _grid_m(spec_gen_head_fastest: bool, n_m: int, h: int, b: int):
    return (h, n_m, b) if spec_gen_head_fastest else (n_m, h, b)


def _head_fastest(spec: codegen.KernelSpec) -> bool:
    return any(o.bcast[1] and not (o.bcast[2] and o.bcast[3]) for o in spec.operands)


def _expanded_strides(t, full):
    st = t.expand(*full).stride() if t.dim() == 4 else (0, 0, 0, 0)
    return [int(s) for s in st]


_SPECS: dict = {}


def _spec_and_module(prog, q, k, v, operands, interpret: bool, variant: str = "attention"):
    """Spec and generated module, memoised on cheap facts so that a launch costs a dict lookup."""
    fast = (prog, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] // k.shape[1], interpret, variant,
            tuple((t.dtype, tuple(s == 1 for s in t.shape)) for t in operands))
    hit = _SPECS.get(fast)
    if hit is None:
        spec = codegen.make_spec(prog, q, k, v, operands, interpret, variant)
        hit = (spec, codegen.load(spec), spec.key(), _head_fastest(spec))
        _SPECS[fast] = hit
    return hit


def _prepare(q, k, v, operands, prog, variant: str = "attention"):
    spec, mod, key, hf = _spec_and_module(prog, q, k, v, operands, interpreting() and q.device.type == "cpu",
                                          variant)
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    full = (b, hq, sq, sk)
    op_args = []
    for t in operands:
        op_args += [t] + _expanded_strides(t, full)
    coff = 0 if prog.causal != "bottom_right" else sk - sq
    return spec, mod, op_args, coff, key, hf


def _tune_key(key, sq, sk):
    return (key, _bucket(sq), _bucket(sk))


def forward(q, k, v, operands, prog: ScoreProgram):
    """Returns (out (B, Hq, Sq, Dv) in v.dtype, lse fp32 (B, Hq, Sq))."""
    b, hq, sq, _ = q.shape
    out = empty_out(b, hq, sq, v.shape[-1], v.dtype, q.device)
    lse = _empty((b, hq, sq), torch.float32, q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    forward_into(q, k, v, operands, prog, out, lse)
    if prog.empty_row == "uniform":     # the kernel leaves rows with no visible key at 0
        out = uniform_fill(out, lse, v)
    return out, lse


def forward_into(q, k, v, operands, prog: ScoreProgram, out, lse) -> None:
    """The forward kernel (tuned) into out / lse as forward allocates them, rows with no visible key left at 0
    where prog.empty_row is "uniform" (the caller fills them): the Hopper forward's tuner times it as a
    candidate (hopper.PORTABLE)."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    spec, mod, op_args, coff, skey, hf = _prepare(q, k, v, operands, prog)
    base = ("fwd", prog, q.device.index, launcher.call_key((q, k, v, *operands)))

    def launch(cfg):
        bm, bn, warps, stages = cfg
        grid = _grid_m(hf, triton_cdiv(sq, bm), hq, b)
        launcher.launch(base + (cfg,), mod.attn_fwd, grid,
                        (q, k, v, out, lse, *op_args, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                         *lse.stride(), sq, sk, coff),
                        dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages))

    _launch_tuned("fwd", _tune_key(skey, sq, sk), d, q.dtype, q.device, launch)


# attn_bwd_uniform (BLOCK_M, BLOCK_N, num_warps): never tuned (it updates dq/dk/dv in place, so a timing loop
# would add its correction again; and it does next to nothing unless a row is empty). BLOCK_M divides PRE_M.
UNIFORM_INTERPRET_CONFIG = (16, 32, 4)
_UNIFORM_PROGRAMS_INTERPRET = 3     # a few programs striding over the work list, so the stride is exercised
_SMS: dict = {}


def _uniform_config(d: int, dtype: torch.dtype, device):
    """Tiles that compile for sm_90 without register spills for scaled scores and a bias with a gradient
    (tests/test_uniform_sm90.py; a soft-capped d=128 program spills a few registers)."""
    if device.type != "cuda":
        return UNIFORM_INTERPRET_CONFIG
    if dtype == torch.float32:
        return (32, 32, 8) if d <= 64 else (16, 32, 8)
    if d <= 64:
        return (64, 64, 4)
    return (32, 64, 4) if d <= 128 else (32, 32, 8)


def _pre_block(device) -> int:
    """Rows per attn_bwd_pre program (also the query blocks of attn_bwd_uniform's work list)."""
    return 64 if device.type == "cuda" else 32


def _uniform_programs(device) -> int:
    """attn_bwd_uniform's grid: two programs per SM (at most two fit by registers), so that with no empty row
    the launch is a wave or two of programs that read two counts, and with some the items spread over the GPU."""
    if device.type != "cuda":
        return _UNIFORM_PROGRAMS_INTERPRET
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SMS[idx]


def uniform_work_len(b: int, hq: int, hk: int, sq: int, device) -> int:
    """Length of the zeroed int32 work list of attn_bwd_pre / attn_bwd_uniform (layout in templates_uniform.py)."""
    ng = b * hk
    return 2 * ng + 2 + triton_cdiv(sq, _pre_block(device)) * hq * b


def _imprecise_config(d: int, dtype: torch.dtype, device, part: int):
    """attn_bwd_imprecise's tiles per PART: ones that compile for sm_90 without register spills
    (tests/test_uniform_sm90.py; its PART 1 holds a row block's q, dO and dq beside the score tiles of two
    passes, so at head dim 128 it takes 32 keys where attn_bwd_uniform takes 64)."""
    if device.type != "cuda":
        return UNIFORM_INTERPRET_CONFIG
    if dtype == torch.float32:
        if d <= 64:
            return (32, 32, 8)
        return (16, 16, 8) if part == 1 else (16, 32, 8)
    if d <= 64:
        return (64, 64, 4)
    return (32, 32, 4) if d <= 128 else (32, 32, 8)


def _special_fixed(q, k, v, dout, lse_strides, grad_strides, cfg, target):
    """What a launch of attn_bwd_uniform / attn_bwd_imprecise with tiles cfg (BLOCK_M, BLOCK_N, num_warps) takes
    from the layouts alone: (query-block items, (group, key block) items, integer arguments, kwargs).
    grad_strides: those of dq, dk, dv."""
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    bm, bn, warps = cfg
    pre = _pre_block(target)
    assert pre % bm == 0
    num_pre, num_n = triton_cdiv(sq, pre), triton_cdiv(sk, bn)
    ints = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse_strides, *grad_strides[0],
            *grad_strides[1], *grad_strides[2], sq, sk, hq, b * hk, num_pre, num_n)
    kw = dict(PRE_M=pre, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=1)
    return num_pre * hq * b, b * hk * num_n, ints, kw


def _uniform_fixed(q, k, v, dout, lse_strides, grad_strides, target):
    """attn_bwd_uniform's (work items, integer arguments, kwargs): both kinds of items in one launch."""
    rows, keys, ints, kw = _special_fixed(q, k, v, dout, lse_strides, grad_strides,
                                          _uniform_config(q.shape[-1], q.dtype, target), target)
    return rows + keys, ints, kw


def imprecise_fixed(q, k, v, dout, lse_strides, grad_strides, coff: int, part: int, target):
    """attn_bwd_imprecise's (work items, integer arguments, kwargs) for PART part (templates_uniform.py); its
    tensors: q, k, v, dout, the forward's lse, delta (3, B, H, Sq), the work list, dq, dk, dv, operands,
    d(operand) buffers. target: the device whose tiles to take."""
    rows, keys, ints, kw = _special_fixed(q, k, v, dout, lse_strides, grad_strides,
                                          _imprecise_config(q.shape[-1], q.dtype, target, part), target)
    return (rows if part == 1 else keys), (*ints, coff), dict(kw, PART=part)


def uniform_launch_args(mod, q, k, v, dout, lse, work, dq, dk, dv, op_args, dop_args, target=None):
    """(kernel, grid, args, kwargs) of attn_bwd_uniform (templates_uniform.py): adds, in place, the gradient of
    the rows empty_row="uniform" fills to dq, dk, dv and to the d(operand) buffers of dop_args. work: the list
    attn_bwd_pre filled. No host sync: the kernel reads how much there is to do on the device.
    target: the device whose tiles to take (default q's; a test compiles CUDA tiles from CPU tensors)."""
    grad_strides = (dq.stride(), dk.stride(), dv.stride())
    items, ints, kw = _uniform_fixed(q, k, v, dout, lse.stride(), grad_strides, target or q.device)
    grid = (max(1, min(items, _uniform_programs(q.device))),)
    return mod.attn_bwd_uniform, grid, (q, k, v, dout, lse, work, dq, dk, dv, *op_args, *dop_args, *ints), kw


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _contiguous(shape) -> tuple:
    """Strides of a contiguous tensor of this shape (what _empty returns)."""
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))


def _interleave(tensors, strides) -> list:
    args = []
    for t, st in zip(tensors, strides):
        args.append(t)
        args += st
    return args


class _Backward:
    """What a backward call key pins (shapes, strides, dtypes and alignment of dout, q, k, v, operands, out, lse):
    the generated module, every integer argument, grids and constexprs of attn_bwd_pre and attn_bwd_uniform,
    those of dkdv / dq per config, and which buffers the program needs. BackwardLaunches allocates a call's
    buffers and launches through it (directly after the first call: launcher.Site). The configs of dkdv / dq
    still come from _launch_tuned per call (a cached lookup once tuned). Holds no tensors."""

    def __init__(self, base, dout, q, k, v, operands, out, lse, prog: ScoreProgram):
        b, hq, sq, d = q.shape
        hk, sk = k.shape[1], k.shape[2]
        dev = q.device
        self.base, self.d, self.dtype, self.mode = base, d, q.dtype, prog.empty_row
        self.shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        self.lse_shape, self.full = (b, hq, sq), (b, hq, sq, sk)
        want = prog.operand_grad or (False,) * len(operands)
        self.grad_ops = tuple(n for n, w in enumerate(want) if w)
        # per operand gradient: the broadcast dims its full (B, Hq, Sq, Sk) gradient is summed over
        self.reduce = tuple([i for i in range(4) if operands[n].shape[i] == 1 and self.full[i] != 1]
                            for n in self.grad_ops)
        spec, self.mod, _, self.coff, skey, self.hf = _prepare(q, k, v, operands, prog)
        # rows whose fp32 lse lost log l: attn_bwd_pre writes the lse the gradient kernels read (+inf there: they
        # skip them; contiguous like delta) and lists them; attn_bwd_imprecise adds their gradient (PART 1, 2);
        # delta gets two more (B, H, Sq) planes for their softmax's m and l
        self.imprecise = codegen.imprecise_possible(spec)
        self.delta_shape = (3, b, hq, sq) if self.imprecise else (b, hq, sq)
        klse = _contiguous(self.lse_shape) if self.imprecise else tuple(lse.stride())
        self.tune_key = _tune_key(skey, sq, sk)
        self.op_strides = tuple(tuple(_expanded_strides(t, self.full)) for t in operands)
        self.dfull_strides = (_contiguous(self.full),) * len(self.grad_ops)
        grads = tuple(_contiguous(s) for s in self.shapes)
        # FLAG: attn_bwd_pre's per-group flags (empty_row="nan") or the uniform rows' work list, then the
        # imprecise rows' work list; unread when empty
        work = uniform_work_len(b, hq, hk, sq, dev)
        self.flag_len = {"nan": b * hk, "uniform": work}.get(self.mode, 0) + (work if self.imprecise else 0) or None
        bm_pre = _pre_block(dev)
        self.pre = (launcher.Site(base + ("pre",)), (triton_cdiv(sq, bm_pre), hq, b),
                    (*out.stride(), *dout.stride(), *lse.stride(), sq, hq), dict(BLOCK_M=bm_pre))
        qkv = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *klse)
        self.dkdv_ints = (*qkv, *grads[1], *grads[2], sq, sk, self.coff)
        self.dq_ints = (*qkv, *grads[0], sq, sk, hq, self.coff)
        self.launches: dict = {}        # ("dkdv" | "dq", config) -> (Site, grid, kwargs)
        # another grads step's own plan under this call key (hopper_bwd's: the tuned schedule's launches)
        self.steps: dict = {}
        self.uniform = None
        if self.mode == "uniform":
            self.uniform = (launcher.Site(base + ("uniform",)), *_uniform_fixed(q, k, v, dout, klse, grads, dev))
        self.rows = None
        if self.imprecise:      # attn_bwd_imprecise: PART 1 over query blocks, PART 2 over (group, key block)
            self.rows = tuple((launcher.Site(base + ("imprecise", part)),
                               *imprecise_fixed(q, k, v, dout, tuple(lse.stride()), grads, self.coff, part, dev))
                              for part in (1, 2))

    def launch(self, kind: str, cfg):
        """(Site, grid, kwargs) of attn_bwd_dkdv ("dkdv", a dkdv_config) or attn_bwd_dq ("dq") with tile cfg."""
        hit = self.launches.get((kind, cfg))
        if hit is None:
            b, hq, sq, sk = self.full
            if kind == "dkdv":
                bm, bn, warps, stages, dv_bm = dkdv_config(cfg)
                grid = (triton_cdiv(sk, bn), self.shapes[1][1], b)
                kw = dict(BLOCK_M=bm, BLOCK_N=bn, DV_BLOCK_M=dv_bm, num_warps=warps, num_stages=stages)
            else:
                bm, bn, warps, stages = cfg
                grid = _grid_m(self.hf, triton_cdiv(sq, bm), hq, b)
                kw = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
            hit = self.launches[(kind, cfg)] = (launcher.Site(self.base + (kind, cfg)), grid, kw)
        return hit


_BWD_PLANS: dict = {}


def _backward_plan(dout, q, k, v, operands, out, lse, prog: ScoreProgram) -> _Backward:
    dev = q.device
    base = ("bwd", prog, dev.index, dev.type == "cpu" and interpreting(),
            launcher.call_key((q, k, v, dout, out, lse, *operands)))
    plan = _BWD_PLANS.get(base)
    if plan is None:
        if len(_BWD_PLANS) > 4096:
            _BWD_PLANS.clear()
        plan = _BWD_PLANS[base] = _Backward(base, dout, q, k, v, operands, out, lse, prog)
    return plan


class BackwardLaunches:
    """The backward's buffers and kernel launches for one call, through its call key's plan (_Backward): pre()
    computes delta (and the empty-row flags / uniform work list), dkdv(cfg) and dq(cfg) launch attn_bwd_dkdv /
    attn_bwd_dq with a tile config (tuned by `backward`; timed config by config by bench/bwd256_sweep.py),
    uniform() / imprecise() add the special rows' gradient; dkdv_call / dq_call give the launch without running
    it (built from CPU tensors without the interpreter, a test compiles the CUDA kernels for sm_90a). lse: the
    forward's; self.lse is what the gradient kernels read: where the program can have imprecise rows a copy
    that pre() writes, +inf on those rows (templates_uniform.py)."""

    def __init__(self, dout, q, k, v, operands, lse, prog: ScoreProgram, out, plan: _Backward | None = None):
        plan = plan or _backward_plan(dout, q, k, v, operands, out, lse, prog)
        dev = q.device
        self.plan, self.mod, self.tune_key, self.base, self.coff = plan, plan.mod, plan.tune_key, plan.base, plan.coff
        qs, ks, vs = plan.shapes
        self.grads = (_empty(qs, plan.dtype, dev), _empty(ks, plan.dtype, dev), _empty(vs, plan.dtype, dev))
        self.grad_ops = plan.grad_ops
        self.dfull = [torch.zeros(plan.full, dtype=torch.float32, device=dev) for _ in plan.grad_ops] if (
            plan.grad_ops) else []
        self.delta = _empty(plan.delta_shape, torch.float32, dev)
        self.flag = (self.delta if plan.flag_len is None
                     else torch.zeros((plan.flag_len,), dtype=torch.int32, device=dev))
        self.op_args = _interleave(operands, plan.op_strides)
        self.dop_args = _interleave(self.dfull, plan.dfull_strides)
        self.q, self.k, self.v, self.dout, self.out, self.saved_lse = q, k, v, dout, out, lse
        self.lse = _empty(plan.lse_shape, torch.float32, dev) if plan.imprecise else lse

    def pre(self):
        site, grid, ints, kw = self.plan.pre
        if self.plan.imprecise:
            site(self.mod.attn_bwd_pre, grid, (self.out, self.dout, self.saved_lse, self.delta, self.flag, self.lse,
                                               *ints), kw)
        else:
            site(self.mod.attn_bwd_pre, grid, (self.out, self.dout, self.lse, self.delta, self.flag, *ints), kw)

    def dkdv_call(self, cfg):
        """(kernel, grid, args, kwargs) of attn_bwd_dkdv with tile config cfg (dkdv_config)."""
        _, dk, dv = self.grads
        _, grid, kw = self.plan.launch("dkdv", cfg)
        return self.mod.attn_bwd_dkdv, grid, (self.q, self.k, self.v, self.dout, self.lse, self.delta, self.flag,
                                              dk, dv, *self.op_args, *self.plan.dkdv_ints), kw

    def dq_call(self, cfg):
        """(kernel, grid, args, kwargs) of attn_bwd_dq with tile config cfg."""
        _, grid, kw = self.plan.launch("dq", cfg)
        return self.mod.attn_bwd_dq, grid, (self.q, self.k, self.v, self.dout, self.lse, self.delta, self.grads[0],
                                            *self.op_args, *self.dop_args, *self.plan.dq_ints), kw

    def dkdv(self, cfg):
        site, grid, kw = self.plan.launch("dkdv", cfg)
        _, dk, dv = self.grads
        site(self.mod.attn_bwd_dkdv, grid, (self.q, self.k, self.v, self.dout, self.lse, self.delta, self.flag, dk,
                                            dv, *self.op_args, *self.plan.dkdv_ints), kw)

    def dq(self, cfg):
        site, grid, kw = self.plan.launch("dq", cfg)
        site(self.mod.attn_bwd_dq, grid, (self.q, self.k, self.v, self.dout, self.lse, self.delta, self.grads[0],
                                          *self.op_args, *self.dop_args, *self.plan.dq_ints), kw)

    def uniform(self):
        """empty_row="uniform": adds the gradient of the rows the kernels left without one (no visible key)."""
        site, items, ints, kw = self.plan.uniform
        dq, dk, dv = self.grads
        site(self.mod.attn_bwd_uniform, (max(1, min(items, _uniform_programs(self.q.device))),),
             (self.q, self.k, self.v, self.dout, self.lse, self.flag, dq, dk, dv, *self.op_args, *self.dop_args,
              *ints), kw)

    def imprecise(self):
        """Programs that can have imprecise rows: adds their gradient (attn_bwd_imprecise PART 1, then PART 2;
        each a fixed grid that ends at once when pre() listed no such row)."""
        programs = _uniform_programs(self.q.device)
        dq, dk, dv = self.grads
        tensors = (self.q, self.k, self.v, self.dout, self.saved_lse, self.delta, self.flag, dq, dk, dv,
                   *self.op_args, *self.dop_args)
        for site, items, ints, kw in self.plan.rows:
            site(self.mod.attn_bwd_imprecise, (max(1, min(items, programs)),), (*tensors, *ints), kw)


def portable_grads(run: BackwardLaunches) -> None:
    """dK / dV (one program per key block) then dQ (one per query block), each tuned: deterministic, no
    atomics."""
    plan = run.plan
    _launch_tuned("dkdv", plan.tune_key, plan.d, plan.dtype, run.q.device, run.dkdv)
    _launch_tuned("dq", plan.tune_key, plan.d, plan.dtype, run.q.device, run.dq)


def backward(dout, q, k, v, operands, out, lse, prog: ScoreProgram, grads=portable_grads):
    """Returns (dq, dk, dv, [d operand for each operand whose operand_grad flag is set]). dout may have any
    strides (the kernels take them).
    grads(BackwardLaunches) fills dq, dk, dv (and the d(operand) buffers): the portable kernels by default, the
    Hopper warp-specialized kernel through hopper_bwd.backward. Around it: attn_bwd_pre (delta, the special
    rows' work lists), the uniform rows' and the imprecise rows' gradients (templates_uniform.py). No host sync
    (also while a CUDA graph is captured)."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if b * hq * sq == 0 or sk == 0:
        return _backward_empty(q, k, v, operands, prog)
    plan = _backward_plan(dout, q, k, v, operands, out, lse, prog)
    run = BackwardLaunches(dout, q, k, v, operands, lse, prog, out, plan)
    run.pre()
    grads(run)
    if plan.uniform is not None:    # rows the kernels above left without gradient (no visible key)
        run.uniform()
    if plan.rows is not None:       # rows whose lse lost log l, which the kernels above skipped
        run.imprecise()
    dq, dk, dv = run.grads
    extra = []
    for i, n in enumerate(plan.grad_ops):
        full = run.dfull[i]
        if plan.mode == "nan":
            full = torch.where((lse == -math.inf).unsqueeze(-1), torch.full_like(full, math.nan), full)
        dims = plan.reduce[i]
        red = full.sum(dim=dims, keepdim=True) if dims else full
        t = operands[n]
        extra.append(red.reshape(t.shape).to(t.dtype))
    return dq, dk, dv, extra


def _backward_empty(q, k, v, operands, prog: ScoreProgram):
    """No query row or no key: zero gradients (NaN dq for empty_row="nan" rows, as eager gives them)."""
    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, q.device)
    dv = _empty(v.shape, v.dtype, q.device)
    dq.zero_(), dk.zero_(), dv.zero_()
    b, hq, sq, _ = q.shape
    if prog.empty_row == "nan" and k.shape[2] == 0 and b * hq * sq > 0:
        dq.fill_(math.nan)
    want = prog.operand_grad or (False,) * len(operands)
    return dq, dk, dv, [torch.zeros_like(t) for t, w in zip(operands, want) if w]
