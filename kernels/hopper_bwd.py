"""Launch side of the Hopper warp-specialized backward (templates_hopper_bwd.py) for the dispatch table.

sm_90 only. It replaces the portable dK/dV and dQ kernels inside triton_portable.backward (which still runs
attn_bwd_pre and the uniform-row and imprecise-row kernels around it, all on the device), so every program
semantics stays the portable backward's. dQ is accumulated in fp32 by TMA bulk reductions (or atomics), then
cast: not deterministic, so under torch.use_deterministic_algorithms(True) dispatch takes the portable backward.
"""

from __future__ import annotations

import functools

import torch

from . import dq_cast, hopper, launcher, triton_portable
from .program import ScoreProgram

HEAD_DIMS = (64, 128)
BLOCK_M = 64          # query rows per step (the wgmma N of Sᵀ / dPᵀ, the M of dQ)
BLOCK_N = 128         # keys per CTA: two consumer warpgroups x 64
SMEM_LIMIT = hopper.SMEM_LIMIT


def stages(d: int, dq_writer: bool = False, block_m: int = BLOCK_M) -> int:
    """Q / dO ring depth that fits beside K, V (BLOCK_N x d each), the two dS buffers and the fp32 dQ tiles (the
    TMA reductions' sources: one per consumer, or two whole tiles for the dQ writer); a stage holds Q, dO and
    the tile's lse / delta rows (stats_smem)."""
    fixed = 2 * BLOCK_N * d * 2 + 2 * BLOCK_N * block_m * 2 + (4 if dq_writer else 2) * block_m * (d // 2) * 4
    return max(0, min(3, (SMEM_LIMIT - fixed) // (2 * block_m * d * 2 + 2 * block_m * 4)))


def _declines(prog: ScoreProgram, q, v) -> str | None:
    """What this kernel does not compute (cheap: program and head dims only)."""
    d, dv = q.shape[-1], v.shape[-1]
    if d != dv or d not in HEAD_DIMS:
        return f"head dims ({d}, {dv}): the warp-specialized backward runs d = dv in {HEAD_DIMS}"
    if prog.operand_grad and any(prog.operand_grad):
        return "a score operand needs its gradient (the portable backward computes d(operand))"
    if torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms requested (this backward adds dQ with atomics)"
    return None


def supports(prog: ScoreProgram, q, k, v, operands) -> str | None:
    """None when the warp-specialized backward can serve the site, else why the portable one runs it."""
    return hopper.supports(prog, q, k, v, operands) or _declines(prog, q, v)


def _spec_and_module(prog, q, k, v, operands):
    return hopper._spec_and_module(prog, q, k, v, operands, "hopper_bwd")[1]


def launch_args(c: triton_portable.BackwardLaunches, operands, prog: ScoreProgram, dq_acc, n_stages=None,
                dq_lag=False, dq_add=3, dq_writer=False, dq_early=False, stats_smem=False, block_m=BLOCK_M,
                dq_rows=False, dq_alt=False):
    """(kernel, grid, args, kwargs) of one attn_bwd_ws launch; also used by tests to compile and read the PTX.
    dq_acc: zeroed fp32 (B, Hq, Sq rounded up to BLOCK_M, D). dq_writer: a separate warp issues the dQ
    reductions from two shared buffers (needs dq_add=3); dq_early: the dQ product is issued between dV and dK
    (FlashAttention-3's order; not with dq_lag); stats_smem: the producer loads each tile's lse / delta rows into
    shared memory beside Q / dO, the consumers read them where used; block_m: query rows per step (64 or 128;
    dq_acc's rows rounded up to it); dq_rows: each consumer computes dQ for half the rows over the whole head dim
    (FlashAttention-3's split at D=64) instead of all rows over half of it (needs block_m=128: 64-row wgmma);
    dq_alt: the consumers take whole dQ tiles in turn (tile % 2), so only one of them waits for the other's dS
    half per tile."""
    if block_m not in (64, 128):
        raise ValueError(f"block_m={block_m}: the warp-specialized backward steps 64 or 128 query rows")
    if dq_rows and block_m != 128:
        raise ValueError("dq_rows splits dQ by query rows between the consumers: it needs block_m=128")
    if dq_alt and (not dq_early or not stats_smem or dq_rows):
        raise ValueError("dq_alt (whole dQ tiles, consumers alternating) runs in the dq_early order with stats_smem "
                         "(its padding tile has lse = +inf), not with dq_rows")
    if dq_writer and dq_add != 3:
        raise ValueError("dq_writer hands dQ to TMA reductions: it needs dq_add=3")
    if dq_early and dq_lag:
        raise ValueError("dq_early and dq_lag are two placements of the same dQ product: pick one")
    q, k, v, dout = c.q, c.k, c.v, c.dout
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    mod = _spec_and_module(prog, q, k, v, operands)
    grid = (triton_portable.triton_cdiv(sk, BLOCK_N), hk, b)
    descs = [hopper._desc(t, rows) for t, rows in ((q, block_m), (k, BLOCK_N), (v, BLOCK_N), (dout, block_m),
                                                  (c.grads[1], BLOCK_N), (c.grads[2], BLOCK_N))]
    # one consumer's dQ block: the kernel reads the split (rows or head-dim columns) from its shape
    dq_desc = hopper._desc(dq_acc, block_m // 2 if dq_rows else block_m, d if dq_rows or dq_alt else d // 2)
    args = (*descs, c.lse, c.delta, dq_acc, dq_desc, c.flag, *c.op_args, *c.lse.stride(), sq, sk, c.coff)
    kwargs = dict(BLOCK_M=block_m, BLOCK_N=BLOCK_N, STAGES=n_stages or stages(d, dq_writer, block_m), DQ_LAG=dq_lag,
                  DQ_ADD=dq_add, DQ_WRITER=dq_writer, DQ_EARLY=dq_early,
                  STATS_SMEM=stats_smem, DQ_ALT=dq_alt, num_warps=4)
    return mod.attn_bwd_ws, grid, args, kwargs


# Candidates of the tuned gradient step, the default (no tuning possible, e.g. under CUDA-graph capture) first:
# ("ws", *values of WS_KNOBS) or ("portable",). The knobs, one each: Q/dO stages; dq_lag: the previous tile's dQ
# queued behind S / dP; dq_add: 1 per-thread atomics, 3 TMA bulk reductions; dq_writer: a separate warp issues
# those reductions from two shared buffers; dq_early: dQ issued between dV and dK (FlashAttention-3's order);
# stats_smem: lse / delta rows through shared memory (the producer loads them); block_m: query rows per step;
# dq_rows: dQ split between the consumers by rows, not head-dim columns; dq_alt: whole dQ tiles, the consumers
# taking them in turn (D=64 only: at D=128 the 64-register dQ tile beside dK / dV spills and ptxas serialises the
# wgmmas). The portable dK/dV + dQ kernels stay a
# candidate, and the tuner keeps whichever is faster per (spec, length bucket), so dispatch never pays for the
# warp-specialized kernel where it loses (bench/results/bwd_ws.md).
WS_KNOBS = ("n_stages", "dq_lag", "dq_add", "dq_writer", "dq_early", "stats_smem", "block_m", "dq_rows", "dq_alt")
CANDIDATES = (("ws", 2, False, 3, True, True, True, 64, False, False),
              ("ws", 2, False, 3, False, False, True, 64, False, False),
              ("ws", 2, False, 3, False, False, False, 64, False, False),
              ("ws", 2, True, 3, False, False, False, 64, False, False),
              ("ws", 2, False, 1, False, False, False, 64, False, False), ("portable",))
# D=64 only (at D=128, 128-row S / dP tiles beside the dK / dV accumulators exceed the registers): FlashAttention-3's
# 128 x 128 step, dQ by rows; whole dQ tiles by alternating consumers
CANDIDATES_D64 = (("ws", 2, False, 3, True, True, True, 128, True, False),
                  ("ws", 2, False, 3, False, True, True, 128, True, False),
                  ("ws", 2, False, 3, True, True, True, 64, False, True))


def candidates(d: int) -> tuple:
    """The tuner's list at head dim d (CANDIDATES, plus the 128-row step at D=64 before the portable entry)."""
    return CANDIDATES[:-1] + (CANDIDATES_D64 if d == 64 else ()) + CANDIDATES[-1:]


def variant_of(candidate: tuple) -> dict:
    """backward()'s variant keywords for a warp-specialized entry of CANDIDATES."""
    return dict(zip(WS_KNOBS, candidate[1:]))


def _run_ws(c: triton_portable.BackwardLaunches, operands, prog: ScoreProgram, kw: dict) -> None:
    """One unplanned warp-specialized step: a zeroed dQ accumulator, the kernel, the cast into dq."""
    b, hq, sq, d = c.q.shape
    bm = kw.get("block_m", BLOCK_M)
    dq_acc = torch.zeros((b, hq, triton_portable.triton_cdiv(sq, bm) * bm, d), dtype=torch.float32,
                         device=c.q.device)
    kernel, grid, args, kwargs = launch_args(c, operands, prog, dq_acc, **kw)
    launcher.launch(c.base + ("ws", tuple(sorted(kw.items()))), kernel, grid, args, kwargs)
    dq_cast.cast_into(c.grads[0], dq_acc, c.lse, prog.empty_row == "nan", c.base)


def _rebased(templates: tuple, tensors: tuple) -> list:
    """The descriptors of templates on these tensors, which the call key guarantees have the templates' shapes,
    strides, dtypes and alignment (all a descriptor holds besides its base; the launch encodes the TMA map from
    the base's address, the one thing that must be per call)."""
    out = []
    for desc, t in zip(templates, tensors):
        new = object.__new__(type(desc))
        new.__dict__.update(desc.__dict__)
        new.base = t
        out.append(new)
    return out


class _WsPlan:
    """What a backward call key (triton_portable._Backward, which pins the shapes, strides, dtypes and alignments
    of dout, q, k, v, operands, out and lse) fixes of the tuned warp-specialized step: the kernel, its grid,
    constexprs and integer arguments, the seven descriptors' geometry (on no tensor), the dQ accumulator's shape
    and the cast's launch; a call allocates the accumulator, rebases the descriptors and starts both kernels
    through their launcher.Site. The accumulator is zeroed per call: CTAs of different key blocks add into the
    same dQ rows in no fixed order, and rows no CTA visits (masked, padding rows) must read 0, so no reduction
    can be a plain store. Holds no tensors (a plan outlives its calls; CUDA graph pools check for leaks)."""

    __slots__ = ("site", "kernel", "grid", "kwargs", "acc_shape", "descs", "tail", "cast")

    def __init__(self, c: triton_portable.BackwardLaunches, operands, prog: ScoreProgram, kw: dict):
        b, hq, sq, d = c.q.shape
        bm = kw.get("block_m", BLOCK_M)
        self.acc_shape = (b, hq, triton_portable.triton_cdiv(sq, bm) * bm, d)
        acc = torch.empty(self.acc_shape, dtype=torch.float32, device=c.q.device)
        self.kernel, self.grid, args, self.kwargs = launch_args(c, operands, prog, acc, **kw)
        self.site = launcher.Site(c.base + ("ws", tuple(sorted(kw.items()))))
        self.descs = tuple(_rebased(args[:6] + args[9:10], (None,) * 7))
        self.tail = args[-6:]           # lse strides, Sq, Sk, causal offset
        nan_rows = prog.empty_row == "nan"
        self.cast = (launcher.Site(c.base + ("dq_cast", nan_rows)),
                     *dq_cast.cast_fixed(c.grads[0], acc, c.lse, nan_rows))

    def __call__(self, c: triton_portable.BackwardLaunches) -> None:
        acc = torch.zeros(self.acc_shape, dtype=torch.float32, device=c.q.device)
        dq, dk, dv = c.grads
        qd, kd, vd, dod, dkd, dvd, accd = _rebased(self.descs, (c.q, c.k, c.v, c.dout, dk, dv, acc))
        self.site(self.kernel, self.grid, (qd, kd, vd, dod, dkd, dvd, c.lse, c.delta, acc, accd, c.flag,
                                           *c.op_args, *self.tail), self.kwargs)
        site, grid, ints, kwargs = self.cast
        site(dq_cast._dq_cast, grid, (acc, c.lse, dq, *ints), kwargs)


_STEP = "hopper_ws"     # this step's entry in a call key's plan (triton_portable._Backward.steps)


def _grads(operands, prog: ScoreProgram, variant: dict, c: triton_portable.BackwardLaunches) -> None:
    if variant:
        _run_ws(c, operands, prog, variant)
        return
    step = c.plan.steps.get(_STEP)
    if step is not None:        # the tuner has settled for this call key: its schedule's plan
        step(c)
        return

    def launch(cfg):
        if cfg[0] == "portable":
            triton_portable.portable_grads(c)
        else:
            _run_ws(c, operands, prog, variant_of(cfg))
    cfg = triton_portable._launch_tuned("ws_bwd", c.tune_key, c.q.shape[-1], c.q.dtype, c.q.device, launch,
                                        list(candidates(c.q.shape[-1])))
    if cfg is not None:
        c.plan.steps[_STEP] = (triton_portable.portable_grads if cfg[0] == "portable"
                               else _WsPlan(c, operands, prog, variant_of(cfg)))


def ws_grads(operands, prog: ScoreProgram, **variant):
    """The grads step of triton_portable.backward for this kernel: dK, dV written by the kernel (NaN for a
    group with an empty row in "nan" programs, from attn_bwd_pre's flag), dQ through a zeroed fp32 buffer cast
    into dq (dq_cast.py, NaN rows likewise). Without `variant`, tuned among CANDIDATES; once the tuner has
    settled for a call key, later calls under it run that schedule's plan (_WsPlan)."""
    return functools.partial(_grads, operands, prog, variant)


def tma_ready(t) -> bool:
    """Whether TMA reads t (B, H, S, D) in place: a unit last stride, each dimension longer than 1 at a positive
    stride of a 16-byte multiple (TensorDescriptor's rules; hopper._desc gives size-1 dimensions a legal
    stride), a 16-byte aligned start. torch.compile's dout, a transposed (B, S, H, D) gradient, passes; an
    expanded one (stride 0, e.g. the gradient of out.sum()) does not."""
    b, h, s, _ = t.shape
    sb, sh, ss, sd = t.stride()
    e = t.element_size()
    return (sd == 1 and (b == 1 or (sb > 0 and sb * e % 16 == 0)) and (h == 1 or (sh > 0 and sh * e % 16 == 0))
            and (s == 1 or (ss > 0 and ss * e % 16 == 0)) and t.data_ptr() % 16 == 0)


def backward(dout, q, k, v, operands, out, lse, prog: ScoreProgram, **variant):
    """Returns (dq, dk, dv, [d operands]): the portable backward's frame around the warp-specialized gradient
    kernel, or the portable backward itself for a site this kernel declines (the Hopper forward already
    checked the sm_90 / TMA conditions on q, k, v). `variant` (WS_KNOBS keywords) pins a
    warp-specialized schedule (benchmarks, tests); otherwise the tuner picks among CANDIDATES. dout is copied
    only where TMA cannot read it in place (tma_ready)."""
    if _declines(prog, q, v):
        return triton_portable.backward(dout, q, k, v, operands, out, lse, prog)
    if not tma_ready(dout):
        dout = dout.contiguous()
    return triton_portable.backward(dout, q, k, v, operands, out, lse, prog,
                                    grads=functools.partial(_grads, operands, prog, variant))
